// kd_linear_host.h -- the device-independent part of kdfused::kd_linear_loss (schema:
// kd_linear.cpp): argument checks, chunk sizing, the chunk loop and the gradient bookkeeping.
//
// The loop's GEMMs and elementwise steps are ATen calls, so they run on the inputs' device (MKL /
// oneDNN on the CPU, cuBLAS on the current CUDA stream). What differs per device is behind
// LinearBackend: how label values are checked and the valid rows counted, the fused kd kernel on
// one chunk's KDParams, and the reduction of the row losses. The device files
// (cpu/kd_linear_cpu.cpp, cuda/kd_linear_cuda.cu) define a backend and register the op.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

#include "kd_host.h"
#include "kd_params.h"

namespace kdfused {

// The valid rows (label != ignore_index) of one call, as the backend knows them before any GEMM.
struct ValidRows {
  int64_t n_valid = 0;     // the count, when it is known on the host
  at::Tensor n_valid_dev;  // or an int64 0-dim tensor on the device (then n_valid is not used)
  // The labels, readable on the host, or nullptr: with them, a chunk whose rows are all ignored
  // skips its GEMMs and its kernel (its loss and gradients are zero).
  const int64_t* host_labels = nullptr;
};

// The reduction's gradient scale for the fused kernel: 1 / max(n_valid, 1) for "mean", else 1.
struct GradScale {
  double host = 1.0;  // used when `dev` is undefined
  at::Tensor dev;     // 0-dim, of the accumulation type, on the device
};

// One chunk's results from the loss step: the row losses ([c], accumulation type), the logit
// gradient (c x V; undefined when no gradient was asked) and the entropy ([c]; undefined unless
// return_entropy).
struct ChunkOut {
  at::Tensor row_loss, grad, entropy;
};

class LinearBackend {
 public:
  virtual ~LinearBackend() = default;

  // The largest vocabulary the device's kernel takes.
  virtual int64_t max_vocab() const { return std::numeric_limits<int64_t>::max(); }

  // Called once per call with labels, after the argument checks and before any GEMM. y: the
  // labels as int64, contiguous, [N], on the inputs' device. Checks the label values (or arranges
  // for the kernel to check them) and counts the valid rows.
  virtual ValidRows valid_rows(const at::Tensor& y, int64_t V, int64_t ignore_index) const = 0;

  // The dtypes the fused kernel reads for chunk logits of dtypes (s, t). When they differ from
  // (s, t) the chunk loop converts the logits (exactly) and the gradient back to s's dtype.
  virtual std::pair<at::ScalarType, at::ScalarType> kernel_dtypes(at::ScalarType s,
                                                                  at::ScalarType t) const {
    return {s, t};
  }

  // Runs the fused kernel on one chunk: p comes from prepare() with reduction "sum" (or "none");
  // fills p.row_loss and, when asked, p.grad_student, the gradient multiplied by `scale`.
  virtual void run_kernel(KDParams& p, const GradScale& scale) const = 0;

  // The loss step on one chunk's logits (s_c, t_c: c x V; y_c: int64 [c] or none), with `opt`'s
  // reduction "sum" or "none". This default runs the device's kernel (kernel_dtypes, the checks,
  // prepare(), run_kernel); the vocabulary-parallel path overrides it with its slice steps.
  virtual ChunkOut run_chunk(const at::Tensor& s_c, const at::Tensor& t_c,
                             const std::optional<at::Tensor>& y_c, const KDOptions& opt, bool grad,
                             const GradScale& scale) const;

  // The loss of reduction "sum" / "mean": the row losses ([N], accumulation type) summed in double
  // in a fixed order, divided by max(n_valid, 1) for "mean"; 0-dim, of row_loss's dtype.
  virtual at::Tensor reduce(const at::Tensor& row_loss, bool mean,
                            const ValidRows& valid) const = 0;
};

// (loss, grad_hidden, grad_weight, grad_bias, grad_scale, entropy), as the schema says.
using LinearOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The op's tensors, as in the schema (kd_linear.cpp): the student's linear layer, the teacher as
// a linear layer (th, tw, tb) or as logits (tl), the labels and row_weight.
struct LinearArgs {
  const at::Tensor& sh;
  const at::Tensor& sw;
  const std::optional<at::Tensor>& sb;
  const std::optional<at::Tensor>& th;
  const std::optional<at::Tensor>& tw;
  const std::optional<at::Tensor>& tb;
  const std::optional<at::Tensor>& tl;
  const std::optional<at::Tensor>& labels;
  const std::optional<at::Tensor>& row_weight;
};

// The op, with the device's kernel, label handling and reduction from `backend`, on the parsed
// options (parse_options).
LinearOutputs kd_linear_loss_chunked(const LinearBackend& backend, const LinearArgs& args,
                                     const KDOptions& opt, int64_t chunk_size, bool grad_hidden,
                                     bool grad_weight, bool grad_bias);

// The op's implementation on one device, as registered (TORCH_LIBRARY_IMPL): the options parsed
// once, then the chunk loop with a Backend made from student_hidden (the CUDA one holds the device
// guard for the whole call).
template <typename Backend>
LinearOutputs kd_linear_loss_op(
    const at::Tensor& student_hidden, const at::Tensor& student_weight,
    const std::optional<at::Tensor>& student_bias, const std::optional<at::Tensor>& teacher_hidden,
    const std::optional<at::Tensor>& teacher_weight, const std::optional<at::Tensor>& teacher_bias,
    const std::optional<at::Tensor>& teacher_logits, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& row_weight, double temperature, double soft_weight,
    double hard_weight, c10::string_view divergence, double beta, int64_t ignore_index,
    c10::string_view reduction, at::ArrayRef<double> logit_map, bool return_entropy,
    int64_t chunk_size, bool grad_hidden, bool grad_weight, bool grad_bias) {
  const KDOptions opt =
      parse_options(temperature, soft_weight, hard_weight, sv(divergence), beta, ignore_index,
                    sv(reduction), Divergences::All, logit_map, return_entropy);
  const Backend backend(student_hidden);
  const LinearArgs args{student_hidden, student_weight, student_bias,
                        teacher_hidden, teacher_weight, teacher_bias,
                        teacher_logits, labels,         row_weight};
  return kd_linear_loss_chunked(backend, args, opt, chunk_size, grad_hidden, grad_weight,
                                grad_bias);
}

// The automatic chunk (chunk_size 0) of N rows: rows of one chunk's student logits of about
// 64 MiB and at most about N / 8, for a vocabulary of V logits of elem_bytes bytes each (the
// vocabulary-parallel path asks with the whole vocabulary, so that every process has the same
// chunks).
int64_t auto_chunk_rows(int64_t N, int64_t V, int64_t elem_bytes);

}  // namespace kdfused
