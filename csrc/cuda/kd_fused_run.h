// kd_fused_run.h -- the launch of the fused kernels for one (student, teacher, accumulation) dtype
// triple and divergence family, as kd_loss_cuda.cu calls it. The template is defined in
// kd_fused_run.cuh and explicitly instantiated once per (dtype pair, family) in the generated
// files csrc/cuda/instantiations/kd_fused_<student>_<teacher>_<family>.cu (generate.py), so that
// the 32 heavy kernels (kd_warp_kernel and kd_block_kernel of every combination) compile in 16
// translation units, in parallel, instead of one.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../kd_math.h"
#include "../kd_params.h"

namespace kdfused::cuda {

template <typename A>
struct KernelArgs;

// Chooses the plan (kd_launch.h choose_plan(), or the forced one) and launches the kernel(s) on
// the current stream of the current device. a holds everything but the plan's fields.
template <typename S, typename T, typename A, DivFamily F>
void run_fused_kernels(const KDParams& p, KernelArgs<A> a);

// The instantiations, one per generated file: (student, teacher, accumulation) for each family.
#define KDFUSED_FUSED_INSTANTIATIONS(X)                    \
  X(c10::Half, c10::Half, float, DivFamily::Plain)         \
  X(c10::Half, c10::Half, float, DivFamily::Other)         \
  X(c10::BFloat16, c10::BFloat16, float, DivFamily::Plain) \
  X(c10::BFloat16, c10::BFloat16, float, DivFamily::Other) \
  X(float, float, float, DivFamily::Plain)                 \
  X(float, float, float, DivFamily::Other)                 \
  X(double, double, double, DivFamily::Plain)              \
  X(double, double, double, DivFamily::Other)              \
  X(c10::Half, float, float, DivFamily::Plain)             \
  X(c10::Half, float, float, DivFamily::Other)             \
  X(c10::BFloat16, float, float, DivFamily::Plain)         \
  X(c10::BFloat16, float, float, DivFamily::Other)         \
  X(float, c10::Half, float, DivFamily::Plain)             \
  X(float, c10::Half, float, DivFamily::Other)             \
  X(float, c10::BFloat16, float, DivFamily::Plain)         \
  X(float, c10::BFloat16, float, DivFamily::Other)

#define KDFUSED_EXTERN_FUSED(S, T, A, F) \
  extern template void run_fused_kernels<S, T, A, F>(const KDParams&, KernelArgs<A>);
KDFUSED_FUSED_INSTANTIATIONS(KDFUSED_EXTERN_FUSED)
#undef KDFUSED_EXTERN_FUSED

}  // namespace kdfused::cuda
