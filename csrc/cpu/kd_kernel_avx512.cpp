// The AVX-512 build of the fused CPU kernel.
#include "kd_isa_avx512.h"

#include "kd_kernel_cpu.h"
