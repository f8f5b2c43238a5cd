// Loads and stores of one Vectorized<acc_t> from and to scalar_t memory (half types widen to
// float), shared by the BatchNorm + activation CPU kernels. Included once per CPU_CAPABILITY
// unit, so each instruction-set build has its own copy.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including vec_io.h"
#endif

namespace mishkit::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

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
