// kd_topk_params.h -- the only contract between the host code of topk_kd_loss and its kernels.
// Plain data, no ATen: included by the CPU kernels compiled per instruction set (before their
// target pragmas) and by the CUDA kernels.
#pragma once

#include <cstdint>

#include "kd_params.h"

namespace kdfused::topk {

// Plain data only: the CPU kernels (compiled once per instruction set) and the CUDA kernels see
// exactly this. The options (KDOptions) are those of kd_loss, with divergence KL or CE only.
struct TopKParams : KDOptions {
  const void* student = nullptr;  // [n_rows, vocab], last dim contiguous, rows student_stride
                                  // elements apart
  DType student_dtype = DType::Float32;
  int64_t student_stride = 0;        // elements between rows
  const int64_t* indices = nullptr;  // [n_rows, k] contiguous, int64
  const void* values = nullptr;      // [n_rows, k] contiguous, in the accumulation type
  const int64_t* labels = nullptr;   // [n_rows] contiguous, or nullptr (all rows valid)
  int64_t n_rows = 0;
  int64_t vocab = 0;
  int64_t k = 0;
  bool ce = false;               // derived: divergence == Divergence::CE (else KL)
  void* row_loss = nullptr;      // [n_rows], accumulation type; 0 at ignored rows
  void* loss = nullptr;          // 0-dim, accumulation type (unused for Reduction::None)
  void* grad_student = nullptr;  // [n_rows, vocab] contiguous, student dtype; or nullptr
  double grad_scale = 1.0;       // CPU: 1 / max(n_valid, 1) for Mean, else 1
};

}  // namespace kdfused::topk
