// kd_linear_cuda.cu -- CUDA implementation of kdfused::kd_linear_loss: the chunk loop of
// kd_linear_host.cpp, whose GEMMs (at::mm_out / at::addmm_out: cuBLAS) and elementwise steps run
// on the current stream of the inputs' device, with the fused CUDA kd kernel of kd_loss_cuda.cu
// (run_fused_kernel) on each chunk. Host code only; the kernels are compiled in
// csrc/cuda/instantiations/.
//
// No host sync anywhere in the call, as for kd_loss on CUDA, so that the chunks' GEMMs and kernels
// queue up behind the model's forward without a stall (and the op can be captured in a CUDA
// graph). Hence the label values are never read on the host:
//   * the valid rows are counted on the device (n_valid, a 0-dim int64 tensor); "mean"'s gradient
//     scale 1 / max(n_valid, 1) over all rows is a device scalar that the kernel reads, and the
//     loss is divided by it on the device;
//   * a label out of [0, V) that is not ignore_index stops the fused kernel with a device-side
//     assert (as kd_loss and PyTorch's cross-entropy do on CUDA), instead of the CPU's ValueError;
//   * every chunk runs its GEMMs, also one whose rows are all ignored (the CPU skips those): its
//     logit gradient is exactly zero, so the results are the same.
// The row losses are reduced by at::sum in double on the device (a fixed order: deterministic on a
// given device).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <utility>

#include "../kd_linear_host.h"
#include "kd_fused_cuda.h"

namespace kdfused::cuda {

namespace {

class CudaLinearBackend final : public LinearBackend {
 public:
  // On student_hidden's device for the whole call (the argument checks reject tensors on other
  // devices; a CPU student_hidden with CUDA weights gets there without a guard and is refused).
  explicit CudaLinearBackend(const at::Tensor& student_hidden) {
    if (student_hidden.is_cuda()) guard_.set_device(student_hidden.device());
  }

  // The fused kernel's limit (32-bit vector indices; kd_loss checks the same).
  int64_t max_vocab() const override { return INT_MAX / 16; }

  ValidRows valid_rows(const at::Tensor& y, int64_t /*V*/, int64_t ignore_index) const override {
    ValidRows v;
    v.n_valid_dev = y.ne(ignore_index).sum();  // int64, on the device: no sync
    return v;
  }

  std::pair<at::ScalarType, at::ScalarType> kernel_dtypes(at::ScalarType s,
                                                          at::ScalarType t) const override {
    return fused_kernel_dtypes(s, t);
  }

  void run_kernel(KDParams& p, const GradScale& scale) const override {
    const void* scale_dev = nullptr;
    if (scale.dev.defined()) {
      // The kernel reads the scale in its accumulation type: double for float64 logits.
      const at::ScalarType want = p.student_dtype == DType::Float64 ? at::kDouble : at::kFloat;
      TORCH_INTERNAL_ASSERT(scale.dev.scalar_type() == want && scale.dev.is_cuda(),
                            "kdfused: the gradient scale must be a CUDA ", want, " scalar");
      scale_dev = scale.dev.const_data_ptr();
    }
    run_fused_kernel(p, scale_dev, scale.host);
  }

  at::Tensor reduce(const at::Tensor& row_loss, bool mean, const ValidRows& valid) const override {
    at::Tensor total = row_loss.sum(at::kDouble);
    if (mean) {
      if (valid.n_valid_dev.defined()) {
        total = total.div(valid.n_valid_dev.clamp_min(1).to(at::kDouble));
      } else {
        total = total.div(static_cast<double>(std::max<int64_t>(valid.n_valid, 1)));
      }
    }
    return total.to(row_loss.scalar_type());
  }

 private:
  c10::cuda::OptionalCUDAGuard guard_;
};

}  // namespace

}  // namespace kdfused::cuda

TORCH_LIBRARY_IMPL(kdfused, CUDA, m) {
  m.impl("kd_linear_loss", &kdfused::kd_linear_loss_op<kdfused::cuda::CudaLinearBackend>);
}
