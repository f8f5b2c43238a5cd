// inverse.h's extension of the at::vec math policy (cpu/vec_math.h): sqrt, log, floor and the
// table gather, for Vectorized<float> / Vectorized<double>. Included once per CPU_CAPABILITY unit.
#pragma once

#include <ATen/cpu/vec/vec.h>

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
};

}  // namespace CPU_CAPABILITY
}  // namespace mishkit::inv
