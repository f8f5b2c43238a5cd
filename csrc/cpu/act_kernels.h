// CPU activation kernels: one table per instruction set, chosen at runtime.
//
// act_kernels_impl.h is compiled three times, by act_kernels_default.cpp (baseline x86-64),
// act_kernels_avx2.cpp (AVX2 + FMA) and act_kernels_avx512.cpp (AVX-512 F/BW/VL/DQ), each in its
// own namespace so the builds of every inline function stay apart. active_kernels() picks the
// best table the CPU supports on first use.
#pragma once

#include <string>

#include "activations.h"

namespace at {
class TensorIteratorBase;
}

namespace mishkit::cpu {

// The instruction-set builds, in order of preference from worst to best. Also the index of the
// per-capability tables (the BatchNorm + activation kernels follow the same choice).
enum class Capability : int { kDefault, kAvx2, kAvx512 };
inline constexpr int kNumCapabilities = 3;
// The user-facing names, indexed by Capability.
inline constexpr const char* kCapabilityNames[kNumCapabilities] = {"default", "avx2", "avx512"};

// One elementwise loop over a built TensorIterator. Forward iterators: (out, x); backward:
// (grad_in, x, grad_out), x first so grad_in takes its layout. `params` holds act::kMaxParams
// values (unused ones are 0).
using ActLoop = void (*)(at::TensorIteratorBase& iter, const double* params);

struct KernelTable {
  Capability capability;
  ActLoop forward[act::kNumActivations];
  ActLoop backward[act::kNumActivations];
};

namespace DEFAULT {
const KernelTable& kernel_table();
}
namespace AVX2 {
const KernelTable& kernel_table();
}
namespace AVX512 {
const KernelTable& kernel_table();
}

// The table in use: the best build the CPU supports (AVX-512 F/BW/VL/DQ, else AVX2 + FMA + F16C,
// else the baseline). The environment variable MISHKIT_CPU_CAPABILITY=default|avx2|avx512 (any
// case) overrides the choice at first use; mishkit/info.py explains the choice to users.
const KernelTable& active_kernels();

// Which build active_kernels() returns, and its name ("default", "avx2" or "avx512").
Capability active_capability();
std::string cpu_capability();

// Whether the AVX-512 build runs the float loops of relu, leaky_relu, hardswish and hardmish at
// 256 bits (the AVX2 build's loops): true on AMD CPUs, false on others. Measured at 2^22 floats, 2
// threads: on an AMD EPYC Zen 5 the 256-bit backward loops were 3-13% faster and the forward ones
// within 3% (benchmarks/results/cpu-amd-epyc-2c/); on an Intel Xeon the 512-bit loops were
// 1.01-1.17x the 256-bit ones in every row, forward and forward+backward
// (benchmarks/results/cpu-intel-r-xeon-r-processor-family6-model167-2c/linear-loop-width/).
bool linear_float_loops_256bit();
// Override that choice (tests, benchmarks: both widths run on any AVX-512 CPU).
void set_linear_float_loops_256bit(bool on);

// Switch builds by name, in any case (tests, benchmarks). Throws if the CPU lacks the instructions.
void set_cpu_capability(const std::string& capability);

}  // namespace mishkit::cpu
