// kd_isa_default.h -- the prelude of the portable build of a CPU kernel (kd_kernel_default.cpp,
// topk/kd_topk_default.cpp): the default compiler flags, at::vec's generic code.
#pragma once

#include "kd_cpu_dispatch.h"

#define KD_ISA ::kdfused::cpu::Isa::Default
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif
#define KD_ISA_COMPILED 1
