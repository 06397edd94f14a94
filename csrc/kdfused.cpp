// kdfused.cpp -- the op schemas, the argument checks every backend shares, KDParams construction.
// (The Python module is kd_python.cpp; this file is all a C++-only build needs besides the
// kernels.)
//
// The schema is the single source of truth; CPU (cpu/kd_loss_cpu.cpp) and CUDA
// (cuda/kd_loss_cuda.cu) register implementations of it. Autograd and fake tensors are registered
// from Python (kdfused/_ops.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/kd_grad_cache.h"
#include "kd_host.h"

namespace kdfused {

namespace {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << (s.size() == 1 ? ",)" : ")");
  return os.str();
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    case at::kFloat: return DType::Float32;
    default: return DType::Float64;
  }
}

}  // namespace

Divergence parse_divergence(std::string_view d) {
  if (d == "kl") return Divergence::KL;
  if (d == "ce") return Divergence::CE;
  if (d == "reverse_kl") return Divergence::ReverseKL;
  if (d == "jsd") return Divergence::JSD;
  if (d == "tvd") return Divergence::TVD;
  TORCH_CHECK_VALUE(
      false, "kdfused: divergence must be one of 'kl', 'ce', 'reverse_kl', 'jsd', 'tvd', got '",
      std::string(d), "'");
}

Divergence effective_divergence(std::string_view d, double beta) {
  const Divergence div = parse_divergence(d);
  // The generalised JSD's end points are the two KLs (as TRL and Liger define them): beta = 0 is
  // KL(p || q), beta = 1 is KL(q || p). Mapping them here makes them bitwise equal to "kl" /
  // "reverse_kl" and keeps the kernels' JSD free of the 0 * log(0) limits of those ends.
  if (div == Divergence::JSD && beta == 0.0) return Divergence::KL;
  if (div == Divergence::JSD && beta == 1.0) return Divergence::ReverseKL;
  return div;
}

Reduction parse_reduction(std::string_view r) {
  if (r == "batchmean" || r == "mean") return Reduction::Mean;
  if (r == "sum") return Reduction::Sum;
  if (r == "none") return Reduction::None;
  TORCH_CHECK_VALUE(false,
                    "kdfused: reduction must be one of 'batchmean', 'mean', 'sum', 'none', got '",
                    std::string(r), "'");
}

void check_options(double temperature, double soft_weight, double hard_weight,
                   std::string_view divergence, double beta, std::string_view reduction) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                    "kdfused: temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK_VALUE(std::isfinite(soft_weight) && soft_weight >= 0,
                    "kdfused: soft_weight must be finite and >= 0, got ", soft_weight);
  TORCH_CHECK_VALUE(std::isfinite(hard_weight) && hard_weight >= 0,
                    "kdfused: hard_weight must be finite and >= 0, got ", hard_weight);
  parse_divergence(divergence);
  TORCH_CHECK_VALUE(beta >= 0 && beta <= 1, "kdfused: beta must be in [0, 1], got ", beta);
  parse_reduction(reduction);
}

void check_inputs(const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& labels,
                  double temperature, double soft_weight, double hard_weight,
                  std::string_view divergence, double beta, std::string_view reduction) {
  check_options(temperature, soft_weight, hard_weight, divergence, beta, reduction);
  TORCH_CHECK_TYPE(is_supported_float(s.scalar_type()),
                   "kdfused: student_logits must be float16, bfloat16, float32 or float64, got ",
                   s.scalar_type());
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()),
                   "kdfused: teacher_logits must be float16, bfloat16, float32 or float64, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(s.dim() >= 1,
                    "kdfused: logits must have at least 1 dimension (..., V), got a 0-dim tensor");
  TORCH_CHECK_VALUE(s.sizes() == t.sizes(),
                    "kdfused: student and teacher logits must have the same shape, got ",
                    shape_str(s.sizes()), " and ", shape_str(t.sizes()));
  TORCH_CHECK_VALUE(s.size(-1) >= 1, "kdfused: the vocabulary (last) dimension must not be empty");
  TORCH_CHECK(s.device() == t.device(),
              "kdfused: student and teacher logits must be on the same device, got ", s.device(),
              " and ", t.device());
  if (labels.has_value()) {
    const at::Tensor& y = *labels;
    TORCH_CHECK_TYPE(y.scalar_type() == at::kLong || y.scalar_type() == at::kInt,
                     "kdfused: labels must be int64 (or int32), got ", y.scalar_type());
    TORCH_CHECK_VALUE(y.sizes() == s.sizes().slice(0, s.dim() - 1),
                      "kdfused: labels must have shape ",
                      shape_str(s.sizes().slice(0, s.dim() - 1)),
                      " (the logits' leading dims), got ", shape_str(y.sizes()));
    TORCH_CHECK(y.device() == s.device(), "kdfused: labels must be on the logits' device (",
                s.device(), "), got ", y.device());
  } else {
    TORCH_CHECK_VALUE(hard_weight == 0, "kdfused: hard_weight > 0 needs labels (got labels=None)");
  }
}

at::ScalarType accumulate_type(const at::Tensor& s, const at::Tensor& t) {
  return (s.scalar_type() == at::kDouble || t.scalar_type() == at::kDouble) ? at::kDouble
                                                                            : at::kFloat;
}

namespace {

// Coalesces the leading dims of both inputs into at most kMaxRowDims (size, stride) pairs.
// Returns false when more remain (the caller then copies to contiguous).
bool coalesce_rows(const at::Tensor& s, const at::Tensor& t, KDParams& p) {
  std::vector<int64_t> sizes, ss, ts;
  for (int64_t d = 0; d + 1 < s.dim(); ++d) {
    if (s.size(d) == 1) continue;  // size-1 dims carry no offset
    sizes.push_back(s.size(d));
    ss.push_back(s.stride(d));
    ts.push_back(t.stride(d));
  }
  // Merge dim i into dim i-1 when (i-1) steps exactly over all of i in both inputs.
  std::vector<int64_t> cz, cs, ct;
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (!cz.empty() && cs.back() == ss[i] * sizes[i] && ct.back() == ts[i] * sizes[i]) {
      cz.back() *= sizes[i];
      cs.back() = ss[i];
      ct.back() = ts[i];
    } else {
      cz.push_back(sizes[i]);
      cs.push_back(ss[i]);
      ct.push_back(ts[i]);
    }
  }
  if (cz.empty()) {  // a single row (or only size-1 leading dims)
    cz = {1};
    cs = {0};
    ct = {0};
  }
  if (static_cast<int>(cz.size()) > kMaxRowDims) return false;
  p.row_ndim = static_cast<int32_t>(cz.size());
  for (size_t i = 0; i < cz.size(); ++i) {
    p.row_sizes[i] = cz[i];
    p.student_strides[i] = cs[i];
    p.teacher_strides[i] = ct[i];
  }
  return true;
}

}  // namespace

Prepared prepare(const at::Tensor& student, const at::Tensor& teacher,
                 const std::optional<at::Tensor>& labels, double temperature, double soft_weight,
                 double hard_weight, std::string_view divergence, double beta, int64_t ignore_index,
                 std::string_view reduction, bool grad_student, bool grad_teacher) {
  Prepared prep;
  KDParams& p = prep.params;
  const int64_t V = student.size(-1);
  const at::IntArrayRef lead = student.sizes().slice(0, student.dim() - 1);
  int64_t n_rows = 1;
  for (int64_t d : lead) n_rows *= d;

  // The kernels need a contiguous last dim; rows may be strided (no copy for logits[:, :-1]).
  prep.student = (V == 1 || student.stride(-1) == 1) ? student : student.contiguous();
  prep.teacher = (V == 1 || teacher.stride(-1) == 1) ? teacher : teacher.contiguous();
  if (n_rows == 0) {
    p.row_ndim = 1;
    p.row_sizes[0] = 0;
  } else if (!coalesce_rows(prep.student, prep.teacher, p)) {
    prep.student = prep.student.contiguous();
    prep.teacher = prep.teacher.contiguous();
    TORCH_INTERNAL_ASSERT(coalesce_rows(prep.student, prep.teacher, p));
  }

  p.student = prep.student.data_ptr();
  p.teacher = prep.teacher.data_ptr();
  p.student_dtype = to_dtype(student.scalar_type());
  p.teacher_dtype = to_dtype(teacher.scalar_type());
  p.n_rows = n_rows;
  p.vocab = V;
  p.ignore_index = ignore_index;
  p.temperature = temperature;
  p.inv_temperature = 1.0 / temperature;
  p.soft_weight = soft_weight;
  p.hard_weight = hard_weight;
  p.divergence = effective_divergence(divergence, beta);
  p.beta = beta;
  p.reduction = parse_reduction(reduction);

  if (labels.has_value()) {
    prep.labels = labels->reshape({n_rows}).to(at::kLong).contiguous();
    p.labels = prep.labels.data_ptr<int64_t>();
  }

  const auto acc_opts = student.options().dtype(accumulate_type(student, teacher));
  if (p.reduction == Reduction::None) {
    prep.loss = at::empty(lead, acc_opts);
    prep.row_loss = prep.loss.view({n_rows});
  } else {
    prep.loss = at::empty({}, acc_opts);
    prep.row_loss = at::empty({n_rows}, acc_opts);
  }
  p.row_loss = prep.row_loss.data_ptr();
  p.loss = prep.loss.data_ptr();
  // CPU gradients come from a small cache of freed gradient buffers (cpu/kd_grad_cache.h).
  auto grad_buffer = [](const at::Tensor& like) {
    return like.is_cpu() ? cpu::cached_empty(like.sizes(), like.options())
                         : at::empty(like.sizes(), like.options());
  };
  prep.grad_student = grad_student ? grad_buffer(student) : at::empty({0}, student.options());
  prep.grad_teacher = grad_teacher ? grad_buffer(teacher) : at::empty({0}, teacher.options());
  p.grad_student = grad_student ? prep.grad_student.data_ptr() : nullptr;
  p.grad_teacher = grad_teacher ? prep.grad_teacher.data_ptr() : nullptr;
  prep.grad_scale = at::ones_like(prep.loss);
  return prep;
}

}  // namespace kdfused

TORCH_LIBRARY(kdfused, m) {
  // Loss and (when asked) the gradients of the reduced loss for grad_output = 1, in one call.
  // Returns (loss, grad_student, grad_teacher, grad_scale); a gradient not asked for is an empty
  // tensor. grad_scale is the backward's state: the grad_output the gradients are scaled for.
  m.def(
      "kd_loss(Tensor student, Tensor teacher, Tensor? labels, float temperature, float "
      "soft_weight, "
      "float hard_weight, str divergence, float beta, int ignore_index, str reduction, "
      "bool grad_student, "
      "bool grad_teacher) -> (Tensor, Tensor, Tensor, Tensor)");
  // Backward: rescales the saved gradients in place from grad_scale to grad_output, and records
  // grad_output in grad_scale. When they are equal (loss.backward(): grad_output = 1) nothing
  // moves.
  m.def(
      "kd_scale_grads_(Tensor(a!) grad_student, Tensor(b!) grad_teacher, Tensor(c!) grad_scale, "
      "Tensor grad_output) -> ()");
}
