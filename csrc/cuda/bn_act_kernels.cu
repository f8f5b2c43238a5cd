// Fused BatchNorm + activation CUDA kernels. CUDA headers only (see bn_act_launch.h).
//
// Elementwise passes (forward, input gradient): grid-stride loops over the flat dense storage;
// the channel of flat index i is (i / stride_c) % C (stride_c = S for NCHW, 1 for channels_last).
// Reductions (statistics, backward sums): each block covers a tile of channels and a share of
// the N*S rows; threads run along the contiguous dimension (rows for NCHW, channels for
// channels_last), accumulate in the compute type, reduce in shared memory and add the block's
// partial sum into a double workspace with atomicAdd (order of the adds is not deterministic).
// The variance is two-pass: sums first, then squared deviations from the finished mean.
#include <cuda_runtime.h>

#include "activations.h"
#include "cuda/bn_act_common.cuh"
#include "cuda/bn_act_launch.h"

namespace mishkit::cuda {
namespace {

using namespace bn;

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

// Contributions (a, b) of one element to the two per-channel sums (bn_act_common.cuh).
template <class T, class A>
struct SumContrib {  // a = x
  const T* x;
  __device__ NoState prepare() const { return {}; }
  __device__ void operator()(NoState, int64_t i, int64_t, A& a, A&) const { a += to_acc(x[i]); }
};

template <class T, class A>
struct SquaresContrib {  // a = (x - mean)^2
  const T* x;
  const A* mean;
  __device__ NoState prepare() const { return {}; }
  __device__ void operator()(NoState, int64_t i, int64_t c, A& a, A&) const {
    const A d = to_acc(x[i]) - mean[c];
    a += d * d;
  }
};

template <class Op, class T, class A>
struct BackwardContrib {  // a = dz, b = dz * (x - mean)
  const T* x;
  const T* g;
  const A* mean;
  const A* scale;
  const A* shift;
  act::Params<A> p;
  __device__ NoState prepare() const { return {}; }
  __device__ void operator()(NoState, int64_t i, int64_t c, A& a, A& b) const {
    const A xmu = to_acc(x[i]) - mean[c];
    const A dz =
        to_acc(g[i]) * Op::template derivative<act::ScalarMath<A>>(xmu * scale[c] + shift[c], p);
    a += dz;
    b += dz * xmu;
  }
};

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
    launch_reduce<A>(l, g.channels_last, SumContrib<T, A>{xp}, workspace, nullptr, stream);
    launch_divide<A>(workspace, l.c, count, mean, stream);
    launch_reduce<A>(l, g.channels_last, SquaresContrib<T, A>{xp, static_cast<const A*>(mean)},
                     workspace + l.c, nullptr, stream);
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
      const BackwardContrib<decltype(op), T, A> contrib{
          static_cast<const T*>(x), static_cast<const T*>(grad_out), static_cast<const A*>(mean),
          static_cast<const A*>(scale), static_cast<const A*>(shift), params_of<A>(params)};
      launch_reduce<A>(l, g.channels_last, contrib, workspace, workspace + l.c, stream);
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
