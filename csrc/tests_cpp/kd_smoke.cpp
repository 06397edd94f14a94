// kd_smoke.cpp -- C++ smoke test of the CMake-built op library (libkdfused_ops.so).
//
// Calls kdfused::kd_loss and kdfused::kd_scale_grads_ through the dispatcher only (no kdfused
// header: exactly what a C++ user of the library does) on small CPU tensors and compares the loss
// and the gradients with a plain ATen computation in float64 (log_softmax + autograd).
//
//   kd_smoke                  the library is linked (its static op registrars ran at load time)
//   kd_smoke --dlopen PATH    the library is not linked: dlopen()ed first, then the same checks
//
// With KDFUSED_SMOKE_EXPECT_CUDA defined (CUDA builds) it also checks that a CUDA kernel is
// registered; the computations themselves always run on the CPU (no GPU needed).
// Exit status 0 and "kd_smoke: ok" on success; a message and status 1 on the first mismatch.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#endif

namespace {

// (loss, grad_student, grad_teacher, grad_scale, entropy)
using KDOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using KDLossFn = KDOut(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                       double, double, double, c10::string_view, double, int64_t, c10::string_view,
                       c10::ArrayRef<double>, bool, bool, bool);
using KDScaleFn = void(at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&);

struct Case {
  std::string name;
  std::vector<int64_t> shape;  // (..., V)
  at::ScalarType dtype;
  bool with_labels;
  double temperature, soft_weight, hard_weight;
  std::string divergence, reduction;
  bool strided;  // feed logits[..., :-1, :] views (row-strided, no copy in the op)
};

[[noreturn]] void fail(const std::string& msg) {
  throw std::runtime_error(msg);
}

void expect_close(const std::string& what, const at::Tensor& got, const at::Tensor& want,
                  double rtol, double atol) {
  if (got.sizes() != want.sizes()) {
    std::ostringstream os;
    os << what << ": shape " << got.sizes() << ", expected " << want.sizes();
    fail(os.str());
  }
  const at::Tensor g = got.to(at::kDouble);
  const at::Tensor w = want.to(at::kDouble);
  const at::Tensor err = (g - w).abs();
  const at::Tensor bound = atol + rtol * w.abs();
  if (!(err <= bound).all().item<bool>() || !g.isfinite().all().item<bool>()) {
    std::ostringstream os;
    os << what << ": max |got - want| = " << err.max().item<double>() << " (rtol " << rtol
       << ", atol " << atol << ")";
    fail(os.str());
  }
}

// The reference: loss and gradients (grad_output = 1) in float64 with ATen ops and autograd.
std::tuple<at::Tensor, at::Tensor, at::Tensor> reference(const Case& c, const at::Tensor& s_in,
                                                         const at::Tensor& t_in,
                                                         const std::optional<at::Tensor>& y_in,
                                                         int64_t ignore_index) {
  const int64_t V = s_in.size(-1);
  at::Tensor s = s_in.to(at::kDouble).detach().requires_grad_(true);
  at::Tensor t = t_in.to(at::kDouble).detach().requires_grad_(true);
  const double T = c.temperature;
  const at::Tensor s2 = s.reshape({-1, V});
  const at::Tensor t2 = t.reshape({-1, V});
  const int64_t n = s2.size(0);
  at::Tensor valid = at::ones({n}, s2.options().requires_grad(false));
  at::Tensor row = at::zeros({n}, s2.options().requires_grad(false));
  if (c.soft_weight != 0) {
    const at::Tensor log_q = at::log_softmax(s2 / T, -1);
    const at::Tensor log_p = at::log_softmax(t2 / T, -1);
    const at::Tensor p = log_p.exp();
    const at::Tensor d =
        c.divergence == "kl" ? (p * (log_p - log_q)).sum(-1) : -(p * log_q).sum(-1);
    row = row + c.soft_weight * T * T * d;
  }
  if (y_in.has_value()) {
    const at::Tensor y = y_in->reshape({n}).to(at::kLong);
    valid = (y != ignore_index).to(at::kDouble);
    if (c.hard_weight != 0) {
      const at::Tensor safe_y = at::where(y == ignore_index, at::zeros_like(y), y);
      const at::Tensor nll = -at::log_softmax(s2, -1).gather(1, safe_y.unsqueeze(1)).squeeze(1);
      row = row + c.hard_weight * nll;
    }
    row = row * valid;
  }
  at::Tensor loss;
  if (c.reduction == "sum") {
    loss = row.sum();
  } else if (c.reduction == "none") {
    loss = row.reshape(s_in.sizes().slice(0, s_in.dim() - 1));
  } else {  // batchmean / mean: per valid row
    loss = row.sum() / std::max(valid.sum().item<double>(), 1.0);
  }
  loss.sum().backward();
  return {loss.detach(), s.grad(), t.grad()};
}

void run_case(const Case& c, const c10::TypedOperatorHandle<KDLossFn>& kd_loss,
              const c10::TypedOperatorHandle<KDScaleFn>& kd_scale) {
  constexpr int64_t kIgnore = -100;
  at::manual_seed(1234);
  const auto opts = at::TensorOptions().dtype(c.dtype);
  std::vector<int64_t> full = c.shape;
  if (c.strided) full[full.size() - 2] += 1;
  at::Tensor s = (3.0 * at::randn(full, opts.dtype(at::kFloat))).to(c.dtype);
  at::Tensor t = (3.0 * at::randn(full, opts.dtype(at::kFloat))).to(c.dtype);
  if (c.strided) {
    const int64_t d = static_cast<int64_t>(full.size()) - 2;
    s = s.narrow(d, 0, full[d] - 1);
    t = t.narrow(d, 0, full[d] - 1);
  }
  std::optional<at::Tensor> labels;
  if (c.with_labels) {
    const std::vector<int64_t> lead(c.shape.begin(), c.shape.end() - 1);
    at::Tensor y = at::randint(c.shape.back(), lead, at::TensorOptions().dtype(at::kLong));
    y.view({-1})[1] = kIgnore;  // one ignored row
    labels = y;
  }

  // No logit transform (logit_map []), no entropy.
  auto [loss, gs, gt, scale, entropy] =
      kd_loss.call(s, t, labels, c.temperature, c.soft_weight, c.hard_weight, c.divergence, 0.5,
                   kIgnore, c.reduction, /*logit_map=*/{}, /*return_entropy=*/false,
                   /*grad_student=*/true, /*grad_teacher=*/true);
  if (entropy.numel() != 0) fail(c.name + ": an entropy that was not asked for");
  auto [ref_loss, ref_gs, ref_gt] = reference(c, s, t, labels, kIgnore);

  const bool dbl = c.dtype == at::kDouble;
  const double rtol = dbl ? 1e-10 : 1e-4;
  const double atol = dbl ? 1e-12 : 1e-6;
  if (loss.scalar_type() != (dbl ? at::kDouble : at::kFloat))
    fail(c.name + ": unexpected loss dtype");
  if (gs.scalar_type() != c.dtype || gt.scalar_type() != c.dtype)
    fail(c.name + ": unexpected grad dtype");
  expect_close(c.name + " loss", loss, ref_loss, rtol, atol);
  expect_close(c.name + " grad_student", gs, ref_gs, rtol, atol);
  expect_close(c.name + " grad_teacher", gt, ref_gt, rtol, atol);

  // Backward with grad_output = 2.5: kd_scale_grads_ rescales the saved gradients in place.
  const at::Tensor g_out = at::full_like(scale, 2.5);
  kd_scale.call(gs, gt, scale, g_out);
  expect_close(c.name + " scaled grad_student", gs, 2.5 * ref_gs, rtol, atol);
  expect_close(c.name + " scaled grad_teacher", gt, 2.5 * ref_gt, rtol, atol);
  expect_close(c.name + " grad_scale", scale, g_out, 0, 0);
  std::printf("kd_smoke: %-28s loss %s ok\n", c.name.c_str(),
              c.reduction == "none" ? "(per row)" : std::to_string(loss.item<double>()).c_str());
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc == 3 && std::strcmp(argv[1], "--dlopen") == 0) {
#if defined(__unix__) || defined(__APPLE__)
      if (!dlopen(argv[2], RTLD_NOW | RTLD_GLOBAL))
        fail(std::string("dlopen failed: ") + dlerror());
#else
      fail("--dlopen is not supported on this platform");
#endif
    } else if (argc != 1) {
      std::fprintf(stderr, "usage: %s [--dlopen path/to/libkdfused_ops.so]\n", argv[0]);
      return 2;
    }

    auto& dispatcher = c10::Dispatcher::singleton();
    const auto loss_op = dispatcher.findSchemaOrThrow("kdfused::kd_loss", "");
    const auto scale_op = dispatcher.findSchemaOrThrow("kdfused::kd_scale_grads_", "");
    if (!loss_op.hasKernelForDispatchKey(c10::DispatchKey::CPU) ||
        !scale_op.hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
      fail("no CPU kernel registered for the kdfused ops");
    }
#ifdef KDFUSED_SMOKE_EXPECT_CUDA
    if (!loss_op.hasComputedKernelForDispatchKey(c10::DispatchKey::CUDA) ||
        !scale_op.hasComputedKernelForDispatchKey(c10::DispatchKey::CUDA)) {
      fail("the library was built with CUDA but no CUDA kernel is registered for the kdfused ops");
    }
#endif
    const auto kd_loss = loss_op.typed<KDLossFn>();
    const auto kd_scale = scale_op.typed<KDScaleFn>();

    const Case cases[] = {
        // name                 shape        dtype        labels T    ws   wh   div   reduction
        // strided
        {"f32 kl batchmean", {5, 37}, at::kFloat, true, 2.0, 0.7, 0.3, "kl", "batchmean", false},
        {"f32 kl sum V=3000", {3, 3000}, at::kFloat, true, 4.0, 0.9, 0.1, "kl", "sum", false},
        {"f32 ce none 3-D strided",
         {2, 3, 19},
         at::kFloat,
         false,
         1.5,
         1.0,
         0.0,
         "ce",
         "none",
         true},
        {"f64 kl mean T=1", {4, 65}, at::kDouble, true, 1.0, 1.0, 0.5, "kl", "mean", false},
        {"f64 ce sum", {3, 130}, at::kDouble, true, 3.0, 0.5, 0.5, "ce", "sum", false},
    };
    for (const Case& c : cases) run_case(c, kd_loss, kd_scale);

    // The op's own argument checks must surface as exceptions.
    bool threw = false;
    try {
      const at::Tensor a = at::randn({2, 4});
      kd_loss.call(a, a, std::nullopt, -1.0, 1.0, 0.0, "kl", 0.5, -100, "batchmean", {}, false,
                   false, false);
    } catch (const c10::ValueError&) {
      threw = true;
    }
    if (!threw) fail("temperature -1 was not rejected with c10::ValueError");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kd_smoke: FAILED: %s\n", e.what());
    return 1;
  }
  std::printf("kd_smoke: ok\n");
  return 0;
}
