// kd_cpu_dispatch.h -- the instruction-set registry of the CPU kernels (in the style of ATen's
// DispatchStub).
//
// Each CPU kernel header is compiled once per instruction set: kd_kernel_{default,avx2,avx512}.cpp
// and topk/kd_topk_{default,avx2,avx512}.cpp include that instruction set's prelude
// (kd_isa_{default,avx2,avx512}.h: the target pragma, CPU_CAPABILITY, KD_ISA) and then the kernel,
// which registers its entry point for KD_ISA with KD_REGISTER_KERNEL. The portable "scalar" path
// (kd_kernel_scalar.cpp, topk/kd_topk_scalar.cpp) registers itself the same way. An op asks for its
// kernel with dispatch<Stub>(): the one of the selected instruction set (the widest the CPU
// supports, or the one forced by KDFUSED_CPU_ISA=scalar|default|avx2|avx512 or set_isa()).
//
// A registration is an explicit specialisation isa_kernel<Stub, Isa>: an ordinary function,
// defined by exactly one object, named by its instruction set. (Why not a table filled by static
// initialisers: the order of those across objects is unspecified, and nothing here needs a table
// to be mutable.)
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "../kd_params.h"
#include "../kd_topk_params.h"

namespace kdfused::cpu {

// Every instruction set a kernel can be compiled for. "Scalar" is the host run of the CUDA
// kernels' per-element code (kd_kernel_scalar.cpp), never selected automatically.
enum class Isa : int { Default = 0, AVX2 = 1, AVX512 = 2, Scalar = 3 };

// The kernels, each a stub: its function type and one registration per instruction set.
struct ForwardStub {
  using Fn = void (*)(const KDParams&);
};
// The exponential of each instruction set's kernels (kd_vexp.h; the C library's expf for
// "scalar"), y = exp(x) for n floats: for the test of its error bound.
struct ExpStub {
  using Fn = void (*)(const float* x, float* y, int64_t n);
};
struct TopKForwardStub {
  using Fn = void (*)(const topk::TopKParams&, bool acc_double);
};

// Stub's kernel compiled for instruction set I; nullptr where it has none (an x86 instruction set
// on another architecture).
template <typename Stub, Isa I>
typename Stub::Fn isa_kernel();

#define KD_REGISTER_KERNEL(stub, isa, fn) \
  template <>                             \
  stub::Fn isa_kernel<stub, isa>() {      \
    return fn;                            \
  }

template <typename Stub>
typename Stub::Fn kernel_for(Isa isa) {
  switch (isa) {
    case Isa::AVX512: return isa_kernel<Stub, Isa::AVX512>();
    case Isa::AVX2: return isa_kernel<Stub, Isa::AVX2>();
    case Isa::Scalar: return isa_kernel<Stub, Isa::Scalar>();
    case Isa::Default: break;
  }
  return isa_kernel<Stub, Isa::Default>();
}

// The instruction set every op's CPU kernel runs with (read at every call).
Isa selected_isa();

// Stub's kernel for the selected instruction set, or the portable one where that set has none.
template <typename Stub>
typename Stub::Fn dispatch() {
  const typename Stub::Fn fn = kernel_for<Stub>(selected_isa());
  return fn ? fn : kernel_for<Stub>(Isa::Default);
}

// Runs the exponential of instruction set `isa` (a name as set_isa takes, "auto" included).
void run_exp(const std::string& isa, const float* x, float* y, int64_t n);

// Raises the out-of-memory error of a kernel's scratch buffer. Defined in a portable object
// (kd_loss_cpu.cpp): a TORCH_CHECK message built in a per-ISA object would instantiate c10's
// string helpers there, under the same symbol in every ISA's object, and the linker keeps one copy
// for every caller (possibly the AVX-512 one).
[[noreturn]] void throw_scratch_oom(size_t bytes);

// Whether gradients of `bytes` bytes (one call's) are written with non-temporal stores, which skip
// reading each line into the cache before overwriting it: a win for gradients larger than the
// last-level cache (they leave it before anyone reads them again), a loss for small ones (the
// next op would read them from memory instead of the cache). From 64 MiB (above the 32 MiB L3 of
// the cores measured), or as KDFUSED_CPU_STREAM_STORES says: 0 never, 1 always. In a portable
// object for the reason above.
bool stream_grad_stores(size_t bytes);

// Runs the selected instruction set's kernel on p.
void run_forward(const KDParams& p);

std::string selected_isa_name();
std::vector<std::string> compiled_isa_names();
// Forces an instruction set ("scalar", "default", "avx2", "avx512") or, with "auto", the widest
// supported.
// Raises ValueError for a name that is unknown, not compiled or not supported by this CPU.
void set_isa(const std::string& name);

}  // namespace kdfused::cpu
