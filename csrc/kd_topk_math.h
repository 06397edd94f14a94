// kd_topk_math.h -- the per-element maths of the top-k distillation loss, shared by the CPU and
// the CUDA kernels (only kd_exp, kd_log, kd_max, kd_inf, rescale_factor and KD_HD come from
// kd_math.h).
//
// One row: student logits s (V entries), teacher indices i_1..i_k (distinct) and teacher logits
// v_1..v_k at those indices, temperature T.
//   ms = max s        za = sum_i exp((s_i - ms) / T)        log q_i = (s_i - ms)/T - log za
//   mv = max v        zb = sum_j exp((v_j - mv) / T)        log p_j = (v_j - mv)/T - log zb
//   KL = sum_j p_j (log p_j - log q_{i_j})
//      = (1/zb) sum_j e_j ((v_j - mv) - (s_{i_j} - ms)) / T  -  log zb  +  log za,  e_j = zb p_j
//   CE = -sum_j p_j log q_{i_j} = (1/zb) sum_j e_j (-(s_{i_j} - ms) / T)  +  log za
//   hard = log sum_i exp(s_i - ms) - (s_y - ms)                              (T = 1, full row)
//   row  = soft_weight T^2 D + hard_weight hard
//   d row / d s_i = soft_weight T (q_i - p~_i) + hard_weight (softmax(s)_i - [i == y])
// where p~ is p scattered to the indices (0 elsewhere). Every quantity is formed from differences
// to the raw maxima (exact for nearby values), never from s/T - max(s/T) or from LSE(s/T) itself,
// which would cancel large rounded numbers for large logits or small T.
//
// Masking: a -inf teacher value has e_j = 0 and contributes nothing (its (v_j - mv) = -inf would
// make 0 * inf = NaN, hence the guard). A -inf student logit under teacher mass gives +inf. A row
// whose k teacher values are all -inf has no distribution (zb = 0): NaN, like softmax.
#pragma once

#include "kd_math.h"

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

// x - m for a value x under the maximum m of its set, with an all -inf set (m = -inf) giving -inf
// (so that exp gives 0), not NaN.
template <typename A>
KD_HD A below_max(A x, A m) {
  return (m == -kd_inf<A>()) ? -kd_inf<A>() : x - m;
}

// The teacher's unnormalised weight e_j = exp((v_j - mv) / T).
template <typename A>
KD_HD A teacher_weight(A v, A mv, A inv_t) {
  return kd_exp(below_max(v, mv) * inv_t);
}

// One teacher entry's contribution to zb * (D - offset), see divergence(): e_j * d_j with
// d_j = ((v_j - mv) - (s_{i_j} - ms)) / T (KL) or -(s_{i_j} - ms) / T (CE). No mass, nothing.
template <typename A>
KD_HD A teacher_term(A e, A v, A mv, A s_at, A ms, A inv_t, bool ce) {
  if (!(e > A(0))) return (e == A(0)) ? A(0) : e;  // NaN weight stays NaN
  const A ds = s_at - ms;
  return ce ? -e * (ds * inv_t) : e * (((v - mv) - ds) * inv_t);
}

// D from the summed teacher terms: KL = sum/zb - log zb + log za, CE = sum/zb + log za.
template <typename A>
KD_HD A divergence(A term_sum, A zb, A log_za, bool ce) {
  const A d = term_sum / zb + log_za;
  return ce ? d : d - kd_log(zb);
}

// Hard term, cross-entropy at T = 1: log sum exp(s - ms) - (s_y - ms).
template <typename A>
KD_HD A hard_term(A log_zh, A s_y, A ms) {
  return log_zh - (s_y - ms);
}

// Per-row coefficients of the gradient sweep, already multiplied by the reduction's scale.
template <typename A>
struct GradCoef {
  A ks;  // soft_weight * T * scale (0 when the soft term is off)
  A kh;  // hard_weight * scale (0 when the hard term is off)
};

// The dense part of d row / d s_i from q_i (tempered student probability) and h_i (softmax(s)_i);
// the sparse parts -ks p_j at the teacher's indices and -kh at the label are added separately.
template <typename A>
KD_HD A grad_dense(const GradCoef<A>& c, A q, A h) {
  return c.ks * q + c.kh * h;
}

// The sparse teacher part at index i_j: -ks p_j with p_j = e_j / zb.
template <typename A>
KD_HD A grad_teacher_part(const GradCoef<A>& c, A e, A zb) {
  return -c.ks * (e / zb);
}

}  // namespace kdfused::topk
