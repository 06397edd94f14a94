// kd_math.h -- the per-element and per-row maths of kdfused, ONE copy for every backend: the CUDA
// kernels, the CPU "scalar" path (which runs exactly these functions on the host, so the CPU test
// suite executes every line the GPU will), and the vectorised CPU kernel (which instantiates the
// element-wise functions below on at::vec::Vectorized through the Ew<> primitives).
//
// One row (T = temperature, a = s/T, b = t/T, p = softmax(b) teacher, q = softmax(a) student,
// h = softmax(s) at T = 1, m = beta p + (1 - beta) q):
//   kl          D = sum p (log p - log q)
//   ce          D = -sum p log q = KL + H(p)
//   reverse_kl  D = sum q (log q - log p)
//   jsd         D = beta KL(p || m) + (1 - beta) KL(q || m)          (0 < beta < 1)
//   tvd         D = 0.5 sum |p - q|
//   hard        H = LSE(s) - s_y
//   row         = soft_weight * T^2 * D + hard_weight * H
// where s and t are the logits after each side's transform (LogitMap below: z = scale x, then
// z = c tanh(z / c) with a softcap c); the gradients w.r.t. the raw logits x are those below times
// dz/dx = scale (1 - (z / c)^2). Entropy (return_entropy): H(q) = -sum q log q = log za - hq / za,
// hq = sum ea (s - ms) / T.
// Gradients of the row (ks = soft_weight * T, kh = hard_weight):
//   d/ds_i hard  kh (h_i - [i == y])
//   kl, ce       d/ds_i = ks (q_i - p_i)
//                d/dt_i = ks p_i (log p_i - log q_i - KL)          (kl)
//                       = -ks p_i (log q_i + CE)                    (ce)
//   reverse_kl   d/ds_i = ks q_i (log q_i - log p_i - R)       d/dt_i = ks (p_i - q_i)
//   jsd          d/ds_i = ks (1 - beta) q_i (log(q_i / m_i) - KL(q || m))
//                d/dt_i = ks beta p_i (log(p_i / m_i) - KL(p || m))
//   tvd          with g_k = 0.5 sign(q_k - p_k):
//                d/ds_i = ks q_i (g_i - sum_k q_k g_k)     d/dt_i = ks p_i (sum_k p_k g_k - g_i)
//
// Sweeps over a row: (1) statistics: a RowState of running maxima and sums of exponentials relative
// to them, mergeable (merge()) across any split of the row; finalize() gives the log-sums, the
// loss of kl / ce / reverse_kl and the gradient coefficients. (2) jsd and tvd only: the "mix"
// sweep, which needs the normalised p and q per element, sums MixSums (plain sums, merged by
// addition); finalize_mix() completes the loss and coefficients. (3) gradient sweep.
//
// Numerics: maxima are kept in *raw logit units* (max s, max t) and every per-element quantity is
// formed from differences to them: (s - max s) is exact for nearby values (Sterbenz) and scaling
// by 1/T afterwards loses nothing, whereas s/T - max(s/T), or KL written as
// sum p (b - a) - (LSE(b) - LSE(a)), cancels large rounded numbers (a teacher offset by 1e4 at
// T = 0.05 would lose the second decimal).
//
// Size: by design the ONE copy of every formula of every divergence, so that no backend can
// drift from another; each section (config, statistics, results, mix sums, gradients) is short.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "kd_params.h"

#if defined(__CUDACC__)
#define KD_HD __host__ __device__ __forceinline__
#else
#define KD_HD inline
#endif

// Loop unrolling for nvcc. Nothing for the host compilers: GCC does not know the pragma (a warning
// in every CPU object), and the host code is the reference the CPU results are pinned to.
#if defined(__CUDACC__)
#define KD_UNROLL _Pragma("unroll")
#else
#define KD_UNROLL
#endif

namespace kdfused {

template <typename A>
KD_HD A kd_inf() {
  return std::numeric_limits<A>::infinity();
}

KD_HD float kd_exp(float x) {
#if defined(__CUDA_ARCH__)
  // The fast exp (ex2.approx of x * log2 e: 2 + 1.2 |x| ulp, flushes results below 2^-126 to 0),
  // the device's counterpart of the CPU kernel's exp_u20. The arguments here are <= 0 and the
  // terms that matter have |x| of a few units. Why not expf: the fused kernel does up to 4 exps
  // per element, and expf's range reduction (~7 FMA-pipe instructions each) would make it
  // ALU-bound above the HBM floor on H100/H200; __expf is one FMUL + one MUFU.EX2.
  return __expf(x);
#else
  return std::exp(x);
#endif
}
KD_HD double kd_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
KD_HD float kd_log(float x) {
#if defined(__CUDA_ARCH__)
  return ::logf(x);
#else
  return std::log(x);
#endif
}
KD_HD double kd_log(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}

KD_HD float kd_tanh(float x) {
#if defined(__CUDA_ARCH__)
  // The accurate tanhf (not tanh.approx.f32, whose 2^-11 relative error times a softcap of 30
  // would move a logit by 0.015).
  return ::tanhf(x);
#else
  return std::tanh(x);
#endif
}
KD_HD double kd_tanh(double x) {
#if defined(__CUDA_ARCH__)
  return ::tanh(x);
#else
  return std::tanh(x);
#endif
}

constexpr double kLog2e = 1.4426950408889634;

// exp(x * c) with c_l2e = c * log2(e) rounded once on the host. On the device (float) this is
// ex2.approx.ftz of one product: the FMUL of __expf folded into the row constant. Elsewhere kd_exp.
KD_HD float kd_exp_scaled(float x, float c, float c_l2e) {
#if defined(__CUDA_ARCH__)
  (void)c;
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * c_l2e));
  return y;
#else
  (void)c_l2e;
  return kd_exp(x * c);
#endif
}
KD_HD double kd_exp_scaled(double x, double c, double c_l2e) {
  (void)c_l2e;
  return kd_exp(x * c);
}

// Plain maximum (one instruction on the device; NaN-dropping). See push_vec for why it is safe.
KD_HD float kd_fmax(float a, float b) {
#if defined(__CUDA_ARCH__)
  return fmaxf(a, b);
#else
  return std::fmax(a, b);
#endif
}
KD_HD double kd_fmax(double a, double b) {
#if defined(__CUDA_ARCH__)
  return fmax(a, b);
#else
  return std::fmax(a, b);
#endif
}

template <typename A>
KD_HD A kd_max(A x, A y) {
  // NaN-propagating: a NaN logit must poison the row, not vanish into a max.
  return (x != x || x > y) ? x : y;
}

// Row r -> element offset: r decomposed over row_sizes (last fastest), dotted with strides. Static
// indexing only (on the device the params live in the constant bank; a dynamic index would copy
// them to local memory).
KD_HD int64_t row_offset(const KDParams& p, int64_t r, const int64_t (&strides)[kMaxRowDims]) {
  int64_t off = 0;
  KD_UNROLL
  for (int d = kMaxRowDims - 1; d >= 0; --d) {
    if (d < p.row_ndim) {
      const int64_t size = p.row_sizes[d];
      const int64_t i = r % size;
      r /= size;
      off += i * strides[d];
    }
  }
  return off;
}

// ------------------------------------------------------------------------------------------------
// Element-wise primitives. The functions below that take an element type X are written once and
// instantiated on float/double (CUDA, CPU scalar path) and, in the CPU kernel, on at::vec vectors
// (kd_kernel_cpu.h specialises Ew for them). Masks are bool for scalars.
// ------------------------------------------------------------------------------------------------
template <typename X>
struct Ew {
  using M = bool;
  static KD_HD X exp(X x) { return kd_exp(x); }
  static KD_HD X log(X x) { return kd_log(x); }
  static KD_HD X tanh(X x) { return kd_tanh(x); }
  static KD_HD X abs(X x) { return x < X(0) ? -x : x; }
  static KD_HD X max(X a, X b) { return a > b ? a : b; }
  static KD_HD M gt(X a, X b) { return a > b; }
  static KD_HD M eq(X a, X b) { return a == b; }
  static KD_HD X where(M m, X a, X b) { return m ? a : b; }
  static KD_HD X splat(X a) { return a; }
};

// ------------------------------------------------------------------------------------------------
// The logit transform of one side: z = scale * x, then z = cap * tanh(z / cap) when capped. Every
// kernel applies map_logit to each logit it loads (when `on`) and multiplies each gradient it
// stores by map_slope of the same z; with `on` false (scale 1, no softcap) neither is called, so
// a plain call runs the code it ran before the transform existed.
// ------------------------------------------------------------------------------------------------
template <typename A>
struct LogitMap {
  A scale;
  A cap;        // > 0 when capped
  A inv_cap;    // 1 / cap
  bool on;      // not the identity
  bool capped;  // a softcap is given
};

template <typename A>
inline LogitMap<A> make_logit_map(double scale, double softcap) {
  LogitMap<A> m;
  m.scale = static_cast<A>(scale);
  m.capped = softcap > 0;
  m.cap = static_cast<A>(m.capped ? softcap : 1.0);
  m.inv_cap = static_cast<A>(m.capped ? 1.0 / softcap : 1.0);
  m.on = m.capped || scale != 1.0;
  return m;
}

// z from a raw logit x. Why the -inf guard: a masked column must stay masked whatever the scale
// (-inf * 0 is NaN, -inf * -1 is +inf, and tanh would make it -cap). A NaN x stays NaN; +inf
// becomes +cap when capped (as tanh says), +inf * scale otherwise.
template <typename X, typename A>
KD_HD X map_logit(X x, const LogitMap<A>& m) {
  using E = Ew<X>;
  const X ninf = E::splat(-kd_inf<A>());
  X z = x * E::splat(m.scale);
  if (m.capped) z = E::splat(m.cap) * E::tanh(z * E::splat(m.inv_cap));
  return E::where(E::eq(x, ninf), ninf, z);
}

// dz/dx at the z = map_logit(x): scale (1 - (z / cap)^2) when capped (from z, as torch's own tanh
// backward forms it from its output), else scale; 0 at a masked (-inf) z, where the gradient
// w.r.t. z is 0 anyway and (z / cap)^2 would make it 0 * inf = NaN.
template <typename X, typename A>
KD_HD X map_slope(X z, const LogitMap<A>& m) {
  using E = Ew<X>;
  const X scale = E::splat(m.scale);
  if (!m.capped) return scale;
  const X u = z * E::splat(m.inv_cap);
  const X slope = scale * (E::splat(A(1)) - u * u);
  return E::where(E::eq(z, E::splat(-kd_inf<A>())), E::splat(A(0)), slope);
}

// ------------------------------------------------------------------------------------------------
// What a kernel needs to know about a call: derived from KDParams by make_row_config() only.
// ------------------------------------------------------------------------------------------------
template <typename A>
struct RowConfig {
  A inv_t;      // 1 / T
  A inv_t_l2e;  // log2(e) / T
  A temperature;
  A soft_weight;  // > 0 iff soft
  A hard_weight;  // > 0 iff hard
  A beta;         // jsd only
  A log_beta;     // jsd: log(beta), log(1 - beta) (finite: 0 < beta < 1 once jsd reaches a kernel)
  A log_1mbeta;
  Divergence div;
  bool soft;          // soft_weight > 0: the teacher is read and the soft term computed
  bool hard;          // hard_weight > 0
  bool need_zh;       // hard term at T != 1: sum exp(s - ms) is needed (at T == 1 it equals za)
  bool square_h;      // need_zh at T == 2: exp(s - ms) = exp((s - ms) / 2)^2, one exp less
  bool need_cx;       // kl / ce: the cross term sum p (b - a) (relative to the maxima)
  bool need_ch;       // ce: the teacher entropy term
  bool need_cr;       // reverse_kl: the cross term sum q (a - b)
  bool need_hq;       // return_entropy: the student's sum q (a - max a)
  LogitMap<A> map_s;  // the student's transform (map_s.on: not the identity)
  LogitMap<A> map_t;  // the teacher's
  bool mix;           // jsd / tvd: the mix sweep
  bool want_gs;       // grad_student requested
  bool want_gt;       // grad_teacher requested and the soft term on
  bool zero_gt;       // grad_teacher requested, soft term off: exact zeros
};

// The ONE derivation of the per-call switches (every backend calls it).
template <typename A>
inline RowConfig<A> make_row_config(const KDParams& p) {
  RowConfig<A> c;
  c.inv_t = static_cast<A>(p.inv_temperature);
  c.inv_t_l2e = static_cast<A>(p.inv_temperature * kLog2e);
  c.temperature = static_cast<A>(p.temperature);
  c.soft_weight = static_cast<A>(p.soft_weight);
  c.hard_weight = static_cast<A>(p.hard_weight);
  c.beta = static_cast<A>(p.beta);
  c.log_beta = static_cast<A>(std::log(p.beta));
  c.log_1mbeta = static_cast<A>(std::log1p(-p.beta));
  c.div = p.divergence;
  c.soft = p.soft_weight > 0;
  c.hard = p.hard_weight > 0;
  c.need_zh = c.hard && p.temperature != 1.0;
  c.square_h = c.need_zh && p.temperature == 2.0;
  c.need_cx = c.soft && (c.div == Divergence::KL || c.div == Divergence::CE);
  c.need_ch = c.soft && c.div == Divergence::CE;
  c.need_cr = c.soft && c.div == Divergence::ReverseKL;
  c.need_hq = p.return_entropy;
  c.map_s = make_logit_map<A>(p.student_scale, p.student_softcap);
  c.map_t = make_logit_map<A>(p.teacher_scale, p.teacher_softcap);
  c.mix = c.soft && (c.div == Divergence::JSD || c.div == Divergence::TVD);
  c.want_gs = p.grad_student != nullptr;
  c.want_gt = p.grad_teacher != nullptr && c.soft;
  c.zero_gt = p.grad_teacher != nullptr && !c.soft;
  return c;
}

// Which divergences a compiled kernel handles. The CPU kernels handle Any. The CUDA kernels are
// compiled once per family: each family's switches that are constant within it become
// compile-time constants (specialise), and the other family's code and state (the cr term, the
// jsd case of grad_at, ...) is compiled out -- with it in, the kl kernels spilled registers at
// their budget (ptxas -v, sm_90, 16-bit pairs).
enum class DivFamily { Any, Plain /* kl, ce */, Other /* reverse_kl, jsd, tvd */ };

inline DivFamily family_of(Divergence d) {
  return (d == Divergence::KL || d == Divergence::CE) ? DivFamily::Plain : DivFamily::Other;
}

template <DivFamily F, typename A>
KD_HD RowConfig<A> specialise(RowConfig<A> c) {
  if constexpr (F == DivFamily::Plain) {
    c.need_cr = false;
    c.mix = false;
  } else if constexpr (F == DivFamily::Other) {
    c.need_cx = false;
    c.need_ch = false;
  }
  return c;
}

// ------------------------------------------------------------------------------------------------
// Sweep 1: statistics
// ------------------------------------------------------------------------------------------------

// Partial statistics of a set of columns of one row. The empty state has maxima -inf, sums 0.
// (Also instantiated on at::vec vectors by the CPU kernel for its lane-wise sums; maxima unused.)
template <typename A>
struct RowState {
  A ms;  // max student logit (raw units)
  A za;  // sum exp((s - ms) / T)
  A zh;  // sum exp(s - ms)                                            (need_zh)
  A mt;  // max teacher logit (raw units)                              (soft)
  A zb;  // sum exp((t - mt) / T)                                       (soft)
  A cx;  // sum eb ((t - mt) - (s - ms)) / T  = zb (KL + log zb - log za)  (need_cx)
  A ch;  // sum eb (t - mt) / T                                         (need_ch)
  A cr;  // sum ea ((s - ms) - (t - mt)) / T  = za (R + log za - log zb)   (need_cr)
  A hq;  // sum ea (s - ms) / T               = za (log za - H(q))        (need_hq)

  KD_HD static RowState empty();
};

// The ONE list of RowState's fields. for_each_sum(f, st...) calls f(st.za...), f(st.zh...), ...:
// each sum of exponentials in turn, the same field of every state given; for_each_field the maxima
// too. Every per-field operation is written with them (the merge below, the CUDA kernels' warp
// shuffles, the CPU kernel's vector sums, the record sizes of the vocabulary-parallel steps), so a
// new field is added here and in the struct, and nowhere else (kRowStateFields checks the two).
template <typename F, typename... St>
KD_HD constexpr void for_each_sum(F&& f, St&... st) {
  f(st.za...);
  f(st.zh...);
  f(st.zb...);
  f(st.cx...);
  f(st.ch...);
  f(st.cr...);
  f(st.hq...);
}

template <typename F, typename... St>
KD_HD constexpr void for_each_field(F&& f, St&... st) {
  f(st.ms...);
  f(st.mt...);
  for_each_sum(f, st...);
}

template <typename A>
KD_HD RowState<A> RowState<A>::empty() {
  RowState st;
  st.ms = -kd_inf<A>();
  st.mt = -kd_inf<A>();
  for_each_sum([](A& x) { x = A(0); }, st);
  return st;
}

constexpr int kRowStateFields = [] {
  int n = 0;
  RowState<float> st{};
  for_each_field([&n](float&) { ++n; }, st);
  return n;
}();
static_assert(sizeof(RowState<float>) == kRowStateFields * sizeof(float) &&
                  sizeof(RowState<double>) == kRowStateFields * sizeof(double),
              "every field of RowState is in for_each_field");

// exp((m_old - m_new) * scale) for a maximum that moves from m_old to m_new >= m_old.
// Why the guard: an empty state has m_old = -inf; if m_new is -inf too (nothing but -inf seen yet)
// then -inf - -inf = NaN. The sums of an empty state are 0, so any finite factor is right: use 1.
template <typename A>
KD_HD A rescale_factor(A m_old, A m_new, A scale) {
  return (m_old == m_new) ? A(1) : kd_exp((m_old - m_new) * scale);
}

// Moves a state to larger maxima (ms_new >= st.ms, mt_new >= st.mt), keeping what it represents.
// The cross terms hold differences to the maxima, so they shift as the maxima move:
// (x - m_new) = (x - m_old) - (m_new - m_old). Every shift is guarded by the mass of its weights
// (zb > 0 for cx/ch, za > 0 for cr): without mass the term is 0, and the shift of an empty state
// (m_old = -inf) would be inf * 0 = NaN.
template <typename A>
KD_HD void rescale(RowState<A>& st, A ms_new, A mt_new, const RowConfig<A>& c) {
  if (ms_new != st.ms) {
    const A alpha = rescale_factor(st.ms, ms_new, c.inv_t);
    const A d = (ms_new - st.ms) * c.inv_t;
    // -(s - ms_new) = -(s - ms_old) + d. If ms_old is -inf while the teacher has mass, cx is
    // already +inf (a masked student under teacher mass) and stays +inf.
    if (c.need_cx && st.zb > A(0)) st.cx += d * st.zb;
    if (c.need_cr && st.za > A(0)) st.cr = alpha * (st.cr - d * st.za);
    // Why (alpha d) za and not cr's alpha (hq - d za): the same d * za in both would be computed
    // once for both (a runtime switch each), which stops the compiler from fusing cr's
    // multiply-subtract and changes reverse_kl's results by an ulp on FMA machines.
    if (c.need_hq && st.za > A(0)) st.hq = alpha * st.hq - (alpha * d) * st.za;
    st.za *= alpha;
    if (c.need_zh) st.zh *= rescale_factor(st.ms, ms_new, A(1));
    st.ms = ms_new;
  }
  if (c.soft && mt_new != st.mt) {
    const A alpha = rescale_factor(st.mt, mt_new, c.inv_t);
    const A d = (mt_new - st.mt) * c.inv_t;
    if (st.zb > A(0)) {
      if (c.need_cx) st.cx = alpha * (st.cx - d * st.zb);
      if (c.need_ch) st.ch = alpha * (st.ch - d * st.zb);
    }
    if (c.need_cr && st.za > A(0)) st.cr += d * st.za;
    st.zb *= alpha;
    st.mt = mt_new;
  }
}

// Adds one element (or, on the CPU, one vector of elements) at FIXED maxima: ds = s - ms and
// dt = t - mt are its differences to them (-inf for a masked logit). St is RowState<A> or a
// struct of vector sums with the same field names. Returns the element's exponentials
// ea = exp(ds/T), eb = exp(dt/T), eh = exp(ds) for a caller that keeps them.
template <typename X, typename St, typename A>
KD_HD void accumulate_at(St& st, X ds, X dt, const RowConfig<A>& c, X& ea, X& eb, X& eh) {
  using E = Ew<X>;
  const X zero = E::splat(A(0));
  const X inv_t = E::splat(c.inv_t);
  // The tempered differences, the exponentials' arguments; the cross terms' differences are taken
  // from them (xb - xa; the same as (dt - ds) / T at T = 1 and 2, within an ulp otherwise).
  const X xa = ds * inv_t;
  ea = E::exp(xa);
  st.za += ea;
  // Where q has mass only: a masked student (ds = -inf) would add 0 * -inf = NaN.
  if (c.need_hq) st.hq += E::where(E::gt(ea, zero), ea * xa, zero);
  eh = ea;
  if (c.need_zh) {
    // At T = 2 (the most common distillation temperature) exp(s - m) = exp((s - m)/2)^2: one
    // multiply instead of an exp, at twice the (tiny) relative error of ea.
    eh = c.square_h ? ea * ea : E::exp(ds);
    st.zh += eh;
  }
  eb = zero;
  if (c.soft) {
    const X xb = dt * inv_t;
    eb = E::exp(xb);
    st.zb += eb;
    // Only where the weight has mass: a masked teacher (-inf) has dt = -inf and 0 * -inf = NaN.
    // A masked student under teacher mass gives (dt - ds) = +inf: KL = +inf, as the maths says
    // (and symmetrically for cr).
    if (c.need_cx) {
      const auto mass = E::gt(eb, zero);
      st.cx += E::where(mass, eb * (xb - xa), zero);
      if (c.need_ch) st.ch += E::where(mass, eb * xb, zero);
    }
    if (c.need_cr) st.cr += E::where(E::gt(ea, zero), ea * (xa - xb), zero);
  }
}

// One element against a state's maxima (which must not be below the element's logits).
template <typename A>
KD_HD void accumulate(RowState<A>& st, A s, A t, const RowConfig<A>& c) {
  // If a maximum is still -inf, everything so far is -inf and s - m would be NaN: use -inf (the
  // element's exp is 0, the state stays empty on that side).
  const A ds = (st.ms == -kd_inf<A>()) ? -kd_inf<A>() : s - st.ms;
  const A dt = (!c.soft || st.mt == -kd_inf<A>()) ? -kd_inf<A>() : t - st.mt;
  A ea, eb, eh;
  accumulate_at(st, ds, dt, c, ea, eb, eh);
}

// Online form of accumulate: raises the maxima first when needed.
template <typename A>
KD_HD void push(RowState<A>& st, A s, A t, const RowConfig<A>& c) {
  rescale(st, kd_max(st.ms, s), c.soft ? kd_max(st.mt, t) : st.mt, c);
  accumulate(st, s, t, c);
}

// W elements at once: rescale once to the vector's maxima, then accumulate each element.
// Why fmax (one instruction) and not the NaN-propagating kd_max inside the vector: a NaN element
// still poisons the row through accumulate() (s - ms = NaN gives a NaN exponential in za or zb,
// hence a NaN loss and NaN gradients). Across vectors (the state's maxima) kd_max is kept.
template <typename A, int W>
KD_HD void push_vec(RowState<A>& st, const A (&s)[W], const A (&t)[W], const RowConfig<A>& c) {
  A vms = s[0];
  A vmt = t[0];
  KD_UNROLL
  for (int i = 1; i < W; ++i) {
    vms = kd_fmax(vms, s[i]);
    vmt = kd_fmax(vmt, t[i]);
  }
  rescale(st, kd_max(st.ms, vms), c.soft ? kd_max(st.mt, vmt) : st.mt, c);
  KD_UNROLL
  for (int i = 0; i < W; ++i) accumulate(st, s[i], t[i], c);
}

// Combines two partial states of the same row (associative up to rounding; kernels merge in a
// fixed order so that results are bitwise reproducible).
template <typename A>
KD_HD RowState<A> merge(RowState<A> x, RowState<A> y, const RowConfig<A>& c) {
  const A ms = kd_max(x.ms, y.ms);
  const A mt = kd_max(x.mt, y.mt);
  rescale(x, ms, mt, c);
  rescale(y, ms, mt, c);
  for_each_sum([](A& a, const A& b) { a += b; }, x, y);
  return x;
}

// ------------------------------------------------------------------------------------------------
// The row's results
// ------------------------------------------------------------------------------------------------

// Per-row results and the constants of the gradient (and mix) sweeps.
template <typename A>
struct RowResult {
  A loss;            // weighted row loss (complete after finalize_mix for jsd / tvd)
  A ms, mt;          // maxima (raw units)
  A log_za, log_zb;  // log of the tempered sums
  A fa, fb, fh;      // 1/za, 1/zb, 1/zh: probabilities are exponentials times these
  A ks;              // soft_weight * T * grad_scale (0 when the soft term is off)
  A kh;              // hard_weight * grad_scale     (0 when the hard term is off)
  A entropy;         // the student's tempered entropy (need_hq; else 0)
  A k1, k2;          // per divergence:  kl  k1 = log za - log zb - KL
                     //                  ce  k1 = CE - log za
                     //          reverse_kl  k1 = log zb - log za - R
                     //                 jsd  k1 = KL(q || m), k2 = KL(p || m)
                     //                 tvd  k1 = sum q g,    k2 = sum p g
};

// Finishes a row's statistics. s_label: the student logit at the label (hard term only).
template <typename A>
KD_HD RowResult<A> finalize(const RowState<A>& st, const RowConfig<A>& c, A s_label, A grad_scale) {
  RowResult<A> r;
  r.ms = st.ms;
  r.mt = st.mt;
  r.log_za = kd_log(st.za);
  r.log_zb = c.soft ? kd_log(st.zb) : A(0);
  r.fa = A(1) / st.za;
  r.fb = c.soft ? A(1) / st.zb : A(0);
  r.fh = c.need_zh ? A(1) / st.zh : r.fa;
  r.loss = A(0);
  r.ks = A(0);
  r.kh = A(0);
  r.k1 = A(0);
  r.k2 = A(0);
  // H(q) = -sum q log q, log q = (s - ms)/T - log za.
  r.entropy = c.need_hq ? r.log_za - st.hq / st.za : A(0);
  if (c.soft) {
    A div = A(0);
    if (c.need_cx) {
      // log p - log q = ((t - mt) - (s - ms))/T - log zb + log za
      const A kl = st.cx / st.zb - r.log_zb + r.log_za;
      div = kl;
      r.k1 = r.log_za - r.log_zb - kl;
      if (c.need_ch) {
        div = kl + (r.log_zb - st.ch / st.zb);  // H(p) = log zb - sum p (b - max b)
        r.k1 = div - r.log_za;
      }
    } else if (c.need_cr) {
      const A rkl = st.cr / st.za - r.log_za + r.log_zb;
      div = rkl;
      r.k1 = r.log_zb - r.log_za - rkl;
    }
    r.loss = c.soft_weight * c.temperature * c.temperature * div;  // jsd / tvd: finalize_mix
    r.ks = c.soft_weight * c.temperature * grad_scale;
  }
  if (c.hard) {
    // LSE(s) - s_y = log zh - (s_y - ms)
    const A log_zh = c.need_zh ? kd_log(st.zh) : r.log_za;
    r.loss += c.hard_weight * (log_zh - (s_label - st.ms));
    r.kh = c.hard_weight * grad_scale;
  }
  return r;
}

// Probabilities of one element from its differences to the row's maxima (ds = s - ms,
// dt = t - mt): q, p tempered, h = softmax(s)_i at T = 1. The exp's argument stays near 0 for
// the large probabilities (the fast device exp's error grows with |argument|) and the reciprocals
// are per row. An all -inf row has ms = -inf: ds = NaN and so is everything (no distribution).
template <typename A>
KD_HD void probs_at(const RowResult<A>& r, const RowConfig<A>& c, A ds, A dt, A& q, A& p, A& h) {
  const A e = kd_exp_scaled(ds, c.inv_t, c.inv_t_l2e);
  q = e * r.fa;
  p = c.soft ? kd_exp_scaled(dt, c.inv_t, c.inv_t_l2e) * r.fb : A(0);
  h = A(0);
  if (c.hard) {
    h = !c.need_zh
            ? q
            : (c.square_h ? e * e * r.fh : kd_exp_scaled(ds, A(1), static_cast<A>(kLog2e)) * r.fh);
  }
}

// ------------------------------------------------------------------------------------------------
// Sweep 2 (jsd, tvd): row sums over the normalised distributions
// ------------------------------------------------------------------------------------------------
template <typename X>
struct MixSums {
  X a;  // jsd: KL(q || m) = sum q log(q / m)     tvd: sum |p - q|
  X b;  // jsd: KL(p || m) = sum p log(p / m)     tvd: sum q g
  X c;  //                                       tvd: sum p g
};

// The ONE list of MixSums' fields (as for_each_field for RowState).
template <typename F, typename... M>
KD_HD constexpr void for_each_mix(F&& f, M&... m) {
  f(m.a...);
  f(m.b...);
  f(m.c...);
}

constexpr int kMixSumsFields = [] {
  int n = 0;
  MixSums<float> m{};
  for_each_mix([&n](float&) { ++n; }, m);
  return n;
}();

template <typename X>
KD_HD MixSums<X> mix_zero() {
  MixSums<X> m;
  for_each_mix([](X& x) { x = Ew<X>::splat(0); }, m);
  return m;
}

// log(q / m) and log(p / m) for jsd. log q and log p come from the differences to the maxima
// (exact in the log domain even where q underflows); only log m needs a log per element. Why the
// max: m >= (1 - beta) q and m >= beta p, but the product (1 - beta) q of a denormal q can round
// to 0 (log m = -inf, log(q / m) = +inf); the log-domain bounds keep both ratios finite,
// log(q / m) <= -log(1 - beta) and log(p / m) <= -log(beta), as they are exactly.
template <typename X, typename A>
KD_HD void jsd_logs(const RowResult<A>& r, const RowConfig<A>& c, X ds, X dt, X q, X p, X& lqm,
                    X& lpm) {
  using E = Ew<X>;
  const X inv_t = E::splat(c.inv_t);
  const X lq = ds * inv_t - E::splat(r.log_za);
  const X lp = dt * inv_t - E::splat(r.log_zb);
  X lm = E::log(E::splat(c.beta) * p + E::splat(A(1) - c.beta) * q);
  lm = E::max(lm, E::max(lq + E::splat(c.log_1mbeta), lp + E::splat(c.log_beta)));
  lqm = lq - lm;
  lpm = lp - lm;
}

// 0.5 sign(q - p) (0 where equal: the subgradient of |.| at 0).
template <typename X>
KD_HD X tvd_sign(X q, X p) {
  using E = Ew<X>;
  const X half = E::splat(0.5);
  const X zero = E::splat(0);
  return E::where(E::gt(q, p), half, E::where(E::gt(p, q), zero - half, zero));
}

template <typename X, typename A>
KD_HD void mix_at(MixSums<X>& mx, const RowResult<A>& r, const RowConfig<A>& c, X ds, X dt, X q,
                  X p) {
  using E = Ew<X>;
  const X zero = E::splat(0);
  if (c.div == Divergence::JSD) {
    X lqm, lpm;
    jsd_logs(r, c, ds, dt, q, p, lqm, lpm);
    // Terms without mass are 0 by definition (never 0 * -inf); a NaN q or p (a row without a
    // distribution) stays NaN.
    mx.a += E::where(E::eq(q, zero), zero, q * lqm);
    mx.b += E::where(E::eq(p, zero), zero, p * lpm);
  } else {
    const X g = tvd_sign(q, p);
    mx.a += E::abs(q - p);
    mx.b += q * g;
    mx.c += p * g;
  }
}

template <typename A>
KD_HD MixSums<A> mix_add(MixSums<A> x, const MixSums<A>& y) {
  for_each_mix([](A& a, const A& b) { a += b; }, x, y);
  return x;
}

// Completes the loss and gradient constants of a jsd / tvd row from its mix sums.
template <typename A>
KD_HD void finalize_mix(RowResult<A>& r, const MixSums<A>& mx, const RowConfig<A>& c) {
  A div;
  if (c.div == Divergence::JSD) {
    div = c.beta * mx.b + (A(1) - c.beta) * mx.a;
    r.k1 = mx.a;
    r.k2 = mx.b;
  } else {
    div = A(0.5) * mx.a;
    r.k1 = mx.b;
    r.k2 = mx.c;
  }
  r.loss += c.soft_weight * c.temperature * c.temperature * div;
}

// ------------------------------------------------------------------------------------------------
// Vocabulary-parallel records: a row's columns split over processes (kd_vocab_parallel.cpp). Each
// process runs the sweeps on its slice; the records below are what they exchange.
// ------------------------------------------------------------------------------------------------

// One slice's statistics of one row, and the student logit at the row's label when the label is
// in the slice (else 0: summed over the slices, exactly the label's logit).
template <typename A>
struct SliceStats {
  RowState<A> st;
  A s_label;
};

// The constants of a whole row for the mix and gradient sweeps (the CPU kernel's per-row record).
template <typename A>
struct RowFinal {
  RowResult<A> res;
  A log_zh;  // log sum exp(s - ms)    (need_zh)
};

// Fields per record: the vocabulary-parallel steps exchange the records as [n_rows, fields]
// tensors of the accumulation type, so no record may have padding.
constexpr int kSliceStatsFields = kRowStateFields + 1;  // + s_label
constexpr int kRowFinalFields = 14;                     // RowResult's 13 + log_zh
static_assert(sizeof(SliceStats<float>) == kSliceStatsFields * sizeof(float) &&
                  sizeof(SliceStats<double>) == kSliceStatsFields * sizeof(double),
              "SliceStats layout");
static_assert(sizeof(RowFinal<float>) == kRowFinalFields * sizeof(float) &&
                  sizeof(RowFinal<double>) == kRowFinalFields * sizeof(double),
              "RowFinal layout");
static_assert(sizeof(MixSums<float>) == kMixSumsFields * sizeof(float) &&
                  sizeof(MixSums<double>) == kMixSumsFields * sizeof(double),
              "MixSums layout");

template <typename A>
KD_HD RowFinal<A> finalize_row_final(const RowState<A>& st, const RowConfig<A>& c, A s_label,
                                     A grad_scale) {
  RowFinal<A> f;
  f.res = finalize(st, c, s_label, grad_scale);
  f.log_zh = c.need_zh ? kd_log(st.zh) : A(0);
  return f;
}

// A whole row's constants from its n slices' statistics (slices[k * stride], k = 0..n-1), merged
// in slice order: every process does the same operations on the same records, so every process
// gets bitwise the same row (and loss), whatever the timing.
template <typename A>
KD_HD RowFinal<A> finalize_slices(const SliceStats<A>* slices, int64_t n, int64_t stride,
                                  const RowConfig<A>& c, A grad_scale) {
  RowState<A> st = slices[0].st;
  A s_label = slices[0].s_label;
  for (int64_t k = 1; k < n; ++k) {
    st = merge(st, slices[k * stride].st, c);
    s_label += slices[k * stride].s_label;
  }
  return finalize_row_final(st, c, s_label, grad_scale);
}

// Completes a jsd / tvd row from its n slices' mix sums, added in slice order.
template <typename A>
KD_HD void finalize_slices_mix(RowFinal<A>& f, const MixSums<A>* slices, int64_t n, int64_t stride,
                               const RowConfig<A>& c) {
  MixSums<A> mx = slices[0];
  for (int64_t k = 1; k < n; ++k) mx = mix_add(mx, slices[k * stride]);
  finalize_mix(f.res, mx, c);
}

// ------------------------------------------------------------------------------------------------
// Sweep 3: gradients of one element
// ------------------------------------------------------------------------------------------------

// Gradient of the row loss w.r.t. the student and teacher logits of one element, from its
// differences to the maxima and its probabilities (see probs_at). The hard term's -kh at the label
// is left to the caller (one element per row). A p (q) without mass gives an exact 0 where a log
// of it would meet 0 * -inf; a NaN p or q stays NaN. F compiles the other family's cases out.
template <DivFamily F = DivFamily::Any, typename X, typename A>
KD_HD void grad_at(const RowResult<A>& r, const RowConfig<A>& c, X ds, X dt, X q, X p, X h, X& gs,
                   X& gt) {
  using E = Ew<X>;
  const X zero = E::splat(0);
  const X ks = E::splat(r.ks);
  const X inv_t = E::splat(c.inv_t);
  gs = zero;
  gt = zero;
  if (c.soft) {
    switch (c.div) {
      case Divergence::KL:
        if constexpr (F != DivFamily::Other) {
          gs = ks * (q - p);
          gt = E::where(E::eq(p, zero), zero, ks * p * ((dt - ds) * inv_t + E::splat(r.k1)));
        }
        break;
      case Divergence::CE:
        if constexpr (F != DivFamily::Other) {
          gs = ks * (q - p);
          gt = E::where(E::eq(p, zero), zero, zero - ks * p * (ds * inv_t + E::splat(r.k1)));
        }
        break;
      case Divergence::ReverseKL:
        if constexpr (F != DivFamily::Plain) {
          gs = E::where(E::eq(q, zero), zero, ks * q * ((ds - dt) * inv_t + E::splat(r.k1)));
          gt = ks * (p - q);
        }
        break;
      case Divergence::JSD:
        if constexpr (F != DivFamily::Plain) {
          X lqm, lpm;
          jsd_logs(r, c, ds, dt, q, p, lqm, lpm);
          gs = E::where(E::eq(q, zero), zero,
                        E::splat(r.ks * (A(1) - c.beta)) * q * (lqm - E::splat(r.k1)));
          gt = E::where(E::eq(p, zero), zero, E::splat(r.ks * c.beta) * p * (lpm - E::splat(r.k2)));
        }
        break;
      case Divergence::TVD:
        if constexpr (F != DivFamily::Plain) {
          const X g = tvd_sign(q, p);
          gs = ks * q * (g - E::splat(r.k1));
          gt = ks * p * (E::splat(r.k2) - g);
        }
        break;
    }
  }
  if (c.hard) gs = gs + E::splat(r.kh) * h;
}

}  // namespace kdfused
