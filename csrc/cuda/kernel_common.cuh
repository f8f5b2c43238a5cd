// What the CUDA kernel files share: a launch that returns that launch's error, the device's
// multiprocessor count, 16-byte alignment and packs, and the storage <-> compute conversions.
// CUDA headers only (no torch).
//
// With MISHKIT_CUDA_EMULATION defined (tests/cuda_emulation/), the kernel files compile as host
// C++ and every launch runs its blocks on CPU threads: the tests check the kernels' indexing,
// alignment handling and reductions on machines without a GPU. The emulation header provides
// launch() and multiprocessor_count() then; nothing else in the kernel files differs.
#pragma once

#ifdef MISHKIT_CUDA_EMULATION
#include "cuda_emulation.h"
#else
#include <cuda_runtime.h>
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace mishkit::cuda {

#ifndef MISHKIT_CUDA_EMULATION
// kernel<<<grid, block, 0, stream>>>(args...), then the error of that launch.
template <class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                   Args... args) {
  kernel<<<grid, block, 0, stream>>>(static_cast<Params>(args)...);
  return cudaGetLastError();
}

// Multiprocessors of the current device.
inline cudaError_t multiprocessor_count(int* count) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
  }
  return err;
}
#endif

// Resident 256-thread blocks per multiprocessor at full occupancy (2048 threads on sm_80/sm_90).
constexpr int kResidentBlocksPerSm = 8;

inline uintptr_t address(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr); }

inline bool aligned16(const void* ptr) { return address(ptr) % 16 == 0; }

// N elements moved as one access (N = 16 / sizeof(T): 16 bytes; N = 1: one element).
template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  using value_type = T;
  static constexpr int size = N;
  T v[N];
};

// Half types compute in float; float and double in themselves.
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

__host__ __device__ __forceinline__ float to_compute(float v) { return v; }
__host__ __device__ __forceinline__ double to_compute(double v) { return v; }
__host__ __device__ __forceinline__ float to_compute(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_compute(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// Round to nearest even into the storage type.
template <class T>
__host__ __device__ __forceinline__ T from_compute(typename ComputeType<T>::type v) {
  return v;
}
template <>
__host__ __device__ __forceinline__ __half from_compute<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_compute<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The big inputs of one elementwise pass (x, or x and grad_out), in one layout with the output.
template <class T, int kInputs>
struct Inputs {
  const T* ptr[kInputs];
};

// Accesses of N elements a thread keeps in flight per iteration: >= 32 bytes, which an
// H100/H200 needs to cover its memory latency (e.g. two 16-byte packs, or eight floats).
template <class T, int N>
__host__ __device__ constexpr int packs_in_flight() {
  return 32 / int(N * sizeof(T)) > 1 ? 32 / int(N * sizeof(T)) : 1;
}

// One iteration of an elementwise map over packs: loads kUnroll packs of each of the K inputs
// (pack index(u) of in[k], skipped where index(u) < 0), all before the first store, then stores
// out[index(u)].v[e] = apply(e, values of element e of every input).
template <int kUnroll, int K, class P, class Index, class Apply>
__device__ __forceinline__ void map_packs(const P* const (&in)[K], P* out, const Index& index,
                                          const Apply& apply) {
  P loaded[kUnroll][K];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = index(u);
    if (i >= 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) loaded[u][k] = in[k][i];
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = index(u);
    if (i >= 0) {
      P result;
#pragma unroll
      for (int e = 0; e < P::size; ++e) {
        typename P::value_type values[K];
#pragma unroll
        for (int k = 0; k < K; ++k) values[k] = loaded[u][k].v[e];
        result.v[e] = apply(e, values);
      }
      out[i] = result;
    }
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The smallest power of two >= v, clamped to [lo, hi] (powers of two).
inline int pow2_clamp(int64_t v, int lo, int hi) {
  int p = lo;
  while (p < hi && p < v) p *= 2;
  return p;
}

}  // namespace mishkit::cuda
