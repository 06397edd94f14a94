// The portable build of the top-k CPU kernel: the default flags (at::vec's generic code).
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif
#define KD_TOPK_ENTRY topk_forward_default
#include "kd_topk_kernel_cpu.h"
