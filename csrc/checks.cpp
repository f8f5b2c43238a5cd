// Definitions of the argument checks declared in checks.h.
#include "checks.h"

#include <cmath>
#include <string>

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
