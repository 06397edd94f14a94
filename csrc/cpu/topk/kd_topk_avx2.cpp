// The AVX2+FMA build of the top-k CPU kernel.
#include "../kd_isa_avx2.h"

#include "kd_topk_kernel_cpu.h"
