// The math policy of activations.h for at::vec::Vectorized<float/double> (the CPU SIMD path).
//
// Included by cpu/act_kernels_impl.h once per CPU_CAPABILITY translation unit, so every function
// here compiles with that unit's instruction set. Masks are Vectorized values with all bits set
// in true lanes, k-masks in the AVX-512 build (ordered comparisons: false for NaN, like the scalar
// policy).
//
// float exp, expm1 and log1p are inlined in the AVX2 and AVX-512 builds (vec_detail): at::vec's are
// out-of-line SLEEF calls, and around a call every vector register is caller-saved, so the loops
// spilled all their constants and ran at a third to a half of their inlined speed. The float
// normal cdf/density and serf's erf(softplus(x)) are exp-based in every build (SLEEF's vector
// erf/erfc measured 20-30x slower than its exp, which made GELU 30x slower than torch's). Each
// stays within ~2 ulp of the correctly rounded value over its whole domain
// (tests/test_cpu_kernels.py checks them against float64 at every exponent, through the
// activations built on them), with the IEEE results at 0, +-inf and NaN. The baseline build and
// double use at::vec (SLEEF / libm).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "activations.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define MISHKIT_INLINE_FLOAT_MATH 1
#else
#define MISHKIT_INLINE_FLOAT_MATH 0
#endif

namespace mishkit::act {
// One copy per instruction-set build (CPU_CAPABILITY is DEFAULT, AVX2 or AVX512 in the kernel
// units), so the differently compiled definitions never meet in the linker.
inline namespace CPU_CAPABILITY {
namespace vec_detail {

using VecF = at::vec::Vectorized<float>;

// How precise the float math is. kFull: ~1-2 ulp, for float (and float16) results. kBFloat16:
// relative error below 2^-16, for results rounded to bfloat16 next (half an ulp is 2^-9):
// shorter polynomials, a one-constant ln 2 reduction and no a^2 splitting, 10-25% fewer
// instructions per activation. act_kernels_impl.h says where each is used.
enum class Precision { kFull, kBFloat16 };

// c_n x^n + ... + c_1 x + c_0 for (leading = c_n, rest = c_(n-1), ..., c_0) by Horner's rule: one
// fmadd per coefficient after the first, in that order. float coefficients only, so each constant
// is the float literal written at the call.
template <class... Rest>
inline VecF horner(const VecF& x, float leading, Rest... rest) {
  static_assert((std::is_same_v<Rest, float> && ...), "write the coefficients as float literals");
  VecF p = VecF(leading);
  ((p = at::vec::fmadd(p, x, VecF(rest))), ...);
  return p;
}

#if MISHKIT_INLINE_FLOAT_MATH
// -- the two bit-level primitives, per instruction set ------------------------------------------
// (No default-constructed Vectorized anywhere below: GCC compiles at::vec's in-class constructors
// without the unit's target pragma, and inlining them into pragma code fails.)

struct ExponentSplit {
  VecF k;  // integral
  VecF m;
};

#if defined(CPU_CAPABILITY_AVX512)
// p * 2^n for integral n in [-150, 128], overflowing to inf and underflowing gradually (vscalefps).
inline VecF scale_by_pow2(const VecF& p, const VecF& n) { return _mm512_scalef_ps(p, n); }

// u = m 2^k with m in [sqrt(1/2), sqrt(2)), for finite u > 0 that is not subnormal.
inline ExponentSplit split_exponent(const VecF& u) {
  const __m512i bits = _mm512_castps_si512(u);
  const __m512i ki =
      _mm512_srai_epi32(_mm512_sub_epi32(bits, _mm512_set1_epi32(0x3f3504f3)), 23);
  return {_mm512_cvtepi32_ps(ki),
          _mm512_castsi512_ps(_mm512_sub_epi32(bits, _mm512_slli_epi32(ki, 23)))};
}
#else
// AVX2 has no vscalefps: 2^n is built in the exponent field, in two halves so each stays normal.
inline VecF scale_by_pow2(const VecF& p, const VecF& n) {
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  const __m256 b = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, a), b);
}

inline ExponentSplit split_exponent(const VecF& u) {
  const __m256i bits = _mm256_castps_si256(u);
  const __m256i ki =
      _mm256_srai_epi32(_mm256_sub_epi32(bits, _mm256_set1_epi32(0x3f3504f3)), 23);
  return {_mm256_cvtepi32_ps(ki),
          _mm256_castsi256_ps(_mm256_sub_epi32(bits, _mm256_slli_epi32(ki, 23)))};
}
#endif

// -- exp, expm1, log1p over the primitives --------------------------------------------------------

constexpr float kLog2e = 1.44269504088896341f;
// ln 2 = kLn2Hi + kLn2Lo; kLn2Hi has 9 significant bits, so n * kLn2Hi is exact for |n| <= 2^15
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;

// n = round(x / ln2), the exponent of the reduction below
inline VecF nearest_ln2_multiple(const VecF& x) { return (x * VecF(kLog2e)).round(); }

// r = x - n ln2, |r| <= ln2 / 2 (Cody-Waite; kBFloat16: one constant, |n| <= 150 times its 2e-9
// error)
template <Precision P>
inline VecF reduce_ln2(const VecF& x, const VecF& n) {
  if constexpr (P == Precision::kBFloat16) {
    return at::vec::fmadd(n, VecF(-0.693147180559945309f), x);
  }
  const VecF r = at::vec::fmadd(n, VecF(-kLn2Hi), x);
  return at::vec::fmadd(n, VecF(-kLn2Lo), r);
}

// exp(r) for |r| <= ln2 / 2: degree-7 Taylor polynomial, truncation < 1e-8 relative (kBFloat16:
// degree 5, < 3e-6)
template <Precision P>
inline VecF exp_reduced(const VecF& r) {
  if constexpr (P == Precision::kBFloat16) {
    return horner(r, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f);
  }
  return horner(r, 1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f);
}

// exp(v) for v in [-113, 89) (or NaN), without clamps: n = round(v / ln2) lies in [-163, 128],
// which vscalefps and the AVX2 two-half scale take to the gradually underflowed result (0 below
// -104). Where the argument is known to lie there (GELU's e^(-a^2/2)) this skips exp's two
// clamps, which sit on the loop's dependency chain.
template <Precision P = Precision::kFull>
inline VecF exp_bounded(const VecF& v) {
  const VecF n = nearest_ln2_multiple(v);
  return scale_by_pow2(exp_reduced<P>(reduce_ln2<P>(v, n)), n);
}

// x is clamped to [-104, 89] first (exp(-104) rounds to 0, exp(89) overflows); clamp_min/max
// return x when it is NaN, so NaN passes through.
template <Precision P = Precision::kFull>
inline VecF exp(const VecF& x) {
  return exp_bounded<P>(at::vec::clamp_max(at::vec::clamp_min(x, VecF(-104.0f)), VecF(89.0f)));
}

// expm1(x) = 2^n (expm1(r) + 1 - 2^-n), where 1 - 2^-n is exact for the n that matter (n = 0
// keeps the full relative precision of expm1(r) near 0). expm1(r): r + r^2 (1/2 + r/6 + ...),
// Taylor to r^8 (truncation < 1e-9 relative; kBFloat16: to r^6, < 4e-7). x is clamped to
// [-30, 89]: expm1(-30) rounds to -1.
template <Precision P = Precision::kFull>
inline VecF expm1(const VecF& x) {
  const VecF v = at::vec::clamp_max(at::vec::clamp_min(x, VecF(-30.0f)), VecF(89.0f));
  const VecF n = nearest_ln2_multiple(v);
  const VecF r = reduce_ln2<P>(v, n);
  const VecF p =
      P == Precision::kBFloat16
          ? horner(r, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f)
          : horner(r, 1.0f / 40320, 1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f);
  const VecF em1_r = at::vec::fmadd(p, r * r, r);
  const VecF one_minus = VecF(1.0f) - scale_by_pow2(VecF(1.0f), n.neg());
  return scale_by_pow2(em1_r + one_minus, n);
}

// log1p(x) = log(u) + c with u = fl(1 + x) and c = ((1 + x) - u) / u its rounding correction;
// log(u) = k ln2 + log(m), u = m 2^k, m in [sqrt(1/2), sqrt(2)), log(m) = log1p(f), f = m - 1
// (exact) by Cephes' logf polynomial (~1 ulp). u >= 2^-24 for x > -1, so u is never subnormal.
// 1/u comes from the hardware reciprocal estimate and one Newton step (a division costs more).
inline VecF log1p(const VecF& x) {
  const VecF u = x + VecF(1.0f);
  const auto [k, m] = split_exponent(u);
  const VecF f = m - VecF(1.0f);
#if defined(CPU_CAPABILITY_AVX512)
  const VecF estimate = _mm512_rcp14_ps(u);
#else
  const VecF estimate = _mm256_rcp_ps(u);
#endif
  // one Newton step: 1/u to ~1 ulp (c is the whole result where u rounds to 1)
  const VecF inv_u =
      at::vec::fmadd(estimate, at::vec::fnmadd(u, estimate, VecF(1.0f)), estimate);
  const VecF c = (x - (u - VecF(1.0f))) * inv_u;
  const VecF z = f * f;
  const VecF p = horner(f, 7.0376836292e-2f, -1.1514610310e-1f, 1.1676998740e-1f,
                        -1.2420140846e-1f, 1.4249322787e-1f, -1.6668057665e-1f, 2.0000714765e-1f,
                        -2.4999993993e-1f, 3.3333331174e-1f);
  VecF y = at::vec::fmadd(f * z, p, at::vec::fmadd(k, VecF(kLn2Lo), c));
  y = at::vec::fmadd(z, VecF(-0.5f), y);
  VecF result = at::vec::fmadd(k, VecF(kLn2Hi), f + y);
  // the IEEE special cases: log1p(inf) = inf, log1p(-1) = -inf, below -1 and NaN -> NaN
  result = VecF::blendv(result, VecF(INFINITY), x == VecF(INFINITY));
  result = VecF::blendv(result, VecF(-INFINITY), x == VecF(-1.0f));
  return VecF::blendv(VecF(NAN), result, x >= VecF(-1.0f));
}
#else   // baseline build: at::vec's element-wise libm calls
template <Precision P = Precision::kFull>
inline VecF exp(const VecF& x) { return x.exp(); }
template <Precision P = Precision::kFull>
inline VecF exp_bounded(const VecF& x) { return x.exp(); }
template <Precision P = Precision::kFull>
inline VecF expm1(const VecF& x) { return x.expm1(); }
inline VecF log1p(const VecF& x) { return x.log1p(); }
#endif  // MISHKIT_INLINE_FLOAT_MATH

// log1p(u) for u in [0, 1] (NaN passes; other u are outside the fit): log1p(u) = 2 atanh(s) with
// s = u / (2 + u) in [0, 1/3], and 2 atanh(s) / s = P(s^2), a degree-4 minimax fit on [0, 1/9]
// (relative error < 8e-9, so <= 2 ulp in all, the division's rounding included; kBFloat16:
// degree 3, < 2e-7). A third of the general log1p's instructions: no exponent split, no special
// cases. softplus and logish only take log1p of e^-|x| or of a sigmoid, which lie in [0, 1].
template <Precision P = Precision::kFull>
inline VecF log1p_unit(const VecF& u) {
  const VecF s = u / (u + VecF(2.0f));
  const VecF w = s * s;
  if constexpr (P == Precision::kBFloat16) {
    return s * horner(w, 3.4226027131e-1f, 3.9589464664e-1f, 6.6676002741e-1f, 1.9999996424f);
  }
  return s * horner(w, 2.8178316355e-1f, 2.7960607409e-1f, 4.0024909377e-1f, 6.6666316986e-1f,
                    2.0f);
}

// a < b ? if_true : if_false (false for NaN); one k-mask blend in the AVX-512 build
inline VecF select_less(const VecF& a, const VecF& b, const VecF& if_true, const VecF& if_false) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), if_false, if_true);
#else
  return VecF::blendv(if_false, if_true, a < b);
#endif
}

// The normal lower tail Phi(-a) for a >= 0 and e^(-a^2/2), from one exponential. With
// t = 1 / (1 + 0.3 a): Phi(-a) = t Q(t) e^(-a^2/2), Q a degree-7 minimax fit of
// Phi(-a) e^(a^2/2) / t over [0, 14.5] (relative error < 2e-7; Phi(-14.5) is below float's
// smallest subnormal). a^2 = hi + lo exactly, so that e^(-a^2/2) = e^(-hi/2) (1 - lo/2) keeps its
// relative precision where a^2 is large. kBFloat16: t = 1 / (1 + 0.31 a) and degree 5 (< 5e-6),
// a^2 rounded (< 3e-6 more). The polynomial and the exponential are independent, so their
// latencies overlap.
struct LowerTail {
  VecF tail;          // Phi(-a)
  VecF exp_half_sq;   // e^(-a^2/2)
};
template <Precision P = Precision::kFull>
inline LowerTail normal_lower_tail(const VecF& a) {
  constexpr bool kShort = P == Precision::kBFloat16;
  const VecF t = VecF(1.0f) / at::vec::fmadd(VecF(kShort ? 0.31f : 0.3f), a, VecF(1.0f));
  // a = inf: t = 0
  const VecF q = kShort ? horner(t, -7.392925769e-02f, 1.804507077e-01f, 1.574430428e-02f,
                                 1.334300041e-01f, 1.204412282e-01f, 1.238607094e-01f)
                        : horner(t, 3.542378172e-02f, -1.561586261e-01f, 2.045570761e-01f,
                                 -5.203426257e-02f, 1.276918799e-01f, 1.001759171e-01f,
                                 1.207121387e-01f, 1.196320057e-01f);
  // e^(-a^2/2) is 0 in float beyond a = 14.5: clamping there keeps a^2 and lo finite, and the
  // exponent in [-112.5, 0]
  const VecF a_c = at::vec::clamp_max(a, VecF(15.0f));
  const VecF hi = a_c * a_c;
  VecF e = exp_bounded<P>(hi * VecF(-0.5f));
  if constexpr (!kShort) {
    const VecF lo = at::vec::fmsub(a_c, a_c, hi);
    e = at::vec::fnmadd(e, lo * VecF(0.5f), e);
  }
  return {(t * q) * e, e};  // normal factors first: one rounding where e is subnormal
}

// Phi(x) and the density phi(x) = e^(-x^2/2) / sqrt(2 pi); Phi(x) = 1 - Phi(-x) for x > 0.
template <Precision P = Precision::kFull>
inline void normal_cdf_pdf(const VecF& x, VecF& cdf, VecF& pdf) {
  const auto [tail, e] = normal_lower_tail<P>(x.abs());
  cdf = select_less(VecF(0.0f), x, VecF(1.0f) - tail, tail);  // NaN: tail is NaN
  pdf = e * VecF(0.39894228040143267794f);
}

// erf(softplus(x)) and its derivative (serf's inner function) from one exponential and no
// division: e = e^x for x < 0 and e^(-x^2) for x >= 0, then
//   x < 0:  erf(log1p(e)) = e H(e),       d/dx = e G(e)  (e in (0, 1))
//   x >= 0: erf(softplus(x)) = 1 - e R(x), d/dx = e K(x)  (x in [0, 4] and [0, 4.5])
// with H, G, R, K minimax polynomials (scripts/fit_serf.py: fitted in float64, coefficients
// rounded to float and refitted, errors measured with float evaluation): H and G to relative
// errors of 1.3e-7 and 1.0e-7 (G in e - 1/2), R and K to 4e-8 and 3e-8 absolute in the result
// (weights e^(-x^2) and max(1, x) e^(-x^2)). Beyond the fitted ranges e R and x e K stay below
// 2^-26 and the value rounds to 1. kBFloat16: degrees 6, 7, 7, 6 (errors below 4e-6). NaN passes
// through e.
template <Precision P>
inline VecF erf_softplus_exp(const VecF& x) {
  return exp<P>(select_less(x, VecF(0.0f), x, at::vec::fnmadd(x, x, VecF(0.0f))));
}

template <Precision P>
inline VecF erf_softplus(const VecF& x, const VecF& e) {
  const VecF h =
      P == Precision::kBFloat16
          ? horner(e, -2.707025036e-02f, 1.253852993e-01f, -2.530702055e-01f, 2.603249252e-01f,
                   3.493593307e-03f, -5.644047856e-01f, 1.128381371e+00f)
          : horner(e, -5.892829970e-03f, 3.774070367e-02f, -1.155056432e-01f, 2.276134342e-01f,
                   -3.166003227e-01f, 2.814297378e-01f, 6.936851423e-05f, -5.641923547e-01f,
                   1.128379226e+00f);
  const VecF xr = at::vec::clamp_max(x, VecF(4.0f));
  const VecF r =
      P == Precision::kBFloat16
          ? horner(xr, -1.570280059e-03f, 1.515019406e-02f, -6.331496686e-02f, 1.565901041e-01f,
                   -2.703560591e-01f, 3.572420776e-01f, -3.486906588e-01f, 3.269554079e-01f)
          : horner(xr, -1.250185778e-05f, 2.151377848e-04f, -1.663633389e-03f, 7.762295660e-03f,
                   -2.496806346e-02f, 6.052650884e-02f, -1.184681132e-01f, 1.969073713e-01f,
                   -2.869089544e-01f, 3.606098294e-01f, -3.489509523e-01f, 3.269586861e-01f);
  return select_less(x, VecF(0.0f), e * h, at::vec::fnmadd(e, r, VecF(1.0f)));
}

template <Precision P>
inline VecF erf_softplus_grad(const VecF& x, const VecF& e) {
  const VecF g =
      P == Precision::kBFloat16
          ? horner(e - VecF(0.5f), 8.588851988e-02f, -1.488411725e-01f, 1.557217389e-01f,
                   -1.080316082e-01f, -8.001729846e-02f, 4.381282926e-01f, -7.704980969e-01f,
                   6.382132173e-01f)
          : horner(e - VecF(0.5f), 1.703267917e-02f, -4.585906491e-02f, 8.181717992e-02f,
                   -1.262235940e-01f, 1.551161557e-01f, -1.114972159e-01f, -7.984340936e-02f,
                   4.382964373e-01f, -7.705050111e-01f, 6.382119656e-01f);
  const VecF xk = at::vec::clamp_max(x, VecF(4.5f));
  const VecF k =
      P == Precision::kBFloat16
          ? horner(xk, 1.242342871e-03f, -9.957867675e-03f, 3.100591153e-02f, -6.633787602e-02f,
                   1.619252861e-01f, -6.717297435e-02f, 3.489492536e-01f)
          : horner(xk, 7.488546999e-06f, -1.124064584e-04f, 7.393267588e-04f, -2.991087968e-03f,
                   9.245755151e-03f, -2.362372167e-02f, 4.498120397e-02f, -7.424210757e-02f,
                   1.641022116e-01f, -6.739749014e-02f, 3.489530087e-01f);
  return e * select_less(x, VecF(0.0f), g, k);
}

}  // namespace vec_detail

#if defined(CPU_CAPABILITY_AVX512)
// AVX-512 comparisons produce k-masks; at::vec turns them into all-ones vectors and blendv turns
// those back (two more instructions per select), which made relu, hardswish and the other
// memory-bound kernels ~20% slower than torch's. The policy keeps the k-mask instead.
template <class T>
struct Avx512Mask;
template <>
struct Avx512Mask<float> {
  using type = __mmask16;
  static type cmp_lt(__m512 a, __m512 b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static type cmp_le(__m512 a, __m512 b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
  static type cmp_gt(__m512 a, __m512 b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static type cmp_eq(__m512 a, __m512 b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static __m512 blend(type m, __m512 if_false, __m512 if_true) {
    return _mm512_mask_blend_ps(m, if_false, if_true);
  }
};
template <>
struct Avx512Mask<double> {
  using type = __mmask8;
  static type cmp_lt(__m512d a, __m512d b) { return _mm512_cmp_pd_mask(a, b, _CMP_LT_OQ); }
  static type cmp_le(__m512d a, __m512d b) { return _mm512_cmp_pd_mask(a, b, _CMP_LE_OQ); }
  static type cmp_gt(__m512d a, __m512d b) { return _mm512_cmp_pd_mask(a, b, _CMP_GT_OQ); }
  static type cmp_eq(__m512d a, __m512d b) { return _mm512_cmp_pd_mask(a, b, _CMP_EQ_OQ); }
  static __m512d blend(type m, __m512d if_false, __m512d if_true) {
    return _mm512_mask_blend_pd(m, if_false, if_true);
  }
};
#endif

// P: the float math's precision (vec_detail::Precision); double always uses at::vec's.
template <class T, vec_detail::Precision P = vec_detail::Precision::kFull>
struct VecMath {
  using V = at::vec::Vectorized<T>;
#if defined(CPU_CAPABILITY_AVX512)
  using K = Avx512Mask<T>;
  using Mask = typename K::type;
  static Mask lt(const V& a, const V& b) { return K::cmp_lt(a, b); }
  static Mask le(const V& a, const V& b) { return K::cmp_le(a, b); }
  static Mask gt(const V& a, const V& b) { return K::cmp_gt(a, b); }
  static Mask eq(const V& a, const V& b) { return K::cmp_eq(a, b); }
  static V select(Mask cond, const V& if_true, const V& if_false) {
    return K::blend(cond, if_false, if_true);
  }
#else
  using Mask = V;
  static Mask lt(const V& a, const V& b) { return a < b; }
  static Mask le(const V& a, const V& b) { return a <= b; }
  static Mask gt(const V& a, const V& b) { return a > b; }
  static Mask eq(const V& a, const V& b) { return a == b; }
  static V select(const Mask& cond, const V& if_true, const V& if_false) {
    return V::blendv(if_false, if_true, cond);  // blendv(a, b, mask) = mask ? b : a
  }
#endif
  static V exp(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return vec_detail::exp<P>(x);
    } else {
      return x.exp();
    }
  }
  static V expm1(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return vec_detail::expm1<P>(x);
    } else {
      return x.expm1();
    }
  }
  static V log1p(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return vec_detail::log1p(x);
    } else {
      return x.log1p();
    }
  }
  // log1p for x in [0, 1] only (see vec_detail::log1p_unit)
  static V log1p_unit(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return vec_detail::log1p_unit<P>(x);
    } else {
      return x.log1p();
    }
  }
  static V erf_softplus(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return vec_detail::erf_softplus<P>(x, vec_detail::erf_softplus_exp<P>(x));
    } else {
      return softplus<VecMath>(x).erf();
    }
  }
  static void erf_softplus_and_grad(const V& x, V& value, V& grad) {
    if constexpr (std::is_same_v<T, float>) {
      const V e = vec_detail::erf_softplus_exp<P>(x);
      value = vec_detail::erf_softplus<P>(x, e);
      grad = vec_detail::erf_softplus_grad<P>(x, e);
    } else {
      const V sp = softplus<VecMath>(x);
      value = sp.erf();
      grad = erf_softplus_grad_exact<VecMath>(x, sp);
    }
  }
  static void normal_cdf_pdf(const V& x, V& cdf, V& pdf) {
    if constexpr (std::is_same_v<T, float>) {
      vec_detail::normal_cdf_pdf<P>(x, cdf, pdf);
    } else {
      cdf = V(0.5) * (x * V(-0.70710678118654752440)).erfc();
      pdf = (V(-0.5) * x * x).exp() * V(0.39894228040143267794);
    }
  }
  static V normal_cdf(const V& x) {  // inlined: the density's one multiply is dropped
    V cdf, pdf;
    normal_cdf_pdf(x, cdf, pdf);
    return cdf;
  }
  static V abs(const V& x) { return x.abs(); }
  static V neg(const V& x) { return x.neg(); }
  // max(lo, x) / min(hi, x) return their second operand, x, when either is NaN
  static V clamp_min(const V& x, const V& lo) { return at::vec::clamp_min(x, lo); }
  static V clamp_max(const V& x, const V& hi) { return at::vec::clamp_max(x, hi); }
};

}  // namespace CPU_CAPABILITY
}  // namespace mishkit::act
