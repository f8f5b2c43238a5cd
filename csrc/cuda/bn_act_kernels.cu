// Fused BatchNorm + activation CUDA kernels. CUDA headers only (see bn_act_launch.h).
//
// The storage of x is a row-major [outer, inner] matrix: NCHW has N * C planes of S contiguous
// positions (channel = plane % C), channels-last has N * S rows of C contiguous channels. No
// kernel divides per element: threads are laid out over the two axes, so a thread's channel is
// fixed (channels-last) or advances by a constant from plane to plane (NCHW).
//
// Elementwise passes (forward, input gradient): block = lanes along the inner axis x lanes
// along the outer axis; 16-byte packs when the inner extent is a multiple of the pack and every
// pointer is 16-byte aligned (else the same loops element by element), two packs in flight.
//
// Reductions (statistics, backward sums): grid = channel units x shares; each block reduces one
// share of the rows of its channels, merges its threads in shared memory and writes one partial
// result per channel to the workspace; a second kernel combines the shares of each channel in a
// fixed order (deterministic, no atomics). Enough shares to give the GPU two waves of blocks.
// The statistics are single-pass Welford: each thread's batch of values (shifted by the
// channel's first element, so a large common offset cannot cancel) is merged into its running
// (count, mean, M2) with Chan et al.'s pairwise update, as are threads, blocks and shares.
#include <cstdint>

#include "activations.h"
#include "cuda/bn_act_launch.h"
#include "cuda/bn_act_common.cuh"
#include "cuda/kernel_common.cuh"

namespace mishkit::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWaves = 2;

// -- per-channel maps -------------------------------------------------------------------------

// y = act((x - mean) * scale + shift)
template <class Op, class A>
struct ForwardMap {
  static constexpr int kInputs = 1;
  const A* mean;
  const A* scale;
  const A* shift;
  act::Params<A> p;
  struct Channel {
    A mean, scale, shift;
  };
  __device__ Channel load(int64_t c) const { return {mean[c], scale[c], shift[c]}; }
  template <class T>
  __device__ T operator()(const Channel& ch, const T (&v)[1]) const {
    const A z = (to_compute(v[0]) - ch.mean) * ch.scale + ch.shift;
    return from_compute<T>(Op::template forward<act::ScalarMath<A>>(z, p));
  }
};

// grad_x = dz * scale + (x - mean) * coef_xmu + coef_const, dz = grad_out * act'(z)
template <class Op, class A>
struct BackwardElemtMap {
  static constexpr int kInputs = 2;  // x, grad_out
  const A* mean;
  const A* scale;
  const A* shift;
  const A* coef_xmu;
  const A* coef_const;
  act::Params<A> p;
  struct Channel {
    A mean, scale, shift, coef_xmu, coef_const;
  };
  __device__ Channel load(int64_t c) const {
    return {mean[c], scale[c], shift[c], coef_xmu[c], coef_const[c]};
  }
  template <class T>
  __device__ T operator()(const Channel& ch, const T (&v)[2]) const {
    const A xmu = to_compute(v[0]) - ch.mean;
    const A dz = to_compute(v[1]) *
                 Op::template derivative<act::ScalarMath<A>>(xmu * ch.scale + ch.shift, p);
    return from_compute<T>(dz * ch.scale + xmu * ch.coef_xmu + ch.coef_const);
  }
};

// NCHW: blockDim.x lanes along a plane's positions, blockDim.y planes; grid-stride over planes.
template <class F, class T, int N>
__global__ void __launch_bounds__(kThreads)
    nchw_map_kernel(Inputs<T, F::kInputs> in, T* out, int64_t planes, int64_t channels,
                    int64_t s, F f) {
  using P = Pack<T, N>;
  constexpr int K = F::kInputs;
  constexpr int kUnroll = packs_in_flight<T, N>();
  const int64_t plane_step = int64_t(gridDim.x) * blockDim.y;
  const int64_t c_step = plane_step % channels;
  int64_t plane = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  int64_t c = plane % channels;  // once per thread; then advanced by c_step
  const int64_t packs = s / N;   // N divides s
  for (; plane < planes; plane += plane_step) {
    const typename F::Channel ch = f.load(c);
    const P* in_packs[K];
#pragma unroll
    for (int k = 0; k < K; ++k) in_packs[k] = reinterpret_cast<const P*>(in.ptr[k] + plane * s);
    P* out_packs = reinterpret_cast<P*>(out + plane * s);
    for (int64_t base = threadIdx.x; base < packs; base += kUnroll * blockDim.x) {
      map_packs<kUnroll>(
          in_packs, out_packs,
          [&](int u) { return base + u * blockDim.x < packs ? base + u * blockDim.x : -1; },
          [&](int, const T (&values)[K]) { return f(ch, values); });
    }
    c += c_step;
    if (c >= channels) c -= channels;
  }
}

// channels-last: blockDim.x lanes along the channel packs (blockIdx.y: which blockDim.x of
// them), blockDim.y rows; grid-stride over rows. A thread's channels never change.
template <class F, class T, int N>
__global__ void __launch_bounds__(kThreads)
    channels_last_map_kernel(Inputs<T, F::kInputs> in, T* out, int64_t rows, int64_t channels,
                             F f) {
  using P = Pack<T, N>;
  constexpr int K = F::kInputs;
  constexpr int kUnroll = packs_in_flight<T, N>();
  const int64_t channel_packs = channels / N;  // N divides channels
  const int64_t cp = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (cp >= channel_packs) return;  // no barrier in this kernel
  typename F::Channel ch[N];
#pragma unroll
  for (int e = 0; e < N; ++e) ch[e] = f.load(cp * N + e);
  const int64_t row_step = int64_t(gridDim.x) * blockDim.y;
  const P* in_packs[K];
#pragma unroll
  for (int k = 0; k < K; ++k) in_packs[k] = reinterpret_cast<const P*>(in.ptr[k]) + cp;
  P* out_packs = reinterpret_cast<P*>(out) + cp;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; base < rows;
       base += kUnroll * row_step) {
    map_packs<kUnroll>(
        in_packs, out_packs,
        [&](int u) {
          const int64_t r = base + u * row_step;
          return r < rows ? r * channel_packs : int64_t{-1};
        },
        [&](int e, const T (&values)[K]) { return f(ch[e], values); });
  }
}

// -- reductions -------------------------------------------------------------------------------
// A reducer holds L channel lanes per thread (channels-last: the N channels of its pack; NCHW:
// its one channel) and accumulates batches v[B][L] of which the first `valid` are data.

template <class A, int L>
struct WelfordState {
  int64_t count;
  A mean[L];
  A m2[L];
};

// Statistics: Welford over x - shift, shift = the channel's first element.
template <class A, int L>
struct StatsReducer {
  using State = WelfordState<A, L>;
  static constexpr int kInputs = 1;
  static constexpr int kOutputs = 3;  // count, mean, M2 per share and channel
  A shift[L];

  __device__ void load_channels(const int64_t (&)[L], const bool (&)[L]) {}
  __device__ void begin(const A (&first)[L], State& st) {
    st.count = 0;
#pragma unroll
    for (int l = 0; l < L; ++l) {
      shift[l] = first[l];
      st.mean[l] = A(0);
      st.m2[l] = A(0);
    }
  }
  template <int B>
  __device__ void add(State& st, const A (&v)[B][L], const A (&)[B][L], int valid) const {
    if (valid <= 0) return;
    const A inv_valid = A(1) / A(valid);
    const A weight = A(valid) / A(st.count + valid);  // one division per batch, all lanes
#pragma unroll
    for (int l = 0; l < L; ++l) {
      A sum = 0;
#pragma unroll
      for (int b = 0; b < B; ++b) sum += b < valid ? v[b][l] - shift[l] : A(0);
      const A batch_mean = sum * inv_valid;
      A batch_m2 = 0;
#pragma unroll
      for (int b = 0; b < B; ++b) {
        const A d = v[b][l] - shift[l] - batch_mean;
        batch_m2 += b < valid ? d * d : A(0);
      }
      const A delta = batch_mean - st.mean[l];
      st.mean[l] += delta * weight;
      st.m2[l] += batch_m2 + delta * delta * A(st.count) * weight;
    }
    st.count += valid;
  }
  __device__ static void merge(State& a, const State& b) {
    if (b.count == 0) return;
    const A weight = A(b.count) / A(a.count + b.count);
#pragma unroll
    for (int l = 0; l < L; ++l) {
      const A delta = b.mean[l] - a.mean[l];
      a.mean[l] += delta * weight;
      a.m2[l] += b.m2[l] + delta * delta * A(a.count) * weight;
    }
    a.count += b.count;
  }
  // outputs[o][l] of the merged state: count, mean (shift restored), M2
  __device__ void outputs(const State& st, double (&out)[kOutputs][L]) const {
#pragma unroll
    for (int l = 0; l < L; ++l) {
      out[0][l] = static_cast<double>(st.count);
      out[1][l] = static_cast<double>(shift[l]) + static_cast<double>(st.mean[l]);
      out[2][l] = static_cast<double>(st.m2[l]);
    }
  }
};

template <class A, int L>
struct SumsState {
  int64_t count;  // unused; keeps the merge code one
  A dz[L];
  A dz_xmu[L];
};

// Backward sums: sum(dz) and sum(dz * (x - mean)).
template <class Op, class A, int L>
struct BackwardReducer {
  using State = SumsState<A, L>;
  static constexpr int kInputs = 2;  // x, grad_out
  static constexpr int kOutputs = 2;
  const A* mean_ptr;
  const A* scale_ptr;
  const A* shift_ptr;
  act::Params<A> p;
  A mean[L], scale[L], shift[L];

  __device__ void load_channels(const int64_t (&c)[L], const bool (&ok)[L]) {
#pragma unroll
    for (int l = 0; l < L; ++l) {
      mean[l] = ok[l] ? mean_ptr[c[l]] : A(0);
      scale[l] = ok[l] ? scale_ptr[c[l]] : A(0);
      shift[l] = ok[l] ? shift_ptr[c[l]] : A(0);
    }
  }
  __device__ void begin(const A (&)[L], State& st) {
    st.count = 0;
#pragma unroll
    for (int l = 0; l < L; ++l) st.dz[l] = st.dz_xmu[l] = A(0);
  }
  template <int B>
  __device__ void add(State& st, const A (&x)[B][L], const A (&g)[B][L], int valid) const {
#pragma unroll
    for (int l = 0; l < L; ++l) {
#pragma unroll
      for (int b = 0; b < B; ++b) {
        if (b < valid) {
          const A xmu = x[b][l] - mean[l];
          const A dz =
              g[b][l] * Op::template derivative<act::ScalarMath<A>>(xmu * scale[l] + shift[l], p);
          st.dz[l] += dz;
          st.dz_xmu[l] += dz * xmu;
        }
      }
    }
  }
  __device__ static void merge(State& a, const State& b) {
#pragma unroll
    for (int l = 0; l < L; ++l) {
      a.dz[l] += b.dz[l];
      a.dz_xmu[l] += b.dz_xmu[l];
    }
  }
  __device__ void outputs(const State& st, double (&out)[kOutputs][L]) const {
#pragma unroll
    for (int l = 0; l < L; ++l) {
      out[0][l] = static_cast<double>(st.dz[l]);
      out[1][l] = static_cast<double>(st.dz_xmu[l]);
    }
  }
};

// The block's threads merge their states in shared memory, within groups of `group` threads
// `step` apart (NCHW: the whole block, step 1; channels-last: a column of blockDim.y threads,
// step blockDim.x); true for the thread that then holds its group's total in `st`.
template <class R>
__device__ bool merge_block(typename R::State& st, int group, int step) {
  __shared__ typename R::State shared[kThreads];
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  const int rank = step == 1 ? t : int(threadIdx.y);
  shared[t] = st;
  __syncthreads();
  for (int half = group / 2; half > 0; half /= 2) {
    if (rank < half) R::merge(shared[t], shared[t + half * step]);
    __syncthreads();
  }
  st = shared[t];
  return rank == 0;
}

// Which rows of a channel one share of an NCHW reduction covers: batches
// [kn * n_chunk, ...) x positions [ks * s_chunk, ...) with kn = share / s_chunks, ks = share %
// s_chunks; s_chunk is a multiple of the pack.
struct NchwShares {
  int64_t n_chunk, s_chunk, s_chunks;
};

// grid (C, shares), block (lanes along positions, lanes along the batch).
template <class R, class T, int N>
__global__ void __launch_bounds__(kThreads)
    nchw_reduce_kernel(Inputs<T, R::kInputs> in, int64_t n, int64_t channels, int64_t s,
                       NchwShares sh, R reducer, double* partial) {
  using A = typename ComputeType<T>::type;
  using P = Pack<T, N>;
  constexpr int K = R::kInputs;
  constexpr int kUnroll = packs_in_flight<T, N>();
  constexpr int B = kUnroll * N;  // one batch: kUnroll packs of one plane
  const int64_t c = blockIdx.x;
  const int64_t share = blockIdx.y;
  const int64_t shares = gridDim.y;
  const int64_t kn = share / sh.s_chunks, ks = share % sh.s_chunks;
  const int64_t n_end = n < (kn + 1) * sh.n_chunk ? n : (kn + 1) * sh.n_chunk;
  const int64_t s_end = s < (ks + 1) * sh.s_chunk ? s : (ks + 1) * sh.s_chunk;
  const int64_t p_end = s_end / N;
  R r = reducer;
  const int64_t channel[1] = {c};
  const bool ok[1] = {true};
  r.load_channels(channel, ok);
  const A first[1] = {n * s > 0 ? to_compute(in.ptr[0][c * s]) : A(0)};
  typename R::State st;
  r.begin(first, st);
  for (int64_t b = kn * sh.n_chunk + threadIdx.y; b < n_end; b += blockDim.y) {
    const P* packs[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      packs[k] = reinterpret_cast<const P*>(in.ptr[k] + (b * channels + c) * s);
    }
    for (int64_t base = ks * sh.s_chunk / N + threadIdx.x; base < p_end;
         base += kUnroll * blockDim.x) {
      A v[K][B][1];
      int valid = 0;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * blockDim.x;
        if (i < p_end) {
          valid += N;
#pragma unroll
          for (int k = 0; k < K; ++k) {
            const P pk = packs[k][i];
#pragma unroll
            for (int e = 0; e < N; ++e) v[k][u * N + e][0] = to_compute(pk.v[e]);
          }
        }
      }
      r.add(st, v[0], v[K - 1], valid);
    }
  }
  if (!merge_block<R>(st, kThreads, 1)) return;
  double out[R::kOutputs][1];
  r.outputs(st, out);
#pragma unroll
  for (int o = 0; o < R::kOutputs; ++o) partial[(o * shares + share) * channels + c] = out[o][0];
}

// grid (channel-pack tiles, shares), block (lanes along channel packs, lanes along rows);
// share k covers rows [k * row_chunk, (k + 1) * row_chunk).
template <class R, class T, int N>
__global__ void __launch_bounds__(kThreads)
    channels_last_reduce_kernel(Inputs<T, R::kInputs> in, int64_t rows, int64_t channels,
                                int64_t row_chunk, R reducer, double* partial) {
  using A = typename ComputeType<T>::type;
  using P = Pack<T, N>;
  constexpr int K = R::kInputs;
  constexpr int B = packs_in_flight<T, N>() > 4 ? packs_in_flight<T, N>() : 4;  // rows a batch
  const int64_t channel_packs = channels / N;
  const int64_t cp = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t share = blockIdx.y;
  const int64_t shares = gridDim.y;
  const bool active = cp < channel_packs;  // inactive threads still take part in the merge
  int64_t channel[N];
  bool ok[N];
#pragma unroll
  for (int e = 0; e < N; ++e) {
    channel[e] = cp * N + e;
    ok[e] = active;
  }
  R r = reducer;
  r.load_channels(channel, ok);
  A first[N];
#pragma unroll
  for (int e = 0; e < N; ++e) first[e] = active && rows > 0 ? to_compute(in.ptr[0][cp * N + e])
                                                            : A(0);
  typename R::State st;
  r.begin(first, st);
  const int64_t r_end = rows < (share + 1) * row_chunk ? rows : (share + 1) * row_chunk;
  if (active) {
    for (int64_t base = share * row_chunk + threadIdx.y; base < r_end; base += B * blockDim.y) {
      A v[K][B][N];
      int valid = 0;
#pragma unroll
      for (int u = 0; u < B; ++u) {
        const int64_t row = base + u * blockDim.y;
        if (row < r_end) {
          ++valid;
#pragma unroll
          for (int k = 0; k < K; ++k) {
            const P pk = reinterpret_cast<const P*>(in.ptr[k])[row * channel_packs + cp];
#pragma unroll
            for (int e = 0; e < N; ++e) v[k][u][e] = to_compute(pk.v[e]);
          }
        }
      }
      r.add(st, v[0], v[K - 1], valid);
    }
  }
  if (!merge_block<R>(st, blockDim.y, blockDim.x) || !active) return;
  double out[R::kOutputs][N];
  r.outputs(st, out);
#pragma unroll
  for (int o = 0; o < R::kOutputs; ++o) {
#pragma unroll
    for (int e = 0; e < N; ++e) partial[(o * shares + share) * channels + cp * N + e] = out[o][e];
  }
}

// Per channel: merge the shares' (count, mean, M2) in order; an empty batch gives 0 / 0 = nan.
template <class A>
__global__ void stats_finalize_kernel(const double* partial, int64_t shares, int64_t channels,
                                      A* mean, A* var) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  double count = 0, m = 0, m2 = 0;
  for (int64_t k = 0; k < shares; ++k) {
    const double nb = partial[k * channels + c];
    if (nb == 0) continue;
    const double mb = partial[(shares + k) * channels + c];
    const double m2b = partial[(2 * shares + k) * channels + c];
    const double total = count + nb;
    const double weight = nb / total;
    const double delta = mb - m;
    m += delta * weight;
    m2 += m2b + delta * delta * count * weight;
    count = total;
  }
  mean[c] = static_cast<A>(count > 0 ? m : m / count);
  var[c] = static_cast<A>(m2 / count);
}

// Per channel: the shares' two sums, added in order.
template <class A>
__global__ void sums_finalize_kernel(const double* partial, int64_t shares, int64_t channels,
                                     A* first, A* second) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  double a = 0, b = 0;
  for (int64_t k = 0; k < shares; ++k) {
    a += partial[k * channels + c];
    b += partial[(shares + k) * channels + c];
  }
  first[c] = static_cast<A>(a);
  second[c] = static_cast<A>(b);
}

// -- plans: block shapes and grids from the geometry alone --------------------------------------

int itemsize_of(BnDType dtype) {
  switch (dtype) {
    case BnDType::kDouble: return 8;
    case BnDType::kHalf:
    case BnDType::kBFloat16: return 2;
    default: return 4;
  }
}

// The pack width the inner extent admits (16 bytes' worth of elements), else 1.
int pack_for(BnDType dtype, const BnGeometry& g) {
  const int pack = 16 / itemsize_of(dtype);
  return (g.channels_last ? g.c : g.s) % pack == 0 ? pack : 1;
}

// Accesses in flight per thread for a pack width (as packs_in_flight, from the itemsize).
int in_flight(BnDType dtype, int pack) {
  const int per = 32 / (pack * itemsize_of(dtype));
  return per > 1 ? per : 1;
}

struct Plan {
  dim3 grid, block;
  NchwShares nchw;    // NCHW reductions
  int64_t row_chunk;  // channels-last reductions
};

cudaError_t target_blocks(int64_t* blocks) {
  int sms = 0;
  if (cudaError_t err = multiprocessor_count(&sms)) return err;
  *blocks = int64_t(sms) * kResidentBlocksPerSm * kWaves;
  return cudaSuccess;
}

// A block's threads: `inner` along the inner axis (channel packs; NCHW: positions, in batches
// of `unroll` packs), `outer` along the outer axis; channels-last needs `tiles` blocks to span
// the channels.
struct Lanes {
  int inner, outer;
  int64_t tiles;
};

Lanes lanes_of(const BnGeometry& g, int pack, int unroll) {
  if (g.channels_last) {
    const int64_t channel_packs = g.c / pack;
    const int inner = pow2_clamp(channel_packs, 1, kThreads);
    return {inner, kThreads / inner, ceil_div(channel_packs, inner)};
  }
  const int inner = pow2_clamp(ceil_div(g.s / pack, unroll), 32, kThreads);
  return {inner, kThreads / inner, 1};
}

// `pack`: the width the launch uses (pack_for, or 1 where the pointers are not aligned).
cudaError_t elementwise_plan(BnDType dtype, const BnGeometry& g, int pack, Plan* plan) {
  int64_t target = 0;
  if (cudaError_t err = target_blocks(&target)) return err;
  const int unroll = in_flight(dtype, pack);
  const Lanes lanes = lanes_of(g, pack, unroll);
  plan->block = dim3(lanes.inner, lanes.outer);
  if (g.channels_last) {
    const int64_t wanted = ceil_div(g.n * g.s, int64_t(lanes.outer) * unroll);
    const int64_t cap = ceil_div(target, lanes.tiles);
    plan->grid = dim3(unsigned(wanted < cap ? wanted : cap), unsigned(lanes.tiles));
  } else {
    const int64_t wanted = ceil_div(g.n * g.c, lanes.outer);
    plan->grid = dim3(unsigned(wanted < target ? wanted : target));
  }
  return cudaSuccess;
}

cudaError_t reduce_plan(BnDType dtype, const BnGeometry& g, int pack, Plan* plan) {
  int64_t target = 0;
  if (cudaError_t err = target_blocks(&target)) return err;
  const int unroll = in_flight(dtype, pack);
  const Lanes lanes = lanes_of(g, pack, unroll);
  plan->block = dim3(lanes.inner, lanes.outer);
  if (g.channels_last) {
    const int batch = unroll > 4 ? unroll : 4;
    const int64_t most = ceil_div(g.n * g.s, int64_t(lanes.outer) * batch);
    int64_t shares = ceil_div(target, lanes.tiles);
    shares = shares < most ? shares : most;
    shares = shares > 1 ? shares : 1;
    plan->grid = dim3(unsigned(lanes.tiles), unsigned(shares));
    plan->row_chunk = ceil_div(g.n * g.s, shares);
  } else {
    const int64_t wanted = ceil_div(target, g.c);
    int64_t n_chunks = ceil_div(g.n, lanes.outer);
    n_chunks = n_chunks < wanted ? n_chunks : wanted;
    n_chunks = n_chunks > 1 ? n_chunks : 1;
    int64_t s_chunks = ceil_div(wanted, n_chunks);
    const int64_t s_most = ceil_div(g.s / pack, int64_t(lanes.inner) * unroll);
    s_chunks = s_chunks < s_most ? s_chunks : s_most;
    s_chunks = s_chunks > 1 ? s_chunks : 1;
    const int64_t n_chunk = ceil_div(g.n, n_chunks);
    const int64_t s_chunk = ceil_div(ceil_div(g.s, s_chunks), pack) * pack;
    n_chunks = g.n > 0 ? ceil_div(g.n, n_chunk) : 1;  // no empty shares
    s_chunks = g.s > 0 ? ceil_div(g.s, s_chunk) : 1;
    plan->grid = dim3(unsigned(g.c), unsigned(n_chunks * s_chunks));
    plan->nchw = {n_chunk > 0 ? n_chunk : 1, s_chunk > 0 ? s_chunk : pack, s_chunks};
  }
  return cudaSuccess;
}

// -- typed launches -----------------------------------------------------------------------------

template <class T, int K>
bool all_aligned(const Inputs<T, K>& in, const void* out) {
  bool ok = out == nullptr || aligned16(out);
  for (int k = 0; k < K; ++k) ok = ok && aligned16(in.ptr[k]);
  return ok;
}

template <class F, class T>
cudaError_t run_elementwise(BnDType dtype, const BnGeometry& g, Inputs<T, F::kInputs> in,
                            T* out, F f, cudaStream_t stream) {
  constexpr int kPack = 16 / sizeof(T);
  const bool vector = pack_for(dtype, g) == kPack && all_aligned(in, out);
  Plan plan{};
  if (cudaError_t err = elementwise_plan(dtype, g, vector ? kPack : 1, &plan)) return err;
  if (g.channels_last) {
    return vector ? launch(&channels_last_map_kernel<F, T, kPack>, plan.grid, plan.block, stream,
                           in, out, g.n * g.s, g.c, f)
                  : launch(&channels_last_map_kernel<F, T, 1>, plan.grid, plan.block, stream, in,
                           out, g.n * g.s, g.c, f);
  }
  return vector ? launch(&nchw_map_kernel<F, T, kPack>, plan.grid, plan.block, stream, in, out,
                         g.n * g.c, g.c, g.s, f)
                : launch(&nchw_map_kernel<F, T, 1>, plan.grid, plan.block, stream, in, out,
                         g.n * g.c, g.c, g.s, f);
}

// The partial results of every share into `partial` ([kOutputs][shares][C] doubles). `scalar`
// holds one channel per thread (NCHW, or channels-last element by element), `packed` a pack's.
template <class T, class R1, class RP>
cudaError_t run_reduce(BnDType dtype, const BnGeometry& g, Inputs<T, R1::kInputs> in,
                       const R1& scalar, const RP& packed, double* partial, int64_t* shares,
                       cudaStream_t stream) {
  constexpr int kPack = 16 / sizeof(T);
  const bool vector = pack_for(dtype, g) == kPack && all_aligned(in, nullptr);
  Plan plan{};
  if (cudaError_t err = reduce_plan(dtype, g, vector ? kPack : 1, &plan)) return err;
  *shares = plan.grid.y;
  if (g.channels_last) {
    const int64_t rows = g.n * g.s;
    if (vector) {
      return launch(&channels_last_reduce_kernel<RP, T, kPack>, plan.grid, plan.block, stream,
                    in, rows, g.c, plan.row_chunk, packed, partial);
    }
    return launch(&channels_last_reduce_kernel<R1, T, 1>, plan.grid, plan.block, stream, in,
                  rows, g.c, plan.row_chunk, scalar, partial);
  }
  if (vector) {
    return launch(&nchw_reduce_kernel<R1, T, kPack>, plan.grid, plan.block, stream, in, g.n,
                  g.c, g.s, plan.nchw, scalar, partial);
  }
  return launch(&nchw_reduce_kernel<R1, T, 1>, plan.grid, plan.block, stream, in, g.n, g.c, g.s,
                plan.nchw, scalar, partial);
}

unsigned finalize_blocks(int64_t channels) {
  return static_cast<unsigned>(ceil_div(channels, kThreads));
}

}  // namespace

cudaError_t bn_act_workspace_bytes(BnDType dtype, BnGeometry g, int64_t* bytes) {
  int64_t shares = 1;
  for (int pack : {pack_for(dtype, g), 1}) {  // whichever the pointers' alignment picks
    Plan plan{};
    if (cudaError_t err = reduce_plan(dtype, g, pack, &plan)) return err;
    shares = plan.grid.y > shares ? plan.grid.y : shares;
  }
  *bytes = int64_t(3) * shares * g.c * int64_t(sizeof(double));
  return cudaSuccess;
}

cudaError_t launch_bn_act_stats(const void* x, BnDType dtype, BnGeometry g, void* mean, void* var,
                                void* workspace, cudaStream_t stream) {
  if (g.c == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename ComputeType<T>::type;
    auto* partial = static_cast<double*>(workspace);
    int64_t shares = 0;
    const Inputs<T, 1> in{{static_cast<const T*>(x)}};
    cudaError_t err = run_reduce<T>(dtype, g, in, StatsReducer<A, 1>{},
                                    StatsReducer<A, 16 / sizeof(T)>{}, partial, &shares, stream);
    if (err != cudaSuccess) return err;
    return launch(&stats_finalize_kernel<A>, dim3(finalize_blocks(g.c)), dim3(kThreads), stream,
                  static_cast<const double*>(partial), shares, g.c, static_cast<A*>(mean),
                  static_cast<A*>(var));
  });
}

cudaError_t launch_bn_act_forward(const void* x, BnDType dtype, BnGeometry g, const void* mean,
                                  const void* scale, const void* shift, void* y, int act_id,
                                  const double* params, cudaStream_t stream) {
  if (g.n * g.c * g.s == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename ComputeType<T>::type;
    return act::visit_activation(static_cast<act::ActId>(act_id), [&](auto op) {
      const ForwardMap<decltype(op), A> f{static_cast<const A*>(mean),
                                          static_cast<const A*>(scale),
                                          static_cast<const A*>(shift), params_of<A>(params)};
      return run_elementwise(dtype, g, Inputs<T, 1>{{static_cast<const T*>(x)}},
                             static_cast<T*>(y), f, stream);
    });
  });
}

cudaError_t launch_bn_act_backward_reduce(const void* grad_out, const void* x, BnDType dtype,
                                          BnGeometry g, const void* mean, const void* scale,
                                          const void* shift, void* sum_dz, void* sum_dz_xmu,
                                          void* workspace, int act_id, const double* params,
                                          cudaStream_t stream) {
  if (g.c == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename ComputeType<T>::type;
    return act::visit_activation(static_cast<act::ActId>(act_id), [&](auto op) {
      using Op = decltype(op);
      auto* partial = static_cast<double*>(workspace);
      int64_t shares = 0;
      const Inputs<T, 2> in{{static_cast<const T*>(x), static_cast<const T*>(grad_out)}};
      const auto* m = static_cast<const A*>(mean);
      const auto* sc = static_cast<const A*>(scale);
      const auto* sh = static_cast<const A*>(shift);
      cudaError_t err = run_reduce<T>(
          dtype, g, in, BackwardReducer<Op, A, 1>{m, sc, sh, params_of<A>(params)},
          BackwardReducer<Op, A, 16 / sizeof(T)>{m, sc, sh, params_of<A>(params)}, partial,
          &shares, stream);
      if (err != cudaSuccess) return err;
      return launch(&sums_finalize_kernel<A>, dim3(finalize_blocks(g.c)), dim3(kThreads), stream,
                    static_cast<const double*>(partial), shares, g.c, static_cast<A*>(sum_dz),
                    static_cast<A*>(sum_dz_xmu));
    });
  });
}

cudaError_t launch_bn_act_backward_elemt(const void* grad_out, const void* x, BnDType dtype,
                                         BnGeometry g, const void* mean, const void* scale,
                                         const void* shift, const void* coef_xmu,
                                         const void* coef_const, void* grad_x, int act_id,
                                         const double* params, cudaStream_t stream) {
  if (g.n * g.c * g.s == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename ComputeType<T>::type;
    return act::visit_activation(static_cast<act::ActId>(act_id), [&](auto op) {
      const BackwardElemtMap<decltype(op), A> f{
          static_cast<const A*>(mean),     static_cast<const A*>(scale),
          static_cast<const A*>(shift),    static_cast<const A*>(coef_xmu),
          static_cast<const A*>(coef_const), params_of<A>(params)};
      const Inputs<T, 2> in{{static_cast<const T*>(x), static_cast<const T*>(grad_out)}};
      return run_elementwise(dtype, g, in, static_cast<T*>(grad_x), f, stream);
    });
  });
}

}  // namespace mishkit::cuda
