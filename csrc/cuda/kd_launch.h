// kd_launch.h -- launch constants and the launch policy of the CUDA backend. The ONE place where
// such numbers live: kernels read them as template/constexpr values, the host wrapper asks
// choose_plan() which kernel to run. Nothing in Python has to "match" a number here.
//
// Policy (by row length V, bytes per row and number of rows N):
//
//   kWarp     V <= kWarpMaxV. One warp per row, kWarpsPerBlock rows per CTA. The gradient sweep
//             re-reads the row, which this warp has just read: it is in L1/L2 (<= 16 KB per row),
//             so HBM sees one read. No __syncthreads at all: the row's statistics are merged with
//             warp shuffles only.
//   kBlock    a CTA per row (split 1) or per row slice (split > 1), kBlockThreads threads.
//             * The CTA keeps its slice of s and t in shared memory as it reads it (the "stage"),
//               so the gradient sweep reads shared memory, not HBM: 6 B/element for bf16, the
//               floor. Every thread reads back only the vectors it wrote itself, so the stage needs
//               no barrier. A slice is staged when it fits kMaxStageBytes.
//             * sm_90: a row too long for one CTA is split over a thread-block cluster of `split`
//               CTAs (2, 4, 8 or 16; 8 is the portable maximum, 16 is allowed on H100/H200 as a
//               non-portable size and is tried first, with a fallback to 8 and then to no cluster
//               when the occupancy query says it cannot be scheduled). Each CTA stages its 1/split
//               of the row, the split partial RowStates are merged through distributed shared
//               memory in rank order (every CTA merges the same states in the same order: all get
//               the same bits), and each CTA writes the gradient of its own slice from its own
//               stage. Why clusters and not "re-read from L2": with bf16 V = 128256 a row is 500 KB
//               of s+t; ~2 rows in flight per SM would be 130+ MB, far over H200's L2 (50 MB): the
//               second sweep would come from HBM (10 B/element, 1.67x the floor). A cluster of 8
//               CTAs holds the row on chip in 8 x 62.6 KB of shared memory, 3 CTAs per SM. With
//               split 16 every LM vocabulary up to 256k fits in bf16, and up to 131k in fp32. Rows
//               whose 1/16 slice still does not fit (fp32 V > 131k, fp64 V > 65k) keep the largest
//               split and re-read their slice right after the merge: mostly from L2 (3 slices of <=
//               2x the stage per SM in flight, comparable to L2), partly from HBM.
//             * Few rows (N * split < kFillCTAs(num_SMs)): the split is doubled (up to 8, while a
//               slice keeps >= kMinSliceElems elements) so that all SMs get work.
//             * sm_80 (no clusters): rows that fit are staged as above. Rows that do not fit are
//               read twice (the second time mostly from L2) by a CTA per row when there are enough
//               rows; with few rows they are split over `split` CTAs in two phases: phase 1 writes
//               each slice's partial RowState to a global workspace, phase 2 merges the split
//               states of its row in rank order (same bits in every CTA), finalizes and writes the
//               gradient of its slice, re-reading it (L2: the working set of few rows is small).
//
// Determinism: no float atomics anywhere; every merge (lanes, warps, CTAs of a cluster, phase-1
// slices) and the loss reduction happen in a fixed order that depends only on the launch plan,
// and the plan depends only on (V, N, dtypes, flags, device). Results are bitwise reproducible on
// a given device.
//
// Resources (nvcc 13.0 -O3, torch's flags, ptxas -v, sm_90; registers per thread, spills in bytes).
// Every kernel is compiled per divergence family (kd_math.h DivFamily: kl/ce, and
// reverse_kl/jsd/tvd):
//   kd_block_kernel   80 regs (fp64: 128 under the 2-CTA bound). kl/ce: 0 spill for fp32 and the
//                     16-bit x fp32 pairs; 16-bit pairs 24 B stores / 60 B loads. jsd family: up
//                     to 44 / 116 B (16-bit pairs).
//   kd_warp_kernel    80 regs under the 3-CTA bound; 0 spill for fp32 pairs, 32 / 64 B (kl/ce) and
//                     88 / 192 B (jsd family) for 16-bit pairs, more for fp64.
// Every spill instruction sits outside the loops (cuobjdump -sass: no STL/LDL between a loop's
// head and its backward branch), i.e. in per-row setup, not per element.
// SASS (cuobjdump, sm_90, bf16/bf16): the statistics loop issues 4 LDG.E.128.CONSTANT (2 vectors
// of s and t) and 4 STS.128 (the stage) per iteration; the gradient loop LDS.128 from the stage
// and STG.E.128; cluster merge: UCGABAR_ARV/WAIT + DSMEM loads; no local memory in the loops.
// With the logit transforms (Map = true, the *_map instantiations): the same 80 regs, spills near
// the plain kernels' (warp kernel, jsd family: bf16/bf16 80 / 156 B against 92 / 184, fp64 544 /
// 740 against 484 / 688; fp32 kl/ce 0 for both).
// Compile time: ~3.5 min of CPU time per architecture for the 32 plain kernels (8 dtype pairs x 2
// families x 2 kernels), as much again for the 32 with the transforms, split over 32 generated
// files (csrc/cuda/instantiations/) that a parallel build compiles at once; docs/gpu.md "Build
// time" has the numbers (measured before the transforms).
#pragma once

#include <cstdint>

namespace kdfused::cuda {

// ---- kernel shapes ------------------------------------------------------------------------------
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;  // kWarp: rows per CTA
constexpr int kWarpBlockThreads = kWarpSize * kWarpsPerBlock;
// __launch_bounds__ of kd_warp_kernel: 3 CTAs (24 warps) per SM caps it at 85 registers. Without
// the bound ptxas used up to 102 (fp32/fp32 with both gradients), i.e. 2 CTAs = 25% occupancy for
// a kernel whose rows are short and whose latency is hidden only by other warps.
constexpr int kWarpMinBlocksPerSM = 3;
constexpr int kBlockThreads = 256;          // kBlock: threads per CTA
constexpr int kBlockMinBlocksPerSM = 3;     // __launch_bounds__: <= 80 registers, 3 CTAs/SM with
                                            // a 64 KB stage (the cluster policy's occupancy)
constexpr int kBlockMinBlocksPerSMF64 = 2;  // float64: twice the registers per value
constexpr int kVecBytes = 16;               // one LDG.128 / STG.128 / STS.128
// Vectors per statistics-loop iteration: 2 (64 B of loads in flight per thread) for the 16-bit
// pairs (8 elements, 32 B of s+t per vector); 1 for the 48-byte vectors of 16-bit x fp32 pairs and
// for fp32/fp64 (4/2 elements): with 2 those spill at the 80-register budget (ptxas, sm_90).
constexpr int stats_unroll(int vec_bytes_s_plus_t, int vec_elems) {
  return (vec_bytes_s_plus_t <= 32 && vec_elems >= 8) ? 2 : 1;
}

// ---- policy thresholds
// ---------------------------------------------------------------------------
constexpr int64_t kWarpMaxV = 2048;            // kWarp up to here (a row is <= 2 x 16 KB in fp64)
constexpr int64_t kMaxStageBytes = 64 * 1024;  // s+t slice kept in shared memory (3 CTAs/SM on
                                               // H100/H200: 3 x 64 KB of 227 KB)
constexpr int kMaxClusterSplit = 16;           // non-portable cluster size (H100/H200)
constexpr int kPortableClusterSplit = 8;       // fallback: the portable cluster size limit
constexpr int kMaxTwoPhaseSplit = 8;           // sm_80 split of few long rows
constexpr int64_t kMinSliceElems = 4096;       // don't split a row below this many elements/CTA
inline int64_t kFillCTAs(int num_sms) {
  return 2 * static_cast<int64_t>(num_sms);
}

// ---- the small kernels
// ---------------------------------------------------------------------------
constexpr int kCountThreads = 1024;   // label count: one CTA, fixed-order integer tree
constexpr int kReduceThreads = 1024;  // loss reduction: one CTA, fixed-order tree (double)
constexpr int kScaleThreads = 256;    // kd_scale_grads_ (flat and per-row kernels)
constexpr int kScaleMaxBlocksPerSM = 4;

enum class Kind : int { Warp = 0, Block = 1 };
enum class Mode : int {
  Fused = 0,   // statistics + gradient in one kernel (split 1, or a cluster of `split` CTAs)
  Phase1 = 1,  // two-phase split: statistics of the slice -> workspace
  Phase2 = 2,  // two-phase split: merge the row's states, finalize, gradient of the slice
};

struct LaunchPlan {
  Kind kind = Kind::Warp;
  int split = 1;         // CTAs per row (kBlock)
  bool cluster = false;  // split > 1 through a thread-block cluster (sm_90)
  bool two_phase = false;
  bool stage = false;      // slices kept in shared memory for the gradient sweep
  int64_t slice_vecs = 0;  // vectors per slice (kBlock): ceil(full vectors of the row / split)
  int64_t smem_bytes = 0;  // dynamic shared memory per CTA (the stage)
};

// Chooses the kernel for a problem. elem_bytes_s/t are the sizes of the student/teacher element,
// vec_elems the elements per vector (16 / min(sizeof S, sizeof T)), teacher_read whether the
// teacher is read at all (soft term on), max_cluster the largest cluster to use (0 or 1: none).
// Pure function of its arguments (determinism).
// mix: jsd / tvd, whose second row sum needs every CTA of the row to see the whole row's
// statistics (a cluster exchanges them on chip; the two-phase split would need a third kernel).
inline LaunchPlan choose_plan(int64_t n_rows, int64_t V, int elem_bytes_s, int elem_bytes_t,
                              int vec_elems, bool teacher_read, bool any_grad, bool mix,
                              int num_sms, int max_cluster, int64_t max_smem_optin) {
  const bool has_clusters = max_cluster > 1;
  LaunchPlan plan;
  if (V <= kWarpMaxV) {
    plan.kind = Kind::Warp;
    return plan;
  }
  plan.kind = Kind::Block;
  const int64_t bytes_per_elem = elem_bytes_s + (teacher_read ? elem_bytes_t : 0);
  const int64_t stage_cap = max_smem_optin < kMaxStageBytes ? max_smem_optin : kMaxStageBytes;
  auto slice_vecs_of = [&](int split) {
    const int64_t nvec = V / vec_elems;  // upper bound of the full vectors of any row
    return (nvec + split - 1) / split;
  };
  auto slice_bytes = [&](int split) { return slice_vecs_of(split) * vec_elems * bytes_per_elem; };
  // Only a second sweep needs the stage; a kl loss-only call reads everything once anyway.
  const bool want_stage = any_grad || mix;

  if (has_clusters) {
    int split = 1;
    while (split < max_cluster && slice_bytes(split) > stage_cap) split *= 2;
    // Few rows: more CTAs per row, but never past the portable size for this reason alone.
    const int fill_max = max_cluster < kPortableClusterSplit ? max_cluster : kPortableClusterSplit;
    while (split < fill_max && n_rows * split < kFillCTAs(num_sms) &&
           V / (2 * split) >= kMinSliceElems) {
      split *= 2;
    }
    plan.split = split;
    plan.cluster = split > 1;
    plan.stage = want_stage && slice_bytes(split) <= stage_cap;
  } else {
    if (want_stage && slice_bytes(1) <= stage_cap) {
      plan.split = 1;
      plan.stage = true;
    } else {
      plan.split = 1;
      plan.stage = false;
    }
    // Few long rows: two phases over split CTAs per row (re-read from L2 in phase 2).
    int split = 1;
    while (split < kMaxTwoPhaseSplit && n_rows * split < kFillCTAs(num_sms) &&
           V / (2 * split) >= kMinSliceElems) {
      split *= 2;
    }
    if (split > 1 && !mix) {
      plan.split = split;
      plan.two_phase = true;
      plan.stage = false;
    }
  }
  plan.slice_vecs = slice_vecs_of(plan.split);
  plan.smem_bytes = plan.stage ? slice_bytes(plan.split) : 0;
  return plan;
}

}  // namespace kdfused::cuda
