// Definitions of the argument checks declared in checks.h.
#include "checks.h"

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>
#include <string>

#include "inverse.h"

namespace mishkit {
namespace {

std::string join_names() {
  std::string out;
  for (const char* name : act::kActivationNames) {
    if (!out.empty()) out += ", ";
    out += name;
  }
  return out;
}

// Name of parameter `index` of activation `id` (kParams "beta, threshold", 1 -> "threshold").
std::string param_name(act::ActId id, size_t index) {
  const std::string names = act::kActivationParamNames[static_cast<int>(id)];
  size_t begin = 0;
  for (size_t k = 0; k < index && begin != std::string::npos; ++k) {
    begin = names.find(", ", begin);
    if (begin != std::string::npos) begin += 2;
  }
  if (begin == std::string::npos) return "";
  return names.substr(begin, names.find(',', begin) - begin);
}

}  // namespace

ActCall check_forward_args(const char* op, const at::Tensor& x, c10::string_view name,
                           c10::ArrayRef<double> params) {
  const int index = act::find_activation(name.data(), static_cast<int64_t>(name.size()));
  TORCH_CHECK_VALUE(index >= 0, op, ": unknown activation '", name,
                    "' (canonical names only); valid names: ", join_names());
  check_float_tensor(x, "x", op, "(", name, ")");
  const int expected = act::kActivationNumParams[index];
  const std::string param_names = act::kActivationParamNames[index];
  TORCH_CHECK_VALUE(static_cast<int>(params.size()) == expected, op, "(", name, "): expected ",
                    expected, " parameter(s)", param_names.empty() ? "" : " [",
                    param_names, param_names.empty() ? "" : "]", ", got ", params.size());
  ActCall call{static_cast<act::ActId>(index), {}};
  for (size_t i = 0; i < params.size(); ++i) {
    if (!std::isfinite(params[i])) {
      // A threshold of +-inf switches a cut-off off / on everywhere (torch's softplus accepts
      // it); every other parameter must be finite.
      const std::string what = param_name(call.id, i);
      const bool threshold = what == "threshold";
      TORCH_CHECK_VALUE(threshold && std::isinf(params[i]), op, "(", name, "): parameter ", i,
                        " (", what, ") must be finite", threshold ? " or +-inf" : "", ", got ",
                        params[i]);
    }
    call.params[i] = params[i];
  }
  return call;
}

ActCall check_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                            c10::string_view name, c10::ArrayRef<double> params) {
  ActCall call = check_forward_args(op, x, name, params);
  check_float_tensor(grad_out, "grad_out", op, "(", name, ")");
  TORCH_CHECK(grad_out.device() == x.device(), op, "(", name, "): grad_out is on ",
              grad_out.device(), " but x is on ", x.device(), "; both must be on one device");
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), op, "(", name, "): grad_out has shape ",
                    grad_out.sizes(), " but x has shape ", x.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), op, "(", name,
                   "): grad_out has dtype ", grad_out.scalar_type(), " but x has dtype ",
                   x.scalar_type(), "; they must match");
  return call;
}

bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

void check_bn_input(const char* op, const at::Tensor& x) {
  check_float_tensor(x, "x", op);
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": expected an (N, C, ...) tensor, got shape ", x.sizes());
  const bool channels_last =
      (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
      (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  TORCH_CHECK_VALUE(x.is_contiguous() || channels_last, op, ": x must be contiguous, ",
                    "channels_last (4-D) or channels_last_3d (5-D), got strides ", x.strides(),
                    " for shape ", x.sizes());
}

void check_channel_vectors(const char* op, const at::Tensor& x,
                           std::initializer_list<const at::Tensor*> vectors) {
  const auto compute = compute_type(x);
  for (const at::Tensor* v : vectors) {
    TORCH_CHECK_VALUE(v->defined() && v->dim() == 1 && v->size(0) == x.size(1) &&
                          v->is_contiguous(),
                      op, ": per-channel vectors must be contiguous of shape (", x.size(1),
                      ",), got ", v->defined() ? v->sizes() : c10::IntArrayRef{});
    TORCH_CHECK_TYPE(v->scalar_type() == compute, op, ": per-channel vectors must be ", compute,
                     " for ", x.scalar_type(), " input, got ", v->scalar_type());
    TORCH_CHECK(v->device() == x.device(), op, ": per-channel vector on ", v->device(),
                " but x on ", x.device());
  }
}

void check_bn_grad(const char* op, const at::Tensor& grad_out, const at::Tensor& x) {
  TORCH_CHECK_VALUE(grad_out.defined() && same_layout(grad_out, x), op,
                    ": grad_out must have x's shape ", x.sizes(), " and strides ", x.strides(),
                    " (on the dims of size > 1), got shape ",
                    grad_out.defined() ? grad_out.sizes() : c10::IntArrayRef{}, " and strides ",
                    grad_out.defined() ? grad_out.strides() : c10::IntArrayRef{});
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out has dtype ",
                   grad_out.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK(grad_out.device() == x.device(), op, ": grad_out on ", grad_out.device(),
              " but x on ", x.device());
}

}  // namespace mishkit

// Output-saving BatchNorm + activation ops ----------------------------------------------------

namespace mishkit {

ActCall check_output_activation(const char* op, const at::Tensor& x, c10::string_view name,
                                c10::ArrayRef<double> params) {
  ActCall call = check_forward_args(op, x, name, params);
  const char* reason = inv::non_invertible_reason(call.id, call.params.data());
  TORCH_CHECK_VALUE(reason == nullptr, op, ": activation '", name, "' cannot be inverted (",
                    reason ? reason : "", "); saves='output' needs an invertible activation, ",
                    "use saves='input'");
  return call;
}

void check_branch_mask(const char* op, const at::Tensor& mask, const at::Tensor& y) {
  const int64_t bytes = (y.numel() + 7) / 8;
  TORCH_CHECK_VALUE(mask.defined() && mask.scalar_type() == at::kByte && mask.dim() == 1 &&
                        mask.size(0) == bytes && mask.is_contiguous(),
                    op, ": mask must be a contiguous uint8 tensor of ", bytes,
                    " bytes (one bit per element of y), got ",
                    mask.defined() ? mask.sizes() : c10::IntArrayRef{}, " ",
                    mask.defined() ? mask.scalar_type() : at::kByte);
  TORCH_CHECK(mask.device() == y.device(), op, ": mask on ", mask.device(), " but y on ",
              y.device());
}

const at::Tensor* check_bn_residual(const char* op, const std::optional<at::Tensor>& residual,
                                    const at::Tensor& y) {
  if (!residual.has_value() || !residual->defined()) return nullptr;
  const at::Tensor& r = *residual;
  TORCH_CHECK_VALUE(same_layout(r, y), op, ": residual must have the shape and strides of y ",
                    "(size-1 dims aside; ", y.sizes(), ", ", y.strides(), "), got ", r.sizes(),
                    ", ", r.strides());
  TORCH_CHECK_TYPE(r.scalar_type() == y.scalar_type(), op, ": residual has dtype ",
                   r.scalar_type(), " but y has ", y.scalar_type());
  TORCH_CHECK(r.device() == y.device(), op, ": residual on ", r.device(), " but y on ",
              y.device());
  return &r;
}

void check_inverse_table(const char* op, const at::Tensor& table, const at::Tensor& y,
                         const ActCall& call) {
  TORCH_CHECK_TYPE(table.defined() && table.scalar_type() == compute_type(y), op,
                   ": the inverse table must be ", compute_type(y), " for ", y.scalar_type(),
                   " outputs");
  TORCH_CHECK(table.device() == y.device() && table.is_contiguous(), op,
              ": the inverse table must be contiguous on ", y.device());
  if (inv::is_tabulated(call.id)) {
    TORCH_CHECK_VALUE(table.numel() == inv::kTableSize, op, ": the inverse table of '",
                      act::kActivationNames[static_cast<int>(call.id)], "' must hold ",
                      inv::kTableSize, " values (mishkit.backends.inversion.inverse_table), got ",
                      table.numel());
  }
}

const at::Tensor* check_recovered(const char* op, const at::Tensor& z, const at::Tensor& y) {
  if (!z.defined() || z.numel() == 0) return nullptr;
  TORCH_CHECK_VALUE(same_layout(z, y), op, ": z must have the shape and strides of y ",
                    "(size-1 dims aside; ", y.sizes(), ", ", y.strides(), "), got ", z.sizes(),
                    ", ", z.strides());
  TORCH_CHECK_TYPE(z.scalar_type() == compute_type(y), op, ": z must be ", compute_type(y),
                   " for ", y.scalar_type(), " outputs, got ", z.scalar_type());
  TORCH_CHECK(z.device() == y.device(), op, ": z on ", z.device(), " but y on ", y.device());
  return &z;
}

ActCall check_output_backward_args(const char* op, const at::Tensor& grad_out,
                                   const at::Tensor& y, const at::Tensor& mask,
                                   const at::Tensor& scale, const at::Tensor& shift,
                                   const at::Tensor& table, c10::string_view name,
                                   c10::ArrayRef<double> params) {
  check_bn_input(op, y);
  check_bn_grad(op, grad_out, y);
  check_channel_vectors(op, y, {&scale, &shift});
  const ActCall call = check_output_activation(op, y, name, params);
  check_branch_mask(op, mask, y);
  check_inverse_table(op, table, y, call);
  return call;
}

InverseFloors inverse_floors(const ActCall& call, at::ScalarType storage) {
  double eps = 0, smallest = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, storage, "inverse_floors", [&] {
    eps = static_cast<double>(std::numeric_limits<scalar_t>::epsilon());
    smallest = static_cast<double>(std::numeric_limits<scalar_t>::denorm_min());
  });
  const double log_floor = std::log(smallest) - std::log(2.0);
  double floor = -INFINITY;
  switch (call.id) {
    case act::ActId::elu:
    case act::ActId::selu:
      floor = std::log(eps / 4);  // expm1(z) rounds to -1 below this
      break;
    case act::ActId::softplus:
      floor = (std::log(call.params[0] * smallest) - std::log(2.0)) / call.params[0];
      break;
    default:
      break;
  }
  return {floor, log_floor};
}

}  // namespace mishkit
