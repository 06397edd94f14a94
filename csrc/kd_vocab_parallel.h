// kd_vocab_parallel.h -- host-side helpers of the vocabulary-parallel ops (kd_vp_*), shared by the
// CPU implementation (kd_vocab_parallel.cpp, which defines them and the op schema) and the CUDA
// one (cuda/kd_vocab_parallel_cuda.cu).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <string_view>

#include "kd_host.h"
#include "kd_params.h"

namespace kdfused {

// The records travel as [n_rows, fields] tensors of the accumulation type (kd_math.h SliceStats,
// RowFinal, MixSums).
constexpr int64_t kStatsFields = 9, kFinalFields = 13, kMixFields = 3;

inline std::string_view sv(c10::string_view s) {
  return {s.data(), s.size()};
}

// A record tensor: `dim` dims (3: gathered over the group), [..., n_rows, fields], dtype acc,
// contiguous, on `device`.
void check_record(const at::Tensor& x, int64_t dim, int64_t n_rows, int64_t fields,
                  at::ScalarType acc, const char* name, at::Device device = at::kCPU);

// KDParams carrying only the options (the merges read no logits).
KDParams options_params(double temperature, double soft_weight, double hard_weight,
                        std::string_view div, double beta, std::string_view red);

// The host part of one kernel step on the slice: checks, prepare(), the phase, the row_final
// record (checked on the logits' device) and the step's output record (*out, Stats / Mix). The
// caller runs the backend's kernel on the returned params.
Prepared prepare_step(Phase phase, const at::Tensor& student, const at::Tensor& teacher,
                      const std::optional<at::Tensor>& labels, int64_t vocab_offset,
                      const at::Tensor* row_final, at::Tensor* out, double temperature,
                      double soft_weight, double hard_weight, std::string_view div, double beta,
                      int64_t ignore_index, bool grad_student, bool grad_teacher);

}  // namespace kdfused
