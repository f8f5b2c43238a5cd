// CUDA activation kernels: flat elementwise maps over the formulas of activations.h.
//
// CUDA headers only (no torch), so `nvcc -c` compiles this file on a machine without a GPU or a
// CUDA build of torch. 16-byte vector loads/stores when every pointer is 16-byte aligned (the
// usual case for fresh allocations), scalar otherwise; grid-stride loops with int64 indices, so
// tensors over 2^31 elements work. Half types load as __half / __nv_bfloat16, compute in float.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "activations.h"
#include "cuda/act_launch.h"

namespace mishkit::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 16;  // enough resident warps to hide memory latency

template <class T>
struct ComputeType {
  using type = T;
};
template <>
struct ComputeType<__half> {
  using type = float;
};
template <>
struct ComputeType<__nv_bfloat16> {
  using type = float;
};

__device__ __forceinline__ float to_compute(float v) { return v; }
__device__ __forceinline__ double to_compute(double v) { return v; }
__device__ __forceinline__ float to_compute(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_compute(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_compute(typename ComputeType<T>::type v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_compute<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_compute<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements moved as one 16-byte (N = 16 / sizeof(T)) or single-element access.
template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <class Op, class T, int N, class C = typename ComputeType<T>::type>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* x, T* y, int64_t n, act::Params<C> p) {
  using M = act::ScalarMath<C>;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t n_packs = n / N;
  for (int64_t i = start; i < n_packs; i += stride) {
    const Pack<T, N> in = reinterpret_cast<const Pack<T, N>*>(x)[i];
    Pack<T, N> out;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      out.v[k] = from_compute<T>(Op::template forward<M>(to_compute(in.v[k]), p));
    }
    reinterpret_cast<Pack<T, N>*>(y)[i] = out;
  }
  for (int64_t i = n_packs * N + start; i < n; i += stride) {  // tail: fewer than N elements
    y[i] = from_compute<T>(Op::template forward<M>(to_compute(x[i]), p));
  }
}

template <class Op, class T, int N, class C = typename ComputeType<T>::type>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* grad_out, const T* x, T* grad_in, int64_t n, act::Params<C> p) {
  using M = act::ScalarMath<C>;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t n_packs = n / N;
  for (int64_t i = start; i < n_packs; i += stride) {
    const Pack<T, N> g = reinterpret_cast<const Pack<T, N>*>(grad_out)[i];
    const Pack<T, N> in = reinterpret_cast<const Pack<T, N>*>(x)[i];
    Pack<T, N> out;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const C d = Op::template derivative<M>(to_compute(in.v[k]), p);
      out.v[k] = from_compute<T>(to_compute(g.v[k]) * d);
    }
    reinterpret_cast<Pack<T, N>*>(grad_in)[i] = out;
  }
  for (int64_t i = n_packs * N + start; i < n; i += stride) {
    const C d = Op::template derivative<M>(to_compute(x[i]), p);
    grad_in[i] = from_compute<T>(to_compute(grad_out[i]) * d);
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Blocks for `work` threads' worth of items, capped at a few waves (the loops stride the rest).
cudaError_t grid_size(int64_t work, unsigned* blocks) {
  int device = 0;
  int sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (err != cudaSuccess) return err;
  const int64_t wanted = (work + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms) * kBlocksPerSm;
  *blocks = static_cast<unsigned>(wanted < cap ? wanted : cap);
  return cudaSuccess;
}

template <class C>
act::Params<C> cast_params(const double* params) {
  return {static_cast<C>(params[0]), static_cast<C>(params[1])};
}

template <class Op, class T>
cudaError_t forward_typed(const void* x, void* y, int64_t n, const double* params,
                          cudaStream_t stream) {
  using C = typename ComputeType<T>::type;
  constexpr int kPack = 16 / sizeof(T);
  const bool vectorized = aligned16(x) && aligned16(y);
  unsigned blocks = 0;
  if (cudaError_t err = grid_size(vectorized ? (n + kPack - 1) / kPack : n, &blocks)) return err;
  const auto* xt = static_cast<const T*>(x);
  auto* yt = static_cast<T*>(y);
  if (vectorized) {
    forward_kernel<Op, T, kPack>
        <<<blocks, kThreads, 0, stream>>>(xt, yt, n, cast_params<C>(params));
  } else {
    forward_kernel<Op, T, 1><<<blocks, kThreads, 0, stream>>>(xt, yt, n, cast_params<C>(params));
  }
  return cudaGetLastError();
}

template <class Op, class T>
cudaError_t backward_typed(const void* grad_out, const void* x, void* grad_in, int64_t n,
                           const double* params, cudaStream_t stream) {
  using C = typename ComputeType<T>::type;
  constexpr int kPack = 16 / sizeof(T);
  const bool vectorized = aligned16(grad_out) && aligned16(x) && aligned16(grad_in);
  unsigned blocks = 0;
  if (cudaError_t err = grid_size(vectorized ? (n + kPack - 1) / kPack : n, &blocks)) return err;
  const auto* gt = static_cast<const T*>(grad_out);
  const auto* xt = static_cast<const T*>(x);
  auto* dt = static_cast<T*>(grad_in);
  if (vectorized) {
    backward_kernel<Op, T, kPack>
        <<<blocks, kThreads, 0, stream>>>(gt, xt, dt, n, cast_params<C>(params));
  } else {
    backward_kernel<Op, T, 1>
        <<<blocks, kThreads, 0, stream>>>(gt, xt, dt, n, cast_params<C>(params));
  }
  return cudaGetLastError();
}

// Calls f(T{}) with the storage type for `dtype`.
template <class F>
cudaError_t visit_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat:
      return f(float{});
    case DType::kDouble:
      return f(double{});
    case DType::kHalf:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_act_forward(act::ActId id, DType dtype, const void* x, void* y, int64_t n,
                               const double* params, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return act::visit_activation(id, [&](auto op) {
    return visit_dtype(dtype, [&](auto tag) {
      return forward_typed<decltype(op), decltype(tag)>(x, y, n, params, stream);
    });
  });
}

cudaError_t launch_act_backward(act::ActId id, DType dtype, const void* grad_out, const void* x,
                                void* grad_in, int64_t n, const double* params,
                                cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return act::visit_activation(id, [&](auto op) {
    return visit_dtype(dtype, [&](auto tag) {
      return backward_typed<decltype(op), decltype(tag)>(grad_out, x, grad_in, n, params, stream);
    });
  });
}

}  // namespace mishkit::cuda
