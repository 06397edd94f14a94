// The portable build of the CPU kernel: compiled with the default flags (at::vec's generic code).
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif
#define KD_ISA_ENTRY forward_default
#define KD_ISA_EXP_ENTRY exp_default
#include "kd_cpu_dispatch.h"
#include "kd_kernel_cpu.h"
