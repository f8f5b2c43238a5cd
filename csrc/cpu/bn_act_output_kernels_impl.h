// The output-saving BatchNorm + activation CPU loops, compiled once per CPU_CAPABILITY (see
// bn_act_output_kernels.h). Include only after defining CPU_CAPABILITY.
//
// Work is split into chunks of kChunk elements of the flat storage (a multiple of 8, so each
// chunk owns whole bytes of the mask). Inside a chunk, runs share one channel (NCHW: a plane) or
// walk contiguous channels (channels_last: a row); full vectors of a run use at::vec, the rest
// scalar code, both through the same formulas (activations.h, inverse.h). Per-channel sums go
// through thread-local double partials, accumulated in the compute type within a run (NCHW) or a
// chunk (channels_last).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "activations.h"
#include "cpu/bn_act_output_kernels.h"
#include "cpu/inverse_vec_math.h"
#include "cpu/bn_act_common.h"
#include "cpu/vec_math.h"
#include "inverse.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including bn_act_output_kernels_impl.h"
#endif

namespace mishkit::cpu::CPU_CAPABILITY {
namespace bn_act_output {

using at::vec::Vectorized;

constexpr int64_t kChunk = 4096;  // elements per task; a multiple of 8 and of every vector width

// The per-vector bodies call several large inline formulas (inverse, activation, exp); GCC's
// inliner leaves them out of line, and each call spills every vector register. flatten compiles
// each body as one function with all of them inlined.
#if defined(__GNUC__)
#define MISHKIT_FLAT __attribute__((flatten)) inline
#else
#define MISHKIT_FLAT inline
#endif

// fn(i0, i1, c0, per_element) for each run of [begin, end): elements i0..i1 have channel c0
// (NCHW, per_element false) or channels c0, c0 + 1, ... (channels_last, per_element true).
template <class Fn>
inline void for_each_run(const Geometry& g, int64_t begin, int64_t end, Fn&& fn) {
  int64_t i = begin;
  while (i < end) {
    if (g.channels_last) {
      const int64_t stop = std::min(end, (i / g.c + 1) * g.c);
      fn(i, stop, i % g.c, std::true_type{});
      i = stop;
    } else {
      const int64_t stop = std::min(end, (i / g.s + 1) * g.s);
      fn(i, stop, (i / g.s) % g.c, std::false_type{});
      i = stop;
    }
  }
}

template <class Fn>
inline void for_each_chunk(int64_t numel, Fn&& fn) {
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      fn(chunk * kChunk, std::min(numel, (chunk + 1) * kChunk));
    }
  });
}

// A per-channel value at channel c: one broadcast (a run of one channel) or a vector load.
template <class acc_t, class PerElement>
inline Vectorized<acc_t> channel_vec(const acc_t* values, int64_t c, PerElement) {
  if constexpr (PerElement::value) return Vectorized<acc_t>::loadu(values + c);
  return Vectorized<acc_t>(values[c]);
}

inline bool mask_bit(const uint8_t* mask, int64_t i) { return (mask[i >> 3] >> (i & 7)) & 1; }

// 1 << k in lane k (at most 16 lanes: float32 in AVX-512), as integers or floats.
template <class T>
alignas(64) inline constexpr T kLaneBits[16] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024,
                                                2048, 4096, 8192, 16384, 32768};

// Lanes i .. i + W - 1 of the mask as the math policy's mask (true where the bit is 1): the
// W <= 16 bits from i on, broadcast, and-ed with each lane's own bit.
template <class acc_t>
inline typename act::VecMath<acc_t>::Mask mask_lanes(const uint8_t* mask, int64_t i) {
  using V = Vectorized<acc_t>;
  using I = at::vec::int_same_size_t<acc_t>;
  constexpr int W = V::size();
  static_assert(W <= 16, "three mask bytes cover a vector");
  const int64_t first = i >> 3, last = (i + W - 1) >> 3;  // in the buffer: i + W <= numel
  uint32_t word = 0;
  for (int64_t b = last; b >= first; --b) word = (word << 8) | mask[b];
  const I bits = static_cast<I>(word >> (i & 7));
  const auto on = Vectorized<I>(bits) & Vectorized<I>::loadu(kLaneBits<I>);
  return act::VecMath<acc_t>::gt(at::vec::convert_to_fp_of_same_size<acc_t>(on), V(acc_t(0)));
}

template <class acc_t>
struct Channels {  // per-channel arrays in the compute type; unused ones null
  const acc_t* mean;
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* inv_scale;
  const acc_t* coef_xmu;
  const acc_t* coef_const;
};

// -- forward --------------------------------------------------------------------------------------

// The branch bits of a vector, lane k at bit k: lane k adds 2^k where z < split (a sum of
// distinct powers of two, exact in floating point; float's horizontal sum is a SIMD shuffle).
template <class acc_t>
inline uint32_t branch_bits(const Vectorized<acc_t>& z, acc_t split) {
  using V = Vectorized<acc_t>;
  const V weights = V::loadu(kLaneBits<acc_t>);
  return static_cast<uint32_t>(at::vec::vec_reduce_all(
      std::plus<V>(), V::blendv(V(acc_t(0)), weights, z < V(split))));
}

// y = act(z) for W elements from i; returns their branch bits.
template <class Op, class scalar_t, class PerElement>
MISHKIT_FLAT uint32_t forward_vec(const scalar_t* xp, const scalar_t* rp, scalar_t* yp,
                                  const Channels<at::opmath_type<scalar_t>>& ch,
                                  const act::Params<Vectorized<at::opmath_type<scalar_t>>>& pv,
                                  at::opmath_type<scalar_t> split, int64_t i, int64_t c,
                                  PerElement pe) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  V z = (load<acc_t>(xp + i) - channel_vec(ch.mean, c, pe)) * channel_vec(ch.scale, c, pe) +
        channel_vec(ch.shift, c, pe);
  if (rp) z = z + load<acc_t>(rp + i);
  store<acc_t>(yp + i, Op::template forward<act::VecMath<acc_t>>(z, pv));
  return branch_bits(z, split);
}

template <class Op, class scalar_t>
void forward_loop(const at::Tensor& x, const Channels<at::opmath_type<scalar_t>>& ch,
                  const at::Tensor* residual, double branch, at::Tensor& y, at::Tensor& mask,
                  const double* params) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  using SM = act::ScalarMath<acc_t>;
  constexpr int64_t W = V::size();
  const act::Params<acc_t> ps{static_cast<acc_t>(params[0]), static_cast<acc_t>(params[1])};
  const act::Params<V> pv{V(ps.p0), V(ps.p1)};
  const acc_t split = static_cast<acc_t>(branch);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* rp = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* yp = y.data_ptr<scalar_t>();
  uint8_t* mp = mask.data_ptr<uint8_t>();
  const Geometry g = geometry_of(x);
  for_each_chunk(g.numel(), [&](int64_t begin, int64_t end) {
    uint8_t bytes[kChunk / 8 + 2] = {};  // + 2: a vector's bits may spill into 2 more bytes
    const auto mark = [&](int64_t i, uint32_t bits) {  // bits of elements i, i + 1, ...
      const uint32_t shifted = bits << (i & 7);
      uint8_t* at = bytes + ((i - begin) >> 3);
      at[0] |= static_cast<uint8_t>(shifted);
      at[1] |= static_cast<uint8_t>(shifted >> 8);
      at[2] |= static_cast<uint8_t>(shifted >> 16);
    };
    for_each_run(g, begin, end, [&](int64_t i0, int64_t i1, int64_t c0, auto pe) {
      int64_t i = i0;
      for (; i + W <= i1; i += W) {
        const int64_t c = pe ? c0 + (i - i0) : c0;
        mark(i, forward_vec<Op, scalar_t>(xp, rp, yp, ch, pv, split, i, c, pe));
      }
      for (; i < i1; ++i) {
        const int64_t c = pe ? c0 + (i - i0) : c0;
        acc_t z = (static_cast<acc_t>(xp[i]) - ch.mean[c]) * ch.scale[c] + ch.shift[c];
        if (rp) z += static_cast<acc_t>(rp[i]);
        yp[i] = static_cast<scalar_t>(Op::template forward<SM>(z, ps));
        mark(i, z < split ? 1u : 0u);
      }
    });
    std::memcpy(mp + begin / 8, bytes, static_cast<size_t>((end - begin + 7) / 8));
  });
}

// -- backward -------------------------------------------------------------------------------------

// What the backward loops need per element: recovered z, then dz and x - mean. z comes from the
// reduce pass's cache when there is one (zin), else from y and its bit (and then goes to zout).
template <class Op, class scalar_t>
struct Recovery {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  using SM = act::ScalarMath<acc_t>;
  using VM = act::VecMath<acc_t>;
  const scalar_t* gp;
  const scalar_t* yp;
  const scalar_t* rp;
  const uint8_t* mp;
  const acc_t* zin;
  acc_t* zout;
  Channels<acc_t> ch;
  inv::Context<acc_t, acc_t> cs;
  inv::Context<V, acc_t> cv;

  template <class PerElement>
  MISHKIT_FLAT void vec(int64_t i, int64_t c, PerElement pe, V& dz, V& xmu) const {
    V z;
    if (zin) {
      z = V::loadu(zin + i);
    } else {
      z = inv::Inverse<Op>::template invert<VM>(load<acc_t>(yp + i), mask_lanes<acc_t>(mp, i), cv);
      if (zout) z.store(zout + i);
    }
    V u = z - channel_vec(ch.shift, c, pe);
    if (rp) u = u - load<acc_t>(rp + i);
    xmu = u * channel_vec(ch.inv_scale, c, pe);
    dz = load<acc_t>(gp + i) * Op::template derivative<VM>(z, cv.p);
  }

  MISHKIT_FLAT void scalar(int64_t i, int64_t c, acc_t& dz, acc_t& xmu) const {
    acc_t z;
    if (zin) {
      z = zin[i];
    } else {
      z = inv::Inverse<Op>::template invert<SM>(static_cast<acc_t>(yp[i]), mask_bit(mp, i), cs);
      if (zout) zout[i] = z;
    }
    acc_t u = z - ch.shift[c];
    if (rp) u -= static_cast<acc_t>(rp[i]);
    xmu = u * ch.inv_scale[c];
    dz = static_cast<acc_t>(gp[i]) * Op::template derivative<SM>(z, cs.p);
  }
};

template <class Op, class scalar_t>
Recovery<Op, scalar_t> recovery_of(const at::Tensor& grad_out, const at::Tensor& y,
                                   const at::Tensor& mask, const at::Tensor* residual,
                                   const at::Tensor* z_in, at::Tensor* z_out,
                                   const Channels<at::opmath_type<scalar_t>>& ch,
                                   const at::Tensor& table, const InverseCall& call) {
  using acc_t = at::opmath_type<scalar_t>;
  const act::Params<acc_t> ps{static_cast<acc_t>(call.params[0]),
                              static_cast<acc_t>(call.params[1])};
  const acc_t* tp = table.numel() > 0 ? table.const_data_ptr<acc_t>() : nullptr;
  const auto floor = static_cast<acc_t>(call.floor);
  const auto log_floor = static_cast<acc_t>(call.log_floor);
  return {grad_out.const_data_ptr<scalar_t>(),
          y.const_data_ptr<scalar_t>(),
          residual ? residual->const_data_ptr<scalar_t>() : nullptr,
          mask.const_data_ptr<uint8_t>(),
          z_in ? z_in->const_data_ptr<acc_t>() : nullptr,
          z_out ? z_out->data_ptr<acc_t>() : nullptr,
          ch,
          inv::make_context<acc_t, acc_t>(ps, tp, floor, log_floor),
          inv::make_context<Vectorized<acc_t>, acc_t>(ps, tp, floor, log_floor)};
}

template <class Op, class scalar_t>
void backward_reduce_loop(const Recovery<Op, scalar_t>& r, const Geometry& g, at::Tensor& sum_dz,
                          at::Tensor& sum_dz_xmu) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const int threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * 2 * g.c, 0.0);
  for_each_chunk(g.numel(), [&](int64_t begin, int64_t end) {
    double* mine = partial.data() + static_cast<size_t>(at::get_thread_num()) * 2 * g.c;
    // channels_last: this chunk's sums per channel
    std::vector<acc_t> row_a(g.channels_last ? g.c : 0), row_b(g.channels_last ? g.c : 0);
    for_each_run(g, begin, end, [&](int64_t i0, int64_t i1, int64_t c0, auto pe) {
      V a(0), b(0);
      acc_t a_tail = 0, b_tail = 0;
      int64_t i = i0;
      for (; i + W <= i1; i += W) {
        const int64_t c = pe ? c0 + (i - i0) : c0;
        V dz, xmu;
        r.vec(i, c, pe, dz, xmu);
        if constexpr (decltype(pe)::value) {
          (V::loadu(row_a.data() + c) + dz).store(row_a.data() + c);
          (V::loadu(row_b.data() + c) + dz * xmu).store(row_b.data() + c);
        } else {
          a = a + dz;
          b = b + dz * xmu;
        }
      }
      for (; i < i1; ++i) {
        const int64_t c = pe ? c0 + (i - i0) : c0;
        acc_t dz, xmu;
        r.scalar(i, c, dz, xmu);
        if constexpr (decltype(pe)::value) {
          row_a[c] += dz;
          row_b[c] += dz * xmu;
        } else {
          a_tail += dz;
          b_tail += dz * xmu;
        }
      }
      if constexpr (!decltype(pe)::value) {
        mine[c0] += static_cast<double>(at::vec::vec_reduce_all(std::plus<V>(), a) + a_tail);
        mine[g.c + c0] += static_cast<double>(at::vec::vec_reduce_all(std::plus<V>(), b) + b_tail);
      }
    });
    if (g.channels_last) {
      for (int64_t c = 0; c < g.c; ++c) {
        mine[c] += row_a[c];
        mine[g.c + c] += row_b[c];
      }
    }
  });
  acc_t* out_a = sum_dz.data_ptr<acc_t>();
  acc_t* out_b = sum_dz_xmu.data_ptr<acc_t>();
  for (int64_t c = 0; c < g.c; ++c) {
    double a = 0, b = 0;
    for (int t = 0; t < threads; ++t) {
      a += partial[static_cast<size_t>(t) * 2 * g.c + c];
      b += partial[static_cast<size_t>(t) * 2 * g.c + g.c + c];
    }
    out_a[c] = static_cast<acc_t>(a);
    out_b[c] = static_cast<acc_t>(b);
  }
}

template <class Op, class scalar_t>
void backward_elemt_loop(const Recovery<Op, scalar_t>& r, const Geometry& g, at::Tensor& grad_x,
                         at::Tensor* grad_residual) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  scalar_t* out = grad_x.data_ptr<scalar_t>();
  scalar_t* out_r = grad_residual ? grad_residual->data_ptr<scalar_t>() : nullptr;
  for_each_chunk(g.numel(), [&](int64_t begin, int64_t end) {
    for_each_run(g, begin, end, [&](int64_t i0, int64_t i1, int64_t c0, auto pe) {
      int64_t i = i0;
      for (; i + W <= i1; i += W) {
        const int64_t c = pe ? c0 + (i - i0) : c0;
        V dz, xmu;
        r.vec(i, c, pe, dz, xmu);
        store<acc_t>(out + i, dz * channel_vec(r.ch.scale, c, pe) +
                                  xmu * channel_vec(r.ch.coef_xmu, c, pe) +
                                  channel_vec(r.ch.coef_const, c, pe));
        if (out_r) store<acc_t>(out_r + i, dz);
      }
      for (; i < i1; ++i) {
        const int64_t c = pe ? c0 + (i - i0) : c0;
        acc_t dz, xmu;
        r.scalar(i, c, dz, xmu);
        out[i] = static_cast<scalar_t>(dz * r.ch.scale[c] + xmu * r.ch.coef_xmu[c] +
                                       r.ch.coef_const[c]);
        if (out_r) out_r[i] = static_cast<scalar_t>(dz);
      }
    });
  });
}

// -- dtype and activation dispatch ----------------------------------------------------------------

#define MISHKIT_BN_OUTPUT_DISPATCH(x, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), NAME, __VA_ARGS__)

// Calls f(Op{}) for invertible activations only (the glue rejects the others first).
template <class F>
inline void visit_invertible(act::ActId id, F&& f) {
  act::visit_activation(id, [&](auto op) {
    if constexpr (inv::Inverse<decltype(op)>::kInvertible) f(op);
  });
}

inline void forward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                    const at::Tensor& shift, const at::Tensor* residual, double branch,
                    at::Tensor& y, at::Tensor& mask, act::ActId id, const double* params) {
  MISHKIT_BN_OUTPUT_DISPATCH(x, "mishkit_bn_act_output_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Channels<acc_t> ch{mean.data_ptr<acc_t>(), scale.data_ptr<acc_t>(),
                             shift.data_ptr<acc_t>(), nullptr, nullptr, nullptr};
    visit_invertible(id, [&](auto op) {
      forward_loop<decltype(op), scalar_t>(x, ch, residual, branch, y, mask, params);
    });
  });
}

inline void backward_reduce(const at::Tensor& grad_out, const at::Tensor& y,
                            const at::Tensor& mask, const at::Tensor& scale,
                            const at::Tensor& inv_scale, const at::Tensor& shift,
                            const at::Tensor* residual, const at::Tensor& table,
                            const InverseCall& call, at::Tensor& sum_dz, at::Tensor& sum_dz_xmu,
                            at::Tensor* z) {
  MISHKIT_BN_OUTPUT_DISPATCH(y, "mishkit_bn_act_output_backward_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Channels<acc_t> ch{nullptr, scale.data_ptr<acc_t>(), shift.data_ptr<acc_t>(),
                             inv_scale.data_ptr<acc_t>(), nullptr, nullptr};
    visit_invertible(call.id, [&](auto op) {
      using Op = decltype(op);
      const auto r =
          recovery_of<Op, scalar_t>(grad_out, y, mask, residual, nullptr, z, ch, table, call);
      backward_reduce_loop<Op, scalar_t>(r, geometry_of(y), sum_dz, sum_dz_xmu);
    });
  });
}

inline void backward_elemt(const at::Tensor& grad_out, const at::Tensor& y,
                           const at::Tensor& mask, const at::Tensor* z, const at::Tensor& scale,
                           const at::Tensor& inv_scale, const at::Tensor& shift,
                           const at::Tensor* residual, const at::Tensor& coef_xmu,
                           const at::Tensor& coef_const, const at::Tensor& table,
                           const InverseCall& call, at::Tensor& grad_x,
                           at::Tensor* grad_residual) {
  MISHKIT_BN_OUTPUT_DISPATCH(y, "mishkit_bn_act_output_backward_elemt", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Channels<acc_t> ch{nullptr, scale.data_ptr<acc_t>(), shift.data_ptr<acc_t>(),
                             inv_scale.data_ptr<acc_t>(), coef_xmu.data_ptr<acc_t>(),
                             coef_const.data_ptr<acc_t>()};
    visit_invertible(call.id, [&](auto op) {
      using Op = decltype(op);
      const auto r =
          recovery_of<Op, scalar_t>(grad_out, y, mask, residual, z, nullptr, ch, table, call);
      backward_elemt_loop<Op, scalar_t>(r, geometry_of(y), grad_x, grad_residual);
    });
  });
}

#undef MISHKIT_BN_OUTPUT_DISPATCH
#undef MISHKIT_FLAT

}  // namespace bn_act_output

const BnActOutputKernelTable& bn_act_output_kernel_table() {
  static const BnActOutputKernelTable table{&bn_act_output::forward,
                                            &bn_act_output::backward_reduce,
                                            &bn_act_output::backward_elemt};
  return table;
}

}  // namespace mishkit::cpu::CPU_CAPABILITY
