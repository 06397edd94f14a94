// kd_topk.cpp -- schema of the top-k distillation op, its shared argument checks and the
// construction of TopKParams. CPU (cpu/kd_topk_cpu.cpp) and CUDA (cuda/kd_topk_cuda.cu) register
// implementations; autograd and the fake kernel are registered from Python (kdfused/topk.py).
#include "kd_topk.h"

#include <torch/library.h>

#include <cmath>
#include <sstream>
#include <string>

#include "cpu/kd_grad_cache.h"

namespace kdfused::topk {

namespace {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << (s.size() == 1 ? ",)" : ")");
  return os.str();
}

bool is_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

SType to_stype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return SType::Float16;
    case at::kBFloat16: return SType::BFloat16;
    case at::kFloat: return SType::Float32;
    default: return SType::Float64;
  }
}

Red parse_reduction(std::string_view r) {
  if (r == "batchmean" || r == "mean") return Red::Mean;
  if (r == "sum") return Red::Sum;
  if (r == "none") return Red::None;
  TORCH_CHECK_VALUE(false,
                    "kdfused: reduction must be one of 'batchmean', 'mean', 'sum', "
                    "'none', got '",
                    std::string(r), "'");
}

bool parse_ce(std::string_view d) {
  if (d == "kl") return false;
  if (d == "ce") return true;
  TORCH_CHECK_VALUE(false, "kdfused: topk_kd_loss supports divergence 'kl' or 'ce', got '",
                    std::string(d), "'");
}

}  // namespace

void check_topk_inputs(const at::Tensor& s, const at::Tensor& idx, const at::Tensor& val,
                       const std::optional<at::Tensor>& labels, double temperature,
                       double soft_weight, double hard_weight, std::string_view divergence,
                       std::string_view reduction) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                    "kdfused: temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK_VALUE(std::isfinite(soft_weight) && soft_weight >= 0,
                    "kdfused: soft_weight must be finite and >= 0, got ", soft_weight);
  TORCH_CHECK_VALUE(std::isfinite(hard_weight) && hard_weight >= 0,
                    "kdfused: hard_weight must be finite and >= 0, got ", hard_weight);
  parse_ce(divergence);
  parse_reduction(reduction);
  TORCH_CHECK_TYPE(is_float(s.scalar_type()),
                   "kdfused: student_logits must be float16, bfloat16, float32 or float64, got ",
                   s.scalar_type());
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt,
                   "kdfused: teacher_indices must be int64 or int32, got ", idx.scalar_type());
  TORCH_CHECK_TYPE(is_float(val.scalar_type()),
                   "kdfused: teacher_values must be float16, bfloat16, float32 or float64, got ",
                   val.scalar_type());
  TORCH_CHECK_VALUE(s.dim() >= 1,
                    "kdfused: student_logits must have at least 1 dimension "
                    "(..., V), got a 0-dim tensor");
  const int64_t V = s.size(-1);
  TORCH_CHECK_VALUE(V >= 1, "kdfused: the vocabulary (last) dimension must not be empty");
  const at::IntArrayRef lead = s.sizes().slice(0, s.dim() - 1);
  TORCH_CHECK_VALUE(idx.dim() == s.dim() && idx.sizes().slice(0, idx.dim() - 1) == lead,
                    "kdfused: teacher_indices must have shape (..., k) with the student's leading "
                    "dims ",
                    shape_str(lead), ", got ", shape_str(idx.sizes()));
  TORCH_CHECK_VALUE(val.sizes() == idx.sizes(),
                    "kdfused: teacher_values must have the shape of "
                    "teacher_indices ",
                    shape_str(idx.sizes()), ", got ", shape_str(val.sizes()));
  const int64_t k = idx.size(-1);
  TORCH_CHECK_VALUE(k >= 1, "kdfused: k (the last dim of teacher_indices) must be >= 1, got 0");
  TORCH_CHECK_VALUE(k <= V, "kdfused: k = ", k,
                    " teacher entries per row but the vocabulary has "
                    "only V = ",
                    V);
  TORCH_CHECK(idx.device() == s.device() && val.device() == s.device(),
              "kdfused: student_logits, teacher_indices and teacher_values must be on one device, "
              "got ",
              s.device(), ", ", idx.device(), " and ", val.device());
  if (labels.has_value()) {
    const at::Tensor& y = *labels;
    TORCH_CHECK_TYPE(y.scalar_type() == at::kLong || y.scalar_type() == at::kInt,
                     "kdfused: labels must be int64 (or int32), got ", y.scalar_type());
    TORCH_CHECK_VALUE(y.sizes() == lead, "kdfused: labels must have shape ", shape_str(lead),
                      " (the logits' leading dims), got ", shape_str(y.sizes()));
    TORCH_CHECK(y.device() == s.device(), "kdfused: labels must be on the logits' device (",
                s.device(), "), got ", y.device());
  } else {
    TORCH_CHECK_VALUE(hard_weight == 0, "kdfused: hard_weight > 0 needs labels (got labels=None)");
  }
}

at::ScalarType topk_accumulate_type(const at::Tensor& s, const at::Tensor& v) {
  return (s.scalar_type() == at::kDouble || v.scalar_type() == at::kDouble) ? at::kDouble
                                                                            : at::kFloat;
}

TopKPrepared prepare_topk(const at::Tensor& student, const at::Tensor& indices,
                          const at::Tensor& values, const std::optional<at::Tensor>& labels,
                          double temperature, double soft_weight, double hard_weight,
                          std::string_view divergence, int64_t ignore_index,
                          std::string_view reduction, bool grad_student) {
  TopKPrepared prep;
  TopKParams& p = prep.params;
  const int64_t V = student.size(-1);
  const int64_t k = indices.size(-1);
  const at::IntArrayRef lead = student.sizes().slice(0, student.dim() - 1);
  int64_t n_rows = 1;
  for (int64_t d : lead) n_rows *= d;

  // A [n_rows, V] view with a contiguous last dim when one exists (row-strided 2-D views such as
  // logits[:, :-1] are read in place); otherwise a contiguous copy.
  at::Tensor s2 = student.reshape({n_rows, V});
  if (V > 1 && s2.stride(1) != 1) s2 = s2.contiguous();
  prep.student = s2;
  const at::ScalarType acc = topk_accumulate_type(student, values);
  // The teacher side is n_rows x k, small next to the student: converted once here so that the
  // kernels need no template per (index, value) dtype.
  prep.indices = indices.reshape({n_rows, k}).to(at::kLong).contiguous();
  prep.values = values.reshape({n_rows, k}).to(acc).contiguous();

  p.student = s2.data_ptr();
  p.student_dtype = to_stype(student.scalar_type());
  p.student_stride = n_rows > 1 ? s2.stride(0) : V;
  p.indices = prep.indices.data_ptr<int64_t>();
  p.values = prep.values.data_ptr();
  p.n_rows = n_rows;
  p.vocab = V;
  p.k = k;
  p.ignore_index = ignore_index;
  p.temperature = temperature;
  p.inv_temperature = 1.0 / temperature;
  p.soft_weight = soft_weight;
  p.hard_weight = hard_weight;
  p.ce = parse_ce(divergence);
  p.reduction = parse_reduction(reduction);
  if (labels.has_value()) {
    prep.labels = labels->reshape({n_rows}).to(at::kLong).contiguous();
    p.labels = prep.labels.data_ptr<int64_t>();
  }

  const auto acc_opts = student.options().dtype(acc);
  if (p.reduction == Red::None) {
    prep.loss = at::empty(lead, acc_opts);
    prep.row_loss = prep.loss.view({n_rows});
  } else {
    prep.loss = at::empty({}, acc_opts);
    prep.row_loss = at::empty({n_rows}, acc_opts);
  }
  p.row_loss = prep.row_loss.data_ptr();
  p.loss = prep.loss.data_ptr();
  if (grad_student) {
    // CPU gradients come from the same buffer cache as kd_loss's (cpu/kd_grad_cache.h).
    prep.grad_student = student.is_cpu() ? cpu::cached_empty(student.sizes(), student.options())
                                         : at::empty(student.sizes(), student.options());
    p.grad_student = prep.grad_student.data_ptr();
  } else {
    prep.grad_student = at::empty({0}, student.options());
  }
  prep.grad_scale = at::ones_like(prep.loss);
  return prep;
}

}  // namespace kdfused::topk

TORCH_LIBRARY_FRAGMENT(kdfused, m) {
  // Top-k distillation loss and (when asked) the gradient of the reduced loss w.r.t. the student
  // for grad_output = 1, in one call. Returns (loss, grad_student, grad_scale); grad_student is an
  // empty tensor when not asked for. The backward rescales it with kd_scale_grads_.
  m.def(
      "topk_kd_loss(Tensor student, Tensor teacher_indices, Tensor teacher_values, Tensor? labels, "
      "float temperature, float soft_weight, float hard_weight, str divergence, int ignore_index, "
      "str reduction, bool grad_student) -> (Tensor, Tensor, Tensor)");
}
