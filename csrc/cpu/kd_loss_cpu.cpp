// kd_loss_cpu.cpp -- CPU implementations of the kdfused ops and the instruction-set dispatch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "../kd_host.h"
#include "kd_cpu_dispatch.h"
#include "kd_cpu_host.h"

namespace kdfused::cpu {

namespace {

// Every instruction set this file knows, in the order build_info lists them.
constexpr Isa kAllIsas[] = {Isa::Scalar, Isa::Default, Isa::AVX2, Isa::AVX512};

bool cpu_supports(Isa isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  switch (isa) {
    case Isa::Scalar: return true;
    case Isa::Default: return true;
    case Isa::AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::AVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return isa == Isa::Default || isa == Isa::Scalar;
#endif
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::AVX512: return "avx512";
    case Isa::AVX2: return "avx2";
    case Isa::Scalar: return "scalar";
    default: return "default";
  }
}

// An instruction set is compiled in when the fused kernel was built for it.
bool usable(Isa isa) {
  return kernel_for<ForwardStub>(isa) != nullptr && cpu_supports(isa);
}

Isa widest() {
  for (Isa isa : {Isa::AVX512, Isa::AVX2}) {
    if (usable(isa)) return isa;
  }
  return Isa::Default;
}

Isa parse_isa(const std::string& name) {
  if (name == "auto") return widest();
  for (Isa isa : kAllIsas) {
    if (name == isa_name(isa)) {
      TORCH_CHECK_VALUE(usable(isa), "kdfused: CPU instruction set '", name,
                        "' is not compiled in or not supported by this CPU");
      return isa;
    }
  }
  TORCH_CHECK_VALUE(false, "kdfused: unknown CPU instruction set '", name,
                    "' (expected auto, scalar, default, avx2 or avx512)");
}

std::atomic<int>& selected() {
  static std::atomic<int> isa{[] {
    const char* env = std::getenv("KDFUSED_CPU_ISA");
    return static_cast<int>(env && *env ? parse_isa(env) : widest());
  }()};
  return isa;
}

}  // namespace

void throw_scratch_oom(size_t bytes) {
  TORCH_CHECK(false, "kdfused: out of memory allocating ", bytes, " bytes of scratch");
}

bool stream_grad_stores(size_t bytes) {
  static const int forced = [] {
    const char* env = std::getenv("KDFUSED_CPU_STREAM_STORES");
    return env && *env ? (env[0] == '0' ? 0 : 1) : -1;
  }();
  return forced < 0 ? bytes >= (size_t(64) << 20) : forced == 1;
}

Isa selected_isa() {
  return static_cast<Isa>(selected().load());
}

void run_forward(const KDParams& p) {
  dispatch<ForwardStub>()(p);
}

std::string selected_isa_name() {
  return isa_name(selected_isa());
}

std::vector<std::string> compiled_isa_names() {
  std::vector<std::string> names;
  for (Isa isa : kAllIsas) {
    if (usable(isa)) names.emplace_back(isa_name(isa));
  }
  return names;
}

void run_exp(const std::string& name, const float* x, float* y, int64_t n) {
  kernel_for<ExpStub>(parse_isa(name))(x, y, n);
}

void set_isa(const std::string& name) {
  selected().store(static_cast<int>(parse_isa(name)));
}

}  // namespace kdfused::cpu

namespace kdfused::cpu {

int64_t count_valid_rows(const at::Tensor& labels, int64_t n_rows, int64_t V, int64_t ignore_index,
                         const char* op) {
  if (!labels.defined()) return n_rows;
  const int64_t* y = labels.data_ptr<int64_t>();
  int64_t n_valid = 0;
  for (int64_t r = 0; r < n_rows; ++r) {
    if (y[r] == ignore_index) continue;
    TORCH_CHECK_VALUE(y[r] >= 0 && y[r] < V, op, ": labels must be in [0, ", V,
                      ") or equal ignore_index (", ignore_index, "), got ", y[r], " at row ", r);
    ++n_valid;
  }
  return n_valid;
}

double sum_rows(const at::Tensor& row_loss, bool mean, int64_t n_valid) {
  const auto sum = [&](auto tag) {
    using A = decltype(tag);
    const A* row = row_loss.const_data_ptr<A>();
    double total = 0;
    for (int64_t r = 0; r < row_loss.numel(); ++r) total += static_cast<double>(row[r]);
    if (mean) total /= static_cast<double>(std::max<int64_t>(n_valid, 1));
    return total;
  };
  return row_loss.scalar_type() == at::kDouble ? sum(double{}) : sum(float{});
}

}  // namespace kdfused::cpu

namespace kdfused {

namespace {

// kd_loss on parsed options and checked shapes (kd_loss_op).
KDOutputs kd_loss_cpu(const at::Tensor& student, const at::Tensor& teacher,
                      const std::optional<at::Tensor>& labels, const KDOptions& opt,
                      bool grad_student, bool grad_teacher) {
  Prepared prep = prepare(student, teacher, labels, opt, grad_student, grad_teacher);
  KDParams& p = prep.params;
  // Label values are checked here, before anything is computed (the shapes in check_inputs).
  const int64_t n_valid = cpu::count_valid_rows(prep.labels, p.n_rows, p.vocab, p.ignore_index);
  const bool mean = p.reduction == Reduction::Mean;
  p.grad_scale = cpu::mean_scale(mean, n_valid);
  if (p.n_rows > 0) cpu::run_forward(p);
  if (p.reduction != Reduction::None) {
    prep.loss.fill_(cpu::sum_rows(prep.row_loss, mean, n_valid));
  }
  return outputs_of(prep);
}

// Rescales saved gradients from the grad_output they were made for (grad_scale) to grad_output.
void kd_scale_grads_cpu(at::Tensor& grad_student, at::Tensor& grad_teacher, at::Tensor& grad_scale,
                        const at::Tensor& grad_output) {
  TORCH_CHECK(grad_output.sizes() == grad_scale.sizes(), "kdfused: grad_output has shape ",
              grad_output.sizes(), ", expected ", grad_scale.sizes());
  const at::Tensor g = grad_output.to(grad_scale.scalar_type()).contiguous();
  if (at::equal(g, grad_scale)) return;  // loss.backward(): nothing to do (CPU tensors, no sync)
  // The factor per row; a gradient last scaled by 0 (or inf/NaN) is lost: NaN, never silently 0.
  at::Tensor factor = g / grad_scale;
  factor =
      at::where(at::isfinite(grad_scale) & (grad_scale != 0), factor, at::full_like(factor, NAN));
  factor = at::where(g == grad_scale, at::ones_like(factor), factor);
  for (at::Tensor* grad : {&grad_student, &grad_teacher}) {
    if (grad->numel() == 0) continue;
    // The factor is kept a dimensioned float/double tensor so that type promotion computes the
    // product in that type: a 0-dim factor (or a Python scalar) would be rounded to the gradient's
    // dtype first, bfloat16 turning 3.7 into 3.703. For reduction "none" one factor per row.
    grad->mul_(factor.dim() == 0 ? factor.reshape({1}) : factor.unsqueeze(-1));
  }
  grad_scale.copy_(g);
}

}  // namespace

}  // namespace kdfused

TORCH_LIBRARY_IMPL(kdfused, CPU, m) {
  m.impl("kd_loss", &kdfused::kd_loss_op<kdfused::kd_loss_cpu>);
  m.impl("kd_scale_grads_", &kdfused::kd_scale_grads_cpu);
}
