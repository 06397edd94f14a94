// kd_cpu_host.h -- host code that the CPU implementations of the ops share (defined in
// kd_loss_cpu.cpp): label values read and checked on the host, and the fixed-order reduction.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace kdfused::cpu {

// The rows whose label is not ignore_index, counted after checking that each such label is in
// [0, V): ValueError naming the first bad row, `op` in front ("kdfused", "kdfused.linear_kd_loss").
// labels: int64, contiguous [n_rows], or undefined (every row valid).
int64_t count_valid_rows(const at::Tensor& labels, int64_t n_rows, int64_t V, int64_t ignore_index,
                         const char* op = "kdfused");

// The sum of the row losses (float or double, contiguous) in a fixed order and in double, divided
// by max(n_valid, 1) when `mean`: deterministic and independent of the thread count and of any
// chunking of the rows.
double sum_rows(const at::Tensor& row_loss, bool mean, int64_t n_valid);

// The reduction's gradient scale: 1 / max(n_valid, 1) for "mean", else 1.
inline double mean_scale(bool mean, int64_t n_valid) {
  return mean ? 1.0 / static_cast<double>(n_valid > 1 ? n_valid : 1) : 1.0;
}

}  // namespace kdfused::cpu
