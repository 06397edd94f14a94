// kd_linear_cpu.cpp -- CPU implementation of kdfused::kd_linear_loss: the chunk loop of
// kd_linear_host.cpp (GEMMs by at::mm / at::addmm, i.e. MKL / oneDNN) with the fused CPU kernel
// (cpu::run_forward).
//
// Label values are read on the host before any GEMM: an out-of-range label raises ValueError
// naming its row, the valid rows are counted exactly, and chunks whose rows are all ignored skip
// their GEMMs. The row losses are reduced by one sequential loop in double.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string_view>

#include "../kd_host.h"
#include "../kd_linear_host.h"
#include "kd_cpu_dispatch.h"

namespace kdfused {

namespace {

class CpuLinearBackend final : public LinearBackend {
 public:
  // Label values are checked here, over all rows, before any GEMM.
  ValidRows valid_rows(const at::Tensor& y, int64_t V, int64_t ignore_index) const override {
    const int64_t* p = y.data_ptr<int64_t>();
    int64_t n_valid = 0;
    for (int64_t r = 0; r < y.numel(); ++r) {
      if (p[r] == ignore_index) continue;
      TORCH_CHECK_VALUE(p[r] >= 0 && p[r] < V, "kdfused.linear_kd_loss: labels must be in [0, ", V,
                        ") or equal ignore_index (", ignore_index, "), got ", p[r], " at row ", r);
      ++n_valid;
    }
    ValidRows v;
    v.n_valid = n_valid;
    v.host_labels = p;
    return v;
  }

  void run_kernel(KDParams& p, const GradScale& scale) const override {
    TORCH_INTERNAL_ASSERT(!scale.dev.defined(), "kdfused: a device gradient scale on the CPU");
    p.grad_scale = scale.host;
    cpu::run_forward(p);
  }

  // Fixed order, in double, as kd_loss does: deterministic, independent of the chunking.
  at::Tensor reduce(const at::Tensor& row_loss, bool mean, const ValidRows& valid) const override {
    const int64_t N = row_loss.numel();
    const auto reduce_rows = [&](auto tag) {
      using A = decltype(tag);
      const A* r = row_loss.data_ptr<A>();
      double total = 0;
      for (int64_t i = 0; i < N; ++i) total += static_cast<double>(r[i]);
      if (mean) total /= static_cast<double>(std::max<int64_t>(valid.n_valid, 1));
      return at::full({}, total, row_loss.options());
    };
    return row_loss.scalar_type() == at::kDouble ? reduce_rows(double{}) : reduce_rows(float{});
  }
};

LinearOutputs kd_linear_loss_cpu(
    const at::Tensor& student_hidden, const at::Tensor& student_weight,
    const std::optional<at::Tensor>& student_bias, const std::optional<at::Tensor>& teacher_hidden,
    const std::optional<at::Tensor>& teacher_weight, const std::optional<at::Tensor>& teacher_bias,
    const std::optional<at::Tensor>& teacher_logits, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& row_weight, double temperature, double soft_weight,
    double hard_weight, c10::string_view divergence, double beta, int64_t ignore_index,
    c10::string_view reduction, int64_t chunk_size, bool grad_hidden, bool grad_weight,
    bool grad_bias) {
  const CpuLinearBackend backend;
  return kd_linear_loss_chunked(backend, student_hidden, student_weight, student_bias,
                                teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                                labels, row_weight, temperature, soft_weight, hard_weight,
                                std::string_view(divergence.data(), divergence.size()), beta,
                                ignore_index, std::string_view(reduction.data(), reduction.size()),
                                chunk_size, grad_hidden, grad_weight, grad_bias);
}

}  // namespace

}  // namespace kdfused

TORCH_LIBRARY_IMPL(kdfused, CPU, m) {
  m.impl("kd_linear_loss", &kdfused::kd_linear_loss_cpu);
}
