// kd_cuda_plan.cpp -- see kd_cuda_plan.h.
#include "kd_cuda_plan.h"

#include <c10/util/Exception.h>

#include <mutex>

namespace kdfused {

namespace {

std::mutex& plan_mutex() {
  static std::mutex m;
  return m;
}
PlanOverride& forced() {
  static PlanOverride o;
  return o;
}
std::string& forced_spec() {
  static std::string s = "auto";
  return s;
}
std::string& last_plan() {
  static std::string s;
  return s;
}

int parse_split(const std::string& spec, size_t colon, std::initializer_list<int> allowed) {
  int n = 0;
  try {
    n = std::stoi(spec.substr(colon + 1));
  } catch (const std::exception&) {
    n = 0;
  }
  for (int a : allowed) {
    if (n == a) return n;
  }
  TORCH_CHECK_VALUE(false, "kdfused: bad split in CUDA plan '", spec, "'");
}

}  // namespace

void set_cuda_plan(const std::string& spec) {
  PlanOverride o;
  if (spec == "auto") {
    o.kind = PlanOverride::Kind::Auto;
  } else if (spec == "warp") {
    o.kind = PlanOverride::Kind::Warp;
  } else if (spec == "block") {
    o.kind = PlanOverride::Kind::Block;
  } else if (spec.rfind("cluster:", 0) == 0) {
    o.kind = PlanOverride::Kind::Cluster;
    o.split = parse_split(spec, 7, {2, 4, 8, 16});
  } else if (spec.rfind("two_phase:", 0) == 0) {
    o.kind = PlanOverride::Kind::TwoPhase;
    o.split = parse_split(spec, 9, {2, 4, 8});
  } else {
    TORCH_CHECK_VALUE(false, "kdfused: unknown CUDA plan '", spec,
                      "' (expected auto, warp, block, cluster:N or two_phase:N)");
  }
  std::lock_guard<std::mutex> lock(plan_mutex());
  forced() = o;
  forced_spec() = spec;
}

PlanOverride cuda_plan_override() {
  std::lock_guard<std::mutex> lock(plan_mutex());
  return forced();
}

std::string cuda_plan_spec() {
  std::lock_guard<std::mutex> lock(plan_mutex());
  return forced_spec();
}

void set_last_cuda_plan(const std::string& description) {
  std::lock_guard<std::mutex> lock(plan_mutex());
  last_plan() = description;
}

std::string last_cuda_plan() {
  std::lock_guard<std::mutex> lock(plan_mutex());
  return last_plan();
}

}  // namespace kdfused
