// kd_math.h -- the numerically delicate part of kdfused, shared by the CPU and the CUDA kernels.
//
// One row (T = temperature, a = s/T, b = t/T):
//   log q = a - LSE(a)      log p = b - LSE(b)      (student, teacher tempered log-probabilities)
//   KL    = sum p (log p - log q)                   CE = -sum p log q = KL + H(p)
//   hard  = LSE(s) - s_y                                               (T = 1)
//   row   = soft_weight * T^2 * (KL or CE) + hard_weight * hard
// Gradients (of row):
//   d/ds_i = soft_weight * T * (q_i - p_i) + hard_weight * (softmax(s)_i - [i == y])
//   d/dt_i = soft_weight * T * p_i * (log p_i - log q_i - KL)          (KL)
//          = -soft_weight * T * p_i * (log q_i + CE)                    (CE)
//
// Everything a row needs is gathered in one read as a RowState: running maxima of the raw logits
// and sums of exponentials relative to them. Maxima are kept in *raw logit units* (max s, max t),
// not tempered ones, and every per-element quantity is formed from differences to them:
// (s - max s) is exact for nearby values (Sterbenz) and multiplying by 1/T afterwards loses
// nothing, whereas s/T - max(s/T), or KL written as sum p (b - a) - (LSE(b) - LSE(a)), cancels
// large rounded numbers (a teacher offset by 1e4 at T = 0.05 would lose the second decimal). Partial states of any two pieces of a row combine with
// merge(); the CPU kernel merges chunks of a row, the CUDA kernel threads, warps and CTAs, so the
// CPU tests cover this code for both.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__)
#define KD_HD __host__ __device__ __forceinline__
#else
#define KD_HD inline
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
  // terms that matter have |x| of a few units. Why not expf: the fused kernel does up to 5 exps
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
template <typename A>
KD_HD A kd_max(A x, A y) {
  // NaN-propagating: a NaN logit must poison the row, not vanish into a max.
  return (x != x || x > y) ? x : y;
}

// What a kernel needs to know to accumulate a row (constant across rows).
template <typename A>
struct RowConfig {
  A inv_t;        // 1 / T
  bool soft;      // soft_weight > 0: teacher statistics are needed
  bool need_zh;   // hard term on and T != 1: sum exp(s - ms) is needed (at T == 1 it equals za)
  bool need_ch;   // divergence CE: teacher entropy term is needed
};

// Partial statistics of a set of columns of one row. The empty state has maxima -inf and zero sums.
template <typename A>
struct RowState {
  A ms;  // max student logit (raw units)
  A za;  // sum exp((s - ms) / T)
  A zh;  // sum exp(s - ms)                                  (need_zh)
  A mt;  // max teacher logit (raw units)                    (soft)
  A zb;  // sum exp((t - mt) / T)                             (soft)
  A cx;  // sum exp((t - mt) / T) * ((t - mt) - (s - ms)) / T = zb * (KL + log zb - log za)  (soft)
  A ch;  // sum exp((t - mt) / T) * (t - mt) / T   = zb * sum p (b - max b)  (need_ch)

  KD_HD static RowState empty() {
    RowState st;
    st.ms = -kd_inf<A>();
    st.mt = -kd_inf<A>();
    st.za = st.zh = st.zb = st.cx = st.ch = A(0);
    return st;
  }
};

// exp((m_old - m_new) * scale) for a maximum that moves from m_old to m_new >= m_old.
// Why the guard: an empty state has m_old = -inf; if m_new is -inf too (nothing but -inf seen yet)
// then -inf - -inf = NaN. The sums of an empty state are 0, so any finite factor is right: use 1.
template <typename A>
KD_HD A rescale_factor(A m_old, A m_new, A scale) {
  return (m_old == m_new) ? A(1) : kd_exp((m_old - m_new) * scale);
}

// Moves a state to larger maxima (ms_new >= st.ms, mt_new >= st.mt), keeping what it represents.
// The cross and entropy terms hold differences to the maxima, so they shift as the maxima move:
// (x - m_new) = (x - m_old) - (m_new - m_old). Every shift is guarded by zb > 0: with no teacher
// mass the terms are 0, and the shift of an empty state (m_old = -inf) would be inf * 0 = NaN.
template <typename A>
KD_HD void rescale(RowState<A>& st, A ms_new, A mt_new, const RowConfig<A>& cfg) {
  if (ms_new != st.ms) {
    st.za *= rescale_factor(st.ms, ms_new, cfg.inv_t);
    if (cfg.need_zh) st.zh *= rescale_factor(st.ms, ms_new, A(1));
    // -(s - ms_new) = -(s - ms_old) + (ms_new - ms_old). If ms_old is -inf while the teacher has
    // mass, cx is already +inf (a masked student under teacher mass) and stays +inf.
    if (cfg.soft && st.zb > A(0)) st.cx += (ms_new - st.ms) * cfg.inv_t * st.zb;
    st.ms = ms_new;
  }
  if (cfg.soft && mt_new != st.mt) {
    const A alpha = rescale_factor(st.mt, mt_new, cfg.inv_t);
    if (st.zb > A(0)) {
      const A shift = (mt_new - st.mt) * cfg.inv_t * st.zb;
      st.cx = alpha * (st.cx - shift);
      if (cfg.need_ch) st.ch = alpha * (st.ch - shift);
    }
    st.zb *= alpha;
    st.mt = mt_new;
  }
}

// Adds one element whose logits do not exceed the state's maxima (the caller rescales first).
// ea, eb, eh are the element's exponentials relative to the state's maxima, returned so that a
// caller can keep them for the gradient sweep.
template <typename A>
KD_HD void accumulate(RowState<A>& st, A s, A t, const RowConfig<A>& cfg, A& ea, A& eb, A& eh) {
  // s == -inf (masked student) with ms finite gives exp(-inf) = 0. If ms is -inf too, the whole
  // row so far is -inf and s - ms is NaN: use 0 (the state still says "empty").
  const A ds = (st.ms == -kd_inf<A>()) ? -kd_inf<A>() : s - st.ms;
  ea = kd_exp(ds * cfg.inv_t);
  st.za += ea;
  if (cfg.need_zh) {
    eh = kd_exp(ds);
    st.zh += eh;
  } else {
    eh = ea;
  }
  if (cfg.soft) {
    const A dt = (st.mt == -kd_inf<A>()) ? -kd_inf<A>() : t - st.mt;
    eb = kd_exp(dt * cfg.inv_t);
    st.zb += eb;
    // A teacher without mass here (eb == 0, e.g. a masked -inf logit) contributes nothing: its
    // dt is -inf and 0 * -inf would be NaN. A student -inf under teacher mass gives ds = -inf,
    // dt - ds = +inf and KL = +inf, as the maths says.
    if (eb > A(0)) {
      st.cx += eb * ((dt - ds) * cfg.inv_t);
      if (cfg.need_ch) st.ch += eb * (dt * cfg.inv_t);
    }
  } else {
    eb = A(0);
  }
}

// Online form of accumulate: raises the maxima first when needed. Costs up to two extra exps when
// a maximum moves; kernels that process a vector of elements rescale once per vector instead.
template <typename A>
KD_HD void push(RowState<A>& st, A s, A t, const RowConfig<A>& cfg) {
  const A ms = kd_max(st.ms, s);
  const A mt = cfg.soft ? kd_max(st.mt, t) : st.mt;
  rescale(st, ms, mt, cfg);
  A ea, eb, eh;
  accumulate(st, s, t, cfg, ea, eb, eh);
}

// Combines two partial states of the same row (associative up to rounding; kernels merge in a
// fixed order so that results are bitwise reproducible).
template <typename A>
KD_HD RowState<A> merge(RowState<A> x, RowState<A> y, const RowConfig<A>& cfg) {
  const A ms = kd_max(x.ms, y.ms);
  const A mt = kd_max(x.mt, y.mt);
  rescale(x, ms, mt, cfg);
  rescale(y, ms, mt, cfg);
  x.za += y.za;
  x.zh += y.zh;
  x.zb += y.zb;
  x.cx += y.cx;
  x.ch += y.ch;
  return x;
}

// Per-row results and the coefficients of the gradient sweep.
template <typename A>
struct RowResult {
  A loss;    // weighted row loss (0 for an ignored row)
  bool valid;
  // Gradient sweep (already multiplied by the reduction's gradient scale):
  A ms, mt;          // maxima (raw units)
  A log_za, log_zb;  // log of the tempered sums
  A log_zh;          // log sum exp(s - ms)
  A ks;              // soft_weight * T * grad_scale     (0 when the soft term is off or row ignored)
  A kh;              // hard_weight * grad_scale          (0 when the hard term is off or row ignored)
  A kt_off;          // teacher-gradient offset: KL: log za - log zb - KL;  CE: CE - log za
};

// Finishes a row. s_label is the student logit at the label (ignored unless the hard term is on).
template <typename A>
KD_HD RowResult<A> finalize(const RowState<A>& st, const RowConfig<A>& cfg, bool valid, A s_label,
                            A soft_weight, A hard_weight, A temperature, bool ce_divergence,
                            A grad_scale) {
  RowResult<A> r;
  r.valid = valid;
  r.ms = st.ms;
  r.mt = st.mt;
  r.log_za = kd_log(st.za);
  r.log_zb = cfg.soft ? kd_log(st.zb) : A(0);
  r.log_zh = cfg.need_zh ? kd_log(st.zh) : r.log_za;
  r.loss = A(0);
  r.ks = A(0);
  r.kh = A(0);
  r.kt_off = A(0);
  if (!valid) return r;
  if (cfg.soft) {
    // KL = sum p (log p - log q), log p - log q = ((t - mt) - (s - ms))/T - log zb + log za.
    const A kl = st.cx / st.zb - r.log_zb + r.log_za;
    A div = kl;
    if (ce_divergence) {
      // H(p) = log zb - sum p (b - max b)
      div = kl + (r.log_zb - st.ch / st.zb);
      r.kt_off = div - r.log_za;
    } else {
      r.kt_off = r.log_za - r.log_zb - kl;
    }
    r.loss += soft_weight * temperature * temperature * div;
    r.ks = soft_weight * temperature * grad_scale;
  }
  if (hard_weight > A(0)) {
    // LSE(s) - s_y = log zh - (s_y - ms)
    r.loss += hard_weight * (r.log_zh - (s_label - st.ms));
    r.kh = hard_weight * grad_scale;
  }
  return r;
}

// Tempered probabilities of one element from its logits (kernels that do not keep exponentials).
// The -inf guard mirrors accumulate(): a row whose maximum is -inf has no distribution (NaN).
template <typename A>
KD_HD A student_prob(const RowResult<A>& r, A s, A inv_t) {
  return kd_exp((s - r.ms) * inv_t - r.log_za);
}
template <typename A>
KD_HD A student_prob_t1(const RowResult<A>& r, A s) {
  return kd_exp((s - r.ms) - r.log_zh);
}
template <typename A>
KD_HD A teacher_prob(const RowResult<A>& r, A t, A inv_t) {
  return kd_exp((t - r.mt) * inv_t - r.log_zb);
}

// Gradient of the row loss w.r.t. student logit i from the probabilities q (tempered student),
// p (tempered teacher) and h (softmax(s), T = 1).
template <typename A>
KD_HD A grad_student(const RowResult<A>& r, A q, A p, A h, bool is_label) {
  return r.ks * (q - p) + r.kh * (is_label ? h - A(1) : h);
}

// Gradient of the row loss w.r.t. teacher logit i; p is the tempered teacher probability.
template <typename A>
KD_HD A grad_teacher(const RowResult<A>& r, A s, A t, A p, bool ce_divergence, A inv_t) {
  // No teacher mass, no gradient: p == 0 would otherwise meet a -inf log p (0 * -inf = NaN).
  if (!(p > A(0))) return (p == A(0)) ? A(0) : p;
  if (ce_divergence) {
    // -T sw p (log q + CE),  log q = (s - ms)/T - log za
    return -r.ks * p * ((s - r.ms) * inv_t + r.kt_off);
  }
  // T sw p (log p - log q - KL),  log p - log q = ((t - mt) - (s - ms))/T - log zb + log za
  return r.ks * p * (((t - r.mt) - (s - r.ms)) * inv_t + r.kt_off);
}

}  // namespace kdfused
