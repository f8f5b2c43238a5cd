// What the torch glue of the BatchNorm + activation CUDA ops shares (cuda/bn_act_cuda.cpp,
// cuda/bn_act_output_cuda.cpp): the launchers' dtype and geometry of a tensor, per-channel
// output vectors, and the launch error check.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "checks.h"
#include "cuda/bn_act_launch.h"

namespace mishkit::cuda {

inline BnDType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kDouble: return BnDType::kDouble;
    case at::kHalf: return BnDType::kHalf;
    case at::kBFloat16: return BnDType::kBFloat16;
    default: return BnDType::kFloat;  // the checks admit only the four float types
  }
}

inline BnGeometry geometry_of(const at::Tensor& x) {
  int64_t spatial = 1;
  for (int64_t d = 2; d < x.dim(); ++d) spatial *= x.size(d);
  return {x.size(0), x.size(1), spatial, !x.is_contiguous()};
}

// A (C,) vector in x's compute dtype.
inline at::Tensor channel_vector(const at::Tensor& x) {
  return at::empty({x.size(1)}, x.options().dtype(compute_type(x)));
}

inline void check_launch(const char* op, cudaError_t error) {
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(error));
}

}  // namespace mishkit::cuda
