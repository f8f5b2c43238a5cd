// AVX2 + FMA (+ F16C) build of the CPU activation loops, used only when the CPU supports both (see
// act_dispatch.cpp). The extension is compiled without -mavx2, so the ISA is enabled here with a
// target pragma. Headers with code outside at::vec are included first, *before* the pragma: their
// inline functions must stay baseline, because the linker keeps one copy of each and the other
// translation units call them on any CPU. Everything compiled under the pragma lives in the
// CPU_CAPABILITY=AVX2 namespaces (at::vec::AVX2, at::native::AVX2, mishkit::cpu::AVX2).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/detail/FunctionTraits.h>
#include <ATen/native/Math.h>
#include <ATen/native/TensorIterator.h>
#include <ATen/native/TensorIteratorDynamicCasting.h>
#include <ATen/native/cpu/IsContiguous.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define MISHKIT_CPU_CAPABILITY_NAME "avx2"
// sleef.h declares its 256-bit functions only when the compiler's ISA macros say AVX/AVX2, which
// the target pragma does not define; it holds declarations only.
#if !defined(__AVX2__)
#define __AVX__ 1
#define __AVX2__ 1
#include <sleef.h>
#undef __AVX__
#undef __AVX2__
#endif
#include "cpu/act_kernels_impl.h"
#pragma GCC pop_options
#else
// Not x86: no AVX2 table; act_dispatch.cpp never selects it, this keeps the symbol defined.
#define CPU_CAPABILITY AVX2
#define MISHKIT_CPU_CAPABILITY_NAME "avx2-unavailable"
#include "cpu/act_kernels_impl.h"
#endif
