// kd_params.h -- the only contract between the host code and every backend kernel.
//
// A plain struct: pointers, sizes, strides and scalars. No at::Tensor, so the CPU kernels (compiled
// once per instruction set) and the CUDA kernels see exactly the same thing.
#pragma once

#include <cstdint>

namespace kdfused {

// Leading ("row") dimensions after coalescing; more than this and the host makes a contiguous copy.
constexpr int kMaxRowDims = 4;

// Soft-target divergence (p: teacher, q: student, m = beta p + (1 - beta) q). Values are part of
// the ABI between host and kernels. "jsd" with beta 0 / 1 is KL / ReverseKL (mapped on the host).
enum class Divergence : int32_t {
  KL = 0,         // KL(p || q)
  CE = 1,         // -sum p log q
  ReverseKL = 2,  // KL(q || p)
  JSD = 3,        // beta KL(p || m) + (1 - beta) KL(q || m), 0 < beta < 1
  TVD = 4,        // 0.5 sum |p - q|
};

// "batchmean" and "mean" are the same thing here: sum over valid rows / number of valid rows.
enum class Reduction : int32_t { Mean = 0, Sum = 1, None = 2 };

enum class DType : int32_t { Float16 = 0, BFloat16 = 1, Float32 = 2, Float64 = 3 };

// What a kernel call computes. Full: everything, for whole rows. The other three are the steps of
// the vocabulary-parallel loss (kd_vocab_parallel.cpp), where a row's columns are split over
// processes: each process runs them on its own slice, and the per-row records they exchange
// (kd_math.h SliceStats, MixSums, RowFinal) are combined between the steps.
enum class Phase : int32_t {
  Full = 0,
  Stats = 1,  // writes the slice's SliceStats per row (to slice_stats); nothing else
  Mix = 2,    // jsd / tvd: reads the row constants (row_final), writes the slice's MixSums
  Grad = 3,   // reads the complete row constants (row_final), writes the slice's gradients
};

// The scalar options of every op, as the kernels read them: made from the op's arguments by
// parse_options() (kd_host.h) alone, which checks them, turns the strings into enums and derives
// the rest. KDParams and topk::TopKParams inherit it, so a kernel reads p.temperature, p.divergence
// ... whatever the op.
struct KDOptions {
  double temperature = 1.0;
  double inv_temperature = 1.0;  // derived: 1 / temperature
  double soft_weight = 1.0;      // the soft term is skipped entirely when 0 (no 0 * inf)
  double hard_weight = 0.0;      // the hard term is skipped entirely when 0
  // The divergence the kernels run: "jsd" at beta 0 / 1 is already KL / ReverseKL here.
  Divergence divergence = Divergence::KL;
  double beta = 0.5;  // JSD mixing weight (only read for Divergence::JSD)
  Reduction reduction = Reduction::Mean;
  int64_t ignore_index = -100;  // rows whose label equals it count for nothing
  // The logit transform of each side (kd_math.h LogitMap): z = scale * x, then, with a softcap
  // c > 0, z = c * tanh(z / c); a -inf x stays -inf. softcap 0 means none. Every formula of the
  // kernels reads z; the gradients are d/dx (times dz/dx).
  double student_scale = 1.0;
  double teacher_scale = 1.0;
  double student_softcap = 0.0;
  double teacher_softcap = 0.0;
  // Also the student's tempered entropy per row, -sum q log q (KDParams::entropy).
  bool return_entropy = false;
};

struct KDParams : KDOptions {
  // ---- inputs -------------------------------------------------------------------------------
  const void* student = nullptr;    // logits, dtype student_dtype, last dim contiguous
  const void* teacher = nullptr;    // logits, dtype teacher_dtype, last dim contiguous
  const int64_t* labels = nullptr;  // [n_rows] contiguous, or nullptr (no labels: all rows valid)
  DType student_dtype = DType::Float32;
  DType teacher_dtype = DType::Float32;

  int64_t n_rows = 0;  // product of the leading dims
  int64_t vocab = 0;   // V, the last dim

  // Row r -> element offset: r is decomposed over row_sizes (last dim fastest) and dotted with the
  // strides (in elements). Covers contiguous inputs (row_ndim 1, stride V) and row-strided views
  // such as logits[:, :-1] without a copy.
  int32_t row_ndim = 1;
  int64_t row_sizes[kMaxRowDims] = {0, 0, 0, 0};
  int64_t student_strides[kMaxRowDims] = {0, 0, 0, 0};
  int64_t teacher_strides[kMaxRowDims] = {0, 0, 0, 0};

  // ---- vocabulary-parallel steps (Phase other than Full) ------------------------------------
  Phase phase = Phase::Full;
  int64_t vocab_offset = 0;         // global index of this slice's first column (labels are global)
  void* slice_stats = nullptr;      // Stats: [n_rows] SliceStats<A> (out)
  const void* row_final = nullptr;  // Mix, Grad: [n_rows] RowFinal<A> of the whole row (in)
  void* slice_mix = nullptr;        // Mix: [n_rows] MixSums<A> (out)

  // ---- outputs ------------------------------------------------------------------------------
  // Per-row loss in the accumulation type (float, or double for float64 inputs), 0 at ignored rows.
  // Written in Phase::Full only (the host forms the vocabulary-parallel row losses).
  void* row_loss = nullptr;
  // Reduced loss (0-dim, accumulation type); unused for Reduction::None.
  void* loss = nullptr;
  // return_entropy: [n_rows] of the accumulation type, the student's tempered entropy (0 at ignored
  // rows). Written in Phase::Full only (the vocabulary-parallel host reads RowResult::entropy).
  void* entropy = nullptr;
  // Gradients of the *reduced* loss (grad_output = 1), contiguous [n_rows, vocab], in the dtype of
  // their input; nullptr when not requested.
  void* grad_student = nullptr;
  void* grad_teacher = nullptr;
  // CPU: the gradient scale of the reduction (1 / max(n_valid, 1) for Mean, else 1), known on the
  // host. The CUDA backend computes it on the device instead (no host sync).
  double grad_scale = 1.0;
};

}  // namespace kdfused
