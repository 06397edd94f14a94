// kd_vocab_parallel_cuda.cu -- CUDA implementations of the vocabulary-parallel steps kd_vp_stats /
// kd_vp_merge / kd_vp_mix / kd_vp_merge_mix / kd_vp_grad (schema, CPU implementation and the
// meaning of each step: kd_vocab_parallel.cpp; orchestration: kdfused/parallel.py; design:
// docs/design.md section 5). Same semantics and the same record layouts as the CPU steps; the
// per-element and per-row maths is kd_math.h's, as for every backend.
//
// Kernels: simple and correct first (not the fused kernels' launch policy). Per row, the algorithm
// of the CPU scalar path (cpu/kd_kernel_scalar.cpp) with kVpThreads "lanes":
//   kd_vp_stats_kernel   one CTA per row: thread i push()es the columns i, i + kVpThreads, ... into
//                        its own RowState; the CTA's states are merged with merge() in a FIXED
//                        tree in shared memory (level `off`: state l absorbs state l + off); thread
//                        0 writes the SliceStats {state, student logit at the label if it is in
//                        the slice (hard term only), else 0}.
//   kd_vp_mix_kernel     one CTA per row: probs_at + mix_at per column with the row's RowFinal,
//                        a fixed-order tree sum (mix_add); thread 0 writes the MixSums.
//   kd_vp_grad_kernel    one CTA per row: probs_at + grad_at per column, -kh at the label's column
//                        when it is in the slice, both gradients stored in their input's dtype.
//   kd_vp_merge_kernel / kd_vp_merge_mix_kernel: one thread per row, finalize_slices /
//                        finalize_slices_mix over the group's records of that row in slice order.
// Ignored rows (label == ignore_index) read nothing: an empty SliceStats, zero MixSums, an all-zero
// RowFinal, zero gradients -- exactly as the CPU path. Rows are grid-strided (any N) and may be
// strided views (KDParams row_sizes / strides, int64 offsets).
//
// Determinism: no atomics; every sum and merge has a fixed order that depends only on V and
// kVpThreads, so the records are bitwise reproducible on a device, and the merges run the same code
// on the same gathered records in every process (the loss is identical everywhere).
//
// No host sync: the mean's gradient scale 1 / max(n_valid, 1) is counted on the device
// (kd_count_kernel of kd_kernels.cuh, as kd_loss does) and read by the merge kernel; the loss of
// kd_vp_grad is reduced on the device (kd_reduce_kernel: double, fixed order; the mean divides the
// double sum by n_valid where the CPU multiplies it by 1 / n_valid: the two may differ in the last
// bit of the double before its rounding to the accumulation type).
//
// Label values: the CPU checks them on the host before its kernel; here kd_vp_stats_kernel checks
// them with CUDA_KERNEL_ASSERT (a device-side assert, like kd_loss's kernels and PyTorch's
// cross-entropy): no host copy of the labels. With device asserts compiled out (NDEBUG builds of
// torch) an out-of-range label cannot read out of bounds: its row's s_label becomes NaN, hence a
// NaN loss (hard term on). The mix and grad steps, like the CPU's, do not check them again (the
// stats step always runs first); an out-of-range label there only fails to match a column.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../kd_host.h"
#include "../kd_math.h"
#include "../kd_params.h"
#include "../kd_vocab_parallel.h"
#include "kd_dtype_dispatch.h"
#include "kd_kernels.cuh"
#include "kd_launch.h"

#if defined(CUDA_KERNEL_ASSERT_MSG)
#define KD_VP_LABEL_ASSERT(cond) \
  CUDA_KERNEL_ASSERT_MSG(cond, "kdfused: label not in [0, vocab_total) nor ignore_index")
#else
#define KD_VP_LABEL_ASSERT(cond) CUDA_KERNEL_ASSERT(cond)
#endif

namespace kdfused::cuda {

namespace {

constexpr int kVpThreads = 256;       // threads per CTA of the slice kernels (a power of 2)
constexpr int kVpMergeThreads = 256;  // threads per CTA of the merge kernels (one per row)
constexpr int64_t kVpMaxGrid = int64_t(1) << 22;  // grid cap; the kernels grid-stride over rows

// ------------------------------------------------------------------------------------------------
// Kernels
// ------------------------------------------------------------------------------------------------

// Student / teacher logit of column i as the accumulation type, after its side's transform m
// (kd_kernels.cuh map_in: compiled only with Map, as in the fused kernels) (the teacher only with
// the soft term, as the CPU path: 0 otherwise, never read). Why m by value: a reference into the
// kernel's by-value cfg parameter, even one that is never used (Map = false), changes how the
// compiler optimises the kernel's loops (the plain grad kernel lost its unswitched loops).
template <bool Map, typename A, typename X>
__device__ __forceinline__ A logit_at(const X* row, int64_t i, const LogitMap<A> m) {
  return map_in<Map>(to_acc<A>(row[i]), m);
}

// Map (every slice kernel): the logit transforms compiled in (kd_fused_run.h).
template <typename S, typename T, typename A, bool Map>
__global__ void __launch_bounds__(kVpThreads)
    kd_vp_stats_kernel(const KDParams p, const RowConfig<A> cfg, const int64_t vocab_total) {
  __shared__ RowState<A> part[kVpThreads];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t V = p.vocab;
  auto* out = static_cast<SliceStats<A>*>(p.slice_stats);
  for (int64_t r = blockIdx.x; r < p.n_rows; r += gridDim.x) {
    // y_raw is the same in every thread of the CTA: the `continue` below is uniform, no thread
    // skips a barrier another one waits at.
    const int64_t y_raw = p.labels != nullptr ? p.labels[r] : -1;
    if (p.labels != nullptr && y_raw == p.ignore_index) {
      if (tid == 0) out[r] = SliceStats<A>{RowState<A>::empty(), A(0)};
      continue;
    }
    const bool y_valid = p.labels == nullptr || (y_raw >= 0 && y_raw < vocab_total);
    if (tid == 0) KD_VP_LABEL_ASSERT(y_valid);
    const S* srow = static_cast<const S*>(p.student) + row_offset(p, r, p.student_strides);
    const T* trow = static_cast<const T*>(p.teacher) + row_offset(p, r, p.teacher_strides);

    RowState<A> st = RowState<A>::empty();
    for (int64_t i = tid; i < V; i += kVpThreads) {
      push(st, logit_at<Map>(srow, i, cfg.map_s),
           cfg.soft ? logit_at<Map>(trow, i, cfg.map_t) : A(0), cfg);
    }
    // Fixed tree (block_tree_reduce). Threads without a column hold the empty state (merge()
    // handles it, as it does the empty state of an all -inf stretch of the row).
    st = block_tree_reduce<kVpThreads>(
        st, part, [&cfg](const RowState<A>& x, const RowState<A>& y) { return merge(x, y, cfg); });
    if (tid == 0) {
      const int64_t y = y_raw - p.vocab_offset;  // the label's column in this slice (if in it)
      A s_label = A(0);
      if (cfg.hard) {
        s_label = !y_valid ? A(NAN) : (y >= 0 && y < V) ? logit_at<Map>(srow, y, cfg.map_s) : A(0);
      }
      out[r] = SliceStats<A>{st, s_label};
    }
    __syncthreads();  // part[] is rewritten for the next row
  }
}

template <typename S, typename T, typename A, bool Map>
__global__ void __launch_bounds__(kVpThreads)
    kd_vp_mix_kernel(const KDParams p, const RowConfig<A> cfg) {
  __shared__ MixSums<A> part[kVpThreads];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t V = p.vocab;
  auto* out = static_cast<MixSums<A>*>(p.slice_mix);
  const auto* fin = static_cast<const RowFinal<A>*>(p.row_final);
  for (int64_t r = blockIdx.x; r < p.n_rows; r += gridDim.x) {
    if (p.labels != nullptr && p.labels[r] == p.ignore_index) {  // uniform over the CTA
      if (tid == 0) out[r] = mix_zero<A>();
      continue;
    }
    const S* srow = static_cast<const S*>(p.student) + row_offset(p, r, p.student_strides);
    const T* trow = static_cast<const T*>(p.teacher) + row_offset(p, r, p.teacher_strides);
    const RowResult<A> res = fin[r].res;
    MixSums<A> mx = mix_zero<A>();
    // Without the mix sweep (not jsd / tvd, or no soft term) the record is zeros (the CPU leaves
    // it unwritten; parallel.py never asks for it then).
    if (cfg.mix) {
      for (int64_t i = tid; i < V; i += kVpThreads) {
        const A ds = logit_at<Map>(srow, i, cfg.map_s) - res.ms;
        const A dt = (cfg.soft ? logit_at<Map>(trow, i, cfg.map_t) : A(0)) - res.mt;
        A q, pr, h;
        probs_at(res, cfg, ds, dt, q, pr, h);
        mix_at(mx, res, cfg, ds, dt, q, pr);
      }
    }
    mx = block_tree_reduce<kVpThreads>(
        mx, part, [](const MixSums<A>& x, const MixSums<A>& y) { return mix_add(x, y); });
    if (tid == 0) out[r] = mx;
    __syncthreads();  // part[] is rewritten for the next row
  }
}

template <typename S, typename T, typename A, bool Map>
__global__ void __launch_bounds__(kVpThreads)
    kd_vp_grad_kernel(const KDParams p, const RowConfig<A> cfg) {
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t V = p.vocab;
  const auto* fin = static_cast<const RowFinal<A>*>(p.row_final);
  for (int64_t r = blockIdx.x; r < p.n_rows; r += gridDim.x) {
    S* gsrow = cfg.want_gs ? static_cast<S*>(p.grad_student) + r * V : nullptr;
    T* gtrow = p.grad_teacher != nullptr ? static_cast<T*>(p.grad_teacher) + r * V : nullptr;
    const int64_t y_raw = p.labels != nullptr ? p.labels[r] : -1;
    if (p.labels != nullptr && y_raw == p.ignore_index) {
      if (gsrow != nullptr) zero_range(gsrow, V, tid, kVpThreads);
      if (gtrow != nullptr) zero_range(gtrow, V, tid, kVpThreads);
      continue;
    }
    if (cfg.zero_gt) zero_range(gtrow, V, tid, kVpThreads);
    if (!cfg.want_gs && !cfg.want_gt) continue;
    const S* srow = static_cast<const S*>(p.student) + row_offset(p, r, p.student_strides);
    const T* trow = static_cast<const T*>(p.teacher) + row_offset(p, r, p.teacher_strides);
    const RowResult<A> res = fin[r].res;
    // The label's column in this slice; never a column when there are no labels or it is
    // elsewhere (then -kh is applied by the process that holds it).
    const int64_t y = p.labels != nullptr ? y_raw - p.vocab_offset : -1;
    for (int64_t i = tid; i < V; i += kVpThreads) {
      const A s = logit_at<Map>(srow, i, cfg.map_s);
      const A ds = s - res.ms;
      const A t = cfg.soft ? logit_at<Map>(trow, i, cfg.map_t) : A(0);
      const A dt = t - res.mt;
      A q, pr, h, gs, gt;
      probs_at(res, cfg, ds, dt, q, pr, h);
      grad_at(res, cfg, ds, dt, q, pr, h, gs, gt);
      if (i == y) gs -= res.kh;
      // w.r.t. the raw logits: after the label's -kh (part of the gradient w.r.t. z).
      if constexpr (Map) {  // (not map_out(..., cfg.map_s): see logit_at)
        const LogitMap<A> ms = cfg.map_s, mt = cfg.map_t;
        gs = map_out<Map>(gs, s, ms);
        gt = map_out<Map>(gt, t, mt);
      }
      if (gsrow != nullptr) gsrow[i] = from_acc<S>(gs);
      if (cfg.want_gt) gtrow[i] = from_acc<T>(gt);
    }
  }
}

// Row r's records of the n_slices processes are slices[r + k * n_rows], k in rank order.
template <typename A>
__global__ void __launch_bounds__(kVpMergeThreads)
    kd_vp_merge_kernel(const SliceStats<A>* slices, int64_t n_slices, int64_t n_rows,
                       const int64_t* labels, int64_t ignore_index, const RowConfig<A> cfg,
                       const A* grad_scale_dev, A grad_scale_host, RowFinal<A>* out) {
  const A scale = grad_scale_dev != nullptr ? *grad_scale_dev : grad_scale_host;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n_rows;
       r += stride) {
    if (labels != nullptr && labels[r] == ignore_index) {
      out[r] = RowFinal<A>{};  // an ignored row: loss 0; the kernels skip it
      continue;
    }
    out[r] = finalize_slices(slices + r, n_slices, n_rows, cfg, scale);
  }
}

template <typename A>
__global__ void __launch_bounds__(kVpMergeThreads)
    kd_vp_merge_mix_kernel(const MixSums<A>* slices, int64_t n_slices, int64_t n_rows,
                           const RowConfig<A> cfg, RowFinal<A>* fin) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n_rows;
       r += stride) {
    // Ignored rows: all-zero constants and mix sums (the Mix step writes zeros): loss stays 0.
    RowFinal<A> f = fin[r];
    finalize_slices_mix(f, slices + r, n_slices, n_rows, cfg);
    fin[r] = f;
  }
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

unsigned row_grid(int64_t n_rows) {
  return static_cast<unsigned>(std::min<int64_t>(n_rows, kVpMaxGrid));
}

unsigned merge_grid(int64_t n_rows) {
  return static_cast<unsigned>(
      std::min<int64_t>((n_rows + kVpMergeThreads - 1) / kVpMergeThreads, kVpMaxGrid));
}

// The logits must be CUDA tensors: the dispatcher may route here for a CUDA labels or record
// tensor with CPU logits.
void check_cuda_logits(const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK(student.is_cuda() && teacher.is_cuda(),
              "kdfused: CUDA kernel called with non-CUDA logits (", student.device(), ", ",
              teacher.device(), ")");
}

// Runs the slice kernel of p.phase (Stats, Mix or Grad) on the current stream.
void run_slice_kernel(const KDParams& p, at::ScalarType s_type, at::ScalarType t_type,
                      int64_t vocab_total) {
  if (p.n_rows == 0) return;  // a grid of 0 is an error
  check_device_arch(*at::cuda::getCurrentDeviceProperties());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const unsigned grid = row_grid(p.n_rows);
  dispatch_pair(s_type, t_type, [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    using A = std::conditional_t<std::is_same_v<S, double>, double, float>;
    const RowConfig<A> cfg = make_row_config<A>(p);
    auto launch = [&](auto map_tag) {
      constexpr bool Map = decltype(map_tag)::value;
      switch (p.phase) {
        case Phase::Stats:
          kd_vp_stats_kernel<S, T, A, Map><<<grid, kVpThreads, 0, stream>>>(p, cfg, vocab_total);
          break;
        case Phase::Mix:
          kd_vp_mix_kernel<S, T, A, Map><<<grid, kVpThreads, 0, stream>>>(p, cfg);
          break;
        case Phase::Grad:
          kd_vp_grad_kernel<S, T, A, Map><<<grid, kVpThreads, 0, stream>>>(p, cfg);
          break;
        default:
          TORCH_INTERNAL_ASSERT(false,
                                "kdfused: no vocabulary-parallel CUDA kernel for this phase");
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (cfg.map_s.on || cfg.map_t.on) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
  });
}

// The mean's gradient scale 1 / max(n_valid, 1) counted on the device (and n_valid), or nothing
// (nullptr: the scale is known on the host) for the other reductions or without labels.
template <typename A>
std::pair<at::Tensor, at::Tensor> device_scale(Reduction red, const at::Tensor& labels,
                                               int64_t n_rows, int64_t ignore_index,
                                               const at::TensorOptions& acc_opts) {
  if (red != Reduction::Mean || !labels.defined() || n_rows == 0) return {};
  at::Tensor scale = at::empty({}, acc_opts);
  at::Tensor n_valid = at::empty({}, acc_opts.dtype(at::kLong));
  kd_count_kernel<A><<<1, kCountThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      labels.data_ptr<int64_t>(), n_rows, ignore_index, scale.data_ptr<A>(),
      n_valid.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {scale, n_valid};
}

double host_scale(Reduction red, int64_t n_rows) {
  return red == Reduction::Mean ? 1.0 / static_cast<double>(std::max<int64_t>(n_rows, 1)) : 1.0;
}

// The checks of a kernel step's logits: check_inputs, then CUDA tensors.
void check_step_inputs(const at::Tensor& student, const at::Tensor& teacher,
                       const std::optional<at::Tensor>& labels, const KDOptions& opt) {
  check_inputs(student, teacher, labels, opt);
  check_cuda_logits(student, teacher);
}

// One kernel step on the slice (the host part: prepare_step): the checks, on the logits' device,
// the native dtype pair (kd_dtype_dispatch.h), then the slice kernel. Returns the prepared call.
Prepared run_step(Phase phase, const at::Tensor& student, const at::Tensor& teacher,
                  const std::optional<at::Tensor>& labels, int64_t vocab_offset,
                  const at::Tensor* row_final, at::Tensor* out, const KDOptions& opt,
                  int64_t vocab_total, bool grad_student = false, bool grad_teacher = false) {
  check_step_inputs(student, teacher, labels, opt);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor s_in, t_in;
  std::tie(s_in, t_in) = native_inputs(student, teacher);
  Prepared prep = prepare_step(phase, s_in, t_in, labels, vocab_offset, row_final, out, opt,
                               grad_student, grad_teacher);
  run_slice_kernel(prep.params, s_in.scalar_type(), t_in.scalar_type(), vocab_total);
  return prep;
}

// ------------------------------------------------------------------------------------------------
// The ops
// ------------------------------------------------------------------------------------------------

at::Tensor vp_stats(const at::Tensor& student, const at::Tensor& teacher,
                    const std::optional<at::Tensor>& labels, int64_t vocab_offset,
                    int64_t vocab_total, const KDOptions& opt) {
  at::Tensor out;
  run_step(Phase::Stats, student, teacher, labels, vocab_offset, nullptr, &out, opt, vocab_total);
  return out;
}

at::Tensor vp_merge(const at::Tensor& slice_stats, const std::optional<at::Tensor>& labels,
                    const KDOptions& opt) {
  const KDParams p = params_of(opt);
  const int64_t ignore_index = opt.ignore_index;
  TORCH_CHECK(slice_stats.is_cuda(), "kdfused: CUDA kernel called with a non-CUDA slice_stats");
  const c10::cuda::CUDAGuard guard(slice_stats.device());
  const at::Tensor y = check_merge_inputs(slice_stats, labels);
  const int64_t n_slices = slice_stats.size(0), n_rows = slice_stats.size(1);
  const at::ScalarType acc = slice_stats.scalar_type();
  at::Tensor fin = at::empty({n_rows, kFinalFields}, slice_stats.options());
  if (n_rows == 0) return fin;
  check_device_arch(*at::cuda::getCurrentDeviceProperties());
  AT_DISPATCH_FLOATING_TYPES(acc, "kd_vp_merge", [&] {
    using A = scalar_t;
    const auto scale = device_scale<A>(p.reduction, y, n_rows, ignore_index, slice_stats.options());
    kd_vp_merge_kernel<A>
        <<<merge_grid(n_rows), kVpMergeThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            reinterpret_cast<const SliceStats<A>*>(slice_stats.data_ptr<A>()), n_slices, n_rows,
            y.defined() ? y.data_ptr<int64_t>() : nullptr, ignore_index, make_row_config<A>(p),
            scale.first.defined() ? scale.first.data_ptr<A>() : nullptr,
            static_cast<A>(host_scale(p.reduction, n_rows)),
            reinterpret_cast<RowFinal<A>*>(fin.data_ptr<A>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return fin;
}

at::Tensor vp_mix(const at::Tensor& student, const at::Tensor& teacher,
                  const std::optional<at::Tensor>& labels, const at::Tensor& row_final,
                  int64_t vocab_offset, const KDOptions& opt) {
  at::Tensor out;
  run_step(Phase::Mix, student, teacher, labels, vocab_offset, &row_final, &out, opt, 0);
  return out;
}

at::Tensor vp_merge_mix(const at::Tensor& row_final, const at::Tensor& slice_mix,
                        const KDOptions& opt) {
  const KDParams p = params_of(opt);
  TORCH_CHECK(row_final.dim() == 2, "kdfused: row_final must have shape (rows, ", kFinalFields,
              ")");
  const int64_t n_rows = row_final.size(0);
  const at::ScalarType acc = row_final.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble,
              "kdfused: row_final must be float32 or float64, got ", acc);
  TORCH_CHECK(row_final.is_cuda(), "kdfused: CUDA kernel called with a non-CUDA row_final");
  check_record(row_final, 2, n_rows, kFinalFields, acc, "row_final", row_final.device());
  check_record(slice_mix, 3, n_rows, kMixFields, acc, "slice_mix", row_final.device());
  TORCH_CHECK(slice_mix.size(0) >= 1, "kdfused: slice_mix must have shape (group size, rows, ",
              kMixFields, ") with a group size >= 1");
  const c10::cuda::CUDAGuard guard(row_final.device());
  at::Tensor fin = row_final.clone(at::MemoryFormat::Contiguous);
  if (n_rows == 0) return fin;
  check_device_arch(*at::cuda::getCurrentDeviceProperties());
  AT_DISPATCH_FLOATING_TYPES(acc, "kd_vp_merge_mix", [&] {
    using A = scalar_t;
    kd_vp_merge_mix_kernel<A>
        <<<merge_grid(n_rows), kVpMergeThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            reinterpret_cast<const MixSums<A>*>(slice_mix.data_ptr<A>()), slice_mix.size(0), n_rows,
            make_row_config<A>(p), reinterpret_cast<RowFinal<A>*>(fin.data_ptr<A>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return fin;
}

KDOutputs vp_grad(const at::Tensor& student, const at::Tensor& teacher,
                  const std::optional<at::Tensor>& labels, const at::Tensor& row_final,
                  int64_t vocab_offset, const KDOptions& opt, bool grad_student,
                  bool grad_teacher) {
  const int64_t ignore_index = opt.ignore_index;
  const Reduction red = opt.reduction;
  // The kernel step runs with "sum"; the loss below is reduced from row_final.
  const KDOptions step = with_reduction(opt, Reduction::Sum);
  check_step_inputs(student, teacher, labels, step);
  const c10::cuda::CUDAGuard guard(student.device());
  // With no gradient asked for, the kernel has nothing to do (the loss is in row_final).
  const bool any = grad_student || grad_teacher;
  at::Tensor unused;
  Prepared prep = any ? run_step(Phase::Grad, student, teacher, labels, vocab_offset, &row_final,
                                 &unused, step, 0, grad_student, grad_teacher)
                      : prepare(student, teacher, labels, step, false, false);
  const int64_t n_rows = prep.params.n_rows;
  check_record(row_final, 2, n_rows, kFinalFields, accumulate_type(student, teacher), "row_final",
               student.device());

  // The row losses are the first field of each RowFinal record (a copy: never a view of it).
  const at::Tensor row_loss = row_final.select(1, 0).clone(at::MemoryFormat::Contiguous);
  at::Tensor loss;
  if (red == Reduction::None) {
    loss = row_loss.view(student.sizes().slice(0, student.dim() - 1));
  } else {
    loss = at::empty({}, row_final.options());
    AT_DISPATCH_FLOATING_TYPES(row_final.scalar_type(), "kd_vp_grad", [&] {
      using A = scalar_t;
      // The mean's n_valid as the merge counted it for the gradients (on the device).
      const auto scale =
          device_scale<A>(red, prep.labels, n_rows, ignore_index, row_final.options());
      kd_reduce_kernel<A><<<1, kReduceThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          row_loss.data_ptr<A>(), n_rows, red == Reduction::Mean,
          scale.second.defined() ? scale.second.data_ptr<int64_t>() : nullptr, n_rows,
          loss.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (prep.student.scalar_type() != student.scalar_type()) {
    prep.grad_student = prep.grad_student.to(student.scalar_type());
  }
  if (prep.teacher.scalar_type() != teacher.scalar_type()) {
    prep.grad_teacher = prep.grad_teacher.to(teacher.scalar_type());
  }
  return {loss, prep.grad_student, prep.grad_teacher, at::ones_like(loss), prep.entropy};
}

}  // namespace

}  // namespace kdfused::cuda

TORCH_LIBRARY_IMPL(kdfused, CUDA, m) {
  using Ops = kdfused::VocabParallelOps<&kdfused::cuda::vp_stats, &kdfused::cuda::vp_merge,
                                        &kdfused::cuda::vp_mix, &kdfused::cuda::vp_merge_mix,
                                        &kdfused::cuda::vp_grad>;
  kdfused::register_vocab_parallel<Ops>(m);
}
