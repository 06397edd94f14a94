// kd_loss_cuda.cu -- CUDA implementations of the kdfused ops (TORCH_LIBRARY_IMPL(kdfused, CUDA)).
//
// kd_loss, on the current stream of the inputs' device, with no host sync:
//   1. (mean with labels) kd_count_kernel: n_valid and the gradient scale 1/max(n_valid, 1) into
//      device scalars (mean without labels: n_valid = N is known on the host; sum/none: 1);
//   2. the fused kernel chosen by choose_plan() (kd_launch.h): per row, one read of s and t, the
//      row loss, and the gradients already multiplied by the gradient scale;
//   3. (mean/sum) kd_reduce_kernel: the fixed-order sum of the row losses.
// kd_scale_grads_: rescales the saved gradients on the device (see the kernels' comments).
//
// Dtype pairs: kd_dtype_dispatch.h (8 native pairs; the others are converted exactly, and their
// gradients converted back).
//
// Size: the host side of the CUDA op: cached kernel facts, forced plans, the launch of each
// policy and the gradient-scaling op; the kernels themselves are in kd_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>

#include "../kd_cuda_plan.h"
#include "../kd_host.h"
#include "kd_dtype_dispatch.h"
#include "kd_fused_cuda.h"
#include "kd_kernels.cuh"
#include "kd_launch.h"

namespace kdfused::cuda {

namespace {

// Grid caps: the kernels loop over rows (grid-stride), so any N works with a bounded grid.
constexpr int64_t kMaxGridRows = int64_t(1) << 22;

// Per (kernel, device): what the binary holds and what the device allows. Queried once and
// cached, so that per-call host work is a map lookup and the launch plan -- hence the bits of the
// result -- cannot change between calls (a driver answer that varied would otherwise change them).
struct KernelFacts {
  bool clusters = false;   // sm_90 device AND sm_90 code in the binary AND sm_90 PTX source
  int64_t smem_optin = 0;  // dynamic shared memory available to one CTA
  int num_sms = 0;
  std::map<std::pair<int, int64_t>, bool> cluster_fits;  // (split, smem bytes) -> schedulable
};

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

template <typename Kernel>
KernelFacts& kernel_facts(Kernel kernel, int device, const cudaDeviceProp& prop) {
  static std::map<std::pair<const void*, int>, KernelFacts> cache;
  std::lock_guard<std::mutex> lock(facts_mutex());
  auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
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

// Whether a cluster of the plan's shape can be co-scheduled (a host query, no sync), cached. A
// 16-CTA cluster is non-portable (H100/H200 allow it, a MIG slice may not), and shared memory may
// be carved out by another context: ask rather than fail at launch.
template <typename Kernel>
bool cluster_fits(Kernel kernel, KernelFacts& facts, const LaunchPlan& pl) {
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
    cudaLaunchConfig_t qcfg = {};
    qcfg.gridDim = dim3(static_cast<unsigned>(pl.split), 1, 1);
    qcfg.blockDim = dim3(kBlockThreads, 1, 1);
    qcfg.dynamicSmemBytes = static_cast<size_t>(pl.smem_bytes);
    cudaLaunchAttribute qattr[1];
    qattr[0].id = cudaLaunchAttributeClusterDimension;
    qattr[0].val.clusterDim.x = static_cast<unsigned>(pl.split);
    qattr[0].val.clusterDim.y = 1;
    qattr[0].val.clusterDim.z = 1;
    qcfg.attrs = qattr;
    qcfg.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &qcfg) != cudaSuccess) {
      (void)cudaGetLastError();  // a failed query is not sticky; clear it
      ok = false;
    } else {
      ok = clusters >= 1;
    }
  }
  facts.cluster_fits.emplace(key, ok);
  return ok;
}

// The plan the user forced with set_cuda_plan (tests, self-test, benchmarks), or std::nullopt.
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

template <typename S, typename T, typename A, DivFamily F>
void run_fused_kernels(const KDParams& p, KernelArgs<A> a) {
  constexpr int W = vec_elems<S, T>();
  const int device = at::cuda::current_device();
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const RowConfig<A>& cfg = a.cfg;
  const bool any_grad = cfg.want_gs || cfg.want_gt;

  auto block_kernel = &kd_block_kernel<S, T, A, F>;
  KernelFacts& facts = kernel_facts(block_kernel, device, *prop);
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
    TORCH_CHECK(!plan.cluster || cluster_fits(block_kernel, facts, plan), "kdfused: CUDA plan '",
                cuda_plan_spec(), "' cannot be scheduled on this GPU");
  } else {
    plan = plan_for(facts.clusters ? kMaxClusterSplit : 0);
    if (plan.cluster && !cluster_fits(block_kernel, facts, plan))
      plan = plan_for(kPortableClusterSplit);
    if (plan.cluster && !cluster_fits(block_kernel, facts, plan)) plan = plan_for(0);
  }
  set_last_cuda_plan(describe(plan));

  if (plan.kind == Kind::Warp) {
    const int64_t blocks =
        std::min<int64_t>((p.n_rows + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxGridRows);
    kd_warp_kernel<S, T, A, F>
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
    at::Tensor ws = at::empty({p.n_rows * plan.split * static_cast<int64_t>(sizeof(RowState<A>))},
                              at::TensorOptions().device(at::kCUDA, device).dtype(at::kByte));
    a.workspace = reinterpret_cast<RowState<A>*>(ws.data_ptr());
    a.mode = Mode::Phase1;
    block_kernel<<<grid, kBlockThreads, smem, stream>>>(p, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    a.mode = Mode::Phase2;
    block_kernel<<<grid, kBlockThreads, smem, stream>>>(p, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;  // ws is freed on the host now; the caching allocator keeps it for this stream
  }

  if (plan.cluster) {
    cudaLaunchConfig_t lcfg = {};
    lcfg.gridDim = dim3(grid, 1, 1);
    lcfg.blockDim = dim3(kBlockThreads, 1, 1);
    lcfg.dynamicSmemBytes = smem;
    lcfg.stream = stream;
    cudaLaunchAttribute attrs[1];
    attrs[0].id = cudaLaunchAttributeClusterDimension;
    attrs[0].val.clusterDim.x = static_cast<unsigned>(plan.split);
    attrs[0].val.clusterDim.y = 1;
    attrs[0].val.clusterDim.z = 1;
    lcfg.attrs = attrs;
    lcfg.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&lcfg, block_kernel, p, a));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  block_kernel<<<grid, kBlockThreads, smem, stream>>>(p, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename S, typename T, typename A>
void run_fused(const KDParams& p, const A* grad_scale_dev, double grad_scale_host) {
  check_device_arch(*at::cuda::getCurrentDeviceProperties());
  KernelArgs<A> a{};
  a.cfg = make_row_config<A>(p);
  a.grad_scale_dev = grad_scale_dev;
  a.grad_scale_host = static_cast<A>(grad_scale_host);
  a.mode = Mode::Fused;
  a.split = 1;
  a.chunk = p.vocab;
  a.stage = false;
  a.cluster = false;
  a.workspace = nullptr;
  if (family_of(p.divergence) == DivFamily::Plain) {
    run_fused_kernels<S, T, A, DivFamily::Plain>(p, a);
  } else {
    run_fused_kernels<S, T, A, DivFamily::Other>(p, a);
  }
}

KDOutputs kd_loss_cuda(const at::Tensor& student, const at::Tensor& teacher,
                       const std::optional<at::Tensor>& labels, double temperature,
                       double soft_weight, double hard_weight, c10::string_view divergence,
                       double beta, int64_t ignore_index, c10::string_view reduction,
                       bool grad_student, bool grad_teacher) {
  const std::string_view div(divergence.data(), divergence.size());
  const std::string_view red(reduction.data(), reduction.size());
  check_inputs(student, teacher, labels, temperature, soft_weight, hard_weight, div, beta, red);
  TORCH_CHECK(student.is_cuda() && teacher.is_cuda(),
              "kdfused: CUDA kernel called with non-CUDA logits");
  TORCH_CHECK_VALUE(student.size(-1) <= INT_MAX / 16,
                    "kdfused: the vocabulary dimension is too large (", student.size(-1),
                    ") for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(student.device());

  const at::ScalarType s_type = student.scalar_type();
  const at::ScalarType t_type = teacher.scalar_type();
  at::Tensor s_in, t_in;
  std::tie(s_in, t_in) = native_inputs(student, teacher);

  Prepared prep = prepare(s_in, t_in, labels, temperature, soft_weight, hard_weight, div, beta,
                          ignore_index, red, grad_student, grad_teacher);
  const KDParams& p = prep.params;
  const bool mean = p.reduction == Reduction::Mean;
  const bool use_double = prep.loss.scalar_type() == at::kDouble;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  auto run = [&](auto acc_tag) {
    using A = decltype(acc_tag);
    // 1. Gradient scale of "mean" with labels: counted on the device (no sync).
    at::Tensor scale_dev, n_valid_dev;
    const A* scale_ptr = nullptr;
    const int64_t* n_valid_ptr = nullptr;
    const double scale_host =
        mean ? 1.0 / static_cast<double>(std::max<int64_t>(p.n_rows, 1)) : 1.0;
    if (mean && p.labels != nullptr && p.n_rows > 0) {
      scale_dev = at::empty({}, prep.loss.options());
      n_valid_dev = at::empty({}, prep.loss.options().dtype(at::kLong));
      kd_count_kernel<A><<<1, kCountThreads, 0, stream>>>(p.labels, p.n_rows, p.ignore_index,
                                                          scale_dev.data_ptr<A>(),
                                                          n_valid_dev.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      scale_ptr = scale_dev.data_ptr<A>();
      n_valid_ptr = n_valid_dev.data_ptr<int64_t>();
    }
    // 2. The fused kernel (nothing to launch for N = 0: a grid of 0 is an error).
    if (p.n_rows > 0) {
      dispatch_pair(s_in.scalar_type(), t_in.scalar_type(), [&](auto s_tag, auto t_tag) {
        using S = decltype(s_tag);
        using T = decltype(t_tag);
        using AA = std::conditional_t<std::is_same_v<S, double>, double, float>;
        if constexpr (std::is_same_v<AA, A>) {
          run_fused<S, T, A>(p, scale_ptr, scale_host);
        } else {
          TORCH_INTERNAL_ASSERT(false, "kdfused: accumulation type mismatch");
        }
      });
    }
    // 3. The reduction of the row losses (also for N = 0: the loss is 0).
    if (p.reduction != Reduction::None) {
      kd_reduce_kernel<A><<<1, kReduceThreads, 0, stream>>>(static_cast<const A*>(p.row_loss),
                                                            p.n_rows, mean, n_valid_ptr, p.n_rows,
                                                            static_cast<A*>(p.loss));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  if (use_double) {
    run(double{});
  } else {
    run(float{});
  }

  if (s_in.scalar_type() != s_type) prep.grad_student = prep.grad_student.to(s_type);
  if (t_in.scalar_type() != t_type) prep.grad_teacher = prep.grad_teacher.to(t_type);
  return outputs_of(prep);
}

void kd_scale_grads_cuda(at::Tensor& grad_student, at::Tensor& grad_teacher, at::Tensor& grad_scale,
                         const at::Tensor& grad_output) {
  TORCH_CHECK(grad_output.sizes() == grad_scale.sizes(), "kdfused: grad_output has shape ",
              grad_output.sizes(), ", expected ", grad_scale.sizes());
  TORCH_CHECK(grad_scale.is_cuda() && grad_scale.is_contiguous(),
              "kdfused: grad_scale must be a contiguous CUDA tensor");
  const c10::cuda::CUDAGuard guard(grad_scale.device());
  const int64_t n_scale = grad_scale.numel();
  if (n_scale == 0) return;
  // On the device, asynchronously: the dtype of the state, contiguous.
  const at::Tensor g = grad_output.to(grad_scale.device(), grad_scale.scalar_type()).contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

  AT_DISPATCH_FLOATING_TYPES(grad_scale.scalar_type(), "kd_scale_grads_", [&] {
    using F = scalar_t;
    const bool scalar = grad_scale.dim() == 0;
    at::Tensor factor;
    if (scalar) {
      factor = at::empty({}, grad_scale.options());
      // factor = f(g, old c), then c = g (one thread; the scaling kernel reads only `factor`).
      kd_scale_factor_kernel<F>
          <<<1, 1, 0, stream>>>(g.data_ptr<F>(), grad_scale.data_ptr<F>(), factor.data_ptr<F>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    for (at::Tensor* grad : {&grad_student, &grad_teacher}) {
      if (grad->numel() == 0) continue;
      TORCH_CHECK(
          grad->is_cuda() && grad->is_contiguous() && grad->device() == grad_scale.device(),
          "kdfused: saved gradients must be contiguous tensors on the device of grad_scale");
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, grad->scalar_type(), "kd_scale_grads_", [&] {
            using G = scalar_t;
            constexpr int kW = kVecBytes / static_cast<int>(sizeof(G));
            const int64_t n = grad->numel();
            if (scalar) {
              const int64_t want = (n / kW + kScaleThreads - 1) / kScaleThreads + 1;
              const int64_t blocks =
                  std::min<int64_t>(want, static_cast<int64_t>(sms) * kScaleMaxBlocksPerSM);
              kd_scale_flat_kernel<G, F>
                  <<<static_cast<unsigned>(blocks), kScaleThreads, 0, stream>>>(
                      grad->data_ptr<G>(), n, factor.data_ptr<F>());
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            } else {
              TORCH_CHECK(n % n_scale == 0, "kdfused: saved gradient of ", n, " elements for ",
                          n_scale, " rows");
              const int64_t V = n / n_scale;
              constexpr int kRowsPerBlock = kScaleThreads / kWarpSize;
              const int64_t blocks =
                  std::min<int64_t>((n_scale + kRowsPerBlock - 1) / kRowsPerBlock,
                                    static_cast<int64_t>(sms) * kScaleMaxBlocksPerSM * 4);
              kd_scale_rows_kernel<G, F>
                  <<<static_cast<unsigned>(blocks), kScaleThreads, 0, stream>>>(
                      grad->data_ptr<G>(), n_scale, V, g.data_ptr<F>(), grad_scale.data_ptr<F>());
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
          });
    }
    // Reduction "none": c = g after every row kernel has read the old c (stream order).
    if (!scalar) grad_scale.copy_(g);
  });
}

at::ScalarType scalar_type_of(DType d) {
  switch (d) {
    case DType::Float16: return at::kHalf;
    case DType::BFloat16: return at::kBFloat16;
    case DType::Float32: return at::kFloat;
    case DType::Float64: return at::kDouble;
  }
  TORCH_INTERNAL_ASSERT(false, "kdfused: unknown dtype code ", static_cast<int>(d));
}

}  // namespace

std::pair<at::ScalarType, at::ScalarType> fused_kernel_dtypes(at::ScalarType s, at::ScalarType t) {
  return native_dtypes(s, t);
}

void run_fused_kernel(const KDParams& p, const void* grad_scale_dev, double grad_scale_host) {
  TORCH_INTERNAL_ASSERT(p.n_rows > 0, "kdfused: run_fused_kernel needs rows");
  dispatch_pair(scalar_type_of(p.student_dtype), scalar_type_of(p.teacher_dtype),
                [&](auto s_tag, auto t_tag) {
                  using S = decltype(s_tag);
                  using T = decltype(t_tag);
                  using A = std::conditional_t<std::is_same_v<S, double>, double, float>;
                  run_fused<S, T, A>(p, static_cast<const A*>(grad_scale_dev), grad_scale_host);
                });
}

}  // namespace kdfused::cuda

TORCH_LIBRARY_IMPL(kdfused, CUDA, m) {
  m.impl("kd_loss", &kdfused::cuda::kd_loss_cuda);
  m.impl("kd_scale_grads_", &kdfused::cuda::kd_scale_grads_cuda);
}
