// The math policy of activations.h for at::vec::Vectorized<float/double> (the CPU SIMD path).
//
// Included by cpu/act_kernels_impl.h once per CPU_CAPABILITY translation unit, so every function
// here compiles with that unit's instruction set. Masks are Vectorized values with all bits set
// in true lanes (ordered comparisons: false for NaN, like the scalar policy). float erf/erfc are
// exp-based approximations within ~1 ulp and the AVX-512 build's float exp is inlined (see
// vec_detail); everything else is at::vec (SLEEF).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "activations.h"

namespace mishkit::act {
// One copy per instruction-set build (CPU_CAPABILITY is DEFAULT, AVX2 or AVX512 in the kernel
// units), so the differently compiled definitions never meet in the linker.
inline namespace CPU_CAPABILITY {
namespace vec_detail {

using VecF = at::vec::Vectorized<float>;

#if defined(CPU_CAPABILITY_AVX512)
// float exp inlined for the AVX-512 build. at::vec's exp is an out-of-line SLEEF call, and around a
// call every zmm register is caller-saved: the loops spilled all their constants, and GELU / SiLU
// ran at half the speed of torch's (oneDNN JIT) kernels. Cody-Waite reduction x = n ln2 + r,
// |r| <= ln2 / 2, a degree-7 Taylor polynomial (truncation < 1e-8 relative, so within ~2 ulp in
// all), then vscalefps multiplies by 2^n with the correct overflow to inf and gradual underflow.
// x is clamped to [-105, 89] first (exp(-105) rounds to 0, exp(89) overflows); max/min return
// their second operand for NaN, so NaN passes through.
inline VecF exp(const VecF& x) {
  __m512 v = _mm512_max_ps(_mm512_set1_ps(-105.0f), x);
  v = _mm512_min_ps(_mm512_set1_ps(89.0f), v);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln 2 = 0.693359375 - 2.12194440e-4: the high part has 9 bits, so n * high is exact
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), v);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#else
inline VecF exp(const VecF& x) { return x.exp(); }
#endif

// erfc(z) for z >= 0 from exp alone: Numerical Recipes' Chebyshev fit (Press et al., "erfcc"),
// fractional error < 1.2e-7 over the whole range, i.e. about one float ulp. SLEEF's vector
// erf/erfc measured ~20-30x slower than its exp here, which made GELU 30x slower than torch's.
inline VecF erfc_nonnegative(const VecF& z) {
  const VecF t = VecF(1.0f) / at::vec::fmadd(VecF(0.5f), z, VecF(1.0f));
  VecF p = VecF(0.17087277f);
  p = at::vec::fmadd(p, t, VecF(-0.82215223f));
  p = at::vec::fmadd(p, t, VecF(1.48851587f));
  p = at::vec::fmadd(p, t, VecF(-1.13520398f));
  p = at::vec::fmadd(p, t, VecF(0.27886807f));
  p = at::vec::fmadd(p, t, VecF(-0.18628806f));
  p = at::vec::fmadd(p, t, VecF(0.09678418f));
  p = at::vec::fmadd(p, t, VecF(0.37409196f));
  p = at::vec::fmadd(p, t, VecF(1.00002368f));
  p = at::vec::fmadd(p, t, VecF(-1.26551223f));
  return t * exp(p - z * z);  // z = inf: t = 0 and exp(-inf) = 0
}

inline VecF erfc(const VecF& x) {
  const VecF e = erfc_nonnegative(x.abs());
  return VecF::blendv(e, VecF(2.0f) - e, x < VecF(0.0f));  // NaN stays NaN
}

// erf: Taylor series x * sum_k c_k x^2k, c_k = (2/sqrt(pi)) (-1)^k / (k! (2k + 1)), below 0.5
// (truncation < 1e-9 relative: full precision near 0, where 1 - erfc cancels); 1 - erfc above.
inline VecF erf(const VecF& x) {
  constexpr double kTwoOverSqrtPi = 1.12837916709551257390;
  const VecF x2 = x * x;
  VecF series = VecF(static_cast<float>(kTwoOverSqrtPi / 9360));
  series = at::vec::fmadd(series, x2, VecF(static_cast<float>(-kTwoOverSqrtPi / 1320)));
  series = at::vec::fmadd(series, x2, VecF(static_cast<float>(kTwoOverSqrtPi / 216)));
  series = at::vec::fmadd(series, x2, VecF(static_cast<float>(-kTwoOverSqrtPi / 42)));
  series = at::vec::fmadd(series, x2, VecF(static_cast<float>(kTwoOverSqrtPi / 10)));
  series = at::vec::fmadd(series, x2, VecF(static_cast<float>(-kTwoOverSqrtPi / 3)));
  series = at::vec::fmadd(series, x2, VecF(static_cast<float>(kTwoOverSqrtPi)));
  const VecF a = x.abs();
  const VecF one_minus = VecF(1.0f) - erfc_nonnegative(a);
  const VecF large = VecF::blendv(one_minus, one_minus.neg(), x < VecF(0.0f));
  return VecF::blendv(large, x * series, a < VecF(0.5f));  // NaN: a < 0.5 false, large is NaN
}

}  // namespace vec_detail

template <class T>
struct VecMath {
  using V = at::vec::Vectorized<T>;
  using Mask = V;
  static V exp(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return vec_detail::exp(x);
    } else {
      return x.exp();
    }
  }
  static V expm1(const V& x) { return x.expm1(); }
  static V log1p(const V& x) { return x.log1p(); }
  static V erf(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return vec_detail::erf(x);
    } else {
      return x.erf();
    }
  }
  static V erfc(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return vec_detail::erfc(x);
    } else {
      return x.erfc();
    }
  }
  static V abs(const V& x) { return x.abs(); }
  static V neg(const V& x) { return x.neg(); }
  static Mask lt(const V& a, const V& b) { return a < b; }
  static Mask le(const V& a, const V& b) { return a <= b; }
  static Mask gt(const V& a, const V& b) { return a > b; }
  static Mask eq(const V& a, const V& b) { return a == b; }
  static V select(const Mask& cond, const V& if_true, const V& if_false) {
    return V::blendv(if_false, if_true, cond);  // blendv(a, b, mask) = mask ? b : a
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace mishkit::act
