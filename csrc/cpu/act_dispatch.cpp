// Runtime choice between the baseline and AVX2 builds of the CPU activation kernels.
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "cpu/act_kernels.h"

namespace mishkit::cpu {
namespace {

bool cpu_has_avx2() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  // libgcc's check includes the OS's support for the 256-bit registers (XGETBV)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

const KernelTable* table_for(const std::string& capability) {
  if (capability == "default") return &DEFAULT::kernel_table();
  if (capability == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "mishkit: cpu capability 'avx2' requested, but this CPU lacks ",
                "AVX2/FMA/F16C; use 'default'");
    return &AVX2::kernel_table();
  }
  TORCH_CHECK_VALUE(false, "mishkit: unknown cpu capability '", capability,
                    "'; choose 'default' or 'avx2'");
}

const KernelTable* initial_table() {
  if (const char* forced = std::getenv("MISHKIT_CPU_CAPABILITY"); forced && *forced) {
    return table_for(forced);
  }
  return cpu_has_avx2() ? &AVX2::kernel_table() : &DEFAULT::kernel_table();
}

std::atomic<const KernelTable*>& current() {
  static std::atomic<const KernelTable*> table{initial_table()};
  return table;
}

}  // namespace

const KernelTable& active_kernels() { return *current().load(std::memory_order_acquire); }

std::string cpu_capability() { return active_kernels().capability; }

void set_cpu_capability(const std::string& capability) {
  current().store(table_for(capability), std::memory_order_release);
}

}  // namespace mishkit::cpu
