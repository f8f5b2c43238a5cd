// The device-independent kernels of the activation ops: act_forward's autograd and the in-place
// act_forward_'s autograd rule and version counter. (act_backward's autograd, the double
// backward, is Python's: it differentiates the registry's derivative formula.)
//
// act_forward's autograd is C++ because registered from Python (torch.library.register_autograd)
// it ran Python on every call, with or without grad: at 4096 elements ~3 us more per forward
// without grad, ~8 us with, ~16 us per forward+backward, which made small tensors 1.3-3x slower
// than torch's native activations.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace mishkit {
namespace {

using ForwardSignature = at::Tensor(const at::Tensor&, c10::string_view, c10::ArrayRef<double>);
using InplaceSignature = at::Tensor&(at::Tensor&, c10::string_view, c10::ArrayRef<double>);
using BackwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view,
                                     c10::ArrayRef<double>);

c10::OperatorHandle find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}
const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op = find_op("mishkit::act_forward").typed<ForwardSignature>();
  return op;
}
const c10::TypedOperatorHandle<InplaceSignature>& inplace_op() {
  static const auto op = find_op("mishkit::act_forward_").typed<InplaceSignature>();
  return op;
}
const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op = find_op("mishkit::act_backward").typed<BackwardSignature>();
  return op;
}

// y = f(x), saving only x; backward is one act_backward call, grad_out * f'(x).
class ActForward : public torch::autograd::Function<ActForward> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const std::string& name, const std::vector<double>& params) {
    ctx->save_for_backward({x});
    ctx->saved_data["name"] = name;
    ctx->saved_data["params"] = params;
    const at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op().call(x, name, params);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const at::Tensor x = ctx->get_saved_variables()[0];
    const std::string name = ctx->saved_data["name"].toStringRef();
    const std::vector<double> params = ctx->saved_data["params"].toDoubleVector();
    at::Tensor grad_in;
    if (c10::GradMode::is_enabled()) {  // create_graph: act_backward's autograd records it
      grad_in = backward_op().call(grad_outputs[0], x, name, params);
    } else {  // its autograd kernel would only pass the call on
      const at::AutoDispatchBelowADInplaceOrView guard;
      grad_in = backward_op().call(grad_outputs[0], x, name, params);
    }
    return {grad_in, at::Tensor(), at::Tensor()};
  }
};

at::Tensor act_forward_autograd(const at::Tensor& x, c10::string_view name,
                                c10::ArrayRef<double> params) {
  if (c10::GradMode::is_enabled() && x.requires_grad()) {
    return ActForward::apply(x, std::string(name), params.vec());
  }
  const at::AutoDispatchBelowADInplaceOrView guard;  // no graph to record
  return forward_op().call(x, name, params);
}

// Autograd: f'(x) needs the x this op overwrites, and no activation here can recover x from f(x),
// so an in-place call on a tensor autograd tracks is an error (torch raises for in-place ops on
// leaves the same way); otherwise it runs below autograd.
at::Tensor& act_forward_inplace_autograd(at::Tensor& x, c10::string_view name,
                                         c10::ArrayRef<double> params) {
  TORCH_CHECK(!(c10::GradMode::is_enabled() && x.requires_grad()), "mishkit::act_forward_(",
              name, "): x requires grad, and the in-place activation would overwrite the input ",
              "its backward needs; use act_forward, or run under torch.no_grad()");
  const at::AutoDispatchBelowAutograd guard;
  return inplace_op().call(x, name, params);
}

// ADInplaceOrView: bump x's version counter (as every torch in-place op does), so autograd
// refuses a backward through a graph that saved x before this op overwrote it. Bumped first: an
// inference tensor outside InferenceMode raises torch's error before anything is written.
at::Tensor& act_forward_inplace_version(at::Tensor& x, c10::string_view name,
                                        c10::ArrayRef<double> params) {
  x.unsafeGetTensorImpl()->bump_version();
  const at::AutoDispatchBelowADInplaceOrView guard;
  return inplace_op().call(x, name, params);
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
