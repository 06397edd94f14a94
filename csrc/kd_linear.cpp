// kd_linear.cpp -- schema of the fused linear + chunked distillation loss, kdfused::kd_linear_loss.
//
// The chunk loop is kd_linear_host.cpp, shared by the CPU (cpu/kd_linear_cpu.cpp) and CUDA
// (cuda/kd_linear_cuda.cu) implementations. Autograd and the fake kernel are registered from
// Python (kdfused/linear.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(kdfused, m) {
  // Loss of kd_loss(linear(student_hidden, student_weight, student_bias), teacher logits, ...),
  // computed chunk_size rows at a time, and (when asked) the gradients of the reduced loss for
  // grad_output = 1 with respect to student_hidden, student_weight and student_bias.
  // The teacher is (teacher_hidden, teacher_weight, teacher_bias) or teacher_logits (exactly one).
  // row_weight (the leading shape; only with reduction "none") multiplies each row's gradient: the
  // backward of reduction "none" runs the op again with row_weight = grad_output.
  // Returns (loss, grad_hidden, grad_weight, grad_bias, grad_scale); a gradient not asked for is an
  // empty tensor; grad_scale is the grad_output the gradients are scaled for (1), as for kd_loss.
  m.def(
      "kd_linear_loss(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, "
      "Tensor? teacher_hidden, Tensor? teacher_weight, Tensor? teacher_bias, "
      "Tensor? teacher_logits, Tensor? labels, Tensor? row_weight, float temperature, "
      "float soft_weight, float hard_weight, str divergence, float beta, int ignore_index, "
      "str reduction, float[] logit_map, bool return_entropy, int chunk_size, bool grad_hidden, "
      "bool grad_weight, bool grad_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
