// vmath.hpp - exp and tanh written so that loops calling them vectorise (per ISA).
//
// libm's expf/tanhf are scalar calls (8-30 ns each here), which keeps every
// activation loop scalar.  These branch-free versions use only +, *, /, compares,
// selects and integer ops on the bit patterns, all of which GCC/Clang vectorise in
// both ISA units (SSE4.2 and AVX2+FMA); like isa_common.hpp they have internal
// linkage, so an AVX2 copy never replaces the baseline one.
//
// vexp (Cephes expf / exp): x = n ln2 + r, |r| <= ln2/2, with n = round(x log2 e)
// by the 1.5*2^p "magic number" addition (whose bit pattern then holds n), ln2 split
// in two parts so r is exact to a few ulp; e^r by a degree-6 polynomial (float) or
// the Cephes (2,3) Pade form 1 + 2r P/(Q - rP) (double); times 2^n built from bits
// in two halves (2^(n/2) 2^(n - n/2)), so results are correct down through the
// subnormal range and overflow to +inf above log(max).  NaN gives NaN.
//   float: peak relative error ~2e-7 (~2 ulp); double: ~3e-16 (~2 ulp).
// vtanh: odd polynomial (float; Cephes tanhf) or rational function (double; Cephes
//   tanh) for |x| < 0.625, else sign(x) (1 - e) / (1 + e) with e = e^(-2|x|) from
//   vexp_nonpos (exp of a non-positive argument, one 2^n scale and a square), which
//   saturates to +-1 as e underflows.  float: ~2-4 ulp; double: ~4e-16 relative.
// vsigmoid uses vexp_nonpos(-|x|) as well: <= 4 ulp (float) over the whole range;
// the avx512 unit's sigmoid activation loop (vsigmoid_span) uses vscalefps instead:
// <= 2 ulp, 25% faster.
#pragma once

#include <cstdint>
#include <cstring>

#include "isa_common.hpp"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

inline std::int32_t bits_of(float x) {
    std::int32_t i;
    std::memcpy(&i, &x, sizeof i);
    return i;
}
inline std::int64_t bits_of(double x) {
    std::int64_t i;
    std::memcpy(&i, &x, sizeof i);
    return i;
}
inline float float_from_bits(std::int32_t i) {
    float x;
    std::memcpy(&x, &i, sizeof x);
    return x;
}
inline double double_from_bits(std::int64_t i) {
    double x;
    std::memcpy(&x, &i, sizeof x);
    return x;
}

// e^x = p * 2^n for x in the clamped range: n = round(x log2 e) by the magic-number
// addition, r = x - n ln2 (ln2 in two parts), p = e^r by the polynomial (float) or the
// Pade form (double).  The callers apply 2^n.
// The float reduction's constants (shared with the avx512 vsigmoid16 below).
constexpr float kExpMagicF = 12582912.0f;  // 1.5 * 2^23
constexpr float kLog2eF = 1.44269504088896341f;
constexpr float kLn2HiF = 0.693359375f, kLn2LoF = -2.12194440e-4f;
constexpr float kExpPolyF[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline float exp_reduced(float x, std::int32_t* n) {
    const float t = x * kLog2eF + kExpMagicF;
    const float z = t - kExpMagicF;  // round(x log2 e)
    *n = bits_of(t) - 0x4B400000;
    float r = x - z * kLn2HiF;
    r = r - z * kLn2LoF;
    const float r2 = r * r;
    float p = kExpPolyF[0];
    for (int i = 1; i < 6; ++i) p = p * r + kExpPolyF[i];
    return p * r2 + r + 1.0f;
}

inline double exp_reduced(double x, std::int64_t* n) {
    constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52
    const double t = x * 1.4426950408889634073599 + kMagic;
    const double z = t - kMagic;
    *n = bits_of(t) - 0x4338000000000000LL;
    double r = x - z * 6.93145751953125e-1;
    r = r - z * 1.42860682030941723212e-6;
    const double r2 = r * r;
    const double p = r * ((1.26177193074810590878e-4 * r2 + 3.02994407707441961300e-2) * r2 +
                          9.99999999999999999910e-1);
    const double q = ((3.00198505138664455042e-6 * r2 + 2.52448340349684104192e-3) * r2 +
                      2.27265548208155028766e-1) * r2 + 2.00000000000000000009e0;
    return 1.0 + 2.0 * (p / (q - p));
}

// 2^k as a float/double, k in the normal exponent range.  Shifts on unsigned values:
// a NaN input gives a huge k, and a signed shift that overflows would be undefined
// (the result is NaN either way).
inline float pow2(std::int32_t k) {
    return float_from_bits(std::int32_t(std::uint32_t(k + 127) << 23));
}
inline double pow2(std::int64_t k) {
    return double_from_bits(std::int64_t(std::uint64_t(k + 1023) << 52));
}

inline float vexp(float x) {
    // Clamp: below -104 the result rounds to 0, above 88.8 it overflows to inf.
    x = x < -104.0f ? -104.0f : x;
    x = x > 88.8f ? 88.8f : x;
    std::int32_t n;
    const float p = exp_reduced(x, &n);
    const std::int32_t n1 = n >> 1, n2 = n - n1;
    return p * pow2(n1) * pow2(n2);
}

inline double vexp(double x) {
    x = x < -746.0 ? -746.0 : x;
    x = x > 709.8 ? 709.8 : x;
    std::int64_t n;
    const double e = exp_reduced(x, &n);
    const std::int64_t n1 = n >> 1, n2 = n - n1;
    return e * pow2(n1) * pow2(n2);
}

// exp(x) for x <= 0 (sigmoid, tanh and gelu only need this half): h * h with
// h = exp(x/2) scaled by a single 2^n, since x/2 >= -60 (resp. -700) keeps h normal and
// the square then underflows gracefully into the subnormals or to 0.  Three fewer
// integer ops than vexp's two-step scaling and no overflow clamp: the sigmoid loop
// 0.50 -> 0.42 ns/element (avx512 unit, Zen4); error <= 2 ulp more than vexp's.
inline float vexp_nonpos(float x) {
    float hx = x * 0.5f;
    hx = hx < -60.0f ? -60.0f : hx;
    std::int32_t n;
    const float h = exp_reduced(hx, &n) * pow2(n);
    return h * h;
}

inline double vexp_nonpos(double x) {
    double hx = x * 0.5;
    hx = hx < -700.0 ? -700.0 : hx;
    std::int64_t n;
    const double h = exp_reduced(hx, &n) * pow2(n);
    return h * h;
}

inline float vtanh(float x) {
    const float ax = x < 0.0f ? -x : x;
    // |x| < 0.625: x + x^3 P(x^2)
    const float x2 = x * x;
    float p = -5.70498872745e-3f;
    p = p * x2 + 2.06390887954e-2f;
    p = p * x2 - 5.37397155531e-2f;
    p = p * x2 + 1.33314422036e-1f;
    p = p * x2 - 3.33332819422e-1f;
    const float small = x + x * x2 * p;
    // otherwise: (1 - e) / (1 + e), e = e^(-2|x|) <= 0.29 (no cancellation), with the
    // sign of x; saturates to exactly 1 as e underflows
    const float e = vexp_nonpos(-2.0f * ax);
    const float big = (1.0f - e) / (1.0f + e);
    const float signed_big = x < 0.0f ? -big : big;
    return ax < 0.625f ? small : signed_big;
}

inline double vtanh(double x) {
    const double ax = x < 0.0 ? -x : x;
    const double x2 = x * x;
    const double p = (-9.64399179425052238628e-1 * x2 - 9.92877231001918586564e1) * x2 -
                     1.61468768441708447952e3;
    const double q = ((x2 + 1.12811678491632931402e2) * x2 + 2.23548839060100448583e3) * x2 +
                     4.84406305325125486048e3;
    const double small = x + x * x2 * (p / q);
    const double e = vexp_nonpos(-2.0 * ax);
    const double big = (1.0 - e) / (1.0 + e);
    const double signed_big = x < 0.0 ? -big : big;
    return ax < 0.625 ? small : signed_big;
}

// Logistic sigmoid, stable for any x: e = exp(-|x|) never overflows;
// 1/(1+e) for x >= 0, e/(1+e) for x < 0.
template <typename T>
inline T vsigmoid(T x) {
    const T e = vexp_nonpos(x < T(0) ? x : -x);
    const T r = T(1) / (T(1) + e);
    return x >= T(0) ? r : e * r;
}

// y[i] = sigmoid(x[i]) for i < n.  The avx512 unit's float version computes
// e = exp(-|x|) with the same reduction and polynomial as exp_reduced but applies 2^n
// with vscalefps (one rounding, exact into the subnormals, so no half-argument square)
// and selects 1 or e before the one division: 0.44 -> 0.33 ns/element (1 thread) and
// max 2.0 ulp instead of 3.6 (normal results, every 4099th float bit pattern).
template <typename T>
inline void vsigmoid_span(const T* x, T* y, index_t n) {  // y may be x
    for (index_t i = 0; i < n; ++i) y[i] = vsigmoid(x[i]);
}

#if defined(__AVX512F__)
inline __m512 vsigmoid16(__m512 v) {
    const __m512 one = _mm512_set1_ps(1.0f), magic = _mm512_set1_ps(kExpMagicF);
    const __m512 neg = _mm512_castsi512_ps(   // -|x| (NaN stays NaN)
        _mm512_or_si512(_mm512_castps_si512(v), _mm512_set1_epi32(INT32_MIN)));
    const __m512 a = _mm512_max_ps(_mm512_set1_ps(-104.0f), neg);  // NaN: 2nd operand
    const __m512 t = _mm512_fmadd_ps(a, _mm512_set1_ps(kLog2eF), magic);
    const __m512 z = _mm512_sub_ps(t, magic);
    __m512 r = _mm512_fnmadd_ps(z, _mm512_set1_ps(kLn2HiF), a);
    r = _mm512_fnmadd_ps(z, _mm512_set1_ps(kLn2LoF), r);
    const __m512 r2 = _mm512_mul_ps(r, r);
    __m512 p = _mm512_set1_ps(kExpPolyF[0]);
    for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPolyF[i]));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), one);
    const __m512 e = _mm512_scalef_ps(p, z);
    const __mmask16 pos = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GE_OQ);
    return _mm512_div_ps(_mm512_mask_blend_ps(pos, e, one), _mm512_add_ps(one, e));
}

inline void vsigmoid_span(const float* x, float* y, index_t n) {
    index_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, vsigmoid16(_mm512_loadu_ps(x + i)));
    if (i < n) {
        const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(y + i, m, vsigmoid16(_mm512_maskz_loadu_ps(m, x + i)));
    }
}
#endif

// GELU, tanh approximation: gelu(x) = 0.5 x (1 + tanh(u)) = x s with
// u = sqrt(2/pi) (x + 0.044715 x^3) and s = sigmoid(2u) (no cancellation for x << 0);
// gelu'(x) = s + 2 x s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 x^2).
// |x| > kGeluClip: gelu(x) = x (x > 0) or -0 (x < 0) and gelu'(x) = 1 or 0 to the
// last bit in float and double (s = sigmoid(2u(20)) rounds to 1 or below e^-600), so
// the formulas run on x clamped to [-20, 20]: no x^3 overflow, no inf * 0 = NaN at
// +-inf or +-max; NaN still propagates (the comparisons are false for NaN).
// Used by activations.cpp and the GEMM epilogue (gemm/epilogue.hpp) alike.
constexpr double kGeluC = 0.7978845608028654;  // sqrt(2 / pi)
constexpr double kGeluK = 0.044715;
constexpr double kGeluClip = 20.0;

template <typename T>
inline T gelu_clamp(T x) {
    return x < T(-kGeluClip) ? T(-kGeluClip) : (x > T(kGeluClip) ? T(kGeluClip) : x);
}

template <typename T>
inline T gelu_sigmoid(T x) {  // s = sigmoid(2u); x already clamped
    const T u = T(kGeluC) * (x + T(kGeluK) * x * x * x);
    return vsigmoid(T(2) * u);
}

template <typename T>
inline T gelu_value(T x) {
    return x < T(-kGeluClip) ? T(-0.0) : x * gelu_sigmoid(gelu_clamp(x));
}

template <typename T>
inline T gelu_derivative(T x) {
    const T xc = gelu_clamp(x);
    const T s = gelu_sigmoid(xc);
    const T du = T(kGeluC) * (T(1) + T(3 * kGeluK) * xc * xc);
    return s + T(2) * xc * s * (T(1) - s) * du;
}

}  // namespace
}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
