// kd_topk_kernel_cpu.h -- the CPU kernel of topk_kd_loss, compiled once per instruction set.
//
// Included by kd_topk_{default,avx2,avx512}.cpp after their instruction set's prelude
// (../kd_isa_*.h: CPU_CAPABILITY, the at::vec namespace, and KD_ISA); registers topk_forward for
// KD_ISA (kd_cpu_dispatch.h). Everything lives in an ISA-specific inline namespace so the copies
// never meet at link time.
//
// Maths: kd_topk_math.h (supports, divergences, gradient). Per row (rows over threads with
// at::parallel_for, one thread per row: the result does not depend on the thread count), one read
// of the student row:
//   1. statistics sweep (when the soft term needs q over the vocabulary -- supports Full and Tail
//   --
//      or the hard term is on), chunk by chunk: the chunk's maximum, then exp((z - max)/T) for each
//      element, kept (in the fp32/fp64 gradient output itself when the student has the
//      accumulation type, else in a per-thread row buffer) together with the chunk's (max, sum);
//      the chunks' (max, sum) states are merged in order;
//   2. the k teacher entries: gather z at the valid ones, both sides' log-probabilities over the
//      support, the buckets' divergence terms, the row loss and the soft gradient's constants;
//   3. gradient sweep: q = kept exponential * one factor per chunk (no exp per element), the
//      dense part ks dense q + hw softmax(z) written chunk by chunk, the sparse parts (at the valid
//      entries, sorted once per row, and -hw at the label) added to the chunk before it is
//      converted to the student's dtype (one rounding).
// One exp per element (two for the hard term at T != 1, 2). With the student's logit transform
// (kd_math.h LogitMap) every student logit read is map_logit's z (chunk_z, and at the indices and
// the label), and the gradient sweep multiplies each finished chunk by the slope dz/dx; the
// teacher's transform is applied to the stored values by the host.
#pragma once

#include "../kd_cpu_dispatch.h"

#if KD_ISA_COMPILED
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../../kd_topk_math.h"
#include "../../kd_topk_params.h"
#include "../kd_vec_cpu.h"
#include "../kd_vexp.h"

namespace kdfused::cpu_topk {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;
using topk::MaxSum;
using topk::TopKParams;

// The vector building blocks (kd_vec_cpu.h) and the exponential (kd_vexp.h, x <= 0) shared with
// the fused kernel, compiled for this instruction set.
using cpu::chunk_z;
using cpu::hmax;
using cpu::hsum;
using cpu::kChunk;
using cpu::load_chunk;
using cpu::store_chunk;
using cpu::vexp;
using cpu::vmax;

// One teacher entry of the current row, for the sparse part of the gradient.
struct Entry {
  int64_t idx;
  double grad;  // the entry's sparse gradient, in double to hold either accumulation type
};

// A zeroed array of n elements (resize drops the contents). Why not std::vector<float>: its
// out-of-line members are emitted under the same symbol in every instruction set's object, and the
// linker keeps one copy for all of them, possibly one compiled for AVX-512. This class lives in the
// instruction set's own namespace, so each object keeps its own.
template <typename T>
class Buf {
 public:
  Buf() = default;
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { delete[] p_; }
  void resize(size_t n) {
    delete[] p_;
    p_ = nullptr;
    p_ = new T[n]();
  }
  T* data() { return p_; }
  T& operator[](size_t i) { return p_[i]; }

 private:
  T* p_ = nullptr;
};

template <typename A>
struct Scratch {
  int64_t n_chunks;
  Buf<A> s;                    // one chunk of the student converted (S != A) or transformed
  Buf<A> ea, eh;               // the row's exponentials (when not kept in the output)
  Buf<A> g;                    // one chunk of gradient before conversion (when S != A)
  Buf<A> cm, cza, czh;         // each chunk's maximum and sums
  std::vector<Entry> entries;  // the row's teacher entries, sorted by index

  Scratch(int64_t V, int64_t k, bool convert, bool keep_a, bool keep_h, bool map) {
    constexpr int64_t W = Vectorized<A>::size();
    n_chunks = (V + kChunk - 1) / kChunk;
    cm.resize(n_chunks);
    cza.resize(n_chunks);
    czh.resize(n_chunks);
    if (convert || map) s.resize(kChunk + W);
    if (convert) g.resize(kChunk + W);
    if (keep_a && convert) ea.resize(V + W);
    if (keep_h) eh.resize(V + W);
    entries.resize(k);
  }
};

// One row's top-k part (step 2, kd_topk_math.h): D over the support and the soft gradient's dense
// coefficient; with `entries`, also the valid entries' sparse gradients (ks already applied; their
// number in n_entries). ms, log_za: the student's statistics over the vocabulary (Full and Tail
// only). Each pass over the k entries skips the padding, whose indices are never read.
template <typename A>
struct TopKRow {
  A soft;   // D
  A dense;  // the soft gradient's dense coefficient (times ks: ks * dense * q_i)
};

template <typename S, typename A, typename ZAt>
KD_FLATTEN TopKRow<A> topk_terms(const TopKParams& p, const topk::DivConst<A>& dc,
                                 const int64_t* ix, const A* vv, const S* srow, const ZAt& z_at,
                                 A ms, A log_za, A ks, Entry* entries, int64_t& n_entries) {
  using topk::Support;
  const int64_t K = p.k;
  const A inv_t = static_cast<A>(p.inv_temperature);
  const A t_inv_t = p.logprobs ? A(1) : inv_t;  // the teacher's: stored log-probs are final
  // Maxima over the valid entries: the teacher's values, the student's logits there.
  A mv = -kd_inf<A>(), mk = -kd_inf<A>();
  int64_t n_valid = 0;
  for (int64_t j = 0; j < K; ++j) {
    if (!topk::valid_entry(vv[j])) continue;
    ++n_valid;
    mv = kd_max(mv, vv[j]);
    mk = kd_max(mk, z_at(srow, ix[j]));
  }
  n_entries = 0;
  if (n_valid == 0) return {A(0), A(0)};  // no support: D = 0, no soft gradient
  A zt = A(0), zk = A(0);
  const A mz = p.support == Support::Renormalized ? mk : ms;  // the student's shift
  for (int64_t j = 0; j < K; ++j) {
    if (!topk::valid_entry(vv[j])) continue;
    zt += kd_exp(topk::below_max(vv[j], mv) * t_inv_t);
    zk += kd_exp(topk::below_max(z_at(srow, ix[j]), mz) * inv_t);
  }
  const topk::RowLogProbs<A> lps =
      topk::row_log_probs(p.support, mv, t_inv_t, zt, mk, zk, ms, inv_t, log_za);
  const topk::LogProbs<A>& lp_of = lps.lp;
  const topk::LogProbs<A>& lq_of = lps.lq;
  A d = A(0), G = A(0);
  for (int64_t j = 0; j < K; ++j) {
    if (!topk::valid_entry(vv[j])) continue;
    const topk::Bucket<A> b =
        topk::bucket(topk::log_prob(lp_of, vv[j]), topk::log_prob(lq_of, z_at(srow, ix[j])), dc);
    d += b.d;
    G += b.g;
  }
  const topk::SoftGrad<A> sg = topk::finish_row(p.support, dc, mv, zt, zk, log_za, G, d);
  if (entries) {
    for (int64_t j = 0; j < K; ++j) {
      if (!topk::valid_entry(vv[j])) continue;
      const A lq = topk::log_prob(lq_of, z_at(srow, ix[j]));
      const topk::Bucket<A> b = topk::bucket(topk::log_prob(lp_of, vv[j]), lq, dc);
      entries[n_entries++] = Entry{ix[j], static_cast<double>(ks * (b.g - sg.c * kd_exp(lq)))};
    }
  }
  return {d, sg.dense};
}

template <typename S, typename A>
KD_FLATTEN void topk_rows(const TopKParams& p, int64_t begin, int64_t end) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = Vec::size();
  constexpr bool convert = !std::is_same_v<S, A>;
  const int64_t V = p.vocab;
  const int64_t K = p.k;
  // Flags in locals: the gradient stores might alias a field of p, which the compiler would then
  // reload in every iteration.
  const bool soft = p.soft_weight > 0;
  const bool hard = p.hard_weight > 0;
  const bool want_g = p.grad_student != nullptr;
  // Whether the soft term needs q over the whole vocabulary (not for Renormalized, whose student
  // lives on the entries alone), and whether anything needs the statistics sweep.
  const bool soft_dense = soft && p.support != topk::Support::Renormalized;
  const bool need_stats = soft_dense || hard;
  // Without the soft term's q only T = 1 statistics are needed: compute those as the "a" ones.
  const A inv_t = soft_dense ? static_cast<A>(p.inv_temperature) : A(1);
  const A temp = static_cast<A>(p.temperature);
  const bool need_h = hard && soft_dense && p.temperature != 1.0;
  // At T = 2, exp(s - m) = exp((s - m)/2)^2: a multiply instead of an exp (and no stored copy).
  const bool square_h = need_h && p.temperature == 2.0;
  const bool keep_h = need_h && !square_h && want_g;
  const LogitMap<A> map = make_logit_map<A>(p.student_scale, p.student_softcap);
  const topk::DivConst<A> dc = topk::make_div_const<A>(p);
  Scratch<A> sc(V, K, convert, want_g && need_stats, keep_h, map.on);
  // The student's logit at column i, as every formula reads it (transformed when the map is on).
  auto z_at = [&](const S* row, int64_t i) {
    const A x = static_cast<A>(row[i]);
    return map.on ? map_logit(x, map) : x;
  };

  const S* s_base = static_cast<const S*>(p.student);
  const A* v_base = static_cast<const A*>(p.values);
  A* row_loss = static_cast<A*>(p.row_loss);
  const A sw = static_cast<A>(p.soft_weight);
  const A hw = static_cast<A>(p.hard_weight);
  const A scale = static_cast<A>(p.grad_scale);
  const Vec vinv_t(inv_t);

  for (int64_t r = begin; r < end; ++r) {
    const S* srow = s_base + r * p.student_stride;
    S* grow = want_g ? static_cast<S*>(p.grad_student) + r * V : nullptr;
    const int64_t y = p.labels ? p.labels[r] : -1;
    const bool valid = !p.labels || y != p.ignore_index;
    if (!valid || (!soft && !hard)) {
      row_loss[r] = A(0);
      if (grow) std::fill(grow, grow + V, S(0));
      continue;
    }
    // Where the exponentials are kept: in the gradient output itself when it has the
    // accumulation type (the gradient sweep then reads and writes the same cache lines).
    A* ea_row = nullptr;
    if (want_g && need_stats) {
      if constexpr (convert) {
        ea_row = sc.ea.data();
      } else {
        ea_row = grow;
      }
    }

    // ---- 1. statistics sweep ----------------------------------------------------------------
    MaxSum<A> a{-kd_inf<A>(), A(0)}, h{-kd_inf<A>(), A(0)};
    if (need_stats) {
      for (int64_t c = 0; c < sc.n_chunks; ++c) {
        const int64_t c0 = c * kChunk;
        const int64_t n = std::min(kChunk, V - c0);
        const A* xs = chunk_z(srow + c0, sc.s.data(), n, map);
        // The next chunk's logits (the next row's first) are fetched while this one is computed
        // (as in kd_kernel_cpu.h); vmax: kd_vexp.h says why a NaN need not reach the maximum.
        const S* pf = c + 1 < sc.n_chunks ? srow + c0 + kChunk
                      : r + 1 < p.n_rows  ? s_base + (r + 1) * p.student_stride
                                          : nullptr;
        Vec vm(-kd_inf<A>());
        for (int64_t i = 0; i < n; i += W) vm = vmax(vm, load_chunk(xs, i, n));
        const A cm = hmax(vm);
        // An all -inf chunk: shift by 0, so every exp is exp(-inf) = 0 rather than NaN.
        const Vec sh(cm == -kd_inf<A>() ? A(0) : cm);
        Vec za(A(0)), zh(A(0));
        for (int64_t i = 0; i < n; i += W) {
          if (pf) cpu::prefetch(pf + i);
          const Vec ds = load_chunk(xs, i, n) - sh;
          const Vec e_a = vexp(ds * vinv_t);
          za += e_a;
          if (ea_row) store_chunk(e_a, ea_row + c0, i, n);
          if (need_h) {
            const Vec e_h = square_h ? e_a * e_a : vexp(ds);
            zh += e_h;
            if (keep_h) store_chunk(e_h, sc.eh.data() + c0, i, n);
          }
        }
        sc.cm[c] = cm;
        sc.cza[c] = hsum(za);
        sc.czh[c] = hsum(zh);
      }
      for (int64_t c = 0; c < sc.n_chunks; ++c) {
        a = topk::merge(a, MaxSum<A>{sc.cm[c], sc.cza[c]}, inv_t);
        if (need_h) h = topk::merge(h, MaxSum<A>{sc.cm[c], sc.czh[c]}, A(1));
      }
    }
    const A ms = a.m;
    const A log_za = kd_log(a.z);
    const A log_zh = need_h ? kd_log(h.z) : log_za;

    // ---- 2. teacher entries and the row loss -------------------------------------------------
    const A ks = soft ? sw * temp * scale : A(0);
    const A kh = hard ? hw * scale : A(0);
    A loss = A(0);
    A dense = A(0);
    int64_t n_entries = 0;
    if (soft) {
      const TopKRow<A> t =
          topk_terms<S, A>(p, dc, p.indices + r * K, v_base + r * K, srow, z_at, ms, log_za, ks,
                           want_g ? sc.entries.data() : nullptr, n_entries);
      loss += sw * temp * temp * t.soft;
      dense = t.dense;
    }
    if (hard) loss += hw * topk::hard_term(log_zh, z_at(srow, y), ms);
    row_loss[r] = loss;
    if (!want_g) continue;

    // ---- 3. gradient sweep --------------------------------------------------------------------
    std::sort(sc.entries.begin(), sc.entries.begin() + n_entries,
              [](const Entry& x, const Entry& z) { return x.idx < z.idx; });
    const Vec kd(ks * dense), kh_v(kh);
    int64_t next = 0;  // the first sorted entry not yet applied
    for (int64_t c = 0; c < sc.n_chunks; ++c) {
      const int64_t c0 = c * kChunk;
      const int64_t n = std::min(kChunk, V - c0);
      A* out;
      if constexpr (convert) {
        out = sc.g.data();
      } else {
        out = grow + c0;
      }
      if (!need_stats) {
        std::fill(out, out + n, A(0));  // the soft gradient lives on the entries alone
      } else {
        // Probabilities are the kept exponentials times one factor per chunk. An all -inf chunk
        // has factor exp(-inf) = 0; an all -inf row NaN (no distribution, as softmax).
        const Vec fa(kd_exp((sc.cm[c] - ms) * inv_t - log_za));
        const Vec fh(need_h ? kd_exp((sc.cm[c] - ms) - log_zh) : A(0));
        const A* ea = ea_row + c0;
        for (int64_t i = 0; i < n; i += W) {
          const Vec e_a = load_chunk(ea, i, n);
          Vec g;
          if (!need_h) {
            // T = 1, or no dense soft part: softmax(z) is the "a" probability.
            g = (kd + kh_v) * (e_a * fa);
          } else {
            const Vec e_h = square_h ? e_a * e_a : load_chunk(sc.eh.data() + c0, i, n);
            g = kd * (e_a * fa) + kh_v * (e_h * fh);
          }
          store_chunk(g, out, i, n);
        }
      }
      for (; next < n_entries && sc.entries[next].idx < c0 + n; ++next) {
        const Entry& en = sc.entries[next];
        out[en.idx - c0] += static_cast<A>(en.grad);
      }
      if (hard && y >= c0 && y < c0 + n) out[y - c0] -= kh;
      if (map.on) {
        // d/dx = d/dz * dz/dx, on the finished chunk (dense and sparse parts); z again from x.
        const A* zs = chunk_z(srow + c0, sc.s.data(), n, map);
        for (int64_t i = 0; i < n; i += W) {
          store_chunk(load_chunk(out, i, n) * map_slope(load_chunk(zs, i, n), map), out, i, n);
        }
      }
      if constexpr (convert) at::vec::convert(out, grow + c0, n);
    }
  }
}

template <typename S, typename A>
void topk_typed(const TopKParams& p) {
  // Rows per task: enough work per task to amortise the scratch allocation.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.vocab, 1));
  at::parallel_for(0, p.n_rows, grain,
                   [&](int64_t begin, int64_t end) { topk_rows<S, A>(p, begin, end); });
}

template <typename S>
void topk_student(const TopKParams& p, bool acc_double) {
  if constexpr (std::is_same_v<S, double>) {
    topk_typed<double, double>(p);
  } else if (acc_double) {
    topk_typed<S, double>(p);
  } else {
    topk_typed<S, float>(p);
  }
}

// Accumulation type float64 when the student or the (converted) teacher values are float64.
inline void topk_forward(const TopKParams& p, bool acc_double) {
  switch (p.student_dtype) {
    case DType::Float16: return topk_student<c10::Half>(p, acc_double);
    case DType::BFloat16: return topk_student<c10::BFloat16>(p, acc_double);
    case DType::Float32: return topk_student<float>(p, acc_double);
    case DType::Float64: return topk_student<double>(p, acc_double);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace kdfused::cpu_topk

#define KD_ISA_TOPK_FORWARD &cpu_topk::CPU_CAPABILITY::topk_forward
#else
#define KD_ISA_TOPK_FORWARD nullptr  // not compiled for this instruction set
#endif                               // KD_ISA_COMPILED

namespace kdfused::cpu {
KD_REGISTER_KERNEL(TopKForwardStub, KD_ISA, KD_ISA_TOPK_FORWARD)
}  // namespace kdfused::cpu
