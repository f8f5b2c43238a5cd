// Argument checks of the fused BatchNorm + activation ops, shared by the CPU (bn_act.cpp) and
// CUDA (cuda/bn_act_cuda.cpp) implementations. Defined in bn_act.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <initializer_list>

#include "ops.h"

namespace mishkit::bn_act {

// x: defined, floating, (N, C, ...) and dense (NCHW-contiguous or channels_last).
void check_input(const char* op, const at::Tensor& x);

// Each vector: (C,), in x's compute dtype (float64 for double x, else float32), on x's device.
void check_channel_vectors(const char* op, const at::Tensor& x,
                           std::initializer_list<const at::Tensor*> vectors);

// grad_out: x's shape, dtype, device and strides (the kernels index both with one offset).
void check_grad(const char* op, const at::Tensor& grad_out, const at::Tensor& x);

// Resolves the activation name and parameters (the activation ops' rules and messages).
ActCall resolve_activation(const char* op, const at::Tensor& x, c10::string_view name,
                           c10::ArrayRef<double> params);

}  // namespace mishkit::bn_act
