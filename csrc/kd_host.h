// kd_host.h -- host-side pieces shared by every op and backend (kd_host.cpp): the options
// (KDOptions from the op's arguments), shape / dtype / label checks, and KDParams construction.
//
// Each op's implementations parse the options once at their entry (parse_options), then check the
// tensors (check_inputs for kd_loss and the steps built on it) before touching any data, and
// prepare() gives a filled KDParams and freshly allocated outputs.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>

#include "kd_params.h"

namespace kdfused {

// A schema's `str` argument as a std::string_view (c10::string_view is its own class in older
// torch releases).
inline std::string_view sv(c10::string_view s) {
  return {s.data(), s.size()};
}

// The divergences an op accepts: every one (kd_loss and the ops built on it) or KL and CE only
// (topk_kd_loss, whose error names the op).
enum class Divergences { All, KLOrCE };

// The one place where the scalar options are checked and become a KDOptions: the strings turn into
// enums, "jsd" at beta 0 / 1 into KL / ReverseKL, and inv_temperature is derived. Throws
// ValueError (c10::ValueError) naming the first bad option, in argument order. logit_map: the
// schemas' `float[] logit_map`, empty (no transform) or [student_logit_scale, teacher_logit_scale,
// student_softcap, teacher_softcap] with softcap 0 for none.
KDOptions parse_options(double temperature, double soft_weight, double hard_weight,
                        std::string_view divergence, double beta, int64_t ignore_index,
                        std::string_view reduction, Divergences allowed = Divergences::All,
                        at::ArrayRef<double> logit_map = {}, bool return_entropy = false);

// The same options with another reduction (the steps that run a kernel with "sum" or "none").
inline KDOptions with_reduction(KDOptions opt, Reduction reduction) {
  opt.reduction = reduction;
  return opt;
}

// ---- shapes, dtypes, labels -------------------------------------------------------------------

// A shape as Python prints it: (2, 3), (5,), ().
std::string shape_str(at::IntArrayRef sizes);

bool is_supported_float(at::ScalarType t);
DType to_dtype(at::ScalarType t);
at::ScalarType scalar_type_of(DType d);

// float, or double when either input is float64: the type of the row losses and the loss.
at::ScalarType accumulate_type(at::ScalarType a, at::ScalarType b);
inline at::ScalarType accumulate_type(const at::Tensor& a, const at::Tensor& b) {
  return accumulate_type(a.scalar_type(), b.scalar_type());
}

// The leading ("row") dims of logits (..., V), and their product.
inline at::IntArrayRef leading_dims(const at::Tensor& logits) {
  return logits.sizes().slice(0, logits.dim() - 1);
}
int64_t count_rows(at::IntArrayRef lead);

// labels: int64 or int32 of shape `lead` on `device`; without labels hard_weight must be 0.
void check_labels(const std::optional<at::Tensor>& labels, at::IntArrayRef lead,
                  const at::Device& device, double hard_weight);

// The labels as the kernels read them: int64, contiguous [n_rows]; undefined without labels.
at::Tensor flat_labels(const std::optional<at::Tensor>& labels, int64_t n_rows);

// The loss output ((lead) for reduction "none", else 0-dim) and the [n_rows] row losses, which
// alias the loss for "none".
std::pair<at::Tensor, at::Tensor> loss_outputs(at::IntArrayRef lead, int64_t n_rows,
                                               Reduction reduction,
                                               const at::TensorOptions& acc_options);

// An uninitialised gradient buffer of `like`'s shape and options. On the CPU it comes from the
// backend's cache of freed gradient buffers (defined with that cache, cpu/kd_grad_cache.cpp).
at::Tensor empty_grad(const at::Tensor& like);

// ---- kd_loss and the ops built on its kernel ---------------------------------------------------

// Every check that does not need to read tensor data: shapes, dtypes, devices (the options were
// checked by parse_options). Label *values* are checked by the backend (the CPU before computing,
// the CUDA kernel on device).
void check_inputs(const at::Tensor& student, const at::Tensor& teacher,
                  const std::optional<at::Tensor>& labels, const KDOptions& opt);

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
  at::Tensor entropy;     // return_entropy: the leading shape, accumulation type; else empty [0]
};

// Allocates the outputs on the inputs' device and fills KDParams (grad_scale left at 1).
Prepared prepare(const at::Tensor& student, const at::Tensor& teacher,
                 const std::optional<at::Tensor>& labels, const KDOptions& opt, bool grad_student,
                 bool grad_teacher);

// (loss, grad_student, grad_teacher, grad_scale, entropy), as the schema says.
using KDOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline KDOutputs outputs_of(const Prepared& prep) {
  return {prep.loss, prep.grad_student, prep.grad_teacher, prep.grad_scale, prep.entropy};
}

// The entropy output of return_entropy (the leading shape, accumulation type) or an empty [0].
at::Tensor entropy_output(at::IntArrayRef lead, bool wanted, const at::TensorOptions& acc_options);

// A backend's kd_loss on parsed options and checked tensors (cpu/kd_loss_cpu.cpp,
// cuda/kd_loss_cuda.cu).
using KDLossFn = KDOutputs (*)(const at::Tensor& student, const at::Tensor& teacher,
                               const std::optional<at::Tensor>& labels, const KDOptions& opt,
                               bool grad_student, bool grad_teacher);

// kd_loss as registered for a device (TORCH_LIBRARY_IMPL; arguments as in the schema,
// kdfused.cpp): the options parsed and the tensors checked, then the backend's Impl.
template <KDLossFn Impl>
KDOutputs kd_loss_op(const at::Tensor& student, const at::Tensor& teacher,
                     const std::optional<at::Tensor>& labels, double temperature,
                     double soft_weight, double hard_weight, c10::string_view divergence,
                     double beta, int64_t ignore_index, c10::string_view reduction,
                     at::ArrayRef<double> logit_map, bool return_entropy, bool grad_student,
                     bool grad_teacher) {
  const KDOptions opt =
      parse_options(temperature, soft_weight, hard_weight, sv(divergence), beta, ignore_index,
                    sv(reduction), Divergences::All, logit_map, return_entropy);
  check_inputs(student, teacher, labels, opt);
  return Impl(student, teacher, labels, opt, grad_student, grad_teacher);
}

}  // namespace kdfused
