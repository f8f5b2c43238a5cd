// Torch-free entry points of the CUDA activation kernels (act_kernels.cu), called by act_cuda.cpp.
//
// Each call launches one elementwise kernel on `stream` over n elements of flat storage and returns
// cudaGetLastError() of that launch (cudaSuccess and no launch when n == 0). The caller owns the
// device guard, the layouts (x, y / grad_out, grad_in share one set of strides) and error checks.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "activations.h"

namespace mishkit::cuda {

enum class DType { kFloat, kDouble, kHalf, kBFloat16 };  // half types are computed in float

// y[i] = f(x[i]). y may equal x (in-place).
cudaError_t launch_act_forward(act::ActId id, DType dtype, const void* x, void* y, int64_t n,
                               const double* params, cudaStream_t stream);

// grad_in[i] = grad_out[i] * f'(x[i]).
cudaError_t launch_act_backward(act::ActId id, DType dtype, const void* grad_out, const void* x,
                                void* grad_in, int64_t n, const double* params,
                                cudaStream_t stream);

}  // namespace mishkit::cuda
