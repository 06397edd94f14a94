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
#include "kd_cpu_host.h"

namespace kdfused::topk {

namespace {

// Row r's first problem: an index out of [0, V), or a valid entry's index seen before among the
// row's valid entries (padding may repeat indices: TRL pads with 0). `seen` is a bitmap of V bits,
// all clear on entry and on return.
bool row_indices_ok(const int64_t* ix, const bool* valid, int64_t k, int64_t V,
                    std::vector<uint64_t>& seen) {
  int64_t j = 0;
  bool ok = true;
  for (; j < k; ++j) {
    const int64_t i = ix[j];
    if (i < 0 || i >= V) {
      ok = false;
      break;
    }
    if (!valid[j]) continue;
    uint64_t& word = seen[static_cast<size_t>(i >> 6)];
    const uint64_t bit = uint64_t(1) << (i & 63);
    if (word & bit) {
      ok = false;
      break;
    }
    word |= bit;
  }
  for (int64_t u = 0; u < j; ++u) {
    if (valid[u]) seen[static_cast<size_t>(ix[u] >> 6)] = 0;
  }
  return ok;
}

// Indices must lie in [0, V), and the valid entries' (value != -inf) be distinct within a row.
// Checked over rows in parallel; the error names the first bad row (the same whatever the thread
// count).
void check_indices(const at::Tensor& indices, const at::Tensor& values, int64_t n_rows, int64_t k,
                   int64_t V) {
  const int64_t* ix = indices.data_ptr<int64_t>();
  const at::Tensor valid_t = values.ne(-std::numeric_limits<double>::infinity()).contiguous();
  const bool* valid = valid_t.data_ptr<bool>();
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  const int64_t grain = std::max<int64_t>(1, 65536 / k);
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> seen(static_cast<size_t>((V + 63) / 64), 0);
    for (int64_t r = begin; r < end && r < first_bad.load(std::memory_order_relaxed); ++r) {
      if (!row_indices_ok(ix + r * k, valid + r * k, k, V, seen)) {
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
  const bool* vrow = valid + r * k;
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK_VALUE(row[j] >= 0 && row[j] < V, "kdfused: teacher_indices must be in [0, ", V,
                      "), got ", row[j], " at row ", r, ", position ", j);
    for (int64_t u = 0; u < j && vrow[j]; ++u) {
      TORCH_CHECK_VALUE(!vrow[u] || row[u] != row[j],
                        "kdfused: teacher_indices of the stored entries (value != -inf) must be "
                        "distinct within a row, got ",
                        row[j], " twice in row ", r, " (positions ", u, " and ", j, ")");
    }
  }
  TORCH_INTERNAL_ASSERT(false, "kdfused: bad teacher_indices row ", r, " not found again");
}

// topk_kd_loss on parsed options and checked shapes (topk_kd_loss_op).
TopKOutputs topk_kd_loss_cpu(const at::Tensor& student, const at::Tensor& indices,
                             const at::Tensor& values, const std::optional<at::Tensor>& labels,
                             const TopKOptions& opt, bool grad_student) {
  TopKPrepared prep = prepare_topk(student, indices, values, labels, opt, grad_student);
  TopKParams& p = prep.params;
  check_indices(prep.indices, prep.values, p.n_rows, p.k, p.vocab);
  const int64_t n_valid = cpu::count_valid_rows(prep.labels, p.n_rows, p.vocab, p.ignore_index);
  const bool mean = p.reduction == Reduction::Mean;
  p.grad_scale = cpu::mean_scale(mean, n_valid);
  if (p.n_rows > 0) {
    cpu::dispatch<cpu::TopKForwardStub>()(p, prep.loss.scalar_type() == at::kDouble);
  }
  if (p.reduction != Reduction::None) {
    prep.loss.fill_(cpu::sum_rows(prep.row_loss, mean, n_valid));
  }
  return topk_outputs_of(prep);
}

}  // namespace

}  // namespace kdfused::topk

TORCH_LIBRARY_IMPL(kdfused, CPU, m) {
  m.impl("topk_kd_loss", &kdfused::topk::topk_kd_loss_op<kdfused::topk::topk_kd_loss_cpu>);
}
