// kd_kernel_scalar.cpp -- the CPU "scalar" path: the CUDA kernels' per-element and per-row code
// (kd_math.h: push_vec, push, merge, finalize, probs_at, mix_at, finalize_mix, grad_at), run on
// the host in the order a warp runs it. Selected with KDFUSED_CPU_ISA=scalar or set_cpu_isa;
// never chosen automatically (it is several times slower than the vectorised kernel). Its job is
// to make the CPU test suite execute every line of maths the GPU will execute.
//
// Per row, like kd_warp_kernel with kLanes lanes: lane l takes the W-element vectors l, l + kLanes,
// ... (push_vec: one rescale per vector), the tail goes element by element (push) to the lanes in
// turn, the lanes' states are merged in a fixed tree (as warp_merge does over 32 lanes), then
// finalize, the mix sweep for jsd / tvd, and the gradient sweep with probs_at / grad_at.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "../kd_math.h"
#include "../kd_params.h"
#include "kd_cpu_dispatch.h"
#include "kd_dtype_cpu.h"

namespace kdfused::cpu {

namespace {

constexpr int kLanes = 4;

template <typename S, typename T, typename A>
void scalar_rows(const KDParams& p, int64_t begin, int64_t end) {
  constexpr int W = 4;
  const RowConfig<A> cfg = make_row_config<A>(p);
  const int64_t V = p.vocab;
  A* row_loss = static_cast<A*>(p.row_loss);
  for (int64_t r = begin; r < end; ++r) {
    const S* srow = static_cast<const S*>(p.student) + row_offset(p, r, p.student_strides);
    const T* trow = static_cast<const T*>(p.teacher) + row_offset(p, r, p.teacher_strides);
    S* gsrow = cfg.want_gs ? static_cast<S*>(p.grad_student) + r * V : nullptr;
    T* gtrow = p.grad_teacher ? static_cast<T*>(p.grad_teacher) + r * V : nullptr;
    const int64_t y_raw = p.labels ? p.labels[r] : -1;
    const int64_t y = y_raw - p.vocab_offset;  // the label's column in this slice (if in it)
    if (p.labels && y_raw == p.ignore_index) {
      if (p.phase == Phase::Stats) {
        static_cast<SliceStats<A>*>(p.slice_stats)[r] = SliceStats<A>{RowState<A>::empty(), A(0)};
        continue;
      }
      if (p.phase == Phase::Mix) {
        static_cast<MixSums<A>*>(p.slice_mix)[r] = mix_zero<A>();
        continue;
      }
      if (p.phase == Phase::Full) row_loss[r] = A(0);
      if (p.phase == Phase::Full && p.entropy) static_cast<A*>(p.entropy)[r] = A(0);
      if (gsrow) std::fill(gsrow, gsrow + V, S(0));
      if (gtrow) std::fill(gtrow, gtrow + V, T(0));
      continue;
    }
    // The logits as every formula reads them: transformed (map_logit) when the side's map is on,
    // as the CUDA kernels' Map instantiations do per element.
    auto s_at = [&](int64_t i) {
      const A x = static_cast<A>(srow[i]);
      return cfg.map_s.on ? map_logit(x, cfg.map_s) : x;
    };
    auto t_at = [&](int64_t i) {
      if (!cfg.soft) return A(0);
      const A x = static_cast<A>(trow[i]);
      return cfg.map_t.on ? map_logit(x, cfg.map_t) : x;
    };

    // 1. statistics: lanes, vectors, then the tail.
    RowState<A> lane[kLanes];
    for (auto& st : lane) st = RowState<A>::empty();
    const int64_t nvec = V / W;
    for (int64_t j = 0; j < nvec; ++j) {
      A s[W], t[W];
      for (int i = 0; i < W; ++i) {
        s[i] = s_at(j * W + i);
        t[i] = t_at(j * W + i);
      }
      push_vec<A, W>(lane[j % kLanes], s, t, cfg);
    }
    for (int64_t i = nvec * W; i < V; ++i) push(lane[i % kLanes], s_at(i), t_at(i), cfg);
    for (int off = kLanes / 2; off > 0; off >>= 1) {
      for (int l = 0; l < off; ++l) lane[l] = merge(lane[l], lane[l + off], cfg);
    }
    const RowState<A>& st = lane[0];

    // 2. the row's results (and the mix sweep for jsd / tvd); vocabulary-parallel: this slice's
    // record, or the whole row's results computed from all slices' records.
    const bool label_here = cfg.hard && y >= 0 && y < V;
    if (p.phase == Phase::Stats) {
      static_cast<SliceStats<A>*>(p.slice_stats)[r] =
          SliceStats<A>{st, label_here ? s_at(y) : A(0)};
      continue;
    }
    RowResult<A> res = p.phase == Phase::Full ? finalize(st, cfg, cfg.hard ? s_at(y) : A(0),
                                                         static_cast<A>(p.grad_scale))
                                              : static_cast<const RowFinal<A>*>(p.row_final)[r].res;
    if (cfg.mix && p.phase != Phase::Grad) {
      MixSums<A> mx = mix_zero<A>();
      for (int64_t i = 0; i < V; ++i) {
        const A ds = s_at(i) - res.ms, dt = t_at(i) - res.mt;
        A q, pr, h;
        probs_at(res, cfg, ds, dt, q, pr, h);
        mix_at(mx, res, cfg, ds, dt, q, pr);
      }
      if (p.phase == Phase::Mix) {
        static_cast<MixSums<A>*>(p.slice_mix)[r] = mx;
        continue;
      }
      finalize_mix(res, mx, cfg);
    }
    if (p.phase == Phase::Full) row_loss[r] = res.loss;
    if (p.phase == Phase::Full && p.entropy) static_cast<A*>(p.entropy)[r] = res.entropy;
    if (cfg.zero_gt) std::fill(gtrow, gtrow + V, T(0));

    // 3. gradients.
    if (!cfg.want_gs && !cfg.want_gt) continue;
    for (int64_t i = 0; i < V; ++i) {
      const A zs = s_at(i), zt = t_at(i);
      const A ds = zs - res.ms, dt = zt - res.mt;
      A q, pr, h, gs, gt;
      probs_at(res, cfg, ds, dt, q, pr, h);
      grad_at(res, cfg, ds, dt, q, pr, h, gs, gt);
      if (i == y) gs -= res.kh;
      if (cfg.map_s.on) gs *= map_slope(zs, cfg.map_s);
      if (cfg.map_t.on) gt *= map_slope(zt, cfg.map_t);
      if (gsrow) gsrow[i] = static_cast<S>(gs);
      if (cfg.want_gt) gtrow[i] = static_cast<T>(gt);
    }
  }
}

template <typename S, typename T>
void scalar_typed(const KDParams& p) {
  using A =
      std::conditional_t<std::is_same_v<S, double> || std::is_same_v<T, double>, double, float>;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.vocab, 1));
  at::parallel_for(0, p.n_rows, grain,
                   [&](int64_t b, int64_t e) { scalar_rows<S, T, A>(p, b, e); });
}

void scalar_forward(const KDParams& p) {
  with_dtype_pair(p, [&](auto s, auto t) {
    scalar_typed<typename decltype(s)::type, typename decltype(t)::type>(p);
  });
}

void scalar_exp(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = kd_exp(x[i]);
}

}  // namespace

KD_REGISTER_KERNEL(ForwardStub, Isa::Scalar, &scalar_forward)
KD_REGISTER_KERNEL(ExpStub, Isa::Scalar, &scalar_exp)
// Top-k's scalar path: topk/kd_topk_scalar.cpp.

}  // namespace kdfused::cpu
