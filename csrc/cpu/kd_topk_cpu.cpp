// kd_topk_cpu.cpp -- CPU implementation of kdfused::topk_kd_loss: value checks (indices, labels)
// before any work, the instruction-set dispatch of the kernel, and the loss reduction.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "../kd_topk.h"
#include "kd_cpu_dispatch.h"

namespace kdfused::topk {

namespace {

// Row r's first problem: an index out of [0, V) or one seen before in the row. `seen` is a bitmap
// of V bits, all clear on entry and on return.
bool row_indices_ok(const int64_t* ix, int64_t k, int64_t V, std::vector<uint64_t>& seen) {
  int64_t j = 0;
  bool ok = true;
  for (; j < k; ++j) {
    const int64_t i = ix[j];
    if (i < 0 || i >= V) {
      ok = false;
      break;
    }
    uint64_t& word = seen[static_cast<size_t>(i >> 6)];
    const uint64_t bit = uint64_t(1) << (i & 63);
    if (word & bit) {
      ok = false;
      break;
    }
    word |= bit;
  }
  for (int64_t u = 0; u < j; ++u) seen[static_cast<size_t>(ix[u] >> 6)] = 0;
  return ok;
}

// Indices must lie in [0, V) and be distinct within a row. Checked over rows in parallel; the
// error names the first bad row (the same whatever the thread count).
void check_indices(const at::Tensor& indices, int64_t n_rows, int64_t k, int64_t V) {
  const int64_t* ix = indices.data_ptr<int64_t>();
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  const int64_t grain = std::max<int64_t>(1, 65536 / k);
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> seen(static_cast<size_t>((V + 63) / 64), 0);
    for (int64_t r = begin; r < end && r < first_bad.load(std::memory_order_relaxed); ++r) {
      if (!row_indices_ok(ix + r * k, k, V, seen)) {
        int64_t cur = first_bad.load();
        while (r < cur && !first_bad.compare_exchange_weak(cur, r)) {
        }
        break;
      }
    }
  });
  const int64_t r = first_bad.load();
  if (r == std::numeric_limits<int64_t>::max()) return;
  const int64_t* row = ix + r * k;
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK_VALUE(row[j] >= 0 && row[j] < V, "kdfused: teacher_indices must be in [0, ", V,
                      "), got ", row[j], " at row ", r, ", position ", j);
    for (int64_t u = 0; u < j; ++u) {
      TORCH_CHECK_VALUE(row[u] != row[j],
                        "kdfused: teacher_indices must be distinct within a "
                        "row, got ",
                        row[j], " twice in row ", r, " (positions ", u, " and ", j, ")");
    }
  }
  TORCH_INTERNAL_ASSERT(false, "kdfused: bad teacher_indices row ", r, " not found again");
}

int64_t count_valid_rows(const at::Tensor& labels, int64_t n_rows, int64_t V, int64_t ignore) {
  if (!labels.defined()) return n_rows;
  const int64_t* y = labels.data_ptr<int64_t>();
  int64_t n_valid = 0;
  for (int64_t r = 0; r < n_rows; ++r) {
    if (y[r] == ignore) continue;
    TORCH_CHECK_VALUE(y[r] >= 0 && y[r] < V, "kdfused: labels must be in [0, ", V,
                      ") or equal ignore_index (", ignore, "), got ", y[r], " at row ", r);
    ++n_valid;
  }
  return n_valid;
}

template <typename A>
void reduce_rows(const TopKParams& p, int64_t n_valid) {
  // Fixed order, in double: deterministic and independent of the thread count.
  const A* row = static_cast<const A*>(p.row_loss);
  double total = 0;
  for (int64_t r = 0; r < p.n_rows; ++r) total += static_cast<double>(row[r]);
  if (p.reduction == Red::Mean) total /= static_cast<double>(std::max<int64_t>(n_valid, 1));
  *static_cast<A*>(p.loss) = static_cast<A>(total);
}

TopKOutputs topk_kd_loss_cpu(const at::Tensor& student, const at::Tensor& indices,
                             const at::Tensor& values, const std::optional<at::Tensor>& labels,
                             double temperature, double soft_weight, double hard_weight,
                             c10::string_view divergence, int64_t ignore_index,
                             c10::string_view reduction, bool grad_student) {
  const std::string_view div(divergence.data(), divergence.size());
  const std::string_view red(reduction.data(), reduction.size());
  check_topk_inputs(student, indices, values, labels, temperature, soft_weight, hard_weight, div,
                    red);
  TopKPrepared prep = prepare_topk(student, indices, values, labels, temperature, soft_weight,
                                   hard_weight, div, ignore_index, red, grad_student);
  TopKParams& p = prep.params;
  check_indices(prep.indices, p.n_rows, p.k, p.vocab);
  const int64_t n_valid = count_valid_rows(prep.labels, p.n_rows, p.vocab, ignore_index);
  p.grad_scale =
      p.reduction == Red::Mean ? 1.0 / static_cast<double>(std::max<int64_t>(n_valid, 1)) : 1.0;
  const bool acc_double = prep.loss.scalar_type() == at::kDouble;
  if (p.n_rows > 0) cpu::dispatch<cpu::TopKForwardStub>()(p, acc_double);
  if (p.reduction != Red::None) {
    if (acc_double) {
      reduce_rows<double>(p, n_valid);
    } else {
      reduce_rows<float>(p, n_valid);
    }
  }
  return topk_outputs_of(prep);
}

}  // namespace

}  // namespace kdfused::topk

TORCH_LIBRARY_IMPL(kdfused, CPU, m) {
  m.impl("topk_kd_loss", &kdfused::topk::topk_kd_loss_cpu);
}
