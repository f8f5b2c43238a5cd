// Runtime choice between the baseline, AVX2 and AVX-512 builds of the CPU activation kernels.
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <string>

#include "cpu/act_kernels.h"

namespace mishkit::cpu {
namespace {

// libgcc's checks include the OS's support for the wider registers (XGETBV).
bool cpu_has_avx2() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool always() { return true; }

bool cpu_is_amd() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_is("amd");
#else
  return false;
#endif
}

struct Build {
  const KernelTable& (*table)();
  bool (*supported)();
  const char* requirement;  // for the error when the CPU lacks it
};

// Indexed by Capability.
const Build kBuilds[kNumCapabilities] = {
    {&DEFAULT::kernel_table, &always, "nothing"},
    {&AVX2::kernel_table, &cpu_has_avx2, "AVX2, FMA and F16C"},
    {&AVX512::kernel_table, &cpu_has_avx512, "AVX-512 F, BW, VL and DQ"},
};

std::string known_names() {
  std::string out;
  for (const char* name : kCapabilityNames) {
    out += out.empty() ? "'" : ", '";
    out += name;
    out += "'";
  }
  return out;
}

// Names match in any case ("AVX2", "avx2"), like torch's ATEN_CPU_CAPABILITY.
const KernelTable* table_for(const std::string& capability) {
  std::string lower = capability;
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  for (int i = 0; i < kNumCapabilities; ++i) {
    if (lower != kCapabilityNames[i]) continue;
    TORCH_CHECK(kBuilds[i].supported(), "mishkit: cpu capability '", capability,
                "' requested, but this CPU lacks ", kBuilds[i].requirement,
                "; use 'default'");
    return &kBuilds[i].table();
  }
  TORCH_CHECK_VALUE(false, "mishkit: unknown cpu capability '", capability, "'; choose one of ",
                    known_names());
}

// The widest build the CPU supports. Measured per CPU (benchmarks/results/<cpu>/; the
// mishkit-cpu-<build> contenders time the builds side by side): every AVX-512 kernel at least as
// fast as its AVX2 one on the AMD Zen 4 and Zen 5 and on an Intel Xeon (1.3-4.2x wherever the
// loops differ there), every AVX2 kernel 3.9-34x the baseline one on the Zen 3 (no AVX-512). So the
// build has no per-vendor exception; the vector width of the piecewise-linear float loops does
// (linear_float_loops_256bit).
const KernelTable* initial_table() {
  if (const char* forced = std::getenv("MISHKIT_CPU_CAPABILITY"); forced && *forced) {
    return table_for(forced);
  }
  for (int i = kNumCapabilities - 1; i > 0; --i) {
    if (kBuilds[i].supported()) return &kBuilds[i].table();
  }
  return &DEFAULT::kernel_table();
}

std::atomic<const KernelTable*>& current() {
  static std::atomic<const KernelTable*> table{initial_table()};
  return table;
}

// The vendor rule of act_kernels.h, decided once; set_linear_float_loops_256bit overrides it.
std::atomic<bool>& linear_256bit() {
  static std::atomic<bool> flag{cpu_is_amd()};
  return flag;
}

}  // namespace

const KernelTable& active_kernels() { return *current().load(std::memory_order_acquire); }

Capability active_capability() { return active_kernels().capability; }

std::string cpu_capability() { return kCapabilityNames[static_cast<int>(active_capability())]; }

void set_cpu_capability(const std::string& capability) {
  current().store(table_for(capability), std::memory_order_release);
}

bool linear_float_loops_256bit() { return linear_256bit().load(std::memory_order_relaxed); }

void set_linear_float_loops_256bit(bool on) {
  linear_256bit().store(on, std::memory_order_relaxed);
}

}  // namespace mishkit::cpu
