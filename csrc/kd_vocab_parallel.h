// kd_vocab_parallel.h -- host code of the vocabulary-parallel ops (kd_vp_*), defined with their
// schemas in kd_vocab_parallel.cpp and shared by the CPU (cpu/kd_vocab_parallel_cpu.cpp) and CUDA
// (cuda/kd_vocab_parallel_cuda.cu) implementations.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "kd_host.h"
#include "kd_params.h"

namespace kdfused {

// The records travel as [n_rows, fields] tensors of the accumulation type (kd_math.h SliceStats,
// RowFinal, MixSums).
constexpr int64_t kStatsFields = 10, kFinalFields = 14, kMixFields = 3;
// The column of the student's entropy in a RowFinal record (RowResult::entropy).
constexpr int64_t kFinalEntropyField = 10;

// A record tensor: `dim` dims (3: gathered over the group), [..., n_rows, fields], dtype acc,
// contiguous, on `device`.
void check_record(const at::Tensor& x, int64_t dim, int64_t n_rows, int64_t fields,
                  at::ScalarType acc, const char* name, at::Device device = at::kCPU);

// The options of a step (parse_options). The steps without a reduction argument parse "sum" (what
// their kernels run), those without ignore_index its default (they read no labels).
KDOptions parse_step_options(double temperature, double soft_weight, double hard_weight,
                             c10::string_view divergence, double beta,
                             at::ArrayRef<double> logit_map, bool return_entropy,
                             int64_t ignore_index = KDOptions{}.ignore_index,
                             c10::string_view reduction = "sum");

// KDParams carrying only the options (the merges read no logits).
inline KDParams params_of(const KDOptions& opt) {
  KDParams p;
  static_cast<KDOptions&>(p) = opt;
  return p;
}

// kd_vp_stats: the slice [vocab_offset, vocab_offset + V) must lie inside the whole vocabulary.
void check_slice(const at::Tensor& student, int64_t vocab_offset, int64_t vocab_total);

// kd_vp_merge's checks of the gathered records and the labels (on the records' device); returns
// the labels as int64, contiguous [n_rows], or undefined.
at::Tensor check_merge_inputs(const at::Tensor& slice_stats,
                              const std::optional<at::Tensor>& labels);

// The host part of one kernel step on the slice: checks, prepare(), the phase, the row_final
// record (checked on the logits' device) and the step's output record (*out, Stats / Mix). The
// caller runs the backend's kernel on the returned params. opt: reduction "sum".
Prepared prepare_step(Phase phase, const at::Tensor& student, const at::Tensor& teacher,
                      const std::optional<at::Tensor>& labels, int64_t vocab_offset,
                      const at::Tensor* row_final, at::Tensor* out, const KDOptions& opt,
                      bool grad_student, bool grad_teacher);

// The ops as registered for a device (TORCH_LIBRARY_IMPL; arguments as in the schemas,
// kd_vocab_parallel.cpp): the options parsed once, then the backend's step on the tensors and the
// KDOptions (the arguments' order otherwise kept).
template <auto Stats, auto Merge, auto Mix, auto MergeMix, auto Grad>
struct VocabParallelOps {
  static at::Tensor stats(const at::Tensor& student, const at::Tensor& teacher,
                          const std::optional<at::Tensor>& labels, int64_t vocab_offset,
                          int64_t vocab_total, double temperature, double soft_weight,
                          double hard_weight, c10::string_view divergence, double beta,
                          int64_t ignore_index, at::ArrayRef<double> logit_map,
                          bool return_entropy) {
    check_slice(student, vocab_offset, vocab_total);
    return Stats(student, teacher, labels, vocab_offset, vocab_total,
                 parse_step_options(temperature, soft_weight, hard_weight, divergence, beta,
                                    logit_map, return_entropy, ignore_index));
  }

  static at::Tensor merge(const at::Tensor& slice_stats, const std::optional<at::Tensor>& labels,
                          double temperature, double soft_weight, double hard_weight,
                          c10::string_view divergence, double beta, int64_t ignore_index,
                          c10::string_view reduction, at::ArrayRef<double> logit_map,
                          bool return_entropy) {
    return Merge(slice_stats, labels,
                 parse_step_options(temperature, soft_weight, hard_weight, divergence, beta,
                                    logit_map, return_entropy, ignore_index, reduction));
  }

  static at::Tensor mix(const at::Tensor& student, const at::Tensor& teacher,
                        const std::optional<at::Tensor>& labels, const at::Tensor& row_final,
                        int64_t vocab_offset, double temperature, double soft_weight,
                        double hard_weight, c10::string_view divergence, double beta,
                        int64_t ignore_index, at::ArrayRef<double> logit_map) {
    return Mix(student, teacher, labels, row_final, vocab_offset,
               parse_step_options(temperature, soft_weight, hard_weight, divergence, beta,
                                  logit_map, false, ignore_index));
  }

  static at::Tensor merge_mix(const at::Tensor& row_final, const at::Tensor& slice_mix,
                              double temperature, double soft_weight, double hard_weight,
                              c10::string_view divergence, double beta) {
    return MergeMix(
        row_final, slice_mix,
        parse_step_options(temperature, soft_weight, hard_weight, divergence, beta, {}, false));
  }

  static KDOutputs grad(const at::Tensor& student, const at::Tensor& teacher,
                        const std::optional<at::Tensor>& labels, const at::Tensor& row_final,
                        int64_t vocab_offset, double temperature, double soft_weight,
                        double hard_weight, c10::string_view divergence, double beta,
                        int64_t ignore_index, c10::string_view reduction,
                        at::ArrayRef<double> logit_map, bool grad_student, bool grad_teacher) {
    return Grad(student, teacher, labels, row_final, vocab_offset,
                parse_step_options(temperature, soft_weight, hard_weight, divergence, beta,
                                   logit_map, false, ignore_index, reduction),
                grad_student, grad_teacher);
  }
};

// Registers the five ops of Ops (a VocabParallelOps) on a dispatch key's library.
template <typename Ops>
void register_vocab_parallel(torch::Library& m) {
  m.impl("kd_vp_stats", &Ops::stats);
  m.impl("kd_vp_merge", &Ops::merge);
  m.impl("kd_vp_mix", &Ops::mix);
  m.impl("kd_vp_merge_mix", &Ops::merge_mix);
  m.impl("kd_vp_grad", &Ops::grad);
}

}  // namespace kdfused
