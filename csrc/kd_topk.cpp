// kd_topk.cpp -- schema of the top-k distillation op, its shared argument checks and the
// construction of TopKParams. CPU (cpu/kd_topk_cpu.cpp) and CUDA (cuda/kd_topk_cuda.cu) register
// implementations; autograd and the fake kernel are registered from Python (kdfused/topk.py).
#include "kd_topk.h"

#include <torch/library.h>

#include <limits>
#include <string_view>

namespace kdfused::topk {

TopKOptions parse_topk_options(double temperature, double soft_weight, double hard_weight,
                               std::string_view divergence, double beta, int64_t ignore_index,
                               std::string_view reduction, at::ArrayRef<double> logit_map,
                               std::string_view support, std::string_view values) {
  TopKOptions o;
  if (support == "full") {
    o.support = Support::Full;
  } else if (support == "renormalized") {
    o.support = Support::Renormalized;
  } else if (support == "tail") {
    o.support = Support::Tail;
  } else {
    TORCH_CHECK_VALUE(false,
                      "kdfused: support must be one of 'full', 'renormalized', 'tail', got '",
                      std::string(support), "'");
  }
  TORCH_CHECK_VALUE(values == "logits" || values == "logprobs",
                    "kdfused: values must be 'logits' or 'logprobs', got '", std::string(values),
                    "'");
  o.logprobs = values == "logprobs";
  // Full compares the teacher's entries with the student's whole distribution: only kl and ce,
  // whose terms vanish where the teacher stored nothing.
  const Divergences allowed = o.support == Support::Full ? Divergences::KLOrCE : Divergences::All;
  static_cast<KDOptions&>(o) = parse_options(temperature, soft_weight, hard_weight, divergence,
                                             beta, ignore_index, reduction, allowed, logit_map);
  TORCH_CHECK_VALUE(o.support != Support::Tail || o.logprobs,
                    "kdfused: support='tail' needs values='logprobs' (the tail bucket is the "
                    "teacher's probability mass outside its stored entries)");
  TORCH_CHECK_VALUE(!o.logprobs || (o.teacher_scale == 1.0 && o.teacher_softcap == 0.0),
                    "kdfused: values='logprobs' are the teacher's final log-probabilities: "
                    "teacher_logit_scale and teacher_softcap do not apply to them");
  return o;
}

void check_topk_inputs(const at::Tensor& s, const at::Tensor& idx, const at::Tensor& val,
                       const std::optional<at::Tensor>& labels, const TopKOptions& opt) {
  TORCH_CHECK_TYPE(is_supported_float(s.scalar_type()),
                   "kdfused: student_logits must be float16, bfloat16, float32 or float64, got ",
                   s.scalar_type());
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt,
                   "kdfused: teacher_indices must be int64 or int32, got ", idx.scalar_type());
  TORCH_CHECK_TYPE(is_supported_float(val.scalar_type()),
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
  check_labels(labels, lead, s.device(), opt.hard_weight);
}

TopKPrepared prepare_topk(const at::Tensor& student, const at::Tensor& indices,
                          const at::Tensor& values, const std::optional<at::Tensor>& labels,
                          const TopKOptions& opt, bool grad_student) {
  TopKPrepared prep;
  TopKParams& p = prep.params;
  static_cast<TopKOptions&>(p) = opt;
  const int64_t V = student.size(-1);
  const int64_t k = indices.size(-1);
  const at::IntArrayRef lead = leading_dims(student);
  const int64_t n_rows = count_rows(lead);

  // A [n_rows, V] view with a contiguous last dim when one exists (row-strided 2-D views such as
  // logits[:, :-1] are read in place); otherwise a contiguous copy.
  at::Tensor s2 = student.reshape({n_rows, V});
  if (V > 1 && s2.stride(1) != 1) s2 = s2.contiguous();
  prep.student = s2;
  const at::ScalarType acc = accumulate_type(student, values);
  // The teacher side is n_rows x k, small next to the student: converted once here so that the
  // kernels need no template per (index, value) dtype.
  prep.indices = indices.reshape({n_rows, k}).to(at::kLong).contiguous();
  prep.values = values.reshape({n_rows, k}).to(acc).contiguous();
  if (!opt.logprobs && (opt.teacher_scale != 1.0 || opt.teacher_softcap > 0)) {
    // The teacher's transform on its k stored logits per row (kd_math.h map_logit, in ATen ops:
    // n_rows x k values, not worth a kernel; the teacher gets no gradient here).
    at::Tensor z = prep.values * opt.teacher_scale;
    if (opt.teacher_softcap > 0) z = at::tanh(z / opt.teacher_softcap) * opt.teacher_softcap;
    const at::Tensor masked = prep.values == -std::numeric_limits<double>::infinity();
    prep.values = at::where(masked, prep.values, z).contiguous();
  }

  p.student = s2.data_ptr();
  p.student_dtype = to_dtype(student.scalar_type());
  p.student_stride = n_rows > 1 ? s2.stride(0) : V;
  p.indices = prep.indices.data_ptr<int64_t>();
  p.values = prep.values.data_ptr();
  p.n_rows = n_rows;
  p.vocab = V;
  p.k = k;
  prep.labels = flat_labels(labels, n_rows);
  if (prep.labels.defined()) p.labels = prep.labels.data_ptr<int64_t>();

  std::tie(prep.loss, prep.row_loss) =
      loss_outputs(lead, n_rows, p.reduction, student.options().dtype(acc));
  p.row_loss = prep.row_loss.data_ptr();
  p.loss = prep.loss.data_ptr();
  if (grad_student) {
    prep.grad_student = empty_grad(student);  // on the CPU from kd_loss's buffer cache
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
      "float temperature, float soft_weight, float hard_weight, str divergence, "
      "float beta, int ignore_index, str reduction, float[] logit_map, str support, str values, "
      "bool grad_student) -> (Tensor, Tensor, Tensor)");
}
