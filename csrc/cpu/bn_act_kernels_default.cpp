// Baseline build of the fused BatchNorm + activation CPU loops (see bn_act_kernels.h).
#define CPU_CAPABILITY DEFAULT
#include "cpu/bn_act_kernels_impl.h"
