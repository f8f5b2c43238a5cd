// C entry points (for ctypes) to the CUDA launchers compiled for CPU emulation; see
// cuda_emulation.h. Every function returns the launcher's cudaError_t as an int.
#include <cstdint>

#include "cuda/act_launch.h"
#include "cuda/bn_act_launch.h"
#include "cuda/bn_act_output_launch.h"

using mishkit::cuda::BnDType;
using mishkit::cuda::BnGeometry;
using mishkit::cuda::DType;

namespace {
BnGeometry geometry(int64_t n, int64_t c, int64_t s, int channels_last) {
  return {n, c, s, channels_last != 0};
}
}  // namespace

extern "C" {

int emu_act_forward(int act, int dtype, const void* x, void* y, int64_t n, const double* params) {
  return mishkit::cuda::launch_act_forward(static_cast<mishkit::act::ActId>(act),
                                           static_cast<DType>(dtype), x, y, n, params, nullptr);
}

int emu_act_backward(int act, int dtype, const void* grad_out, const void* x, void* grad_in,
                     int64_t n, const double* params) {
  return mishkit::cuda::launch_act_backward(static_cast<mishkit::act::ActId>(act),
                                            static_cast<DType>(dtype), grad_out, x, grad_in, n,
                                            params, nullptr);
}

int emu_bn_workspace_bytes(int dtype, int64_t n, int64_t c, int64_t s, int channels_last,
                           int64_t* bytes) {
  return mishkit::cuda::bn_act_workspace_bytes(static_cast<BnDType>(dtype),
                                               geometry(n, c, s, channels_last), bytes);
}

int emu_bn_stats(const void* x, int dtype, int64_t n, int64_t c, int64_t s, int channels_last,
                 void* mean, void* var, void* workspace) {
  return mishkit::cuda::launch_bn_act_stats(x, static_cast<BnDType>(dtype),
                                            geometry(n, c, s, channels_last), mean, var,
                                            workspace, nullptr);
}

int emu_bn_forward(const void* x, int dtype, int64_t n, int64_t c, int64_t s, int channels_last,
                   const void* mean, const void* scale, const void* shift, void* y, int act,
                   const double* params) {
  return mishkit::cuda::launch_bn_act_forward(x, static_cast<BnDType>(dtype),
                                              geometry(n, c, s, channels_last), mean, scale,
                                              shift, y, act, params, nullptr);
}

int emu_bn_backward_reduce(const void* grad_out, const void* x, int dtype, int64_t n, int64_t c,
                           int64_t s, int channels_last, const void* mean, const void* scale,
                           const void* shift, void* sum_dz, void* sum_dz_xmu, void* workspace,
                           int act, const double* params) {
  return mishkit::cuda::launch_bn_act_backward_reduce(
      grad_out, x, static_cast<BnDType>(dtype), geometry(n, c, s, channels_last), mean, scale,
      shift, sum_dz, sum_dz_xmu, workspace, act, params, nullptr);
}

int emu_bn_backward_elemt(const void* grad_out, const void* x, int dtype, int64_t n, int64_t c,
                          int64_t s, int channels_last, const void* mean, const void* scale,
                          const void* shift, const void* coef_xmu, const void* coef_const,
                          void* grad_x, int act, const double* params) {
  return mishkit::cuda::launch_bn_act_backward_elemt(
      grad_out, x, static_cast<BnDType>(dtype), geometry(n, c, s, channels_last), mean, scale,
      shift, coef_xmu, coef_const, grad_x, act, params, nullptr);
}

int emu_bn_output_forward(const void* x, const void* residual, int dtype, int64_t n, int64_t c,
                          int64_t s, int channels_last, const void* mean, const void* scale,
                          const void* shift, double branch, void* y, uint8_t* mask, int act,
                          const double* params) {
  return mishkit::cuda::launch_bn_act_output_forward(
      x, residual, static_cast<BnDType>(dtype), geometry(n, c, s, channels_last), mean, scale,
      shift, branch, y, mask, act, params, nullptr);
}

int emu_bn_output_backward_reduce(const void* grad_out, const void* y, const uint8_t* mask,
                                  const void* residual, int dtype, int64_t n, int64_t c,
                                  int64_t s, int channels_last, const void* inv_scale,
                                  const void* shift, const void* table, double floor,
                                  double log_floor, void* sum_dz, void* sum_dz_xmu,
                                  double* workspace, int act, const double* params) {
  return mishkit::cuda::launch_bn_act_output_backward_reduce(
      grad_out, y, mask, residual, static_cast<BnDType>(dtype), geometry(n, c, s, channels_last),
      inv_scale, shift, {table, floor, log_floor}, sum_dz, sum_dz_xmu, workspace, act, params,
      nullptr);
}

int emu_bn_output_backward_elemt(const void* grad_out, const void* y, const uint8_t* mask,
                                 const void* residual, int dtype, int64_t n, int64_t c,
                                 int64_t s, int channels_last, const void* scale,
                                 const void* inv_scale, const void* shift, const void* coef_xmu,
                                 const void* coef_const, const void* table, double floor,
                                 double log_floor, void* grad_x, void* grad_residual, int act,
                                 const double* params) {
  return mishkit::cuda::launch_bn_act_output_backward_elemt(
      grad_out, y, mask, nullptr, residual, static_cast<BnDType>(dtype),
      geometry(n, c, s, channels_last), scale, inv_scale, shift, coef_xmu, coef_const,
      {table, floor, log_floor}, grad_x, grad_residual, act, params, nullptr);
}

}  // extern "C"
