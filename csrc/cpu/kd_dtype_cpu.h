// kd_dtype_cpu.h -- the student / teacher dtypes of a KDParams as C++ types, for the CPU kernels'
// entry points (each instantiates its kernel for every pair).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../kd_params.h"

namespace kdfused::cpu {

template <typename X>
struct TypeTag {
  using type = X;
};

// f(TypeTag<S>{}, TypeTag<T>{}) with S, T the C++ types of p's student and teacher dtypes.
template <typename F>
void with_dtype_pair(const KDParams& p, F&& f) {
  auto with_teacher = [&](auto s) {
    switch (p.teacher_dtype) {
      case DType::Float16: return f(s, TypeTag<c10::Half>{});
      case DType::BFloat16: return f(s, TypeTag<c10::BFloat16>{});
      case DType::Float32: return f(s, TypeTag<float>{});
      case DType::Float64: return f(s, TypeTag<double>{});
    }
  };
  switch (p.student_dtype) {
    case DType::Float16: return with_teacher(TypeTag<c10::Half>{});
    case DType::BFloat16: return with_teacher(TypeTag<c10::BFloat16>{});
    case DType::Float32: return with_teacher(TypeTag<float>{});
    case DType::Float64: return with_teacher(TypeTag<double>{});
  }
}

}  // namespace kdfused::cpu
