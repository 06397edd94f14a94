// kd_fused_run.cuh -- the definition of run_fused_kernels<S, T, A, F, Map> (kd_fused_run.h): the
// plan choice and the launch of the fused kernels. Included only by the generated instantiation
// files (csrc/cuda/instantiations/), each of which instantiates it, and so its two kernels, for one
// (dtype pair, family, transform switch); the type-independent host helpers are in
// kd_fused_host.cu. No ATen header here: parsing them would cost each of the 32 files more than its
// kernels (the device, stream and workspace come through kd_fused_host.h).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <memory>

#include "../kd_cuda_plan.h"
#include "kd_cluster_launch.h"
#include "kd_fused_host.h"
#include "kd_fused_run.h"
#include "kd_kernels.cuh"
#include "kd_launch.h"

namespace kdfused::cuda {

// Grid caps: the kernels loop over rows (grid-stride), so any N works with a bounded grid.
constexpr int64_t kMaxGridRows = int64_t(1) << 22;

template <typename S, typename T, typename A, DivFamily F, bool Map>
void run_fused_kernels(const KDParams& p, KernelArgs<A> a) {
  constexpr int W = vec_elems<S, T>();
  const LaunchContext ctx = current_launch_context();
  const int device = ctx.device;
  const cudaDeviceProp* prop = ctx.prop;
  const cudaStream_t stream = ctx.stream;
  const RowConfig<A>& cfg = a.cfg;
  const bool any_grad = cfg.want_gs || cfg.want_gt;

  auto block_kernel = &kd_block_kernel<S, T, A, F, Map>;
  const void* block_kernel_ptr = reinterpret_cast<const void*>(block_kernel);
  KernelFacts& facts = kernel_facts(block_kernel_ptr, device, *prop);
  auto plan_for = [&](int max_cluster) {
    return choose_plan(p.n_rows, p.vocab, sizeof(S), sizeof(T), W, cfg.soft, any_grad, cfg.mix,
                       facts.num_sms, max_cluster, facts.smem_optin);
  };
  const int64_t stage_cap = std::min<int64_t>(facts.smem_optin, kMaxStageBytes);
  const int64_t bytes_per_elem = sizeof(S) + (cfg.soft ? sizeof(T) : 0);
  LaunchPlan plan;
  if (auto f = forced_plan(cuda_plan_override(), p.vocab, W, bytes_per_elem, any_grad, cfg.mix,
                           facts.clusters, stage_cap)) {
    plan = *f;
    TORCH_CHECK(!plan.cluster || cluster_fits(block_kernel_ptr, facts, plan),
                "kdfused: CUDA plan '", cuda_plan_spec(), "' cannot be scheduled on this GPU");
  } else {
    plan = plan_for(facts.clusters ? kMaxClusterSplit : 0);
    if (plan.cluster && !cluster_fits(block_kernel_ptr, facts, plan))
      plan = plan_for(kPortableClusterSplit);
    if (plan.cluster && !cluster_fits(block_kernel_ptr, facts, plan)) plan = plan_for(0);
  }
  set_last_cuda_plan(describe(plan));

  if (plan.kind == Kind::Warp) {
    const int64_t blocks =
        std::min<int64_t>((p.n_rows + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxGridRows);
    kd_warp_kernel<S, T, A, F, Map>
        <<<static_cast<unsigned>(blocks), kWarpBlockThreads, 0, stream>>>(p, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  a.split = plan.split;
  a.chunk = plan.slice_vecs;
  a.stage = plan.stage;
  a.cluster = plan.cluster;
  const int64_t rows = std::min<int64_t>(p.n_rows, kMaxGridRows);
  const unsigned grid = static_cast<unsigned>(rows * plan.split);
  const size_t smem = static_cast<size_t>(plan.smem_bytes);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(block_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }

  if (plan.two_phase) {
    // Partial states of every (row, slice); phase 2 merges a row's states in rank order.
    void* ws_ptr = nullptr;
    const std::shared_ptr<void> ws = device_workspace(
        p.n_rows * plan.split * static_cast<int64_t>(sizeof(RowState<A>)), device, &ws_ptr);
    a.workspace = static_cast<RowState<A>*>(ws_ptr);
    a.mode = Mode::Phase1;
    block_kernel<<<grid, kBlockThreads, smem, stream>>>(p, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    a.mode = Mode::Phase2;
    block_kernel<<<grid, kBlockThreads, smem, stream>>>(p, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;  // ws is freed on the host now; the caching allocator keeps it for this stream
  }

  if (plan.cluster) {
    const ClusterLaunch launch(grid, kBlockThreads, plan.split, smem, stream);
    C10_CUDA_CHECK(cudaLaunchKernelEx(&launch.config, block_kernel, p, a));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  block_kernel<<<grid, kBlockThreads, smem, stream>>>(p, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace kdfused::cuda

// The explicit instantiation of one (S, T, A, F, Map), as the generated files write it.
#define KDFUSED_INSTANTIATE_FUSED(S, T, A, F, Map) \
  template void run_fused_kernels<S, T, A, F, Map>(const KDParams&, KernelArgs<A>)
