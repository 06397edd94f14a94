// kd_reduce_kernels.cuh -- the one-CTA kernels every CUDA op ends with: the label count (the
// gradient scale of "mean") and the loss reduction. Deterministic: fixed-order trees, no atomics.
// kThreads is part of the result's bracketing: an op keeps the count it was validated with.
#pragma once

#include <cstdint>

#include "kd_launch.h"

namespace kdfused::cuda {

// op-reduction of every thread's v over the CTA of kThreads threads (a power of 2), in a fixed
// tree: at each level the values [0, off) absorb [off, 2 off) (op(lower, upper); the values read at
// a level are not written at it). part has kThreads entries. Returns the result in every thread;
// part is read again by the caller's next reduction only after a barrier.
template <int kThreads, typename X, typename Op>
__device__ __forceinline__ X block_tree_reduce(const X& v, X* part, Op op) {
  static_assert((kThreads & (kThreads - 1)) == 0, "the tree needs a power of 2");
  const int tid = static_cast<int>(threadIdx.x);
  part[tid] = v;
  __syncthreads();
  for (int off = kThreads / 2; off > 0; off >>= 1) {
    if (tid < off) part[tid] = op(part[tid], part[tid + off]);
    __syncthreads();
  }
  return part[0];
}

template <int kThreads, typename X>
__device__ __forceinline__ X block_tree_sum(X v, X* part) {
  return block_tree_reduce<kThreads>(v, part, [](X a, X b) { return a + b; });
}

// One CTA: n_valid = #(labels != ignore_index) and the gradient scale 1/max(n_valid, 1).
template <typename A, int kThreads = kCountThreads>
__global__ void __launch_bounds__(kThreads)
    kd_count_kernel(const int64_t* labels, int64_t n, int64_t ignore_index, A* grad_scale,
                    int64_t* n_valid) {
  __shared__ long long part[kThreads];
  long long c = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) c += labels[i] != ignore_index ? 1 : 0;
  const long long nv = block_tree_sum<kThreads>(c, part);
  if (threadIdx.x == 0) {
    *n_valid = nv;
    *grad_scale = static_cast<A>(1.0 / static_cast<double>(nv > 1 ? nv : 1));
  }
}

// One CTA: loss = sum(row_loss) (/ max(n_valid, 1) for mean). Summed in double in a fixed order
// (strided per thread, then the tree), like the CPU backends' double sum.
template <typename A, int kThreads = kReduceThreads>
__global__ void __launch_bounds__(kThreads)
    kd_reduce_kernel(const A* row_loss, int64_t n, bool mean, const int64_t* n_valid_dev,
                     int64_t n_valid_host, A* loss) {
  __shared__ double part[kThreads];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) acc += static_cast<double>(row_loss[i]);
  double total = block_tree_sum<kThreads>(acc, part);
  if (threadIdx.x == 0) {
    if (mean) {
      const int64_t nv = n_valid_dev ? *n_valid_dev : n_valid_host;
      total /= static_cast<double>(nv > 1 ? nv : 1);
    }
    *loss = static_cast<A>(total);
  }
}

}  // namespace kdfused::cuda
