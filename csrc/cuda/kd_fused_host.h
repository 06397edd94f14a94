// kd_fused_host.h -- host-side helpers of the fused kernel's launch that do not depend on the
// kernel's types: the cached facts of a kernel on a device, the cluster schedulability query, the
// plan forced with set_cuda_plan, and the plan's description. Compiled once (kd_fused_host.cu);
// the kernels are passed as `const void*`, as the CUDA runtime's C API takes them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "../kd_cuda_plan.h"
#include "kd_launch.h"

namespace kdfused::cuda {

// The current device, its properties and its current stream (at::cuda's): what a launch needs
// from ATen, kept out of the instantiation files so that they need no ATen header.
struct LaunchContext {
  int device = 0;
  const cudaDeviceProp* prop = nullptr;
  cudaStream_t stream = nullptr;
};
LaunchContext current_launch_context();

// `bytes` of device memory on `device` (at::empty: torch's caching allocator, for the current
// stream), *ptr set to it; freed when the returned handle goes.
std::shared_ptr<void> device_workspace(int64_t bytes, int device, void** ptr);

// Per (kernel, device): what the binary holds and what the device allows. Queried once and
// cached, so that per-call host work is a map lookup and the launch plan -- hence the bits of the
// result -- cannot change between calls (a driver answer that varied would otherwise change them).
struct KernelFacts {
  bool clusters = false;   // sm_90 device AND sm_90 code in the binary AND sm_90 PTX source
  int64_t smem_optin = 0;  // dynamic shared memory available to one CTA
  int num_sms = 0;
  std::map<std::pair<int, int64_t>, bool> cluster_fits;  // (split, smem bytes) -> schedulable
};

// The facts of `kernel` on `device` (one cache per process, keyed by kernel and device). The
// reference stays valid: entries are never removed.
KernelFacts& kernel_facts(const void* kernel, int device, const cudaDeviceProp& prop);

// Whether a cluster of the plan's shape can be co-scheduled (a host query, no sync), cached in
// facts. Raises the kernel's dynamic shared memory limit to the plan's stage when it needs more
// than the default 48 KiB.
bool cluster_fits(const void* kernel, KernelFacts& facts, const LaunchPlan& pl);

// The plan the user forced with set_cuda_plan (tests, self-test, benchmarks), or std::nullopt.
std::optional<LaunchPlan> forced_plan(const PlanOverride& o, int64_t V, int vec_elems,
                                      int64_t bytes_per_elem, bool any_grad, bool mix,
                                      bool clusters, int64_t stage_cap);

// "warp", "block split=8 cluster stage", ...: what last_cuda_plan() reports.
std::string describe(const LaunchPlan& pl);

}  // namespace kdfused::cuda
