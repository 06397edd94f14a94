// The AVX-512 build of the top-k CPU kernel.
#include "../kd_isa_avx512.h"

#include "kd_topk_kernel_cpu.h"
