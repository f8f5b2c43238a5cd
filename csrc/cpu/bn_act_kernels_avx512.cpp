// AVX-512 (F, BW, VL, DQ) + FMA build of the fused BatchNorm + activation CPU loops, used when the
// activation kernels run their AVX-512 table (see cpu/act_kernels_avx512.cpp and
// cpu/isa_prelude.h).
#include "cpu/isa_prelude.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// no implicit a * b + c -> fma: see bn_act_kernels_impl.h (the two backward passes must agree)
#pragma GCC optimize("fp-contract=off")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu/sleef_avx512_decls.h"
#include "cpu/bn_act_kernels_impl.h"
#pragma GCC pop_options
#else
#define CPU_CAPABILITY AVX512
#include "cpu/bn_act_kernels_impl.h"
#endif
