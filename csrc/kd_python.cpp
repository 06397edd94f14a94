// kd_python.cpp -- the small Python module kdfused._C: build information and option checks.
// The ops themselves are registered with the dispatcher (kdfused.cpp) and live in
// torch.ops.kdfused.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <atomic>

#include "cpu/kd_cpu_dispatch.h"
#include "cpu/kd_grad_cache.h"
#include "kd_cuda_plan.h"
#include "kd_host.h"
#include "kd_linear_host.h"
#include "kd_vocab_parallel.h"

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
#ifdef KDFUSED_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
  d["cpu_isa"] = kdfused::cpu::selected_isa_name();
  pybind11::list isas;
  for (const auto& name : kdfused::cpu::compiled_isa_names()) isas.append(name);
  d["cpu_isa_compiled"] = isas;
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  return d;
}

// How many threads an at::parallel_for in THIS library runs on now (at::parallel_for is compiled
// into the caller: built without OpenMP it would run on one thread whatever torch's setting).
int64_t parallel_threads() {
  std::atomic<int64_t> n{0};
  at::parallel_for(0, 4 * at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const int64_t mine = at::get_thread_num() + 1;
    int64_t seen = n.load();
    while (mine > seen && !n.compare_exchange_weak(seen, mine)) {
    }
  });
  return n.load();
}

at::Tensor cpu_exp(const at::Tensor& x, const std::string& isa) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == at::kFloat,
                    "kdfused: cpu_exp takes a float32 CPU tensor");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  kdfused::cpu::run_exp(isa, xc.data_ptr<float>(), y.data_ptr<float>(), xc.numel());
  return y;
}

// The linear op's chunk loop (kd_linear_loss_chunked) with a Python loss step: the
// vocabulary-parallel linear path (kdfused/parallel_linear.py) runs the same loop as the
// single-process op, its step being the slice steps and collectives of kdfused.parallel.
// step(s_c, t_c, y_c, grad) -> (row losses, logit gradient or None, entropy or None).
class PythonStepBackend final : public kdfused::LinearBackend {
 public:
  explicit PythonStepBackend(pybind11::function step) : step_(std::move(step)) {}

  // The label values are the step's to check (against the whole vocabulary, not this slice).
  kdfused::ValidRows valid_rows(const at::Tensor& y, int64_t, int64_t ignore_index) const override {
    host_y_ = y.cpu();  // one copy on CUDA: which chunks are all ignored, decided on the host
    kdfused::ValidRows v;
    v.n_valid = host_y_.ne(ignore_index).sum().item<int64_t>();
    v.host_labels = host_y_.data_ptr<int64_t>();
    return v;
  }

  void run_kernel(kdfused::KDParams&, const kdfused::GradScale&) const override {
    TORCH_INTERNAL_ASSERT(false, "kdfused: the Python step runs no kernel of its own");
  }

  at::Tensor reduce(const at::Tensor&, bool, const kdfused::ValidRows&) const override {
    TORCH_INTERNAL_ASSERT(false, "kdfused: the Python step's loop reduces in Python");
  }

  kdfused::ChunkOut run_chunk(const at::Tensor& s_c, const at::Tensor& t_c,
                              const std::optional<at::Tensor>& y_c, const kdfused::KDOptions&,
                              bool grad, const kdfused::GradScale&) const override {
    const pybind11::tuple r = step_(s_c, t_c, y_c, grad);
    kdfused::ChunkOut out;
    out.row_loss = r[0].cast<at::Tensor>();
    if (grad) out.grad = r[1].cast<at::Tensor>();
    if (!r[2].is_none()) out.entropy = r[2].cast<at::Tensor>();
    return out;
  }

 private:
  pybind11::function step_;
  mutable at::Tensor host_y_;
};

pybind11::object tensor_or_none(const at::Tensor& t, bool wanted) {
  return wanted ? pybind11::cast(t) : pybind11::none();
}

// Reduction "none" always: the caller weights each row's gradient by row_weight (the mean's
// 1 / n_valid, or the backward's grad_output) and reduces the row losses itself.
pybind11::tuple linear_chunk_loop(
    const at::Tensor& sh, const at::Tensor& sw, const std::optional<at::Tensor>& sb,
    const std::optional<at::Tensor>& th, const std::optional<at::Tensor>& tw,
    const std::optional<at::Tensor>& tb, const std::optional<at::Tensor>& tl,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& row_weight,
    double temperature, double soft_weight, double hard_weight, const std::string& divergence,
    double beta, int64_t ignore_index, const std::string& reduction,
    const std::vector<double>& logit_map, bool return_entropy, int64_t chunk_size, bool grad_hidden,
    bool grad_weight, bool grad_bias, pybind11::function step) {
  const kdfused::KDOptions opt = kdfused::with_reduction(
      kdfused::parse_options(temperature, soft_weight, hard_weight, divergence, beta, ignore_index,
                             reduction, kdfused::Divergences::All, logit_map, return_entropy),
      kdfused::Reduction::None);
  const PythonStepBackend backend(std::move(step));
  const kdfused::LinearArgs args{sh, sw, sb, th, tw, tb, tl, labels, row_weight};
  const auto [rows, gh, gw, gb, unused, entropy] = kdfused::kd_linear_loss_chunked(
      backend, args, opt, chunk_size, grad_hidden, grad_weight, grad_bias);
  (void)unused;
  return pybind11::make_tuple(
      rows, tensor_or_none(gh, grad_hidden), tensor_or_none(gw, grad_weight),
      tensor_or_none(gb, grad_bias && sb.has_value()), tensor_or_none(entropy, return_entropy));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdfused native module: the ops live in torch.ops.kdfused";
  // The column of the student's entropy in the vocabulary-parallel row_final records.
  m.attr("row_final_entropy_field") = kdfused::kFinalEntropyField;
  m.def("build_info", &build_info,
        "How this build was compiled: CUDA support, CPU instruction sets.");
  m.def("parallel_threads", &parallel_threads,
        "Threads an at::parallel_for of this library runs on (torch.get_num_threads() when "
        "built with OpenMP).");
  m.def("cpu_exp", &cpu_exp, pybind11::arg("x"), pybind11::arg("isa") = "auto",
        "exp(x) as the CPU kernels of instruction set `isa` compute it (accurate for x <= 0).");
  m.def("empty_cache", &kdfused::cpu::empty_cache,
        "Frees the cached CPU gradient buffers; returns the number of bytes given back.");
  m.def("cached_bytes", &kdfused::cpu::cached_bytes,
        "Bytes of CPU gradient buffers held for reuse.");
  m.def(
      "set_cpu_isa", &kdfused::cpu::set_isa,
      "Forces the CPU kernel's instruction set: 'auto', 'scalar', 'default', 'avx2' or 'avx512'.");
  m.def("set_cuda_plan", &kdfused::set_cuda_plan,
        "Forces the CUDA launch policy: 'auto', 'warp', 'block', 'cluster:N' (N = 2, 4, 8, 16; "
        "sm_90) or 'two_phase:N' (N = 2, 4, 8). A plan the device cannot run raises at the call.");
  m.def("cuda_plan", &kdfused::cuda_plan_spec, "The forced CUDA plan ('auto' when none).");
  m.def("last_cuda_plan", &kdfused::last_cuda_plan,
        "The plan of the last CUDA launch of the fused kernel ('' before the first).");
  m.def("auto_chunk_rows", &kdfused::auto_chunk_rows, pybind11::arg("rows"), pybind11::arg("vocab"),
        pybind11::arg("elem_bytes"),
        "Rows per chunk of the linear ops when chunk_size is None (logits of elem_bytes each).");
  m.def("linear_chunk_loop", &linear_chunk_loop,
        "The linear op's chunk loop with a Python loss step (reduction 'none'): returns (row "
        "losses, grad_hidden, grad_weight, grad_bias, entropy), None for what was not asked.");
  m.def(
      "check_inputs",
      [](const at::Tensor& student, const at::Tensor& teacher,
         const std::optional<at::Tensor>& labels, double temperature, double soft_weight,
         double hard_weight, const std::string& divergence, double beta,
         const std::string& reduction) {
        const kdfused::KDOptions opt =
            kdfused::parse_options(temperature, soft_weight, hard_weight, divergence, beta,
                                   kdfused::KDOptions{}.ignore_index, reduction);
        kdfused::check_inputs(student, teacher, labels, opt);
      },
      "The op's argument checks (shapes, dtypes, devices, options), for fake/meta tensors.");
  m.def(
      "check_options",
      [](double temperature, double soft_weight, double hard_weight, const std::string& divergence,
         double beta, const std::string& reduction) {
        kdfused::parse_options(temperature, soft_weight, hard_weight, divergence, beta,
                               kdfused::KDOptions{}.ignore_index, reduction);
      },
      "Raises ValueError unless the loss options are valid.");
}
