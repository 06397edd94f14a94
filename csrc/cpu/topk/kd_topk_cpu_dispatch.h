// kd_topk_cpu_dispatch.h -- entry points of the top-k CPU kernel, one per instruction set.
//
// kd_topk_kernel_cpu.h is compiled once per instruction set (kd_topk_{default,avx2,avx512}.cpp);
// at::vec is only as wide as the flags its file is compiled with. The one used follows the
// instruction set kd_loss's CPU kernel has selected (kdfused::cpu::selected_isa_name(): auto,
// KDFUSED_CPU_ISA or kdfused._C.set_cpu_isa), read at every call.
#pragma once

#include "../../kd_topk_params.h"

namespace kdfused::cpu_topk {

using TopKForwardFn = void (*)(const topk::TopKParams&, bool acc_double);

// nullptr when that instruction set is not compiled (non-x86 builds).
TopKForwardFn topk_forward_default();
TopKForwardFn topk_forward_avx2();
TopKForwardFn topk_forward_avx512();

}  // namespace kdfused::cpu_topk
