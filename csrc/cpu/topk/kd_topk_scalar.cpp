// kd_topk_scalar.cpp -- the top-k CPU "scalar" path: the CUDA kernel's per-element and per-row
// code (kd_topk_math.h: element, merge, valid_entry, below_max, log_prob, bucket, tail_log,
// soft_grad, hard_term) run on the host in the order a group of kLanes threads runs it
// (cuda/kd_topk_cuda.cu topk_kernel). Selected with KDFUSED_CPU_ISA=scalar or set_cpu_isa, never
// automatically; its job is to make the CPU test suite execute every line of maths the GPU will.
//
// Per row: lane l folds the elements l, l + kLanes, ... into (max, sum) states, merged in a fixed
// tree; the entries' passes (maxima and count, sums, buckets) strided over the lanes the same way,
// each followed by the lanes' reduction; then the dense gradient for every element and, after it,
// the valid entries' positions overwritten with their full value (as the kernel does after its
// group barrier).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../../kd_topk_math.h"
#include "../../kd_topk_params.h"
#include "../kd_cpu_dispatch.h"

namespace kdfused::cpu {

namespace {

using topk::MaxSum;
using topk::Support;
using topk::TopKParams;

constexpr int kLanes = 4;

// The lanes' values merged in a fixed tree ((0, 1), (2, 3)), as the kernel's butterfly does.
template <typename X, typename F>
X lanes_reduce(const X (&x)[kLanes], F&& f) {
  return f(f(x[0], x[1]), f(x[2], x[3]));
}

template <typename S, typename A>
void scalar_topk_rows(const TopKParams& p, int64_t begin, int64_t end) {
  const int64_t V = p.vocab;
  const int64_t K = p.k;
  const bool soft = p.soft_weight > 0;
  const bool hard = p.hard_weight > 0;
  const bool want_g = p.grad_student != nullptr;
  const bool renorm = p.support == Support::Renormalized;
  const bool soft_dense = soft && !renorm;
  const bool need_stats = soft_dense || hard;
  const A inv_a = soft_dense ? static_cast<A>(p.inv_temperature) : A(1);
  const A inv_t = static_cast<A>(p.inv_temperature);
  const A t_inv_t = p.logprobs ? A(1) : inv_t;
  const A temp = static_cast<A>(p.temperature);
  const bool need_h = hard && soft_dense && p.temperature != 1.0;
  const A scale = static_cast<A>(p.grad_scale);
  const LogitMap<A> m = make_logit_map<A>(p.student_scale, p.student_softcap);
  const topk::DivConst<A> dc = topk::make_div_const<A>(p);
  auto max_op = [](A x, A y) { return kd_max(x, y); };
  auto sum_op = [](A x, A y) { return x + y; };
  auto merge_a = [inv_a](const MaxSum<A>& x, const MaxSum<A>& y) {
    return topk::merge(x, y, inv_a);
  };
  auto merge_h = [](const MaxSum<A>& x, const MaxSum<A>& y) { return topk::merge(x, y, A(1)); };
  A* row_loss = static_cast<A*>(p.row_loss);

  for (int64_t r = begin; r < end; ++r) {
    const S* srow = static_cast<const S*>(p.student) + r * p.student_stride;
    S* grow = want_g ? static_cast<S*>(p.grad_student) + r * V : nullptr;
    auto z_at = [&](int64_t i) {
      const A x = static_cast<A>(srow[i]);
      return m.on ? map_logit(x, m) : x;
    };
    const int64_t y = p.labels ? p.labels[r] : -1;
    if ((p.labels && y == p.ignore_index) || (!soft && !hard)) {
      row_loss[r] = A(0);
      if (grow) std::fill(grow, grow + V, S(0));
      continue;
    }

    // ---- 1. statistics ----------------------------------------------------------------------
    MaxSum<A> a{-kd_inf<A>(), A(0)}, h{-kd_inf<A>(), A(0)};
    if (need_stats) {
      MaxSum<A> la[kLanes], lh[kLanes];
      for (int l = 0; l < kLanes; ++l) la[l] = lh[l] = MaxSum<A>{-kd_inf<A>(), A(0)};
      for (int64_t i = 0; i < V; ++i) {
        const MaxSum<A> e = topk::element(z_at(i));
        const int l = static_cast<int>(i % kLanes);
        la[l] = topk::merge(la[l], e, inv_a);
        if (need_h) lh[l] = topk::merge(lh[l], e, A(1));
      }
      a = lanes_reduce(la, merge_a);
      if (need_h) h = lanes_reduce(lh, merge_h);
    }
    const A ms = a.m;
    const A log_za = kd_log(a.z);
    const A log_zh = need_h ? kd_log(h.z) : log_za;

    // ---- 2. teacher entries -----------------------------------------------------------------
    A loss = A(0);
    int64_t n_valid = 0;
    topk::LogProbs<A> lp_of{A(0), A(1), A(0)}, lq_of{A(0), A(1), A(0)};
    topk::SoftGrad<A> sg{A(0), A(0)};
    const int64_t* ix = p.indices + r * K;
    const A* vv = static_cast<const A*>(p.values) + r * K;
    if (soft) {
      A lmv[kLanes], lmk[kLanes];
      for (int l = 0; l < kLanes; ++l) lmv[l] = lmk[l] = -kd_inf<A>();
      for (int64_t j = 0; j < K; ++j) {
        if (!topk::valid_entry(vv[j])) continue;
        const int l = static_cast<int>(j % kLanes);
        ++n_valid;
        lmv[l] = kd_max(lmv[l], vv[j]);
        if (renorm) lmk[l] = kd_max(lmk[l], z_at(ix[j]));
      }
      if (n_valid > 0) {
        const A mv = lanes_reduce(lmv, max_op);
        const A mk = renorm ? lanes_reduce(lmk, max_op) : -kd_inf<A>();
        const A mz = renorm ? mk : ms;
        A lzt[kLanes] = {}, lzk[kLanes] = {};
        for (int64_t j = 0; j < K; ++j) {
          if (!topk::valid_entry(vv[j])) continue;
          const int l = static_cast<int>(j % kLanes);
          lzt[l] += kd_exp(topk::below_max(vv[j], mv) * t_inv_t);
          lzk[l] += kd_exp(topk::below_max(z_at(ix[j]), mz) * inv_t);
        }
        const A zt = lanes_reduce(lzt, sum_op);
        const A zk = lanes_reduce(lzk, sum_op);
        const topk::RowLogProbs<A> lps =
            topk::row_log_probs(p.support, mv, t_inv_t, zt, mk, zk, ms, inv_t, log_za);
        lp_of = lps.lp;
        lq_of = lps.lq;
        A ld[kLanes] = {}, lg[kLanes] = {};
        for (int64_t j = 0; j < K; ++j) {
          if (!topk::valid_entry(vv[j])) continue;
          const int l = static_cast<int>(j % kLanes);
          const topk::Bucket<A> b =
              topk::bucket(topk::log_prob(lp_of, vv[j]), topk::log_prob(lq_of, z_at(ix[j])), dc);
          ld[l] += b.d;
          lg[l] += b.g;
        }
        A d = lanes_reduce(ld, sum_op);
        const A gs = lanes_reduce(lg, sum_op);
        sg = topk::finish_row(p.support, dc, mv, zt, zk, log_za, gs, d);
        loss += static_cast<A>(p.soft_weight) * temp * temp * d;
      }
    }
    if (hard) loss += static_cast<A>(p.hard_weight) * topk::hard_term(log_zh, z_at(y), ms);
    row_loss[r] = loss;
    if (!want_g) continue;

    // ---- 3. gradient --------------------------------------------------------------------------
    const A ks = soft ? static_cast<A>(p.soft_weight) * temp * scale : A(0);
    const A kh = hard ? static_cast<A>(p.hard_weight) * scale : A(0);
    const A kd = ks * sg.dense;
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
    auto store = [&](int64_t i, A z, A g) {
      grow[i] = static_cast<S>(m.on ? g * map_slope(z, m) : g);
    };
    for (int64_t i = 0; i < V; ++i) {
      const A z = z_at(i);
      store(i, z, dense(z, i));
    }
    if (n_valid > 0) {
      for (int64_t j = 0; j < K; ++j) {
        if (!topk::valid_entry(vv[j])) continue;
        const int64_t i = ix[j];
        const A z = z_at(i);
        const A lq = topk::log_prob(lq_of, z);
        const topk::Bucket<A> b = topk::bucket(topk::log_prob(lp_of, vv[j]), lq, dc);
        store(i, z, dense(z, i) + ks * (b.g - sg.c * kd_exp(lq)));
      }
    }
  }
}

template <typename S, typename A>
void scalar_topk_typed(const TopKParams& p) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.vocab, 1));
  at::parallel_for(0, p.n_rows, grain,
                   [&](int64_t begin, int64_t end) { scalar_topk_rows<S, A>(p, begin, end); });
}

template <typename S>
void scalar_topk_student(const TopKParams& p, bool acc_double) {
  if constexpr (std::is_same_v<S, double>) {
    scalar_topk_typed<double, double>(p);
  } else if (acc_double) {
    scalar_topk_typed<S, double>(p);
  } else {
    scalar_topk_typed<S, float>(p);
  }
}

void scalar_topk_forward(const TopKParams& p, bool acc_double) {
  switch (p.student_dtype) {
    case DType::Float16: return scalar_topk_student<c10::Half>(p, acc_double);
    case DType::BFloat16: return scalar_topk_student<c10::BFloat16>(p, acc_double);
    case DType::Float32: return scalar_topk_student<float>(p, acc_double);
    case DType::Float64: return scalar_topk_student<double>(p, acc_double);
  }
}

}  // namespace

KD_REGISTER_KERNEL(TopKForwardStub, Isa::Scalar, &scalar_topk_forward)

}  // namespace kdfused::cpu
