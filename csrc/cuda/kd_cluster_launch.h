// kd_cluster_launch.h -- the launch configuration of a kernel over thread-block clusters (sm_90):
// one definition for the launch itself (kd_fused_run.cuh) and for the occupancy query that decides
// whether it can be scheduled (kd_fused_host.cu), so that the two always describe the same launch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

namespace kdfused::cuda {

// grid CTAs of `threads` threads with `smem` bytes of dynamic shared memory each, in clusters of
// `split` CTAs along x. Not copyable: config.attrs points into the object itself.
struct ClusterLaunch {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attrs[1] = {};

  ClusterLaunch(unsigned grid, unsigned threads, int split, size_t smem, cudaStream_t stream) {
    config.gridDim = dim3(grid, 1, 1);
    config.blockDim = dim3(threads, 1, 1);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    attrs[0].id = cudaLaunchAttributeClusterDimension;
    attrs[0].val.clusterDim.x = static_cast<unsigned>(split);
    attrs[0].val.clusterDim.y = 1;
    attrs[0].val.clusterDim.z = 1;
    config.attrs = attrs;
    config.numAttrs = 1;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};

}  // namespace kdfused::cuda
