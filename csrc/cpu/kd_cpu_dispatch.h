// kd_cpu_dispatch.h -- run-time choice of the CPU kernel's instruction set.
//
// kd_kernel_cpu.h is compiled once per instruction set (kd_kernel_{default,avx2,avx512}.cpp);
// at::vec is only as wide as the flags its file is compiled with. The widest one the CPU supports
// is picked at run time (as ATen's DispatchStub does); KDFUSED_CPU_ISA=scalar|default|avx2|avx512
// or set_isa() can force a narrower one (tests run every compiled path).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "../kd_params.h"

namespace kdfused::cpu {

using ForwardFn = void (*)(const KDParams&);

// One per compiled instruction set; the x86 ones are nullptr when not compiled (non-x86 builds).
ForwardFn forward_default();
ForwardFn forward_avx2();
ForwardFn forward_avx512();
// The host run of the CUDA kernels' per-element code (kd_kernel_scalar.cpp); never auto-selected.
ForwardFn forward_scalar();

// The exponential each instruction set's kernel uses (kd_vexp.h; the C library's expf for
// "scalar"), y = exp(x) for n floats: for the test of its error bound.
using ExpFn = void (*)(const float* x, float* y, int64_t n);
ExpFn exp_default();
ExpFn exp_avx2();
ExpFn exp_avx512();
ExpFn exp_scalar();
// Runs the exponential of instruction set `isa` (a name as set_isa takes, "auto" included).
void run_exp(const std::string& isa, const float* x, float* y, int64_t n);

// Raises the out-of-memory error of a kernel's scratch buffer. Defined in a portable object
// (kd_loss_cpu.cpp): a TORCH_CHECK message built in a per-ISA object would instantiate c10's
// string helpers there, under the same symbol in every ISA's object, and the linker keeps one copy
// for every caller (possibly the AVX-512 one).
[[noreturn]] void throw_scratch_oom(size_t bytes);

// Runs the widest available kernel (or the one forced) on p.
void run_forward(const KDParams& p);

std::string selected_isa_name();
std::vector<std::string> compiled_isa_names();
// Forces an instruction set ("scalar", "default", "avx2", "avx512") or, with "auto", the widest
// supported.
// Raises ValueError for a name that is unknown, not compiled or not supported by this CPU.
void set_isa(const std::string& name);

}  // namespace kdfused::cpu
