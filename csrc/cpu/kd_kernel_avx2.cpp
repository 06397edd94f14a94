// The AVX2+FMA build of the fused CPU kernel.
#include "kd_isa_avx2.h"

#include "kd_kernel_cpu.h"
