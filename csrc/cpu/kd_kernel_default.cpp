// The portable build of the fused CPU kernel.
#include "kd_isa_default.h"

#include "kd_kernel_cpu.h"
