// Launchers of the output-saving BatchNorm + activation CUDA kernels (bn_act_output_kernels.cu).
//
// Plain pointers and CUDA types only (like bn_act_launch.h, whose BnDType and BnGeometry they
// share), so the .cu compiles with `nvcc -c` without torch headers; cuda/bn_act_output_cuda.cpp is
// the torch glue. Each launcher returns the error of its launches. Per-channel arrays
// and the inverse table are of the compute type; `mask` has ceil(numel / 8) bytes (bit k of byte
// i = element 8 i + k of the flat storage); `residual` / `grad_residual` may be null.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/bn_act_launch.h"

namespace mishkit::cuda {

// y = act(z), z = (x - mean) * scale + shift (+ residual); mask bit = z < branch.
cudaError_t launch_bn_act_output_forward(const void* x, const void* residual, BnDType dtype,
                                         BnGeometry g, const void* mean, const void* scale,
                                         const void* shift, double branch, void* y,
                                         uint8_t* mask, int act_id, const double* params,
                                         cudaStream_t stream);

// The inverse of one call: its table (device) and floors (mishkit/backends/inversion.py).
struct InverseArgs {
  const void* table;
  double floor;
  double log_floor;
};

// sum_dz = sum(dz), sum_dz_xmu = sum(dz * xmu) with z recovered from (y, mask),
// dz = grad_out * act'(z), xmu = (z - shift (- residual)) * inv_scale. `workspace`: 2 * c doubles,
// zeroed by the caller.
cudaError_t launch_bn_act_output_backward_reduce(const void* grad_out, const void* y,
                                                 const uint8_t* mask, const void* residual,
                                                 BnDType dtype, BnGeometry g,
                                                 const void* inv_scale, const void* shift,
                                                 InverseArgs inverse, void* sum_dz,
                                                 void* sum_dz_xmu, double* workspace, int act_id,
                                                 const double* params, cudaStream_t stream);

// grad_x = dz * scale + xmu * coef_xmu + coef_const; grad_residual (if not null) = dz. z (compute
// type) may hold the recovered pre-activation; null: recovered again from (y, mask).
cudaError_t launch_bn_act_output_backward_elemt(
    const void* grad_out, const void* y, const uint8_t* mask, const void* z,
    const void* residual, BnDType dtype, BnGeometry g, const void* scale, const void* inv_scale,
    const void* shift, const void* coef_xmu, const void* coef_const, InverseArgs inverse,
    void* grad_x, void* grad_residual, int act_id, const double* params, cudaStream_t stream);

}  // namespace mishkit::cuda
