// kd_vec_cpu.h -- the at::vec building blocks of the CPU kernels (kd_kernel_cpu.h,
// topk/kd_topk_kernel_cpu.h): chunk size, fixed-order horizontal reductions, partial loads and
// stores, conversion to the accumulation type. Compiled with each kernel once per instruction set,
// in that instruction set's namespace (see kd_cpu_dispatch.h).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../kd_math.h"
#include "kd_vexp.h"

// kd_math.h's and kd_topk_math.h's scalar functions (make_row_config, merge, finalize, bucket, ...)
// are inline templates in namespace kdfused, instantiated identically named in every ISA's file:
// the linker keeps ONE copy for all of them, compiled with whichever ISA's flags came first (FMA
// contraction, even AVX-512 instructions on the default path). So every kernel function that calls
// them is flattened: they are inlined into this ISA's code instead of called
// (tools/check_isa_symbols.py fails the build where one is not).
#ifndef KD_FLATTEN
#if defined(__GNUC__) || defined(__clang__)
#define KD_FLATTEN __attribute__((flatten))
#else
#define KD_FLATTEN
#endif
#endif

namespace kdfused {
// kd_math.h's element-wise primitives on at::vec vectors: the per-element functions of kd_math.h
// (accumulate_at, mix_at, grad_at) run here on whole vectors. Masks: VecMask (kd_vexp.h).
template <typename A>
struct Ew<at::vec::CPU_CAPABILITY::Vectorized<A>> : cpu::CPU_CAPABILITY::VecMask<A> {
  using X = at::vec::CPU_CAPABILITY::Vectorized<A>;
  static X exp(const X& x) { return cpu::CPU_CAPABILITY::vexp(x); }
  static X log(const X& x) { return x.log(); }
  static X tanh(const X& x) { return x.tanh(); }
  static X abs(const X& x) { return x.abs(); }
  static X max(const X& a, const X& b) { return at::vec::maximum(a, b); }
  static X splat(A a) { return X(a); }
};
}  // namespace kdfused

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

// n elements of an input as the kernels read them: in the accumulation type and, when the side's
// logit transform is on, transformed (kd_math.h map_logit) into buf, once per chunk and sweep.
// With the transform off this is chunk_as (one branch per chunk: the plain call's loops are
// untouched).
template <typename S, typename A>
inline const A* chunk_z(const S* src, A* buf, int64_t n, const LogitMap<A>& m) {
  if (!m.on) return chunk_as(src, buf, n);
  constexpr int64_t W = Vectorized<A>::size();
  const A* x = chunk_as(src, buf, n);  // (in place in buf for a converted input)
  for (int64_t i = 0; i < n; i += W) {
    const int64_t k = std::min<int64_t>(W, n - i);
    const Vectorized<A> z = map_logit(Vectorized<A>::loadu(x + i, k), m);
    z.store(buf + i, k);
  }
  return buf;
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

template <typename X>
inline void prefetch(const X* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 3);
#else
  (void)p;
#endif
}

inline bool aligned64(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 64 == 0;
}

// Orders this thread's non-temporal stores before what follows (the end of its parallel task).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// store_chunk with a non-temporal store for whole vectors (x + i 64-byte aligned when W * sizeof(A)
// is 64): the line is written to memory without first being read into the cache.
template <typename A>
inline void stream_chunk(const Vectorized<A>& v, A* x, int64_t i, int64_t n) {
  [[maybe_unused]] constexpr int64_t W = Vectorized<A>::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    if (i + W <= n) return _mm512_stream_ps(x + i, v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    if (i + W <= n) return _mm256_stream_ps(x + i, v);
  }
#endif
  store_chunk(v, x, i, n);
}

// at::vec::convert(src, dst, n) from float to bfloat16 (the same rounding, cvtfp32_bf16) with
// non-temporal stores of whole vectors, dst 64-byte aligned; false (nothing written) where this
// instruction set or type has no such path.
template <typename S>
inline bool stream_convert(const float* src, S* dst, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    constexpr int64_t W = Vectorized<float>::size();
    int64_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
      const auto bf = at::vec::cvtfp32_bf16(Vectorized<float>::loadu(src + i),
                                            Vectorized<float>::loadu(src + i + W));
#if defined(CPU_CAPABILITY_AVX512)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), bf);
#else
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), bf);
#endif
    }
    for (; i < n; ++i) dst[i] = c10::convert<c10::BFloat16>(src[i]);
    return true;
  }
#endif
  (void)src;
  (void)dst;
  (void)n;
  return false;
}

}  // namespace CPU_CAPABILITY
}  // namespace kdfused::cpu
