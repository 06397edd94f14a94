// kd_fused_run.h -- the launch of the fused kernels for one (student, teacher, accumulation) dtype
// triple, divergence family and transform switch, as kd_loss_cuda.cu calls it. The template is
// defined in kd_fused_run.cuh and explicitly instantiated once per (dtype pair, family, Map) in the
// generated files csrc/cuda/instantiations/kd_fused_<student>_<teacher>_<family>[_map].cu
// (generate.py), so that the 64 heavy kernels (kd_warp_kernel and kd_block_kernel of every
// combination) compile in 32 translation units, in parallel, instead of one.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../kd_math.h"
#include "../kd_params.h"

namespace kdfused::cuda {

template <typename A>
struct KernelArgs;

// Chooses the plan (kd_launch.h choose_plan(), or the forced one) and launches the kernel(s) on
// the current stream of the current device. a holds everything but the plan's fields. Map: the
// kernels apply the logit transforms of a.cfg (map_s, map_t); false only when both are off, so
// that a call without a transform runs the kernels without its code.
template <typename S, typename T, typename A, DivFamily F, bool Map>
void run_fused_kernels(const KDParams& p, KernelArgs<A> a);

// The instantiations, one per generated file: (student, teacher, accumulation) for each family,
// without and with the transform.
#define KDFUSED_FUSED_INSTANTIATIONS(X)                           \
  X(c10::Half, c10::Half, float, DivFamily::Plain, false)         \
  X(c10::Half, c10::Half, float, DivFamily::Plain, true)          \
  X(c10::Half, c10::Half, float, DivFamily::Other, false)         \
  X(c10::Half, c10::Half, float, DivFamily::Other, true)          \
  X(c10::BFloat16, c10::BFloat16, float, DivFamily::Plain, false) \
  X(c10::BFloat16, c10::BFloat16, float, DivFamily::Plain, true)  \
  X(c10::BFloat16, c10::BFloat16, float, DivFamily::Other, false) \
  X(c10::BFloat16, c10::BFloat16, float, DivFamily::Other, true)  \
  X(float, float, float, DivFamily::Plain, false)                 \
  X(float, float, float, DivFamily::Plain, true)                  \
  X(float, float, float, DivFamily::Other, false)                 \
  X(float, float, float, DivFamily::Other, true)                  \
  X(double, double, double, DivFamily::Plain, false)              \
  X(double, double, double, DivFamily::Plain, true)               \
  X(double, double, double, DivFamily::Other, false)              \
  X(double, double, double, DivFamily::Other, true)               \
  X(c10::Half, float, float, DivFamily::Plain, false)             \
  X(c10::Half, float, float, DivFamily::Plain, true)              \
  X(c10::Half, float, float, DivFamily::Other, false)             \
  X(c10::Half, float, float, DivFamily::Other, true)              \
  X(c10::BFloat16, float, float, DivFamily::Plain, false)         \
  X(c10::BFloat16, float, float, DivFamily::Plain, true)          \
  X(c10::BFloat16, float, float, DivFamily::Other, false)         \
  X(c10::BFloat16, float, float, DivFamily::Other, true)          \
  X(float, c10::Half, float, DivFamily::Plain, false)             \
  X(float, c10::Half, float, DivFamily::Plain, true)              \
  X(float, c10::Half, float, DivFamily::Other, false)             \
  X(float, c10::Half, float, DivFamily::Other, true)              \
  X(float, c10::BFloat16, float, DivFamily::Plain, false)         \
  X(float, c10::BFloat16, float, DivFamily::Plain, true)          \
  X(float, c10::BFloat16, float, DivFamily::Other, false)         \
  X(float, c10::BFloat16, float, DivFamily::Other, true)

#define KDFUSED_EXTERN_FUSED(S, T, A, F, Map) \
  extern template void run_fused_kernels<S, T, A, F, Map>(const KDParams&, KernelArgs<A>);
KDFUSED_FUSED_INSTANTIATIONS(KDFUSED_EXTERN_FUSED)
#undef KDFUSED_EXTERN_FUSED

}  // namespace kdfused::cuda
