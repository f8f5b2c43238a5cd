// AVX-512 (F, BW, VL, DQ) + FMA build of the CPU activation loops, used only when the CPU supports
// them (see act_dispatch.cpp): 16 floats per vector, at::vec's 512-bit Vectorized, which
// CPU_CAPABILITY_AVX512 selects. The ISA is enabled with a target pragma, after
// cpu/isa_prelude.h (which says why that order matters).
#include "cpu/isa_prelude.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define MISHKIT_CPU_CAPABILITY_ID Capability::kAvx512
#include "cpu/sleef_avx512_decls.h"
#include "cpu/act_kernels_impl.h"
#pragma GCC pop_options
#else
// Not x86: act_dispatch.cpp never selects this table; this keeps the symbol defined.
#define CPU_CAPABILITY AVX512
#define MISHKIT_CPU_CAPABILITY_ID Capability::kAvx512
#include "cpu/act_kernels_impl.h"
#endif
