// The AVX-512 build of the CPU kernel (see kd_kernel_avx2.cpp for why a pragma). Called only when
// the CPU reports AVX-512 F/BW/VL/DQ (kd_loss_cpu.cpp).
#include "kd_cpu_dispatch.h"
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// GCC's target pragma does not define the feature macros that sleef.h and at::vec test.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define KD_ISA_ENTRY forward_avx512
#define KD_ISA_EXP_ENTRY exp_avx512
#include "kd_kernel_cpu.h"
#else
namespace kdfused::cpu {
ForwardFn forward_avx512() {
  return nullptr;
}
ExpFn exp_avx512() {
  return nullptr;
}
}  // namespace kdfused::cpu
#endif
