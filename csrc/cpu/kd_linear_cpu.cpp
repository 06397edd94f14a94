// kd_linear_cpu.cpp -- CPU implementation of kdfused::kd_linear_loss: the chunk loop of
// kd_linear_host.cpp (GEMMs by at::mm / at::addmm, i.e. MKL / oneDNN) with the fused CPU kernel
// (cpu::run_forward).
//
// Label values are read on the host before any GEMM: an out-of-range label raises ValueError
// naming its row, the valid rows are counted exactly, and chunks whose rows are all ignored skip
// their GEMMs. The row losses are reduced by one sequential loop in double.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "../kd_host.h"
#include "../kd_linear_host.h"
#include "kd_cpu_dispatch.h"
#include "kd_cpu_host.h"

namespace kdfused {

namespace {

class CpuLinearBackend final : public LinearBackend {
 public:
  explicit CpuLinearBackend(const at::Tensor& /*student_hidden*/) {}

  // Label values are checked here, over all rows, before any GEMM.
  ValidRows valid_rows(const at::Tensor& y, int64_t V, int64_t ignore_index) const override {
    ValidRows v;
    v.n_valid = cpu::count_valid_rows(y, y.numel(), V, ignore_index, "kdfused.linear_kd_loss");
    v.host_labels = y.data_ptr<int64_t>();
    return v;
  }

  void run_kernel(KDParams& p, const GradScale& scale) const override {
    TORCH_INTERNAL_ASSERT(!scale.dev.defined(), "kdfused: a device gradient scale on the CPU");
    p.grad_scale = scale.host;
    cpu::run_forward(p);
  }

  // Fixed order, in double, as kd_loss does: deterministic, independent of the chunking.
  at::Tensor reduce(const at::Tensor& row_loss, bool mean, const ValidRows& valid) const override {
    return at::full({}, cpu::sum_rows(row_loss, mean, valid.n_valid), row_loss.options());
  }
};

}  // namespace

}  // namespace kdfused

TORCH_LIBRARY_IMPL(kdfused, CPU, m) {
  m.impl("kd_linear_loss", &kdfused::kd_linear_loss_op<kdfused::CpuLinearBackend>);
}
