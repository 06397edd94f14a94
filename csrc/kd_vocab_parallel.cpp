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
// KDParams::phase set.
//
// This file: the schemas and the host code both implementations share (kd_vocab_parallel.h). CPU:
// cpu/kd_vocab_parallel_cpu.cpp; CUDA: cuda/kd_vocab_parallel_cuda.cu.
#include "kd_vocab_parallel.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "kd_host.h"
#include "kd_math.h"

namespace kdfused {

static_assert(kStatsFields == kSliceStatsFields && kFinalFields == kRowFinalFields &&
                  kMixFields == kMixSumsFields,
              "record fields");
static_assert(offsetof(RowFinal<float>, res.entropy) == kFinalEntropyField * sizeof(float),
              "the entropy's column");

void check_record(const at::Tensor& x, int64_t dim, int64_t n_rows, int64_t fields,
                  at::ScalarType acc, const char* name, at::Device device) {
  TORCH_CHECK(x.dim() == dim && x.size(-2) == n_rows && x.size(-1) == fields &&
                  x.scalar_type() == acc && x.is_contiguous() && x.device() == device,
              "kdfused: ", name, " must be a contiguous ",
              device.is_cpu() ? std::string("CPU") : device.str(), " ", acc, " tensor of shape (",
              dim == 3 ? "group size, " : "", n_rows, ", ", fields, "), got ", x.sizes(), " ",
              x.scalar_type(), " on ", x.device());
}

KDOptions parse_step_options(double temperature, double soft_weight, double hard_weight,
                             c10::string_view divergence, double beta,
                             at::ArrayRef<double> logit_map, bool return_entropy,
                             int64_t ignore_index, c10::string_view reduction) {
  return parse_options(temperature, soft_weight, hard_weight, sv(divergence), beta, ignore_index,
                       sv(reduction), Divergences::All, logit_map, return_entropy);
}

void check_slice(const at::Tensor& student, int64_t vocab_offset, int64_t vocab_total) {
  TORCH_CHECK_VALUE(vocab_total >= vocab_offset + student.size(-1), "kdfused: the slice [",
                    vocab_offset, ", ", vocab_offset + student.size(-1),
                    ") is not inside the vocabulary of ", vocab_total, " columns");
}

at::Tensor check_merge_inputs(const at::Tensor& slice_stats,
                              const std::optional<at::Tensor>& labels) {
  TORCH_CHECK(slice_stats.dim() == 3 && slice_stats.size(0) >= 1,
              "kdfused: slice_stats must have shape (group size, rows, ", kStatsFields, ")");
  const int64_t n_rows = slice_stats.size(1);
  const at::ScalarType acc = slice_stats.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble,
              "kdfused: slice_stats must be float32 or float64, got ", acc);
  check_record(slice_stats, 3, n_rows, kStatsFields, acc, "slice_stats", slice_stats.device());
  TORCH_CHECK(!labels.has_value() || labels->device() == slice_stats.device(),
              "kdfused: labels must be on the device of slice_stats (", slice_stats.device(),
              "), got ", labels.has_value() ? labels->device() : slice_stats.device());
  const at::Tensor y =
      labels.has_value() ? labels->reshape({-1}).to(at::kLong).contiguous() : at::Tensor();
  TORCH_CHECK(!y.defined() || y.numel() == n_rows, "kdfused: labels must have one value per row");
  return y;
}

// The host part of one kernel step on the slice (see kd_vocab_parallel.h).
Prepared prepare_step(Phase phase, const at::Tensor& student, const at::Tensor& teacher,
                      const std::optional<at::Tensor>& labels, int64_t vocab_offset,
                      const at::Tensor* row_final, at::Tensor* out, const KDOptions& opt,
                      bool grad_student, bool grad_teacher) {
  check_inputs(student, teacher, labels, opt);
  TORCH_CHECK_VALUE(vocab_offset >= 0, "kdfused: vocab_offset must be >= 0, got ", vocab_offset);
  Prepared prep = prepare(student, teacher, labels, opt, grad_student, grad_teacher);
  KDParams& p = prep.params;
  p.phase = phase;
  // The steps write no entropy: the stats step accumulates its sum (return_entropy), and the
  // host reads it from the merged records (kFinalEntropyField).
  p.entropy = nullptr;
  prep.entropy = at::empty({0}, prep.loss.options());
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

}  // namespace kdfused

TORCH_LIBRARY_FRAGMENT(kdfused, m) {
  // Options as in kd_loss. Records are [rows, fields] tensors of the accumulation type.
  m.def(
      "kd_vp_stats(Tensor student, Tensor teacher, Tensor? labels, int vocab_offset, "
      "int vocab_total, float temperature, float soft_weight, float hard_weight, str divergence, "
      "float beta, int ignore_index, float[] logit_map, bool return_entropy) -> Tensor");
  m.def(
      "kd_vp_merge(Tensor slice_stats, Tensor? labels, float temperature, float soft_weight, "
      "float hard_weight, str divergence, float beta, int ignore_index, str reduction, "
      "float[] logit_map, bool return_entropy) -> Tensor");
  m.def(
      "kd_vp_mix(Tensor student, Tensor teacher, Tensor? labels, Tensor row_final, "
      "int vocab_offset, float temperature, float soft_weight, float hard_weight, str divergence, "
      "float beta, int ignore_index, float[] logit_map) -> Tensor");
  m.def(
      "kd_vp_merge_mix(Tensor row_final, Tensor slice_mix, float temperature, "
      "float soft_weight, float hard_weight, str divergence, float beta) -> Tensor");
  m.def(
      "kd_vp_grad(Tensor student, Tensor teacher, Tensor? labels, Tensor row_final, "
      "int vocab_offset, float temperature, float soft_weight, float hard_weight, str divergence, "
      "float beta, int ignore_index, str reduction, float[] logit_map, bool grad_student, "
      "bool grad_teacher) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
