// The AVX2+FMA build of the CPU kernel. The target pragma (instead of per-file compiler flags,
// which torch.utils.cpp_extension cannot give) makes at::vec use 256-bit vectors here; the entry
// point is only called when the CPU reports AVX2 and FMA (kd_loss_cpu.cpp).
#include "kd_cpu_dispatch.h"
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
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
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define KD_ISA_ENTRY forward_avx2
#define KD_ISA_EXP_ENTRY exp_avx2
#include "kd_kernel_cpu.h"
#else
namespace kdfused::cpu {
ForwardFn forward_avx2() {
  return nullptr;
}
ExpFn exp_avx2() {
  return nullptr;
}
}  // namespace kdfused::cpu
#endif
