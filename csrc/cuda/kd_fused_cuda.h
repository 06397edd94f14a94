// kd_fused_cuda.h -- the fused CUDA kd kernel as other CUDA translation units call it (the linear
// op, kd_linear_cuda.cu). Defined in kd_loss_cuda.cu; the kernels' instantiations are in
// csrc/cuda/instantiations/ (kd_fused_run.h).
#pragma once

#include <ATen/ATen.h>

#include <utility>

#include "../kd_params.h"

namespace kdfused::cuda {

// The dtype pair the fused kernel reads for logits of dtypes (s, t): (s, t) when kernels are
// compiled for that pair; else float16 x bfloat16 -> the teacher as float32, and anything with
// float64 -> both float64 (exact conversions, as kd_loss does them).
std::pair<at::ScalarType, at::ScalarType> fused_kernel_dtypes(at::ScalarType s, at::ScalarType t);

// Runs the fused kernel on p (p.n_rows > 0; a dtype pair that fused_kernel_dtypes keeps) on the
// current stream of the current device, without a host sync: the row losses and the gradients,
// the gradients multiplied by the gradient scale *grad_scale_dev (a device scalar of the
// accumulation type: double for float64 logits, else float) or, when that is nullptr, by
// grad_scale_host. p.loss is not written (the caller reduces the row losses). A label out of
// [0, V) that is not ignore_index stops the kernel with a device-side assert.
void run_fused_kernel(const KDParams& p, const void* grad_scale_dev, double grad_scale_host);

}  // namespace kdfused::cuda
