"""Builds mishkit._C: C++ CPU kernels always; CUDA kernels when torch has CUDA and nvcc exists.

Environment:
  MISHKIT_NO_EXT=1        install the Python packages only (ops fall back to Triton / pure torch)
  MISHKIT_CUDA=0|1        force the CUDA part off / on (default: on with torch.version.cuda + nvcc)
  TORCH_CUDA_ARCH_LIST    honoured by torch.utils.cpp_extension (e.g. "8.0;9.0")
  MAX_JOBS                parallel compile jobs for ninja

Install after torch is present:  pip install --no-build-isolation -e .
"""

import glob
import os
import re

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _version():
    with open(os.path.join(ROOT, "mishkit", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _want_cuda(torch_cuda_version, cuda_home):
    forced = os.environ.get("MISHKIT_CUDA")
    if forced is not None:
        if forced == "1" and (torch_cuda_version is None or cuda_home is None):
            raise RuntimeError(
                "MISHKIT_CUDA=1 but the CUDA build can't run: "
                f"torch.version.cuda={torch_cuda_version}, CUDA_HOME/nvcc={cuda_home}"
            )
        return forced == "1"
    return torch_cuda_version is not None and cuda_home is not None


def _extensions():
    if os.environ.get("MISHKIT_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    with_cuda = _want_cuda(torch.version.cuda, CUDA_HOME)
    # -g0: Python's default CFLAGS carry -g, which made the .so 16x larger than its code. No
    # -std: torch's extension build gives the standard its own headers need (C++20 in torch
    # 2.13, whose headers warn under C++17); the sources compile as either (.ci/run checks both).
    # -fopenmp: at::parallel_for is inline; without _OPENMP it runs serially in our kernels
    # (TensorIterator loops parallelize inside libtorch either way). Links libgomp.so.1, the
    # soname of the OpenMP runtime torch has already loaded, so the process keeps one runtime.
    # -fschedule-insns -fsched-pressure: GCC's scheduling before register allocation, which x86
    # builds leave off. Each activation is one long dependency chain per vector (serf: exp,
    # log1p, then erf's exponential); at::native's vectorized loop computes two vectors per
    # iteration, and the core only overlaps them when their instructions are interleaved.
    # --param early-inlining-insns=30 (GCC's -O3 default: 14): at::native's loop calls the vector
    # function through std::apply, whose std::__invoke_impl is compiled without the ISA pragma;
    # unless the early inliner folds that chain into the loop first, GCC may not inline the
    # AVX-512 function into it ("target specific option mismatch"). With 14 every AVX-512
    # backward function stayed out of line, called twice per iteration with the loop's vectors
    # spilled around each call (tests/test_isa_model.py checks that none is).
    cxx_flags = ["-O3", "-g0", "-fvisibility=hidden", "-fopenmp", "-fschedule-insns",
                 "-fsched-pressure", "--param", "early-inlining-insns=30"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    define_macros = [
        ("MISHKIT_WITH_CUDA", "1" if with_cuda else "0"),
        ("MISHKIT_VERSION_STRING", f'"{_version()}"'),
    ]
    kwargs = dict(
        name="mishkit._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if with_cuda:
        kwargs["sources"] += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
        kwargs["extra_compile_args"] = {
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-lineinfo"],
        }
        ext = CUDAExtension(**kwargs)
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx_flags}
        ext = CppExtension(**kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
