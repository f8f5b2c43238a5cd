// Recovering the pre-activation z from y = f(z) and one branch bit, shared by the CPU (scalar and
// at::vec) and CUDA kernels of the output-saving BatchNorm + activation ops.
//
// No torch headers: compiles under plain g++ and `nvcc -c`. The method, the table layout and the
// accuracy are documented in mishkit/backends/inversion.py, which builds the tables; this file
// reads them. Per activation, Inverse<Op> is one of
//   - closed form (leaky_relu, elu, selu, softplus): an exact formula per branch;
//   - tabulated (the default: every smooth activation with one minimum): cubic Hermite
//     interpolation in the table at t = sqrt(y - y*) (right branch, left branch near the minimum)
//     or s = sqrt(log(-y_tail) - log(-y)) (left tail), y / k beyond the right table, then
//     kNewtonSteps<T> Newton steps (float64 only: the table is below float32's resolution);
//   - not invertible (relu, hardswish, hardmish: flat regions); the ops reject these.
//
// The math policy M of activations.h is extended by Ext<M> (sqrt, log, floor, table gather): the
// scalar one is here, the at::vec one in cpu/inverse_vec_math.h.
#pragma once

#include <math.h>

#include <cstdint>

#include "activations.h"

namespace mishkit::inv {
// Instruction-set builds of the CPU kernels keep their copies apart (see cpu/isa_prelude.h).
#ifdef CPU_CAPABILITY
inline namespace CPU_CAPABILITY {
#endif

// The table layout of mishkit/backends/inversion.py (TABLE_INTERVALS, HEADER, H_*).
constexpr int kIntervals = 256;
constexpr int kHeader = 16;
constexpr int kNodes = kIntervals + 1;
constexpr int64_t kTableSize = kHeader + 6 * kNodes;
enum HeaderField : int {
  kZStar, kYStar, kInvK, kTRight, kScaleRight, kTLeft, kScaleLeft, kLogTail, kScaleTail
};

template <class T>
struct NewtonSteps {
  static constexpr int value = 0;
};
template <>
struct NewtonSteps<double> {
  static constexpr int value = 2;
};

// Scalar extension of act::ScalarMath (host and device).
template <class M>
struct Ext;

#define MISHKIT_SCALAR_EXT(T, SUFFIX)                                                      \
  template <>                                                                              \
  struct Ext<act::ScalarMath<T>> {                                                         \
    static HOST_DEVICE T sqrt(T x) { return ::sqrt##SUFFIX(x); }                           \
    static HOST_DEVICE T log(T x) { return ::log##SUFFIX(x); }                             \
    static HOST_DEVICE T floor(T x) { return ::floor##SUFFIX(x); }                         \
    static HOST_DEVICE T gather(const T* base, T index) {                                  \
      return base[static_cast<int64_t>(index)];                                            \
    }                                                                                      \
    static HOST_DEVICE bool any(bool mask) { return mask; }                                \
  };
MISHKIT_SCALAR_EXT(float, f)
MISHKIT_SCALAR_EXT(double, )
#undef MISHKIT_SCALAR_EXT

// Everything one call of the kernels knows, in the value type V of the policy (broadcast once).
// T is the compute type of the table. Unused fields are 0 (closed forms have no table).
template <class V, class T>
struct Context {
  act::Params<V> p;
  const T* values;  // 3 * kNodes node values: right, left, tail
  const T* slopes;  // 3 * kNodes slopes per node spacing
  V z_star, y_star, inv_k, t_right, scale_right, t_left, scale_left, log_tail, scale_tail;
  V floor;      // closed forms: the lowest z the output still resolves (ELU saturation, ...)
  V log_floor;  // tabulated: log of the smallest |y| the tail lookup takes (y = 0 -> this)
};

template <class V, class T>
HOST_DEVICE Context<V, T> make_context(const act::Params<T>& p, const T* table, T floor,
                                  T log_floor) {
  Context<V, T> c{};
  c.p = {V(p.p0), V(p.p1)};
  c.floor = V(floor);
  c.log_floor = V(log_floor);
  if (table != nullptr) {
    c.values = table + kHeader;
    c.slopes = table + kHeader + 3 * kNodes;
    c.z_star = V(table[kZStar]);
    c.y_star = V(table[kYStar]);
    c.inv_k = V(table[kInvK]);
    c.t_right = V(table[kTRight]);
    c.scale_right = V(table[kScaleRight]);
    c.t_left = V(table[kTLeft]);
    c.scale_left = V(table[kScaleLeft]);
    c.log_tail = V(table[kLogTail]);
    c.scale_tail = V(table[kScaleTail]);
  }
  return c;
}

template <class M, class V = typename M::V>
HOST_DEVICE V max_of(V a, V b) {  // NaN in a gives b
  return M::select(M::gt(a, b), a, b);
}

template <class M, class V = typename M::V>
HOST_DEVICE V min_of(V a, V b) {  // NaN in a gives b
  return M::select(M::lt(a, b), a, b);
}

// Cubic Hermite interpolation at q in [0, kIntervals] of the table starting at node `base`.
template <class M, class V, class T>
HOST_DEVICE V hermite(const Context<V, T>& c, V q, V base) {
  using E = Ext<M>;
  const V i = min_of<M>(E::floor(q), V(kIntervals - 1));
  const V w = q - i;
  const V at = i + base;
  const V z0 = E::gather(c.values, at), z1 = E::gather(c.values + 1, at);
  const V m0 = E::gather(c.slopes, at), m1 = E::gather(c.slopes + 1, at);
  const V w2 = w * w;
  const V w3 = w2 * w;
  return (V(2) * w3 - V(3) * w2 + V(1)) * z0 + (w3 - V(2) * w2 + w) * m0 +
         (V(3) * w2 - V(2) * w3) * z1 + (w3 - w2) * m1;
}

// The default: a smooth activation with one minimum (z*, y*), tabulated.
template <class Op>
struct Inverse {
  static constexpr bool kInvertible = true;
  static constexpr bool kTabulated = true;
  static HOST_DEVICE const char* reason(double, double) { return nullptr; }

  template <class M, class V = typename M::V, class T>
  static HOST_DEVICE V invert(V y, typename M::Mask left, const Context<V, T>& c) {
    using E = Ext<M>;
    const V t = E::sqrt(max_of<M>(y - c.y_star, V(0)));  // y below y* (rounding): the minimum
    const typename M::Mask near = M::le(t, c.t_left);
    // the left tail's variable; its log is skipped where no element is in the tail (most often)
    V s(0);
    if (E::any(M::gt(M::select(left, M::select(near, V(0), V(1)), V(0)), V(0.5)))) {
      const V log_neg = max_of<M>(E::log(M::neg(y)), c.log_floor);  // y >= 0 or NaN: the floor
      s = E::sqrt(max_of<M>(c.log_tail - log_neg, V(0)));
    }
    V q = M::select(left, M::select(near, t * c.scale_left, s * c.scale_tail), t * c.scale_right);
    const V base = M::select(left, M::select(near, V(kNodes), V(2 * kNodes)), V(0));
    q = max_of<M>(min_of<M>(q, V(kIntervals)), V(0));  // NaN -> kIntervals: in bounds
    V z = hermite<M>(c, q, base);
    z = M::select(left, z, M::select(M::gt(t, c.t_right), y * c.inv_k, z));
    for (int k = 0; k < NewtonSteps<T>::value; ++k) {
      const V step = (Op::template forward<M>(z, c.p) - y) / Op::template derivative<M>(z, c.p);
      z = M::select(M::lt(M::abs(step), V(INFINITY)), z - step, z);  // f' = 0 / NaN: no step
      z = M::select(left, min_of<M>(z, c.z_star), max_of<M>(z, c.z_star));
    }
    return M::select(M::eq(y, y), z, y);  // NaN in, NaN out
  }
};

// Not invertible: flat regions.
struct FlatInverse {
  static constexpr bool kInvertible = false;
  static constexpr bool kTabulated = false;
  template <class M, class V = typename M::V, class T>
  static HOST_DEVICE V invert(V y, typename M::Mask, const Context<V, T>&) {
    return y;  // unreachable: the ops reject these activations
  }
};

template <>
struct Inverse<act::Relu> : FlatInverse {
  static HOST_DEVICE const char* reason(double, double) { return "it is 0 for every z <= 0"; }
};
template <>
struct Inverse<act::Hardswish> : FlatInverse {
  static HOST_DEVICE const char* reason(double, double) { return "it is 0 for every z <= -3"; }
};
template <>
struct Inverse<act::Hardmish> : FlatInverse {
  static HOST_DEVICE const char* reason(double, double) { return "it is 0 for every z <= -2"; }
};

struct ClosedForm {
  static constexpr bool kInvertible = true;
  static constexpr bool kTabulated = false;
};

template <>
struct Inverse<act::LeakyRelu> : ClosedForm {
  static HOST_DEVICE const char* reason(double slope, double) {
    return slope == 0 ? "with negative_slope=0 it is 0 for every z <= 0" : nullptr;
  }
  template <class M, class V = typename M::V, class T>
  static HOST_DEVICE V invert(V y, typename M::Mask left, const Context<V, T>& c) {
    return M::select(left, y / c.p.p0, y);
  }
};

// z = log1p(u) for u = y / (alpha [scale]) on the branch below 0: expm1(z) rounds to -1 below
// c.floor, which is where z stops; NaN stays NaN.
template <class M, class V = typename M::V, class T>
HOST_DEVICE V expm1_branch(V y, V u, const Context<V, T>& c) {
  const V below = max_of<M>(M::log1p(max_of<M>(u, V(-1))), c.floor);
  return M::select(M::eq(y, y), below, y);
}

template <>
struct Inverse<act::Elu> : ClosedForm {
  static HOST_DEVICE const char* reason(double alpha, double) {
    return alpha == 0 ? "with alpha=0 it is 0 for every z <= 0" : nullptr;
  }
  template <class M, class V = typename M::V, class T>
  static HOST_DEVICE V invert(V y, typename M::Mask left, const Context<V, T>& c) {
    return M::select(left, expm1_branch<M>(y, y / c.p.p0, c), y);
  }
};

template <>
struct Inverse<act::Selu> : ClosedForm {
  static HOST_DEVICE const char* reason(double, double) { return nullptr; }
  template <class M, class V = typename M::V, class T>
  static HOST_DEVICE V invert(V y, typename M::Mask left, const Context<V, T>& c) {
    const V u = y / V(act::kSeluScale * act::kSeluAlpha);
    return M::select(left, expm1_branch<M>(y, u, c), y / V(act::kSeluScale));
  }
};

// Below threshold / beta: log(expm1(beta y)) / beta; y = 0 (underflow) stops at c.floor.
template <>
struct Inverse<act::Softplus> : ClosedForm {
  static HOST_DEVICE const char* reason(double beta, double) {
    return beta > 0 ? nullptr
                    : "only beta > 0 is supported (its branches are z < threshold / beta and "
                      "above)";
  }
  template <class M, class V = typename M::V, class T>
  static HOST_DEVICE V invert(V y, typename M::Mask left, const Context<V, T>& c) {
    const V below = max_of<M>(Ext<M>::log(M::expm1(y * c.p.p0)) / c.p.p0, c.floor);
    return M::select(left, M::select(M::eq(y, y), below, y), y);
  }
};

// Why activation `id` with these parameters cannot be inverted, or nullptr.
inline const char* non_invertible_reason(act::ActId id, const double* params) {
  return act::visit_activation(
      id, [&](auto op) { return Inverse<decltype(op)>::reason(params[0], params[1]); });
}

inline bool is_tabulated(act::ActId id) {
  return act::visit_activation(id, [](auto op) { return Inverse<decltype(op)>::kTabulated; });
}

#ifdef CPU_CAPABILITY
}  // namespace CPU_CAPABILITY
#endif
}  // namespace mishkit::inv
