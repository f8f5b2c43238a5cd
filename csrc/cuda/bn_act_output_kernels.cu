// Output-saving BatchNorm + activation CUDA kernels. CUDA headers only (see
// bn_act_output_launch.h).
//
// forward: one thread per 8 consecutive elements (one byte of the mask), grid-stride; a warp
// covers 256 consecutive elements per step.
// backward: z is recovered per element from y and its bit (inverse.h, reading the table from
// global memory, where every thread of a block shares the same few cache lines), then a
// per-channel reduction sums, and the input gradient runs elementwise.
//
// The reduction: each block covers a tile of channels and a share of the N*S rows; threads run
// along the contiguous dimension (rows for NCHW, channels for channels_last), accumulate in the
// compute type, reduce in shared memory and add the block's partial sums into a double
// workspace with atomicAdd (so the order of the adds, and the last bits, are not deterministic).
// Unlike bn_act_kernels.cu it reads elements one at a time: each needs its bit of the mask.
#include <algorithm>
#include <cstdint>

#include "activations.h"
#include "cuda/bn_act_output_launch.h"
#include "cuda/bn_act_common.cuh"
#include "cuda/kernel_common.cuh"
#include "inverse.h"

namespace mishkit::cuda {
namespace {

constexpr int kThreads = 256;  // elementwise blocks
constexpr int kTileX = 32;  // reduction block: kTileX x kTileY threads
constexpr int kTileY = 8;

struct Layout {
  int64_t c, s, rows, numel, stride_n, stride_c, stride_s;
};

inline Layout layout_of(const BnGeometry& g) {
  const int64_t cs = g.c * g.s;
  return g.channels_last ? Layout{g.c, g.s, g.n * g.s, g.n * cs, cs, 1, g.c}
                         : Layout{g.c, g.s, g.n * g.s, g.n * cs, cs, g.s, 1};
}

inline unsigned elementwise_blocks(int64_t work) {
  return static_cast<unsigned>(std::max<int64_t>(
      1, std::min<int64_t>((work + kThreads - 1) / kThreads, 65535 * 8)));
}

// A contribution to the two per-channel sums: `prepare()` once per thread (constants it may
// load), then `(state, i, c, a, b)` adds element i (of channel c) to a and b.
struct NoState {};

// blockIdx.y: channel tile; blockIdx.x: share of the rows. NCHW: threadIdx.x walks rows and each
// block row (threadIdx.y) is a channel; channels_last: threadIdx.x walks channels.
template <bool kChannelsLast, class A, class Contrib>
__global__ void reduce_kernel(Layout l, Contrib contrib, double* __restrict__ out_a,
                              double* __restrict__ out_b) {
  __shared__ A shared_a[kTileY][kTileX + 1];
  __shared__ A shared_b[kTileY][kTileX + 1];
  const int lane_c = kChannelsLast ? threadIdx.x : threadIdx.y;
  const int lane_r = kChannelsLast ? threadIdx.y : threadIdx.x;
  const int row_lanes = kChannelsLast ? kTileY : kTileX;
  const int channel_tile = kChannelsLast ? kTileX : kTileY;
  const int64_t c = int64_t(blockIdx.y) * channel_tile + lane_c;
  const auto state = contrib.prepare();
  A a = 0, b = 0;
  if (c < l.c) {
    for (int64_t r = int64_t(blockIdx.x) * row_lanes + lane_r; r < l.rows;
         r += int64_t(gridDim.x) * row_lanes) {
      const int64_t i = (r / l.s) * l.stride_n + (r % l.s) * l.stride_s + c * l.stride_c;
      contrib(state, i, c, a, b);
    }
  }
  shared_a[threadIdx.y][threadIdx.x] = a;
  shared_b[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (lane_r != 0 || c >= l.c) return;
  A total_a = 0, total_b = 0;
  for (int k = 0; k < row_lanes; ++k) {
    total_a += kChannelsLast ? shared_a[k][threadIdx.x] : shared_a[threadIdx.y][k];
    total_b += kChannelsLast ? shared_b[k][threadIdx.x] : shared_b[threadIdx.y][k];
  }
  atomicAdd(out_a + c, static_cast<double>(total_a));
  if (out_b) atomicAdd(out_b + c, static_cast<double>(total_b));
}

template <class A, class Contrib>
cudaError_t launch_reduce(const Layout& l, bool channels_last, Contrib contrib, double* out_a,
                   double* out_b, cudaStream_t stream) {
  const int channel_tile = channels_last ? kTileX : kTileY;
  const int row_lanes = channels_last ? kTileY : kTileX;
  const int64_t channel_tiles = (l.c + channel_tile - 1) / channel_tile;
  // enough row shares to fill the GPU (~4 waves of 132 SMs), none of them empty
  const int64_t wanted = std::max<int64_t>(1, 512 / std::max<int64_t>(channel_tiles, 1));
  const int64_t row_shares = std::min<int64_t>(wanted, (l.rows + row_lanes - 1) / row_lanes);
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(row_shares, 1)),
                  static_cast<unsigned>(channel_tiles));
  const dim3 block(kTileX, kTileY);
  return channels_last
             ? launch(&reduce_kernel<true, A, Contrib>, grid, block, stream, l, contrib, out_a,
                      out_b)
             : launch(&reduce_kernel<false, A, Contrib>, grid, block, stream, l, contrib, out_a,
                      out_b);
}

template <class A>
__global__ void divide_kernel(const double* __restrict__ sums, int64_t c, double divisor,
                              A* __restrict__ out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < c) out[i] = static_cast<A>(sums[i] / divisor);  // 0 / 0 = nan for an empty batch
}

template <class A>
cudaError_t launch_divide(const double* sums, int64_t c, double divisor, void* out,
                          cudaStream_t stream) {
  return launch(&divide_kernel<A>, dim3(elementwise_blocks(c)), dim3(kThreads), stream, sums, c,
                divisor, static_cast<A*>(out));
}

__device__ __forceinline__ bool mask_bit(const uint8_t* mask, int64_t i) {
  return (mask[i >> 3] >> (i & 7)) & 1;
}

// -- forward ------------------------------------------------------------------------------

template <class Op, class T, class A>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ r,
                               const A* __restrict__ mean, const A* __restrict__ scale,
                               const A* __restrict__ shift, A branch, T* __restrict__ y,
                               uint8_t* __restrict__ mask, Layout l, act::Params<A> p) {
  const int64_t bytes = (l.numel + 7) / 8;
  for (int64_t byte = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; byte < bytes;
       byte += int64_t(gridDim.x) * blockDim.x) {
    unsigned bits = 0;
    for (int k = 0; k < 8; ++k) {
      const int64_t i = byte * 8 + k;
      if (i >= l.numel) break;
      const int64_t c = (i / l.stride_c) % l.c;
      A z = (to_compute(x[i]) - mean[c]) * scale[c] + shift[c];
      if (r) z += to_compute(r[i]);
      y[i] = from_compute<T>(Op::template forward<act::ScalarMath<A>>(z, p));
      bits |= unsigned(z < branch) << k;
    }
    mask[byte] = static_cast<uint8_t>(bits);
  }
}

// -- backward -----------------------------------------------------------------------------

// dz and x - mean of element i; also the reduction's contribution (reduce_kernel), with the
// inverse's constants loaded once per thread.
template <class Op, class T, class A>
struct Recovery {
  const T* g;
  const T* y;
  const T* r;
  const uint8_t* mask;
  const A* z_in;  // the reduce pass's z (a direct op call may pass it), else null: recover
  const A* inv_scale;
  const A* shift;
  const A* table;
  A floor, log_floor;
  act::Params<A> p;

  __device__ __forceinline__ inv::Context<A, A> prepare() const {
    return inv::make_context<A, A>(p, table, floor, log_floor);
  }

  __device__ __forceinline__ void recover(const inv::Context<A, A>& ctx, int64_t i, int64_t c,
                                          A& dz, A& xmu) const {
    using M = act::ScalarMath<A>;
    const A z = z_in ? z_in[i]
                     : inv::Inverse<Op>::template invert<M>(to_compute(y[i]), mask_bit(mask, i),
                                                            ctx);
    A u = z - shift[c];
    if (r) u -= to_compute(r[i]);
    xmu = u * inv_scale[c];
    dz = to_compute(g[i]) * Op::template derivative<M>(z, p);
  }

  __device__ __forceinline__ void operator()(const inv::Context<A, A>& ctx, int64_t i, int64_t c,
                                             A& a, A& b) const {  // a = dz, b = dz * xmu
    A dz, xmu;
    recover(ctx, i, c, dz, xmu);
    a += dz;
    b += dz * xmu;
  }
};

template <class Op, class T, class A>
__global__ void elemt_kernel(Recovery<Op, T, A> rec, const A* __restrict__ scale,
                             const A* __restrict__ coef_xmu, const A* __restrict__ coef_const,
                             T* __restrict__ grad_x, T* __restrict__ grad_r, Layout l) {
  const inv::Context<A, A> ctx = rec.prepare();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < l.numel;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = (i / l.stride_c) % l.c;
    A dz, xmu;
    rec.recover(ctx, i, c, dz, xmu);
    grad_x[i] = from_compute<T>(dz * scale[c] + xmu * coef_xmu[c] + coef_const[c]);
    if (grad_r) grad_r[i] = from_compute<T>(dz);
  }
}

// Returns f(Op{}) for the invertible activations (the glue rejects the others first).
template <class F>
cudaError_t visit_invertible(int act_id, F&& f) {
  return act::visit_activation(static_cast<act::ActId>(act_id), [&](auto op) {
    if constexpr (inv::Inverse<decltype(op)>::kInvertible) {
      return f(op);
    } else {
      return cudaErrorInvalidValue;
    }
  });
}

template <class Op, class T, class A>
Recovery<Op, T, A> recovery(const void* grad_out, const void* y, const uint8_t* mask,
                            const void* z, const void* residual, const void* inv_scale,
                            const void* shift, const InverseArgs& inverse, const double* params) {
  return {static_cast<const T*>(grad_out), static_cast<const T*>(y),
          static_cast<const T*>(residual), mask, static_cast<const A*>(z),
          static_cast<const A*>(inv_scale),
          static_cast<const A*>(shift), static_cast<const A*>(inverse.table),
          static_cast<A>(inverse.floor), static_cast<A>(inverse.log_floor), params_of<A>(params)};
}

}  // namespace

cudaError_t launch_bn_act_output_forward(const void* x, const void* residual, BnDType dtype,
                                         BnGeometry g, const void* mean, const void* scale,
                                         const void* shift, double branch, void* y,
                                         uint8_t* mask, int act_id, const double* params,
                                         cudaStream_t stream) {
  const Layout l = layout_of(g);
  if (l.numel == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename ComputeType<T>::type;
    return visit_invertible(act_id, [&](auto op) {
      return launch(&forward_kernel<decltype(op), T, A>,
                    dim3(elementwise_blocks((l.numel + 7) / 8)), dim3(kThreads), stream,
                    static_cast<const T*>(x), static_cast<const T*>(residual),
                    static_cast<const A*>(mean), static_cast<const A*>(scale),
                    static_cast<const A*>(shift), static_cast<A>(branch), static_cast<T*>(y),
                    mask, l, params_of<A>(params));
    });
  });
}

cudaError_t launch_bn_act_output_backward_reduce(const void* grad_out, const void* y,
                                                 const uint8_t* mask, const void* residual,
                                                 BnDType dtype, BnGeometry g,
                                                 const void* inv_scale, const void* shift,
                                                 InverseArgs inverse, void* sum_dz,
                                                 void* sum_dz_xmu, double* workspace, int act_id,
                                                 const double* params, cudaStream_t stream) {
  const Layout l = layout_of(g);
  if (l.c == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename ComputeType<T>::type;
    cudaError_t err = visit_invertible(act_id, [&](auto op) {
      using Op = decltype(op);
      return launch_reduce<A>(l, g.channels_last,
                              recovery<Op, T, A>(grad_out, y, mask, nullptr, residual,
                                                 inv_scale, shift, inverse, params),
                              workspace, workspace + l.c, stream);
    });
    if (err == cudaSuccess) err = launch_divide<A>(workspace, l.c, 1.0, sum_dz, stream);
    if (err == cudaSuccess) err = launch_divide<A>(workspace + l.c, l.c, 1.0, sum_dz_xmu, stream);
    return err;
  });
}

cudaError_t launch_bn_act_output_backward_elemt(
    const void* grad_out, const void* y, const uint8_t* mask, const void* z,
    const void* residual, BnDType dtype, BnGeometry g, const void* scale, const void* inv_scale,
    const void* shift, const void* coef_xmu, const void* coef_const, InverseArgs inverse,
    void* grad_x, void* grad_residual, int act_id, const double* params, cudaStream_t stream) {
  const Layout l = layout_of(g);
  if (l.numel == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename ComputeType<T>::type;
    return visit_invertible(act_id, [&](auto op) {
      using Op = decltype(op);
      return launch(&elemt_kernel<Op, T, A>, dim3(elementwise_blocks(l.numel)), dim3(kThreads),
                    stream,
                    recovery<Op, T, A>(grad_out, y, mask, z, residual, inv_scale, shift, inverse,
                                       params),
                    static_cast<const A*>(scale), static_cast<const A*>(coef_xmu),
                    static_cast<const A*>(coef_const), static_cast<T*>(grad_x),
                    static_cast<T*>(grad_residual), l);
    });
  });
}

}  // namespace mishkit::cuda
