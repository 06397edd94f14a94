// kd_dtype_dispatch.h -- host-side helpers shared by the CUDA op wrappers (kd_loss_cuda.cu,
// kd_vocab_parallel_cuda.cu): the dtype pairs the kernels are compiled for, the exact conversion
// of the other pairs to one of them, and the device-architecture check.
//
// Dtype pairs. Kernels are compiled for the same-dtype pairs and for {float16, bfloat16} x float32
// both ways (8 instantiations per kernel, to keep compile time down). Other pairs are converted,
// exactly: float16 x bfloat16 -> the teacher to float32; anything with float64 -> both to float64
// (the accumulation type is float64 then anyway). Gradients of converted inputs are converted back
// to the input's dtype by the caller (rounded once, as a native kernel's store would be).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <utility>

namespace kdfused::cuda {

// The virtual architectures this file was compiled for, from nvcc (e.g. "800,900").
#define KD_STRINGIFY2(...) #__VA_ARGS__  // variadic: the list holds commas
#define KD_STRINGIFY(...) KD_STRINGIFY2(__VA_ARGS__)
#if defined(__CUDA_ARCH_LIST__)
#define KDFUSED_CUDA_ARCHS "compute " KD_STRINGIFY(__CUDA_ARCH_LIST__)
#else
#define KDFUSED_CUDA_ARCHS "unknown"
#endif

// A GPU older than sm_80 has no kernel image in this build: say so at the first call, naming the
// build's architectures, instead of failing with "no kernel image is available".
inline void check_device_arch(const cudaDeviceProp& prop) {
  TORCH_CHECK(prop.major >= 8, "kdfused: the GPU ", prop.name, " is sm_", prop.major, prop.minor,
              "; kdfused's CUDA kernels need sm_80 or newer (this build has: ", KDFUSED_CUDA_ARCHS,
              ")");
}

inline bool is_half_like(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

inline bool native_pair(at::ScalarType s, at::ScalarType t) {
  return s == t || (is_half_like(s) && t == at::kFloat) || (s == at::kFloat && is_half_like(t));
}

// The native pair the kernels read for logits of dtypes (s, t): (s, t) itself when kernels are
// compiled for it; anything with float64 -> both float64; float16 x bfloat16 -> the teacher as
// float32 (both are exact in float32). The ONE rule, for every CUDA op.
inline std::pair<at::ScalarType, at::ScalarType> native_dtypes(at::ScalarType s, at::ScalarType t) {
  if (native_pair(s, t)) return {s, t};
  if (s == at::kDouble || t == at::kDouble) return {at::kDouble, at::kDouble};
  return {s, at::kFloat};
}

// The inputs as a native pair (see the top of this file): the inputs themselves, or exact copies.
inline std::pair<at::Tensor, at::Tensor> native_inputs(const at::Tensor& student,
                                                       const at::Tensor& teacher) {
  const auto [s_type, t_type] = native_dtypes(student.scalar_type(), teacher.scalar_type());
  return {student.to(s_type), teacher.to(t_type)};  // no copy for a dtype that stays
}

// Calls f(S{}, T{}) for the native pair of (s, t).
template <typename F>
void dispatch_pair(at::ScalarType s, at::ScalarType t, F&& f) {
  using at::kBFloat16;
  using at::kDouble;
  using at::kFloat;
  using at::kHalf;
  if (s == kHalf && t == kHalf) return f(c10::Half{}, c10::Half{});
  if (s == kBFloat16 && t == kBFloat16) return f(c10::BFloat16{}, c10::BFloat16{});
  if (s == kFloat && t == kFloat) return f(float{}, float{});
  if (s == kDouble && t == kDouble) return f(double{}, double{});
  if (s == kHalf && t == kFloat) return f(c10::Half{}, float{});
  if (s == kBFloat16 && t == kFloat) return f(c10::BFloat16{}, float{});
  if (s == kFloat && t == kHalf) return f(float{}, c10::Half{});
  if (s == kFloat && t == kBFloat16) return f(float{}, c10::BFloat16{});
  TORCH_INTERNAL_ASSERT(false, "kdfused: no CUDA kernel for ", s, " x ", t);
}

}  // namespace kdfused::cuda
