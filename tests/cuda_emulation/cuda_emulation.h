// Runs mishkit's CUDA kernel files on the CPU, for tests on machines without a GPU.
//
// csrc/cuda/kernel_common.cuh includes this header instead of <cuda_runtime.h> when the kernel
// files are compiled as host C++ with -DMISHKIT_CUDA_EMULATION (tests/test_cuda_emulated.py).
// A launch runs its blocks one after another; a block's threads are std::threads that meet at
// __syncthreads() on a std::barrier (a thread that returns early drops out of it, as on the GPU),
// so __shared__ variables (static here) belong to one block at a time. Launch configurations the
// GPU would refuse (empty grids, grid.y or grid.z over 65535, more than 1024 threads) fail with
// cudaErrorInvalidConfiguration. MISHKIT_EMULATED_SMS sets the multiprocessor count (default 2),
// which is what grid sizes follow; MISHKIT_EMULATION_DRY_RUN=1 checks configurations without
// running them (for geometries too big to run here). Only what the kernels use is here.
#pragma once

#include <cuda_runtime_api.h>  // types only (dim3, uint3, cudaError_t, cudaStream_t): no cudart

// plain host functions (the CUDA headers may have been included before, defining these)
#undef __global__
#undef __device__
#undef __host__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __launch_bounds__(...)

#include <atomic>
#include <barrier>
#include <cstdlib>
#include <thread>
#include <vector>

#undef __shared__
#define __shared__ static

namespace mishkit_emulation {

inline thread_local uint3 thread_index;
inline thread_local uint3 block_index;
inline dim3 block_dim;
inline dim3 grid_dim;
inline thread_local std::barrier<>* block_barrier = nullptr;

template <class Body>
void run(dim3 grid, dim3 block, const Body& body) {
  grid_dim = grid;
  block_dim = block;
  const unsigned threads = block.x * block.y * block.z;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> barrier(threads);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
          pool.emplace_back([&, t, x, y, z] {
            thread_index = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
            block_index = {x, y, z};
            block_barrier = &barrier;
            body();
            barrier.arrive_and_drop();
          });
        }
        for (std::thread& thread : pool) thread.join();
      }
    }
  }
}

}  // namespace mishkit_emulation

#define threadIdx (::mishkit_emulation::thread_index)
#define blockIdx (::mishkit_emulation::block_index)
#define blockDim (::mishkit_emulation::block_dim)
#define gridDim (::mishkit_emulation::grid_dim)

inline void __syncthreads() { mishkit_emulation::block_barrier->arrive_and_wait(); }

// The blocks run one after another, but a block's threads run at once.
inline double atomicAdd(double* address, double value) {
  return std::atomic_ref<double>(*address).fetch_add(value);
}

namespace mishkit::cuda {

inline cudaError_t multiprocessor_count(int* count) {
  const char* env = std::getenv("MISHKIT_EMULATED_SMS");
  *count = env != nullptr ? std::atoi(env) : 2;
  return *count > 0 ? cudaSuccess : cudaErrorInvalidValue;
}

template <class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t,
                   Args... args) {
  const unsigned long threads = 1ul * block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 ||
      threads == 0 || threads > 1024) {
    return cudaErrorInvalidConfiguration;
  }
  const char* dry_run = std::getenv("MISHKIT_EMULATION_DRY_RUN");
  if (dry_run == nullptr || dry_run[0] != '1') {
    mishkit_emulation::run(grid, block, [&] { kernel(static_cast<Params>(args)...); });
  }
  return cudaSuccess;
}

}  // namespace mishkit::cuda
