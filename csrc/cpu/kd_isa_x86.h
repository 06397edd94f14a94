// kd_isa_x86.h -- the feature macros of an x86 instruction-set prelude (kd_isa_avx2.h,
// kd_isa_avx512.h), included right after its target pragma.
//
// GCC's target pragma does not define the feature macros that sleef.h and at::vec test: without
// them at::vec would compile its generic code under the AVX2 / AVX-512 pragma.
#pragma once

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
#if defined(KD_ISA_X86_AVX512)
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
#endif
