// kd_fused_host.cu -- the host-side helpers of the fused kernel's launch (kd_fused_host.h),
// compiled once for every kernel instantiation (csrc/cuda/instantiations/).
#include "kd_fused_host.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <mutex>

#include "kd_cluster_launch.h"

namespace kdfused::cuda {

namespace {

std::mutex& facts_mutex() {
  static std::mutex m;
  return m;
}

// Read once per process: KDFUSED_CUDA_NO_CLUSTERS=1 takes the sm_80 policy on sm_90 too.
bool env_no_clusters() {
  static const bool v = [] {
    const char* e = std::getenv("KDFUSED_CUDA_NO_CLUSTERS");
    return e != nullptr && e[0] == '1';
  }();
  return v;
}

}  // namespace

LaunchContext current_launch_context() {
  LaunchContext c;
  c.device = at::cuda::current_device();
  c.prop = at::cuda::getCurrentDeviceProperties();
  c.stream = at::cuda::getCurrentCUDAStream();
  return c;
}

std::shared_ptr<void> device_workspace(int64_t bytes, int device, void** ptr) {
  auto ws = std::make_shared<at::Tensor>(
      at::empty({bytes}, at::TensorOptions().device(at::kCUDA, device).dtype(at::kByte)));
  *ptr = ws->data_ptr();
  return ws;
}

KernelFacts& kernel_facts(const void* kernel, int device, const cudaDeviceProp& prop) {
  static std::map<std::pair<const void*, int>, KernelFacts> cache;
  std::lock_guard<std::mutex> lock(facts_mutex());
  auto key = std::make_pair(kernel, device);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  KernelFacts f;
  // Clusters need an sm_90 device *and* code compiled for sm_90: binaryVersion is what runs
  // (an sm_80-only build runs its sm_80 code on Hopper), ptxVersion what it was compiled from (a
  // "+PTX" build of compute_80 JIT-compiled on Hopper has binaryVersion 90 but no cluster path).
  f.clusters =
      prop.major >= 9 && attr.binaryVersion >= 90 && attr.ptxVersion >= 90 && !env_no_clusters();
  f.smem_optin = static_cast<int64_t>(prop.sharedMemPerBlockOptin) -
                 static_cast<int64_t>(attr.sharedSizeBytes);
  f.num_sms = prop.multiProcessorCount;
  return cache.emplace(key, std::move(f)).first->second;
}

// A 16-CTA cluster is non-portable (H100/H200 allow it, a MIG slice may not), and shared memory
// may be carved out by another context: ask rather than fail at launch.
bool cluster_fits(const void* kernel, KernelFacts& facts, const LaunchPlan& pl) {
  std::lock_guard<std::mutex> lock(facts_mutex());
  const auto key = std::make_pair(pl.split, pl.smem_bytes);
  auto it = facts.cluster_fits.find(key);
  if (it != facts.cluster_fits.end()) return it->second;
  bool ok = true;
  if (pl.split > kPortableClusterSplit &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) !=
          cudaSuccess) {
    (void)cudaGetLastError();
    ok = false;
  }
  if (ok && pl.smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(pl.smem_bytes)));
  }
  if (ok) {
    // One cluster of the plan's launch (kd_fused_run.cuh).
    const ClusterLaunch q(static_cast<unsigned>(pl.split), kBlockThreads, pl.split,
                          static_cast<size_t>(pl.smem_bytes), nullptr);
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &q.config) != cudaSuccess) {
      (void)cudaGetLastError();  // a failed query is not sticky; clear it
      ok = false;
    } else {
      ok = clusters >= 1;
    }
  }
  facts.cluster_fits.emplace(key, ok);
  return ok;
}

std::optional<LaunchPlan> forced_plan(const PlanOverride& o, int64_t V, int vec_elems,
                                      int64_t bytes_per_elem, bool any_grad, bool mix,
                                      bool clusters, int64_t stage_cap) {
  if (o.kind == PlanOverride::Kind::Auto) return std::nullopt;
  LaunchPlan pl;
  if (o.kind == PlanOverride::Kind::Warp) return pl;  // kind Warp, defaults
  pl.kind = Kind::Block;
  pl.split = o.kind == PlanOverride::Kind::Block ? 1 : o.split;
  pl.cluster = o.kind == PlanOverride::Kind::Cluster;
  pl.two_phase = o.kind == PlanOverride::Kind::TwoPhase;
  TORCH_CHECK(!pl.cluster || clusters, "kdfused: CUDA plan 'cluster:", o.split,
              "' needs an sm_90 GPU and sm_90 code");
  TORCH_CHECK(!(pl.two_phase && mix),
              "kdfused: CUDA plan 'two_phase' does not support the jsd / tvd divergences");
  pl.slice_vecs = (V / vec_elems + pl.split - 1) / pl.split;
  const int64_t slice_bytes = pl.slice_vecs * vec_elems * bytes_per_elem;
  pl.stage = (any_grad || mix) && !pl.two_phase && slice_bytes <= stage_cap;
  pl.smem_bytes = pl.stage ? slice_bytes : 0;
  return pl;
}

std::string describe(const LaunchPlan& pl) {
  if (pl.kind == Kind::Warp) return "warp";
  std::string d = "block split=" + std::to_string(pl.split);
  if (pl.cluster) d += " cluster";
  if (pl.two_phase) d += " two_phase";
  if (pl.stage) d += " stage";
  return d;
}

}  // namespace kdfused::cuda
