// What the two BatchNorm + activation CPU kernel families share (bn_act_kernels_impl.h,
// bn_act_output_kernels_impl.h): the geometry of a dense (N, C, *) tensor, optional per-channel
// pointers, and loads / stores of one Vectorized<acc_t> from scalar_t memory (half types widen to
// float). Included once per CPU_CAPABILITY unit, so each instruction-set build has its own copy.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including bn_act_common.h"
#endif

namespace mishkit::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// NCHW-contiguous or channels-last (the checks admit nothing else): not contiguous means the
// channels are innermost.
struct Geometry {
  int64_t n, c, s;  // batch, channels, spatial elements per (n, c)
  bool channels_last;
  int64_t numel() const { return n * c * s; }
};

inline Geometry geometry_of(const at::Tensor& x) {
  int64_t spatial = 1;
  for (int64_t d = 2; d < x.dim(); ++d) spatial *= x.size(d);
  return {x.size(0), x.size(1), spatial, !x.is_contiguous()};
}

template <class acc_t>
inline const acc_t* data_or_null(const at::Tensor* t) {
  return t != nullptr ? t->data_ptr<acc_t>() : nullptr;
}

template <class acc_t, class scalar_t>
inline Vectorized<acc_t> load(const scalar_t* p) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return Vectorized<acc_t>::loadu(p);
  } else {
    alignas(64) acc_t buffer[Vectorized<acc_t>::size()];
    for (int k = 0; k < Vectorized<acc_t>::size(); ++k) buffer[k] = static_cast<acc_t>(p[k]);
    return Vectorized<acc_t>::loadu(buffer);
  }
}

template <class acc_t, class scalar_t>
inline void store(scalar_t* p, const Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    v.store(p);
  } else {
    alignas(64) acc_t buffer[Vectorized<acc_t>::size()];
    v.store(buffer);
    for (int k = 0; k < Vectorized<acc_t>::size(); ++k) p[k] = static_cast<scalar_t>(buffer[k]);
  }
}

}  // namespace mishkit::cpu::CPU_CAPABILITY
