// kd_topk_cuda.cu -- CUDA implementation of kdfused::topk_kd_loss (TORCH_LIBRARY_IMPL CUDA).
//
// Maths: kd_topk_math.h (supports, divergences, the gradient's dense and sparse parts), whose
// per-element functions (merge, below_max, valid_entry, log_prob, bucket, tail_log, soft_grad,
// hard_term) the CPU kernel (cpu/topk/kd_topk_kernel_cpu.h, topk_terms / topk_rows) runs too;
// this file mirrors that kernel's structure. Padding entries (value -inf) are skipped by every
// pass: their indices are range-checked, never used.
//
// One group of G threads per row (G = 32, a warp, for V <= kWarpMaxV; else G = 256, a CTA),
// rows in a grid-stride loop:
//   1. statistics (only when the soft term needs q over V -- supports Full and Tail -- or the hard
//      term is on; at T = 1 when only the hard term needs them): every thread folds its strided
//      elements into online (max, sum exp) states (merge(), one exp per element), merged over the
//      group in a fixed tree;
//   2. teacher entries (soft term only): threads strided over the k entries, three passes with
//      fixed-order group reductions between them: index checks, the valid count and the maxima
//      (teacher values; student z at the entries for Renormalized); the two sides' sums over the
//      support; the buckets' terms D and G. Then the tail bucket (Tail), soft_grad(), the row loss.
//      A row without a valid entry: D = 0 and no soft gradient;
//   3. gradient sweep: the dense part ks dense q_i + kh (softmax(z)_i - [i == y]) for every
//      element (0 without statistics), then, after a group barrier (global writes of a CTA are
//      visible to it after __syncthreads), the valid entries' positions are overwritten with their
//      full value (dense part recomputed plus ks (g_j - c exp(lq_j)), g_j recomputed): one rounding
//      to the student's dtype, no atomics. Padding positions are never written (a padding index
//      may repeat a valid one).
// The student's transform (kd_math.h LogitMap: scale, softcap) is applied to every student logit
// loaded, before any use (maxima, sums, z at the teacher's indices, z_y), and each gradient element
// stored is multiplied by its slope; compiled only into the Map instantiations. The stored
// teacher values are taken as given (the host transformed them).
// The second read of the row mostly hits L2 (a row is at most V * 8 bytes and few rows are in
// flight per SM). Deterministic: every reduction has a fixed order, no float atomics.
//
// Value checks without a host sync (when the soft term reads the entries): an index out of [0, V)
// (any entry), a duplicate index among a row's valid entries (a bitmap of the row's vocabulary in
// shared memory, V <= kBitmapMaxV) and a label out of range stop the kernel with a device-side
// assert. With asserts compiled out the kernel never reads or writes out of bounds: the student's
// logit at a valid entry's or the label's out-of-range index reads as NaN (the row is poisoned).
//
// Launch: no host syncs anywhere (the gradient scale of "mean" with labels is counted on the
// device); int64 offsets; every launch is checked.
//
// Size: the whole top-k CUDA op (kernels and host wrapper) in one file, as the CPU side is.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
#include <set>
#include <type_traits>

#include "../kd_topk.h"
#include "../kd_topk_math.h"
#include "kd_reduce_kernels.cuh"

#if defined(CUDA_KERNEL_ASSERT_MSG)
#define KD_TOPK_ASSERT(cond, msg) CUDA_KERNEL_ASSERT_MSG(cond, msg)
#else
#define KD_TOPK_ASSERT(cond, msg) CUDA_KERNEL_ASSERT(cond)
#endif

namespace kdfused::topk_cuda {

namespace {

using topk::MaxSum;
using topk::TopKParams;

constexpr int kThreads = 256;  // threads per CTA (both variants)
constexpr int kWarp = 32;
constexpr int64_t kWarpMaxV = 1024;             // warp per row up to here
constexpr int64_t kBitmapMaxV = 48 * 1024 * 8;  // 48 KiB of shared memory: the duplicate check
constexpr int kBitmapMaxBytes = static_cast<int>(kBitmapMaxV / 8);
constexpr int kDefaultSmemBytes = 48 * 1024;    // static + dynamic shared memory without an opt-in
constexpr int64_t kMaxGrid = int64_t(1) << 20;  // grid-stride loop over rows beyond this
constexpr int kSmallThreads = 256;              // count and reduce kernels

template <typename S, typename A>
__device__ __forceinline__ A to_acc(S x) {
  if constexpr (std::is_same_v<S, A>) {
    return x;
  } else {
    return static_cast<A>(static_cast<float>(x));
  }
}

template <typename S, typename A>
__device__ __forceinline__ S to_out(A x) {
  if constexpr (std::is_same_v<S, A>) {
    return x;
  } else if constexpr (std::is_same_v<S, float> || std::is_same_v<S, double>) {
    return static_cast<S>(x);
  } else {
    return S(static_cast<float>(x));
  }
}

// ---- group reductions: G = 32 (shuffles only) or G = kThreads (shuffles + shared memory) ------
// Every thread of the group ends with the same bits: a fixed butterfly, then lane 0's value (or,
// for a CTA, every thread merges the warps' values in warp order).

template <int G>
__device__ __forceinline__ void group_sync() {
  if constexpr (G == kWarp) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

template <int G, typename X, typename F>
__device__ __forceinline__ X group_reduce(X x, F op, X* smem) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    X y;
    if constexpr (std::is_same_v<X, MaxSum<float>> || std::is_same_v<X, MaxSum<double>>) {
      y.m = __shfl_xor_sync(0xffffffffu, x.m, off);
      y.z = __shfl_xor_sync(0xffffffffu, x.z, off);
    } else {
      y = __shfl_xor_sync(0xffffffffu, x, off);
    }
    x = (threadIdx.x & off) ? op(y, x) : op(x, y);  // the lower lane's value first
  }
  if constexpr (std::is_same_v<X, MaxSum<float>> || std::is_same_v<X, MaxSum<double>>) {
    x.m = __shfl_sync(0xffffffffu, x.m, 0);
    x.z = __shfl_sync(0xffffffffu, x.z, 0);
  } else {
    x = __shfl_sync(0xffffffffu, x, 0);
  }
  if constexpr (G == kWarp) {
    return x;
  } else {
    const int warp = threadIdx.x / kWarp;
    if ((threadIdx.x % kWarp) == 0) smem[warp] = x;
    __syncthreads();
    X acc = smem[0];
#pragma unroll
    for (int w = 1; w < G / kWarp; ++w) acc = op(acc, smem[w]);
    __syncthreads();  // smem is reused by the next reduction
    return acc;
  }
}

// The student's z of a raw logit (Map: the instantiation applies the transform), and a gradient
// w.r.t. z made one w.r.t. the raw logit. Map = false compiles to the plain conversion.
template <bool Map, typename S, typename A>
__device__ __forceinline__ A student_z(S x, const LogitMap<A>& m) {
  if constexpr (Map) {
    return map_logit(to_acc<S, A>(x), m);
  } else {
    return to_acc<S, A>(x);
  }
}
template <bool Map, typename A>
__device__ __forceinline__ A student_grad(A g, A z, const LogitMap<A>& m) {
  if constexpr (Map) {
    return g * map_slope(z, m);
  } else {
    return g;
  }
}

template <typename A>
struct Smem {
  MaxSum<A> ms[kThreads / kWarp];
  A a[kThreads / kWarp];
  int64_t n[kThreads / kWarp];
};

// Map: the student's transform m is on (the host picks the instantiation from m.on). dc: the
// divergence's constants (kd_topk_math.h make_div_const, on the host).
template <typename S, typename A, int G, bool Map>
__global__ void __launch_bounds__(kThreads)
    topk_kernel(TopKParams p, const LogitMap<A> m, const topk::DivConst<A> dc,
                const A* __restrict__ scale_dev, A scale_host) {
  using topk::Support;
  constexpr int kGroups = kThreads / G;
  // Bitmaps of the duplicate check: one per warp (V <= kWarpMaxV) or the CTA's dynamic smem.
  __shared__ unsigned warp_bitmap[G == kWarp ? kGroups : 1][kWarpMaxV / 32];
  extern __shared__ unsigned cta_bitmap[];
  __shared__ Smem<A> red;

  const int lane = static_cast<int>(threadIdx.x) % G;
  const int group = static_cast<int>(threadIdx.x) / G;
  unsigned* bitmap = (G == kWarp) ? warp_bitmap[group] : cta_bitmap;
  const int64_t V = p.vocab;
  const int64_t K = p.k;
  const bool soft = p.soft_weight > 0;
  const bool hard = p.hard_weight > 0;
  const bool want_g = p.grad_student != nullptr;
  const Support support = p.support;
  const bool renorm = support == Support::Renormalized;
  // Whether the soft term needs q over the whole vocabulary (not for Renormalized, whose student
  // lives on the entries alone), and whether anything needs the statistics sweep.
  const bool soft_dense = soft && !renorm;
  const bool need_stats = soft_dense || hard;
  // The statistics' scale: without the soft term's q only T = 1 ones are needed (the hard term's).
  const A inv_a = soft_dense ? static_cast<A>(p.inv_temperature) : A(1);
  const A inv_t = static_cast<A>(p.inv_temperature);  // the student's log-probs at the entries
  const A t_inv_t = p.logprobs ? A(1) : inv_t;        // the teacher's: stored log-probs are final
  const A temp = static_cast<A>(p.temperature);
  const bool need_h = hard && soft_dense && p.temperature != 1.0;
  const bool use_bitmap = soft && K > 1 && V <= ((G == kWarp) ? kWarpMaxV : kBitmapMaxV);
  const int64_t words = (V + 31) / 32;
  const S* s_base = static_cast<const S*>(p.student);
  const A* v_base = static_cast<const A*>(p.values);
  A* row_loss = static_cast<A*>(p.row_loss);
  auto max_op = [](A x, A y) { return kd_max(x, y); };
  auto sum_op = [](A x, A y) { return x + y; };
  auto count_op = [](int64_t x, int64_t y) { return x + y; };
  auto merge_a = [inv_a](const MaxSum<A>& x, const MaxSum<A>& y) {
    return topk::merge(x, y, inv_a);
  };
  auto merge_h = [](const MaxSum<A>& x, const MaxSum<A>& y) { return topk::merge(x, y, A(1)); };

  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kGroups + group; r < p.n_rows;
       r += static_cast<int64_t>(gridDim.x) * kGroups) {
    const S* srow = s_base + r * p.student_stride;
    S* grow = want_g ? static_cast<S*>(p.grad_student) + r * V : nullptr;
    // The student's z at column i (NaN out of range: only reached with asserts compiled out).
    auto z_at = [&](int64_t i) { return (i >= 0 && i < V) ? student_z<Map>(srow[i], m) : A(NAN); };
    int64_t y = -1;
    bool row_on = true;
    if (p.labels) {
      y = p.labels[r];
      row_on = y != p.ignore_index;
      if (lane == 0) {
        KD_TOPK_ASSERT(!row_on || (y >= 0 && y < V),
                       "kdfused: label out of range [0, V) and not ignore_index");
      }
    }
    if (!row_on || (!soft && !hard)) {
      if (lane == 0) row_loss[r] = A(0);
      if (grow) {
        for (int64_t i = lane; i < V; i += G) grow[i] = to_out<S, A>(A(0));
      }
      continue;
    }

    // ---- 1. statistics --------------------------------------------------------------------
    MaxSum<A> a{-kd_inf<A>(), A(0)}, h{-kd_inf<A>(), A(0)};
    if (need_stats) {
      for (int64_t i = lane; i < V; i += G) {
        const MaxSum<A> e = topk::element(student_z<Map>(srow[i], m));
        a = topk::merge(a, e, inv_a);
        if (need_h) h = topk::merge(h, e, A(1));
      }
      a = group_reduce<G>(a, merge_a, red.ms);
      if (need_h) h = group_reduce<G>(h, merge_h, red.ms);
    }
    const A ms = a.m;
    const A log_za = kd_log(a.z);
    const A log_zh = need_h ? kd_log(h.z) : log_za;

    // ---- 2. teacher entries (kd_topk_kernel_cpu.h topk_terms) --------------------------------
    A loss = A(0);
    int64_t n_valid = 0;
    // The two sides' log-probabilities over the support and the soft gradient's constants.
    topk::LogProbs<A> lp_of{A(0), A(1), A(0)}, lq_of{A(0), A(1), A(0)};
    topk::SoftGrad<A> sg{A(0), A(0)};
    const int64_t* ix = p.indices + r * K;
    const A* vv = v_base + r * K;
    if (soft) {
      if (use_bitmap) {
        for (int64_t w = lane; w < words; w += G) bitmap[w] = 0u;
        group_sync<G>();
      }
      // Index checks; the valid count and the maxima over the valid entries: the teacher's values,
      // the student's logits there (Renormalized only: the other supports shift by ms).
      A mv = -kd_inf<A>(), mk = -kd_inf<A>();
      for (int64_t j = lane; j < K; j += G) {
        const int64_t i = ix[j];
        const bool in_range = i >= 0 && i < V;
        KD_TOPK_ASSERT(in_range, "kdfused: teacher_indices out of range [0, V)");
        const A v = vv[j];
        if (!topk::valid_entry(v)) continue;
        ++n_valid;
        if (use_bitmap && in_range) {
          const unsigned bit = 1u << (i & 31);
          const unsigned old = atomicOr(&bitmap[i >> 5], bit);
          KD_TOPK_ASSERT((old & bit) == 0u,
                         "kdfused: duplicate teacher_indices among a row's valid entries");
        }
        mv = kd_max(mv, v);
        if (renorm) mk = kd_max(mk, z_at(i));
      }
      if (use_bitmap) group_sync<G>();  // every atomicOr done before the bitmap is reused
      n_valid = group_reduce<G>(n_valid, count_op, red.n);
      if (n_valid > 0) {  // else no support: D = 0, no soft gradient
        mv = group_reduce<G>(mv, max_op, red.a);
        if (renorm) mk = group_reduce<G>(mk, max_op, red.a);
        // The sums over the support: the teacher's, and the student's (Renormalized: its
        // normaliser; Tail: its mass on the entries; Full: not needed).
        const bool need_zk = support != Support::Full;
        const A mz = renorm ? mk : ms;  // the student's shift
        A zt = A(0), zk = A(0);
        for (int64_t j = lane; j < K; j += G) {
          const A v = vv[j];
          if (!topk::valid_entry(v)) continue;
          zt += kd_exp(topk::below_max(v, mv) * t_inv_t);
          if (need_zk) zk += kd_exp(topk::below_max(z_at(ix[j]), mz) * inv_t);
        }
        zt = group_reduce<G>(zt, sum_op, red.a);
        if (need_zk) zk = group_reduce<G>(zk, sum_op, red.a);
        const topk::RowLogProbs<A> lps =
            topk::row_log_probs(support, mv, t_inv_t, zt, mk, zk, ms, inv_t, log_za);
        lp_of = lps.lp;
        lq_of = lps.lq;
        // The buckets at the valid entries: D and G = sum_j g_j.
        A d = A(0), gs = A(0);
        for (int64_t j = lane; j < K; j += G) {
          const A v = vv[j];
          if (!topk::valid_entry(v)) continue;
          const topk::Bucket<A> b =
              topk::bucket(topk::log_prob(lp_of, v), topk::log_prob(lq_of, z_at(ix[j])), dc);
          d += b.d;
          gs += b.g;
        }
        d = group_reduce<G>(d, sum_op, red.a);
        gs = group_reduce<G>(gs, sum_op, red.a);
        sg = topk::finish_row(support, dc, mv, zt, zk, log_za, gs, d);
        loss += static_cast<A>(p.soft_weight) * temp * temp * d;
      }
    }
    if (hard) {
      loss += static_cast<A>(p.hard_weight) * topk::hard_term(log_zh, z_at(y), ms);
    }
    if (lane == 0) row_loss[r] = loss;
    if (!want_g) continue;

    // ---- 3. gradient ---------------------------------------------------------------------------
    const A scale = scale_dev ? *scale_dev : scale_host;
    const A ks = soft ? static_cast<A>(p.soft_weight) * temp * scale : A(0);
    const A kh = hard ? static_cast<A>(p.hard_weight) * scale : A(0);
    const A kd = ks * sg.dense;
    // The dense part of the gradient w.r.t. z at column i (the label's -kh included); student_grad
    // makes a finished element one w.r.t. the raw logit.
    auto dense = [&](A z, int64_t i) {
      A g = A(0);
      if (need_stats) {
        const A ds = z - ms;
        const A q = kd_exp(ds * inv_a - log_za);
        const A hh = need_h ? kd_exp(ds - log_zh) : q;
        g = kd * q + kh * hh;
      }
      return i == y ? g - kh : g;
    };
    for (int64_t i = lane; i < V; i += G) {
      const A z = student_z<Map>(srow[i], m);
      grow[i] = to_out<S, A>(student_grad<Map>(dense(z, i), z, m));
    }
    if (n_valid > 0) {  // only with the soft term
      group_sync<G>();  // the dense values are written before the entries' positions are replaced
      for (int64_t j = lane; j < K; j += G) {
        const A v = vv[j];
        const int64_t i = ix[j];
        if (!topk::valid_entry(v) || !(i >= 0 && i < V)) continue;
        const A z = student_z<Map>(srow[i], m);
        const A lq = topk::log_prob(lq_of, z);
        const topk::Bucket<A> b = topk::bucket(topk::log_prob(lp_of, v), lq, dc);
        const A g = dense(z, i) + ks * (b.g - sg.c * kd_exp(lq));
        grow[i] = to_out<S, A>(student_grad<Map>(g, z, m));
      }
    }
  }
}

// Why: a kernel may use more than 48 KiB of shared memory, static plus dynamic, only after its
// cudaFuncAttributeMaxDynamicSharedMemorySize was raised; otherwise the launch fails ("invalid
// argument"). The CTA variant's bitmap alone is up to 48 KiB (V <= kBitmapMaxV), on top of the
// kernel's static shared memory (the reductions' scratch), so V just below kBitmapMaxV needs the
// opt-in. It is set once per (kernel, device), to the largest bitmap, and only when static + that
// bitmap exceeds the default (every sm_80+ GPU allows far more per CTA).
template <typename S, typename A, bool Map>
void allow_cta_bitmap(int device) {
  static std::mutex m;
  static std::set<int> done;  // devices, for this kernel (one per template instantiation)
  const std::lock_guard<std::mutex> lock(m);
  if (done.count(device) != 0) return;
  const void* kernel = reinterpret_cast<const void*>(&topk_kernel<S, A, kThreads, Map>);
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  if (static_cast<int64_t>(attr.sharedSizeBytes) + kBitmapMaxBytes > kDefaultSmemBytes) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBitmapMaxBytes));
  }
  done.insert(device);
}

template <typename S, typename A, bool Map>
void launch_map(const TopKParams& p, const LogitMap<A>& m, const topk::DivConst<A>& dc,
                const A* scale_dev, A scale_host, cudaStream_t stream) {
  if (p.vocab <= kWarpMaxV) {
    constexpr int kGroups = kThreads / kWarp;
    const int64_t blocks = std::min<int64_t>((p.n_rows + kGroups - 1) / kGroups, kMaxGrid);
    topk_kernel<S, A, kWarp, Map>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, m, dc, scale_dev, scale_host);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const bool bitmap = p.soft_weight > 0 && p.k > 1 && p.vocab <= kBitmapMaxV;
  const size_t smem = bitmap ? static_cast<size_t>((p.vocab + 31) / 32) * sizeof(unsigned) : 0;
  if (bitmap) allow_cta_bitmap<S, A, Map>(at::cuda::current_device());
  const int64_t blocks = std::min<int64_t>(p.n_rows, kMaxGrid);
  topk_kernel<S, A, kThreads, Map>
      <<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p, m, dc, scale_dev, scale_host);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The kernels with the student's transform compiled in only when it is not the identity.
template <typename S, typename A>
void launch(const TopKParams& p, const A* scale_dev, A scale_host, cudaStream_t stream) {
  const LogitMap<A> m = make_logit_map<A>(p.student_scale, p.student_softcap);
  const topk::DivConst<A> dc = topk::make_div_const<A>(p);
  if (m.on) {
    launch_map<S, A, true>(p, m, dc, scale_dev, scale_host, stream);
  } else {
    launch_map<S, A, false>(p, m, dc, scale_dev, scale_host, stream);
  }
}

// topk_kd_loss on parsed options and checked shapes (topk::topk_kd_loss_op).
topk::TopKOutputs topk_kd_loss_cuda(const at::Tensor& student, const at::Tensor& indices,
                                    const at::Tensor& values,
                                    const std::optional<at::Tensor>& labels,
                                    const topk::TopKOptions& opt, bool grad_student) {
  TORCH_CHECK(student.is_cuda(), "kdfused: CUDA kernel called with non-CUDA logits");
  const c10::cuda::CUDAGuard guard(student.device());
  topk::TopKPrepared prep = topk::prepare_topk(student, indices, values, labels, opt, grad_student);
  const TopKParams& p = prep.params;
  const bool mean = p.reduction == Reduction::Mean;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  auto run = [&](auto acc_tag) {
    using A = decltype(acc_tag);
    at::Tensor scale_t, n_valid_t;
    const A* scale_dev = nullptr;
    const int64_t* n_valid_dev = nullptr;
    const A scale_host =
        static_cast<A>(mean ? 1.0 / static_cast<double>(std::max<int64_t>(p.n_rows, 1)) : 1.0);
    if (mean && p.labels != nullptr && p.n_rows > 0) {
      scale_t = at::empty({}, prep.loss.options());
      n_valid_t = at::empty({}, prep.loss.options().dtype(at::kLong));
      cuda::kd_count_kernel<A, kSmallThreads><<<1, kSmallThreads, 0, stream>>>(
          p.labels, p.n_rows, p.ignore_index, scale_t.data_ptr<A>(), n_valid_t.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      scale_dev = scale_t.data_ptr<A>();
      n_valid_dev = n_valid_t.data_ptr<int64_t>();
    }
    if (p.n_rows > 0) {
      switch (p.student_dtype) {
        case DType::Float16: launch<c10::Half, A>(p, scale_dev, scale_host, stream); break;
        case DType::BFloat16: launch<c10::BFloat16, A>(p, scale_dev, scale_host, stream); break;
        case DType::Float32: launch<float, A>(p, scale_dev, scale_host, stream); break;
        case DType::Float64:
          if constexpr (std::is_same_v<A, double>) {
            launch<double, double>(p, scale_dev, scale_host, stream);
          } else {
            TORCH_INTERNAL_ASSERT(false, "kdfused: float64 student with float32 accumulation");
          }
          break;
      }
    }
    if (p.reduction != Reduction::None) {
      cuda::kd_reduce_kernel<A, kSmallThreads>
          <<<1, kSmallThreads, 0, stream>>>(static_cast<const A*>(p.row_loss), p.n_rows, mean,
                                            n_valid_dev, p.n_rows, static_cast<A*>(p.loss));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  if (prep.loss.scalar_type() == at::kDouble) {
    run(double{});
  } else {
    run(float{});
  }
  return topk::topk_outputs_of(prep);
}

}  // namespace

}  // namespace kdfused::topk_cuda

TORCH_LIBRARY_IMPL(kdfused, CUDA, m) {
  m.impl("topk_kd_loss", &kdfused::topk::topk_kd_loss_op<kdfused::topk_cuda::topk_kd_loss_cuda>);
}
