// The portable build of the CPU kernel: compiled with the default flags (at::vec's generic code).
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif
#define KD_ISA_ENTRY forward_default
#include "kd_cpu_dispatch.h"
#include "kd_kernel_cpu.h"
