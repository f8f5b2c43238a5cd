// Headers that an instruction-set build (act_kernels_avx2.cpp, act_kernels_avx512.cpp, and the
// bn_act_kernels_* twins) must include *before* its target pragma.
//
// The extension is compiled for baseline x86-64; the AVX2 and AVX-512 units enable their ISA with
// `#pragma GCC target`. Every inline function outside the CPU_CAPABILITY namespaces (c10, ATen
// core, TensorIterator, ...) that the kernel headers use must be compiled here first, without the
// pragma: the linker keeps one copy of each inline function, and the other translation units call
// it on any CPU, so a copy compiled with AVX instructions would crash CPUs that lack them.
// Everything compiled under the pragma lives in the CPU_CAPABILITY namespaces (at::vec::AVX2,
// at::native::AVX512, mishkit::cpu::AVX512, ...). The objdump check in csrc/README.md verifies it.
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/detail/FunctionTraits.h>
#include <ATen/native/Math.h>
#include <ATen/native/TensorIterator.h>
#include <ATen/native/TensorIteratorDynamicCasting.h>
#include <ATen/native/cpu/IsContiguous.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>

#include <algorithm>
#include <functional>
#include <vector>
