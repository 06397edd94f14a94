// kd_loss_cuda.cu -- CUDA implementations of the kdfused ops (TORCH_LIBRARY_IMPL(kdfused, CUDA)).
//
// kd_loss, on the current stream of the inputs' device, with no host sync:
//   1. (mean with labels) kd_count_kernel: n_valid and the gradient scale 1/max(n_valid, 1) into
//      device scalars (mean without labels: n_valid = N is known on the host; sum/none: 1);
//   2. the fused kernel chosen by choose_plan() (kd_launch.h): per row, one read of s and t, the
//      row loss, and the gradients already multiplied by the gradient scale;
//   3. (mean/sum) kd_reduce_kernel: the fixed-order sum of the row losses.
// kd_scale_grads_: rescales the saved gradients on the device (see the kernels' comments).
//
// Dtype pairs: kd_dtype_dispatch.h (8 native pairs; the others are converted exactly, and their
// gradients converted back).
//
// Size: the host side of the CUDA op (dtype dispatch, the small kernels' launches and the
// gradient-scaling op). The fused kernels are in kd_kernels.cuh; their launch (plan choice and the
// launch of each policy) is run_fused_kernels (kd_fused_run.cuh), instantiated in the generated
// files of csrc/cuda/instantiations/ so that its 64 kernels compile in parallel; the host helpers
// that do not depend on the kernels' types are in kd_fused_host.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <optional>
#include <tuple>
#include <utility>

#include "../kd_host.h"
#include "kd_dtype_dispatch.h"
#include "kd_fused_cuda.h"
#include "kd_fused_run.h"
#include "kd_kernels.cuh"
#include "kd_launch.h"

namespace kdfused::cuda {

namespace {

template <typename S, typename T, typename A>
void run_fused(const KDParams& p, const A* grad_scale_dev, double grad_scale_host) {
  check_device_arch(*at::cuda::getCurrentDeviceProperties());
  KernelArgs<A> a{};
  a.cfg = make_row_config<A>(p);
  a.grad_scale_dev = grad_scale_dev;
  a.grad_scale_host = static_cast<A>(grad_scale_host);
  a.mode = Mode::Fused;
  a.split = 1;
  a.chunk = p.vocab;
  a.stage = false;
  a.cluster = false;
  a.workspace = nullptr;
  // The transforms' code only where a side has one (kd_fused_run.h).
  const bool map = a.cfg.map_s.on || a.cfg.map_t.on;
  if (family_of(p.divergence) == DivFamily::Plain) {
    if (map) {
      run_fused_kernels<S, T, A, DivFamily::Plain, true>(p, a);
    } else {
      run_fused_kernels<S, T, A, DivFamily::Plain, false>(p, a);
    }
  } else {
    if (map) {
      run_fused_kernels<S, T, A, DivFamily::Other, true>(p, a);
    } else {
      run_fused_kernels<S, T, A, DivFamily::Other, false>(p, a);
    }
  }
}

// kd_loss on parsed options and checked shapes (kd_loss_op).
KDOutputs kd_loss_cuda(const at::Tensor& student, const at::Tensor& teacher,
                       const std::optional<at::Tensor>& labels, const KDOptions& opt,
                       bool grad_student, bool grad_teacher) {
  TORCH_CHECK(student.is_cuda() && teacher.is_cuda(),
              "kdfused: CUDA kernel called with non-CUDA logits");
  TORCH_CHECK_VALUE(student.size(-1) <= INT_MAX / 16,
                    "kdfused: the vocabulary dimension is too large (", student.size(-1),
                    ") for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(student.device());

  const at::ScalarType s_type = student.scalar_type();
  const at::ScalarType t_type = teacher.scalar_type();
  at::Tensor s_in, t_in;
  std::tie(s_in, t_in) = native_inputs(student, teacher);

  Prepared prep = prepare(s_in, t_in, labels, opt, grad_student, grad_teacher);
  const KDParams& p = prep.params;
  const bool mean = p.reduction == Reduction::Mean;
  const bool use_double = prep.loss.scalar_type() == at::kDouble;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  auto run = [&](auto acc_tag) {
    using A = decltype(acc_tag);
    // 1. Gradient scale of "mean" with labels: counted on the device (no sync).
    at::Tensor scale_dev, n_valid_dev;
    const A* scale_ptr = nullptr;
    const int64_t* n_valid_ptr = nullptr;
    const double scale_host =
        mean ? 1.0 / static_cast<double>(std::max<int64_t>(p.n_rows, 1)) : 1.0;
    if (mean && p.labels != nullptr && p.n_rows > 0) {
      scale_dev = at::empty({}, prep.loss.options());
      n_valid_dev = at::empty({}, prep.loss.options().dtype(at::kLong));
      kd_count_kernel<A><<<1, kCountThreads, 0, stream>>>(p.labels, p.n_rows, p.ignore_index,
                                                          scale_dev.data_ptr<A>(),
                                                          n_valid_dev.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      scale_ptr = scale_dev.data_ptr<A>();
      n_valid_ptr = n_valid_dev.data_ptr<int64_t>();
    }
    // 2. The fused kernel (nothing to launch for N = 0: a grid of 0 is an error).
    if (p.n_rows > 0) {
      dispatch_pair(s_in.scalar_type(), t_in.scalar_type(), [&](auto s_tag, auto t_tag) {
        using S = decltype(s_tag);
        using T = decltype(t_tag);
        using AA = std::conditional_t<std::is_same_v<S, double>, double, float>;
        if constexpr (std::is_same_v<AA, A>) {
          run_fused<S, T, A>(p, scale_ptr, scale_host);
        } else {
          TORCH_INTERNAL_ASSERT(false, "kdfused: accumulation type mismatch");
        }
      });
    }
    // 3. The reduction of the row losses (also for N = 0: the loss is 0).
    if (p.reduction != Reduction::None) {
      kd_reduce_kernel<A><<<1, kReduceThreads, 0, stream>>>(static_cast<const A*>(p.row_loss),
                                                            p.n_rows, mean, n_valid_ptr, p.n_rows,
                                                            static_cast<A*>(p.loss));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  if (use_double) {
    run(double{});
  } else {
    run(float{});
  }

  if (s_in.scalar_type() != s_type) prep.grad_student = prep.grad_student.to(s_type);
  if (t_in.scalar_type() != t_type) prep.grad_teacher = prep.grad_teacher.to(t_type);
  return outputs_of(prep);
}

void kd_scale_grads_cuda(at::Tensor& grad_student, at::Tensor& grad_teacher, at::Tensor& grad_scale,
                         const at::Tensor& grad_output) {
  TORCH_CHECK(grad_output.sizes() == grad_scale.sizes(), "kdfused: grad_output has shape ",
              grad_output.sizes(), ", expected ", grad_scale.sizes());
  TORCH_CHECK(grad_scale.is_cuda() && grad_scale.is_contiguous(),
              "kdfused: grad_scale must be a contiguous CUDA tensor");
  const c10::cuda::CUDAGuard guard(grad_scale.device());
  const int64_t n_scale = grad_scale.numel();
  if (n_scale == 0) return;
  // On the device, asynchronously: the dtype of the state, contiguous.
  const at::Tensor g = grad_output.to(grad_scale.device(), grad_scale.scalar_type()).contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

  AT_DISPATCH_FLOATING_TYPES(grad_scale.scalar_type(), "kd_scale_grads_", [&] {
    using F = scalar_t;
    const bool scalar = grad_scale.dim() == 0;
    at::Tensor factor;
    if (scalar) {
      factor = at::empty({}, grad_scale.options());
      // factor = f(g, old c), then c = g (one thread; the scaling kernel reads only `factor`).
      kd_scale_factor_kernel<F>
          <<<1, 1, 0, stream>>>(g.data_ptr<F>(), grad_scale.data_ptr<F>(), factor.data_ptr<F>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    for (at::Tensor* grad : {&grad_student, &grad_teacher}) {
      if (grad->numel() == 0) continue;
      TORCH_CHECK(
          grad->is_cuda() && grad->is_contiguous() && grad->device() == grad_scale.device(),
          "kdfused: saved gradients must be contiguous tensors on the device of grad_scale");
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, grad->scalar_type(), "kd_scale_grads_", [&] {
            using G = scalar_t;
            constexpr int kW = kVecBytes / static_cast<int>(sizeof(G));
            const int64_t n = grad->numel();
            if (scalar) {
              const int64_t want = (n / kW + kScaleThreads - 1) / kScaleThreads + 1;
              const int64_t blocks =
                  std::min<int64_t>(want, static_cast<int64_t>(sms) * kScaleMaxBlocksPerSM);
              kd_scale_flat_kernel<G, F>
                  <<<static_cast<unsigned>(blocks), kScaleThreads, 0, stream>>>(
                      grad->data_ptr<G>(), n, factor.data_ptr<F>());
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            } else {
              TORCH_CHECK(n % n_scale == 0, "kdfused: saved gradient of ", n, " elements for ",
                          n_scale, " rows");
              const int64_t V = n / n_scale;
              constexpr int kRowsPerBlock = kScaleThreads / kWarpSize;
              const int64_t blocks =
                  std::min<int64_t>((n_scale + kRowsPerBlock - 1) / kRowsPerBlock,
                                    static_cast<int64_t>(sms) * kScaleMaxBlocksPerSM * 4);
              kd_scale_rows_kernel<G, F>
                  <<<static_cast<unsigned>(blocks), kScaleThreads, 0, stream>>>(
                      grad->data_ptr<G>(), n_scale, V, g.data_ptr<F>(), grad_scale.data_ptr<F>());
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
          });
    }
    // Reduction "none": c = g after every row kernel has read the old c (stream order).
    if (!scalar) grad_scale.copy_(g);
  });
}

}  // namespace

std::pair<at::ScalarType, at::ScalarType> fused_kernel_dtypes(at::ScalarType s, at::ScalarType t) {
  return native_dtypes(s, t);
}

void run_fused_kernel(const KDParams& p, const void* grad_scale_dev, double grad_scale_host) {
  TORCH_INTERNAL_ASSERT(p.n_rows > 0, "kdfused: run_fused_kernel needs rows");
  dispatch_pair(scalar_type_of(p.student_dtype), scalar_type_of(p.teacher_dtype),
                [&](auto s_tag, auto t_tag) {
                  using S = decltype(s_tag);
                  using T = decltype(t_tag);
                  using A = std::conditional_t<std::is_same_v<S, double>, double, float>;
                  run_fused<S, T, A>(p, static_cast<const A*>(grad_scale_dev), grad_scale_host);
                });
}

}  // namespace kdfused::cuda

TORCH_LIBRARY_IMPL(kdfused, CUDA, m) {
  m.impl("kd_loss", &kdfused::kd_loss_op<kdfused::cuda::kd_loss_cuda>);
  m.impl("kd_scale_grads_", &kdfused::cuda::kd_scale_grads_cuda);
}
