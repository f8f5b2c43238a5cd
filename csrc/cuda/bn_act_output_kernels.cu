// Output-saving BatchNorm + activation CUDA kernels. CUDA headers only (see
// bn_act_output_launch.h).
//
// forward: one thread per element in warp-aligned grid-stride steps; each warp's 32 branch bits
// come from one __ballot_sync and lanes 0, 8, 16, 24 store its four bytes of the mask.
// backward: z is recovered per element from y and its bit (inverse.h, reading the table from
// global memory, where every thread of a block shares the same few cache lines), then the
// shared reduction of bn_act_common.cuh sums, and the input gradient runs elementwise.
#include <cuda_runtime.h>

#include "activations.h"
#include "cuda/bn_act_common.cuh"
#include "cuda/bn_act_output_launch.h"
#include "inverse.h"

namespace mishkit::cuda {
namespace {

using namespace bn;

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

// dz and x - mean of element i; also the reduction's contribution (bn_act_common.cuh), with the
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
                     : inv::Inverse<Op>::template invert<M>(to_acc(y[i]), mask_bit(mask, i), ctx);
    A u = z - shift[c];
    if (r) u -= to_acc(r[i]);
    xmu = u * inv_scale[c];
    dz = to_acc(g[i]) * Op::template derivative<M>(z, p);
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
    grad_x[i] = from_acc<T>(dz * scale[c] + xmu * coef_xmu[c] + coef_const[c]);
    if (grad_r) grad_r[i] = from_acc<T>(dz);
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
    visit_invertible(act_id, [&](auto op) {
      using Op = decltype(op);
      launch_reduce<A>(l, g.channels_last,
                       recovery<Op, T, A>(grad_out, y, mask, nullptr, residual, inv_scale, shift,
                                          inverse, params),
                       workspace, workspace + l.c, stream);
    });
    launch_divide<A>(workspace, l.c, 1.0, sum_dz, stream);
    launch_divide<A>(workspace + l.c, l.c, 1.0, sum_dz_xmu, stream);
  });
  return cudaGetLastError();
}

cudaError_t launch_bn_act_output_backward_elemt(
    const void* grad_out, const void* y, const uint8_t* mask, const void* z,
    const void* residual, BnDType dtype, BnGeometry g, const void* scale, const void* inv_scale,
    const void* shift, const void* coef_xmu, const void* coef_const, InverseArgs inverse,
    void* grad_x, void* grad_residual, int act_id, const double* params, cudaStream_t stream) {
  const Layout l = layout_of(g);
  if (l.numel == 0) return cudaSuccess;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename AccOf<T>::type;
    visit_invertible(act_id, [&](auto op) {
      using Op = decltype(op);
      elemt_kernel<Op, T, A><<<elementwise_blocks(l.numel), kThreads, 0, stream>>>(
          recovery<Op, T, A>(grad_out, y, mask, z, residual, inv_scale, shift, inverse, params),
          static_cast<const A*>(scale), static_cast<const A*>(coef_xmu),
          static_cast<const A*>(coef_const), static_cast<T*>(grad_x),
          static_cast<T*>(grad_residual), l);
    });
  });
  return cudaGetLastError();
}

}  // namespace mishkit::cuda
