// The fused BatchNorm + activation CPU loops, compiled once per CPU_CAPABILITY (see
// bn_act_kernels.h). Include only after defining CPU_CAPABILITY.
//
// Layouts: NCHW work is split over (n, c) planes (per-channel values are broadcast over a
// contiguous plane); channels_last work over rows of C contiguous channels (per-channel values
// are loaded as vectors). Reductions accumulate in vector lanes of the compute type within a
// plane or a block of rows and in double across them, so the sums stay accurate for large N*H*W.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "activations.h"
#include "cpu/bn_act_kernels.h"
#include "cpu/bn_act_common.h"
#include "cpu/vec_math.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including bn_act_kernels_impl.h"
#endif

namespace mishkit::cpu::CPU_CAPABILITY {
namespace bn_act {

using at::vec::Vectorized;

// The per-element formulas, for scalars (M = ScalarMath) and vectors (M = VecMath) alike.
template <class Op, class M, class V>
inline V forward_value(V x, V mean, V scale, V shift, const act::Params<V>& p) {
  return Op::template forward<M>((x - mean) * scale + shift, p);
}

template <class Op, class M, class V>
inline V dz_value(V g, V xmu, V scale, V shift, const act::Params<V>& p) {
  return g * Op::template derivative<M>(xmu * scale + shift, p);
}

// Per-channel constants (acc_t arrays of length C; unused ones may be null).
template <class acc_t>
struct Channel {
  const acc_t* mean;
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* coef_xmu;
  const acc_t* coef_const;
};

// Runs `vec(offset, channel)` / `scalar(offset, channel)` over every element, where channel is a
// pointer offset into the Channel arrays: constant over a plane (NCHW), per element (NHWC).
// kPerElement tells the callback whether channel values must be loaded as a vector or broadcast.
template <class acc_t, class VecFn, class ScalarFn>
void for_each_run(const Geometry& g, VecFn&& vec, ScalarFn&& scalar) {
  constexpr int64_t W = Vectorized<acc_t>::size();
  if (!g.channels_last) {
    at::parallel_for(0, g.n * g.c, std::max<int64_t>(1, 32768 / std::max<int64_t>(g.s, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t base = plane * g.s, channel = plane % g.c;
        int64_t i = 0;
        for (; i + W <= g.s; i += W) vec(base + i, channel, std::false_type{});
        for (; i < g.s; ++i) scalar(base + i, channel);
      }
    });
    return;
  }
  at::parallel_for(0, g.n * g.s, std::max<int64_t>(1, 32768 / std::max<int64_t>(g.c, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = row * g.c;
      int64_t c = 0;
      for (; c + W <= g.c; c += W) vec(base + c, c, std::true_type{});
      for (; c < g.c; ++c) scalar(base + c, c);
    }
  });
}

template <class acc_t, class PerElement>
inline Vectorized<acc_t> channel_vec(const acc_t* values, int64_t channel, PerElement) {
  if constexpr (PerElement::value) return Vectorized<acc_t>::loadu(values + channel);
  return Vectorized<acc_t>(values[channel]);
}

template <class Op, class scalar_t>
void forward_loop(const at::Tensor& x, const Channel<at::opmath_type<scalar_t>>& ch, at::Tensor& y,
                  const double* params) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  const act::Params<acc_t> ps{static_cast<acc_t>(params[0]), static_cast<acc_t>(params[1])};
  const act::Params<V> pv{V(ps.p0), V(ps.p1)};
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  for_each_run<acc_t>(
      geometry_of(x),
      [&](int64_t i, int64_t c, auto per_element) {
        const V out = forward_value<Op, act::VecMath<acc_t>>(
            load<acc_t>(xp + i), channel_vec(ch.mean, c, per_element),
            channel_vec(ch.scale, c, per_element), channel_vec(ch.shift, c, per_element), pv);
        store<acc_t>(yp + i, out);
      },
      [&](int64_t i, int64_t c) {
        yp[i] = static_cast<scalar_t>(forward_value<Op, act::ScalarMath<acc_t>>(
            static_cast<acc_t>(xp[i]), ch.mean[c], ch.scale[c], ch.shift[c], ps));
      });
}

template <class Op, class scalar_t>
void backward_elemt_loop(const at::Tensor& grad_out, const at::Tensor& x,
                         const Channel<at::opmath_type<scalar_t>>& ch, at::Tensor& grad_x,
                         const double* params) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  const act::Params<acc_t> ps{static_cast<acc_t>(params[0]), static_cast<acc_t>(params[1])};
  const act::Params<V> pv{V(ps.p0), V(ps.p1)};
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
  scalar_t* out = grad_x.data_ptr<scalar_t>();
  for_each_run<acc_t>(
      geometry_of(x),
      [&](int64_t i, int64_t c, auto pe) {
        const V xmu = load<acc_t>(xp + i) - channel_vec(ch.mean, c, pe);
        const V scale = channel_vec(ch.scale, c, pe);
        const V dz = dz_value<Op, act::VecMath<acc_t>>(load<acc_t>(gp + i), xmu, scale,
                                                       channel_vec(ch.shift, c, pe), pv);
        store<acc_t>(out + i, dz * scale + xmu * channel_vec(ch.coef_xmu, c, pe) +
                                  channel_vec(ch.coef_const, c, pe));
      },
      [&](int64_t i, int64_t c) {
        const acc_t xmu = static_cast<acc_t>(xp[i]) - ch.mean[c];
        const acc_t dz = dz_value<Op, act::ScalarMath<acc_t>>(static_cast<acc_t>(gp[i]), xmu,
                                                              ch.scale[c], ch.shift[c], ps);
        out[i] = static_cast<scalar_t>(dz * ch.scale[c] + xmu * ch.coef_xmu[c] + ch.coef_const[c]);
      });
}

// Two per-channel sums of contrib(offset, channel) -> (a, b), accumulated in double across
// planes / row blocks. Contrib has vector and scalar overloads like for_each_run's callbacks.
template <class acc_t, class VecContrib, class ScalarContrib>
void channel_sums(const Geometry& g, VecContrib&& vec, ScalarContrib&& scalar, double* sum_a,
                  double* sum_b) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  std::fill(sum_a, sum_a + g.c, 0.0);
  std::fill(sum_b, sum_b + g.c, 0.0);
  if (!g.channels_last) {  // one channel per task: no shared accumulators
    at::parallel_for(0, g.c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t n = 0; n < g.n; ++n) {
          const int64_t base = (n * g.c + c) * g.s;
          V a(0), b(0);
          acc_t a_tail = 0, b_tail = 0;
          int64_t i = 0;
          for (; i + W <= g.s; i += W) vec(base + i, c, std::false_type{}, a, b);
          for (; i < g.s; ++i) scalar(base + i, c, a_tail, b_tail);
          sum_a[c] += static_cast<double>(at::vec::vec_reduce_all(std::plus<V>(), a) + a_tail);
          sum_b[c] += static_cast<double>(at::vec::vec_reduce_all(std::plus<V>(), b) + b_tail);
        }
      }
    });
    return;
  }
  // channels_last: each thread sums blocks of rows into its own double buffers
  constexpr int64_t kRowBlock = 64;
  const int threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * 2 * g.c, 0.0);
  const int64_t blocks = (g.n * g.s + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    double* mine = partial.data() + static_cast<size_t>(at::get_thread_num()) * 2 * g.c;
    std::vector<acc_t> block_a(g.c), block_b(g.c);
    for (int64_t block = begin; block < end; ++block) {
      std::fill(block_a.begin(), block_a.end(), acc_t(0));
      std::fill(block_b.begin(), block_b.end(), acc_t(0));
      const int64_t last = std::min(g.n * g.s, (block + 1) * kRowBlock);
      for (int64_t row = block * kRowBlock; row < last; ++row) {
        int64_t c = 0;
        for (; c + W <= g.c; c += W) {
          V a = V::loadu(block_a.data() + c), b = V::loadu(block_b.data() + c);
          vec(row * g.c + c, c, std::true_type{}, a, b);
          a.store(block_a.data() + c);
          b.store(block_b.data() + c);
        }
        for (; c < g.c; ++c) scalar(row * g.c + c, c, block_a[c], block_b[c]);
      }
      for (int64_t c = 0; c < g.c; ++c) {
        mine[c] += block_a[c];
        mine[g.c + c] += block_b[c];
      }
    }
  });
  for (int t = 0; t < threads; ++t) {
    for (int64_t c = 0; c < g.c; ++c) {
      sum_a[c] += partial[static_cast<size_t>(t) * 2 * g.c + c];
      sum_b[c] += partial[static_cast<size_t>(t) * 2 * g.c + g.c + c];
    }
  }
}

template <class scalar_t>
void stats_loop(const at::Tensor& x, at::Tensor& mean, at::Tensor& var) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  const Geometry g = geometry_of(x);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const double count = static_cast<double>(g.n * g.s);
  std::vector<double> sum(g.c), unused(g.c), squares(g.c);
  channel_sums<acc_t>(
      g, [&](int64_t i, int64_t, auto, V& a, V&) { a += load<acc_t>(xp + i); },
      [&](int64_t i, int64_t, acc_t& a, acc_t&) { a += static_cast<acc_t>(xp[i]); },
      sum.data(), unused.data());
  std::vector<acc_t> mean_acc(g.c);
  for (int64_t c = 0; c < g.c; ++c) mean_acc[c] = static_cast<acc_t>(sum[c] / count);
  const acc_t* m = mean_acc.data();
  channel_sums<acc_t>(
      g,
      [&](int64_t i, int64_t c, auto pe, V& a, V&) {
        const V d = load<acc_t>(xp + i) - channel_vec(m, c, pe);
        a += d * d;
      },
      [&](int64_t i, int64_t c, acc_t& a, acc_t&) {
        const acc_t d = static_cast<acc_t>(xp[i]) - m[c];
        a += d * d;
      },
      squares.data(), unused.data());
  acc_t* mean_out = mean.data_ptr<acc_t>();
  acc_t* var_out = var.data_ptr<acc_t>();
  for (int64_t c = 0; c < g.c; ++c) {  // 0 / 0 = nan for an empty batch, like torch.var_mean
    mean_out[c] = static_cast<acc_t>(sum[c] / count);
    var_out[c] = static_cast<acc_t>(squares[c] / count);
  }
}

// dz_out (may be null): also stores dz, so that backward_elemt need not evaluate act' again.
// The stored dz must be bitwise the dz backward_elemt would compute, so the ISA units compile
// these loops with fp-contract=off: GCC's implicit contraction of a * b + c into an FMA
// depended on the context each formula was inlined into (float64 gelu' differed by an ulp
// between this pass and backward_elemt in the channels-last vector lanes of the AVX2 build).
template <class Op, class scalar_t>
void backward_reduce_loop(const at::Tensor& grad_out, const at::Tensor& x,
                          const Channel<at::opmath_type<scalar_t>>& ch, at::Tensor& sum_dz,
                          at::Tensor& sum_dz_xmu, const double* params,
                          scalar_t* dz_out = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  const act::Params<acc_t> ps{static_cast<acc_t>(params[0]), static_cast<acc_t>(params[1])};
  const act::Params<V> pv{V(ps.p0), V(ps.p1)};
  const Geometry g = geometry_of(x);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
  std::vector<double> a(g.c), b(g.c);
  channel_sums<acc_t>(
      g,
      [&](int64_t i, int64_t c, auto pe, V& sa, V& sb) {
        const V xmu = load<acc_t>(xp + i) - channel_vec(ch.mean, c, pe);
        const V dz = dz_value<Op, act::VecMath<acc_t>>(load<acc_t>(gp + i), xmu,
                                                       channel_vec(ch.scale, c, pe),
                                                       channel_vec(ch.shift, c, pe), pv);
        if (dz_out) store<acc_t>(dz_out + i, dz);
        sa += dz;
        sb += dz * xmu;
      },
      [&](int64_t i, int64_t c, acc_t& sa, acc_t& sb) {
        const acc_t xmu = static_cast<acc_t>(xp[i]) - ch.mean[c];
        const acc_t dz = dz_value<Op, act::ScalarMath<acc_t>>(static_cast<acc_t>(gp[i]), xmu,
                                                              ch.scale[c], ch.shift[c], ps);
        if (dz_out) dz_out[i] = static_cast<scalar_t>(dz);
        sa += dz;
        sb += dz * xmu;
      },
      a.data(), b.data());
  acc_t* out_a = sum_dz.data_ptr<acc_t>();
  acc_t* out_b = sum_dz_xmu.data_ptr<acc_t>();
  for (int64_t c = 0; c < g.c; ++c) {
    out_a[c] = static_cast<acc_t>(a[c]);
    out_b[c] = static_cast<acc_t>(b[c]);
  }
}

// -- dtype and activation dispatch ----------------------------------------------------------------

#define MISHKIT_BN_DISPATCH(x, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), NAME, __VA_ARGS__)

template <class acc_t>
Channel<acc_t> channel_of(const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
                          const at::Tensor* coef_xmu = nullptr,
                          const at::Tensor* coef_const = nullptr) {
  return {mean.data_ptr<acc_t>(), scale.data_ptr<acc_t>(), shift.data_ptr<acc_t>(),
          data_or_null<acc_t>(coef_xmu), data_or_null<acc_t>(coef_const)};
}

inline void stats(const at::Tensor& x, at::Tensor& mean, at::Tensor& var) {
  MISHKIT_BN_DISPATCH(x, "mishkit_bn_act_stats", [&] { stats_loop<scalar_t>(x, mean, var); });
}

inline void forward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                    const at::Tensor& shift, at::Tensor& y, act::ActId id, const double* params) {
  MISHKIT_BN_DISPATCH(x, "mishkit_bn_act_forward", [&] {
    const auto ch = channel_of<at::opmath_type<scalar_t>>(mean, scale, shift);
    act::visit_activation(id, [&](auto op) {
      forward_loop<decltype(op), scalar_t>(x, ch, y, params);
    });
  });
}

inline void backward_reduce(const at::Tensor& grad_out, const at::Tensor& x,
                            const at::Tensor& mean, const at::Tensor& scale,
                            const at::Tensor& shift, at::Tensor& sum_dz, at::Tensor& sum_dz_xmu,
                            act::ActId id, const double* params) {
  MISHKIT_BN_DISPATCH(x, "mishkit_bn_act_backward_reduce", [&] {
    const auto ch = channel_of<at::opmath_type<scalar_t>>(mean, scale, shift);
    act::visit_activation(id, [&](auto op) {
      backward_reduce_loop<decltype(op), scalar_t>(grad_out, x, ch, sum_dz, sum_dz_xmu, params);
    });
  });
}

// backward_reduce that also writes dz = grad_out * act'(z) into dz (x's dtype and layout)
inline void backward_reduce_dz(const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& mean, const at::Tensor& scale,
                               const at::Tensor& shift, at::Tensor& sum_dz,
                               at::Tensor& sum_dz_xmu, at::Tensor& dz, act::ActId id,
                               const double* params) {
  MISHKIT_BN_DISPATCH(x, "mishkit_bn_act_backward_reduce_dz", [&] {
    const auto ch = channel_of<at::opmath_type<scalar_t>>(mean, scale, shift);
    act::visit_activation(id, [&](auto op) {
      backward_reduce_loop<decltype(op), scalar_t>(grad_out, x, ch, sum_dz, sum_dz_xmu, params,
                                                   dz.data_ptr<scalar_t>());
    });
  });
}

inline void backward_elemt(const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& mean, const at::Tensor& scale,
                           const at::Tensor& shift, const at::Tensor& coef_xmu,
                           const at::Tensor& coef_const, at::Tensor& grad_x, act::ActId id,
                           const double* params) {
  MISHKIT_BN_DISPATCH(x, "mishkit_bn_act_backward_elemt", [&] {
    const auto ch =
        channel_of<at::opmath_type<scalar_t>>(mean, scale, shift, &coef_xmu, &coef_const);
    act::visit_activation(id, [&](auto op) {
      backward_elemt_loop<decltype(op), scalar_t>(grad_out, x, ch, grad_x, params);
    });
  });
}

#undef MISHKIT_BN_DISPATCH

}  // namespace bn_act

const BnActKernelTable& bn_act_kernel_table() {
  static const BnActKernelTable table{&bn_act::stats, &bn_act::forward, &bn_act::backward_reduce,
                                      &bn_act::backward_elemt, &bn_act::backward_reduce_dz};
  return table;
}

}  // namespace mishkit::cpu::CPU_CAPABILITY
