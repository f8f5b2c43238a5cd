// CPU activation kernels: one table per instruction set, chosen at runtime.
//
// act_kernels_impl.h is compiled twice, by act_kernels_default.cpp (baseline x86-64) and
// act_kernels_avx2.cpp (AVX2 + FMA), each in its own namespace so the two builds of every inline
// function stay apart. active_kernels() picks the best table the CPU supports on first use.
#pragma once

#include <string>

#include "activations.h"

namespace at {
class TensorIteratorBase;
}

namespace mishkit::cpu {

// One elementwise loop over a built TensorIterator. Forward iterators: (out, x); backward:
// (grad_in, x, grad_out), x first so grad_in takes its layout. `params` holds act::kMaxParams
// values (unused ones are 0).
using ActLoop = void (*)(at::TensorIteratorBase& iter, const double* params);

struct KernelTable {
  const char* capability;  // "default" or "avx2"
  ActLoop forward[act::kNumActivations];
  ActLoop backward[act::kNumActivations];
};

namespace DEFAULT {
const KernelTable& kernel_table();
}
namespace AVX2 {
const KernelTable& kernel_table();
}

// The table in use: AVX2 when the CPU has AVX2, FMA and F16C, else the baseline. The environment
// variable MISHKIT_CPU_CAPABILITY=default|avx2 overrides the choice at first use.
const KernelTable& active_kernels();

// "default" or "avx2": which table active_kernels() returns.
std::string cpu_capability();

// Switch tables ("default" or "avx2"; for tests and benchmarks). Throws if the CPU lacks it.
void set_cpu_capability(const std::string& capability);

}  // namespace mishkit::cpu
