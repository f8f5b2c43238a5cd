// The device-independent kernels of the activation ops: act_forward's autograd (reverse and
// forward mode) and the in-place act_forward_'s autograd rule and version counter.
// (act_backward's autograd, the double backward, is Python's: it differentiates the registry's
// derivative formula.)
//
// act_forward's autograd is C++ because registered from Python (torch.library.register_autograd)
// it ran Python on every call, with or without grad: at 4096 elements ~3 us more per forward
// without grad, ~8 us with, ~16 us per forward+backward, which made small tensors 1.3-3x slower
// than torch's native activations.
#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <mutex>
#include <string>

#include "act_op_handles.h"
#include "activations.h"

namespace mishkit {
namespace {

// The graph node of y = f(x): saves only x (its version is checked when backward unpacks it);
// backward is one act_backward call, grad_out * f'(x). A plain Node, as torch's generated ones
// are: torch::autograd::Function's node (its saved_data map of IValues, name and parameters
// copied in and out) cost ~0.8 us more per forward with grad and ~0.5 us more per backward.
class ActBackward : public torch::autograd::Node {
 public:
  ActBackward(const at::Tensor& x, c10::string_view name, c10::ArrayRef<double> params)
      : x_(x, /*is_output=*/false), name_(name), params_(params.begin(), params.end()) {}

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    const std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined() || !task_should_compute_output(0)) {
      return {at::Tensor()};
    }
    const at::Tensor x = x_.unpack();
    if (c10::GradMode::is_enabled()) {  // create_graph: act_backward's autograd records it
      return {act_backward_op().call(grad_out, x, name_, params_)};
    }
    const at::AutoDispatchBelowADInplaceOrView guard;  // its autograd would only pass it on
    return {act_backward_op().call(grad_out, x, name_, params_)};
  }

  std::string name() const override { return "mishkit::ActBackward"; }

  void release_variables() override {
    const std::lock_guard<std::mutex> lock(mutex_);
    x_.reset_data();
  }

 private:
  torch::autograd::SavedVariable x_;
  std::string name_;
  c10::SmallVector<double, act::kMaxParams> params_;
};

// Reverse mode records an ActBackward node; forward mode (a tangent t on x, as
// torch.autograd.forward_ad or torch.func.jvp give) sets y's tangent f'(x) * t, which is
// act_backward(t, x) on x's primal value.
at::Tensor act_forward_autograd(const at::Tensor& x, c10::string_view name,
                                c10::ArrayRef<double> params) {
  at::Tensor y;
  {
    const at::AutoDispatchBelowADInplaceOrView guard;
    y = act_forward_op().call(x, name, params);
  }
  if (c10::GradMode::is_enabled() && x.requires_grad()) {
    auto node = c10::make_intrusive<ActBackward>(x, name, params);
    node->set_next_edges(torch::autograd::collect_next_edges(x));
    torch::autograd::set_history(y, node);
  }
  const at::Tensor& tangent = x._fw_grad(/*level=*/0);
  if (tangent.defined()) {
    y._set_fw_grad(act_backward_op().call(tangent, x._fw_primal(/*level=*/0), name, params),
                   /*level=*/0, /*is_inplace_op=*/false);
  }
  return y;
}

// Autograd: f'(x) needs the x this op overwrites, and no activation here can recover x from f(x),
// so an in-place call on a tensor autograd tracks is an error (torch raises for in-place ops on
// leaves the same way); otherwise it runs below autograd.
at::Tensor& act_forward_inplace_autograd(at::Tensor& x, c10::string_view name,
                                         c10::ArrayRef<double> params) {
  TORCH_CHECK(!(c10::GradMode::is_enabled() && x.requires_grad()), "mishkit::act_forward_(",
              name, "): x requires grad, and the in-place activation would overwrite the input ",
              "its backward needs; use act_forward, or run under torch.no_grad()");
  TORCH_CHECK(!x._fw_grad(/*level=*/0).defined(), "mishkit::act_forward_(", name,
              "): x has a forward-mode tangent, and the in-place activation would overwrite the ",
              "x that f'(x) * tangent needs; use act_forward");
  const at::AutoDispatchBelowAutograd guard;
  return act_inplace_op().call(x, name, params);
}

// ADInplaceOrView: bump x's version counter (as every torch in-place op does), so autograd
// refuses a backward through a graph that saved x before this op overwrote it. Bumped first: an
// inference tensor outside InferenceMode raises torch's error before anything is written.
at::Tensor& act_forward_inplace_version(at::Tensor& x, c10::string_view name,
                                        c10::ArrayRef<double> params) {
  x.unsafeGetTensorImpl()->bump_version();
  const at::AutoDispatchBelowADInplaceOrView guard;
  return act_inplace_op().call(x, name, params);
}

}  // namespace
}  // namespace mishkit

TORCH_LIBRARY_IMPL(mishkit, Autograd, m) {
  m.impl("act_forward", &mishkit::act_forward_autograd);
  m.impl("act_forward_", &mishkit::act_forward_inplace_autograd);
}

TORCH_LIBRARY_IMPL(mishkit, ADInplaceOrView, m) {
  m.impl("act_forward_", &mishkit::act_forward_inplace_version);
}
