// act_forward's eager entry from Python. torch.ops.mishkit.act_forward matches its arguments
// against the schema in generic code on every call; with mishkit.functional's Python in front of
// it, that call path cost 13-45 us per call once a large tensor had evicted the caches, 3-10% of a
// memory-bound 2^22-element forward. This entry unpacks the arguments directly and calls the same op through the
// dispatcher, so autograd, inference mode, torch_dispatch modes and the JIT tracer all see the
// same op call.
//
// It serves only the plain case, and returns None for everything else, so that Python's general
// path (mishkit/ops.py) handles it with its own checks and errors: x not exactly a torch.Tensor
// or nn.Parameter (a subclass may override __torch_function__), a torch_function mode active or a
// skip pending (both need torch.ops' handling), a dtype the op does not take, a backend other
// than "auto" or the extension's own for x's device, a device the extension does not serve, or an
// in-place call on a tensor autograd tracks or that has a forward-mode tangent (Python's error
// explains why that is refused).
#include "act_eager.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/GradMode.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/autograd/python_variable.h>

#include "act_op_handles.h"
#include "activations.h"
#include "checks.h"

#ifndef MISHKIT_WITH_CUDA
#define MISHKIT_WITH_CUDA 0
#endif

namespace mishkit {
namespace {

bool is_str(PyObject* obj, const char* text) {
  return PyUnicode_Check(obj) && PyUnicode_CompareWithASCIIString(obj, text) == 0;
}

// Whether "auto" or `backend` runs this extension's kernels on `device`, as mishkit.backends
// chooses: CPU tensors always, CUDA tensors when the CUDA kernels were compiled in.
bool extension_serves(PyObject* backend, const c10::Device& device) {
  if (device.is_cpu()) {
    return is_str(backend, "auto") || is_str(backend, "cpu");
  }
  if (MISHKIT_WITH_CUDA && device.is_cuda()) {
    return is_str(backend, "auto") || is_str(backend, "cuda");
  }
  return false;
}

}  // namespace

pybind11::object act_forward_eager(pybind11::handle x, pybind11::handle name,
                                   pybind11::handle params, bool inplace,
                                   pybind11::handle backend) {
  if (!THPVariable_CheckExact(x.ptr()) || at::impl::torch_function_mode_enabled() ||
      at::impl::PythonTorchFunctionTLS::peek_skip_next() || !PyUnicode_Check(name.ptr()) ||
      !PyTuple_Check(params.ptr()) || PyTuple_GET_SIZE(params.ptr()) > act::kMaxParams) {
    return pybind11::none();
  }
  const at::Tensor& input = THPVariable_Unpack(x.ptr());
  if (!input.defined() || !is_float_dtype(input.scalar_type()) ||
      !extension_serves(backend.ptr(), input.device()) ||
      (inplace && ((c10::GradMode::is_enabled() && input.requires_grad()) ||
                   input._fw_grad(/*level=*/0).defined()))) {
    return pybind11::none();
  }
  c10::SmallVector<double, act::kMaxParams> values;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(params.ptr()); ++i) {
    PyObject* value = PyTuple_GET_ITEM(params.ptr(), i);
    if (!PyFloat_CheckExact(value)) {
      return pybind11::none();
    }
    values.push_back(PyFloat_AS_DOUBLE(value));
  }
  Py_ssize_t size = 0;
  const char* text = PyUnicode_AsUTF8AndSize(name.ptr(), &size);
  if (text == nullptr) {
    throw pybind11::error_already_set();
  }
  const c10::string_view activation(text, size);
  at::Tensor y;
  {
    const pybind11::gil_scoped_release no_gil;  // as torch's own bindings do, for other threads
    if (inplace) {
      at::Tensor output = input;
      act_inplace_op().call(output, activation, values);
    } else {
      y = act_forward_op().call(input, activation, values);
    }
  }
  if (inplace) {
    return pybind11::reinterpret_borrow<pybind11::object>(x);  // the op returns x itself
  }
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(y)));
}

}  // namespace mishkit
