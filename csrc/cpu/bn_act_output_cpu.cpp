// CPU implementations of the output-saving BatchNorm + activation ops (schemas in library.cpp):
// checks, output allocation in y's layout, and the loops of the ISA build the activation kernels
// use. The autograd is mishkit/batchnorm/output.py; the inverse tables come from
// mishkit/backends/inversion.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/reciprocal.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "cpu/act_kernels.h"
#include "cpu/bn_act_output_kernels.h"

namespace mishkit {
namespace cpu {

const BnActOutputKernelTable& bn_act_output_kernels() {
  // Indexed by Capability: act_dispatch.cpp alone decides which build runs.
  using TableFn = const BnActOutputKernelTable& (*)();
  static constexpr TableFn kTables[kNumCapabilities] = {&DEFAULT::bn_act_output_kernel_table,
                                                        &AVX2::bn_act_output_kernel_table,
                                                        &AVX512::bn_act_output_kernel_table};
  return kTables[static_cast<int>(active_capability())]();
}

}  // namespace cpu

namespace {

at::Tensor channel_vector(const at::Tensor& x) {
  return at::empty({x.size(1)}, x.options().dtype(compute_type(x)));
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x, const at::Tensor& mean,
                                               const at::Tensor& scale, const at::Tensor& shift,
                                               const std::optional<at::Tensor>& residual,
                                               double branch, c10::string_view name,
                                               c10::ArrayRef<double> params) {
  constexpr const char* op = "mishkit::bn_act_output_forward";
  check_bn_input(op, x);
  check_channel_vectors(op, x, {&mean, &scale, &shift});
  const ActCall call = check_output_activation(op, x, name, params);
  const at::Tensor* r = check_bn_residual(op, residual, x);
  at::Tensor y = at::empty_like(x);  // keeps x's (dense) layout
  at::Tensor mask = at::empty({(x.numel() + 7) / 8}, x.options().dtype(at::kByte));
  cpu::bn_act_output_kernels().forward(x, mean, scale, shift, r, branch, y, mask, call.id,
                                       call.params.data());
  return {y, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_reduce_cpu(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& mask,
    const at::Tensor& scale, const at::Tensor& shift, const std::optional<at::Tensor>& residual,
    const at::Tensor& table, c10::string_view name, c10::ArrayRef<double> params) {
  constexpr const char* op = "mishkit::bn_act_output_backward_reduce";
  const ActCall call =
      check_output_backward_args(op, grad_out, y, mask, scale, shift, table, name, params);
  const at::Tensor* r = check_bn_residual(op, residual, y);
  const InverseFloors floors = inverse_floors(call, y.scalar_type());
  const cpu::InverseCall inverse{call.id, call.params.data(), floors.floor, floors.log_floor};
  at::Tensor sum_dz = channel_vector(y), sum_dz_xmu = channel_vector(y);
  // the recovered z, kept for the elementwise pass: on a CPU one inversion costs more than
  // writing and reading it back
  at::Tensor z = at::empty_like(y, y.options().dtype(compute_type(y)));
  cpu::bn_act_output_kernels().backward_reduce(grad_out, y, mask, scale, at::reciprocal(scale),
                                               shift, r, table, inverse, sum_dz, sum_dz_xmu, &z);
  return {sum_dz, sum_dz_xmu, z};
}

std::tuple<at::Tensor, at::Tensor> backward_elemt_cpu(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& mask, const at::Tensor& z,
    const at::Tensor& scale, const at::Tensor& shift, const std::optional<at::Tensor>& residual,
    const at::Tensor& coef_xmu, const at::Tensor& coef_const, const at::Tensor& table,
    c10::string_view name, c10::ArrayRef<double> params) {
  constexpr const char* op = "mishkit::bn_act_output_backward_elemt";
  const ActCall call =
      check_output_backward_args(op, grad_out, y, mask, scale, shift, table, name, params);
  check_channel_vectors(op, y, {&coef_xmu, &coef_const});
  const at::Tensor* r = check_bn_residual(op, residual, y);
  const at::Tensor* recovered = check_recovered(op, z, y);
  const InverseFloors floors = inverse_floors(call, y.scalar_type());
  const cpu::InverseCall inverse{call.id, call.params.data(), floors.floor, floors.log_floor};
  at::Tensor grad_x = at::empty_like(y);
  at::Tensor grad_residual = r ? at::empty_like(y) : at::empty({0}, y.options());
  cpu::bn_act_output_kernels().backward_elemt(grad_out, y, mask, recovered, scale,
                                              at::reciprocal(scale), shift, r, coef_xmu,
                                              coef_const, table, inverse, grad_x,
                                              r ? &grad_residual : nullptr);
  return {grad_x, grad_residual};
}

}  // namespace
}  // namespace mishkit

TORCH_LIBRARY_IMPL(mishkit, CPU, m) {
  m.impl("bn_act_output_forward", &mishkit::forward_cpu);
  m.impl("bn_act_output_backward_reduce", &mishkit::backward_reduce_cpu);
  m.impl("bn_act_output_backward_elemt", &mishkit::backward_elemt_cpu);
}
