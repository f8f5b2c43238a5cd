// The mishkit op library: every schema, in this one TORCH_LIBRARY, and the Python module.
//
// Implementations register per device: cpu/act_cpu.cpp, cpu/bn_act_cpu.cpp and
// cpu/bn_act_output_cpu.cpp (CPU), cuda/act_cuda.cpp, cuda/bn_act_cuda.cpp and
// cuda/bn_act_output_cuda.cpp (CUDA, built only with CUDA); the activation ops'
// device-independent kernels (autograd, the in-place op's version counter) in act_autograd.cpp.
// Python registers the fake kernels and the double backward (mishkit/backends/extension.py).
// Per-channel vectors of the BatchNorm + activation ops are (C,) in the compute dtype.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "act_eager.h"
#include "activations.h"
#include "cpu/act_kernels.h"

#ifndef MISHKIT_WITH_CUDA
#define MISHKIT_WITH_CUDA 0
#endif
#ifndef MISHKIT_VERSION_STRING  // setup.py passes mishkit.__version__
#define MISHKIT_VERSION_STRING "unknown"
#endif

TORCH_LIBRARY(mishkit, m) {
  // activations: y = f(x); in place; grad_in = grad_out * f'(x)
  m.def("act_forward(Tensor x, str name, float[] params) -> Tensor");
  m.def("act_forward_(Tensor(a!) x, str name, float[] params) -> Tensor(a!)");
  m.def("act_backward(Tensor grad_out, Tensor x, str name, float[] params) -> Tensor");
  // fused BatchNorm + activation (contract: mishkit/batchnorm/functional.py)
  m.def("bn_act_stats(Tensor x) -> (Tensor, Tensor)");
  m.def("bn_act_forward(Tensor x, Tensor mean, Tensor scale, Tensor shift, str name, "
        "float[] params) -> Tensor");
  m.def("bn_act_backward_reduce(Tensor grad_out, Tensor x, Tensor mean, Tensor scale, "
        "Tensor shift, str name, float[] params) -> (Tensor, Tensor)");
  m.def("bn_act_backward_elemt(Tensor grad_out, Tensor x, Tensor mean, Tensor scale, "
        "Tensor shift, Tensor coef_xmu, Tensor coef_const, str name, float[] params) -> Tensor");
  // CPU only: backward_reduce that also returns dz = grad_out * act'(z), for backward_elemt
  m.def("bn_act_backward_reduce_dz(Tensor grad_out, Tensor x, Tensor mean, Tensor scale, "
        "Tensor shift, str name, float[] params) -> (Tensor, Tensor, Tensor)");
  // BatchNorm + activation saving only its output (contract: mishkit/batchnorm/output.py):
  // y and the bit-packed branch mask; backward recovers z from them with the inverse table
  m.def("bn_act_output_forward(Tensor x, Tensor mean, Tensor scale, Tensor shift, "
        "Tensor? residual, float branch, str name, float[] params) -> (Tensor, Tensor)");
  // (sum_dz, sum_dz_xmu, z): z is the recovered pre-activation kept for backward_elemt, or an
  // empty tensor where the backend recomputes it there (cheaper than memory traffic on GPUs)
  m.def("bn_act_output_backward_reduce(Tensor grad_out, Tensor y, Tensor mask, Tensor scale, "
        "Tensor shift, Tensor? residual, Tensor table, str name, float[] params) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("bn_act_output_backward_elemt(Tensor grad_out, Tensor y, Tensor mask, Tensor z, "
        "Tensor scale, Tensor shift, Tensor? residual, Tensor coef_xmu, Tensor coef_const, "
        "Tensor table, str name, float[] params) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mishkit C++/CUDA kernels; the ops are torch.ops.mishkit.*";
  m.def("with_cuda", [] { return static_cast<bool>(MISHKIT_WITH_CUDA); },
        "True when the CUDA kernels were compiled in.");
  m.def("kernel_names", [] {
        return std::vector<std::string>(std::begin(mishkit::act::kActivationNames),
                                        std::end(mishkit::act::kActivationNames));
      },
      "Canonical names of the activations the kernels implement, in registry order.");
  m.def("cpu_capability", &mishkit::cpu::cpu_capability,
        "Instruction set of the CPU kernels in use: 'avx512', 'avx2' or 'default'.");
  m.def("linear_float_loops_256bit", &mishkit::cpu::linear_float_loops_256bit,
        "True where the AVX-512 build runs the float loops of relu, leaky_relu, hardswish and "
        "hardmish at 256 bits (AMD CPUs), False where at 512 (others).");
  m.def("set_linear_float_loops_256bit", &mishkit::cpu::set_linear_float_loops_256bit,
        pybind11::arg("on"),
        "Run those loops at 256 (True) or 512 bits (False) in the AVX-512 build (tests, "
        "benchmarks).");
  m.def("set_cpu_capability", &mishkit::cpu::set_cpu_capability, pybind11::arg("capability"),
        "Switch the CPU kernels to 'default', 'avx2' or 'avx512' (tests, benchmarks).");
  m.def("act_forward_eager", &mishkit::act_forward_eager, pybind11::arg("x"),
        pybind11::arg("name"), pybind11::arg("params"), pybind11::arg("inplace"),
        pybind11::arg("backend"),
        "act_forward(x, name, list(params)) (act_forward_ if inplace) through the dispatcher "
        "for the plain eager call (exact tensor, no torch_function mode, the extension's "
        "backend for x's device), else None; mishkit.ops.apply tries it first.");
  m.def("version", [] { return std::string(MISHKIT_VERSION_STRING); },
        "mishkit version the extension was built from.");
}
