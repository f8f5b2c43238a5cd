// Typed dispatcher handles of the activation ops (schemas in library.cpp), for the C++ that calls
// them through the dispatcher: the autograd kernels (act_autograd.cpp) and the eager entry
// (act_eager.cpp). Looked up once, on first use (the schemas exist by then: the library's static
// registration runs when the module loads).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

namespace mishkit {

using ActForwardSignature = at::Tensor(const at::Tensor&, c10::string_view,
                                       c10::ArrayRef<double>);
using ActInplaceSignature = at::Tensor&(at::Tensor&, c10::string_view, c10::ArrayRef<double>);
using ActBackwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view,
                                        c10::ArrayRef<double>);

inline const c10::TypedOperatorHandle<ActForwardSignature>& act_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mishkit::act_forward", "")
                             .typed<ActForwardSignature>();
  return op;
}

inline const c10::TypedOperatorHandle<ActInplaceSignature>& act_inplace_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mishkit::act_forward_", "")
                             .typed<ActInplaceSignature>();
  return op;
}

inline const c10::TypedOperatorHandle<ActBackwardSignature>& act_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mishkit::act_backward", "")
                             .typed<ActBackwardSignature>();
  return op;
}

}  // namespace mishkit
