// Fused BatchNorm + activation CUDA kernels. CUDA headers only (see bn_act_launch.h).
//
// Elementwise passes (forward, input gradient): grid-stride loops over the flat dense storage;
// the channel of flat index i is (i / stride_c) % C (stride_c = S for NCHW, 1 for channels_last).
// Reductions (statistics, backward sums): each block covers a tile of channels and a share of
// the N*S rows; threads run along the contiguous dimension (rows for NCHW, channels for
// channels_last), accumulate in the compute type, reduce in shared memory and add the block's
// partial sum into a double workspace with atomicAdd (order of the adds is not deterministic).
// The variance is two-pass: sums first, then squared deviations from the finished mean.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "activations.h"
#include "cuda/bn_act_launch.h"

namespace mishkit::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTileX = 32;  // reduction block: kTileX x kTileY threads
constexpr int kTileY = 8;

template <class T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <class T, class A> __device__ __forceinline__ T from_acc(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float v) {
  return __float2half(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16(v);
}

struct Layout {
  int64_t c, s, rows, numel, stride_n, stride_c, stride_s;
};

Layout layout_of(const BnGeometry& g) {
  const int64_t cs = g.c * g.s;
  return g.channels_last ? Layout{g.c, g.s, g.n * g.s, g.n * cs, cs, 1, g.c}
                         : Layout{g.c, g.s, g.n * g.s, g.n * cs, cs, g.s, 1};
}

// -- elementwise ---------------------------------------------------------------------------------

template <class Op, class T, class A>
__global__ void forward_kernel(const T* __restrict__ x, const A* __restrict__ mean,
                               const A* __restrict__ scale, const A* __restrict__ shift,
                               T* __restrict__ y, Layout l, act::Params<A> p) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < l.numel;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = (i / l.stride_c) % l.c;
    const A z = (to_acc(x[i]) - mean[c]) * scale[c] + shift[c];
    y[i] = from_acc<T>(Op::template forward<act::ScalarMath<A>>(z, p));
  }
}

template <class Op, class T, class A>
__global__ void backward_elemt_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                      const A* __restrict__ mean, const A* __restrict__ scale,
                                      const A* __restrict__ shift, const A* __restrict__ coef_xmu,
                                      const A* __restrict__ coef_const, T* __restrict__ grad_x,
                                      Layout l, act::Params<A> p) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < l.numel;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = (i / l.stride_c) % l.c;
    const A xmu = to_acc(x[i]) - mean[c];
    const A dz = to_acc(g[i]) *
                 Op::template derivative<act::ScalarMath<A>>(xmu * scale[c] + shift[c], p);
    grad_x[i] = from_acc<T>(dz * scale[c] + xmu * coef_xmu[c] + coef_const[c]);
  }
}

// -- reductions ----------------------------------------------------------------------------------

// Contributions (a, b) of one element to the two per-channel sums.
template <class A>
struct SumContrib {  // a = x
  __device__ void operator()(A x, A, int64_t, A& a, A&) const { a += x; }
};

template <class A>
struct SquaresContrib {  // a = (x - mean)^2
  const A* mean;
  __device__ void operator()(A x, A, int64_t c, A& a, A&) const {
    const A d = x - mean[c];
    a += d * d;
  }
};

template <class Op, class A>
struct BackwardContrib {  // a = dz, b = dz * (x - mean)
  const A* mean;
  const A* scale;
  const A* shift;
  act::Params<A> p;
  __device__ void operator()(A x, A g, int64_t c, A& a, A& b) const {
    const A xmu = x - mean[c];
    const A dz = g * Op::template derivative<act::ScalarMath<A>>(xmu * scale[c] + shift[c], p);
    a += dz;
    b += dz * xmu;
  }
};

// blockIdx.y: channel tile; blockIdx.x: share of the rows. NCHW: threadIdx.x walks rows and each
// block row (threadIdx.y) is a channel; channels_last: threadIdx.x walks channels.
template <bool kChannelsLast, class T, class A, class Contrib>
__global__ void reduce_kernel(const T* __restrict__ x, const T* __restrict__ g, Layout l,
                              Contrib contrib, double* __restrict__ out_a,
                              double* __restrict__ out_b) {
  __shared__ A shared_a[kTileY][kTileX + 1];
  __shared__ A shared_b[kTileY][kTileX + 1];
  const int lane_c = kChannelsLast ? threadIdx.x : threadIdx.y;
  const int lane_r = kChannelsLast ? threadIdx.y : threadIdx.x;
  const int row_lanes = kChannelsLast ? kTileY : kTileX;
  const int channel_tile = kChannelsLast ? kTileX : kTileY;
  const int64_t c = int64_t(blockIdx.y) * channel_tile + lane_c;
  A a = 0, b = 0;
  if (c < l.c) {
    for (int64_t r = int64_t(blockIdx.x) * row_lanes + lane_r; r < l.rows;
         r += int64_t(gridDim.x) * row_lanes) {
      const int64_t i = (r / l.s) * l.stride_n + (r % l.s) * l.stride_s + c * l.stride_c;
      contrib(to_acc(x[i]), g ? to_acc(g[i]) : A(0), c, a, b);
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

template <class T, class A, class Contrib>
void launch_reduce(const T* x, const T* g, const Layout& l, bool channels_last, Contrib contrib,
                   double* out_a, double* out_b, cudaStream_t stream) {
  const int channel_tile = channels_last ? kTileX : kTileY;
  const int row_lanes = channels_last ? kTileY : kTileX;
  const int64_t channel_tiles = (l.c + channel_tile - 1) / channel_tile;
  // enough row shares to fill the GPU (~4 waves of 132 SMs), none of them empty
  const int64_t wanted = std::max<int64_t>(1, 512 / std::max<int64_t>(channel_tiles, 1));
  const int64_t row_shares = std::min<int64_t>(wanted, (l.rows + row_lanes - 1) / row_lanes);
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(row_shares, 1)),
                  static_cast<unsigned>(channel_tiles));
  const dim3 block(kTileX, kTileY);
  if (channels_last) {
    reduce_kernel<true, T, A><<<grid, block, 0, stream>>>(x, g, l, contrib, out_a, out_b);
  } else {
    reduce_kernel<false, T, A><<<grid, block, 0, stream>>>(x, g, l, contrib, out_a, out_b);
  }
}

template <class A>
__global__ void divide_kernel(const double* __restrict__ sums, int64_t c, double divisor,
                              A* __restrict__ out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < c) out[i] = static_cast<A>(sums[i] / divisor);  // 0 / 0 = nan for an empty batch
}

template <class A>
void launch_divide(const double* sums, int64_t c, double divisor, void* out, cudaStream_t stream) {
  divide_kernel<A><<<static_cast<unsigned>((c + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      sums, c, divisor, static_cast<A*>(out));
}

int elementwise_blocks(int64_t numel) {
  return static_cast<int>(std::min<int64_t>((numel + kThreads - 1) / kThreads, 65535 * 8));
}

template <class A>
act::Params<A> params_of(const double* params) {
  return {static_cast<A>(params[0]), static_cast<A>(params[1])};
}

// Calls f(T{}) with the storage type of `dtype`.
template <class F>
void dispatch_dtype(BnDType dtype, F&& f) {
  switch (dtype) {
    case BnDType::kFloat: return f(float{});
    case BnDType::kDouble: return f(double{});
    case BnDType::kHalf: return f(__half{});
    case BnDType::kBFloat16: return f(__nv_bfloat16{});
  }
}

}  // namespace

cudaError_t launch_bn_act_stats(const void* x, BnDType dtype, BnGeometry g, void* mean, void* var,
                         double* workspace, cudaStream_t stream) {
  const Layout l = layout_of(g);
  if (l.c == 0) return cudaSuccess;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename AccOf<T>::type;
    const T* xp = static_cast<const T*>(x);
    const double count = static_cast<double>(l.rows);
    launch_reduce<T, A>(xp, nullptr, l, g.channels_last, SumContrib<A>{}, workspace, nullptr,
                        stream);
    launch_divide<A>(workspace, l.c, count, mean, stream);
    launch_reduce<T, A>(xp, nullptr, l, g.channels_last,
                        SquaresContrib<A>{static_cast<const A*>(mean)}, workspace + l.c, nullptr,
                        stream);
    launch_divide<A>(workspace + l.c, l.c, count, var, stream);
  });
  return cudaGetLastError();
}

cudaError_t launch_bn_act_forward(const void* x, BnDType dtype, BnGeometry g, const void* mean,
                           const void* scale, const void* shift, void* y, int act_id,
                           const double* params, cudaStream_t stream) {
  const Layout l = layout_of(g);
  if (l.numel == 0) return cudaSuccess;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename AccOf<T>::type;
    act::visit_activation(static_cast<act::ActId>(act_id), [&](auto op) {
      forward_kernel<decltype(op), T, A><<<elementwise_blocks(l.numel), kThreads, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const A*>(mean), static_cast<const A*>(scale),
          static_cast<const A*>(shift), static_cast<T*>(y), l, params_of<A>(params));
    });
  });
  return cudaGetLastError();
}

cudaError_t launch_bn_act_backward_reduce(const void* grad_out, const void* x, BnDType dtype,
                                   BnGeometry g, const void* mean, const void* scale,
                                   const void* shift, void* sum_dz, void* sum_dz_xmu,
                                   double* workspace, int act_id, const double* params,
                                   cudaStream_t stream) {
  const Layout l = layout_of(g);
  if (l.c == 0) return cudaSuccess;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename AccOf<T>::type;
    act::visit_activation(static_cast<act::ActId>(act_id), [&](auto op) {
      const BackwardContrib<decltype(op), A> contrib{
          static_cast<const A*>(mean), static_cast<const A*>(scale),
          static_cast<const A*>(shift), params_of<A>(params)};
      launch_reduce<T, A>(static_cast<const T*>(x), static_cast<const T*>(grad_out), l,
                          g.channels_last, contrib, workspace, workspace + l.c, stream);
    });
    launch_divide<A>(workspace, l.c, 1.0, sum_dz, stream);
    launch_divide<A>(workspace + l.c, l.c, 1.0, sum_dz_xmu, stream);
  });
  return cudaGetLastError();
}

cudaError_t launch_bn_act_backward_elemt(const void* grad_out, const void* x, BnDType dtype,
                                  BnGeometry g, const void* mean, const void* scale,
                                  const void* shift, const void* coef_xmu,
                                  const void* coef_const, void* grad_x, int act_id,
                                  const double* params, cudaStream_t stream) {
  const Layout l = layout_of(g);
  if (l.numel == 0) return cudaSuccess;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename AccOf<T>::type;
    act::visit_activation(static_cast<act::ActId>(act_id), [&](auto op) {
      backward_elemt_kernel<decltype(op), T, A>
          <<<elementwise_blocks(l.numel), kThreads, 0, stream>>>(
              static_cast<const T*>(grad_out), static_cast<const T*>(x),
              static_cast<const A*>(mean), static_cast<const A*>(scale),
              static_cast<const A*>(shift), static_cast<const A*>(coef_xmu),
              static_cast<const A*>(coef_const), static_cast<T*>(grad_x), l,
              params_of<A>(params));
    });
  });
  return cudaGetLastError();
}

}  // namespace mishkit::cuda
