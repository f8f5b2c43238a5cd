// CPU implementations of the fused BatchNorm + activation ops (schemas in library.cpp): checks,
// output allocation in x's layout, and the loops of the ISA build the activation kernels use.
// The autograd and the cross-process reduction of SyncBatchNormAct2d are in mishkit/batchnorm/.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cpu/act_kernels.h"
#include "cpu/bn_act_kernels.h"

namespace mishkit {
namespace cpu {

const BnActKernelTable& bn_act_kernels() {
  // Indexed by Capability: act_dispatch.cpp alone decides which build runs.
  using TableFn = const BnActKernelTable& (*)();
  static constexpr TableFn kTables[kNumCapabilities] = {
      &DEFAULT::bn_act_kernel_table, &AVX2::bn_act_kernel_table, &AVX512::bn_act_kernel_table};
  return kTables[static_cast<int>(active_capability())]();
}

}  // namespace cpu

namespace {

at::Tensor channel_vector(const at::Tensor& x) {
  return at::empty({x.size(1)}, x.options().dtype(compute_type(x)));
}

std::tuple<at::Tensor, at::Tensor> stats_cpu(const at::Tensor& x) {
  check_bn_input("mishkit::bn_act_stats", x);
  at::Tensor mean = channel_vector(x), var = channel_vector(x);
  cpu::bn_act_kernels().stats(x, mean, var);
  return {mean, var};
}

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                       const at::Tensor& shift, c10::string_view name,
                       c10::ArrayRef<double> params) {
  constexpr const char* op = "mishkit::bn_act_forward";
  check_bn_input(op, x);
  check_channel_vectors(op, x, {&mean, &scale, &shift});
  const ActCall call = check_forward_args(op, x, name, params);
  at::Tensor y = at::empty_like(x);  // keeps x's (dense) layout
  cpu::bn_act_kernels().forward(x, mean, scale, shift, y, call.id, call.params.data());
  return y;
}

// The arguments of both reduce passes (with and without storing dz).
ActCall check_reduce_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                          const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
                          c10::string_view name, c10::ArrayRef<double> params) {
  check_bn_input(op, x);
  check_bn_grad(op, grad_out, x);
  check_channel_vectors(op, x, {&mean, &scale, &shift});
  return check_forward_args(op, x, name, params);
}

std::tuple<at::Tensor, at::Tensor> backward_reduce_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& scale, const at::Tensor& shift, c10::string_view name,
    c10::ArrayRef<double> params) {
  const ActCall call = check_reduce_args("mishkit::bn_act_backward_reduce", grad_out, x, mean,
                                         scale, shift, name, params);
  at::Tensor sum_dz = channel_vector(x), sum_dz_xmu = channel_vector(x);
  cpu::bn_act_kernels().backward_reduce(grad_out, x, mean, scale, shift, sum_dz, sum_dz_xmu,
                                        call.id, call.params.data());
  return {sum_dz, sum_dz_xmu};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_reduce_dz_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& scale, const at::Tensor& shift, c10::string_view name,
    c10::ArrayRef<double> params) {
  const ActCall call = check_reduce_args("mishkit::bn_act_backward_reduce_dz", grad_out, x, mean,
                                         scale, shift, name, params);
  at::Tensor sum_dz = channel_vector(x), sum_dz_xmu = channel_vector(x);
  at::Tensor dz = at::empty_like(x);
  cpu::bn_act_kernels().backward_reduce_dz(grad_out, x, mean, scale, shift, sum_dz, sum_dz_xmu,
                                           dz, call.id, call.params.data());
  return {sum_dz, sum_dz_xmu, dz};
}

at::Tensor backward_elemt_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                              const at::Tensor& mean, const at::Tensor& scale,
                              const at::Tensor& shift, const at::Tensor& coef_xmu,
                              const at::Tensor& coef_const, c10::string_view name,
                              c10::ArrayRef<double> params) {
  constexpr const char* op = "mishkit::bn_act_backward_elemt";
  check_bn_input(op, x);
  check_bn_grad(op, grad_out, x);
  check_channel_vectors(op, x, {&mean, &scale, &shift, &coef_xmu, &coef_const});
  const ActCall call = check_forward_args(op, x, name, params);
  at::Tensor grad_x = at::empty_like(x);
  cpu::bn_act_kernels().backward_elemt(grad_out, x, mean, scale, shift, coef_xmu, coef_const,
                                       grad_x, call.id, call.params.data());
  return grad_x;
}

}  // namespace
}  // namespace mishkit

TORCH_LIBRARY_IMPL(mishkit, CPU, m) {
  m.impl("bn_act_stats", &mishkit::stats_cpu);
  m.impl("bn_act_forward", &mishkit::forward_cpu);
  m.impl("bn_act_backward_reduce", &mishkit::backward_reduce_cpu);
  m.impl("bn_act_backward_elemt", &mishkit::backward_elemt_cpu);
  m.impl("bn_act_backward_reduce_dz", &mishkit::backward_reduce_dz_cpu);
}
