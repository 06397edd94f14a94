// kd_host.h -- host-side glue shared by every backend: argument checks and KDParams construction.
//
// The op schema (kdfused.cpp) has one implementation per device; each calls check_inputs() before
// touching any data and prepare() to get a filled KDParams and freshly allocated outputs.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "kd_params.h"

namespace kdfused {

// Checks of the scalar options alone (also used by KDLoss's constructor through the Python module).
// Throws ValueError / TypeError (c10::ValueError, c10::TypeError) naming the problem.
void check_options(double temperature, double soft_weight, double hard_weight,
                   std::string_view divergence, double beta, std::string_view reduction);

// Every check that does not need to read tensor data: shapes, dtypes, devices, options.
// Label *values* are checked by the backend (the CPU before computing, the CUDA kernel on device).
void check_inputs(const at::Tensor& student, const at::Tensor& teacher,
                  const std::optional<at::Tensor>& labels, double temperature, double soft_weight,
                  double hard_weight, std::string_view divergence, double beta,
                  std::string_view reduction);

Divergence parse_divergence(std::string_view divergence);
// The divergence the kernels run: parse_divergence, with "jsd" at beta 0 / 1 mapped to KL /
// ReverseKL.
Divergence effective_divergence(std::string_view divergence, double beta);
Reduction parse_reduction(std::string_view reduction);
at::ScalarType accumulate_type(const at::Tensor& student, const at::Tensor& teacher);

// Inputs as the kernels will read them, the outputs to fill, and the params pointing at both.
struct Prepared {
  KDParams params;
  at::Tensor student, teacher;  // possibly copies (only when the last dim is not contiguous, or
                                // more than kMaxRowDims leading dims remain after coalescing)
  at::Tensor labels;            // int64, contiguous [n_rows], or undefined
  at::Tensor loss;              // 0-dim, or the leading shape for reduction "none"
  at::Tensor row_loss;          // [n_rows] (aliases loss for reduction "none")
  at::Tensor grad_student, grad_teacher;  // contiguous, input shape and dtype; or empty [0]
  at::Tensor grad_scale;  // backward state: the grad_output the gradients are scaled for (1)
};

// Allocates the outputs on the inputs' device and fills KDParams (grad_scale left at 1).
Prepared prepare(const at::Tensor& student, const at::Tensor& teacher,
                 const std::optional<at::Tensor>& labels, double temperature, double soft_weight,
                 double hard_weight, std::string_view divergence, double beta, int64_t ignore_index,
                 std::string_view reduction, bool grad_student, bool grad_teacher);

using KDOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline KDOutputs outputs_of(const Prepared& prep) {
  return {prep.loss, prep.grad_student, prep.grad_teacher, prep.grad_scale};
}

}  // namespace kdfused
