// kd_kernel_cpu.h -- the fused CPU kernel, compiled once per instruction set.
//
// Included by kd_kernel_{default,avx2,avx512}.cpp after their instruction set's prelude
// (kd_isa_*.h: CPU_CAPABILITY, the at::vec namespace, and KD_ISA); registers kd_forward for KD_ISA
// (kd_cpu_dispatch.h). Everything here lives in an ISA-specific namespace so the copies never meet
// at link time.
//
// Per row (rows are spread over threads with at::parallel_for; each row is done by one thread, so
// the result does not depend on the thread count):
//   1. statistics sweep, chunk by chunk: convert the chunk to the accumulation type, find its
//   maxima,
//      compute exp((s - max)/T), exp((t - max)/T) and, for the hard term at T != 1, exp(s - max)
//      ONCE, keep them in per-thread row buffers, and fold the chunk's RowState into the row's with
//      kd_math.h merge() (the same merge the CUDA kernel uses across warps and CTAs);
//   2. finalize() the row: loss, log-sums, gradient coefficients;
//   2b. jsd / tvd only: the mix sweep (kd_math.h mix_at) for their row sums, finalize_mix();
//   3. gradient sweep (kd_math.h grad_at): probabilities are the kept exponentials times one
//      per-chunk factor, so the sweep costs no exp at all. 2 or 3 exps per element in total instead
//      of the 6 of a recomputing kernel (2 for the common T = 1 and T = 2 even with the hard term);
//      jsd adds a log per element in each of sweeps 2b and 3.
// The per-element maths is kd_math.h's, instantiated on at::vec vectors through Ew<>
// (kd_vec_cpu.h).
//
// Size: one kernel with its per-thread scratch, chunk helpers and the row-splitting path, kept
// together because the three sweeps share their buffers.
#pragma once

#include "kd_cpu_dispatch.h"

#if KD_ISA_COMPILED
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../kd_math.h"
#include "../kd_params.h"
#include "kd_dtype_cpu.h"
#include "kd_vec_cpu.h"
#include "kd_vexp.h"

namespace kdfused::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

}  // namespace CPU_CAPABILITY
}  // namespace kdfused::cpu

namespace kdfused::cpu {
inline namespace CPU_CAPABILITY {

// Where a chunk of gradient is computed: straight into the output when it has the accumulation
// type, else into buf (converted by finish_chunk).
template <typename S, typename A>
inline A* grad_chunk(S* dst, A* buf) {
  if constexpr (std::is_same_v<S, A>) {
    (void)buf;
    return dst;
  } else {
    return buf;
  }
}
// stream: with non-temporal stores where the type and instruction set have them (stream_convert).
template <typename S, typename A>
inline void finish_chunk(const A* buf, S* dst, int64_t n, bool stream) {
  if constexpr (!std::is_same_v<S, A>) {
    if constexpr (std::is_same_v<A, float>) {
      if (stream && aligned64(dst) && stream_convert(buf, dst, n)) return;
    }
    at::vec::convert(buf, dst, n);
  }
}

// Chunk-sized buffers of one thread: inputs converted to the accumulation type and gradients
// before conversion. Only the ones a conversion needs are allocated (an input that already has
// the accumulation type is read in place), and no larger than the row: many-row small-V calls
// allocate them once per task.
template <typename S, typename T, typename A>
struct ChunkBufs {
  std::vector<A> s, t, gs, gt;
  // map_s / map_t: that side's logits are transformed (chunk_z), always into the buffer.
  ChunkBufs(int64_t V, bool soft, bool want_gs, bool want_gt, bool map_s, bool map_t) {
    constexpr int64_t W = Vectorized<A>::size();
    const int64_t n = (std::min(kChunk, V) + W - 1) / W * W + W;
    if (!std::is_same_v<S, A> || map_s) s.resize(n);
    if ((!std::is_same_v<T, A> || map_t) && soft) t.resize(n);
    if (!std::is_same_v<S, A> && want_gs) gs.resize(n);
    if (!std::is_same_v<T, A> && want_gt) gt.resize(n);
  }
};

// Scratch memory of this thread, kept between calls (up to kScratchKeepBytes): a fresh
// multi-megabyte row buffer per call costs a page fault per 4 KiB, which for few long rows is more
// than the kernel itself. A lease takes it; a second lease on the same thread (never needed by the
// kernels, but cheap to allow) gets fresh memory instead.
constexpr size_t kScratchKeepBytes = size_t(64) << 20;

struct ThreadScratch {
  void* ptr = nullptr;
  size_t bytes = 0;
  bool busy = false;
  ~ThreadScratch() { std::free(ptr); }
};

class ScratchLease {
 public:
  explicit ScratchLease(size_t bytes) {
    if (bytes == 0) return;
    thread_local ThreadScratch s;
    if (s.busy) {
      own_ = allocate(bytes);
      ptr_ = own_;
      return;
    }
    if (s.bytes < bytes) {
      std::free(s.ptr);
      s.ptr = nullptr;  // consistent if allocate throws
      s.bytes = 0;
      s.ptr = allocate(bytes);
      s.bytes = bytes;
    }
    s.busy = true;
    held_ = &s;
    ptr_ = s.ptr;
  }
  ScratchLease(const ScratchLease&) = delete;
  ScratchLease& operator=(const ScratchLease&) = delete;
  ~ScratchLease() {
    std::free(own_);
    if (!held_) return;
    held_->busy = false;
    if (held_->bytes > kScratchKeepBytes) {
      std::free(held_->ptr);
      held_->ptr = nullptr;
      held_->bytes = 0;
    }
  }
  void* get() const { return ptr_; }

 private:
  static void* allocate(size_t bytes) {
    void* p = nullptr;
    if (posix_memalign(&p, 64, bytes) != 0 || p == nullptr)
      throw_scratch_oom(bytes);  // (the message is built in a portable object)
    return p;
  }
  ThreadScratch* held_ = nullptr;
  void* own_ = nullptr;
  void* ptr_ = nullptr;
};

// Per-row buffers: the row's exponentials (relative to each chunk's maxima) and each chunk's
// maxima; with a logit transform, each transformed side's z (so that the later sweeps do not
// compute the tanh again); for a row split over threads also each chunk's statistics and mix sums,
// merged in chunk order afterwards. The exponentials are left uninitialised (every element read is
// written by the statistics sweep first, padding lanes included): zeroing them would be a serial
// pass over memory in front of the parallel sweeps.
template <typename A>
struct RowBufs {
  int64_t n_chunks;
  ScratchLease scratch;
  A* ea = nullptr;
  A* eb = nullptr;
  A* eh = nullptr;
  A* zs = nullptr;  // the student's z (keep_zs)
  A* zt = nullptr;  // the teacher's z (keep_zt)
  std::vector<A> cms, cmt;
  std::vector<RowState<A>> cst;
  std::vector<MixSums<A>> cmx;

  // the last chunk's vectors are stored whole: V + W elements per kept row
  static size_t scratch_bytes(int64_t V, bool soft, bool keep_h, bool keep, bool keep_zs,
                              bool keep_zt) {
    int64_t rows = keep ? 1 + int64_t(soft) + int64_t(keep_h) : 0;
    rows += int64_t(keep_zs) + int64_t(keep_zt);
    return static_cast<size_t>(rows * (V + Vectorized<A>::size())) * sizeof(A);
  }

  RowBufs(int64_t V, bool soft, bool keep_h, bool keep, bool keep_zs, bool keep_zt, bool split)
      : scratch(scratch_bytes(V, soft, keep_h, keep, keep_zs, keep_zt)) {
    const int64_t padded = V + Vectorized<A>::size();
    n_chunks = (V + kChunk - 1) / kChunk;
    cms.resize(n_chunks);
    cmt.resize(n_chunks);
    if (keep) {
      A* next = static_cast<A*>(scratch.get());
      ea = next;
      next += padded;
      if (soft) {
        eb = next;
        next += padded;
      }
      if (keep_h) {
        eh = next;
        next += padded;
      }
      if (keep_zs) {
        zs = next;
        next += padded;
      }
      if (keep_zt) zt = next;
    }
    if (split) {
      cst.resize(n_chunks);
      cmx.resize(n_chunks);
    }
  }
};

// Members that call kd_math.h's scalar functions are KD_FLATTEN (kd_vec_cpu.h says why).

// The three sweeps of a row, one chunk at a time, so that a row can be run on one thread (chunks
// in order) or split over threads (chunks in parallel, their states merged in chunk order): both
// run exactly the same operations in the same order, hence give bitwise the same result.
template <typename S, typename T, typename A>
struct RowKernel {
  using Vec = Vectorized<A>;
  static constexpr int64_t W = Vec::size();

  struct Row {
    const S* s;
    const T* t;
    S* gs;
    T* gt;
    int64_t y;
    bool valid;
    const S* next_s;  // the next row's logits (prefetched), nullptr after the last row
    const T* next_t;
  };
  // Per-row constants of the mix and gradient sweeps.
  using Fin = RowFinal<A>;

  const KDParams& p;
  const RowConfig<A> cfg;
  const int64_t V;
  const int64_t n_chunks;
  // At T = 2 the T = 1 exponentials are squares of the tempered ones: recomputed in the gradient
  // sweep (a multiply) instead of kept (a store and a load per element).
  const bool keep_h;
  const bool any_grad;
  // kl / ce student gradients need only the probabilities; everything else also needs the
  // logits' differences to the maxima, re-read from the (cached) chunk.
  const bool grad_logits;
  // The student's transformed logits in the gradient sweep: for grad_at, or for the transform's
  // slope (dz/dx) of the student gradient.
  const bool grad_zs;
  const bool keep;  // the exponentials are needed after the statistics sweep
  // A transformed side's z is kept from the statistics sweep for the later sweeps that read it.
  const bool keep_zs;
  const bool keep_zt;
  // Non-temporal gradient stores (kd_cpu_dispatch.h stream_grad_stores).
  const bool stream;

  KD_FLATTEN
  explicit RowKernel(const KDParams& params)
      : p(params),
        cfg(make_row_config<A>(params)),
        V(params.vocab),
        n_chunks((params.vocab + kChunk - 1) / kChunk),
        keep_h(cfg.need_zh && !cfg.square_h),
        any_grad(cfg.want_gs || cfg.want_gt),
        grad_logits(cfg.want_gt || (cfg.want_gs && cfg.soft && cfg.div != Divergence::KL &&
                                    cfg.div != Divergence::CE)),
        grad_zs(grad_logits || (cfg.want_gs && cfg.map_s.on)),
        keep(any_grad || cfg.mix),
        keep_zs(cfg.map_s.on && (cfg.mix || grad_zs)),
        keep_zt(cfg.map_t.on && cfg.soft && (cfg.mix || grad_logits)),
        stream(any_grad && stream_grad_stores(static_cast<size_t>(params.n_rows * params.vocab) *
                                                  (cfg.want_gs ? sizeof(S) : 0) +
                                              static_cast<size_t>(params.n_rows * params.vocab) *
                                                  (cfg.want_gt ? sizeof(T) : 0))) {}

  RowBufs<A> row_bufs(bool split) const {
    return RowBufs<A>(V, cfg.soft, keep_h, keep, keep_zs, keep_zt, split);
  }
  ChunkBufs<S, T, A> chunk_bufs() const {
    return ChunkBufs<S, T, A>(V, cfg.soft, cfg.want_gs, cfg.want_gt, cfg.map_s.on, cfg.map_t.on);
  }

  Row row(int64_t r) const {
    Row w;
    w.s = static_cast<const S*>(p.student) + row_offset(p, r, p.student_strides);
    w.t = static_cast<const T*>(p.teacher) + row_offset(p, r, p.teacher_strides);
    w.gs = cfg.want_gs ? static_cast<S*>(p.grad_student) + r * V : nullptr;
    w.gt = p.grad_teacher ? static_cast<T*>(p.grad_teacher) + r * V : nullptr;
    const int64_t y = p.labels ? p.labels[r] : -1;
    w.valid = !p.labels || y != p.ignore_index;
    const bool more = r + 1 < p.n_rows;
    w.next_s =
        more ? static_cast<const S*>(p.student) + row_offset(p, r + 1, p.student_strides) : nullptr;
    w.next_t =
        more ? static_cast<const T*>(p.teacher) + row_offset(p, r + 1, p.teacher_strides) : nullptr;
    // The label's column in this slice (the whole row unless vocabulary-parallel); outside
    // [0, V) when the label is in another process's slice.
    w.y = y - p.vocab_offset;
    return w;
  }

  void invalid_row(int64_t r, const Row& w) const {
    if (p.phase == Phase::Stats) {
      SliceStats<A>& out = static_cast<SliceStats<A>*>(p.slice_stats)[r];
      out.st = RowState<A>::empty();
      out.s_label = A(0);
      return;
    }
    if (p.phase == Phase::Mix) {
      static_cast<MixSums<A>*>(p.slice_mix)[r] = mix_zero<A>();
      return;
    }
    if (p.phase == Phase::Full) static_cast<A*>(p.row_loss)[r] = A(0);
    if (p.phase == Phase::Full && p.entropy) static_cast<A*>(p.entropy)[r] = A(0);
    if (w.gs) std::fill(w.gs, w.gs + V, S(0));
    if (w.gt) std::fill(w.gt, w.gt + V, T(0));
  }

  // Chunk c of the row: its first column, its length, and that length padded to whole vectors.
  struct Span {
    int64_t c0, n, nv;
  };
  Span span(int64_t c) const {
    const int64_t c0 = c * kChunk;
    const int64_t n = std::min(kChunk, V - c0);
    return {c0, n, (n + W - 1) / W * W};
  }

  // ---- 1. statistics sweep of chunk c: exact chunk maxima, kd_math.h accumulate_at per vector --
  KD_FLATTEN
  RowState<A> stats_chunk(const Row& w, int64_t c, RowBufs<A>& rb, ChunkBufs<S, T, A>& cb) const {
    return cfg.need_hq ? stats_chunk_as<true>(w, c, rb, cb) : stats_chunk_as<false>(w, c, rb, cb);
  }

  // HQ: the entropy's sum is accumulated. Why a template: with it a runtime switch, its vector
  // accumulator stays live through the loop for nothing in a call without return_entropy (one more
  // register in a loop that is short of them: the plain call measured ~2% slower).
  template <bool HQ>
  KD_FLATTEN RowState<A> stats_chunk_as(const Row& w, int64_t c, RowBufs<A>& rb,
                                        ChunkBufs<S, T, A>& cb) const {
    // A local copy: inside the loops the compiler keeps its fields in registers (a member could
    // alias the exponential stores and would be reloaded for every vector).
    RowConfig<A> cfg = this->cfg;
    cfg.need_hq = HQ;
    const auto [c0, n, nv] = span(c);
    const A* xs = chunk_z(w.s + c0, rb.zs ? rb.zs + c0 : cb.s.data(), n, cfg.map_s);
    const A* xt =
        cfg.soft ? chunk_z(w.t + c0, rb.zt ? rb.zt + c0 : cb.t.data(), n, cfg.map_t) : nullptr;

    Vec vms(-kd_inf<A>()), vmt(-kd_inf<A>());
    for (int64_t i = 0; i < nv; i += W) {
      vms = vmax(vms, load_chunk(xs, i, n));
      if (cfg.soft) vmt = vmax(vmt, load_chunk(xt, i, n));
    }
    RowState<A> cs = RowState<A>::empty();
    cs.ms = hmax(vms);
    cs.mt = cfg.soft ? hmax(vmt) : -kd_inf<A>();
    rb.cms[c] = cs.ms;
    rb.cmt[c] = cs.mt;
    // A chunk that is all -inf has max -inf; subtracting it would give -inf - -inf = NaN.
    // Shift by 0 instead: every exp is then exp(-inf) = 0 and the chunk state stays empty.
    const Vec sh_s(cs.ms == -kd_inf<A>() ? A(0) : cs.ms);
    const Vec sh_t(cs.mt == -kd_inf<A>() ? A(0) : cs.mt);
    const Vec ninf(-kd_inf<A>());

    // The chunk's sums lane by lane: kd_math.h accumulate_at works on a RowState of vectors as on
    // one of scalars (its maxima are not used here).
    RowState<Vec> vs;
    for_each_sum([](Vec& x) { x = Vec(A(0)); }, vs);
    A* ea = rb.ea ? rb.ea + c0 : nullptr;
    A* eb = rb.eb ? rb.eb + c0 : nullptr;
    A* eh = rb.eh ? rb.eh + c0 : nullptr;
    // The next chunk's logits (the next row's first for the last chunk) are fetched while this
    // one is computed: the maxima loop of a chunk otherwise waits on memory, and then the exps
    // wait on nothing (measured: 20-25% of a large call). One line per vector and side, the next
    // chunk's at the same offset; past its end they are harmless hints.
    const S* pf_s = c + 1 < n_chunks ? w.s + c0 + kChunk : w.next_s;
    const T* pf_t = c + 1 < n_chunks ? w.t + c0 + kChunk : w.next_t;
    for (int64_t i = 0; i < nv; i += W) {
      if (pf_s) prefetch(pf_s + i);
      if (cfg.soft && pf_t) prefetch(pf_t + i);
      const Vec ds = load_chunk(xs, i, n) - sh_s;
      const Vec dt = cfg.soft ? load_chunk(xt, i, n) - sh_t : ninf;
      Vec e_a, e_b, e_h;
      accumulate_at(vs, ds, dt, cfg, e_a, e_b, e_h);
      if (ea) e_a.store(ea + i);
      if (eb) e_b.store(eb + i);
      if (eh) e_h.store(eh + i);
    }
    // Only the sums this configuration accumulates (the others are 0 in cs already): for small
    // V these horizontal sums are a good part of the row's time.
    cs.za = hsum(vs.za);
    if (cfg.need_zh) cs.zh = hsum(vs.zh);
    if (cfg.soft) cs.zb = hsum(vs.zb);
    if (cfg.need_cx) cs.cx = hsum(vs.cx);
    if (cfg.need_ch) cs.ch = hsum(vs.ch);
    if (cfg.need_cr) cs.cr = hsum(vs.cr);
    if (cfg.need_hq) cs.hq = hsum(vs.hq);
    return cs;
  }

  // ---- 2. the row's loss, from its merged statistics -----------------------------------------
  KD_FLATTEN
  Fin finalize_row(const Row& w, const RowState<A>& st) const {
    const A s_label = cfg.hard ? label_z(w) : A(0);
    return finalize_row_final(st, cfg, s_label, static_cast<A>(p.grad_scale));
  }

  // The student's (transformed) logit at the label, w.y in [0, V).
  A label_z(const Row& w) const {
    const A x = static_cast<A>(w.s[w.y]);
    return cfg.map_s.on ? map_logit(x, cfg.map_s) : x;
  }

  // Vocabulary-parallel steps: what a slice's merged statistics become. Returns true when the
  // row is done (Stats writes its record and stops; Mix and Grad take the whole row's constants).
  KD_FLATTEN
  bool slice_step(int64_t r, const Row& w, const RowState<A>& st, Fin& f) const {
    if (p.phase == Phase::Stats) {
      SliceStats<A>& out = static_cast<SliceStats<A>*>(p.slice_stats)[r];
      out.st = st;
      out.s_label = (cfg.hard && w.y >= 0 && w.y < V) ? label_z(w) : A(0);
      return true;
    }
    f = static_cast<const Fin*>(p.row_final)[r];
    return false;
  }

  // Probabilities are the kept exponentials times one factor per chunk (why not probs_at: the
  // exponentials are relative to each chunk's maximum and are already in memory, so the sweeps
  // cost no exp at all). For an all -inf chunk the factor is exp(-inf) = 0; for an all -inf row
  // it is NaN (no distribution, as softmax).
  KD_FLATTEN
  void chunk_factors(const Fin& f, const RowBufs<A>& rb, int64_t c, Vec& fa, Vec& fb,
                     Vec& fh) const {
    const RowResult<A>& res = f.res;
    fa = Vec(kd_exp((rb.cms[c] - res.ms) * cfg.inv_t - res.log_za));
    fb = Vec(cfg.soft ? kd_exp((rb.cmt[c] - res.mt) * cfg.inv_t - res.log_zb) : A(0));
    fh = cfg.need_zh ? Vec(kd_exp((rb.cms[c] - res.ms) - f.log_zh)) : fa;
  }

  // ---- 2b. jsd / tvd: the mix sums of chunk c (the row's are their sum in chunk order) ---------
  KD_FLATTEN
  MixSums<A> mix_chunk(const Row& w, const Fin& f, int64_t c, const RowBufs<A>& rb,
                       ChunkBufs<S, T, A>& cb) const {
    const RowConfig<A> cfg = this->cfg;
    const RowResult<A> res = f.res;
    const auto [c0, n, nv] = span(c);
    const A* xs = rb.zs ? rb.zs + c0 : chunk_z(w.s + c0, cb.s.data(), n, cfg.map_s);
    const A* xt = rb.zt ? rb.zt + c0 : chunk_z(w.t + c0, cb.t.data(), n, cfg.map_t);
    const A* ea = rb.ea + c0;
    const A* eb = rb.eb + c0;
    const Vec ms(res.ms), mt(res.mt);
    Vec fa, fb, fh;
    chunk_factors(f, rb, c, fa, fb, fh);
    MixSums<Vec> mv = mix_zero<Vec>();
    for (int64_t i = 0; i < nv; i += W) {
      // Padding lanes: q = p = 0 (their exponentials are 0): they add nothing.
      const Vec q = Vec::loadu(ea + i) * fa;
      const Vec pr = Vec::loadu(eb + i) * fb;
      mix_at(mv, res, cfg, load_chunk(xs, i, n) - ms, load_chunk(xt, i, n) - mt, q, pr);
    }
    MixSums<A> mx;
    for_each_mix([](A& out, const Vec& v) { out = hsum(v); }, mx, mv);
    return mx;
  }

  // ---- 3. gradient sweep of chunk c: kd_math.h grad_at per vector, no exp --------------------
  KD_FLATTEN
  void gradient_chunk(const Row& w, const Fin& f, int64_t c, const RowBufs<A>& rb,
                      ChunkBufs<S, T, A>& cb) const {
    const RowConfig<A> cfg = this->cfg;
    const RowResult<A> res = f.res;
    const auto [c0, n, nv] = span(c);
    const Vec zero(A(0));
    const Vec ms(res.ms), mt(res.mt);
    Vec fa, fb, fh;
    chunk_factors(f, rb, c, fa, fb, fh);
    const A* ea = rb.ea + c0;
    const A* eb = cfg.soft ? rb.eb + c0 : nullptr;
    const A* eh = keep_h ? rb.eh + c0 : ea;
    const A* xs = !grad_zs ? nullptr
                  : rb.zs  ? rb.zs + c0
                           : chunk_z(w.s + c0, cb.s.data(), n, cfg.map_s);
    const A* xt = !grad_logits ? nullptr
                  : rb.zt      ? rb.zt + c0
                               : chunk_z(w.t + c0, cb.t.data(), n, cfg.map_t);
    // The transform's slope (dz/dx) multiplies each gradient (after the hard term's label part).
    const bool slope_s = cfg.want_gs && cfg.map_s.on;
    const bool slope_t = cfg.want_gt && cfg.map_t.on;
    A* outs = cfg.want_gs ? grad_chunk(w.gs + c0, cb.gs.data()) : nullptr;
    A* outt = cfg.want_gt ? grad_chunk(w.gt + c0, cb.gt.data()) : nullptr;
    // Non-temporal stores straight into an output of the accumulation type, chunk by chunk where
    // it starts on a 64-byte line (every chunk when a row is); a converted output streams from
    // its buffer (finish_chunk).
    const bool nt_s = std::is_same_v<S, A> && stream && outs && aligned64(outs);
    const bool nt_t = std::is_same_v<T, A> && stream && outt && aligned64(outt);
    for (int64_t i = 0; i < nv; i += W) {
      const Vec e_a = Vec::loadu(ea + i);
      const Vec q = e_a * fa;
      const Vec pr = cfg.soft ? Vec::loadu(eb + i) * fb : zero;
      Vec h = zero;
      if (cfg.hard) h = (cfg.square_h ? e_a * e_a : Vec::loadu(eh + i)) * fh;
      const Vec zs = xs ? load_chunk(xs, i, n) : zero;
      const Vec zt = xt ? load_chunk(xt, i, n) : zero;
      const Vec ds = grad_logits ? zs - ms : zero;
      const Vec dt = xt ? zt - mt : zero;
      Vec g_s, g_t;
      grad_at(res, cfg, ds, dt, q, pr, h, g_s, g_t);
      if (slope_s) g_s = g_s * map_slope(zs, cfg.map_s);
      if (slope_t) g_t = g_t * map_slope(zt, cfg.map_t);
      if (outs) nt_s ? stream_chunk(g_s, outs, i, n) : store_chunk(g_s, outs, i, n);
      if (outt) nt_t ? stream_chunk(g_t, outt, i, n) : store_chunk(g_t, outt, i, n);
    }
    if (outs) {
      if (cfg.hard && w.y >= c0 && w.y < c0 + n) {
        outs[w.y - c0] -= slope_s ? res.kh * map_slope(xs[w.y - c0], cfg.map_s) : res.kh;
      }
      finish_chunk(outs, w.gs + c0, n, stream);
    }
    if (outt) finish_chunk(outt, w.gt + c0, n, stream);
  }

  // The row's loss (a full call) and a teacher gradient that is all zeros (no soft term); true
  // when the gradient sweep follows.
  bool store_row(int64_t r, const Row& w, const Fin& f) const {
    if (p.phase == Phase::Full) static_cast<A*>(p.row_loss)[r] = f.res.loss;
    if (p.phase == Phase::Full && p.entropy) static_cast<A*>(p.entropy)[r] = f.res.entropy;
    if (cfg.zero_gt) std::fill(w.gt, w.gt + V, T(0));
    return any_grad;
  }

  // One row on the calling thread, chunks in order. The row's state starts as its first chunk's
  // (not merged into an empty state: that merge costs exps for nothing, per row, for small V).
  // A row has at least one chunk (V >= 1).
  KD_FLATTEN
  void row_serial(int64_t r, RowBufs<A>& rb, ChunkBufs<S, T, A>& cb) const {
    const Row w = row(r);
    if (!w.valid) return invalid_row(r, w);
    RowState<A> st = stats_chunk(w, 0, rb, cb);
    for (int64_t c = 1; c < n_chunks; ++c) st = merge(st, stats_chunk(w, c, rb, cb), cfg);
    Fin f;
    if (p.phase == Phase::Full) {
      f = finalize_row(w, st);
    } else if (slice_step(r, w, st, f)) {
      return;
    }
    if (cfg.mix && p.phase != Phase::Grad) {
      MixSums<A> mx = mix_zero<A>();
      for (int64_t c = 0; c < n_chunks; ++c) mx = mix_add(mx, mix_chunk(w, f, c, rb, cb));
      if (p.phase == Phase::Mix) {
        static_cast<MixSums<A>*>(p.slice_mix)[r] = mx;
        return;
      }
      finalize_mix(f.res, mx, cfg);
    }
    if (!store_row(r, w, f)) return;
    for (int64_t c = 0; c < n_chunks; ++c) gradient_chunk(w, f, c, rb, cb);
  }

  // One row with its chunks spread over threads: per-chunk states and sums are stored, then
  // merged on this thread in the order row_serial merges them (bitwise the same result).
  KD_FLATTEN
  void row_split(int64_t r, RowBufs<A>& rb) const {
    const Row w = row(r);
    if (!w.valid) return invalid_row(r, w);
    at::parallel_for(0, n_chunks, 1, [&](int64_t b, int64_t e) {
      ChunkBufs<S, T, A> cb = chunk_bufs();
      for (int64_t c = b; c < e; ++c) rb.cst[c] = stats_chunk(w, c, rb, cb);
    });
    RowState<A> st = rb.cst[0];
    for (int64_t c = 1; c < n_chunks; ++c) st = merge(st, rb.cst[c], cfg);
    Fin f = finalize_row(w, st);
    if (cfg.mix) {
      at::parallel_for(0, n_chunks, 1, [&](int64_t b, int64_t e) {
        ChunkBufs<S, T, A> cb = chunk_bufs();
        for (int64_t c = b; c < e; ++c) rb.cmx[c] = mix_chunk(w, f, c, rb, cb);
      });
      MixSums<A> mx = mix_zero<A>();
      for (int64_t c = 0; c < n_chunks; ++c) mx = mix_add(mx, rb.cmx[c]);
      finalize_mix(f.res, mx, cfg);
    }
    if (!store_row(r, w, f)) return;
    at::parallel_for(0, n_chunks, 1, [&](int64_t b, int64_t e) {
      ChunkBufs<S, T, A> cb = chunk_bufs();
      for (int64_t c = b; c < e; ++c) gradient_chunk(w, f, c, rb, cb);
      if (stream) stream_fence();
    });
  }
};

// Rows are split over threads only when there are too few of them to keep every thread busy and
// each has enough chunks to share; below this many chunks the split's synchronisation costs more
// than it saves.
constexpr int64_t kMinSplitChunks = 4;

template <typename S, typename T>
void kd_forward_typed(const KDParams& p) {
  using A =
      std::conditional_t<std::is_same_v<S, double> || std::is_same_v<T, double>, double, float>;
  const RowKernel<S, T, A> k(p);
  const int64_t threads = at::get_num_threads();
  // (The vocabulary-parallel steps always go row by row.)
  if (p.phase == Phase::Full && threads > 1 && !at::in_parallel_region() &&
      p.n_rows < 2 * threads && k.n_chunks >= kMinSplitChunks) {
    RowBufs<A> rb = k.row_bufs(/*split=*/true);
    for (int64_t r = 0; r < p.n_rows; ++r) k.row_split(r, rb);
    return;
  }
  // Rows per task: enough work per task to amortise the buffers' allocation.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.vocab, 1));
  at::parallel_for(0, p.n_rows, grain, [&](int64_t begin, int64_t end) {
    RowBufs<A> rb = k.row_bufs(/*split=*/false);
    ChunkBufs<S, T, A> cb = k.chunk_bufs();
    for (int64_t r = begin; r < end; ++r) k.row_serial(r, rb, cb);
    if (k.stream) stream_fence();
  });
}

inline void kd_forward(const KDParams& p) {
  with_dtype_pair(p, [&](auto s, auto t) {
    kd_forward_typed<typename decltype(s)::type, typename decltype(t)::type>(p);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace kdfused::cpu

#define KD_ISA_FORWARD &CPU_CAPABILITY::kd_forward
#define KD_ISA_EXP &CPU_CAPABILITY::vexp_array
#else
// An instruction set this compiler or architecture cannot target: no kernel.
#define KD_ISA_FORWARD nullptr
#define KD_ISA_EXP nullptr
#endif  // KD_ISA_COMPILED

namespace kdfused::cpu {
KD_REGISTER_KERNEL(ForwardStub, KD_ISA, KD_ISA_FORWARD)
KD_REGISTER_KERNEL(ExpStub, KD_ISA, KD_ISA_EXP)
}  // namespace kdfused::cpu
