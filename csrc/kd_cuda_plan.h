// kd_cuda_plan.h -- forcing the CUDA launch policy (tests, the self-test, benchmarks) and asking
// which plan the last CUDA call used. Host-only and compiled in every build, so that the Python
// module has the same functions with or without CUDA.
#pragma once

#include <string>

namespace kdfused {

struct PlanOverride {
  enum class Kind { Auto, Warp, Block, Cluster, TwoPhase };
  Kind kind = Kind::Auto;
  int split = 1;  // Cluster: 2, 4, 8 or 16; TwoPhase: 2, 4 or 8
};

// "auto", "warp", "block", "cluster:N", "two_phase:N". ValueError for anything else.
void set_cuda_plan(const std::string& spec);
PlanOverride cuda_plan_override();
std::string cuda_plan_spec();  // the forced spec ("auto" when none)

// Set by the CUDA backend on every launch of the fused kernel; "" before the first.
void set_last_cuda_plan(const std::string& description);
std::string last_cuda_plan();

}  // namespace kdfused
