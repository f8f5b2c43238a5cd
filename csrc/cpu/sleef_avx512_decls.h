// Included by the AVX-512 units after their target pragma: sleef.h declares its 512-bit functions
// only when the compiler's ISA macros say AVX-512, which `#pragma GCC target` does not define.
// sleef.h holds declarations only, so defining the macros around it changes no code generation.
#pragma once
#if !defined(__AVX512F__)
#define __AVX__ 1
#define __AVX2__ 1
#define __AVX512F__ 1
#include <sleef.h>
#undef __AVX__
#undef __AVX2__
#undef __AVX512F__
#endif
