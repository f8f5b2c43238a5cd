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
// sleef.h declares its 512-bit functions only when the compiler's ISA macros say AVX-512, which
// the target pragma does not define; it holds declarations only.
#if !defined(__AVX512F__)
#define __AVX__ 1
#define __AVX2__ 1
#define __AVX512F__ 1
#include <sleef.h>
#undef __AVX__
#undef __AVX2__
#undef __AVX512F__
#endif
#include "cpu/act_kernels_impl.h"
#pragma GCC pop_options
#else
// Not x86: act_dispatch.cpp never selects this table; this keeps the symbol defined.
#define CPU_CAPABILITY AVX512
#define MISHKIT_CPU_CAPABILITY_ID Capability::kAvx512
#include "cpu/act_kernels_impl.h"
#endif
