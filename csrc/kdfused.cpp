// kdfused.cpp -- the schema of kd_loss and kd_scale_grads_. (The Python module is kd_python.cpp;
// the host code every backend shares is kd_host.cpp.)
//
// The schema is the single source of truth; CPU (cpu/kd_loss_cpu.cpp) and CUDA
// (cuda/kd_loss_cuda.cu) register implementations of it. Autograd and fake tensors are registered
// from Python (kdfused/_ops.py).
#include <torch/library.h>

TORCH_LIBRARY(kdfused, m) {
  // Loss and (when asked) the gradients of the reduced loss for grad_output = 1, in one call.
  // Returns (loss, grad_student, grad_teacher, grad_scale, entropy); a gradient not asked for is an
  // empty tensor. grad_scale is the backward's state: the grad_output the gradients are scaled
  // for. logit_map: [] or [student_logit_scale, teacher_logit_scale, student_softcap,
  // teacher_softcap] (softcap 0: none). entropy: the student's per-row tempered entropy when
  // return_entropy, else an empty tensor.
  m.def(
      "kd_loss(Tensor student, Tensor teacher, Tensor? labels, float temperature, float "
      "soft_weight, "
      "float hard_weight, str divergence, float beta, int ignore_index, str reduction, "
      "float[] logit_map, bool return_entropy, bool grad_student, bool grad_teacher) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Backward: rescales the saved gradients in place from grad_scale to grad_output, and records
  // grad_output in grad_scale. When they are equal (loss.backward(): grad_output = 1) nothing
  // moves.
  m.def(
      "kd_scale_grads_(Tensor(a!) grad_student, Tensor(b!) grad_teacher, Tensor(c!) grad_scale, "
      "Tensor grad_output) -> ()");
}
