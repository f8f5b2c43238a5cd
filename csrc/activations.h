// One scalar definition per activation (forward + derivative), shared by every C++/CUDA kernel.
//
// No torch headers: this file compiles under plain g++ and under `nvcc -c` on a GPU-less machine.
//
// API for kernel authors (CPU, CUDA, and the fused BatchNorm+activation kernels):
//
//   struct <Functor> {                       // Mish, Silu, Gelu, ... (see the list below)
//     static constexpr int kNumParams;       // how many floats it takes, in registry.py order
//     static constexpr const char* kParams;  // their names ("beta, threshold"), for errors
//     template <class M> static V forward(V x, const Params<V>& p);     // f(x)
//     template <class M> static V derivative(V x, const Params<V>& p);  // f'(x)
//   };                                       // V = typename M::V
//
// M is a *math policy*: it names the value type V and the few primitives the formulas use: exp,
// expm1, log1p, log1p_unit (log1p for arguments in [0, 1], which a SIMD policy evaluates for a
// third of the cost), normal_cdf (Phi) and normal_cdf_pdf (Phi and the density phi from one
// exponential), erf_softplus (erf(softplus(x))) and erf_softplus_and_grad (it and its derivative;
// a SIMD policy evaluates both from one exponential, without division), abs, neg, comparisons
// returning M::Mask, select, and clamp_min / clamp_max, which return x when it is NaN (one
// max/min instruction in SIMD). The same formula therefore instantiates for scalars
// (ScalarMath<float>, ScalarMath<double>, here: CPU tails and CUDA) and for SIMD vectors
// (VecMath<T> over at::vec::Vectorized<T>, in cpu/vec_math.h).
// Arithmetic is + - * / on V; constants are written V(c). Half types are computed in float.
//
//   float y  = act::Mish::forward<act::ScalarMath<float>>(x, act::Params<float>{});
//   float dy = g * act::Softplus::derivative<act::ScalarMath<float>>(x, {beta, threshold});
//
// Name-based dispatch: ActId, kActivationNames[], kActivationNumParams[], visit_activation(id, f)
// (calls f(Functor{})) and find_activation(name) are generated from MISHKIT_FOR_EACH_ACTIVATION.
// Adding an activation = one functor + one line in that list here + one registry.py entry.
//
// Semantics follow mishkit/registry.py exactly: mathematical limits at +-inf (mish(-inf) = 0, not
// the nan of inf * 0), NaN in -> NaN out except where the reference's comparisons say otherwise,
// torch's kink conventions, and overflow-safe forms (inputs are clamped where the result has
// provably saturated). Exact libm calls only: kernels must not be built with fast-math.
#pragma once

#include <math.h>

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE inline
#endif

namespace mishkit::act {

constexpr int kMaxParams = 2;

// Activation parameters converted to the compute type (Vectorized: broadcast once per loop).
template <class V>
struct Params {
  V p0;
  V p1;
};

// -- scalar math policy (float / double; host and device) -----------------------------------------
template <class T>
struct ScalarMath;

// the exact forms of the erf_softplus primitives (below, with the building blocks)
template <class M, class V>
HOST_DEVICE V softplus(V x);
template <class M, class V>
HOST_DEVICE V erf_softplus_grad_exact(V x, V softplus_x);

#define MISHKIT_SCALAR_MATH(T, SUFFIX)                                                  \
  template <>                                                                           \
  struct ScalarMath<T> {                                                                \
    using V = T;                                                                        \
    using Mask = bool;                                                                  \
    static HOST_DEVICE T exp(T x) { return ::exp##SUFFIX(x); }                          \
    static HOST_DEVICE T expm1(T x) { return ::expm1##SUFFIX(x); }                      \
    static HOST_DEVICE T log1p(T x) { return ::log1p##SUFFIX(x); }                      \
    static HOST_DEVICE T log1p_unit(T x) { return ::log1p##SUFFIX(x); }                 \
    static HOST_DEVICE T erf_softplus(T x) {                                            \
      return ::erf##SUFFIX(softplus<ScalarMath>(x));                                    \
    }                                                                                   \
    static HOST_DEVICE void erf_softplus_and_grad(T x, T& value, T& grad) {             \
      const T sp = softplus<ScalarMath>(x);                                             \
      value = ::erf##SUFFIX(sp);                                                        \
      grad = erf_softplus_grad_exact<ScalarMath>(x, sp);                                \
    }                                                                                   \
    static HOST_DEVICE T normal_cdf(T x) {                                              \
      return T(0.5) * ::erfc##SUFFIX(x * T(-0.70710678118654752440));                   \
    }                                                                                   \
    static HOST_DEVICE void normal_cdf_pdf(T x, T& cdf, T& pdf) {                       \
      cdf = normal_cdf(x);                                                              \
      pdf = ::exp##SUFFIX(T(-0.5) * x * x) * T(0.39894228040143267794); /* 1/sqrt(2pi) */ \
    }                                                                                   \
    static HOST_DEVICE T abs(T x) { return ::fabs##SUFFIX(x); }                         \
    static HOST_DEVICE T neg(T x) { return -x; }                                        \
    static HOST_DEVICE bool lt(T a, T b) { return a < b; }                              \
    static HOST_DEVICE bool le(T a, T b) { return a <= b; }                             \
    static HOST_DEVICE bool gt(T a, T b) { return a > b; }                              \
    static HOST_DEVICE bool eq(T a, T b) { return a == b; }                             \
    static HOST_DEVICE T select(bool cond, T if_true, T if_false) {                     \
      return cond ? if_true : if_false;                                                 \
    }                                                                                   \
    static HOST_DEVICE T clamp_min(T x, T lo) { return x < lo ? lo : x; }               \
    static HOST_DEVICE T clamp_max(T x, T hi) { return x > hi ? hi : x; }               \
  };
MISHKIT_SCALAR_MATH(float, f)
MISHKIT_SCALAR_MATH(double, )
#undef MISHKIT_SCALAR_MATH

// -- shared building blocks -----------------------------------------------------------------------

// Replace f(-inf) (and f(+inf)) by the limit: the x * g(x) forms give inf * 0 = nan there.
template <class M, class V>
HOST_DEVICE V with_limits(V x, V y, V at_neg_inf) {
  return M::select(M::eq(x, V(-INFINITY)), at_neg_inf, y);
}
template <class M, class V>
HOST_DEVICE V with_limits(V x, V y, V at_neg_inf, V at_pos_inf) {
  y = M::select(M::eq(x, V(-INFINITY)), at_neg_inf, y);
  return M::select(M::eq(x, V(INFINITY)), at_pos_inf, y);
}

// clamp that lets NaN through (lo < hi)
template <class M, class V>
HOST_DEVICE V clamp(V x, V lo, V hi) {
  return M::clamp_max(M::clamp_min(x, lo), hi);
}

// 1 / (1 + e^-x): exact to rounding everywhere, and e^-x overflowing to inf gives the right 0.
template <class M, class V>
HOST_DEVICE V sigmoid(V x) {
  return V(1) / (V(1) + M::exp(M::neg(x)));
}

// sigmoid(x) and sigmoid'(x) = s (1 - s) from u = e^-|x| in (0, 1]: no overflow, no cancellation.
template <class M, class V>
HOST_DEVICE void sigmoid_and_slope(V x, V& s, V& slope) {
  const V u = M::exp(M::neg(M::abs(x)));
  const V r = V(1) / (V(1) + u);
  s = M::select(M::lt(x, V(0)), u * r, r);
  slope = u * r * r;
}

// log(1 + e^x) = max(x, 0) + log1p(e^-|x|): no overflow
template <class M, class V>
HOST_DEVICE V log1p_exp(V x) {
  return M::clamp_min(x, V(0)) + M::log1p_unit(M::exp(M::neg(M::abs(x))));
}

// torch's softplus at its default threshold: x itself beyond 20
template <class M, class V>
HOST_DEVICE V softplus(V x) {
  return M::select(M::gt(x, V(20)), x, log1p_exp<M>(x));
}

// d/dx erf(softplus(x)) = (2 / sqrt(pi)) e^(-softplus(x)^2) sigmoid(x), composed
template <class M, class V>
HOST_DEVICE V erf_softplus_grad_exact(V x, V softplus_x) {
  return V(1.12837916709551257390) * M::exp(M::neg(softplus_x * softplus_x)) * sigmoid<M>(x);
}

// Base of the parameterless activations.
struct NoParams {
  static constexpr int kNumParams = 0;
  static constexpr const char* kParams = "";
};

// -- the activations ------------------------------------------------------------------------------
// Each formula states the identity it uses when it departs from the registry's literal form.

// x tanh(softplus(x)). With e = e^x and n = e (e + 2): tanh(softplus(x)) = n / (n + 2) and
// f'(x) = n / (n + 2) + 4 x e (e + 1) / (n + 2)^2 (one exp instead of exp, log1p and tanh).
// Beyond x = 20, tanh(softplus(x)) == 1 in float64 already, so x is clamped there (no overflow).
struct Mish : NoParams {
  template <class M, class V = typename M::V>
  static HOST_DEVICE V forward(V x, const Params<V>&) {
    const V e = M::exp(M::select(M::gt(x, V(20)), V(20), x));
    const V n = e * (e + V(2));
    return with_limits<M>(x, x * (n / (n + V(2))), V(0));
  }
  // One reciprocal r = 1 / (n + 2) serves both terms: tanh(softplus(x)) = n r and
  // sigmoid(x) (1 - tanh^2(softplus(x))) = 4 e (e + 1) r^2.
  template <class M, class V = typename M::V>
  static HOST_DEVICE V derivative(V x, const Params<V>&) {
    const V e = M::exp(M::select(M::gt(x, V(20)), V(20), x));
    const V n = e * (e + V(2));
    const V r = V(1) / (n + V(2));
    const V d = n * r + x * (V(4) * e * (e + V(1)) * (r * r));  // x last: no 4 x overflow
    return with_limits<M>(x, M::select(M::gt(x, V(20)), V(1), d), V(0), V(1));
  }
};

struct Silu : NoParams {
  template <class M, class V = typename M::V>
  static HOST_DEVICE V forward(V x, const Params<V>&) {
    return with_limits<M>(x, x / (V(1) + M::exp(M::neg(x))), V(0));
  }
  template <class M, class V = typename M::V>
  static HOST_DEVICE V derivative(V x, const Params<V>&) {
    V s, slope;
    sigmoid_and_slope<M>(x, s, slope);
    return with_limits<M>(x, s + x * slope, V(0), V(1));
  }
};

// x Phi(x). The policies keep Phi's relative precision for x << 0 (0.5 erfc(-x / sqrt 2), not
// 0.5 (1 + erf), which cancels), and give the density phi with Phi for the derivative.
struct Gelu : NoParams {
  template <class M, class V = typename M::V>
  static HOST_DEVICE V forward(V x, const Params<V>&) {
    return with_limits<M>(x, x * M::normal_cdf(x), V(0));
  }
  template <class M, class V = typename M::V>
  static HOST_DEVICE V derivative(V x, const Params<V>&) {
    V cdf, pdf;
    M::normal_cdf_pdf(x, cdf, pdf);
    return with_limits<M>(x, cdf + x * pdf, V(0), V(1));
  }
};

// (1 + tanh z) / 2 = sigmoid(2 z), z = sqrt(2/pi) (x + 0.044715 x^3): no cancellation for x << 0.
// The derivative clamps x to +-10 (where the result is exactly 1 / 0 in float64): x^2 * 0 would
// otherwise overflow to inf * 0 = nan in float32 for |x| > 1.8e19.
struct GeluTanh : NoParams {
  template <class M, class V = typename M::V>
  static HOST_DEVICE V two_z(V x) {
    return V(2 * 0.79788456080286535588) * x * (V(1) + V(0.044715) * x * x);
  }
  template <class M, class V = typename M::V>
  static HOST_DEVICE V forward(V x, const Params<V>&) {
    return with_limits<M>(x, x / (V(1) + M::exp(M::neg(two_z<M>(x)))), V(0));
  }
  template <class M, class V = typename M::V>
  static HOST_DEVICE V derivative(V x, const Params<V>&) {
    const V xc = clamp<M>(x, V(-10), V(10));
    V s, slope;
    sigmoid_and_slope<M>(two_z<M>(xc), s, slope);
    const V two_z_grad = V(2 * 0.79788456080286535588) * (V(1) + V(3 * 0.044715) * xc * xc);
    const V d = s + xc * slope * two_z_grad;
    return M::select(M::gt(x, V(10)), V(1), M::select(M::lt(x, V(-10)), V(0), d));
  }
};

struct Hardswish : NoParams {
  template <class M, class V = typename M::V>
  static HOST_DEVICE V forward(V x, const Params<V>&) {
    return with_limits<M>(x, x * (clamp<M>(x + V(3), V(0), V(6)) / V(6)), V(0));  // no x 6 overflow
  }
  template <class M, class V = typename M::V>
  static HOST_DEVICE V derivative(V x, const Params<V>&) {
    // torch's measured kink convention: 0 for x <= -3, x/3 + 1/2 below 3, 1 from 3 on (NaN -> 1)
    return M::select(M::le(x, V(-3)), V(0),
                     M::select(M::lt(x, V(3)), x / V(3) + V(0.5), V(1)));
  }
};

struct Hardmish : NoParams {
  template <class M, class V = typename M::V>
  static HOST_DEVICE V forward(V x, const Params<V>&) {
    return with_limits<M>(x, x * (clamp<M>(x + V(2), V(0), V(2)) / V(2)), V(0));
  }
  template <class M, class V = typename M::V>
  static HOST_DEVICE V derivative(V x, const Params<V>&) {
    return M::select(M::lt(x, V(-2)), V(0), M::select(M::le(x, V(0)), x + V(1), V(1)));
  }
};

// torch semantics: x itself where beta x > threshold. log1p_exp cannot overflow (a threshold of inf
// lets bx reach exp's range).
struct Softplus {
  static constexpr int kNumParams = 2;
  static constexpr const char* kParams = "beta, threshold";
  template <class M, class V = typename M::V>
  static HOST_DEVICE V forward(V x, const Params<V>& p) {
    const V bx = x * p.p0;
    return M::select(M::gt(bx, p.p1), x, log1p_exp<M>(bx) / p.p0);
  }
  template <class M, class V = typename M::V>
  static HOST_DEVICE V derivative(V x, const Params<V>& p) {
    const V bx = x * p.p0;
    return M::select(M::gt(bx, p.p1), V(1), sigmoid<M>(bx));
  }
};

// With e = e^x and m = expm1(-2e): tanh(e) = -m / (2 + m), sech^2(e) = 4 (1 + m) / (2 + m)^2,
// both free of cancellation. The derivative saturates to exactly 1 beyond x = 20 (as registry.py).
struct TanhExp : NoParams {
  template <class M, class V = typename M::V>
  static HOST_DEVICE V forward(V x, const Params<V>&) {
    const V m = M::expm1(V(-2) * M::exp(x));
    return with_limits<M>(x, x * (M::neg(m) / (V(2) + m)), V(0));
  }
  template <class M, class V = typename M::V>
  static HOST_DEVICE V derivative(V x, const Params<V>&) {
    const V xc = M::select(M::gt(x, V(20)), V(20), x);
    const V e = M::exp(xc);
    const V m = M::expm1(V(-2) * e);
    const V two_m = V(2) + m;
    const V d = M::neg(m) / two_m + xc * e * (V(4) * (V(1) + m) / (two_m * two_m));
    return with_limits<M>(x, M::select(M::gt(x, V(20)), V(1), d), V(0));
  }
};

// x erf(softplus(x)), softplus with torch's default threshold 20 (act::softplus). With
// s = erf(softplus(x)): f'(x) = s + x ds/dx, both from the policy's erf_softplus_and_grad.
struct Serf : NoParams {
  template <class M, class V = typename M::V>
  static HOST_DEVICE V forward(V x, const Params<V>&) {
    return with_limits<M>(x, x * M::erf_softplus(x), V(0));
  }
  template <class M, class V = typename M::V>
  static HOST_DEVICE V derivative(V x, const Params<V>&) {
    V s, ds;
    M::erf_softplus_and_grad(x, s, ds);
    return with_limits<M>(x, s + x * ds, V(0), V(1));
  }
};

// With s = sigmoid(x) and m = s (s + 2): tanh(log1p(s)) = m / (m + 2) and
// 1 - tanh^2 = 4 (1 + s)^2 / (m + 2)^2.
struct Smish : NoParams {
  template <class M, class V = typename M::V>
  static HOST_DEVICE V forward(V x, const Params<V>&) {
    const V s = sigmoid<M>(x);
    const V m = s * (s + V(2));
    return with_limits<M>(x, x * (m / (m + V(2))), V(0));
  }
  template <class M, class V = typename M::V>
  static HOST_DEVICE V derivative(V x, const Params<V>&) {
    V s, slope;
    sigmoid_and_slope<M>(x, s, slope);
    const V m = s * (s + V(2));
    const V q = m + V(2);
    const V d = m / q + x * (V(4) * (V(1) + s) * slope / (q * q));
    return with_limits<M>(x, d, V(0), V(0.6));  // tanh(log 2) = 3/5
  }
};

struct Logish : NoParams {
  template <class M, class V = typename M::V>
  static HOST_DEVICE V forward(V x, const Params<V>&) {
    return with_limits<M>(x, x * M::log1p_unit(sigmoid<M>(x)), V(0));
  }
  template <class M, class V = typename M::V>
  static HOST_DEVICE V derivative(V x, const Params<V>&) {
    V s, slope;
    sigmoid_and_slope<M>(x, s, slope);
    const V d = M::log1p_unit(s) + x * slope / (V(1) + s);
    return with_limits<M>(x, d, V(0), V(0.69314718055994530942));
  }
};

struct Relu : NoParams {
  template <class M, class V = typename M::V>
  static HOST_DEVICE V forward(V x, const Params<V>&) {
    return M::clamp_min(x, V(0));  // NaN propagates; relu(-0) = -0 as torch's
  }
  template <class M, class V = typename M::V>
  static HOST_DEVICE V derivative(V x, const Params<V>&) {
    return M::select(M::gt(x, V(0)), V(1), V(0));
  }
};

struct LeakyRelu {
  static constexpr int kNumParams = 1;
  static constexpr const char* kParams = "negative_slope";
  template <class M, class V = typename M::V>
  static HOST_DEVICE V forward(V x, const Params<V>& p) {
    return M::select(M::gt(x, V(0)), x, x * p.p0);
  }
  template <class M, class V = typename M::V>
  static HOST_DEVICE V derivative(V x, const Params<V>& p) {
    return M::select(M::gt(x, V(0)), V(1), p.p0);
  }
};

struct Elu {
  static constexpr int kNumParams = 1;
  static constexpr const char* kParams = "alpha";
  template <class M, class V = typename M::V>
  static HOST_DEVICE V forward(V x, const Params<V>& p) {
    return M::select(M::gt(x, V(0)), x, p.p0 * M::expm1(x));
  }
  template <class M, class V = typename M::V>
  static HOST_DEVICE V derivative(V x, const Params<V>& p) {
    return M::select(M::gt(x, V(0)), V(1), p.p0 * M::exp(x));
  }
};

constexpr double kSeluAlpha = 1.6732632423543772848170429916717;
constexpr double kSeluScale = 1.0507009873554804934193349852946;

struct Selu : NoParams {
  template <class M, class V = typename M::V>
  static HOST_DEVICE V forward(V x, const Params<V>&) {
    return V(kSeluScale) * M::select(M::gt(x, V(0)), x, V(kSeluAlpha) * M::expm1(x));
  }
  template <class M, class V = typename M::V>
  static HOST_DEVICE V derivative(V x, const Params<V>&) {
    return V(kSeluScale) * M::select(M::gt(x, V(0)), V(1), V(kSeluAlpha) * M::exp(x));
  }
};

// x sigmoid(k x), k = 1.702 (CLIP's "quick" GELU). The derivative multiplies x by the slope
// before k: k x overflows in float32 for |x| > 2e38 where the slope is already exactly 0.
struct QuickGelu : NoParams {
  template <class M, class V = typename M::V>
  static HOST_DEVICE V forward(V x, const Params<V>&) {
    return with_limits<M>(x, x / (V(1) + M::exp(M::neg(V(1.702) * x))), V(0));
  }
  template <class M, class V = typename M::V>
  static HOST_DEVICE V derivative(V x, const Params<V>&) {
    V s, slope;
    sigmoid_and_slope<M>(V(1.702) * x, s, slope);
    return with_limits<M>(x, s + (x * slope) * V(1.702), V(0), V(1));
  }
};

// -- name-based dispatch --------------------------------------------------------------------------
// (registry name, functor), in registry.py order.
#define MISHKIT_FOR_EACH_ACTIVATION(X) \
  X(mish, Mish)                        \
  X(silu, Silu)                        \
  X(gelu, Gelu)                        \
  X(gelu_tanh, GeluTanh)               \
  X(hardswish, Hardswish)              \
  X(hardmish, Hardmish)                \
  X(softplus, Softplus)                \
  X(tanhexp, TanhExp)                  \
  X(serf, Serf)                        \
  X(smish, Smish)                      \
  X(logish, Logish)                    \
  X(relu, Relu)                        \
  X(leaky_relu, LeakyRelu)             \
  X(elu, Elu)                          \
  X(selu, Selu)                        \
  X(quick_gelu, QuickGelu)

enum class ActId : int {
#define MISHKIT_ENUM_ENTRY(name, Functor) name,
  MISHKIT_FOR_EACH_ACTIVATION(MISHKIT_ENUM_ENTRY)
#undef MISHKIT_ENUM_ENTRY
};

#define MISHKIT_COUNT_ENTRY(name, Functor) +1
constexpr int kNumActivations = 0 MISHKIT_FOR_EACH_ACTIVATION(MISHKIT_COUNT_ENTRY);
#undef MISHKIT_COUNT_ENTRY

#define MISHKIT_NAME_ENTRY(name, Functor) #name,
constexpr const char* kActivationNames[kNumActivations] = {
    MISHKIT_FOR_EACH_ACTIVATION(MISHKIT_NAME_ENTRY)};
#undef MISHKIT_NAME_ENTRY

#define MISHKIT_NPARAMS_ENTRY(name, Functor) Functor::kNumParams,
constexpr int kActivationNumParams[kNumActivations] = {
    MISHKIT_FOR_EACH_ACTIVATION(MISHKIT_NPARAMS_ENTRY)};
#undef MISHKIT_NPARAMS_ENTRY

#define MISHKIT_PARAM_NAMES_ENTRY(name, Functor) Functor::kParams,
constexpr const char* kActivationParamNames[kNumActivations] = {
    MISHKIT_FOR_EACH_ACTIVATION(MISHKIT_PARAM_NAMES_ENTRY)};
#undef MISHKIT_PARAM_NAMES_ENTRY

// Index of `name` (exact, canonical registry name; length-delimited), or -1.
inline int find_activation(const char* name, int64_t length) {
  for (int i = 0; i < kNumActivations; ++i) {
    const char* candidate = kActivationNames[i];
    int64_t k = 0;
    while (k < length && candidate[k] != '\0' && candidate[k] == name[k]) ++k;
    if (k == length && candidate[k] == '\0') return i;
  }
  return -1;
}

// Calls f(Functor{}) for the activation `id`; every branch must return the same type.
template <class F>
inline decltype(auto) visit_activation(ActId id, F&& f) {
  switch (id) {
#define MISHKIT_VISIT_CASE(name, Functor) \
  case ActId::name:                       \
    return f(Functor{});
    MISHKIT_FOR_EACH_ACTIVATION(MISHKIT_VISIT_CASE)
#undef MISHKIT_VISIT_CASE
  }
  return f(Mish{});  // unreachable: ids come from find_activation
}

}  // namespace mishkit::act
