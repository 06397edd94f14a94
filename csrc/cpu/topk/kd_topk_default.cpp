// The portable build of the top-k CPU kernel.
#include "../kd_isa_default.h"

#include "kd_topk_kernel_cpu.h"
