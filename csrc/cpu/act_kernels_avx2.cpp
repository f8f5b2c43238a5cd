// AVX2 + FMA + F16C build of the CPU activation loops, used only when the CPU supports them (see
// act_dispatch.cpp). The extension is compiled without -mavx2, so the ISA is enabled here with a
// target pragma, after cpu/isa_prelude.h (which says why that order matters).
#include "cpu/isa_prelude.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define MISHKIT_CPU_CAPABILITY_ID Capability::kAvx2
#include "cpu/sleef_avx2_decls.h"
#include "cpu/act_kernels_impl.h"
#pragma GCC pop_options
#else
// Not x86: act_dispatch.cpp never selects this table; this keeps the symbol defined.
#define CPU_CAPABILITY AVX2
#define MISHKIT_CPU_CAPABILITY_ID Capability::kAvx2
#include "cpu/act_kernels_impl.h"
#endif
