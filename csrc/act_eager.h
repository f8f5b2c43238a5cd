// act_forward's eager entry from Python (mishkit._C.act_forward_eager, bound in library.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace mishkit {

// act_forward(x, name, params), or act_forward_ when `inplace`, through the dispatcher (autograd,
// modes and devices as for torch.ops.mishkit.*), or None when the call is not the plain case and
// Python's general path must take it: see act_eager.cpp.
pybind11::object act_forward_eager(pybind11::handle x, pybind11::handle name,
                                   pybind11::handle params, bool inplace,
                                   pybind11::handle backend);

}  // namespace mishkit
