// CUDA activation kernels: flat elementwise maps over the formulas of activations.h.
//
// CUDA headers only (no torch), so `nvcc -c` compiles this file on a machine without a GPU or a
// CUDA build of torch. Grid-stride loops with int64 indices (tensors over 2^31 elements work).
// Half types load as __half / __nv_bfloat16 and compute in float.
//
// Memory parallelism: every thread keeps >= 32 bytes of each input in flight per iteration
// (packs_in_flight: two 16-byte packs, or eight float scalars); with one 16-byte access per
// thread an H100/H200 cannot cover its memory latency. Alignment: when all pointers sit at the
// same offset from a 16-byte boundary (fresh tensors, in-place ops, views shifted alike), a
// scalar prefix of at most 15 bytes brings them to it, and the body moves 16-byte packs; only
// pointers misaligned against each other take the (unrolled) scalar path for the whole tensor.
#include <cstdint>
#include <initializer_list>

#include "activations.h"
#include "cuda/act_launch.h"
#include "cuda/kernel_common.cuh"

namespace mishkit::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 2 * kResidentBlocksPerSm;  // two waves; the loops stride the rest

// float16 may use the fast exponential: its error (a few float32 ulp, flushing results below
// 2^-126 to 0) stays far under float16's rounding step, and float16 cannot hold what the flush
// loses. bfloat16 has float32's range, so it keeps the exact libm policy.
struct Float16Math : act::ScalarMath<float> {
  static __host__ __device__ __forceinline__ float exp(float x) {
#ifdef __CUDA_ARCH__
    return __expf(x);
#else
    return ::expf(x);  // host instantiations (none are launched) and the CPU emulation
#endif
  }
};
template <class T>
struct MathFor {
  using type = act::ScalarMath<typename ComputeType<T>::type>;
};
template <>
struct MathFor<__half> {
  using type = Float16Math;
};

// y = f(x) and grad_in = grad_out * f'(x), element by element in the compute type.
template <class Op, class T>
struct Forward {
  using C = typename ComputeType<T>::type;
  act::Params<C> p;
  __device__ __forceinline__ T operator()(T x) const {
    return from_compute<T>(Op::template forward<typename MathFor<T>::type>(to_compute(x), p));
  }
};
template <class Op, class T>
struct Backward {
  using C = typename ComputeType<T>::type;
  act::Params<C> p;
  __device__ __forceinline__ T operator()(T x, T grad) const {
    const C d = Op::template derivative<typename MathFor<T>::type>(to_compute(x), p);
    return from_compute<T>(to_compute(grad) * d);
  }
};

template <class F, class T, int kInputs>
__device__ __forceinline__ T apply(const F& f, const T (&v)[kInputs]) {
  if constexpr (kInputs == 1) {
    return f(v[0]);
  } else {
    return f(v[0], v[1]);
  }
}

// out[i] = f(in[0][i], ...) for i < n. Elements [0, head) and those after the last whole pack
// are done one by one (fewer than N each); the rest as packs of N, kUnroll packs per thread and
// iteration (map_packs: all loads issued before the first store).
template <class F, class T, int N, int kInputs>
__global__ void __launch_bounds__(kThreads)
    map_kernel(Inputs<T, kInputs> in, T* out, int64_t n, int64_t head, F f) {
  constexpr int kUnroll = packs_in_flight<T, N>();
  using P = Pack<T, N>;
  const int64_t thread = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t threads = int64_t(gridDim.x) * blockDim.x;
  const int64_t packs = (n - head) / N;
  const P* in_packs[kInputs];
#pragma unroll
  for (int k = 0; k < kInputs; ++k) in_packs[k] = reinterpret_cast<const P*>(in.ptr[k] + head);
  P* out_packs = reinterpret_cast<P*>(out + head);
  for (int64_t base = thread; base < packs; base += kUnroll * threads) {
    map_packs<kUnroll>(
        in_packs, out_packs,
        [&](int u) { return base + u * threads < packs ? base + u * threads : int64_t{-1}; },
        [&](int, const T (&values)[kInputs]) { return apply(f, values); });
  }
  // the scalar edges: the prefix before the first 16-byte boundary, the rest after the packs
  const int64_t tail = head + packs * N;
  for (int64_t i = thread; i < head + (n - tail); i += threads) {
    const int64_t at = i < head ? i : tail + (i - head);
    T values[kInputs];
#pragma unroll
    for (int k = 0; k < kInputs; ++k) values[k] = in.ptr[k][at];
    out[at] = apply(f, values);
  }
}

// Elements before the common 16-byte boundary of all pointers, or -1 when they have none (their
// offsets from a boundary differ, or one is not even aligned to its element).
template <class T>
int64_t common_head(std::initializer_list<const void*> pointers, int64_t n) {
  const uintptr_t offset = address(*pointers.begin()) % 16;
  for (const void* p : pointers) {
    if (address(p) % 16 != offset) return -1;
  }
  if (offset % sizeof(T) != 0) return -1;
  const int64_t head = static_cast<int64_t>((16 - offset) % 16 / sizeof(T));
  return head < n ? head : n;
}

// Blocks for `work` threads' worth of items, capped at kBlocksPerSm per multiprocessor.
cudaError_t grid_size(int64_t work, unsigned* blocks) {
  int sms = 0;
  if (cudaError_t err = multiprocessor_count(&sms)) return err;
  const int64_t wanted = (work + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms) * kBlocksPerSm;
  *blocks = static_cast<unsigned>(wanted < cap ? (wanted > 0 ? wanted : 1) : cap);
  return cudaSuccess;
}

template <class C>
act::Params<C> cast_params(const double* params) {
  return {static_cast<C>(params[0]), static_cast<C>(params[1])};
}

// Runs the map with 16-byte packs where the pointers allow it, else element by element.
template <class F, class T, int kInputs>
cudaError_t run_map(Inputs<T, kInputs> in, T* out, int64_t n, F f, cudaStream_t stream) {
  constexpr int kPack = 16 / sizeof(T);
  const void* pointers[kInputs + 1];
  for (int k = 0; k < kInputs; ++k) pointers[k] = in.ptr[k];
  pointers[kInputs] = out;
  const int64_t head = kInputs == 1 ? common_head<T>({pointers[0], pointers[1]}, n)
                                    : common_head<T>({pointers[0], pointers[1], pointers[2]}, n);
  unsigned blocks = 0;
  if (head >= 0) {
    const int64_t packs = (n - head) / kPack;
    if (cudaError_t err = grid_size(ceil_div(packs, packs_in_flight<T, kPack>()), &blocks)) {
      return err;
    }
    return launch(&map_kernel<F, T, kPack, kInputs>, dim3(blocks), dim3(kThreads), stream, in,
                  out, n, head, f);
  }
  if (cudaError_t err = grid_size(ceil_div(n, packs_in_flight<T, 1>()), &blocks)) return err;
  return launch(&map_kernel<F, T, 1, kInputs>, dim3(blocks), dim3(kThreads), stream, in, out, n,
                int64_t{0}, f);
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
      using T = decltype(tag);
      using Op = decltype(op);
      const Forward<Op, T> f{cast_params<typename ComputeType<T>::type>(params)};
      return run_map(Inputs<T, 1>{{static_cast<const T*>(x)}}, static_cast<T*>(y), n, f, stream);
    });
  });
}

cudaError_t launch_act_backward(act::ActId id, DType dtype, const void* grad_out, const void* x,
                                void* grad_in, int64_t n, const double* params,
                                cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return act::visit_activation(id, [&](auto op) {
    return visit_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      using Op = decltype(op);
      const Backward<Op, T> f{cast_params<typename ComputeType<T>::type>(params)};
      const Inputs<T, 2> in{{static_cast<const T*>(x), static_cast<const T*>(grad_out)}};
      return run_map(in, static_cast<T*>(grad_in), n, f, stream);
    });
  });
}

}  // namespace mishkit::cuda
