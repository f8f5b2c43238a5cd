// The mishkit op library: schemas, argument checks, CPU implementations and the Python module.
//
// CUDA implementations are registered in cuda/act_cuda.cpp (built only with CUDA). Kernels for the
// activations themselves live in activations.h (formulas) and cpu/ (vectorized loops).
#include <ATen/native/TensorIterator.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "activations.h"
#include "cpu/act_kernels.h"
#include "ops.h"

#ifndef MISHKIT_WITH_CUDA
#define MISHKIT_WITH_CUDA 0
#endif
#ifndef MISHKIT_VERSION_STRING  // setup.py passes mishkit.__version__
#define MISHKIT_VERSION_STRING "unknown"
#endif

namespace mishkit {
namespace {

std::string join_names() {
  std::string out;
  for (const char* name : act::kActivationNames) {
    if (!out.empty()) out += ", ";
    out += name;
  }
  return out;
}

void check_float_tensor(const char* op, const char* arg, const at::Tensor& t,
                        c10::string_view name) {
  TORCH_CHECK_VALUE(t.defined(), op, "(", name, "): ", arg, " is an undefined tensor");
  const auto dtype = t.scalar_type();
  const bool supported = dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                         dtype == at::kBFloat16;
  TORCH_CHECK_TYPE(supported, op, "(", name, "): unsupported dtype ", dtype, " for ", arg,
                   "; expected float32, float64, float16 or bfloat16");
}

}  // namespace

ActCall check_forward_args(const char* op, const at::Tensor& x, c10::string_view name,
                           c10::ArrayRef<double> params) {
  const int index = act::find_activation(name.data(), static_cast<int64_t>(name.size()));
  TORCH_CHECK_VALUE(index >= 0, op, ": unknown activation '", name,
                    "' (canonical names only); valid names: ", join_names());
  check_float_tensor(op, "x", x, name);
  const int expected = act::kActivationNumParams[index];
  const std::string param_names = act::kActivationParamNames[index];
  TORCH_CHECK_VALUE(static_cast<int>(params.size()) == expected, op, "(", name, "): expected ",
                    expected, " parameter(s)", param_names.empty() ? "" : " [",
                    param_names, param_names.empty() ? "" : "]", ", got ", params.size());
  ActCall call{static_cast<act::ActId>(index), {}};
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(std::isfinite(params[i]), op, "(", name, "): parameter ", i, " must be ",
                      "finite, got ", params[i]);
    call.params[i] = params[i];
  }
  return call;
}

ActCall check_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                            c10::string_view name, c10::ArrayRef<double> params) {
  ActCall call = check_forward_args(op, x, name, params);
  check_float_tensor(op, "grad_out", grad_out, name);
  TORCH_CHECK(grad_out.device() == x.device(), op, "(", name, "): grad_out is on ",
              grad_out.device(), " but x is on ", x.device(), "; both must be on one device");
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), op, "(", name, "): grad_out has shape ",
                    grad_out.sizes(), " but x has shape ", x.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), op, "(", name,
                   "): grad_out has dtype ", grad_out.scalar_type(), " but x has dtype ",
                   x.scalar_type(), "; they must match");
  return call;
}

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

TORCH_LIBRARY(mishkit, m) {
  m.def("act_forward(Tensor x, str name, float[] params) -> Tensor");
  m.def("act_forward_(Tensor(a!) x, str name, float[] params) -> Tensor(a!)");
  m.def("act_backward(Tensor grad_out, Tensor x, str name, float[] params) -> Tensor");
}

TORCH_LIBRARY_IMPL(mishkit, CPU, m) {
  m.impl("act_forward", &mishkit::act_forward_cpu);
  m.impl("act_forward_", &mishkit::act_forward_inplace_cpu);
  m.impl("act_backward", &mishkit::act_backward_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mishkit C++/CUDA activation kernels; ops are torch.ops.mishkit.act_*";
  m.def("with_cuda", [] { return static_cast<bool>(MISHKIT_WITH_CUDA); },
        "True when the CUDA kernels were compiled in.");
  m.def("kernel_names", [] {
        return std::vector<std::string>(std::begin(mishkit::act::kActivationNames),
                                        std::end(mishkit::act::kActivationNames));
      },
      "Canonical names of the activations the kernels implement, in registry order.");
  m.def("cpu_capability", &mishkit::cpu::cpu_capability,
        "Instruction set of the CPU kernels in use: 'avx512', 'avx2' or 'default'.");
  m.def("set_cpu_capability", &mishkit::cpu::set_cpu_capability, pybind11::arg("capability"),
        "Switch the CPU kernels to 'default', 'avx2' or 'avx512' (tests, benchmarks).");
  m.def("version", [] { return std::string(MISHKIT_VERSION_STRING); },
        "mishkit version the extension was built from.");
}
