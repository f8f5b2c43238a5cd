// What the BatchNorm + activation kernel files share (bn_act_kernels.cu,
// bn_act_output_kernels.cu): the storage type of a BnDType and the activation parameters.
// CUDA headers only.
#pragma once

#include "activations.h"
#include "cuda/bn_act_launch.h"
#include "cuda/kernel_common.cuh"

namespace mishkit::cuda {

template <class A>
act::Params<A> params_of(const double* params) {
  return {static_cast<A>(params[0]), static_cast<A>(params[1])};
}

// Returns f(T{}) (a cudaError_t) with the storage type of `dtype`.
template <class F>
cudaError_t dispatch_dtype(BnDType dtype, F&& f) {
  switch (dtype) {
    case BnDType::kFloat: return f(float{});
    case BnDType::kDouble: return f(double{});
    case BnDType::kHalf: return f(__half{});
    case BnDType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace mishkit::cuda
