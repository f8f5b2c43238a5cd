// Torch glue of the output-saving BatchNorm + activation CUDA kernels: argument checks (checks.h,
// shared with the CPU ops), allocation, device guard, current stream, registration.
// Built only with CUDA (setup.py); the schemas are defined in library.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "cuda/bn_act_glue.h"
#include "cuda/bn_act_output_launch.h"

namespace mishkit {
namespace {

using cuda::channel_vector;
using cuda::check_launch;
using cuda::dtype_of;
using cuda::geometry_of;

const void* data_or_null(const at::Tensor* t) { return t ? t->const_data_ptr() : nullptr; }

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& x, const at::Tensor& mean,
                                                const at::Tensor& scale, const at::Tensor& shift,
                                                const std::optional<at::Tensor>& residual,
                                                double branch, c10::string_view name,
                                                c10::ArrayRef<double> params) {
  constexpr const char* op = "mishkit::bn_act_output_forward";
  check_bn_input(op, x);
  check_cuda_tensor(x, op);
  check_channel_vectors(op, x, {&mean, &scale, &shift});
  const ActCall call = check_output_activation(op, x, name, params);
  const at::Tensor* r = check_bn_residual(op, residual, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  at::Tensor mask = at::empty({(x.numel() + 7) / 8}, x.options().dtype(at::kByte));
  check_launch(op, cuda::launch_bn_act_output_forward(
                       x.const_data_ptr(), data_or_null(r), dtype_of(x), geometry_of(x),
                       mean.const_data_ptr(), scale.const_data_ptr(), shift.const_data_ptr(),
                       branch, y.data_ptr(), mask.data_ptr<uint8_t>(), static_cast<int>(call.id),
                       call.params.data(), c10::cuda::getCurrentCUDAStream()));
  return {y, mask};
}

// The shared backward checks, on a CUDA y.
ActCall check_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& y,
                       const at::Tensor& mask, const at::Tensor& scale, const at::Tensor& shift,
                       const at::Tensor& table, c10::string_view name,
                       c10::ArrayRef<double> params) {
  check_cuda_tensor(y, op);
  return check_output_backward_args(op, grad_out, y, mask, scale, shift, table, name, params);
}

cuda::InverseArgs inverse_args(const ActCall& call, const at::Tensor& y, const at::Tensor& table) {
  const InverseFloors floors = inverse_floors(call, y.scalar_type());
  return {table.numel() > 0 ? table.const_data_ptr() : nullptr, floors.floor, floors.log_floor};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_reduce_cuda(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& mask,
    const at::Tensor& scale, const at::Tensor& shift, const std::optional<at::Tensor>& residual,
    const at::Tensor& table, c10::string_view name, c10::ArrayRef<double> params) {
  constexpr const char* op = "mishkit::bn_act_output_backward_reduce";
  const ActCall call = check_backward(op, grad_out, y, mask, scale, shift, table, name, params);
  const at::Tensor* r = check_bn_residual(op, residual, y);
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor sum_dz = channel_vector(y), sum_dz_xmu = channel_vector(y);
  at::Tensor workspace = at::zeros({2 * y.size(1)}, y.options().dtype(at::kDouble));
  const at::Tensor inv_scale = at::reciprocal(scale);
  check_launch(op, cuda::launch_bn_act_output_backward_reduce(
      grad_out.const_data_ptr(), y.const_data_ptr(), mask.const_data_ptr<uint8_t>(),
      data_or_null(r), dtype_of(y), geometry_of(y), inv_scale.const_data_ptr(),
      shift.const_data_ptr(), inverse_args(call, y, table), sum_dz.data_ptr(),
      sum_dz_xmu.data_ptr(), workspace.data_ptr<double>(), static_cast<int>(call.id),
      call.params.data(), c10::cuda::getCurrentCUDAStream()));
  // no z for backward_elemt: recovering it again costs less than its memory traffic on a GPU
  return {sum_dz, sum_dz_xmu, at::empty({0}, y.options().dtype(compute_type(y)))};
}

std::tuple<at::Tensor, at::Tensor> backward_elemt_cuda(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& mask, const at::Tensor& z,
    const at::Tensor& scale, const at::Tensor& shift, const std::optional<at::Tensor>& residual,
    const at::Tensor& coef_xmu, const at::Tensor& coef_const, const at::Tensor& table,
    c10::string_view name, c10::ArrayRef<double> params) {
  constexpr const char* op = "mishkit::bn_act_output_backward_elemt";
  const ActCall call = check_backward(op, grad_out, y, mask, scale, shift, table, name, params);
  check_channel_vectors(op, y, {&coef_xmu, &coef_const});
  const at::Tensor* r = check_bn_residual(op, residual, y);
  const at::Tensor* recovered = check_recovered(op, z, y);
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor grad_x = at::empty_like(y);
  at::Tensor grad_residual = r ? at::empty_like(y) : at::empty({0}, y.options());
  const at::Tensor inv_scale = at::reciprocal(scale);
  check_launch(op, cuda::launch_bn_act_output_backward_elemt(
      grad_out.const_data_ptr(), y.const_data_ptr(), mask.const_data_ptr<uint8_t>(),
      data_or_null(recovered), data_or_null(r), dtype_of(y), geometry_of(y),
      scale.const_data_ptr(), inv_scale.const_data_ptr(), shift.const_data_ptr(),
      coef_xmu.const_data_ptr(),
      coef_const.const_data_ptr(), inverse_args(call, y, table), grad_x.data_ptr(),
      r ? grad_residual.data_ptr() : nullptr, static_cast<int>(call.id), call.params.data(),
      c10::cuda::getCurrentCUDAStream()));
  return {grad_x, grad_residual};
}

}  // namespace
}  // namespace mishkit

TORCH_LIBRARY_IMPL(mishkit, CUDA, m) {
  m.impl("bn_act_output_forward", &mishkit::forward_cuda);
  m.impl("bn_act_output_backward_reduce", &mishkit::backward_reduce_cuda);
  m.impl("bn_act_output_backward_elemt", &mishkit::backward_elemt_cuda);
}
