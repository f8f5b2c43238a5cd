// Launchers of the fused BatchNorm + activation CUDA kernels (bn_act_kernels.cu).
//
// Plain pointers and CUDA types only, so bn_act_kernels.cu compiles with `nvcc -c` without torch
// headers; cuda/bn_act_cuda.cpp is the torch glue (checks, allocation, stream, registration).
// Each launcher returns the error of its launches (the glue turns it into an error).
// Per-channel arrays are of the compute type (float for half/bfloat16/float, double for double).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mishkit::cuda {

enum class BnDType : int { kFloat, kDouble, kHalf, kBFloat16 };

struct BnGeometry {
  int64_t n, c, s;     // batch, channels, spatial elements per (n, c)
  bool channels_last;  // channels innermost (channels_last / channels_last_3d), else NCHW
};

// Bytes of the workspace the reductions (stats, backward_reduce) of `g` need: per-block partial
// results, combined per channel in a fixed order by a second kernel (deterministic, no atomics).
cudaError_t bn_act_workspace_bytes(BnDType dtype, BnGeometry g, int64_t* bytes);

// mean / biased var per channel (single pass: Welford merges of shifted batches).
cudaError_t launch_bn_act_stats(const void* x, BnDType dtype, BnGeometry g, void* mean, void* var,
                                void* workspace, cudaStream_t stream);

// y = act((x - mean) * scale + shift); act_id indexes act::ActId, params has act::kMaxParams.
cudaError_t launch_bn_act_forward(const void* x, BnDType dtype, BnGeometry g, const void* mean,
                                  const void* scale, const void* shift, void* y, int act_id,
                                  const double* params, cudaStream_t stream);

// sum_dz = sum(dz), sum_dz_xmu = sum(dz * (x - mean)); dz = grad_out * act'(z).
cudaError_t launch_bn_act_backward_reduce(const void* grad_out, const void* x, BnDType dtype,
                                          BnGeometry g, const void* mean, const void* scale,
                                          const void* shift, void* sum_dz, void* sum_dz_xmu,
                                          void* workspace, int act_id, const double* params,
                                          cudaStream_t stream);

// grad_x = dz * scale + (x - mean) * coef_xmu + coef_const
cudaError_t launch_bn_act_backward_elemt(const void* grad_out, const void* x, BnDType dtype,
                                         BnGeometry g, const void* mean, const void* scale,
                                         const void* shift, const void* coef_xmu,
                                         const void* coef_const, void* grad_x, int act_id,
                                         const double* params, cudaStream_t stream);

}  // namespace mishkit::cuda
