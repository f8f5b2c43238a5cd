// The CPU activation loops, compiled once per CPU_CAPABILITY (see act_kernels.h).
//
// at::native::cpu_kernel_vec runs the vector lambda over contiguous runs and the scalar lambda
// over strided ones and the tail, and splits the work with at::parallel_for internally (grain
// 32768 elements). TensorIterator handles any strides, so channels_last and other non-contiguous
// inputs are processed in place, without copies.
//
// Include only after the including .cpp has defined CPU_CAPABILITY, MISHKIT_CPU_CAPABILITY_ID (a
// Capability) and, for the vector builds, CPU_CAPABILITY_AVX2 or CPU_CAPABILITY_AVX512 (which
// select at::vec's 256- or 512-bit Vectorized): every name below lands in namespace
// mishkit::cpu::CPU_CAPABILITY.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>  // convert_to_float / convert_from_float
#include <ATen/native/TensorIterator.h>
#include <ATen/native/cpu/Loops.h>

#include <type_traits>

#include "activations.h"
#include "cpu/act_kernels.h"
#include "cpu/vec_math.h"

#if !defined(CPU_CAPABILITY) || !defined(MISHKIT_CPU_CAPABILITY_ID)
#error "define CPU_CAPABILITY and MISHKIT_CPU_CAPABILITY_ID before including this header"
#endif

namespace mishkit::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// Compute type: float for float/half/bfloat16, double for double.
template <class scalar_t>
using Acc = at::opmath_type<scalar_t>;

template <class T>
act::Params<T> cast_params(const double* params) {
  return {static_cast<T>(params[0]), static_cast<T>(params[1])};
}

// The vector math for scalar_t. bfloat16 keeps 8 significant bits of the float result, so it takes
// the shorter kBFloat16 float math (vec_math.h), every result within one bfloat16 ulp of the float
// kernel's (tests/test_cpu_kernels.py checks all 2^16 inputs). float16 does not: near the roots
// of the derivatives (gelu' at x = -0.75) its finer inputs and 11 bits showed kBFloat16's absolute
// error (a few 1e-6) as up to 18 ulp.
template <class scalar_t>
using VecMathFor = act::VecMath<Acc<scalar_t>, std::is_same_v<scalar_t, at::BFloat16>
                                                   ? act::vec_detail::Precision::kBFloat16
                                                   : act::vec_detail::Precision::kFull>;

template <class Op, class scalar_t>
void forward_loop(at::TensorIteratorBase& iter, const double* params) {
  using acc_t = Acc<scalar_t>;
  using SM = act::ScalarMath<acc_t>;
  using VM = VecMathFor<scalar_t>;
  const auto ps = cast_params<acc_t>(params);
  const act::Params<Vectorized<acc_t>> pv{Vectorized<acc_t>(ps.p0), Vectorized<acc_t>(ps.p1)};
  const auto scalar_op = [ps](scalar_t x) -> scalar_t {
    return static_cast<scalar_t>(Op::template forward<SM>(static_cast<acc_t>(x), ps));
  };
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    at::native::cpu_kernel_vec(iter, scalar_op, [pv](Vectorized<scalar_t> x) {
      return Op::template forward<VM>(x, pv);
    });
  } else {  // half types: widen to two float vectors, compute, narrow
    at::native::cpu_kernel_vec(iter, scalar_op, [pv](Vectorized<scalar_t> x) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(x);
      return at::vec::convert_from_float<scalar_t>(Op::template forward<VM>(lo, pv),
                                                   Op::template forward<VM>(hi, pv));
    });
  }
}

template <class Op, class scalar_t>
void backward_loop(at::TensorIteratorBase& iter, const double* params) {
  using acc_t = Acc<scalar_t>;
  using SM = act::ScalarMath<acc_t>;
  using VM = VecMathFor<scalar_t>;
  const auto ps = cast_params<acc_t>(params);
  const act::Params<Vectorized<acc_t>> pv{Vectorized<acc_t>(ps.p0), Vectorized<acc_t>(ps.p1)};
  const auto scalar_op = [ps](scalar_t x, scalar_t g) -> scalar_t {
    const acc_t d = Op::template derivative<SM>(static_cast<acc_t>(x), ps);
    return static_cast<scalar_t>(static_cast<acc_t>(g) * d);
  };
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    at::native::cpu_kernel_vec(iter, scalar_op, [pv](Vectorized<scalar_t> x,
                                                     Vectorized<scalar_t> g) {
      return g * Op::template derivative<VM>(x, pv);
    });
  } else {
    at::native::cpu_kernel_vec(iter, scalar_op, [pv](Vectorized<scalar_t> x,
                                                     Vectorized<scalar_t> g) {
      auto [g_lo, g_hi] = at::vec::convert_to_float<scalar_t>(g);
      auto [x_lo, x_hi] = at::vec::convert_to_float<scalar_t>(x);
      return at::vec::convert_from_float<scalar_t>(g_lo * Op::template derivative<VM>(x_lo, pv),
                                                   g_hi * Op::template derivative<VM>(x_hi, pv));
    });
  }
}

// The piecewise-linear activations do one or two vector instructions per element, so their loops
// run at memory speed, and which vector width streams faster depends on the CPU
// (act_kernels.h: linear_float_loops_256bit). Where it is 256 bits, the AVX-512 build takes their
// float loops from the AVX2 build; their half-type loops stay 512-bit, where the wider
// bf16/fp16 conversion is the faster one.
template <class Op>
inline constexpr bool kPiecewiseLinear =
    std::is_same_v<Op, act::Relu> || std::is_same_v<Op, act::LeakyRelu> ||
    std::is_same_v<Op, act::Hardswish> || std::is_same_v<Op, act::Hardmish>;

template <class Op>
bool use_avx2_float_loop([[maybe_unused]] const at::TensorIteratorBase& iter) {
#if defined(CPU_CAPABILITY_AVX512)
  return kPiecewiseLinear<Op> && iter.common_dtype() == at::kFloat && linear_float_loops_256bit();
#else
  return false;
#endif
}

template <class Op, act::ActId id>
void forward_kernel(at::TensorIteratorBase& iter, const double* params) {
  if (use_avx2_float_loop<Op>(iter)) {  // AVX-512 implies AVX2 (act_dispatch.cpp)
    return AVX2::kernel_table().forward[static_cast<int>(id)](iter, params);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, iter.common_dtype(),
                                  "mishkit_act_forward",
                                  [&] { forward_loop<Op, scalar_t>(iter, params); });
}

template <class Op, act::ActId id>
void backward_kernel(at::TensorIteratorBase& iter, const double* params) {
  if (use_avx2_float_loop<Op>(iter)) {
    return AVX2::kernel_table().backward[static_cast<int>(id)](iter, params);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, iter.common_dtype(),
                                  "mishkit_act_backward",
                                  [&] { backward_loop<Op, scalar_t>(iter, params); });
}

const KernelTable& kernel_table() {
#define MISHKIT_FORWARD_ENTRY(name, Functor) &forward_kernel<act::Functor, act::ActId::name>,
#define MISHKIT_BACKWARD_ENTRY(name, Functor) &backward_kernel<act::Functor, act::ActId::name>,
  static const KernelTable table{
      MISHKIT_CPU_CAPABILITY_ID,
      {MISHKIT_FOR_EACH_ACTIVATION(MISHKIT_FORWARD_ENTRY)},
      {MISHKIT_FOR_EACH_ACTIVATION(MISHKIT_BACKWARD_ENTRY)},
  };
#undef MISHKIT_FORWARD_ENTRY
#undef MISHKIT_BACKWARD_ENTRY
  return table;
}

}  // namespace mishkit::cpu::CPU_CAPABILITY
