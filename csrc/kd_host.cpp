// kd_host.cpp -- the host-side pieces every op shares (see kd_host.h): option parsing, the shape /
// dtype / label checks, and the construction of KDParams for kd_loss and the ops built on its
// kernel (kd_linear_loss's chunks, the vocabulary-parallel steps).
#include "kd_host.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace kdfused {

namespace {

Divergence parse_divergence(std::string_view d, Divergences allowed) {
  if (allowed == Divergences::KLOrCE) {
    if (d == "kl") return Divergence::KL;
    if (d == "ce") return Divergence::CE;
    TORCH_CHECK_VALUE(false,
                      "kdfused: topk_kd_loss with support='full' supports divergence 'kl' or "
                      "'ce' (the others need support='renormalized' or 'tail'), got '",
                      std::string(d), "'");
  }
  if (d == "kl") return Divergence::KL;
  if (d == "ce") return Divergence::CE;
  if (d == "reverse_kl") return Divergence::ReverseKL;
  if (d == "jsd") return Divergence::JSD;
  if (d == "tvd") return Divergence::TVD;
  TORCH_CHECK_VALUE(
      false, "kdfused: divergence must be one of 'kl', 'ce', 'reverse_kl', 'jsd', 'tvd', got '",
      std::string(d), "'");
}

Reduction parse_reduction(std::string_view r) {
  if (r == "batchmean" || r == "mean") return Reduction::Mean;
  if (r == "sum") return Reduction::Sum;
  if (r == "none") return Reduction::None;
  TORCH_CHECK_VALUE(false,
                    "kdfused: reduction must be one of 'batchmean', 'mean', 'sum', 'none', got '",
                    std::string(r), "'");
}

}  // namespace

KDOptions parse_options(double temperature, double soft_weight, double hard_weight,
                        std::string_view divergence, double beta, int64_t ignore_index,
                        std::string_view reduction, Divergences allowed,
                        at::ArrayRef<double> logit_map, bool return_entropy) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                    "kdfused: temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK_VALUE(std::isfinite(soft_weight) && soft_weight >= 0,
                    "kdfused: soft_weight must be finite and >= 0, got ", soft_weight);
  TORCH_CHECK_VALUE(std::isfinite(hard_weight) && hard_weight >= 0,
                    "kdfused: hard_weight must be finite and >= 0, got ", hard_weight);
  const Divergence div = parse_divergence(divergence, allowed);
  TORCH_CHECK_VALUE(beta >= 0 && beta <= 1, "kdfused: beta must be in [0, 1], got ", beta);
  KDOptions opt;
  opt.reduction = parse_reduction(reduction);
  opt.temperature = temperature;
  opt.inv_temperature = 1.0 / temperature;
  opt.soft_weight = soft_weight;
  opt.hard_weight = hard_weight;
  // The generalised JSD's end points are the two KLs (as TRL and Liger define them): beta = 0 is
  // KL(p || q), beta = 1 is KL(q || p). Mapping them here makes them bitwise equal to "kl" /
  // "reverse_kl" and keeps the kernels' JSD free of the 0 * log(0) limits of those ends.
  opt.divergence = div;
  if (div == Divergence::JSD && beta == 0.0) opt.divergence = Divergence::KL;
  if (div == Divergence::JSD && beta == 1.0) opt.divergence = Divergence::ReverseKL;
  opt.beta = beta;
  opt.ignore_index = ignore_index;
  TORCH_CHECK_VALUE(
      logit_map.empty() || logit_map.size() == 4,
      "kdfused: logit_map must be empty or [student_logit_scale, teacher_logit_scale, "
      "student_softcap, teacher_softcap], got ",
      logit_map.size(), " values");
  if (!logit_map.empty()) {
    const char* names[4] = {"student_logit_scale", "teacher_logit_scale", "student_softcap",
                            "teacher_softcap"};
    for (int i = 0; i < 2; ++i)
      TORCH_CHECK_VALUE(std::isfinite(logit_map[i]), "kdfused: ", names[i], " must be finite, got ",
                        logit_map[i]);
    // (0 is "no softcap" here; the Python API spells it None and refuses 0.)
    for (int i = 2; i < 4; ++i)
      TORCH_CHECK_VALUE(std::isfinite(logit_map[i]) && logit_map[i] >= 0, "kdfused: ", names[i],
                        " must be None or finite and > 0, got ", logit_map[i]);
    opt.student_scale = logit_map[0];
    opt.teacher_scale = logit_map[1];
    opt.student_softcap = logit_map[2];
    opt.teacher_softcap = logit_map[3];
  }
  opt.return_entropy = return_entropy;
  return opt;
}

at::Tensor entropy_output(at::IntArrayRef lead, bool wanted, const at::TensorOptions& acc_options) {
  return wanted ? at::empty(lead, acc_options) : at::empty({0}, acc_options);
}

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

at::ScalarType scalar_type_of(DType d) {
  switch (d) {
    case DType::Float16: return at::kHalf;
    case DType::BFloat16: return at::kBFloat16;
    case DType::Float32: return at::kFloat;
    case DType::Float64: return at::kDouble;
  }
  TORCH_INTERNAL_ASSERT(false, "kdfused: unknown dtype code ", static_cast<int>(d));
}

at::ScalarType accumulate_type(at::ScalarType a, at::ScalarType b) {
  return (a == at::kDouble || b == at::kDouble) ? at::kDouble : at::kFloat;
}

int64_t count_rows(at::IntArrayRef lead) {
  int64_t n_rows = 1;
  for (int64_t d : lead) n_rows *= d;
  return n_rows;
}

void check_labels(const std::optional<at::Tensor>& labels, at::IntArrayRef lead,
                  const at::Device& device, double hard_weight) {
  if (labels.has_value()) {
    const at::Tensor& y = *labels;
    TORCH_CHECK_TYPE(y.scalar_type() == at::kLong || y.scalar_type() == at::kInt,
                     "kdfused: labels must be int64 (or int32), got ", y.scalar_type());
    TORCH_CHECK_VALUE(y.sizes() == lead, "kdfused: labels must have shape ", shape_str(lead),
                      " (the logits' leading dims), got ", shape_str(y.sizes()));
    TORCH_CHECK(y.device() == device, "kdfused: labels must be on the logits' device (", device,
                "), got ", y.device());
  } else {
    TORCH_CHECK_VALUE(hard_weight == 0, "kdfused: hard_weight > 0 needs labels (got labels=None)");
  }
}

at::Tensor flat_labels(const std::optional<at::Tensor>& labels, int64_t n_rows) {
  return labels.has_value() ? labels->reshape({n_rows}).to(at::kLong).contiguous() : at::Tensor();
}

std::pair<at::Tensor, at::Tensor> loss_outputs(at::IntArrayRef lead, int64_t n_rows,
                                               Reduction reduction,
                                               const at::TensorOptions& acc_options) {
  if (reduction == Reduction::None) {
    at::Tensor loss = at::empty(lead, acc_options);
    return {loss, loss.view({n_rows})};
  }
  return {at::empty({}, acc_options), at::empty({n_rows}, acc_options)};
}

void check_inputs(const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& labels,
                  const KDOptions& opt) {
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
  check_labels(labels, leading_dims(s), s.device(), opt.hard_weight);
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
                 const std::optional<at::Tensor>& labels, const KDOptions& opt, bool grad_student,
                 bool grad_teacher) {
  Prepared prep;
  KDParams& p = prep.params;
  static_cast<KDOptions&>(p) = opt;
  const int64_t V = student.size(-1);
  const at::IntArrayRef lead = leading_dims(student);
  const int64_t n_rows = count_rows(lead);

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

  prep.labels = flat_labels(labels, n_rows);
  if (prep.labels.defined()) p.labels = prep.labels.data_ptr<int64_t>();

  std::tie(prep.loss, prep.row_loss) = loss_outputs(
      lead, n_rows, p.reduction, student.options().dtype(accumulate_type(student, teacher)));
  p.row_loss = prep.row_loss.data_ptr();
  p.loss = prep.loss.data_ptr();
  prep.grad_student = grad_student ? empty_grad(student) : at::empty({0}, student.options());
  prep.grad_teacher = grad_teacher ? empty_grad(teacher) : at::empty({0}, teacher.options());
  p.grad_student = grad_student ? prep.grad_student.data_ptr() : nullptr;
  p.grad_teacher = grad_teacher ? prep.grad_teacher.data_ptr() : nullptr;
  prep.grad_scale = at::ones_like(prep.loss);
  prep.entropy = entropy_output(lead, opt.return_entropy, prep.loss.options());
  p.entropy = opt.return_entropy ? prep.entropy.data_ptr() : nullptr;
  return prep;
}

}  // namespace kdfused
