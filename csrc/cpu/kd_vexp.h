// kd_vexp.h -- the CPU kernels' vector exponential, for arguments x <= 0 (and -inf, NaN).
//
// exp() is where the CPU kernels spend their time (2 per element in the common cases), and every
// argument they pass is a difference to a maximum, scaled by 1/T: x <= 0. That allows a shorter
// exponential than a general one (no overflow clamp):
//   n = round(x log2 e)            (one FMA with the 1.5 * 2^23 + 127 rounding constant; its low
//                                   bits then hold n + 127, the biased exponent of 2^n)
//   r = x - n ln 2                 in [-ln 2 / 2, ln 2 / 2]
//   exp(r) = 1 + r (c1 + r (c2 + r (c3 + r (c4 + r c5))))   (degree-5 polynomial, Horner)
//   exp(x) = exp(r) 2^n, and 0 for x < ln(FLT_MIN) (which includes -inf: masked logits)
// 12 instructions, against 18 for at::vec's exp_u20 plus the 2 that pinned its value at 0; 10 on
// AVX-512, where one scalef (zeroing under a mask) does the 2^n, the multiply and the pin.
// The constant term is exactly 1 and at x = 0 (each row's maximum) r = 0 and n = 0, so
// exp(0) = 1 exactly: for V = 1 the whole distribution, whose loss and gradients must be exactly 0.
// Error: the polynomial is at::vec's exp_u20's; measured relative error <= 3.9e-7 (about 3 ulp,
// largest near x = -87 where n ln 2 is largest); tests/test_cpu_exp.py checks the bound 5e-7
// over [ln(FLT_MIN), 0] on every compiled instruction set, and the special
// values (0 -> 1, -inf -> 0, NaN -> NaN, below ln(FLT_MIN) -> 0). Results below 2^-126 are flushed
// to 0 or kept as denormals depending on r; both are < 1.2e-38 and relative errors there do not
// matter for probabilities summed against a maximum of 1.
// Doubles (rare on CPU, float64 inputs) keep at::vec's 1-ulp Sleef exp.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace kdfused::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// The float whose bits are those of t shifted left by 23: 2^n when t's low bits hold n + 127.
inline Vectorized<float> vexp_scale(const Vectorized<float>& t) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(t), 23));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23));
#else
  return at::vec::cast<float>(at::vec::cast<int32_t>(t) << Vectorized<int32_t>(23));
#endif
}

// Lane masks of comparisons and the select that uses them (kd_math.h's Ew::gt / eq / where).
// at::vec's own masks are vectors of all-ones lanes; AVX-512 compares into mask registers, so
// there its mask goes register -> vector -> register (two extra instructions) around every
// select: there the masks of float vectors stay in the registers (doubles, rare on the CPU, keep
// at::vec's). Same lanes selected, bitwise the same results.
template <typename A>
struct VecMask {
  using X = Vectorized<A>;
  using M = X;
  static M gt(const X& a, const X& b) { return a > b; }
  static M eq(const X& a, const X& b) { return a == b; }
  static X where(const M& m, const X& a, const X& b) { return X::blendv(b, a, m); }
};
#if defined(CPU_CAPABILITY_AVX512)
template <>
struct VecMask<float> {
  using X = Vectorized<float>;
  using M = __mmask16;
  static M gt(const X& a, const X& b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M eq(const X& a, const X& b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static X where(M m, const X& a, const X& b) { return _mm512_mask_blend_ps(m, b, a); }
};
#endif

// The running maximum of a sweep: one instruction where at::vec::maximum spends three more on
// propagating a NaN. Why that is safe: a NaN logit need not reach the maximum, it reaches the
// row's sums (its exponential is NaN), hence a NaN loss and NaN gradients either way.
template <typename A>
inline Vectorized<A> vmax(const Vectorized<A>& a, const Vectorized<A>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) return _mm512_max_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) return _mm256_max_ps(a, b);
#endif
  return at::vec::maximum(a, b);
}

template <typename A>
inline Vectorized<A> vexp(const Vectorized<A>& x) {
  return x.exp();
}

template <>
inline Vectorized<float> vexp(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  const V round_bias(12582912.f + 127.f);  // 1.5 * 2^23 + 127
  const V t = at::vec::fmadd(x, V(1.44269504088896341f), round_bias);
  const V n = t - round_bias;  // exact: n is an integer
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  // One rounding (FMA): ln 2 in one float is accurate enough for |n| <= 126.
  const V r = at::vec::fmadd(n, V(-0.693147180559945309f), x);
#else
  // Without FMA n ln 2 would be rounded before the subtraction (4e-6 relative at x = -72): ln 2
  // in two parts, the first exact times any |n| <= 126 (Cody and Waite).
  const V r = (x - n * V(0.693359375f)) - n * V(-2.12194440e-4f);
#endif
  V p = at::vec::fmadd(r, V(0.00828929059f), V(0.0418978221f));
  p = at::vec::fmadd(r, p, V(0.166676521f));
  p = at::vec::fmadd(r, p, V(0.499991506f));
  p = at::vec::fmadd(r, p, V(0.999999701f));
  p = at::vec::fmadd(r, p, V(1.f));
  // Below ln(FLT_MIN) n + 127 would leave the exponent range: 0 there (exp(-inf) = 0 included).
#if defined(CPU_CAPABILITY_AVX512)
  // p 2^n in one instruction (scalef; exact, as the multiply by 2^n), zeroed where not x >=
  // ln(FLT_MIN) (an unordered compare, so that a NaN x stays NaN).
  const __mmask16 keep = _mm512_cmp_ps_mask(x, V(-87.3365447505531f), _CMP_NLT_UQ);
  return _mm512_maskz_scalef_ps(keep, p, n);
#else
  const V e = p * vexp_scale(t);
  return V::blendv(e, V(0.f), x < V(-87.3365447505531f));
#endif
}

// n floats through vexp (the test of its error bound, tests/test_cpu_exp.py).
inline void vexp_array(const float* x, float* y, int64_t n) {
  using V = Vectorized<float>;
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) vexp(V::loadu(x + i)).store(y + i);
  if (i < n) vexp(V::loadu(x + i, n - i)).store(y + i, n - i);
}

}  // namespace CPU_CAPABILITY
}  // namespace kdfused::cpu
