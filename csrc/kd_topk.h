// kd_topk.h -- the top-k distillation op: its host/kernel contract and the host-side code the CPU
// and CUDA backends share (kd_topk.cpp; the pieces every op shares are kd_host.h).
//
// Offline distillation from a stored teacher: per row, only the teacher's k largest entries (logits
// or log-probabilities) and their vocabulary indices are kept. The loss compares the two
// distributions over a support made of those entries (kd_topk_math.h has the maths).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>

#include "kd_host.h"
#include "kd_topk_params.h"

namespace kdfused::topk {

// The op's options: parse_options (divergence "kl" or "ce" only for support "full"), the support
// ("full", "renormalized", "tail") and the kind of stored values ("logits", "logprobs"; "tail"
// needs "logprobs", which takes no teacher transform).
TopKOptions parse_topk_options(double temperature, double soft_weight, double hard_weight,
                               std::string_view divergence, double beta, int64_t ignore_index,
                               std::string_view reduction, at::ArrayRef<double> logit_map,
                               std::string_view support, std::string_view values);

// Every check that needs no tensor data (shapes, dtypes, devices). ValueError/TypeError.
void check_topk_inputs(const at::Tensor& student, const at::Tensor& indices,
                       const at::Tensor& values, const std::optional<at::Tensor>& labels,
                       const TopKOptions& opt);

// Inputs as the kernels read them, the outputs to fill, and the params pointing at both.
struct TopKPrepared {
  TopKParams params;
  at::Tensor student;         // possibly a contiguous copy (only when no [n_rows, V] view exists)
  at::Tensor indices;         // int64, contiguous [n_rows, k]
  at::Tensor values;          // accumulation type, contiguous [n_rows, k]
  at::Tensor labels;          // int64, contiguous [n_rows], or undefined
  at::Tensor loss, row_loss;  // row_loss aliases loss for reduction "none"
  at::Tensor grad_student;    // student shape and dtype, contiguous; or empty [0]
  at::Tensor grad_scale;      // the grad_output the gradient is scaled for (1)
};

TopKPrepared prepare_topk(const at::Tensor& student, const at::Tensor& indices,
                          const at::Tensor& values, const std::optional<at::Tensor>& labels,
                          const TopKOptions& opt, bool grad_student);

using TopKOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

inline TopKOutputs topk_outputs_of(const TopKPrepared& prep) {
  return {prep.loss, prep.grad_student, prep.grad_scale};
}

// A backend's topk_kd_loss on parsed options and checked tensors (cpu/kd_topk_cpu.cpp,
// cuda/kd_topk_cuda.cu).
using TopKFn = TopKOutputs (*)(const at::Tensor& student, const at::Tensor& indices,
                               const at::Tensor& values, const std::optional<at::Tensor>& labels,
                               const TopKOptions& opt, bool grad_student);

// topk_kd_loss as registered for a device (TORCH_LIBRARY_IMPL; arguments as in the schema,
// kd_topk.cpp): the options parsed and the tensors checked, then the backend's Impl.
template <TopKFn Impl>
TopKOutputs topk_kd_loss_op(const at::Tensor& student, const at::Tensor& indices,
                            const at::Tensor& values, const std::optional<at::Tensor>& labels,
                            double temperature, double soft_weight, double hard_weight,
                            c10::string_view divergence, double beta, int64_t ignore_index,
                            c10::string_view reduction, at::ArrayRef<double> logit_map,
                            c10::string_view support, c10::string_view value_kind,
                            bool grad_student) {
  const TopKOptions opt =
      parse_topk_options(temperature, soft_weight, hard_weight, sv(divergence), beta, ignore_index,
                         sv(reduction), logit_map, sv(support), sv(value_kind));
  check_topk_inputs(student, indices, values, labels, opt);
  return Impl(student, indices, values, labels, opt, grad_student);
}

}  // namespace kdfused::topk
