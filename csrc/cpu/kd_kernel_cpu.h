// kd_kernel_cpu.h -- the fused CPU kernel, compiled once per instruction set.
//
// Included by kd_kernel_{default,avx2,avx512}.cpp, each of which defines CPU_CAPABILITY (the
// at::vec namespace) and KD_ISA_ENTRY (the name of its entry point) first. Everything here lives in
// an ISA-specific namespace so the copies never meet at link time.
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
// The per-element maths is kd_math.h's, instantiated on at::vec vectors through Ew<> (below).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../kd_math.h"
#include "../kd_params.h"

namespace kdfused::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Elements per chunk: the chunk's inputs and exponentials stay in L1/L2 between the two passes
// over it, and its maxima are exact (no per-element rescaling).
constexpr int64_t kChunk = 2048;

template <typename A>
inline Vectorized<A> vexp(const Vectorized<A>& x) {
  return x.exp();
}
// exp_u20: polynomial exp with <= 20 ulp error, several times cheaper than Sleef's 1-ulp exp;
// exp() is where CPU time goes. Returns 0 for -inf (masked logits) like exp. Its value at 0 is
// 0.9999997, not 1: pinned to 1, because x = 0 is each row's maximum, its largest probability
// (and for V = 1 the whole distribution, whose loss and gradients must come out exactly 0).
template <>
inline Vectorized<float> vexp(const Vectorized<float>& x) {
  const Vectorized<float> zero(0.f);
  return Vectorized<float>::blendv(x.exp_u20(), Vectorized<float>(1.f), x == zero);
}

}  // namespace CPU_CAPABILITY
}  // namespace kdfused::cpu

namespace kdfused {
// kd_math.h's element-wise primitives on at::vec vectors: the per-element functions of kd_math.h
// (accumulate_at, mix_at, grad_at) run here on whole vectors. Masks are all-ones lanes.
template <typename A>
struct Ew<at::vec::CPU_CAPABILITY::Vectorized<A>> {
  using X = at::vec::CPU_CAPABILITY::Vectorized<A>;
  using M = X;
  static X exp(const X& x) { return cpu::CPU_CAPABILITY::vexp(x); }
  static X log(const X& x) { return x.log(); }
  static X abs(const X& x) { return x.abs(); }
  static X max(const X& a, const X& b) { return at::vec::maximum(a, b); }
  static M gt(const X& a, const X& b) { return a > b; }
  static M eq(const X& a, const X& b) { return a == b; }
  static X where(const M& m, const X& a, const X& b) { return X::blendv(b, a, m); }
  static X splat(A a) { return X(a); }
};
}  // namespace kdfused

namespace kdfused::cpu {
inline namespace CPU_CAPABILITY {

template <typename A>
inline A hsum(const Vectorized<A>& v) {
  // Fixed-order horizontal sum (determinism).
  alignas(64) A tmp[Vectorized<A>::size()];
  v.store(tmp);
  A s = A(0);
  for (int i = 0; i < Vectorized<A>::size(); ++i) s += tmp[i];
  return s;
}

template <typename A>
inline A hmax(const Vectorized<A>& v) {
  alignas(64) A tmp[Vectorized<A>::size()];
  v.store(tmp);
  A m = tmp[0];
  for (int i = 1; i < Vectorized<A>::size(); ++i) m = kd_max(m, tmp[i]);
  return m;
}

// n elements of an input in the accumulation type: the input itself when it already has that type
// (no copy), else a converted copy in buf.
template <typename S, typename A>
inline const A* chunk_as(const S* src, A* buf, int64_t n) {
  if constexpr (std::is_same_v<S, A>) {
    (void)buf;
    (void)n;
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}

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
template <typename S, typename A>
inline void finish_chunk(const A* buf, S* dst, int64_t n) {
  if constexpr (!std::is_same_v<S, A>) at::vec::convert(buf, dst, n);
}

// Vector i of a chunk of n elements. Lanes past n read as -inf: exp(-inf) = 0 and the teacher-mass
// masks drop them, so a partial last vector needs no special code in the sweeps.
template <typename A>
inline Vectorized<A> load_chunk(const A* x, int64_t i, int64_t n) {
  constexpr int64_t W = Vectorized<A>::size();
  if (i + W <= n) return Vectorized<A>::loadu(x + i);
  return Vectorized<A>::set(Vectorized<A>(-kd_inf<A>()), Vectorized<A>::loadu(x + i, n - i), n - i);
}

template <typename A>
inline void store_chunk(const Vectorized<A>& v, A* x, int64_t i, int64_t n) {
  constexpr int64_t W = Vectorized<A>::size();
  if (i + W <= n) {
    v.store(x + i);
  } else {
    v.store(x + i, n - i);
  }
}

inline int64_t row_offset(const KDParams& p, int64_t r, const int64_t* strides) {
  int64_t off = 0;
  for (int d = p.row_ndim - 1; d >= 0; --d) {
    const int64_t i = r % p.row_sizes[d];
    r /= p.row_sizes[d];
    off += i * strides[d];
  }
  return off;
}

// Per-thread scratch, sized once per parallel_for task.
template <typename A>
struct Scratch {
  int64_t n_chunks;
  std::vector<A> s, t;        // one chunk of inputs in the accumulation type (padded)
  std::vector<A> ea, eb, eh;  // the row's exponentials (relative to each chunk's maxima)
  std::vector<A> cms, cmt;    // each chunk's maxima
  std::vector<A> gs, gt;      // one chunk of gradients before conversion

  // keep: the exponentials are needed after the statistics sweep (gradients, mix sweep).
  Scratch(int64_t V, bool soft, bool need_zh, bool keep) {
    constexpr int64_t W = Vectorized<A>::size();
    n_chunks = (V + kChunk - 1) / kChunk;
    const int64_t padded = n_chunks * kChunk + W;
    s.resize(kChunk + W);
    t.resize(kChunk + W);
    cms.resize(n_chunks);
    cmt.resize(n_chunks);
    if (keep) {
      ea.resize(padded);
      if (soft) eb.resize(padded);
      if (need_zh) eh.resize(padded);
      gs.resize(kChunk + W);
      gt.resize(kChunk + W);
    }
  }
};

// Sums of one chunk, one lane per vector element (the field names of RowState: accumulate_at
// works on either).
template <typename A>
struct VecSums {
  Vectorized<A> za{A(0)}, zh{A(0)}, zb{A(0)}, cx{A(0)}, ch{A(0)}, cr{A(0)};
};

template <typename S, typename T, typename A>
void kd_forward_rows(const KDParams& p, int64_t begin, int64_t end) {
  using Vec = Vectorized<A>;
  using E = Ew<Vec>;
  constexpr int64_t W = Vec::size();
  const int64_t V = p.vocab;
  // A local copy: inside the loops the compiler keeps its fields in registers (a field of p could
  // alias the gradient stores and would be reloaded for every vector).
  const RowConfig<A> cfg = make_row_config<A>(p);
  // At T = 2 the T = 1 exponentials are squares of the tempered ones: recomputed in the gradient
  // sweep (a multiply) instead of kept (a store and a load per element).
  const bool keep_h = cfg.need_zh && !cfg.square_h;
  const bool any_grad = cfg.want_gs || cfg.want_gt;
  // kl / ce student gradients need only the probabilities; everything else also needs the
  // logits' differences to the maxima, re-read from the (cached) chunk.
  const bool plain = cfg.div == Divergence::KL || cfg.div == Divergence::CE;
  const bool grad_logits = cfg.want_gt || (cfg.want_gs && cfg.soft && !plain);
  Scratch<A> sc(V, cfg.soft, keep_h, any_grad || cfg.mix);

  const S* s_base = static_cast<const S*>(p.student);
  const T* t_base = static_cast<const T*>(p.teacher);
  A* row_loss = static_cast<A*>(p.row_loss);
  const Vec inv_t(cfg.inv_t);
  const Vec zero(A(0));
  const Vec ninf(-kd_inf<A>());

  for (int64_t r = begin; r < end; ++r) {
    const S* srow = s_base + row_offset(p, r, p.student_strides);
    const T* trow = t_base + row_offset(p, r, p.teacher_strides);
    S* gsrow = cfg.want_gs ? static_cast<S*>(p.grad_student) + r * V : nullptr;
    T* gtrow = p.grad_teacher ? static_cast<T*>(p.grad_teacher) + r * V : nullptr;
    const int64_t y = p.labels ? p.labels[r] : -1;
    const bool valid = !p.labels || y != p.ignore_index;

    if (!valid) {
      row_loss[r] = A(0);
      if (gsrow) std::fill(gsrow, gsrow + V, S(0));
      if (gtrow) std::fill(gtrow, gtrow + V, T(0));
      continue;
    }

    // ---- 1. statistics sweep: exact chunk maxima, kd_math.h accumulate_at per vector -----------
    RowState<A> st = RowState<A>::empty();
    for (int64_t c = 0; c < sc.n_chunks; ++c) {
      const int64_t c0 = c * kChunk;
      const int64_t n = std::min(kChunk, V - c0);
      const int64_t nv = (n + W - 1) / W * W;  // padded to whole vectors
      const A* xs = chunk_as(srow + c0, sc.s.data(), n);
      const A* xt = cfg.soft ? chunk_as(trow + c0, sc.t.data(), n) : nullptr;

      Vec vms(-kd_inf<A>()), vmt(-kd_inf<A>());
      for (int64_t i = 0; i < nv; i += W) {
        vms = at::vec::maximum(vms, load_chunk(xs, i, n));
        if (cfg.soft) vmt = at::vec::maximum(vmt, load_chunk(xt, i, n));
      }
      RowState<A> cs = RowState<A>::empty();
      cs.ms = hmax(vms);
      cs.mt = cfg.soft ? hmax(vmt) : -kd_inf<A>();
      sc.cms[c] = cs.ms;
      sc.cmt[c] = cs.mt;
      // A chunk that is all -inf has max -inf; subtracting it would give -inf - -inf = NaN.
      // Shift by 0 instead: every exp is then exp(-inf) = 0 and the chunk state stays empty.
      const Vec sh_s(cs.ms == -kd_inf<A>() ? A(0) : cs.ms);
      const Vec sh_t(cs.mt == -kd_inf<A>() ? A(0) : cs.mt);

      VecSums<A> vs;
      A* ea = sc.ea.empty() ? nullptr : sc.ea.data() + c0;
      A* eb = sc.eb.empty() ? nullptr : sc.eb.data() + c0;
      A* eh = keep_h && !sc.eh.empty() ? sc.eh.data() + c0 : nullptr;
      for (int64_t i = 0; i < nv; i += W) {
        const Vec ds = load_chunk(xs, i, n) - sh_s;
        const Vec dt = cfg.soft ? load_chunk(xt, i, n) - sh_t : ninf;
        Vec e_a, e_b, e_h;
        accumulate_at(vs, ds, dt, cfg, e_a, e_b, e_h);
        if (ea) e_a.store(ea + i);
        if (eb) e_b.store(eb + i);
        if (eh) e_h.store(eh + i);
      }
      cs.za = hsum(vs.za);
      cs.zh = hsum(vs.zh);
      cs.zb = hsum(vs.zb);
      cs.cx = hsum(vs.cx);
      cs.ch = hsum(vs.ch);
      cs.cr = hsum(vs.cr);
      st = merge(st, cs, cfg);
    }

    // ---- 2. the row's loss -------------------------------------------------------------------
    const A s_label = cfg.hard ? static_cast<A>(srow[y]) : A(0);
    RowResult<A> res = finalize(st, cfg, s_label, static_cast<A>(p.grad_scale));

    // Probabilities are the kept exponentials times one factor per chunk (why not probs_at: the
    // exponentials are relative to each chunk's maximum and are already in memory, so the sweeps
    // cost no exp at all). For an all -inf chunk the factor is exp(-inf) = 0; for an all -inf row
    // it is NaN (no distribution, as softmax).
    const A log_zh = cfg.need_zh ? kd_log(st.zh) : A(0);
    auto chunk_factors = [&](int64_t c, Vec& fa, Vec& fb, Vec& fh) {
      fa = Vec(kd_exp((sc.cms[c] - res.ms) * cfg.inv_t - res.log_za));
      fb = Vec(cfg.soft ? kd_exp((sc.cmt[c] - res.mt) * cfg.inv_t - res.log_zb) : A(0));
      fh = cfg.need_zh ? Vec(kd_exp((sc.cms[c] - res.ms) - log_zh)) : fa;
    };

    // ---- 2b. jsd / tvd: the mix sweep over the normalised distributions ------------------------
    if (cfg.mix) {
      MixSums<Vec> mv = mix_zero<Vec>();
      const Vec ms(res.ms), mt(res.mt);
      for (int64_t c = 0; c < sc.n_chunks; ++c) {
        const int64_t c0 = c * kChunk;
        const int64_t n = std::min(kChunk, V - c0);
        const int64_t nv = (n + W - 1) / W * W;
        const A* xs = chunk_as(srow + c0, sc.s.data(), n);
        const A* xt = chunk_as(trow + c0, sc.t.data(), n);
        Vec fa, fb, fh;
        chunk_factors(c, fa, fb, fh);
        for (int64_t i = 0; i < nv; i += W) {
          // Padding lanes: q = p = 0 (their exponentials are 0): they add nothing.
          const Vec q = Vec::loadu(sc.ea.data() + c0 + i) * fa;
          const Vec pr = Vec::loadu(sc.eb.data() + c0 + i) * fb;
          mix_at(mv, res, cfg, load_chunk(xs, i, n) - ms, load_chunk(xt, i, n) - mt, q, pr);
        }
      }
      MixSums<A> mx;
      mx.a = hsum(mv.a);
      mx.b = hsum(mv.b);
      mx.c = hsum(mv.c);
      finalize_mix(res, mx, cfg);
    }
    row_loss[r] = res.loss;

    if (cfg.zero_gt) std::fill(gtrow, gtrow + V, T(0));
    if (!any_grad) continue;

    // ---- 3. gradient sweep: kd_math.h grad_at per vector, no exp -------------------------------
    const Vec kh(res.kh);
    const Vec ms(res.ms), mt(res.mt);
    for (int64_t c = 0; c < sc.n_chunks; ++c) {
      const int64_t c0 = c * kChunk;
      const int64_t n = std::min(kChunk, V - c0);
      const int64_t nv = (n + W - 1) / W * W;
      Vec fa, fb, fh;
      chunk_factors(c, fa, fb, fh);
      const A* ea = sc.ea.data() + c0;
      const A* eb = cfg.soft ? sc.eb.data() + c0 : nullptr;
      const A* eh = keep_h ? sc.eh.data() + c0 : ea;
      const A* xs = grad_logits ? chunk_as(srow + c0, sc.s.data(), n) : nullptr;
      const A* xt = grad_logits ? chunk_as(trow + c0, sc.t.data(), n) : nullptr;
      A* outs = cfg.want_gs ? grad_chunk(gsrow + c0, sc.gs.data()) : nullptr;
      A* outt = cfg.want_gt ? grad_chunk(gtrow + c0, sc.gt.data()) : nullptr;
      for (int64_t i = 0; i < nv; i += W) {
        const Vec e_a = Vec::loadu(ea + i);
        const Vec q = e_a * fa;
        const Vec pr = cfg.soft ? Vec::loadu(eb + i) * fb : zero;
        Vec h = zero;
        if (cfg.hard) h = (cfg.square_h ? e_a * e_a : Vec::loadu(eh + i)) * fh;
        const Vec ds = xs ? load_chunk(xs, i, n) - ms : zero;
        const Vec dt = xt ? load_chunk(xt, i, n) - mt : zero;
        Vec g_s, g_t;
        grad_at(res, cfg, ds, dt, q, pr, h, g_s, g_t);
        if (outs) store_chunk(g_s, outs, i, n);
        if (outt) store_chunk(g_t, outt, i, n);
      }
      if (outs) {
        if (cfg.hard && y >= c0 && y < c0 + n) outs[y - c0] -= res.kh;
        finish_chunk(outs, gsrow + c0, n);
      }
      if (outt) finish_chunk(outt, gtrow + c0, n);
    }
  }
}

template <typename S, typename T>
void kd_forward_typed(const KDParams& p) {
  using A =
      std::conditional_t<std::is_same_v<S, double> || std::is_same_v<T, double>, double, float>;
  // Rows per task: enough work per task to amortise the scratch allocation.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.vocab, 1));
  at::parallel_for(0, p.n_rows, grain,
                   [&](int64_t begin, int64_t end) { kd_forward_rows<S, T, A>(p, begin, end); });
}

template <typename S>
void kd_forward_teacher_switch(const KDParams& p) {
  switch (p.teacher_dtype) {
    case DType::Float16: return kd_forward_typed<S, c10::Half>(p);
    case DType::BFloat16: return kd_forward_typed<S, c10::BFloat16>(p);
    case DType::Float32: return kd_forward_typed<S, float>(p);
    case DType::Float64: return kd_forward_typed<S, double>(p);
  }
}

inline void kd_forward(const KDParams& p) {
  switch (p.student_dtype) {
    case DType::Float16: return kd_forward_teacher_switch<c10::Half>(p);
    case DType::BFloat16: return kd_forward_teacher_switch<c10::BFloat16>(p);
    case DType::Float32: return kd_forward_teacher_switch<float>(p);
    case DType::Float64: return kd_forward_teacher_switch<double>(p);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace kdfused::cpu

namespace kdfused::cpu {
ForwardFn KD_ISA_ENTRY() {
  return &CPU_CAPABILITY::kd_forward;
}
}  // namespace kdfused::cpu
