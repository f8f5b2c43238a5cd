// Every argument check of the mishkit ops, written once and shared by the CPU (cpu/*_cpu.cpp) and
// CUDA (cuda/*_cuda.cpp) implementations. Errors name the op (e.g. "mishkit::act_forward"), the
// activation where there is one, and the offending argument and value.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <array>
#include <initializer_list>

#include "activations.h"

namespace mishkit {

// A validated op call: which activation, and its parameters padded to act::kMaxParams.
struct ActCall {
  act::ActId id;
  std::array<double, act::kMaxParams> params;
};

inline bool is_float_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
         dtype == at::kBFloat16;
}

// float64 computes in float64; float32 and the half types in float32.
inline at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// `t` is defined and of one of the four float dtypes. `where...` names the call in the message.
template <typename... Where>
void check_float_tensor(const at::Tensor& t, const char* arg, const Where&... where) {
  TORCH_CHECK_VALUE(t.defined(), where..., ": ", arg, " is an undefined tensor");
  TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), where..., ": unsupported dtype ",
                   t.scalar_type(), " for ", arg,
                   "; expected float32, float64, float16 or bfloat16");
}

// `t` lives on a CUDA device (the CUDA implementations' own check; dispatch already routes by
// the first tensor argument, this names a mismatched one).
template <typename... Where>
void check_cuda_tensor(const at::Tensor& t, const Where&... where) {
  TORCH_CHECK(t.is_cuda(), where..., ": expected a CUDA tensor, got one on ", t.device());
}

// Activation ops ------------------------------------------------------------------------------

// x: a float tensor; name: a canonical activation name; params: its parameter count, not NaN,
// finite except a "threshold" (+-inf switches the cut-off off or on everywhere, as torch allows).
ActCall check_forward_args(const char* op, const at::Tensor& x, c10::string_view name,
                           c10::ArrayRef<double> params);

// The forward checks on x, plus: grad_out a float tensor on x's device with x's shape and dtype.
ActCall check_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                            c10::string_view name, c10::ArrayRef<double> params);

// Layouts ---------------------------------------------------------------------------------------

// a and b (of one shape) address their elements alike: equal strides on every dim of size > 1.
// A size-1 dim's stride never addresses a second element, so it is layout-neutral (torch's
// is_contiguous ignores it too; e.g. a pooled (N, C, 1, 1) channels_last tensor is contiguous).
bool same_layout(const at::Tensor& a, const at::Tensor& b);

// Fused BatchNorm + activation ops ------------------------------------------------------------

// x: a float (N, C, ...) tensor the kernels index directly: NCHW-contiguous, or channels-last
// (channels innermost: channels_last for 4-D, channels_last_3d for 5-D). The kernels treat any x
// that is not contiguous as channels-last.
void check_bn_input(const char* op, const at::Tensor& x);

// Each vector: contiguous (C,), in x's compute dtype, on x's device.
void check_channel_vectors(const char* op, const at::Tensor& x,
                           std::initializer_list<const at::Tensor*> vectors);

// grad_out: x's shape, dtype, device and layout (same_layout: the kernels index both with one
// offset).
void check_bn_grad(const char* op, const at::Tensor& grad_out, const at::Tensor& x);

}  // namespace mishkit

// Output-saving BatchNorm + activation ops ----------------------------------------------------

#include <optional>

namespace mishkit {

// The forward checks, plus: the activation can be recovered from its output with these
// parameters (inverse.h; mishkit/backends/inversion.py for the reasons).
ActCall check_output_activation(const char* op, const at::Tensor& x, c10::string_view name,
                                c10::ArrayRef<double> params);

// mask: uint8, contiguous, ceil(y.numel() / 8) bytes, on y's device.
void check_branch_mask(const char* op, const at::Tensor& mask, const at::Tensor& y);

// residual, if given: y's shape, dtype, device and strides. Returns it or nullptr.
const at::Tensor* check_bn_residual(const char* op, const std::optional<at::Tensor>& residual,
                                    const at::Tensor& y);

// table: contiguous, in y's compute dtype, on y's device; inv::kTableSize values for tabulated
// activations (closed forms take any, usually an empty one).
void check_inverse_table(const char* op, const at::Tensor& table, const at::Tensor& y,
                         const ActCall& call);

// z (the reduce pass's recovered pre-activation), if not empty: y's shape and strides in y's
// compute dtype, on y's device. Returns it or nullptr.
const at::Tensor* check_recovered(const char* op, const at::Tensor& z, const at::Tensor& y);

// The checks both backward ops share: y a dense BN input, grad_out like y, (C,) scale and shift,
// an invertible activation, the mask and the table. Returns the activation call.
ActCall check_output_backward_args(const char* op, const at::Tensor& grad_out,
                                   const at::Tensor& y, const at::Tensor& mask,
                                   const at::Tensor& scale, const at::Tensor& shift,
                                   const at::Tensor& table, c10::string_view name,
                                   c10::ArrayRef<double> params);

// The inverse's floors for outputs stored in `storage` (see cpu/bn_act_output_kernels.h).
struct InverseFloors {
  double floor;
  double log_floor;
};
InverseFloors inverse_floors(const ActCall& call, at::ScalarType storage);

}  // namespace mishkit
