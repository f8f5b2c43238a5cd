// Baseline build of the CPU activation loops (no ISA extensions beyond the compiler's default).
#define CPU_CAPABILITY DEFAULT
#define MISHKIT_CPU_CAPABILITY_ID Capability::kDefault
#include "cpu/act_kernels_impl.h"
