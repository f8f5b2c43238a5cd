// Torch glue of the fused BatchNorm + activation CUDA kernels: argument checks (checks.h, shared
// with the CPU ops), allocation, device guard, current stream, registration.
// Built only with CUDA (setup.py); the schemas are defined in library.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cuda/bn_act_glue.h"

namespace mishkit {
namespace {

using cuda::channel_vector;
using cuda::check_launch;
using cuda::dtype_of;
using cuda::geometry_of;

// The reductions' per-block partial results (from the caching allocator: no sync, no memset).
at::Tensor workspace_for(const char* op, const at::Tensor& x) {
  int64_t bytes = 0;
  check_launch(op, cuda::bn_act_workspace_bytes(dtype_of(x), geometry_of(x), &bytes));
  return at::empty({bytes / static_cast<int64_t>(sizeof(double))},
                   x.options().dtype(at::kDouble));
}

void check_cuda(const char* op, const at::Tensor& x) {
  check_bn_input(op, x);
  check_cuda_tensor(x, op);
}

std::tuple<at::Tensor, at::Tensor> stats_cuda(const at::Tensor& x) {
  constexpr const char* op = "mishkit::bn_act_stats";
  check_cuda(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor mean = channel_vector(x), var = channel_vector(x);
  at::Tensor workspace = workspace_for(op, x);
  check_launch(op, cuda::launch_bn_act_stats(x.const_data_ptr(), dtype_of(x), geometry_of(x),
                                             mean.data_ptr(), var.data_ptr(),
                                             workspace.data_ptr(),
                                             c10::cuda::getCurrentCUDAStream()));
  return {mean, var};
}

at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                        const at::Tensor& shift, c10::string_view name,
                        c10::ArrayRef<double> params) {
  constexpr const char* op = "mishkit::bn_act_forward";
  check_cuda(op, x);
  check_channel_vectors(op, x, {&mean, &scale, &shift});
  const ActCall call = check_forward_args(op, x, name, params);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  check_launch(op, cuda::launch_bn_act_forward(
                       x.const_data_ptr(), dtype_of(x), geometry_of(x), mean.const_data_ptr(),
                       scale.const_data_ptr(), shift.const_data_ptr(), y.data_ptr(),
                       static_cast<int>(call.id), call.params.data(),
                       c10::cuda::getCurrentCUDAStream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor> backward_reduce_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& scale, const at::Tensor& shift, c10::string_view name,
    c10::ArrayRef<double> params) {
  constexpr const char* op = "mishkit::bn_act_backward_reduce";
  check_cuda(op, x);
  check_bn_grad(op, grad_out, x);
  check_channel_vectors(op, x, {&mean, &scale, &shift});
  const ActCall call = check_forward_args(op, x, name, params);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor sum_dz = channel_vector(x), sum_dz_xmu = channel_vector(x);
  at::Tensor workspace = workspace_for(op, x);
  check_launch(op, cuda::launch_bn_act_backward_reduce(
      grad_out.const_data_ptr(), x.const_data_ptr(), dtype_of(x), geometry_of(x),
      mean.const_data_ptr(), scale.const_data_ptr(), shift.const_data_ptr(), sum_dz.data_ptr(),
      sum_dz_xmu.data_ptr(), workspace.data_ptr(), static_cast<int>(call.id),
      call.params.data(), c10::cuda::getCurrentCUDAStream()));
  return {sum_dz, sum_dz_xmu};
}

at::Tensor backward_elemt_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& mean, const at::Tensor& scale,
                               const at::Tensor& shift, const at::Tensor& coef_xmu,
                               const at::Tensor& coef_const, c10::string_view name,
                               c10::ArrayRef<double> params) {
  constexpr const char* op = "mishkit::bn_act_backward_elemt";
  check_cuda(op, x);
  check_bn_grad(op, grad_out, x);
  check_channel_vectors(op, x, {&mean, &scale, &shift, &coef_xmu, &coef_const});
  const ActCall call = check_forward_args(op, x, name, params);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = at::empty_like(x);
  check_launch(op, cuda::launch_bn_act_backward_elemt(
      grad_out.const_data_ptr(), x.const_data_ptr(), dtype_of(x), geometry_of(x),
      mean.const_data_ptr(), scale.const_data_ptr(), shift.const_data_ptr(),
      coef_xmu.const_data_ptr(), coef_const.const_data_ptr(), grad_x.data_ptr(),
      static_cast<int>(call.id), call.params.data(), c10::cuda::getCurrentCUDAStream()));
  return grad_x;
}

}  // namespace
}  // namespace mishkit

TORCH_LIBRARY_IMPL(mishkit, CUDA, m) {
  m.impl("bn_act_stats", &mishkit::stats_cuda);
  m.impl("bn_act_forward", &mishkit::forward_cuda);
  m.impl("bn_act_backward_reduce", &mishkit::backward_reduce_cuda);
  m.impl("bn_act_backward_elemt", &mishkit::backward_elemt_cuda);
}
