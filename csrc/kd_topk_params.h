// kd_topk_params.h -- the only contract between the host code of topk_kd_loss and its kernels.
// Plain data, no ATen: included by the CPU kernels compiled per instruction set (before their
// target pragmas) and by the CUDA kernels.
#pragma once

#include <cstdint>

#include "kd_params.h"

namespace kdfused::topk {

// Over which buckets the two distributions are compared (kd_topk_math.h has the maths). Values
// are part of the ABI between host and kernels.
enum class Support : int32_t {
  Full = 0,          // teacher renormalised over its valid entries, student over the vocabulary
  Renormalized = 1,  // both renormalised over the valid entries
  Tail = 2,          // the valid entries plus one tail bucket per side holding the rest of the mass
};

// The options of topk_kd_loss: kd_loss's (KL or CE only for Support::Full), the support, and how
// the stored teacher values are read.
struct TopKOptions : KDOptions {
  Support support = Support::Full;
  // The stored values are the teacher's final log-probabilities (no temperature, no transform);
  // else logits, divided by the temperature.
  bool logprobs = false;
};

// Plain data only: the CPU kernels (compiled once per instruction set) and the CUDA kernels see
// exactly this.
struct TopKParams : TopKOptions {
  const void* student = nullptr;  // [n_rows, vocab], last dim contiguous, rows student_stride
                                  // elements apart
  DType student_dtype = DType::Float32;
  int64_t student_stride = 0;        // elements between rows
  const int64_t* indices = nullptr;  // [n_rows, k] contiguous, int64
  const void* values = nullptr;      // [n_rows, k] contiguous, in the accumulation type; -inf
                                     // marks an entry outside the support
  const int64_t* labels = nullptr;   // [n_rows] contiguous, or nullptr (all rows valid)
  int64_t n_rows = 0;
  int64_t vocab = 0;
  int64_t k = 0;
  void* row_loss = nullptr;      // [n_rows], accumulation type; 0 at ignored rows
  void* loss = nullptr;          // 0-dim, accumulation type (unused for Reduction::None)
  void* grad_student = nullptr;  // [n_rows, vocab] contiguous, student dtype; or nullptr
  double grad_scale = 1.0;       // CPU: 1 / max(n_valid, 1) for Mean, else 1
};

}  // namespace kdfused::topk
