// kd_isa_avx512.h -- the prelude of the AVX-512 build of a CPU kernel (see kd_isa_avx2.h for why a
// pragma): included first by kd_kernel_avx512.cpp and topk/kd_topk_avx512.cpp. The kernels
// registered here are only dispatched to when the CPU reports AVX-512 F/BW/VL/DQ.
#pragma once

#include "kd_cpu_dispatch.h"

#define KD_ISA ::kdfused::cpu::Isa::AVX512
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define KD_ISA_X86_AVX512 1
// GCC (12) reports "may be used uninitialized" inside its own AVX-512 intrinsics (the undefined
// pass-through operand of a masked builtin) at every use the kernels inline: hundreds of warnings
// that are not about this code. The same kernels compiled without AVX-512 (the default and AVX2
// objects) keep the warning for their own variables.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "kd_isa_x86.h"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define KD_ISA_COMPILED 1
#else
#define KD_ISA_COMPILED 0
#endif
