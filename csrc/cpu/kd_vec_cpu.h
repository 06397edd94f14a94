// kd_vec_cpu.h -- the at::vec building blocks of the CPU kernels (kd_kernel_cpu.h,
// topk/kd_topk_kernel_cpu.h): chunk size, fixed-order horizontal reductions, partial loads and
// stores, conversion to the accumulation type. Compiled with each kernel once per instruction set,
// in that instruction set's namespace (see kd_cpu_dispatch.h).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#include "../kd_math.h"

namespace kdfused::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Elements per chunk: a chunk's inputs and exponentials stay in L1/L2 between the passes over it,
// and its maxima are exact (no per-element rescaling).
constexpr int64_t kChunk = 2048;

template <typename A>
inline A hsum(const Vectorized<A>& v) {
  // Fixed-order horizontal sum (determinism).
  alignas(64) A tmp[Vectorized<A>::size()];
  v.store(tmp);
  A s = A(0);
  for (int i = 0; i < Vectorized<A>::size(); ++i) s += tmp[i];
  return s;
}

template <typename A>
inline A hmax(const Vectorized<A>& v) {
  alignas(64) A tmp[Vectorized<A>::size()];
  v.store(tmp);
  A m = tmp[0];
  for (int i = 1; i < Vectorized<A>::size(); ++i) m = kd_max(m, tmp[i]);
  return m;
}

// n elements of an input in the accumulation type: the input itself when it already has that type
// (no copy), else a converted copy in buf.
template <typename S, typename A>
inline const A* chunk_as(const S* src, A* buf, int64_t n) {
  if constexpr (std::is_same_v<S, A>) {
    (void)buf;
    (void)n;
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}

// Vector i of a chunk of n elements. Lanes past n read as -inf: exp(-inf) = 0, maxima ignore them
// and the teacher-mass masks drop them, so a partial last vector needs no special code in the
// sweeps.
template <typename A>
inline Vectorized<A> load_chunk(const A* x, int64_t i, int64_t n) {
  constexpr int64_t W = Vectorized<A>::size();
  if (i + W <= n) return Vectorized<A>::loadu(x + i);
  return Vectorized<A>::set(Vectorized<A>(-kd_inf<A>()), Vectorized<A>::loadu(x + i, n - i), n - i);
}

template <typename A>
inline void store_chunk(const Vectorized<A>& v, A* x, int64_t i, int64_t n) {
  constexpr int64_t W = Vectorized<A>::size();
  if (i + W <= n) {
    v.store(x + i);
  } else {
    v.store(x + i, n - i);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace kdfused::cpu
