// Included by the AVX2 units after their target pragma: sleef.h declares its 256-bit functions
// only when the compiler's ISA macros say AVX/AVX2, which `#pragma GCC target` does not define.
// sleef.h holds declarations only, so defining the macros around it changes no code generation.
#pragma once
#if !defined(__AVX2__)
#define __AVX__ 1
#define __AVX2__ 1
#include <sleef.h>
#undef __AVX__
#undef __AVX2__
#endif
