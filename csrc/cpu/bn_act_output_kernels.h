// CPU kernels of the output-saving BatchNorm + activation ops (contract:
// mishkit/batchnorm/output.py).
//
// bn_act_output_kernels_impl.h is compiled once per instruction set, like the other kernels:
// baseline, AVX2 + FMA and AVX-512; bn_act_output_kernels() follows active_capability().
//
// Tensors are dense (NCHW-contiguous or channels_last) and share one layout; per-channel vectors
// are (C,) in the compute dtype; `mask` holds ceil(numel / 8) bytes, bit k of byte i being
// element 8 i + k of the flat storage. Outputs are preallocated by cpu/bn_act_output_cpu.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include "activations.h"

namespace mishkit::cpu {

// What one backward call needs besides tensors: the validated activation and its inverse's
// floors (see mishkit/backends/inversion.py saturation_floors).
struct InverseCall {
  act::ActId id;
  const double* params;
  double floor;
  double log_floor;
};

struct BnActOutputKernelTable {
  // y = act(z), z = (x - mean) * scale + shift (+ residual); mask bit = z < branch
  void (*forward)(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                  const at::Tensor& shift, const at::Tensor* residual, double branch,
                  at::Tensor& y, at::Tensor& mask, act::ActId id, const double* params);
  // z recovered from (y, mask), and kept in `z` (compute dtype, y's layout) if given;
  // dz = grad_out * act'(z), xmu = (z - shift (- residual)) * inv_scale (inv_scale = 1 / scale):
  // sum_dz = sum(dz), sum_dz_xmu = sum(dz * xmu)
  void (*backward_reduce)(const at::Tensor& grad_out, const at::Tensor& y,
                          const at::Tensor& mask, const at::Tensor& scale,
                          const at::Tensor& inv_scale, const at::Tensor& shift,
                          const at::Tensor* residual, const at::Tensor& table,
                          const InverseCall& call, at::Tensor& sum_dz, at::Tensor& sum_dz_xmu,
                          at::Tensor* z);
  // grad_x = dz * scale + xmu * coef_xmu + coef_const; grad_residual (if given) = dz; z from the
  // reduce pass's `z` if given, else recovered again
  void (*backward_elemt)(const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& mask,
                         const at::Tensor* z, const at::Tensor& scale,
                         const at::Tensor& inv_scale, const at::Tensor& shift,
                         const at::Tensor* residual, const at::Tensor& coef_xmu,
                         const at::Tensor& coef_const, const at::Tensor& table,
                         const InverseCall& call, at::Tensor& grad_x, at::Tensor* grad_residual);
};

namespace DEFAULT {
const BnActOutputKernelTable& bn_act_output_kernel_table();
}
namespace AVX2 {
const BnActOutputKernelTable& bn_act_output_kernel_table();
}
namespace AVX512 {
const BnActOutputKernelTable& bn_act_output_kernel_table();
}

// The table of the activation kernels' current capability (cpu::active_capability()).
const BnActOutputKernelTable& bn_act_output_kernels();

}  // namespace mishkit::cpu
