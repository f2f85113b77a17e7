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
// vsigmoid uses vexp_nonpos(-|x|) as well: <= 5 ulp (float) over the whole range
// (every float32 input measured: 4.31 ulp avx2, 4.66 generic, both near x = -4.2..-4.9);
// the avx512 unit's sigmoid activation loop (vsigmoid_span) uses vscalefps instead:
// <= 2.5 ulp (2.40 measured), 25% faster.
// The activation loops over float arrays (vsigmoid_span, vtanh_span, vgelu_span,
// vgelu_grad_span) and the GEMM epilogue's float sigmoid/tanh/gelu rows are written
// once with intrinsics over VecF (below): 16 lanes and vscalefps in the avx512 unit, 8
// lanes and the half-argument square in the avx2 unit, the same arithmetic lane by
// lane with masked tails, so a value's result does not depend on where it lies.
// GCC's own vectorisation of the scalar forms ran tanh at 0.60 and gelu at 0.67
// ns/element (1 thread, avx512 unit, Zen4); the intrinsics run them at 0.45 and 0.48
// (gelu's backward 1.05 -> 0.53).  Elsewhere (double, the generic unit) the scalar
// forms are vectorised by the compiler.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "isa_common.hpp"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
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
// The float reduction's constants (shared with the vector vexp_nonpos_v below).
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

// tanh(|x|) with the sign of x put back last (copysign), so tanh(-0) = -0.
inline float vtanh(float x) {
    const float ax = fp_abs(x);
    // |x| < 0.625: |x| + |x|^3 P(x^2)
    const float x2 = x * x;
    float p = -5.70498872745e-3f;
    p = p * x2 + 2.06390887954e-2f;
    p = p * x2 - 5.37397155531e-2f;
    p = p * x2 + 1.33314422036e-1f;
    p = p * x2 - 3.33332819422e-1f;
    const float small = ax + ax * x2 * p;
    // otherwise: (1 - e) / (1 + e), e = e^(-2|x|) <= 0.29 (no cancellation); saturates
    // to exactly 1 as e underflows
    const float e = vexp_nonpos(-2.0f * ax);
    const float big = (1.0f - e) / (1.0f + e);
    return fp_copysign(ax < 0.625f ? small : big, x);
}

inline double vtanh(double x) {
    const double ax = fp_abs(x);
    const double x2 = x * x;
    const double p = (-9.64399179425052238628e-1 * x2 - 9.92877231001918586564e1) * x2 -
                     1.61468768441708447952e3;
    const double q = ((x2 + 1.12811678491632931402e2) * x2 + 2.23548839060100448583e3) * x2 +
                     4.84406305325125486048e3;
    const double small = ax + ax * x2 * (p / q);
    const double e = vexp_nonpos(-2.0 * ax);
    const double big = (1.0 - e) / (1.0 + e);
    return fp_copysign(ax < 0.625 ? small : big, x);
}

// log(x) in double, branch-free so that loops calling it vectorise (fdlibm's e_log.c):
// x = 2^k m with m in [sqrt(2)/2, sqrt(2)), f = m - 1, s = f / (2 + f),
// log(m) = f - f^2/2 + s (f^2/2 + R(s^2)) with fdlibm's Lg1..Lg7, plus k ln2 in two
// parts; < 1 ulp.  Subnormal x is scaled by 2^54 first; k is turned into a double
// through the 2^52 bit pattern (no int64 -> double conversion, which AVX2 lacks).
// x = 0: -inf; x < 0 or NaN: NaN; +inf: +inf.
inline double vlog(double x) {
    constexpr double kTwo54 = 18014398509481984.0, kTwo52 = 4503599627370496.0;
    const bool sub = x < 2.2250738585072014e-308;  // (0 and negatives too: fixed below)
    const double xs = sub ? x * kTwo54 : x;
    const std::int64_t bits = bits_of(xs);
    const std::int64_t ebits = (bits >> 52) & 0x7FF;
    double m = double_from_bits((bits & 0x000FFFFFFFFFFFFFLL) | 0x3FF0000000000000LL);
    double k = double_from_bits(0x4330000000000000LL | ebits) - (kTwo52 + 1023.0);
    k = sub ? k - 54.0 : k;
    const bool big = m > 1.4142135623730951;
    m = big ? m * 0.5 : m;
    k = big ? k + 1.0 : k;
    const double f = m - 1.0;
    const double s = f / (2.0 + f);
    const double z = s * s, w = z * z;
    const double t1 = w * (3.999999999940941908e-01 +
                           w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01));
    const double t2 = z * (6.666666666666735130e-01 +
                           w * (2.857142874366239149e-01 +
                                w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01)));
    const double hfsq = 0.5 * f * f;
    double r = k * 6.93147180369123816490e-01 -
               ((hfsq - (s * (hfsq + t1 + t2) + k * 1.90821492927058770002e-10)) - f);
    constexpr double kInf = std::numeric_limits<double>::infinity();
    r = x == 0.0 ? -kInf : r;
    r = x < 0.0 ? std::numeric_limits<double>::quiet_NaN() : r;
    r = x == kInf ? kInf : r;
    return x != x ? x : r;
}

// log(x) in float (Cephes logf): x = 2^e m with m in [sqrt(2)/2, sqrt(2)), f = m - 1,
// log = f - f^2/2 + f^3 P(f) + e ln2 in two parts; ~1-2 ulp.  Specials as vlog.
inline float vlog(float x) {
    const bool sub = x < 1.17549435e-38f;  // (0 and negatives too: fixed below)
    const float xs = sub ? x * 33554432.0f : x;  // 2^25
    const std::int32_t bits = bits_of(xs);
    float e = float(((bits >> 23) & 0xFF) - 126);
    e = sub ? e - 25.0f : e;
    float m = float_from_bits((bits & 0x007FFFFF) | 0x3F000000);  // [0.5, 1)
    const bool lowm = m < 0.707106781186547524f;
    e = lowm ? e - 1.0f : e;
    const float f = lowm ? m + m - 1.0f : m - 1.0f;
    const float z = f * f;
    float p = 7.0376836292e-2f;
    p = p * f - 1.1514610310e-1f;
    p = p * f + 1.1676998740e-1f;
    p = p * f - 1.2420140846e-1f;
    p = p * f + 1.4249322787e-1f;
    p = p * f - 1.6668057665e-1f;
    p = p * f + 2.0000714765e-1f;
    p = p * f - 2.4999993993e-1f;
    p = p * f + 3.3333331174e-1f;
    float y = p * f * z;
    y += e * -2.12194440e-4f;
    y += -0.5f * z;
    float r = (f + y) + e * 0.693359375f;
    constexpr float kInf = std::numeric_limits<float>::infinity();
    r = x == 0.0f ? -kInf : r;
    r = x < 0.0f ? std::numeric_limits<float>::quiet_NaN() : r;
    r = x == kInf ? kInf : r;
    return x != x ? x : r;
}

// log(1 + y) for y > -1 from vlog, in T (Goldberg's correction: u = 1 + y rounded, then
// log(u) y / (u - 1), exact where u = 1); a few ulp.  y = -1: -inf; y < -1: NaN.
template <typename T>
inline T vlog1p(T y) {
    const T u = T(1) + y;
    const T l = vlog(u);
    return u == T(1) ? y : (u == std::numeric_limits<T>::infinity() ? u : l * (y / (u - T(1))));
}

// Logistic sigmoid, stable for any x: e = exp(-|x|) never overflows;
// 1/(1+e) for x >= 0, e/(1+e) for x < 0.
template <typename T>
inline T vsigmoid(T x) {
    const T e = vexp_nonpos(x < T(0) ? x : -x);
    const T r = T(1) / (T(1) + e);
    return x >= T(0) ? r : e * r;
}

// y[i] = sigmoid(x[i]) for i < n.  The avx512 and avx2 units have float overloads
// (VecF, below); the avx512 one applies 2^n with vscalefps (one rounding, exact into
// the subnormals, so no half-argument square) and selects 1 or e before the one
// division: 0.44 -> 0.33 ns/element (1 thread) and max 2.40 ulp instead of 3.6 (normal
// results; every float32 input: 2.402 at x = -4.157; a sample of every 4099th bit
// pattern had found 2.0).
template <typename T>
inline void vsigmoid_span(const T* x, T* y, index_t n) {  // y may be x
    for (index_t i = 0; i < n; ++i) y[i] = vsigmoid(x[i]);
}


// GELU, tanh approximation: gelu(x) = 0.5 x (1 + tanh(u)) = x s with
// u = sqrt(2/pi) (x + 0.044715 x^3) and s = sigmoid(2u) (no cancellation for x << 0);
// gelu'(x) = s + 2 x s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 x^2).
// |x| > kGeluClip: gelu(x) = x (x > 0) or -0 (x < 0), and gelu'(x) = 1 or 0 in float;
// in double the values there are below e^-590 (gelu(-20) = -3.4e-261, gelu'(x < -20)
// is gelu'(-20) = -2.9e-259), so the formulas run on x clamped to [-20, 20]: no x^3
// overflow, no inf * 0 = NaN at +-inf or +-max; NaN still propagates (the comparisons
// are false for NaN).  For x << 0 both carry exp's conditioning: w = 2u is rounded
// before exp, so the relative error grows like |w| eps: about (3 |w| + 8) ulp (float32,
// every input: 94-121 ulp in [-8, -4] (generic the most), at most 214 ulp at
// x = -10.04, a value ~5e-38; tested); the absolute error stays below eps |x|.
// Used by activations.cpp and the GEMM epilogue (gemm/epilogue.hpp) alike.
constexpr double kGeluC = 0.7978845608028654;  // sqrt(2 / pi)
constexpr double kGeluK = 0.044715;
constexpr double kGeluClip = 20.0;

template <typename T>
inline T gelu_clamp(T x) {
    return x < T(-kGeluClip) ? T(-kGeluClip) : (x > T(kGeluClip) ? T(kGeluClip) : x);
}

// w = 2u = x (2c + 2ck x^2), x already clamped; the vector spans below compute it the
// same way (an FMA where the unit has one), so the GEMM epilogue's gelu agrees with
// the activation kernel's to an ulp or two (w's rounding is amplified |w| times by exp).
template <typename T>
inline T gelu_w(T x) {
    return x * (T(2 * kGeluC * kGeluK) * (x * x) + T(2 * kGeluC));
}

template <typename T>
inline T gelu_sigmoid(T x) {  // s = sigmoid(2u); x already clamped
    return vsigmoid(gelu_w(x));
}

template <typename T>
inline T gelu_value(T x) {
    return x < T(-kGeluClip) ? T(-0.0) : x * gelu_sigmoid(gelu_clamp(x));
}

// s (1 - s) is computed as e / (1 + e)^2 with e = exp(-|2u|): 1 - s itself would
// cancel where s rounds to 1 (gelu' = 1 + 2e-6 at x = 5 came out as 1.0 in float).
template <typename T>
inline T gelu_derivative(T x) {
    const T xc = gelu_clamp(x);
    const T w = gelu_w(xc);
    const T e = vexp_nonpos(w < T(0) ? w : -w);
    const T r = T(1) / (T(1) + e);
    const T er = e * r;
    const T s = w >= T(0) ? r : er;
    const T du2 = T(2 * kGeluC * 3 * kGeluK) * (xc * xc) + T(2 * kGeluC);  // 2 du/dx
    return xc * (er * r) * du2 + s;
}

// GELU's exact form (PyTorch's default, approximate="none"): x Phi(x) with the normal
// CDF Phi(x) = erfc(-x / sqrt 2) / 2, and gelu'(x) = Phi(x) + x phi(x).
//   double: libm's erfc (scalar calls, ~1 ulp) with the rounding of its argument
//     corrected (erfc_of_scaled); erfc(-x / sqrt 2) keeps its relative accuracy in the
//     negative tail, where 1 + erf(x / sqrt 2) cancels.  Beyond
//     |x| = 40 the limits: -0 and 0 below, x and 1 above (-inf gives -0, not -inf * 0).
//   float: branch-free double arithmetic that the loops vectorise (a libm call per
//     element ran ~12 ns): erfc(z) = exp(-z^2) Q(u), u = 1 / (1 + z / 2), Q a degree-12
//     polynomial fitted to erfc(z) e^(z^2) on [0, 10.6] (relative error <= 8.1e-11,
//     against mpmath), z = |x| / sqrt 2 in double, so erfc's condition number (2 z^2)
//     costs nothing at float's precision: results within 1 ulp (each is the double
//     value rounded once).  Beyond |x| = 15 float's limits: -0 / x, slopes 0 / 1.
constexpr double kSqrtHalf = 0.70710678118654752440;     // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1 / sqrt(2 pi)
constexpr double kGeluErfClip = 40.0;
constexpr double kGeluErfClipF = 15.0;
constexpr double kErfcZMax = 10.6;
constexpr double kErfcPoly[13] = {
    -6.2987106602685472e-07, 0.2821183050087202, 0.28170218114868134, 0.25071098068090891,
    0.15106830345487884, 0.19775522807421109, -0.37025701546262885, 0.77976995645217828,
    -1.3903337938375702, 1.4101079381748238, -0.81469783503781379, 0.2567935772190193,
    -0.034737196085018816};

constexpr double kSqrtHalfLo = -4.833646656726457e-17;  // 1/sqrt(2) - kSqrtHalf
constexpr double kTwoOverSqrtPi = 1.1283791670955126;

// erfc(-x / sqrt 2) in double with the argument's rounding corrected: t = -x/sqrt 2 =
// th + tl exactly enough (th rounded, tl from an FMA and the constant's own error),
// and erfc(th + tl) = erfc(th) - tl (2/sqrt pi) exp(-th^2) to first order (the next
// term is ~1e-30 relative).  Rounding t alone cost up to 2 t^2 ulp: ~700 at x = -38.
inline double erfc_of_scaled(double x) {
    const double th = -x * kSqrtHalf;
    const double tl = std::fma(-x, kSqrtHalf, -th) - x * kSqrtHalfLo;
    return std::erfc(th) - tl * (kTwoOverSqrtPi * std::exp(-th * th));
}

// exp(-x^2 / 2) with x^2 = h + l split exactly by an FMA: exp(-h/2) (1 - l/2).
inline double exp_neg_half_square(double x) {
    const double h = x * x;
    const double l = std::fma(x, x, -h);
    return std::exp(-0.5 * h) * (1.0 - 0.5 * l);
}

inline double gelu_erf_value(double x) {
    if (x < -kGeluErfClip) return -0.0;
    if (x > kGeluErfClip) return x;
    return 0.5 * x * erfc_of_scaled(x);
}

inline double gelu_erf_derivative(double x) {
    if (x < -kGeluErfClip) return 0.0;
    if (x > kGeluErfClip) return 1.0;
    return 0.5 * erfc_of_scaled(x) + x * (kInvSqrt2Pi * exp_neg_half_square(x));
}

struct GeluErfParts {
    double cdf;  // Phi(x)
    double e;    // exp(-x^2 / 2) (z clamped: meaningless past |x| = 15)
};

// Phi(x) and exp(-x^2 / 2) for the float forms (a NaN x gives NaN).
inline GeluErfParts gelu_erf_parts(double x) {
    double z = fp_abs(x) * kSqrtHalf;
    z = z > kErfcZMax ? kErfcZMax : z;
    const double u = 1.0 / (1.0 + 0.5 * z);
    double q = kErfcPoly[12];
    for (int k = 11; k >= 0; --k) q = q * u + kErfcPoly[k];
    const double e = vexp_nonpos(-(z * z));
    const double h = 0.5 * e * q;  // erfc(z) / 2
    return {x < 0.0 ? h : 1.0 - h, e};
}

inline float gelu_erf_value(float x) {
    const double xd = x;
    double y = xd * gelu_erf_parts(xd).cdf;
    y = xd < -kGeluErfClipF ? -0.0 : y;
    y = xd > kGeluErfClipF ? xd : y;
    return float(y);
}

inline float gelu_erf_derivative(float x) {
    const double xd = x;
    const GeluErfParts p = gelu_erf_parts(xd);
    double d = p.cdf + xd * (kInvSqrt2Pi * p.e);
    d = xd < -kGeluErfClipF ? 0.0 : d;
    d = xd > kGeluErfClipF ? 1.0 : d;
    return float(d);
}

// Span forms of tanh, gelu and gelu' (the avx512 and avx2 units have float overloads
// below).
template <typename T>
inline void vtanh_span(const T* x, T* y, index_t n) {  // y may be x
    for (index_t i = 0; i < n; ++i) y[i] = vtanh(x[i]);
}

template <typename T>
inline void vgelu_span(const T* x, T* y, index_t n) {  // y may be x
    for (index_t i = 0; i < n; ++i) y[i] = gelu_value(x[i]);
}

// gx[i] = gy[i] * gelu'(x[i]); gx may be gy
template <typename T>
inline void vgelu_grad_span(const T* gy, const T* x, T* gx, index_t n) {
    for (index_t i = 0; i < n; ++i) gx[i] = gy[i] * gelu_derivative(x[i]);
}

// ------------------------------------------------------------------ float vectors
// The float activation loops in intrinsics, written once over VecF, the unit's vector
// type and the handful of operations they need: 16 lanes with k-masks in the avx512
// unit, 8 lanes with vector masks in the avx2 unit (no VecF in the generic unit).
// The units differ in one place, 2^n (VecF::exp_finish): vscalefps applies it in one
// rounding, exact into the subnormals; without it, exp(a) = h * h with h = exp(a/2)
// scaled by 2^n built from bits (a/2 >= -60 keeps 2^n normal, the square underflows
// gracefully), as the scalar vexp_nonpos does.
#if defined(__AVX512F__)
#define FASTPROP_VECF 1
struct VecF {
    using V = __m512;
    using M = __mmask16;
    static constexpr index_t N = 16;
    static constexpr bool kFreeMasks = true;  // a masked load/store costs a plain one
    static V set1(float x) { return _mm512_set1_ps(x); }
    static V add(V a, V b) { return _mm512_add_ps(a, b); }
    static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
    static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    static V div(V a, V b) { return _mm512_div_ps(a, b); }
    static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
    // max/min return the 2nd operand when either is NaN: put x second to keep NaN
    static V max(V a, V b) { return _mm512_max_ps(a, b); }
    static V min(V a, V b) { return _mm512_min_ps(a, b); }
    static V bits_and(V a, std::int32_t m) {
        return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(m)));
    }
    static V bits_or(V a, V b) { return _mm512_or_ps(a, b); }
    static M lt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
    static M ge(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
    static M gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
    static V select(M m, V if_true, V if_false) { return _mm512_mask_blend_ps(m, if_false, if_true); }
    // exp's argument before the reduction, and p * 2^n after it (vscalefps: n = z)
    static V exp_prepare(V a) { return max(set1(-104.0f), a); }
    static V exp_finish(V p, V z, V /*t*/) { return _mm512_scalef_ps(p, z); }
    // loads and stores of the first r lanes (r in 1..N; masked lanes are not touched)
    using Tail = __mmask16;
    static Tail tail(index_t r) {
        return r >= 16 ? Tail(0xFFFF) : static_cast<Tail>((1u << r) - 1u);
    }
    static V load(const float* p) { return _mm512_loadu_ps(p); }
    static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
    static V load(Tail m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
    static void store(Tail m, float* p, V v) { _mm512_mask_storeu_ps(p, m, v); }
};
#elif defined(__AVX2__) && defined(__FMA__)
#define FASTPROP_VECF 1
struct VecF {
    using V = __m256;
    using M = __m256;
    static constexpr index_t N = 8;
    static constexpr bool kFreeMasks = false;
    static V set1(float x) { return _mm256_set1_ps(x); }
    static V add(V a, V b) { return _mm256_add_ps(a, b); }
    static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
    static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    static V div(V a, V b) { return _mm256_div_ps(a, b); }
    static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
    static V max(V a, V b) { return _mm256_max_ps(a, b); }
    static V min(V a, V b) { return _mm256_min_ps(a, b); }
    static V bits_and(V a, std::int32_t m) {
        return _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(a), _mm256_set1_epi32(m)));
    }
    static V bits_or(V a, V b) { return _mm256_or_ps(a, b); }
    static M lt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
    static M ge(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
    static M gt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
    static V select(M m, V if_true, V if_false) { return _mm256_blendv_ps(if_false, if_true, m); }
    // exp(a) = h * h: the reduction runs on a / 2, and h = p * 2^n with 2^n built from
    // t = n + magic (1.5 * 2^23, whose low bits hold n): (bits - magic + 127) << 23
    static V exp_prepare(V a) { return max(set1(-60.0f), mul(a, set1(0.5f))); }
    static V exp_finish(V p, V /*z*/, V t) {
        const V h = mul(p, _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B400000 - 127)), 23)));
        return mul(h, h);
    }
    using Tail = __m256i;
    static Tail tail(index_t r) {
        return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(r < 8 ? r : 8)),
                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
    static V load(const float* p) { return _mm256_loadu_ps(p); }
    static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
    static V load(Tail m, const float* p) { return _mm256_maskload_ps(p, m); }
    static void store(Tail m, float* p, V v) { _mm256_maskstore_ps(p, m, v); }
};
#endif

#if defined(FASTPROP_VECF)
using VF = VecF::V;

// e^a for a <= 0 (or NaN, which propagates): exp_reduced's reduction and polynomial.
inline VF vexp_nonpos_v(VF a) {
    using O = VecF;
    const VF magic = O::set1(kExpMagicF);
    const VF h = O::exp_prepare(a);
    const VF t = O::fmadd(h, O::set1(kLog2eF), magic);
    const VF z = O::sub(t, magic);
    VF r = O::fnmadd(z, O::set1(kLn2HiF), h);
    r = O::fnmadd(z, O::set1(kLn2LoF), r);
    const VF r2 = O::mul(r, r);
    VF p = O::set1(kExpPolyF[0]);
    for (int i = 1; i < 6; ++i) p = O::fmadd(p, r, O::set1(kExpPolyF[i]));
    p = O::add(O::fmadd(p, r2, r), O::set1(1.0f));
    return O::exp_finish(p, z, t);
}

inline VF neg_abs_v(VF v) {  // -|v|
    return VecF::sub(VecF::set1(0.0f), VecF::bits_and(v, INT32_MAX));
}

// sigmoid(v): e = exp(-|v|), then 1 / (1 + e) for v >= 0 and e / (1 + e) otherwise.
inline VF vsigmoid_v(VF v) {
    using O = VecF;
    const VF one = O::set1(1.0f);
    const VF e = vexp_nonpos_v(neg_abs_v(v));
    return O::div(O::select(O::ge(v, O::set1(0.0f)), one, e), O::add(one, e));
}

// vtanh's two branches on |v|: the odd polynomial below 0.625, else (1 - e) / (1 + e)
// with e = exp(-2|v|); then v's sign (tanh(-0) = -0); NaN takes the second branch.
inline VF vtanh_v(VF v) {
    using O = VecF;
    const VF one = O::set1(1.0f);
    const VF av = O::bits_and(v, INT32_MAX);
    const VF x2 = O::mul(v, v);
    VF p = O::set1(-5.70498872745e-3f);
    p = O::fmadd(p, x2, O::set1(2.06390887954e-2f));
    p = O::fmadd(p, x2, O::set1(-5.37397155531e-2f));
    p = O::fmadd(p, x2, O::set1(1.33314422036e-1f));
    p = O::fmadd(p, x2, O::set1(-3.33332819422e-1f));
    const VF small = O::fmadd(O::mul(av, x2), p, av);
    const VF e = vexp_nonpos_v(O::mul(O::set1(-2.0f), av));
    const VF big = O::div(O::sub(one, e), O::add(one, e));
    return O::bits_or(O::select(O::lt(av, O::set1(0.625f)), small, big),
                      O::bits_and(v, INT32_MIN));
}

// v clamped to [-20, 20] (NaN kept) and w = 2u = xc (2c + 2ck xc^2) (gelu_w).
inline VF gelu_clamp_v(VF v) {
    using O = VecF;
    return O::min(O::set1(float(kGeluClip)), O::max(O::set1(float(-kGeluClip)), v));
}
inline VF gelu_w_v(VF xc) {
    using O = VecF;
    return O::mul(xc, O::fmadd(O::mul(xc, xc), O::set1(float(2 * kGeluC * kGeluK)),
                               O::set1(float(2 * kGeluC))));
}

// gelu(v) = xc sigmoid(w), or v itself above the clamp (s = 1 there; v may be +inf);
// below -20 xc s = -20 * 0 = -0.
inline VF vgelu_v(VF v) {
    using O = VecF;
    const VF xc = gelu_clamp_v(v);
    const VF y = O::mul(xc, vsigmoid_v(gelu_w_v(xc)));
    return O::select(O::gt(v, O::set1(float(kGeluClip))), v, y);
}

// gelu'(v) = s + 2 xc s (1 - s) c (1 + 3k xc^2) with s (1 - s) = e r^2, r = 1 / (1 + e)
// (gelu_derivative).
inline VF vgelu_grad_v(VF v) {
    using O = VecF;
    const VF one = O::set1(1.0f);
    const VF xc = gelu_clamp_v(v);
    const VF w = gelu_w_v(xc);
    const VF e = vexp_nonpos_v(neg_abs_v(w));
    const VF r = O::div(one, O::add(one, e));
    const VF er = O::mul(e, r);
    const VF s = O::select(O::ge(w, O::set1(0.0f)), r, er);
    const VF du2 = O::fmadd(O::mul(xc, xc), O::set1(float(2 * kGeluC * 3 * kGeluK)),
                            O::set1(float(2 * kGeluC)));
    return O::fmadd(O::mul(xc, O::mul(er, r)), du2, s);
}

// y[0:n] = f(x[0:n]), the tail with masked loads and stores (so every lane runs the
// same arithmetic); y may be x.
template <typename F>
inline void map_v(const float* x, float* y, index_t n, F f) {
    using O = VecF;
    index_t i = 0;
    for (; i + O::N <= n; i += O::N) O::store(y + i, f(O::load(x + i)));
    if (i < n) {
        const O::Tail m = O::tail(n - i);
        O::store(m, y + i, f(O::load(m, x + i)));
    }
}

inline void vsigmoid_span(const float* x, float* y, index_t n) { map_v(x, y, n, vsigmoid_v); }
inline void vtanh_span(const float* x, float* y, index_t n) { map_v(x, y, n, vtanh_v); }
inline void vgelu_span(const float* x, float* y, index_t n) { map_v(x, y, n, vgelu_v); }

// gx[0:n] = gy * gelu'(x); gx may be gy or x.
inline void vgelu_grad_span(const float* gy, const float* x, float* gx, index_t n) {
    using O = VecF;
    index_t i = 0;
    for (; i + O::N <= n; i += O::N)
        O::store(gx + i, O::mul(O::load(gy + i), vgelu_grad_v(O::load(x + i))));
    if (i < n) {
        const O::Tail m = O::tail(n - i);
        O::store(m, gx + i, O::mul(O::load(m, gy + i), vgelu_grad_v(O::load(m, x + i))));
    }
}
#endif

}  // namespace
}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
