// Fused BatchNorm + activation ops: schemas, argument checks and CPU implementations.
//
// The ops are the per-channel building blocks of mishkit/bn_act_ops.py (which holds the autograd
// and the cross-process reduction of SyncBatchNormAct2d); CUDA implementations are registered in
// cuda/bn_act_cuda.cpp. Per-channel vectors are (C,) in the compute dtype.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "activations.h"
#include "cpu/act_kernels.h"
#include "cpu/bn_act_checks.h"
#include "cpu/bn_act_kernels.h"

namespace mishkit {
namespace bn_act {

void check_input(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.defined(), op, ": x is an undefined tensor");
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   op, ": unsupported dtype ", dtype, "; expected float32, float64, float16 ",
                   "or bfloat16");
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": expected an (N, C, ...) tensor, got shape ", x.sizes());
  const bool channels_last = x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK_VALUE(x.is_contiguous() || channels_last, op, ": x must be contiguous or ",
                    "channels_last, got strides ", x.strides(), " for shape ", x.sizes());
}

void check_channel_vectors(const char* op, const at::Tensor& x,
                           std::initializer_list<const at::Tensor*> vectors) {
  const auto compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
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

void check_grad(const char* op, const at::Tensor& grad_out, const at::Tensor& x) {
  TORCH_CHECK_VALUE(grad_out.defined() && grad_out.sizes() == x.sizes() &&
                        grad_out.strides() == x.strides(),
                    op, ": grad_out must have x's shape ", x.sizes(), " and strides ",
                    x.strides());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out has dtype ",
                   grad_out.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK(grad_out.device() == x.device(), op, ": grad_out on ", grad_out.device(),
              " but x on ", x.device());
}

ActCall resolve_activation(const char* op, const at::Tensor& x, c10::string_view name,
                           c10::ArrayRef<double> params) {
  return check_forward_args(op, x, name, params);
}

}  // namespace bn_act

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

at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor channel_vector(const at::Tensor& x) {
  return at::empty({x.size(1)}, x.options().dtype(compute_type(x)));
}

std::tuple<at::Tensor, at::Tensor> stats_cpu(const at::Tensor& x) {
  bn_act::check_input("mishkit::bn_act_stats", x);
  at::Tensor mean = channel_vector(x), var = channel_vector(x);
  cpu::bn_act_kernels().stats(x, mean, var);
  return {mean, var};
}

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                       const at::Tensor& shift, c10::string_view name,
                       c10::ArrayRef<double> params) {
  constexpr const char* op = "mishkit::bn_act_forward";
  bn_act::check_input(op, x);
  bn_act::check_channel_vectors(op, x, {&mean, &scale, &shift});
  const ActCall call = bn_act::resolve_activation(op, x, name, params);
  at::Tensor y = at::empty_like(x);  // keeps x's (dense) layout
  cpu::bn_act_kernels().forward(x, mean, scale, shift, y, call.id, call.params.data());
  return y;
}

std::tuple<at::Tensor, at::Tensor> backward_reduce_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& scale, const at::Tensor& shift, c10::string_view name,
    c10::ArrayRef<double> params) {
  constexpr const char* op = "mishkit::bn_act_backward_reduce";
  bn_act::check_input(op, x);
  bn_act::check_grad(op, grad_out, x);
  bn_act::check_channel_vectors(op, x, {&mean, &scale, &shift});
  const ActCall call = bn_act::resolve_activation(op, x, name, params);
  at::Tensor sum_dz = channel_vector(x), sum_dz_xmu = channel_vector(x);
  cpu::bn_act_kernels().backward_reduce(grad_out, x, mean, scale, shift, sum_dz, sum_dz_xmu,
                                        call.id, call.params.data());
  return {sum_dz, sum_dz_xmu};
}

at::Tensor backward_elemt_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                              const at::Tensor& mean, const at::Tensor& scale,
                              const at::Tensor& shift, const at::Tensor& coef_xmu,
                              const at::Tensor& coef_const, c10::string_view name,
                              c10::ArrayRef<double> params) {
  constexpr const char* op = "mishkit::bn_act_backward_elemt";
  bn_act::check_input(op, x);
  bn_act::check_grad(op, grad_out, x);
  bn_act::check_channel_vectors(op, x, {&mean, &scale, &shift, &coef_xmu, &coef_const});
  const ActCall call = bn_act::resolve_activation(op, x, name, params);
  at::Tensor grad_x = at::empty_like(x);
  cpu::bn_act_kernels().backward_elemt(grad_out, x, mean, scale, shift, coef_xmu, coef_const,
                                       grad_x, call.id, call.params.data());
  return grad_x;
}

}  // namespace
}  // namespace mishkit

TORCH_LIBRARY_FRAGMENT(mishkit, m) {
  m.def("bn_act_stats(Tensor x) -> (Tensor, Tensor)");
  m.def("bn_act_forward(Tensor x, Tensor mean, Tensor scale, Tensor shift, str name, "
        "float[] params) -> Tensor");
  m.def("bn_act_backward_reduce(Tensor grad_out, Tensor x, Tensor mean, Tensor scale, "
        "Tensor shift, str name, float[] params) -> (Tensor, Tensor)");
  m.def("bn_act_backward_elemt(Tensor grad_out, Tensor x, Tensor mean, Tensor scale, "
        "Tensor shift, Tensor coef_xmu, Tensor coef_const, str name, float[] params) -> Tensor");
}

TORCH_LIBRARY_IMPL(mishkit, CPU, m) {
  m.impl("bn_act_stats", &mishkit::stats_cpu);
  m.impl("bn_act_forward", &mishkit::forward_cpu);
  m.impl("bn_act_backward_reduce", &mishkit::backward_reduce_cpu);
  m.impl("bn_act_backward_elemt", &mishkit::backward_elemt_cpu);
}
