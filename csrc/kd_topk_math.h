// kd_topk_math.h -- the per-row maths of the top-k distillation loss, shared by the CPU and the
// CUDA kernels (exp, log, maxima, rescale_factor, tvd_sign and KD_HD come from kd_math.h).
//
// One row: student logits z (V entries, after the student's transform), the teacher's k stored
// entries (index i_j, value v_j), temperature T. An entry is VALID when v_j != -inf; the others
// are padding, outside the support on both sides (their indices are never used).
//
// Log-probabilities over the support (S = the valid entries):
//   teacher, values = logits:    lp_j = (v_j - mv) / T - log sum_S exp((v - mv) / T)
//   teacher, values = logprobs:  lp_j = v_j - LSE_S(v)            (Full, Renormalized)
//                                lp_j = v_j as stored             (Tail)
//   student, Full / Tail:        lq_j = (z_{i_j} - ms) / T - log za,  za = sum_V exp((z - ms) / T)
//   student, Renormalized:       lq_j = (z_{i_j} - mk) / T - log sum_S exp((z_i - mk) / T)
//   Tail adds one bucket per side: l_tail = log(1 - exp(min(LSE_S(l), -1e-7))) (TRL's
//   _add_tail_bucket; the student's gets no gradient where the min clamps).
// with mv, ms, mk the maxima of the raw values the sums run over (differences to raw maxima, never
// LSE(x / T) itself: see kd_math.h, Numerics).
//
// Divergence over the buckets b (p = exp(lp), q = exp(lq)), D = sum_b d_b, and g_b = dD/d lq_b:
//   kl          d = p (lp - lq)                                 g = -p
//   ce          d = -p lq                                       g = -p
//   reverse_kl  d = q (lq - lp)                                 g = q (lq - lp) + q
//   jsd         d = beta p (lp - lm) + (1 - beta) q (lq - lm)   g = (1 - beta) q (lq - lm)
//               lm = log(beta p + (1 - beta) q)
//   tvd         d = 0.5 |p - q|                                 g = 0.5 sign(q - p) q
// (a term without mass is 0, never 0 * inf). Full allows kl and ce only (the others need q where
// the teacher stored nothing).
//
// Gradient, d row / d z_i with ks = soft_weight T, q_i = softmax(z / T)_i over V, G = sum_S g_j:
//   row = soft_weight T^2 D + hard_weight (LSE(z) - z_y)
//   soft part = ks (dense q_i + sum_S [i == i_j] (g_j - c exp(lq_j)))
//   Full          dense = -G,              c = 0
//   Renormalized  dense = 0,               c = G             (d lq_j / d z = ([.] - qr) / T)
//   Tail          dense = -(G - c Q),      c = g_tail / (1 - Q), Q = sum_S exp(lq_j);  c = 0
//                 where the student's min clamps
//   hard part = hard_weight (softmax(z)_i - [i == y])
// A row without a valid entry has D = 0 and no soft gradient (for Tail both sides are one bucket of
// mass 1): only its hard term counts, never NaN.
#pragma once

#include "kd_math.h"
#include "kd_topk_params.h"

namespace kdfused::topk {

// (max, sum of exp((x - max) * scale)) of a set of values; the empty set is (-inf, 0).
template <typename A>
struct MaxSum {
  A m;
  A z;
};

// Combines two partial states (kernels merge in a fixed order: bitwise reproducible). A NaN
// maximum gives NaN (a NaN logit poisons the row); kd_math.h rescale_factor guards -inf maxima.
template <typename A>
KD_HD MaxSum<A> merge(const MaxSum<A>& x, const MaxSum<A>& y, A scale) {
  const A m = kd_max(x.m, y.m);
  return {m, x.z * rescale_factor(x.m, m, scale) + y.z * rescale_factor(y.m, m, scale)};
}

// A single element as a (max, sum) state: a -inf element has no mass (sum 0), so that folding it
// into an empty state does not count it.
template <typename A>
KD_HD MaxSum<A> element(A x) {
  return {x, x == -kd_inf<A>() ? A(0) : A(1)};
}

// x - m for a value x under the maximum m of its set, with an all -inf set (m = -inf) giving -inf
// (so that exp gives 0), not NaN.
template <typename A>
KD_HD A below_max(A x, A m) {
  return (m == -kd_inf<A>()) ? -kd_inf<A>() : x - m;
}

// Whether a stored teacher entry is part of the support. NaN is: it must poison the row.
template <typename A>
KD_HD bool valid_entry(A v) {
  return v != -kd_inf<A>();
}

// One side's log-probabilities over the support: log prob of a raw value x is
// (x - m) * inv_t - log_norm.
template <typename A>
struct LogProbs {
  A m;
  A inv_t;
  A log_norm;
};

template <typename A>
KD_HD A log_prob(const LogProbs<A>& s, A x) {
  return below_max(x, s.m) * s.inv_t - s.log_norm;
}

KD_HD float kd_expm1(float x) {
#if defined(__CUDA_ARCH__)
  return ::expm1f(x);
#else
  return std::expm1(x);
#endif
}
KD_HD double kd_expm1(double x) {
#if defined(__CUDA_ARCH__)
  return ::expm1(x);
#else
  return std::expm1(x);
#endif
}

// Whether TRL's clamp min(lse, -1e-7) is active (then the tail gets no gradient).
template <typename A>
KD_HD bool tail_clamped(A lse) {
  return lse > A(-1e-7);
}

// The tail bucket's log-probability log(1 - exp(min(lse, -1e-7))) from the log of the stored mass.
template <typename A>
KD_HD A tail_log(A lse) {
  return kd_log(-kd_expm1(tail_clamped(lse) ? A(-1e-7) : lse));
}

// The divergence and its constants, once per call.
template <typename A>
struct DivConst {
  Divergence div;
  A beta, log_beta, log_1mbeta;  // jsd only
};

template <typename A>
inline DivConst<A> make_div_const(const TopKOptions& o) {
  const bool jsd = o.divergence == Divergence::JSD;
  return {o.divergence, static_cast<A>(o.beta), static_cast<A>(jsd ? std::log(o.beta) : 0.0),
          static_cast<A>(jsd ? std::log1p(-o.beta) : 0.0)};
}

// One bucket's divergence term d and g = d D / d lq (table above).
template <typename A>
struct Bucket {
  A d;
  A g;
};

template <typename A>
KD_HD Bucket<A> bucket(A lp, A lq, const DivConst<A>& dc) {
  const A p = kd_exp(lp);
  const A q = kd_exp(lq);
  switch (dc.div) {
    case Divergence::KL: return {p == A(0) ? A(0) : p * (lp - lq), -p};
    case Divergence::CE: return {p == A(0) ? A(0) : -p * lq, -p};
    case Divergence::ReverseKL: {
      const A t = q == A(0) ? A(0) : q * (lq - lp);
      return {t, t + q};
    }
    case Divergence::JSD: {
      // log m bounded below in the log domain, as kd_math.h jsd_logs does (a denormal product
      // would round to 0 and make log(q / m) infinite).
      A lm = kd_log(dc.beta * p + (A(1) - dc.beta) * q);
      lm = kd_max(lm, kd_max(lq + dc.log_1mbeta, lp + dc.log_beta));
      const A tq = q == A(0) ? A(0) : q * (lq - lm);
      const A tp = p == A(0) ? A(0) : p * (lp - lm);
      return {dc.beta * tp + (A(1) - dc.beta) * tq, (A(1) - dc.beta) * tq};
    }
    case Divergence::TVD: {
      const A diff = q - p;
      return {A(0.5) * (diff < A(0) ? -diff : diff), tvd_sign(q, p) * q};
    }
  }
  return {A(0), A(0)};
}

// The soft gradient's row constants (table above): ks (dense q_i + sparse parts at the entries,
// g_j - c exp(lq_j)).
template <typename A>
struct SoftGrad {
  A dense;
  A c;
};

// From the summed g_j (G), the student's mass on the entries (lse_q = LSE_S(lq), Tail) and the
// tail bucket's g (Tail).
template <typename A>
KD_HD SoftGrad<A> soft_grad(Support support, A G, A lse_q, A g_tail) {
  switch (support) {
    case Support::Full: return {-G, A(0)};
    case Support::Renormalized: return {A(0), G};
    case Support::Tail: {
      if (tail_clamped(lse_q)) return {-G, A(0)};
      const A c = g_tail / -kd_expm1(lse_q);
      return {-(G - c * kd_exp(lse_q)), c};
    }
  }
  return {A(0), A(0)};
}

// Both sides' log-probabilities over the support (table above), from the row's maxima and sums:
// mv, zt the teacher's (zt = sum_S exp((v - mv) * t_inv_t)); mk, zk the student's at the entries
// (Renormalized: zk = sum_S exp((z - mk) / T); Tail: the same shifted by ms); ms, log_za the
// student's over the vocabulary.
template <typename A>
struct RowLogProbs {
  LogProbs<A> lp;  // teacher
  LogProbs<A> lq;  // student
};

template <typename A>
KD_HD RowLogProbs<A> row_log_probs(Support support, A mv, A t_inv_t, A zt, A mk, A zk, A ms,
                                   A inv_t, A log_za) {
  const LogProbs<A> lp = support == Support::Tail ? LogProbs<A>{A(0), A(1), A(0)}
                                                  : LogProbs<A>{mv, t_inv_t, kd_log(zt)};
  const LogProbs<A> lq = support == Support::Renormalized ? LogProbs<A>{mk, inv_t, kd_log(zk)}
                                                          : LogProbs<A>{ms, inv_t, log_za};
  return {lp, lq};
}

// Completes a row with a valid entry from the entries' sums D (d, updated) and G: the tail
// bucket for Tail (mv, zt: the teacher's maximum and sum at t_inv_t = 1; zk: the student's sum
// shifted by ms), then the soft gradient's constants.
template <typename A>
KD_HD SoftGrad<A> finish_row(Support support, const DivConst<A>& dc, A mv, A zt, A zk, A log_za,
                             A G, A& d) {
  A lse_q = A(0), g_tail = A(0);
  if (support == Support::Tail) {
    lse_q = kd_log(zk) - log_za;  // log of the student's mass on the entries
    const Bucket<A> b = bucket(tail_log(mv + kd_log(zt)), tail_log(lse_q), dc);
    d += b.d;
    g_tail = b.g;
  }
  return soft_grad(support, G, lse_q, g_tail);
}

// Hard term, cross-entropy at T = 1: log sum exp(z - ms) - (z_y - ms).
template <typename A>
KD_HD A hard_term(A log_zh, A z_y, A ms) {
  return log_zh - (z_y - ms);
}

}  // namespace kdfused::topk
