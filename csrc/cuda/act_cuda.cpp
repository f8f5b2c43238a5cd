// CUDA implementations of the mishkit activation ops (schemas in library.cpp): checks, device guard,
// layouts and launches on the current stream, with every launch's error checked.
//
// Layout: a non-overlapping, dense tensor (contiguous, channels_last, any permutation) is one
// block of storage, so the kernels map it flat and the output is allocated with the same strides;
// other inputs are made contiguous first. Only light c10/cuda headers here (no ATen/cuda, which
// needs cusparse).
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/act_launch.h"

namespace mishkit {
namespace {

cuda::DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::DType::kFloat;
    case at::kDouble:
      return cuda::DType::kDouble;
    case at::kHalf:
      return cuda::DType::kHalf;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "mishkit CUDA kernels: unsupported dtype ", t.scalar_type());
  }
}

at::Tensor dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous();
}

at::Tensor act_forward_cuda(const at::Tensor& x, c10::string_view name,
                            c10::ArrayRef<double> params) {
  constexpr const char* op = "mishkit::act_forward";
  const ActCall call = check_forward_args(op, x, name, params);
  check_cuda_tensor(x, op, "(", name, ")");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dense(x);
  at::Tensor y = at::empty_like(xd);  // dense input: same strides
  C10_CUDA_CHECK(cuda::launch_act_forward(call.id, kernel_dtype(xd), xd.const_data_ptr(),
                                          y.mutable_data_ptr(), xd.numel(), call.params.data(),
                                          c10::cuda::getCurrentCUDAStream()));
  return y;
}

at::Tensor& act_forward_inplace_cuda(at::Tensor& x, c10::string_view name,
                                     c10::ArrayRef<double> params) {
  constexpr const char* op = "mishkit::act_forward_";
  const ActCall call = check_forward_args(op, x, name, params);
  check_cuda_tensor(x, op, "(", name, ")");
  at::assert_no_internal_overlap(x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xd = dense(x);
  C10_CUDA_CHECK(cuda::launch_act_forward(call.id, kernel_dtype(xd), xd.const_data_ptr(),
                                          xd.mutable_data_ptr(), xd.numel(), call.params.data(),
                                          c10::cuda::getCurrentCUDAStream()));
  if (!xd.is_same(x)) x.copy_(xd);
  return x;
}

at::Tensor act_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                             c10::string_view name, c10::ArrayRef<double> params) {
  constexpr const char* op = "mishkit::act_backward";
  const ActCall call = check_backward_args(op, grad_out, x, name, params);  // same device
  check_cuda_tensor(x, op, "(", name, ")");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dense(x);
  at::Tensor g = grad_out;
  if (!same_layout(g, xd)) {  // the flat map needs grad_out in x's layout (size-1 dims aside)
    g = at::empty_like(xd);
    g.copy_(grad_out);
  }
  at::Tensor grad_in = at::empty_like(xd);
  C10_CUDA_CHECK(cuda::launch_act_backward(call.id, kernel_dtype(xd), g.const_data_ptr(),
                                           xd.const_data_ptr(), grad_in.mutable_data_ptr(),
                                           xd.numel(), call.params.data(),
                                           c10::cuda::getCurrentCUDAStream()));
  return grad_in;
}

}  // namespace
}  // namespace mishkit

TORCH_LIBRARY_IMPL(mishkit, CUDA, m) {
  m.impl("act_forward", &mishkit::act_forward_cuda);
  m.impl("act_forward_", &mishkit::act_forward_inplace_cuda);
  m.impl("act_backward", &mishkit::act_backward_cuda);
}
