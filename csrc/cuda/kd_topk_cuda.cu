// kd_topk_cuda.cu -- CUDA implementation of kdfused::topk_kd_loss (TORCH_LIBRARY_IMPL CUDA).
//
// Maths (kd_topk_math.h, shared with the CPU kernel): per row, q = softmax(s/T) over all V,
// p = softmax(v/T) over the k stored teacher entries at indices i_j,
//   KL = sum_j p_j (log p_j - log q_{i_j}),  CE = -sum_j p_j log q_{i_j},  hard = CE(s, y) at T = 1
//   row = sw T^2 D + hw hard,   d row / d s_i = sw T (q_i - p~_i) + hw (softmax(s)_i - [i == y]).
//
// One group of G threads per row (G = 32, a warp, for V <= kWarpMaxV; else G = 256, a CTA),
// rows in a grid-stride loop:
//   1. statistics: every thread folds its strided elements into online (max, sum exp) states
//      (kd_topk_math.h merge(), one exp per element), merged over the group in a fixed tree;
//   2. teacher terms: threads strided over the k entries (index checks, gather of s, the teacher
//      softmax over k), fixed-order group sums; the row loss;
//   3. gradient sweep: the dense part sw T q + hw (softmax(s) - [i == y]) for every element, then,
//      after a group barrier (global writes of a CTA are visible to it after __syncthreads), the
//      k teacher positions are overwritten with their full value (dense part recomputed minus
//      sw T p_j): one rounding to the student's dtype, no atomics.
// The student's transform (kd_math.h LogitMap: scale, softcap) is applied to every student logit
// loaded, before any use (maxima, sums, s at the teacher's indices, s_y), and each gradient element
// stored is multiplied by its slope; compiled only into the Map instantiations. The stored
// teacher values are taken as given (the host transformed them).
// The second read of the row mostly hits L2 (a row is at most V * 8 bytes and few rows are in
// flight per SM). Deterministic: every reduction has a fixed order, no float atomics.
//
// Value checks without a host sync: an index out of [0, V), a duplicate index in a row (a bitmap
// of the row's vocabulary in shared memory, V <= kBitmapMaxV) and a label out of range stop the
// kernel with a device-side assert. With asserts compiled out the kernel never reads out of
// bounds: such a row gets NaN.
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

// A single element as a (max, sum) state: a -inf element has no mass (sum 0), so that folding it
// into an empty state does not count it.
template <typename A>
__device__ __forceinline__ MaxSum<A> element(A x) {
  return {x, x == -kd_inf<A>() ? A(0) : A(1)};
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
};

// Map: the student's transform m is on (the host picks the instantiation from m.on).
template <typename S, typename A, int G, bool Map>
__global__ void __launch_bounds__(kThreads)
    topk_kernel(TopKParams p, const LogitMap<A> m, const A* __restrict__ scale_dev, A scale_host) {
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
  const A inv_t = soft ? static_cast<A>(p.inv_temperature) : A(1);
  const A temp = static_cast<A>(p.temperature);
  const bool need_h = hard && soft && p.temperature != 1.0;
  const bool use_bitmap = soft && K > 1 && V <= ((G == kWarp) ? kWarpMaxV : kBitmapMaxV);
  const int64_t words = (V + 31) / 32;
  const S* s_base = static_cast<const S*>(p.student);
  const A* v_base = static_cast<const A*>(p.values);
  A* row_loss = static_cast<A*>(p.row_loss);
  auto max_op = [](A x, A y) { return kd_max(x, y); };
  auto sum_op = [](A x, A y) { return x + y; };
  auto merge_a = [inv_t](const MaxSum<A>& x, const MaxSum<A>& y) {
    return topk::merge(x, y, inv_t);
  };
  auto merge_h = [](const MaxSum<A>& x, const MaxSum<A>& y) { return topk::merge(x, y, A(1)); };

  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kGroups + group; r < p.n_rows;
       r += static_cast<int64_t>(gridDim.x) * kGroups) {
    const S* srow = s_base + r * p.student_stride;
    S* grow = want_g ? static_cast<S*>(p.grad_student) + r * V : nullptr;
    int64_t y = -1;
    bool valid = true;
    bool y_ok = true;
    if (p.labels) {
      y = p.labels[r];
      valid = y != p.ignore_index;
      y_ok = !valid || (y >= 0 && y < V);
      if (lane == 0) {
        KD_TOPK_ASSERT(y_ok, "kdfused: label out of range [0, V) and not ignore_index");
      }
    }
    if (!valid || (!soft && !hard)) {
      if (lane == 0) row_loss[r] = A(0);
      if (grow) {
        for (int64_t i = lane; i < V; i += G) grow[i] = to_out<S, A>(A(0));
      }
      continue;
    }

    // ---- 1. statistics --------------------------------------------------------------------
    MaxSum<A> a{-kd_inf<A>(), A(0)}, h{-kd_inf<A>(), A(0)};
    for (int64_t i = lane; i < V; i += G) {
      const MaxSum<A> e = element(student_z<Map>(srow[i], m));
      a = topk::merge(a, e, inv_t);
      if (need_h) h = topk::merge(h, e, A(1));
    }
    a = group_reduce<G>(a, merge_a, red.ms);
    if (need_h) h = group_reduce<G>(h, merge_h, red.ms);
    const A ms = a.m;
    const A log_za = kd_log(a.z);
    const A log_zh = need_h ? kd_log(h.z) : log_za;

    // ---- 2. teacher terms -------------------------------------------------------------------
    A loss = A(0);
    A zb = A(1);
    A mv = -kd_inf<A>();
    const int64_t* ix = p.indices + r * K;
    const A* vv = v_base + r * K;
    if (soft) {
      if (use_bitmap) {
        for (int64_t w = lane; w < words; w += G) bitmap[w] = 0u;
        group_sync<G>();
      }
      for (int64_t j = lane; j < K; j += G) mv = kd_max(mv, vv[j]);
      mv = group_reduce<G>(mv, max_op, red.a);
      A zb_part = A(0), terms = A(0);
      for (int64_t j = lane; j < K; j += G) {
        const int64_t i = ix[j];
        const bool in_range = i >= 0 && i < V;
        KD_TOPK_ASSERT(in_range, "kdfused: teacher_indices out of range [0, V)");
        if (use_bitmap && in_range) {
          const unsigned bit = 1u << (i & 31);
          const unsigned old = atomicOr(&bitmap[i >> 5], bit);
          KD_TOPK_ASSERT((old & bit) == 0u, "kdfused: duplicate teacher_indices in a row");
        }
        const A s_at = in_range ? student_z<Map>(srow[i], m) : A(NAN);
        const A e = topk::teacher_weight(vv[j], mv, inv_t);
        zb_part += e;
        terms += topk::teacher_term(e, vv[j], mv, s_at, ms, inv_t, p.ce);
      }
      if (use_bitmap) group_sync<G>();  // every atomicOr done before the bitmap is reused
      zb = group_reduce<G>(zb_part, sum_op, red.a);
      terms = group_reduce<G>(terms, sum_op, red.a);
      const A d = topk::divergence(terms, zb, log_za, p.ce);
      loss += static_cast<A>(p.soft_weight) * temp * temp * d;
    }
    if (hard) {
      const A s_y = y_ok ? student_z<Map>(srow[y], m) : A(NAN);
      loss += static_cast<A>(p.hard_weight) * topk::hard_term(log_zh, s_y, ms);
    }
    if (lane == 0) row_loss[r] = loss;
    if (!want_g) continue;

    // ---- 3. gradient ---------------------------------------------------------------------------
    const A scale = scale_dev ? *scale_dev : scale_host;
    const topk::GradCoef<A> coef{soft ? static_cast<A>(p.soft_weight) * temp * scale : A(0),
                                 hard ? static_cast<A>(p.hard_weight) * scale : A(0)};
    // Gradients w.r.t. z; student_grad makes them w.r.t. the raw logits (after the label's -kh and
    // the teacher part, which are part of the gradient w.r.t. z).
    auto dense = [&](A s, int64_t i) {
      const A ds = s - ms;
      const A q = kd_exp(ds * inv_t - log_za);
      const A hh = need_h ? kd_exp(ds - log_zh) : q;
      return topk::grad_dense(coef, q, hh) - (i == y ? coef.kh : A(0));
    };
    for (int64_t i = lane; i < V; i += G) {
      const A z = student_z<Map>(srow[i], m);
      grow[i] = to_out<S, A>(student_grad<Map>(dense(z, i), z, m));
    }
    if (soft) {
      group_sync<G>();  // the dense values are written before the teacher positions are replaced
      for (int64_t j = lane; j < K; j += G) {
        const int64_t i = ix[j];
        if (!(i >= 0 && i < V)) continue;
        const A e = topk::teacher_weight(vv[j], mv, inv_t);
        const A z = student_z<Map>(srow[i], m);
        const A g = dense(z, i) + topk::grad_teacher_part(coef, e, zb);
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
void launch_map(const TopKParams& p, const LogitMap<A>& m, const A* scale_dev, A scale_host,
                cudaStream_t stream) {
  if (p.vocab <= kWarpMaxV) {
    constexpr int kGroups = kThreads / kWarp;
    const int64_t blocks = std::min<int64_t>((p.n_rows + kGroups - 1) / kGroups, kMaxGrid);
    topk_kernel<S, A, kWarp, Map>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, m, scale_dev, scale_host);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const bool bitmap = p.soft_weight > 0 && p.k > 1 && p.vocab <= kBitmapMaxV;
  const size_t smem = bitmap ? static_cast<size_t>((p.vocab + 31) / 32) * sizeof(unsigned) : 0;
  if (bitmap) allow_cta_bitmap<S, A, Map>(at::cuda::current_device());
  const int64_t blocks = std::min<int64_t>(p.n_rows, kMaxGrid);
  topk_kernel<S, A, kThreads, Map>
      <<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p, m, scale_dev, scale_host);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The kernels with the student's transform compiled in only when it is not the identity.
template <typename S, typename A>
void launch(const TopKParams& p, const A* scale_dev, A scale_host, cudaStream_t stream) {
  const LogitMap<A> m = make_logit_map<A>(p.student_scale, p.student_softcap);
  if (m.on) {
    launch_map<S, A, true>(p, m, scale_dev, scale_host, stream);
  } else {
    launch_map<S, A, false>(p, m, scale_dev, scale_host, stream);
  }
}

// topk_kd_loss on parsed options and checked shapes (topk::topk_kd_loss_op).
topk::TopKOutputs topk_kd_loss_cuda(const at::Tensor& student, const at::Tensor& indices,
                                    const at::Tensor& values,
                                    const std::optional<at::Tensor>& labels, const KDOptions& opt,
                                    bool grad_student) {
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
