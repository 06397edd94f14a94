// kd_vocab_parallel.cpp -- the steps of the vocabulary-parallel loss (kdfused/parallel.py): each
// process holds a contiguous slice of every row's columns; the steps below run on the slice and
// produce / consume the per-row records (kd_math.h SliceStats, RowFinal, MixSums) that the
// processes exchange between them with torch.distributed:
//
//   kd_vp_stats      slice -> SliceStats per row                      (then all_gather)
//   kd_vp_merge      all slices' SliceStats -> RowFinal per row, merged in slice order
//   kd_vp_mix        jsd / tvd: slice + RowFinal -> MixSums per row   (then all_gather)
//   kd_vp_merge_mix  jsd / tvd: all slices' MixSums -> complete RowFinal
//   kd_vp_grad       slice + RowFinal -> the reduced loss and the slice's gradients
//
// The merges run the same code on the same gathered records in every process, so the loss is
// bitwise identical everywhere. The kernels are the ordinary ones (cpu::run_forward) with
// KDParams::phase set. CUDA: cuda/kd_vocab_parallel_cuda.cu (the host helpers it shares with this
// file are declared in kd_vocab_parallel.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>

#include "cpu/kd_cpu_dispatch.h"
#include "kd_host.h"
#include "kd_math.h"
#include "kd_vocab_parallel.h"

namespace kdfused {

static_assert(kStatsFields == 9 && kFinalFields == 13 && kMixFields == 3, "record fields");

void check_record(const at::Tensor& x, int64_t dim, int64_t n_rows, int64_t fields,
                  at::ScalarType acc, const char* name, at::Device device) {
  TORCH_CHECK(x.dim() == dim && x.size(-2) == n_rows && x.size(-1) == fields &&
                  x.scalar_type() == acc && x.is_contiguous() && x.device() == device,
              "kdfused: ", name, " must be a contiguous ",
              device.is_cpu() ? std::string("CPU") : device.str(), " ", acc, " tensor of shape (",
              dim == 3 ? "group size, " : "", n_rows, ", ", fields, "), got ", x.sizes(), " ",
              x.scalar_type(), " on ", x.device());
}

// The host part of one kernel step on the slice (see kd_vocab_parallel.h).
Prepared prepare_step(Phase phase, const at::Tensor& student, const at::Tensor& teacher,
                      const std::optional<at::Tensor>& labels, int64_t vocab_offset,
                      const at::Tensor* row_final, at::Tensor* out, double temperature,
                      double soft_weight, double hard_weight, std::string_view div, double beta,
                      int64_t ignore_index, bool grad_student, bool grad_teacher) {
  check_inputs(student, teacher, labels, temperature, soft_weight, hard_weight, div, beta, "sum");
  TORCH_CHECK_VALUE(vocab_offset >= 0, "kdfused: vocab_offset must be >= 0, got ", vocab_offset);
  Prepared prep = prepare(student, teacher, labels, temperature, soft_weight, hard_weight, div,
                          beta, ignore_index, "sum", grad_student, grad_teacher);
  KDParams& p = prep.params;
  p.phase = phase;
  p.vocab_offset = vocab_offset;
  const at::ScalarType acc = accumulate_type(student, teacher);
  if (row_final != nullptr) {
    check_record(*row_final, 2, p.n_rows, kFinalFields, acc, "row_final", student.device());
    p.row_final = row_final->data_ptr();
  }
  if (phase == Phase::Stats) {
    *out = at::empty({p.n_rows, kStatsFields}, student.options().dtype(acc));
    p.slice_stats = out->data_ptr();
  } else if (phase == Phase::Mix) {
    *out = at::empty({p.n_rows, kMixFields}, student.options().dtype(acc));
    p.slice_mix = out->data_ptr();
  }
  return prep;
}

namespace {

// Runs one kernel step on the slice; returns the prepared call (outputs, labels, params).
Prepared run_step(Phase phase, const at::Tensor& student, const at::Tensor& teacher,
                  const std::optional<at::Tensor>& labels, int64_t vocab_offset,
                  const at::Tensor* row_final, at::Tensor* out, double temperature,
                  double soft_weight, double hard_weight, std::string_view div, double beta,
                  int64_t ignore_index, bool grad_student, bool grad_teacher) {
  Prepared prep =
      prepare_step(phase, student, teacher, labels, vocab_offset, row_final, out, temperature,
                   soft_weight, hard_weight, div, beta, ignore_index, grad_student, grad_teacher);
  if (prep.params.n_rows > 0) cpu::run_forward(prep.params);
  return prep;
}

at::Tensor kd_vp_stats_cpu(const at::Tensor& student, const at::Tensor& teacher,
                           const std::optional<at::Tensor>& labels, int64_t vocab_offset,
                           int64_t vocab_total, double temperature, double soft_weight,
                           double hard_weight, c10::string_view divergence, double beta,
                           int64_t ignore_index) {
  TORCH_CHECK_VALUE(vocab_total >= vocab_offset + student.size(-1), "kdfused: the slice [",
                    vocab_offset, ", ", vocab_offset + student.size(-1),
                    ") is not inside the vocabulary of ", vocab_total, " columns");
  // Shapes first (check_inputs in run_step), then label values: both before the kernel runs.
  check_inputs(student, teacher, labels, temperature, soft_weight, hard_weight, sv(divergence),
               beta, "sum");
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
  run_step(Phase::Stats, student, teacher, labels, vocab_offset, nullptr, &out, temperature,
           soft_weight, hard_weight, sv(divergence), beta, ignore_index, false, false);
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

}  // namespace

// KDParams carrying only the options (the merges read no logits).
KDParams options_params(double temperature, double soft_weight, double hard_weight,
                        std::string_view div, double beta, std::string_view red) {
  check_options(temperature, soft_weight, hard_weight, div, beta, red);
  KDParams p;
  p.temperature = temperature;
  p.inv_temperature = 1.0 / temperature;
  p.soft_weight = soft_weight;
  p.hard_weight = hard_weight;
  p.divergence = effective_divergence(div, beta);
  p.beta = beta;
  p.reduction = parse_reduction(red);
  return p;
}

namespace {

at::Tensor kd_vp_merge_cpu(const at::Tensor& slice_stats, const std::optional<at::Tensor>& labels,
                           double temperature, double soft_weight, double hard_weight,
                           c10::string_view divergence, double beta, int64_t ignore_index,
                           c10::string_view reduction) {
  KDParams p =
      options_params(temperature, soft_weight, hard_weight, sv(divergence), beta, sv(reduction));
  TORCH_CHECK(slice_stats.dim() == 3 && slice_stats.size(0) >= 1,
              "kdfused: slice_stats must have shape (group size, rows, ", kStatsFields, ")");
  const int64_t n_rows = slice_stats.size(1);
  const at::ScalarType acc = slice_stats.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble,
              "kdfused: slice_stats must be float32 or "
              "float64, got ",
              acc);
  check_record(slice_stats, 3, n_rows, kStatsFields, acc, "slice_stats");
  const at::Tensor y =
      labels.has_value() ? labels->reshape({-1}).to(at::kLong).contiguous() : at::Tensor();
  TORCH_CHECK(!y.defined() || y.numel() == n_rows, "kdfused: labels must have one value per row");
  p.grad_scale = reduction_scale(p.reduction, y, n_rows, ignore_index);
  at::Tensor fin = at::empty({n_rows, kFinalFields}, slice_stats.options());
  if (acc == at::kDouble) {
    merge_rows<double>(slice_stats, y, fin, p, ignore_index);
  } else {
    merge_rows<float>(slice_stats, y, fin, p, ignore_index);
  }
  return fin;
}

at::Tensor kd_vp_mix_cpu(const at::Tensor& student, const at::Tensor& teacher,
                         const std::optional<at::Tensor>& labels, const at::Tensor& row_final,
                         int64_t vocab_offset, double temperature, double soft_weight,
                         double hard_weight, c10::string_view divergence, double beta,
                         int64_t ignore_index) {
  at::Tensor out;
  run_step(Phase::Mix, student, teacher, labels, vocab_offset, &row_final, &out, temperature,
           soft_weight, hard_weight, sv(divergence), beta, ignore_index, false, false);
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

at::Tensor kd_vp_merge_mix_cpu(const at::Tensor& row_final, const at::Tensor& slice_mix,
                               double temperature, double soft_weight, double hard_weight,
                               c10::string_view divergence, double beta) {
  KDParams p = options_params(temperature, soft_weight, hard_weight, sv(divergence), beta, "sum");
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

KDOutputs kd_vp_grad_cpu(const at::Tensor& student, const at::Tensor& teacher,
                         const std::optional<at::Tensor>& labels, const at::Tensor& row_final,
                         int64_t vocab_offset, double temperature, double soft_weight,
                         double hard_weight, c10::string_view divergence, double beta,
                         int64_t ignore_index, c10::string_view reduction, bool grad_student,
                         bool grad_teacher) {
  const Reduction red = parse_reduction(sv(reduction));
  at::Tensor unused;
  // With no gradient asked for, the kernel has nothing to do (the loss is in row_final).
  const bool any = grad_student || grad_teacher;
  Prepared prep = any ? run_step(Phase::Grad, student, teacher, labels, vocab_offset, &row_final,
                                 &unused, temperature, soft_weight, hard_weight, sv(divergence),
                                 beta, ignore_index, grad_student, grad_teacher)
                      : prepare(student, teacher, labels, temperature, soft_weight, hard_weight,
                                sv(divergence), beta, ignore_index, "sum", false, false);
  check_record(row_final, 2, prep.params.n_rows, kFinalFields, accumulate_type(student, teacher),
               "row_final");
  // The mean's scale: 1 / n_valid, as the merge used for the gradients.
  const at::Tensor y = prep.labels;
  const double scale = reduction_scale(red, y, prep.params.n_rows, ignore_index);
  const at::IntArrayRef lead = student.sizes().slice(0, student.dim() - 1);
  at::Tensor loss = row_final.scalar_type() == at::kDouble
                        ? reduce_final<double>(row_final, red, lead, scale)
                        : reduce_final<float>(row_final, red, lead, scale);
  return {loss, prep.grad_student, prep.grad_teacher, at::ones_like(loss)};
}

}  // namespace

}  // namespace kdfused

TORCH_LIBRARY_FRAGMENT(kdfused, m) {
  // Options as in kd_loss. Records are [rows, fields] tensors of the accumulation type.
  m.def(
      "kd_vp_stats(Tensor student, Tensor teacher, Tensor? labels, int vocab_offset, "
      "int vocab_total, float temperature, float soft_weight, float hard_weight, str divergence, "
      "float beta, int ignore_index) -> Tensor");
  m.def(
      "kd_vp_merge(Tensor slice_stats, Tensor? labels, float temperature, float soft_weight, "
      "float hard_weight, str divergence, float beta, int ignore_index, str reduction) -> Tensor");
  m.def(
      "kd_vp_mix(Tensor student, Tensor teacher, Tensor? labels, Tensor row_final, "
      "int vocab_offset, float temperature, float soft_weight, float hard_weight, str divergence, "
      "float beta, int ignore_index) -> Tensor");
  m.def(
      "kd_vp_merge_mix(Tensor row_final, Tensor slice_mix, float temperature, "
      "float soft_weight, float hard_weight, str divergence, float beta) -> Tensor");
  m.def(
      "kd_vp_grad(Tensor student, Tensor teacher, Tensor? labels, Tensor row_final, "
      "int vocab_offset, float temperature, float soft_weight, float hard_weight, str divergence, "
      "float beta, int ignore_index, str reduction, bool grad_student, bool grad_teacher) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kdfused, CPU, m) {
  m.impl("kd_vp_stats", &kdfused::kd_vp_stats_cpu);
  m.impl("kd_vp_merge", &kdfused::kd_vp_merge_cpu);
  m.impl("kd_vp_mix", &kdfused::kd_vp_mix_cpu);
  m.impl("kd_vp_merge_mix", &kdfused::kd_vp_merge_mix_cpu);
  m.impl("kd_vp_grad", &kdfused::kd_vp_grad_cpu);
}
