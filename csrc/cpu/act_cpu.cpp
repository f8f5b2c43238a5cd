// CPU implementations of the activation ops (schemas in library.cpp): checks, then one
// TensorIterator loop from the ISA build chosen at run time (cpu/act_dispatch.cpp).
#include <ATen/native/TensorIterator.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/act_kernels.h"

namespace mishkit {
namespace {

at::Tensor act_forward_cpu(const at::Tensor& x, c10::string_view name,
                           c10::ArrayRef<double> params) {
  const ActCall call = check_forward_args("mishkit::act_forward", x, name, params);
  at::Tensor out;  // allocated by the iterator with x's memory layout
  auto iter = at::TensorIteratorConfig().add_output(out).add_const_input(x).build();
  cpu::active_kernels().forward[static_cast<int>(call.id)](iter, call.params.data());
  return iter.output();
}

at::Tensor& act_forward_inplace_cpu(at::Tensor& x, c10::string_view name,
                                    c10::ArrayRef<double> params) {
  const ActCall call = check_forward_args("mishkit::act_forward_", x, name, params);
  auto iter = at::TensorIteratorConfig()
                  .add_output(x)
                  .add_const_input(x)
                  .resize_outputs(false)
                  .build();  // rejects inputs whose elements overlap in memory
  cpu::active_kernels().forward[static_cast<int>(call.id)](iter, call.params.data());
  return x;
}

at::Tensor act_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                            c10::string_view name, c10::ArrayRef<double> params) {
  const ActCall call = check_backward_args("mishkit::act_backward", grad_out, x, name, params);
  at::Tensor grad_in;
  auto iter = at::TensorIteratorConfig()
                  .add_output(grad_in)
                  .add_const_input(x)  // first input: the output follows x's layout
                  .add_const_input(grad_out)
                  .build();
  cpu::active_kernels().backward[static_cast<int>(call.id)](iter, call.params.data());
  return iter.output();
}

}  // namespace
}  // namespace mishkit

TORCH_LIBRARY_IMPL(mishkit, CPU, m) {
  m.impl("act_forward", &mishkit::act_forward_cpu);
  m.impl("act_forward_", &mishkit::act_forward_inplace_cpu);
  m.impl("act_backward", &mishkit::act_backward_cpu);
}
