// kd_kernels.cuh -- the CUDA kernels of kdfused. Launch policy and constants: kd_launch.h; host
// wrappers: kd_loss_cuda.cu, their launch: kd_fused_run.cuh. The maths is kd_math.h's (shared with
// the CPU kernel).
//
// One row (or one slice of a row) is processed by a "group" of threads: a warp (kWarp) or a CTA
// (kBlock, possibly one of the `split` CTAs of a cluster). For its slice a group
//   1. statistics sweep: reads s and t once with 16-byte vector loads (a scalar head peels the row
//      to 16-byte alignment, a scalar tail finishes it), per vector of W elements: the vector's
//      maxima, one rescale() of the thread's RowState, then accumulate() per element; optionally
//      keeps the raw vectors in shared memory (the stage);
//   2. merges the threads' RowStates with kd_math.h merge() in a fixed order: lanes (shuffle tree),
//      warps (shared memory, then one warp's shuffle tree), CTAs of a cluster (distributed shared
//      memory, rank order) or of a two-phase split (global workspace, rank order);
//   3. finalize() -> RowResult (loss, gradient coefficients scaled by the reduction's gradient
//      scale, read from the device: no host sync);
//   4. gradient sweep over the same slice (from the stage, or re-read), writing grad_student and
//      grad_teacher with 16-byte stores when the output row is aligned like the input row.
// Ignored rows (label == ignore_index) read nothing and get exact zeros.
//
// Size: the two fused kernels and the device helpers only they use (loads, slice geometry,
// sweeps, reductions) are kept in one header so that each kernel reads top to bottom; the maths is
// in kd_math.h, the policy in kd_launch.h, the host code in kd_loss_cuda.cu and
// kd_fused_run.cuh (instantiated per dtype pair and family in csrc/cuda/instantiations/).
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cooperative_groups.h>

#include <cstdint>
#include <type_traits>

#include "../kd_math.h"
#include "../kd_params.h"
#include "kd_launch.h"
#include "kd_reduce_kernels.cuh"

#if defined(CUDA_KERNEL_ASSERT_MSG)
#define KD_LABEL_ASSERT(cond) \
  CUDA_KERNEL_ASSERT_MSG(cond, "kdfused: label out of range [0, V) and not ignore_index")
#else
#define KD_LABEL_ASSERT(cond) CUDA_KERNEL_ASSERT(cond)
#endif

namespace kdfused::cuda {

// ------------------------------------------------------------------------------------------------
// Small helpers
// ------------------------------------------------------------------------------------------------

// Elements per vector: 16 bytes of the narrower input (a wider input then loads 32 bytes).
template <typename S, typename T>
constexpr int vec_elems() {
  return kVecBytes / static_cast<int>(sizeof(S) < sizeof(T) ? sizeof(S) : sizeof(T));
}

// Storage type -> arithmetic. c10::Half / c10::BFloat16 convert through the cuda_fp16/bf16
// intrinsics (round to nearest even on the way back).
template <typename A, typename X>
__device__ __forceinline__ A to_acc(X x) {
  return static_cast<A>(x);
}
template <typename X, typename A>
__device__ __forceinline__ X from_acc(A a) {
  return static_cast<X>(a);
}

// The 16-byte words holding W elements of X.
template <typename X, int W>
struct VecWords {
  static constexpr int kWords = static_cast<int>(W * sizeof(X)) / kVecBytes;
  static_assert(kWords >= 1 && kWords * kVecBytes == static_cast<int>(W * sizeof(X)),
                "vector size");
  uint4 w[kWords];
};

template <typename X, int W>
__device__ __forceinline__ VecWords<X, W> load_words(const X* p) {
  VecWords<X, W> v;
#pragma unroll
  for (int i = 0; i < VecWords<X, W>::kWords; ++i)
    v.w[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
  return v;
}

template <typename A, typename X, int W>
__device__ __forceinline__ void unpack(const VecWords<X, W>& v, A (&out)[W]) {
  const X* x = reinterpret_cast<const X*>(v.w);
#pragma unroll
  for (int i = 0; i < W; ++i) out[i] = to_acc<A>(x[i]);
}

template <typename X, typename A, int W>
__device__ __forceinline__ VecWords<X, W> pack(const A (&in)[W]) {
  VecWords<X, W> v;
  X* x = reinterpret_cast<X*>(v.w);
#pragma unroll
  for (int i = 0; i < W; ++i) x[i] = from_acc<X>(in[i]);
  return v;
}

// W elements, packed, to out: 16-byte stores where out is 16-byte aligned, else one by one.
template <typename X, int W>
__device__ __forceinline__ void store_words(X* out, const VecWords<X, W>& v, bool aligned) {
  if (aligned) {
#pragma unroll
    for (int k = 0; k < VecWords<X, W>::kWords; ++k) reinterpret_cast<uint4*>(out)[k] = v.w[k];
  } else {
    const X* x = reinterpret_cast<const X*>(v.w);
#pragma unroll
    for (int i = 0; i < W; ++i) out[i] = x[i];
  }
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & (kVecBytes - 1)) == 0;
}

// The logit transform (kd_math.h LogitMap). Map is a compile-time switch of the fused kernels:
// with Map = false these are the identity and compile to nothing, so a call without a transform
// runs the kernels it ran before the transform existed. With Map, a side whose map is off (a
// uniform runtime test) is not touched either. map_in: z of a raw logit, applied to every logit
// right after its load, before any other use; map_out: a gradient w.r.t. z times dz/dx.
template <bool Map, typename A>
__device__ __forceinline__ A map_in(A x, const LogitMap<A>& m) {
  if constexpr (Map) {
    if (m.on) return map_logit(x, m);
  }
  return x;
}
template <bool Map, typename A, int W>
__device__ __forceinline__ void map_in_vec(A (&x)[W], const LogitMap<A>& m) {
  if constexpr (Map) {
    if (m.on) {
#pragma unroll
      for (int i = 0; i < W; ++i) x[i] = map_logit(x[i], m);
    }
  }
}
template <bool Map, typename A>
__device__ __forceinline__ A map_out(A g, A z, const LogitMap<A>& m) {
  if constexpr (Map) {
    if (m.on) return g * map_slope(z, m);
  }
  return g;
}

// Visits p[0, n) with threads tid, tid + nthr, ...: elem(x) for each element of the scalar head
// and tail, word(w) for each 16-byte word between them (p may have any element alignment).
template <typename X, typename Elem, typename Word>
__device__ __forceinline__ void for_range_words(X* p, int64_t n, int64_t tid, int64_t nthr,
                                                Elem elem, Word word) {
  constexpr int kW = kVecBytes / static_cast<int>(sizeof(X));
  const int64_t mis =
      static_cast<int64_t>((reinterpret_cast<uintptr_t>(p) & (kVecBytes - 1)) / sizeof(X));
  const int64_t head = mis == 0 ? 0 : (kW - mis < n ? kW - mis : n);
  for (int64_t i = tid; i < head; i += nthr) elem(p[i]);
  const int64_t nvec = (n - head) / kW;
  uint4* v = reinterpret_cast<uint4*>(p + head);
  for (int64_t j = tid; j < nvec; j += nthr) word(v[j]);
  for (int64_t i = head + nvec * kW + tid; i < n; i += nthr) elem(p[i]);
}

// Writes n copies of zero to p[0, n), threads tid, tid + nthr, ...; 16-byte stores between a
// scalar head and tail.
template <typename X>
__device__ void zero_range(X* p, int64_t n, int tid, int nthr) {
  for_range_words(
      p, n, tid, nthr, [](X& x) { x = from_acc<X>(0.0f); },
      [](uint4& w) { w = make_uint4(0, 0, 0, 0); });
}

// ------------------------------------------------------------------------------------------------
// RowState reductions (fixed order: bitwise reproducible)
// ------------------------------------------------------------------------------------------------

// Every field of a record (RowState or MixSums) from another lane: shfl(v) is one warp shuffle of
// one value, applied field by field (kd_math.h for_each_field / for_each_mix).
template <typename A, typename Shfl>
__device__ __forceinline__ RowState<A> shfl_record(const RowState<A>& x, Shfl shfl) {
  RowState<A> y;
  for_each_field([&shfl](A& out, const A& in) { out = shfl(in); }, y, x);
  return y;
}
template <typename A, typename Shfl>
__device__ __forceinline__ MixSums<A> shfl_record(const MixSums<A>& x, Shfl shfl) {
  MixSums<A> y;
  for_each_mix([&shfl](A& out, const A& in) { out = shfl(in); }, y, x);
  return y;
}

// Lane src's record, in every lane.
template <typename Rec>
__device__ __forceinline__ Rec shfl_from(const Rec& x, int src) {
  return shfl_record(x, [src](auto v) { return __shfl_sync(0xffffffffu, v, src); });
}

// Tree over the 32 lanes: combine(lower lane's, upper lane's) at offsets 16, 8, 4, 2, 1; lane 0
// ends with all 32 in a fixed bracketing. (Lanes whose partner is out of range combine junk; only
// lane 0's result is used.)
template <typename Rec, typename Combine>
__device__ __forceinline__ Rec warp_tree(Rec x, Combine combine) {
  KD_UNROLL
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    x = combine(x, shfl_record(x, [off](auto v) { return __shfl_down_sync(0xffffffffu, v, off); }));
  }
  return x;
}

// RowStates: merging an empty state is exact (its sums are 0 and its maxima -inf), so padding
// lanes with empty states is harmless.
template <typename A>
__device__ __forceinline__ RowState<A> warp_merge(const RowState<A>& st, const RowConfig<A>& cfg) {
  return warp_tree(st,
                   [&cfg](const RowState<A>& x, const RowState<A>& y) { return merge(x, y, cfg); });
}

// Mix sums (jsd / tvd): plain sums, summed over the lanes in the same fixed tree.
template <typename A>
__device__ __forceinline__ MixSums<A> warp_sum_mix(const MixSums<A>& m) {
  return warp_tree(m, [](const MixSums<A>& x, const MixSums<A>& y) { return mix_add(x, y); });
}

// ------------------------------------------------------------------------------------------------
// Row geometry: which elements of the row this group handles, and which of them as vectors
// ------------------------------------------------------------------------------------------------

struct SliceGeom {
  int64_t lo, hi;    // the slice [lo, hi) of the row
  int64_t vlo, vhi;  // its vector part [vlo, vhi): 16-byte aligned in s (and t), a multiple of W
                     // long; [lo, vlo) and [vhi, hi) are scalar (at most W - 1 elements each,
                     // or the whole slice when s and t are misaligned relative to each other)
  int64_t v0;        // index of the slice's first vector in the row's vector numbering
};

// The first element index h >= 0 at which x + h is 16-byte aligned, or -1 if none is (x not
// element-aligned cannot happen for tensors; kept for safety).
template <typename X>
__device__ __forceinline__ int64_t align_head(const X* x) {
  constexpr int64_t kPer = kVecBytes / static_cast<int64_t>(sizeof(X));
  const int64_t mis_bytes = static_cast<int64_t>(reinterpret_cast<uintptr_t>(x) & (kVecBytes - 1));
  if (mis_bytes % static_cast<int64_t>(sizeof(X)) != 0) return -1;
  const int64_t mis = mis_bytes / static_cast<int64_t>(sizeof(X));
  return (kPer - mis) % kPer;
}

// The row's vectors start at `head`, the first index where s AND t are 16-byte aligned. Both
// element counts per 16 bytes (16 / sizeof) are powers of two, so the two conditions
// "head = hs mod ks" and "head = ht mod kt" have a common solution below max(ks, kt) = W iff they
// agree modulo min(ks, kt). Why both: with an fp32 student and a bf16 teacher a head that aligns
// only s leaves t misaligned on about half the rows (V % 8 != 0), which would then run scalar.
// The vectors are numbered 0..nvec-1 and cut into `split` slices of `chunk` vectors; slice 0
// also takes the head and the last slice the tail. When no common head exists (different
// misalignment, e.g. only one of them is a sliced view) the row has no vectors and the slices are
// plain element ranges.
template <typename S, typename T, int W>
__device__ __forceinline__ SliceGeom slice_geom(const S* srow, const T* trow, bool read_t,
                                                int64_t V, int split, int rank, int64_t chunk) {
  SliceGeom g;
  const int64_t hs = align_head(srow);
  int64_t head = hs;
  if (read_t && head >= 0) {
    constexpr int64_t ks = kVecBytes / static_cast<int64_t>(sizeof(S));
    constexpr int64_t kt = kVecBytes / static_cast<int64_t>(sizeof(T));
    const int64_t ht = align_head(trow);
    const int64_t kmin = ks < kt ? ks : kt;
    if (ht < 0 || hs % kmin != ht % kmin) {
      head = -1;
    } else {
      head = ks >= kt ? hs : ht;
    }
  }
  // W * sizeof(S) and W * sizeof(T) are multiples of 16, so every vector after an aligned head is
  // aligned in both inputs; head < W.
  const bool vec_ok = head >= 0 && head + W <= V;
  if (vec_ok) {
    const int64_t nvec = (V - head) / W;
    const int64_t a = rank * chunk < nvec ? rank * chunk : nvec;
    const int64_t b = a + chunk < nvec ? a + chunk : nvec;
    g.v0 = a;
    g.vlo = head + a * W;
    g.vhi = head + b * W;
    g.lo = rank == 0 ? 0 : g.vlo;
    g.hi = rank == split - 1 ? V : g.vhi;
  } else {
    const int64_t per = (V + split - 1) / split;
    g.lo = rank * per < V ? rank * per : V;
    g.hi = g.lo + per < V ? g.lo + per : V;
    g.vlo = g.vhi = g.hi;
    g.v0 = 0;
  }
  return g;
}

// ------------------------------------------------------------------------------------------------
// Statistics sweep
// ------------------------------------------------------------------------------------------------

// This thread's part of the slice's statistics. With a stage, each thread stores the raw vectors
// it reads at local vector index j and the gradient sweep (same thread, same j) reads them back:
// no barrier is needed between the two.
template <typename S, typename T, typename A, int W, bool Map>
__device__ __forceinline__ RowState<A> stats_sweep(const S* srow, const T* trow, bool read_t,
                                                   const SliceGeom& g, int tid, int nthr,
                                                   const RowConfig<A>& cfg, uint4* stage_s,
                                                   uint4* stage_t) {
  using WS = VecWords<S, W>;
  using WT = VecWords<T, W>;
  RowState<A> st = RowState<A>::empty();
  // Scalar head and tail (push() = rescale + accumulate for one element).
  for (int64_t i = g.lo + tid; i < g.vlo; i += nthr) {
    push(st, map_in<Map>(to_acc<A>(srow[i]), cfg.map_s),
         read_t ? map_in<Map>(to_acc<A>(trow[i]), cfg.map_t) : A(0), cfg);
  }
  for (int64_t i = g.vhi + tid; i < g.hi; i += nthr) {
    push(st, map_in<Map>(to_acc<A>(srow[i]), cfg.map_s),
         read_t ? map_in<Map>(to_acc<A>(trow[i]), cfg.map_t) : A(0), cfg);
  }
  const int nv = static_cast<int>((g.vhi - g.vlo) / W);
  const S* sv = srow + g.vlo;
  const T* tv = trow + g.vlo;
  // U vectors per iteration: all their loads are in flight before the first exp (memory-level
  // parallelism); U = 2 for 16-bit pairs, else 1 (registers; see stats_unroll in kd_launch.h).
  constexpr int U = stats_unroll(W * static_cast<int>(sizeof(S) + sizeof(T)), W);
  for (int j0 = tid; j0 < nv; j0 += U * nthr) {
    WS ws[U];
    WT wt[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u * nthr;
      if (U == 1 || j < nv) {
        ws[u] = load_words<S, W>(sv + static_cast<int64_t>(j) * W);
        if (read_t) wt[u] = load_words<T, W>(tv + static_cast<int64_t>(j) * W);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u * nthr;
      if (U > 1 && j >= nv) break;
      if (stage_s) {
#pragma unroll
        for (int k = 0; k < WS::kWords; ++k) stage_s[j * WS::kWords + k] = ws[u].w[k];
        if (read_t) {
#pragma unroll
          for (int k = 0; k < WT::kWords; ++k) stage_t[j * WT::kWords + k] = wt[u].w[k];
        }
      }
      A s[W], t[W];
      unpack(ws[u], s);
      map_in_vec<Map>(s, cfg.map_s);
      if (read_t) {
        unpack(wt[u], t);
        map_in_vec<Map>(t, cfg.map_t);
      } else {
#pragma unroll
        for (int i = 0; i < W; ++i) t[i] = A(0);
      }
      push_vec<A, W>(st, s, t, cfg);  // kd_math.h: one rescale, then accumulate per element
    }
  }
  return st;
}

// ------------------------------------------------------------------------------------------------
// Finalize and gradient sweep
// ------------------------------------------------------------------------------------------------

// The element loop shared by the mix and gradient sweeps: calls f(i, s, t, lane_of_label) for
// every element of the slice this thread handles, reading the vectors from the stage (each thread
// reads back only what it staged itself: no barrier) or re-reading them (L1/L2). For vectors,
// f is called through fv(j, s[W], t[W]) so that the gradient sweep can pack its stores. s and t
// are the transformed logits (map_in; the stage keeps the raw words).
template <typename S, typename T, typename A, int W, bool Map, typename FScalar, typename FVec>
__device__ __forceinline__ void for_slice(const S* srow, const T* trow, bool read_t,
                                          const SliceGeom& g, int tid, int nthr,
                                          const RowConfig<A>& c, const uint4* stage_s,
                                          const uint4* stage_t, FScalar&& fs, FVec&& fv) {
  using WS = VecWords<S, W>;
  using WT = VecWords<T, W>;
  // Scalar head and tail: re-read (at most 2 (W - 1) elements, or a misaligned row).
  for (int pass = 0; pass < 2; ++pass) {
    const int64_t b = pass == 0 ? g.lo : g.vhi;
    const int64_t e = pass == 0 ? g.vlo : g.hi;
    for (int64_t i = b + tid; i < e; i += nthr) {
      fs(i, map_in<Map>(to_acc<A>(srow[i]), c.map_s),
         read_t ? map_in<Map>(to_acc<A>(trow[i]), c.map_t) : A(0));
    }
  }
  const int nv = static_cast<int>((g.vhi - g.vlo) / W);
  const S* sv = srow + g.vlo;
  const T* tv = trow + g.vlo;
  for (int j = tid; j < nv; j += nthr) {
    WS ws;
    WT wt;
    if (stage_s) {
#pragma unroll
      for (int k = 0; k < WS::kWords; ++k) ws.w[k] = stage_s[j * WS::kWords + k];
      if (read_t) {
#pragma unroll
        for (int k = 0; k < WT::kWords; ++k) wt.w[k] = stage_t[j * WT::kWords + k];
      }
    } else {
      ws = load_words<S, W>(sv + static_cast<int64_t>(j) * W);
      if (read_t) wt = load_words<T, W>(tv + static_cast<int64_t>(j) * W);
    }
    A s[W], t[W];
    unpack(ws, s);
    map_in_vec<Map>(s, c.map_s);
    if (read_t) {
      unpack(wt, t);
      map_in_vec<Map>(t, c.map_t);
    } else {
#pragma unroll
      for (int i = 0; i < W; ++i) t[i] = A(0);
    }
    fv(j, s, t);
  }
}

// jsd / tvd: this thread's mix sums over its part of the slice (kd_math.h probs_at + mix_at).
template <typename S, typename T, typename A, int W, bool Map>
__device__ __forceinline__ MixSums<A> mix_sweep(const S* srow, const T* trow, const SliceGeom& g,
                                                int tid, int nthr, const RowResult<A>& r,
                                                const RowConfig<A>& c, const uint4* stage_s,
                                                const uint4* stage_t) {
  MixSums<A> mx = mix_zero<A>();
  auto one = [&](A s, A t) {
    const A ds = s - r.ms, dt = t - r.mt;
    A q, p, h;
    probs_at(r, c, ds, dt, q, p, h);
    mix_at(mx, r, c, ds, dt, q, p);
  };
  for_slice<S, T, A, W, Map>(
      srow, trow, true, g, tid, nthr, c, stage_s, stage_t, [&](int64_t, A s, A t) { one(s, t); },
      [&](int, const A(&s)[W], const A(&t)[W]) {
#pragma unroll
        for (int i = 0; i < W; ++i) one(s[i], t[i]);
      });
  return mx;
}

// Gradient of one element (kd_math.h probs_at + grad_at; the hard term's -kh at the label), then
// w.r.t. the raw logits: times the slope of each side's transform, after the label's -kh (which
// is part of the gradient w.r.t. z).
template <DivFamily F, bool Map, typename A>
__device__ __forceinline__ void grad_elem(const RowResult<A>& r, const RowConfig<A>& c, A s, A t,
                                          bool is_label, A& gs, A& gt) {
  const A ds = s - r.ms;  // exact for nearby values (Sterbenz); scaled afterwards (kd_math.h)
  const A dt = t - r.mt;
  A q, p, h;
  probs_at(r, c, ds, dt, q, p, h);
  grad_at<F>(r, c, ds, dt, q, p, h, gs, gt);
  if (is_label) gs -= r.kh;
  gs = map_out<Map>(gs, s, c.map_s);
  gt = map_out<Map>(gt, t, c.map_t);
}

template <typename S, typename T, typename A, int W, DivFamily F, bool Map>
__device__ __forceinline__ void grad_sweep(const S* srow, const T* trow, bool read_t, S* gsrow,
                                           T* gtrow, const SliceGeom& g, int tid, int nthr,
                                           const RowResult<A>& r, const RowConfig<A>& c, int64_t y,
                                           const uint4* stage_s, const uint4* stage_t) {
  using WS = VecWords<S, W>;
  using WT = VecWords<T, W>;
  // Output rows are contiguous (r * V): aligned like the input row only when V and the views
  // allow; otherwise the vector's elements are stored one by one.
  const bool gs_vec = gsrow && aligned16(gsrow + g.vlo);
  const bool gt_vec = gtrow && aligned16(gtrow + g.vlo);
  const int64_t ylocal = y - g.vlo;  // label position relative to the vector part
  for_slice<S, T, A, W, Map>(
      srow, trow, read_t, g, tid, nthr, c, stage_s, stage_t,
      [&](int64_t i, A s, A t) {
        A gs, gt;
        grad_elem<F, Map>(r, c, s, t, i == y, gs, gt);
        if (gsrow) gsrow[i] = from_acc<S>(gs);
        if (gtrow) gtrow[i] = from_acc<T>(gt);
      },
      [&](int j, const A(&s)[W], const A(&t)[W]) {
        // Results go straight into their packed output words (half the registers of A[W] for
        // 16-bit outputs: the block kernel's 80-register budget).
        const int64_t base = static_cast<int64_t>(j) * W;
        // The label's lane in this vector (-1: none): a 32-bit compare with a constant.
        const int lab =
            (ylocal >= base && ylocal < base + W) ? static_cast<int>(ylocal - base) : -1;
        WS os;
        WT ot;
        S* xs = reinterpret_cast<S*>(os.w);
        T* xt = reinterpret_cast<T*>(ot.w);
#pragma unroll
        for (int i = 0; i < W; ++i) {
          A gs, gt;
          grad_elem<F, Map>(r, c, s[i], t[i], i == lab, gs, gt);
          xs[i] = from_acc<S>(gs);
          xt[i] = from_acc<T>(gt);
        }
        if (gsrow) store_words(gsrow + g.vlo + base, os, gs_vec);
        if (gtrow) store_words(gtrow + g.vlo + base, ot, gt_vec);
      });
}

// ------------------------------------------------------------------------------------------------
// Per-row setup shared by the kernels
// ------------------------------------------------------------------------------------------------

// Kernel arguments besides KDParams. The row configuration comes from kd_math.h
// make_row_config() on the host (the one derivation of every switch, shared with the CPU); its
// bools live in the constant bank with the rest of the arguments, so the hot loops test them
// without rematerialising comparisons of doubles.
template <typename A>
struct KernelArgs {
  RowConfig<A> cfg;
  const A* grad_scale_dev;  // device gradient scale (Mean with labels), or nullptr
  A grad_scale_host;        // used when grad_scale_dev is nullptr
  Mode mode;
  int split;               // CTAs per row (kBlock)
  int64_t chunk;           // vectors per slice
  bool stage;              // keep the slice in shared memory
  bool cluster;            // split over a thread-block cluster (sm_90)
  RowState<A>* workspace;  // two-phase: [n_rows][split] partial states
};

// The label of row r (-1 without labels) and whether the row counts. An out-of-range label stops
// the kernel with a device-side assert, like PyTorch's cross-entropy kernels.
__device__ __forceinline__ bool row_label(const KDParams& p, int64_t r, int64_t& y, bool check) {
  if (!p.labels) {
    y = -1;
    return true;
  }
  y = p.labels[r];
  if (y == p.ignore_index) return false;
  if (check) KD_LABEL_ASSERT(y >= 0 && y < p.vocab);
  return true;
}

// s_y for the hard term: the student's transformed logit at the label (as every other use of it).
// Guarded: with device asserts compiled out (NDEBUG builds of torch) an out-of-range label must
// not read out of bounds; its row becomes NaN instead.
template <bool Map, typename A, typename S>
__device__ __forceinline__ A label_logit(const S* srow, int64_t y, int64_t V, bool want,
                                         const LogitMap<A>& m) {
  if (!want) return A(0);
  return (y >= 0 && y < V) ? map_in<Map>(to_acc<A>(srow[y]), m) : A(NAN);
}

// The outputs of row r: its loss, and where asked (KDParams::entropy) the student's entropy (0 for
// an ignored row, as its loss).
template <typename A>
__device__ __forceinline__ void store_row(A* row_loss, A* entropy_out, int64_t r, A loss,
                                          A entropy) {
  row_loss[r] = loss;
  if (entropy_out) entropy_out[r] = entropy;
}

// ------------------------------------------------------------------------------------------------
// kWarp: one warp per row (small V)
// ------------------------------------------------------------------------------------------------

// F: the divergence family this instantiation handles (kd_math.h DivFamily); Map: whether it
// applies the logit transforms (map_in / map_out).
template <typename S, typename T, typename A, DivFamily F, bool Map>
__global__ void __launch_bounds__(kWarpBlockThreads, kWarpMinBlocksPerSM)
    kd_warp_kernel(const KDParams p, const KernelArgs<A> a) {
  constexpr int W = vec_elems<S, T>();
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const RowConfig<A> cfg = specialise<F>(a.cfg);
  const bool read_t = cfg.soft;
  const int64_t V = p.vocab;
  A* row_loss = static_cast<A*>(p.row_loss);
  A* entropy = static_cast<A*>(p.entropy);

  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
       r < p.n_rows; r += warps_total) {
    S* gsrow = cfg.want_gs ? static_cast<S*>(p.grad_student) + r * V : nullptr;
    T* gtrow = p.grad_teacher ? static_cast<T*>(p.grad_teacher) + r * V : nullptr;
    int64_t y;
    if (!row_label(p, r, y, lane == 0)) {
      if (lane == 0) store_row(row_loss, entropy, r, A(0), A(0));
      if (gsrow) zero_range(gsrow, V, lane, kWarpSize);
      if (gtrow) zero_range(gtrow, V, lane, kWarpSize);
      continue;
    }
    const S* srow = static_cast<const S*>(p.student) + row_offset(p, r, p.student_strides);
    const T* trow = static_cast<const T*>(p.teacher) + row_offset(p, r, p.teacher_strides);
    const SliceGeom g = slice_geom<S, T, W>(srow, trow, read_t, V, 1, 0, V);
    RowState<A> st =
        stats_sweep<S, T, A, W, Map>(srow, trow, read_t, g, lane, kWarpSize, cfg, nullptr, nullptr);
    // Lane 0 merges in a fixed order, then hands the row's state to every lane: each lane runs the
    // same finalize on the same bits (cheaper than a shared-memory round trip).
    st = shfl_from(warp_merge(st, cfg), 0);
    const A s_label = label_logit<Map>(srow, y, V, cfg.hard && lane == 0, cfg.map_s);
    const A scale = a.grad_scale_dev ? *a.grad_scale_dev : a.grad_scale_host;
    RowResult<A> res = finalize(st, cfg, s_label, scale);
    if (cfg.mix) {
      // The row was read by this warp a moment ago: the re-reads hit L1/L2, not HBM.
      MixSums<A> mx =
          mix_sweep<S, T, A, W, Map>(srow, trow, g, lane, kWarpSize, res, cfg, nullptr, nullptr);
      finalize_mix(res, shfl_from(warp_sum_mix(mx), 0), cfg);
    }
    if (lane == 0) store_row(row_loss, entropy, r, res.loss, res.entropy);
    if (cfg.zero_gt) zero_range(gtrow, V, lane, kWarpSize);
    if (cfg.want_gs || cfg.want_gt) {
      grad_sweep<S, T, A, W, F, Map>(srow, trow, read_t, gsrow, cfg.want_gt ? gtrow : nullptr, g,
                                     lane, kWarpSize, res, cfg, y, nullptr, nullptr);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// kBlock: a CTA per row or per slice of a row (cluster or two-phase split)
// ------------------------------------------------------------------------------------------------

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define KD_HAS_CLUSTERS 1
#else
#define KD_HAS_CLUSTERS 0
#endif

// Sum of the threads' mix sums over the CTA, in a fixed order (lanes, then warps in order); the
// result is in thread 0. Ends with a barrier after which `warp_mix` may be reused.
template <typename A, int kWarps>
__device__ __forceinline__ MixSums<A> block_sum_mix(MixSums<A> mx, MixSums<A>* warp_mix, int lane,
                                                    int warp) {
  mx = warp_sum_mix(mx);
  if (lane == 0) warp_mix[warp] = mx;
  __syncthreads();
  if (warp == 0) {
    mx = lane < kWarps ? warp_mix[lane] : mix_zero<A>();
    mx = warp_sum_mix(mx);
  }
  return mx;
}

template <typename S, typename T, typename A, DivFamily F, bool Map>
__global__ void __launch_bounds__(kBlockThreads,
                                  sizeof(A) == 8 ? kBlockMinBlocksPerSMF64 : kBlockMinBlocksPerSM)
    kd_block_kernel(const KDParams p, const KernelArgs<A> a) {
  constexpr int W = vec_elems<S, T>();
  constexpr int kWarps = kBlockThreads / kWarpSize;
  using WS = VecWords<S, W>;
  // The stage: [chunk vectors of s][chunk vectors of t], raw 16-byte words.
  extern __shared__ uint4 kd_stage[];
  __shared__ RowState<A> warp_states[kWarps];
  __shared__ MixSums<A> warp_mix[kWarps];
  __shared__ RowState<A> cta_state;  // read by the other CTAs of the cluster (DSMEM)
  __shared__ MixSums<A> cta_mix;     // likewise, jsd / tvd
  __shared__ RowResult<A> row_res;

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int split = a.split;
  const int rank = static_cast<int>(blockIdx.x % static_cast<unsigned>(split));
  const RowConfig<A> cfg = specialise<F>(a.cfg);
  const bool read_t = cfg.soft;
  const int64_t V = p.vocab;
  A* row_loss = static_cast<A*>(p.row_loss);
  A* entropy = static_cast<A*>(p.entropy);
  uint4* stage_s = a.stage ? kd_stage : nullptr;
  uint4* stage_t = a.stage ? kd_stage + a.chunk * WS::kWords : nullptr;
  const bool stats_here = a.mode != Mode::Phase2;
  const bool grad_here = a.mode != Mode::Phase1 && (cfg.want_gs || cfg.want_gt);
#if !KD_HAS_CLUSTERS
  // Cluster launches are chosen only when the kernel was compiled for sm_90+ (the host checks the
  // binary's and the PTX's versions); should that ever fail, stop rather than compute garbage.
  if (a.cluster) __trap();
#endif

  for (int64_t r = blockIdx.x / split; r < p.n_rows; r += static_cast<int64_t>(gridDim.x) / split) {
    // The previous row's readers of warp_states (warp 0) and row_res (all threads) are done
    // before anyone writes them again. (A CTA usually has one row; this costs one barrier.)
    __syncthreads();
    S* gsrow = cfg.want_gs ? static_cast<S*>(p.grad_student) + r * V : nullptr;
    T* gtrow = p.grad_teacher ? static_cast<T*>(p.grad_teacher) + r * V : nullptr;
    const S* srow = static_cast<const S*>(p.student) + row_offset(p, r, p.student_strides);
    const T* trow = static_cast<const T*>(p.teacher) + row_offset(p, r, p.teacher_strides);
    const SliceGeom g = slice_geom<S, T, W>(srow, trow, read_t, V, split, rank, a.chunk);
    int64_t y;
    // The label is the same in every CTA of the row: the branch is uniform over a cluster, so the
    // cluster barriers below stay matched.
    if (!row_label(p, r, y, tid == 0 && rank == 0 && a.mode != Mode::Phase2)) {
      if (a.mode != Mode::Phase1) {
        if (tid == 0 && rank == 0) store_row(row_loss, entropy, r, A(0), A(0));
        if (gsrow) zero_range(gsrow + g.lo, g.hi - g.lo, tid, kBlockThreads);
        if (gtrow) zero_range(gtrow + g.lo, g.hi - g.lo, tid, kBlockThreads);
      }
      continue;
    }

    // ---- statistics of this CTA's slice, merged over the CTA ----------------------------------
    RowState<A> st = RowState<A>::empty();
    if (stats_here) {
      st = stats_sweep<S, T, A, W, Map>(srow, trow, read_t, g, tid, kBlockThreads, cfg, stage_s,
                                        stage_t);
      st = warp_merge(st, cfg);
      if (lane == 0) warp_states[warp] = st;
      __syncthreads();
      if (warp == 0) {
        st = lane < kWarps ? warp_states[lane] : RowState<A>::empty();
        st = warp_merge(st, cfg);  // lane 0: the CTA's state (warps in order)
      }
    }

    // ---- merge over the row's CTAs (rank order) --------------------------------------------
    if (a.mode == Mode::Phase1) {
      if (tid == 0) a.workspace[r * split + rank] = st;
      continue;
    }
    if (a.mode == Mode::Phase2) {
      // Phase 1 wrote all split states of the row before this kernel started (stream order).
      if (warp == 0) {
        st = lane < split ? a.workspace[r * split + lane] : RowState<A>::empty();
        st = warp_merge(st, cfg);
      }
    }
#if KD_HAS_CLUSTERS
    namespace cg = cooperative_groups;
    if (a.cluster) {
      cg::cluster_group cluster = cg::this_cluster();
      if (tid == 0) cta_state = st;
      // Release our cta_state, acquire the others' (also: all CTAs of the cluster are running
      // before anyone touches distributed shared memory).
      cluster.sync();
      if (warp == 0) {
        st = lane < split ? *cluster.map_shared_rank(&cta_state, lane) : RowState<A>::empty();
        st = warp_merge(st, cfg);  // every CTA merges the same states in the same order
      }
      // Done reading remote shared memory. The matching wait comes before cta_state is written
      // again or the CTA exits (end of the row, or before the mix exchange below); the work in
      // between overlaps it.
      cluster.barrier_arrive();
    }
#endif

    // ---- finalize (thread 0) and broadcast ---------------------------------------------------
    if (tid == 0) {
      const A s_label = label_logit<Map>(srow, y, V, cfg.hard, cfg.map_s);
      const A scale = a.grad_scale_dev ? *a.grad_scale_dev : a.grad_scale_host;
      row_res = finalize(st, cfg, s_label, scale);
    }
    __syncthreads();

    // ---- jsd / tvd: mix sums over the slice, the CTA and the cluster -------------------------
    if (cfg.mix) {
      // Two-phase splits are never planned for jsd / tvd (kd_launch.h): here split is 1 or a
      // cluster, and every CTA has the whole row's statistics.
      const RowResult<A> res = row_res;
      MixSums<A> mx =
          mix_sweep<S, T, A, W, Map>(srow, trow, g, tid, kBlockThreads, res, cfg, stage_s, stage_t);
      mx = block_sum_mix<A, kWarps>(mx, warp_mix, lane, warp);
#if KD_HAS_CLUSTERS
      if (a.cluster) {
        cg::cluster_group cluster = cg::this_cluster();
        cluster.barrier_wait();  // the state exchange's readers are done (see above)
        if (tid == 0) cta_mix = mx;
        cluster.sync();
        if (warp == 0) {
          mx = lane < split ? *cluster.map_shared_rank(&cta_mix, lane) : mix_zero<A>();
          mx = warp_sum_mix(mx);  // the same sums in the same order in every CTA
        }
        cluster.barrier_arrive();
      }
#endif
      if (tid == 0) finalize_mix(row_res, mx, cfg);
      __syncthreads();
    }
    if (tid == 0 && rank == 0) store_row(row_loss, entropy, r, row_res.loss, row_res.entropy);
    if (cfg.zero_gt && a.mode != Mode::Phase1) {
      zero_range(gtrow + g.lo, g.hi - g.lo, tid, kBlockThreads);
    }
    if (grad_here) {
      // Copied before the next row's first barrier, after which thread 0 may overwrite row_res.
      const RowResult<A> res = row_res;
      grad_sweep<S, T, A, W, F, Map>(srow, trow, read_t, gsrow, cfg.want_gt ? gtrow : nullptr, g,
                                     tid, kBlockThreads, res, cfg, y, stage_s, stage_t);
    }
#if KD_HAS_CLUSTERS
    // Every CTA of the cluster is done reading this CTA's shared state (see barrier_arrive).
    if (a.cluster) cg::this_cluster().barrier_wait();
#endif
  }
}

// ------------------------------------------------------------------------------------------------
// Gradient rescaling (the label count and the loss reduction: kd_reduce_kernels.cuh)
// ------------------------------------------------------------------------------------------------

// kd_scale_grads_: the factor that takes gradients made for grad_output c to grad_output g.
// Same as the CPU backend: 1 when g == c (nothing to do); a gradient last scaled by 0, inf or NaN
// cannot be recovered: NaN, never a silent 0.
template <typename F>
__device__ __forceinline__ F scale_factor(F g, F c) {
  if (g == c) return F(1);
  if (!(isfinite(c) && c != F(0))) return F(NAN);
  return g / c;
}

// One thread: factor = f(g, c) into scratch, then c = g. (The scaling kernel reads only the
// scratch, so updating c here, before it runs, is safe.)
template <typename F>
__global__ void kd_scale_factor_kernel(const F* g, F* c, F* factor) {
  const F gv = *g;
  *factor = scale_factor(gv, *c);
  *c = gv;
}

// The type the product is computed in, as the CPU backend's grad.mul_(factor tensor) promotes it:
// float for half/bfloat16/float gradients with a float factor, double when either is double
// (never the gradient's 16-bit type: a bfloat16 factor would turn 3.7 into 3.703).
template <typename G, typename F>
using OpMath =
    std::conditional_t<std::is_same_v<G, double> || std::is_same_v<F, double>, double, float>;

template <typename G, typename M>
__device__ __forceinline__ void scale_range(G* p, int64_t n, M f, int64_t tid, int64_t nthr) {
  constexpr int kW = kVecBytes / static_cast<int>(sizeof(G));
  for_range_words(
      p, n, tid, nthr, [f](G& x) { x = static_cast<G>(static_cast<M>(x) * f); },
      [f](uint4& w) {
        uint4 c = w;  // one 16-byte load and store
        G* x = reinterpret_cast<G*>(&c);
        KD_UNROLL
        for (int k = 0; k < kW; ++k) x[k] = static_cast<G>(static_cast<M>(x[k]) * f);
        w = c;
      });
}

// Scalar reductions: every element times the device factor. Decided on the device: with factor 1
// (loss.backward(), grad_output == 1) every CTA returns at once, no pass over the gradient.
template <typename G, typename F>
__global__ void __launch_bounds__(kScaleThreads)
    kd_scale_flat_kernel(G* grad, int64_t n, const F* factor) {
  const F fv = *factor;
  if (fv == F(1)) return;
  scale_range(grad, n, static_cast<OpMath<G, F>>(fv),
              static_cast<int64_t>(blockIdx.x) * kScaleThreads + threadIdx.x,
              static_cast<int64_t>(gridDim.x) * kScaleThreads);
}

// Reduction "none": a warp per row, factor g[r] / c[r]; rows with g == c are not touched. The
// caller updates c after this kernel (stream order: every warp has read the old c).
template <typename G, typename F>
__global__ void __launch_bounds__(kScaleThreads)
    kd_scale_rows_kernel(G* grad, int64_t n_rows, int64_t V, const F* g, const F* c) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * (kScaleThreads / kWarpSize);
  for (int64_t r =
           static_cast<int64_t>(blockIdx.x) * (kScaleThreads / kWarpSize) + threadIdx.x / kWarpSize;
       r < n_rows; r += warps_total) {
    const F fv = scale_factor(g[r], c[r]);
    if (fv == F(1)) continue;
    scale_range(grad + r * V, V, static_cast<OpMath<G, F>>(fv), lane, kWarpSize);
  }
}

}  // namespace kdfused::cuda
