// Baseline build of the output-saving BatchNorm + activation CPU loops (see
// bn_act_output_kernels.h).
#define CPU_CAPABILITY DEFAULT
#include "cpu/bn_act_output_kernels_impl.h"
