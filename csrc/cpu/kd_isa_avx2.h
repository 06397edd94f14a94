// kd_isa_avx2.h -- the prelude of the AVX2+FMA build of a CPU kernel: included first by its
// per-instruction-set source (kd_kernel_avx2.cpp, topk/kd_topk_avx2.cpp), before any other header.
//
// The target pragma (instead of per-file compiler flags, which torch.utils.cpp_extension cannot
// give) makes at::vec use 256-bit vectors in the rest of the file. The kernels registered here are
// only dispatched to when the CPU reports AVX2 and FMA (kd_loss_cpu.cpp).
#pragma once

// The registry is declared before the pragma: only the kernels are compiled for the target.
#include "kd_cpu_dispatch.h"

#define KD_ISA ::kdfused::cpu::Isa::AVX2
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "kd_isa_x86.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define KD_ISA_COMPILED 1
#else
#define KD_ISA_COMPILED 0
#endif
