// AVX2 + FMA + F16C build of the fused BatchNorm + activation CPU loops, used when the activation
// kernels run their AVX2 table (see cpu/act_kernels_avx2.cpp for why headers with code outside
// at::vec are included before the target pragma: their inline functions must stay baseline).
#include <ATen/AccumulateType.h>
#include <ATen/core/Tensor.h>
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

#include <algorithm>
#include <functional>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
// sleef.h declares its 256-bit functions only under the compiler's AVX/AVX2 macros, which the
// target pragma does not define; it holds declarations only.
#if !defined(__AVX2__)
#define __AVX__ 1
#define __AVX2__ 1
#include <sleef.h>
#undef __AVX__
#undef __AVX2__
#endif
#include "cpu/bn_act_kernels_impl.h"
#pragma GCC pop_options
#else
#define CPU_CAPABILITY AVX2
#include "cpu/bn_act_kernels_impl.h"
#endif
