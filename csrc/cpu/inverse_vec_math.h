// inverse.h's extension of the at::vec math policy (cpu/vec_math.h): sqrt, log, floor and the
// table gather, for Vectorized<float> / Vectorized<double>. Included once per CPU_CAPABILITY unit.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "cpu/vec_math.h"
#include "inverse.h"

namespace mishkit::inv {
inline namespace CPU_CAPABILITY {

template <class T>
struct Ext<act::VecMath<T>> {
  using V = at::vec::Vectorized<T>;
  static V sqrt(const V& x) { return x.sqrt(); }
  static V log(const V& x) { return x.log(); }
  static V floor(const V& x) { return x.floor(); }
  // base[index] per lane; index holds whole numbers in range (hermite() clamps them)
  static V gather(const T* base, const V& index) {
    return at::vec::gather<sizeof(T)>(base, at::vec::convert_to_int_of_same_size(index));
  }
  // whether any lane of a policy mask is set (masks are all-bits vectors or AVX-512 k-masks)
  template <class Mask>
  static bool any(const Mask& mask) {
    if constexpr (std::is_same_v<Mask, V>) {
      return mask.zero_mask() != (1 << V::size()) - 1;
    } else {
      return mask != 0;
    }
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace mishkit::inv
