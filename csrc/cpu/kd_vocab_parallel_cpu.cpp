// kd_vocab_parallel_cpu.cpp -- CPU implementations of the vocabulary-parallel steps kd_vp_stats /
// kd_vp_merge / kd_vp_mix / kd_vp_merge_mix / kd_vp_grad (schemas, the meaning of each step and
// the host code shared with CUDA: kd_vocab_parallel.cpp / .h). The kernel steps run the ordinary
// kernels (cpu::run_forward) with KDParams::phase set; the merges run on the host, over rows.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "../kd_host.h"
#include "../kd_math.h"
#include "../kd_vocab_parallel.h"
#include "kd_cpu_dispatch.h"
#include "kd_cpu_host.h"

namespace kdfused {

namespace {

// Runs one kernel step on the slice; returns the prepared call (outputs, labels, params).
Prepared run_step(Phase phase, const at::Tensor& student, const at::Tensor& teacher,
                  const std::optional<at::Tensor>& labels, int64_t vocab_offset,
                  const at::Tensor* row_final, at::Tensor* out, const KDOptions& opt,
                  bool grad_student, bool grad_teacher) {
  Prepared prep = prepare_step(phase, student, teacher, labels, vocab_offset, row_final, out, opt,
                               grad_student, grad_teacher);
  if (prep.params.n_rows > 0) cpu::run_forward(prep.params);
  return prep;
}

at::Tensor vp_stats(const at::Tensor& student, const at::Tensor& teacher,
                    const std::optional<at::Tensor>& labels, int64_t vocab_offset,
                    int64_t vocab_total, const KDOptions& opt) {
  const int64_t ignore_index = opt.ignore_index;
  // Shapes first, then label values over the whole vocabulary: both before the kernel runs.
  check_inputs(student, teacher, labels, opt);
  if (labels.has_value()) {
    const at::Tensor y = labels->reshape({-1}).to(at::kLong).contiguous();
    const int64_t* yp = y.data_ptr<int64_t>();
    for (int64_t r = 0; r < y.numel(); ++r) {
      if (yp[r] == ignore_index) continue;
      TORCH_CHECK_VALUE(yp[r] >= 0 && yp[r] < vocab_total, "kdfused: labels must be in [0, ",
                        vocab_total, ") (the whole vocabulary over the process group) or equal ",
                        "ignore_index (", ignore_index, "), got ", yp[r], " at row ", r);
    }
  }
  at::Tensor out;
  run_step(Phase::Stats, student, teacher, labels, vocab_offset, nullptr, &out, opt, false, false);
  return out;
}

template <typename A>
void merge_rows(const at::Tensor& gathered, const at::Tensor& labels, at::Tensor& fin,
                const KDParams& p, int64_t ignore_index) {
  const int64_t n_slices = gathered.size(0), n_rows = gathered.size(1);
  const RowConfig<A> cfg = make_row_config<A>(p);
  const auto* slices = reinterpret_cast<const SliceStats<A>*>(gathered.data_ptr<A>());
  auto* out = reinterpret_cast<RowFinal<A>*>(fin.data_ptr<A>());
  const int64_t* y = labels.defined() ? labels.data_ptr<int64_t>() : nullptr;
  for (int64_t r = 0; r < n_rows; ++r) {
    if (y != nullptr && y[r] == ignore_index) {
      RowFinal<A> f{};  // an ignored row: loss 0; the kernels skip it
      out[r] = f;
      continue;
    }
    out[r] = finalize_slices(slices + r, n_slices, n_rows, cfg, static_cast<A>(p.grad_scale));
  }
}

// The grad_scale of the reduction: 1 / (number of valid rows) for the means, else 1.
double reduction_scale(Reduction red, const at::Tensor& labels, int64_t n_rows,
                       int64_t ignore_index) {
  if (red != Reduction::Mean) return 1.0;
  int64_t n_valid = n_rows;
  if (labels.defined()) n_valid = labels.ne(ignore_index).sum().item<int64_t>();
  return 1.0 / static_cast<double>(std::max<int64_t>(n_valid, 1));
}

at::Tensor vp_merge(const at::Tensor& slice_stats, const std::optional<at::Tensor>& labels,
                    const KDOptions& opt) {
  KDParams p = params_of(opt);
  const int64_t ignore_index = opt.ignore_index;
  const at::Tensor y = check_merge_inputs(slice_stats, labels);
  const int64_t n_rows = slice_stats.size(1);
  const at::ScalarType acc = slice_stats.scalar_type();
  p.grad_scale = reduction_scale(p.reduction, y, n_rows, ignore_index);
  at::Tensor fin = at::empty({n_rows, kFinalFields}, slice_stats.options());
  if (acc == at::kDouble) {
    merge_rows<double>(slice_stats, y, fin, p, ignore_index);
  } else {
    merge_rows<float>(slice_stats, y, fin, p, ignore_index);
  }
  return fin;
}

at::Tensor vp_mix(const at::Tensor& student, const at::Tensor& teacher,
                  const std::optional<at::Tensor>& labels, const at::Tensor& row_final,
                  int64_t vocab_offset, const KDOptions& opt) {
  at::Tensor out;
  run_step(Phase::Mix, student, teacher, labels, vocab_offset, &row_final, &out, opt, false, false);
  return out;
}

template <typename A>
void merge_mix_rows(const at::Tensor& gathered, at::Tensor& fin, const KDParams& p) {
  const int64_t n_slices = gathered.size(0), n_rows = gathered.size(1);
  const RowConfig<A> cfg = make_row_config<A>(p);
  const auto* slices = reinterpret_cast<const MixSums<A>*>(gathered.data_ptr<A>());
  auto* out = reinterpret_cast<RowFinal<A>*>(fin.data_ptr<A>());
  // Ignored rows: all-zero constants and mix sums (the Mix step writes zeros): loss stays 0.
  for (int64_t r = 0; r < n_rows; ++r) {
    finalize_slices_mix(out[r], slices + r, n_slices, n_rows, cfg);
  }
}

at::Tensor vp_merge_mix(const at::Tensor& row_final, const at::Tensor& slice_mix,
                        const KDOptions& opt) {
  const KDParams p = params_of(opt);
  const int64_t n_rows = row_final.size(0);
  const at::ScalarType acc = row_final.scalar_type();
  check_record(row_final, 2, n_rows, kFinalFields, acc, "row_final");
  check_record(slice_mix, 3, n_rows, kMixFields, acc, "slice_mix");
  at::Tensor fin = row_final.clone();
  if (acc == at::kDouble) {
    merge_mix_rows<double>(slice_mix, fin, p);
  } else {
    merge_mix_rows<float>(slice_mix, fin, p);
  }
  return fin;
}

template <typename A>
at::Tensor reduce_final(const at::Tensor& fin, Reduction red, at::IntArrayRef lead, double scale) {
  const int64_t n_rows = fin.size(0);
  const auto* rows = reinterpret_cast<const RowFinal<A>*>(fin.data_ptr<A>());
  if (red == Reduction::None) {
    at::Tensor loss = at::empty({n_rows}, fin.options());
    A* out = loss.data_ptr<A>();
    for (int64_t r = 0; r < n_rows; ++r) out[r] = rows[r].res.loss;
    return loss.view(lead);
  }
  // Fixed order, in double (as kd_loss): the same on every process.
  double total = 0;
  for (int64_t r = 0; r < n_rows; ++r) total += static_cast<double>(rows[r].res.loss);
  if (red == Reduction::Mean) total *= scale;
  return at::full({}, total, fin.options());
}

KDOutputs vp_grad(const at::Tensor& student, const at::Tensor& teacher,
                  const std::optional<at::Tensor>& labels, const at::Tensor& row_final,
                  int64_t vocab_offset, const KDOptions& opt, bool grad_student,
                  bool grad_teacher) {
  // With no gradient asked for, the kernel has nothing to do (the loss is in row_final). The
  // kernel step runs with "sum"; the loss is reduced below, from row_final.
  at::Tensor unused;
  Prepared prep =
      grad_student || grad_teacher
          ? run_step(Phase::Grad, student, teacher, labels, vocab_offset, &row_final, &unused,
                     with_reduction(opt, Reduction::Sum), grad_student, grad_teacher)
          : prepare(student, teacher, labels, with_reduction(opt, Reduction::Sum), false, false);
  check_record(row_final, 2, prep.params.n_rows, kFinalFields, accumulate_type(student, teacher),
               "row_final");
  // The mean's scale: 1 / n_valid, as the merge used for the gradients.
  const double scale =
      reduction_scale(opt.reduction, prep.labels, prep.params.n_rows, opt.ignore_index);
  const at::IntArrayRef lead = leading_dims(student);
  at::Tensor loss = row_final.scalar_type() == at::kDouble
                        ? reduce_final<double>(row_final, opt.reduction, lead, scale)
                        : reduce_final<float>(row_final, opt.reduction, lead, scale);
  return {loss, prep.grad_student, prep.grad_teacher, at::ones_like(loss), prep.entropy};
}

}  // namespace

}  // namespace kdfused

TORCH_LIBRARY_IMPL(kdfused, CPU, m) {
  using Ops = kdfused::VocabParallelOps<&kdfused::vp_stats, &kdfused::vp_merge, &kdfused::vp_mix,
                                        &kdfused::vp_merge_mix, &kdfused::vp_grad>;
  kdfused::register_vocab_parallel<Ops>(m);
}
