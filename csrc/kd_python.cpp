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
