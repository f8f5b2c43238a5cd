// Argument checks shared by the CPU (ops.cpp) and CUDA (cuda/act_cuda.cpp) op implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <array>

#include "activations.h"

namespace mishkit {

// A validated op call: which activation, and its parameters padded to act::kMaxParams.
struct ActCall {
  act::ActId id;
  std::array<double, act::kMaxParams> params;
};

// Checks x (floating dtype, defined) and resolves the name and parameter list, with errors that
// name the op, the activation and the offending value. `op` is e.g. "mishkit::act_forward".
ActCall check_forward_args(const char* op, const at::Tensor& x, c10::string_view name,
                           c10::ArrayRef<double> params);

// The forward checks on x, plus: grad_out defined, on x's device, with x's shape and dtype.
ActCall check_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                            c10::string_view name, c10::ArrayRef<double> params);

}  // namespace mishkit
