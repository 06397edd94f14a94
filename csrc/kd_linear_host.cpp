// kd_linear_host.cpp -- the device-independent part of kdfused::kd_linear_loss: the linear
// layer(s) and the distillation loss, a chunk of rows at a time, so that no N x V logits tensor
// ever exists. See kd_linear_host.h for what each device supplies.
//
// Per chunk of c rows: student (and teacher) logits c x V by one GEMM each (at::mm / at::addmm),
// the device's fused kernel for the row losses and the logit gradient, then two more GEMMs fold
// that gradient into grad_hidden and grad_weight. Extra memory is O(c x V): the two logit buffers
// (reused by every chunk) and the kernel's gradient buffer.
#include "kd_linear_host.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kd_host.h"

namespace kdfused {

namespace {

// The automatic chunk: as many rows as make one chunk's student logits about this many bytes, and
// at most 1/8 of the rows. The live extra memory is about 3-4 chunk x V buffers (student and
// teacher logits, the logit gradient, and for 16-bit inputs its float32 copy for grad_weight):
// the byte cap bounds it at large sizes, the 1/8 keeps it a fraction of what the N x V logits
// would take at small ones (where the byte cap alone would be every row). Each GEMM still has
// hundreds of rows at the usual sizes (N = 4096, V = 32000 float32: 512 rows, by either rule).
constexpr int64_t kChunkLogitBytes = int64_t{64} << 20;
constexpr int64_t kChunkRowFraction = 8;
constexpr int64_t kMinChunkRows = 64;  // fewer rows make the GEMMs and the grad_weight sums slow

bool is_16bit(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), "kdfused.linear_kd_loss: ", name,
                   " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

void check_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "kdfused.linear_kd_loss: ", name,
                    " must be on student_hidden's device (", ref.device(), "), got ", t.device());
}

// One linear layer's tensors: hidden (..., H), weight (V, H), bias (V,) of one dtype.
void check_linear(const at::Tensor& h, const at::Tensor& w, const std::optional<at::Tensor>& b,
                  const char* who) {
  const std::string hn = std::string(who) + "_hidden", wn = std::string(who) + "_weight",
                    bn = std::string(who) + "_bias";
  check_float(h, hn.c_str());
  check_float(w, wn.c_str());
  TORCH_CHECK_VALUE(h.dim() >= 1, "kdfused.linear_kd_loss: ", hn,
                    " must have shape (..., H), got a 0-dim tensor");
  TORCH_CHECK_VALUE(w.dim() == 2, "kdfused.linear_kd_loss: ", wn, " must have shape (V, H), got ",
                    shape_str(w.sizes()));
  TORCH_CHECK_VALUE(w.size(1) == h.size(-1), "kdfused.linear_kd_loss: ", wn, " has shape ",
                    shape_str(w.sizes()), " but ", hn, " has H = ", h.size(-1),
                    " (expected weight (V, ", h.size(-1), "))");
  TORCH_CHECK_TYPE(w.scalar_type() == h.scalar_type(), "kdfused.linear_kd_loss: ", wn, " (",
                   w.scalar_type(), ") and ", hn, " (", h.scalar_type(), ") must have one dtype");
  check_device(w, h, wn.c_str());
  if (b.has_value()) {
    TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == w.size(0), "kdfused.linear_kd_loss: ", bn,
                      " must have shape (V,) = (", w.size(0), ",), got ", shape_str(b->sizes()));
    TORCH_CHECK_TYPE(b->scalar_type() == w.scalar_type(), "kdfused.linear_kd_loss: ", bn, " (",
                     b->scalar_type(), ") must have ", wn, "'s dtype (", w.scalar_type(), ")");
    check_device(*b, h, bn.c_str());
  }
}

// Every check that needs no tensor data, before anything is computed.
// (The options were checked by parse_options, first, at the op's entry.)
void check_linear_inputs(const LinearArgs& a, const KDOptions& opt, int64_t chunk_size) {
  TORCH_CHECK_VALUE(chunk_size >= 0,
                    "kdfused.linear_kd_loss: chunk_size must be a positive int "
                    "(or None for automatic), got ",
                    chunk_size);
  check_linear(a.sh, a.sw, a.sb, "student");
  const at::IntArrayRef lead = a.sh.sizes().slice(0, a.sh.dim() - 1);
  const int64_t V = a.sw.size(0);
  TORCH_CHECK_VALUE(V >= 1,
                    "kdfused.linear_kd_loss: the vocabulary (student_weight.shape[0]) "
                    "must not be empty");
  const bool by_hidden = a.th.has_value() || a.tw.has_value() || a.tb.has_value();
  TORCH_CHECK_VALUE(by_hidden != a.tl.has_value(),
                    "kdfused.linear_kd_loss: give the teacher "
                    "either as teacher_hidden + teacher_weight (+ teacher_bias) or as "
                    "teacher_logits, not ",
                    by_hidden ? "both" : "neither");
  if (by_hidden) {
    TORCH_CHECK_VALUE(a.th.has_value() && a.tw.has_value(), "kdfused.linear_kd_loss: ",
                      a.th.has_value() ? "teacher_weight" : "teacher_hidden",
                      " is missing (the teacher needs both teacher_hidden and teacher_weight)");
    check_linear(*a.th, *a.tw, a.tb, "teacher");
    check_device(*a.th, a.sh, "teacher_hidden");
    const at::IntArrayRef tlead = a.th->sizes().slice(0, a.th->dim() - 1);
    TORCH_CHECK_VALUE(tlead == lead, "kdfused.linear_kd_loss: teacher_hidden's leading dims ",
                      shape_str(tlead), " must equal student_hidden's ", shape_str(lead));
    TORCH_CHECK_VALUE(a.tw->size(0) == V,
                      "kdfused.linear_kd_loss: teacher_weight has V = ", a.tw->size(0),
                      " rows but student_weight has V = ", V);
  } else {
    check_float(*a.tl, "teacher_logits");
    check_device(*a.tl, a.sh, "teacher_logits");
    std::vector<int64_t> want(lead.begin(), lead.end());
    want.push_back(V);
    TORCH_CHECK_VALUE(a.tl->sizes() == at::IntArrayRef(want),
                      "kdfused.linear_kd_loss: "
                      "teacher_logits must have shape ",
                      shape_str(want), " (student_hidden's leading dims, V), got ",
                      shape_str(a.tl->sizes()));
  }
  if (a.labels.has_value()) {
    const at::Tensor& y = *a.labels;
    TORCH_CHECK_TYPE(y.scalar_type() == at::kLong || y.scalar_type() == at::kInt,
                     "kdfused.linear_kd_loss: labels must be int64 (or int32), got ",
                     y.scalar_type());
    TORCH_CHECK_VALUE(y.sizes() == lead, "kdfused.linear_kd_loss: labels must have shape ",
                      shape_str(lead), " (student_hidden's leading dims), got ",
                      shape_str(y.sizes()));
    check_device(y, a.sh, "labels");
  } else {
    TORCH_CHECK_VALUE(opt.hard_weight == 0,
                      "kdfused.linear_kd_loss: hard_weight > 0 needs labels (got labels=None)");
  }
  if (a.row_weight.has_value()) {
    TORCH_CHECK_VALUE(opt.reduction == Reduction::None,
                      "kdfused.linear_kd_loss: row_weight is only for reduction 'none'");
    TORCH_CHECK_VALUE(a.row_weight->sizes() == lead,
                      "kdfused.linear_kd_loss: row_weight must "
                      "have shape ",
                      shape_str(lead), ", got ", shape_str(a.row_weight->sizes()));
    check_float(*a.row_weight, "row_weight");
    check_device(*a.row_weight, a.sh, "row_weight");
  }
}

// out = x @ w^T (+ b): the chunk's logits, written into a reused buffer.
void linear_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
                 const std::optional<at::Tensor>& b) {
  if (b.has_value()) {
    at::addmm_out(out, *b, x, w.t());
  } else {
    at::mm_out(out, x, w.t());
  }
}

}  // namespace

ChunkOut LinearBackend::run_chunk(const at::Tensor& s_c, const at::Tensor& t_c,
                                  const std::optional<at::Tensor>& y_c, const KDOptions& opt,
                                  bool grad, const GradScale& scale) const {
  // A dtype pair the device has no kernel for is converted (exactly), as kd_loss does.
  const auto [k_s, k_t] = kernel_dtypes(s_c.scalar_type(), t_c.scalar_type());
  const at::Tensor s_k = k_s == s_c.scalar_type() ? s_c : s_c.to(k_s);
  const at::Tensor t_k = k_t == t_c.scalar_type() ? t_c : t_c.to(k_t);
  check_inputs(s_k, t_k, y_c, opt);
  Prepared prep = prepare(s_k, t_k, y_c, opt, grad, false);
  run_kernel(prep.params, scale);
  ChunkOut out;
  out.row_loss = prep.row_loss;
  if (grad) out.grad = prep.grad_student;
  if (opt.return_entropy) out.entropy = prep.entropy.reshape({s_c.size(0)});
  return out;
}

int64_t auto_chunk_rows(int64_t N, int64_t V, int64_t elem_bytes) {
  const int64_t row_bytes = V * elem_bytes;
  int64_t rows = std::max<int64_t>(1, kChunkLogitBytes / std::max<int64_t>(row_bytes, 1));
  // ceil(N / 8), rounded up to a multiple of 16, and at least 64 rows
  const int64_t part = (N + kChunkRowFraction - 1) / kChunkRowFraction;
  rows = std::min(rows, std::max(kMinChunkRows, (part + 15) / 16 * 16));
  if (rows >= 64) rows -= rows % 16;  // GEMM-friendly row counts
  return rows;
}

LinearOutputs kd_linear_loss_chunked(const LinearBackend& backend, const LinearArgs& args,
                                     const KDOptions& opt, int64_t chunk_size, bool grad_hidden,
                                     bool grad_weight, bool grad_bias) {
  const at::Tensor& student_hidden = args.sh;
  const at::Tensor& student_weight = args.sw;
  const std::optional<at::Tensor>& student_bias = args.sb;
  const std::optional<at::Tensor>& teacher_hidden = args.th;
  const std::optional<at::Tensor>& teacher_weight = args.tw;
  const std::optional<at::Tensor>& teacher_bias = args.tb;
  const std::optional<at::Tensor>& teacher_logits = args.tl;
  const std::optional<at::Tensor>& labels = args.labels;
  const std::optional<at::Tensor>& row_weight = args.row_weight;
  check_linear_inputs(args, opt, chunk_size);
  TORCH_CHECK_VALUE(student_weight.size(0) <= backend.max_vocab(),
                    "kdfused.linear_kd_loss: the vocabulary (student_weight.shape[0] = ",
                    student_weight.size(0), ") is too large for the ",
                    student_hidden.device().type(), " kernel (at most ", backend.max_vocab(), ")");
  grad_bias = grad_bias && student_bias.has_value();

  const int64_t H = student_hidden.size(-1), V = student_weight.size(0);
  const at::IntArrayRef lead = leading_dims(student_hidden);
  const int64_t N = count_rows(lead);
  const at::Tensor hs = student_hidden.reshape({N, H});
  const at::Tensor& ws = student_weight;
  const bool by_hidden = teacher_hidden.has_value();
  const at::Tensor ht =
      by_hidden ? teacher_hidden->reshape({N, teacher_hidden->size(-1)}) : at::Tensor();
  const at::Tensor tl = by_hidden ? at::Tensor() : teacher_logits->reshape({N, V});
  const at::ScalarType s_dtype = student_hidden.scalar_type();
  const at::ScalarType t_dtype = by_hidden ? teacher_hidden->scalar_type() : tl.scalar_type();

  at::Tensor y;
  ValidRows valid;
  valid.n_valid = N;
  if (labels.has_value()) {
    y = labels->reshape({N}).to(at::kLong).contiguous();
    valid = backend.valid_rows(y, V, opt.ignore_index);
  }
  const Reduction reduce = opt.reduction;
  const at::ScalarType acc = accumulate_type(s_dtype, t_dtype);
  const auto opts = student_hidden.options();
  // The kernel runs each chunk with reduction "sum"; "mean"'s 1 / n_valid is over *all* rows.
  GradScale scale;
  if (reduce == Reduction::Mean) {
    if (valid.n_valid_dev.defined()) {
      scale.dev = valid.n_valid_dev.clamp_min(1).to(at::kDouble).reciprocal().to(acc);
    } else {
      scale.host = 1.0 / static_cast<double>(std::max<int64_t>(valid.n_valid, 1));
    }
  }
  const at::Tensor rw =
      row_weight.has_value() ? row_weight->reshape({N}).to(at::kDouble).contiguous() : at::Tensor();

  const bool any_grad = grad_hidden || grad_weight || grad_bias;
  at::Tensor row_loss = at::zeros({N}, opts.dtype(acc));
  // return_entropy: 0 at ignored rows, including the chunks skipped below.
  at::Tensor entropy = at::zeros({opt.return_entropy ? N : 0}, opts.dtype(acc));
  // grad_weight / grad_bias are sums over chunks: accumulated in float32 for 16-bit weights.
  const at::ScalarType w_acc = is_16bit(student_weight) ? at::kFloat : s_dtype;
  at::Tensor gh = grad_hidden ? at::zeros({N, H}, opts) : at::empty({0}, opts);
  at::Tensor gw_acc = grad_weight ? at::zeros({V, H}, opts.dtype(w_acc)) : at::Tensor();
  at::Tensor gb_acc = grad_bias ? at::zeros({V}, opts.dtype(w_acc)) : at::Tensor();

  const int64_t chunk =
      chunk_size > 0 ? chunk_size : auto_chunk_rows(N, V, c10::elementSize(s_dtype));
  const int64_t c_max = std::min<int64_t>(chunk, std::max<int64_t>(N, 1));
  at::Tensor s_buf, t_buf;  // the chunk logits, allocated once (first chunk with valid rows)
  const int64_t* yp = valid.host_labels;
  // Each chunk runs with reduction "sum" ("none" stays "none"): the loop forms the reduction.
  const KDOptions chunk_opt =
      with_reduction(opt, reduce == Reduction::None ? Reduction::None : Reduction::Sum);

  for (int64_t start = 0; start < N; start += chunk) {
    const int64_t c = std::min(chunk, N - start);
    if (yp != nullptr &&
        std::all_of(yp + start, yp + start + c, [&](int64_t v) { return v == opt.ignore_index; })) {
      continue;  // every row ignored: loss and gradients 0 (already zero), no GEMM
    }
    if (!s_buf.defined()) {
      s_buf = at::empty({c_max, V}, opts);
      if (by_hidden) t_buf = at::empty({c_max, V}, teacher_hidden->options());
    }
    at::Tensor s_c = s_buf.narrow(0, 0, c);
    const at::Tensor h_c = hs.narrow(0, start, c);
    linear_into(s_c, h_c, ws, student_bias);
    at::Tensor t_c;
    if (by_hidden) {
      t_c = t_buf.narrow(0, 0, c);
      linear_into(t_c, ht.narrow(0, start, c), *teacher_weight, teacher_bias);
    } else {
      t_c = tl.narrow(0, start, c);
    }
    const std::optional<at::Tensor> y_c =
        y.defined() ? std::optional<at::Tensor>(y.narrow(0, start, c)) : std::nullopt;
    ChunkOut out = backend.run_chunk(s_c, t_c, y_c, chunk_opt, any_grad, scale);
    row_loss.narrow(0, start, c).copy_(out.row_loss);
    if (opt.return_entropy) entropy.narrow(0, start, c).copy_(out.entropy);
    if (!any_grad) continue;

    at::Tensor g = out.grad;  // d loss / d logits for this chunk's rows, c x V
    if (rw.defined()) {
      // Multiplied in double and rounded once into g's dtype.
      g.copy_(g.to(at::kDouble).mul_(rw.narrow(0, start, c).unsqueeze(1)));
    }
    if (g.scalar_type() != s_dtype) g = g.to(s_dtype);  // a converted pair: rounded once
    if (grad_hidden) {
      at::Tensor gh_c = gh.narrow(0, start, c);
      at::mm_out(gh_c, g, ws);
    }
    if (grad_weight || grad_bias) {
      const at::Tensor g_acc = g.scalar_type() == w_acc ? g : g.to(w_acc);
      if (grad_weight) {
        const at::Tensor h_acc = h_c.scalar_type() == w_acc ? h_c : h_c.to(w_acc);
        gw_acc.addmm_(g_acc.t(), h_acc);
      }
      if (grad_bias) gb_acc.add_(g_acc.sum(0));
    }
  }

  at::Tensor loss = reduce == Reduction::None
                        ? row_loss.view(lead)
                        : backend.reduce(row_loss, reduce == Reduction::Mean, valid);
  at::Tensor gw = !grad_weight ? at::empty({0}, student_weight.options())
                               : gw_acc.to(student_weight.scalar_type());
  at::Tensor gb = !grad_bias ? at::empty({0}, student_weight.options())
                             : gb_acc.to(student_bias->scalar_type());
  if (grad_hidden) gh = gh.view(student_hidden.sizes());
  if (opt.return_entropy) entropy = entropy.view(lead);
  return {loss, gh, gw, gb, at::ones_like(loss), entropy};
}

}  // namespace kdfused
