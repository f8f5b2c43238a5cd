// Output-saving BatchNorm + activation CUDA kernels. CUDA headers only (see
// bn_act_output_launch.h).
//
// forward: one thread per element in warp-aligned grid-stride steps; each warp's 32 branch bits
// come from one __ballot_sync and lanes 0, 8, 16, 24 store its four bytes of the mask.
// backward: z is recovered per element from y and its bit (inverse.h, reading the table from
// global memory, where every thread of a block shares the same few cache lines), then the
// reduction runs as bn_act_kernels.cu's does (channel tiles x row shares, shared-memory sums,
// double atomics) and the input gradient elementwise.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "activations.h"
#include "cuda/bn_act_output_launch.h"
#include "inverse.h"

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

template <class A>
act::Params<A> params_of(const double* params) {
  return {static_cast<A>(params[0]), static_cast<A>(params[1])};
}

__device__ __forceinline__ bool mask_bit(const uint8_t* mask, int64_t i) {
  return (mask[i >> 3] >> (i & 7)) & 1;
}

// -- forward ---------------------------------------------------------------------------------------

template <class Op, class T, class A>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ r,
                               const A* __restrict__ mean, const A* __restrict__ scale,
                               const A* __restrict__ shift, A branch, T* __restrict__ y,
                               uint8_t* __restrict__ mask, Layout l, act::Params<A> p) {
  const int lane = threadIdx.x & 31;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;  // a multiple of 32
  for (int64_t base = blockIdx.x * int64_t(blockDim.x) + (threadIdx.x & ~31); base < l.numel;
       base += step) {
    const int64_t i = base + lane;
    bool left = false;
    if (i < l.numel) {
      const int64_t c = (i / l.stride_c) % l.c;
      A z = (to_acc(x[i]) - mean[c]) * scale[c] + shift[c];
      if (r) z += to_acc(r[i]);
      y[i] = from_acc<T>(Op::template forward<act::ScalarMath<A>>(z, p));
      left = z < branch;
    }
    const unsigned bits = __ballot_sync(0xffffffffu, left);
    if ((lane & 7) == 0 && i < l.numel) mask[i >> 3] = static_cast<uint8_t>(bits >> lane);
  }
}

// -- backward --------------------------------------------------------------------------------------

// dz and x - mean of element i.
template <class Op, class T, class A>
struct Recovery {
  const T* g;
  const T* y;
  const T* r;
  const uint8_t* mask;
  const A* inv_scale;
  const A* shift;
  const A* table;
  A floor, log_floor;
  act::Params<A> p;

  __device__ __forceinline__ void operator()(const inv::Context<A, A>& ctx, int64_t i, int64_t c,
                                             A& dz, A& xmu) const {
    using M = act::ScalarMath<A>;
    const A z = inv::Inverse<Op>::template invert<M>(to_acc(y[i]), mask_bit(mask, i), ctx);
    A u = z - shift[c];
    if (r) u -= to_acc(r[i]);
    xmu = u * inv_scale[c];
    dz = to_acc(g[i]) * Op::template derivative<M>(z, p);
  }

  __device__ __forceinline__ inv::Context<A, A> context() const {
    return inv::make_context<A, A>(p, table, floor, log_floor);
  }
};

// blockIdx.y: channel tile; blockIdx.x: share of the rows (as bn_act_kernels.cu's reduce_kernel).
template <bool kChannelsLast, class Op, class T, class A>
__global__ void reduce_kernel(Recovery<Op, T, A> rec, Layout l, double* __restrict__ out_a,
                              double* __restrict__ out_b) {
  __shared__ A shared_a[kTileY][kTileX + 1];
  __shared__ A shared_b[kTileY][kTileX + 1];
  const int lane_c = kChannelsLast ? threadIdx.x : threadIdx.y;
  const int lane_r = kChannelsLast ? threadIdx.y : threadIdx.x;
  const int row_lanes = kChannelsLast ? kTileY : kTileX;
  const int channel_tile = kChannelsLast ? kTileX : kTileY;
  const int64_t c = int64_t(blockIdx.y) * channel_tile + lane_c;
  const inv::Context<A, A> ctx = rec.context();
  A a = 0, b = 0;
  if (c < l.c) {
    for (int64_t row = int64_t(blockIdx.x) * row_lanes + lane_r; row < l.rows;
         row += int64_t(gridDim.x) * row_lanes) {
      const int64_t i = (row / l.s) * l.stride_n + (row % l.s) * l.stride_s + c * l.stride_c;
      A dz, xmu;
      rec(ctx, i, c, dz, xmu);
      a += dz;
      b += dz * xmu;
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
  atomicAdd(out_b + c, static_cast<double>(total_b));
}

template <class A>
__global__ void copy_sums_kernel(const double* __restrict__ sums, int64_t c, A* __restrict__ a,
                                 A* __restrict__ b) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < c) {
    a[i] = static_cast<A>(sums[i]);
    b[i] = static_cast<A>(sums[c + i]);
  }
}

template <class Op, class T, class A>
__global__ void elemt_kernel(Recovery<Op, T, A> rec, const A* __restrict__ scale,
                             const A* __restrict__ coef_xmu, const A* __restrict__ coef_const,
                             T* __restrict__ grad_x, T* __restrict__ grad_r, Layout l) {
  const inv::Context<A, A> ctx = rec.context();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < l.numel;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = (i / l.stride_c) % l.c;
    A dz, xmu;
    rec(ctx, i, c, dz, xmu);
    grad_x[i] = from_acc<T>(dz * scale[c] + xmu * coef_xmu[c] + coef_const[c]);
    if (grad_r) grad_r[i] = from_acc<T>(dz);
  }
}

int elementwise_blocks(int64_t numel) {
  return static_cast<int>(std::min<int64_t>((numel + kThreads - 1) / kThreads, 65535 * 8));
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

// Calls f(Op{}) for the invertible activations (the glue rejects the others first).
template <class F>
void visit_invertible(int act_id, F&& f) {
  act::visit_activation(static_cast<act::ActId>(act_id), [&](auto op) {
    if constexpr (inv::Inverse<decltype(op)>::kInvertible) f(op);
  });
}

template <class Op, class T, class A>
Recovery<Op, T, A> recovery(const void* grad_out, const void* y, const uint8_t* mask,
                            const void* residual, const void* inv_scale, const void* shift,
                            const InverseArgs& inverse, const double* params) {
  return {static_cast<const T*>(grad_out), static_cast<const T*>(y),
          static_cast<const T*>(residual), mask, static_cast<const A*>(inv_scale),
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
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename AccOf<T>::type;
    visit_invertible(act_id, [&](auto op) {
      forward_kernel<decltype(op), T, A><<<elementwise_blocks(l.numel), kThreads, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<const A*>(mean),
          static_cast<const A*>(scale), static_cast<const A*>(shift), static_cast<A>(branch),
          static_cast<T*>(y), mask, l, params_of<A>(params));
    });
  });
  return cudaGetLastError();
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
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename AccOf<T>::type;
    const bool channels_last = g.channels_last;
    const int channel_tile = channels_last ? kTileX : kTileY;
    const int row_lanes = channels_last ? kTileY : kTileX;
    const int64_t channel_tiles = (l.c + channel_tile - 1) / channel_tile;
    // enough row shares to fill the GPU (~4 waves of 132 SMs), none of them empty
    const int64_t wanted = std::max<int64_t>(1, 512 / std::max<int64_t>(channel_tiles, 1));
    const int64_t row_shares = std::min<int64_t>(wanted, (l.rows + row_lanes - 1) / row_lanes);
    const dim3 grid(static_cast<unsigned>(std::max<int64_t>(row_shares, 1)),
                    static_cast<unsigned>(channel_tiles));
    const dim3 block(kTileX, kTileY);
    visit_invertible(act_id, [&](auto op) {
      using Op = decltype(op);
      const auto rec = recovery<Op, T, A>(grad_out, y, mask, residual, inv_scale, shift, inverse,
                                          params);
      if (channels_last) {
        reduce_kernel<true, Op, T, A><<<grid, block, 0, stream>>>(rec, l, workspace,
                                                                  workspace + l.c);
      } else {
        reduce_kernel<false, Op, T, A><<<grid, block, 0, stream>>>(rec, l, workspace,
                                                                   workspace + l.c);
      }
    });
    copy_sums_kernel<A><<<static_cast<unsigned>((l.c + kThreads - 1) / kThreads), kThreads, 0,
                          stream>>>(workspace, l.c, static_cast<A*>(sum_dz),
                                    static_cast<A*>(sum_dz_xmu));
  });
  return cudaGetLastError();
}

cudaError_t launch_bn_act_output_backward_elemt(
    const void* grad_out, const void* y, const uint8_t* mask, const void* residual, BnDType dtype,
    BnGeometry g, const void* scale, const void* inv_scale, const void* shift,
    const void* coef_xmu, const void* coef_const, InverseArgs inverse, void* grad_x,
    void* grad_residual, int act_id, const double* params, cudaStream_t stream) {
  const Layout l = layout_of(g);
  if (l.numel == 0) return cudaSuccess;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename AccOf<T>::type;
    visit_invertible(act_id, [&](auto op) {
      using Op = decltype(op);
      elemt_kernel<Op, T, A><<<elementwise_blocks(l.numel), kThreads, 0, stream>>>(
          recovery<Op, T, A>(grad_out, y, mask, residual, inv_scale, shift, inverse, params),
          static_cast<const A*>(scale), static_cast<const A*>(coef_xmu),
          static_cast<const A*>(coef_const), static_cast<T*>(grad_x),
          static_cast<T*>(grad_residual), l);
    });
  });
  return cudaGetLastError();
}

}  // namespace mishkit::cuda
