// CPU kernels of the fused BatchNorm + activation ops (contract: mishkit/batchnorm/functional.py).
//
// bn_act_kernels_impl.h is compiled once per instruction set, like the activation kernels
// (cpu/act_kernels.h): baseline, AVX2 + FMA and AVX-512; bn_act_kernels() follows the activation
// kernels' active_capability().
//
// Every kernel takes a dense x: NCHW-contiguous, or channels_last (indexed directly, no copies),
// and (C,) per-channel vectors in the compute dtype (float32 for half inputs, float64 for double).
// Outputs are preallocated by the caller (cpu/bn_act_cpu.cpp) with x's layout.
#pragma once

#include <ATen/core/Tensor.h>

#include "activations.h"

namespace mishkit::cpu {

struct BnActKernelTable {
  // mean and biased variance per channel (two passes: mean, then squared deviations)
  void (*stats)(const at::Tensor& x, at::Tensor& mean, at::Tensor& var);
  // y = act((x - mean) * scale + shift)
  void (*forward)(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                  const at::Tensor& shift, at::Tensor& y, act::ActId id, const double* params);
  // sum_dz = sum(dz), sum_dz_xmu = sum(dz * (x - mean)), dz = grad_out * act'(z)
  void (*backward_reduce)(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                          const at::Tensor& scale, const at::Tensor& shift, at::Tensor& sum_dz,
                          at::Tensor& sum_dz_xmu, act::ActId id, const double* params);
  // grad_x = dz * scale + (x - mean) * coef_xmu + coef_const
  void (*backward_elemt)(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                         const at::Tensor& scale, const at::Tensor& shift,
                         const at::Tensor& coef_xmu, const at::Tensor& coef_const,
                         at::Tensor& grad_x, act::ActId id, const double* params);
  // backward_reduce that also stores dz (x's dtype and layout), evaluating act' once per
  // backward: backward_elemt then runs on dz with the identity activation
  void (*backward_reduce_dz)(const at::Tensor& grad_out, const at::Tensor& x,
                             const at::Tensor& mean, const at::Tensor& scale,
                             const at::Tensor& shift, at::Tensor& sum_dz, at::Tensor& sum_dz_xmu,
                             at::Tensor& dz, act::ActId id, const double* params);
};

namespace DEFAULT {
const BnActKernelTable& bn_act_kernel_table();
}
namespace AVX2 {
const BnActKernelTable& bn_act_kernel_table();
}
namespace AVX512 {
const BnActKernelTable& bn_act_kernel_table();
}

// The table of the activation kernels' current capability (cpu::active_capability()).
const BnActKernelTable& bn_act_kernels();

}  // namespace mishkit::cpu
