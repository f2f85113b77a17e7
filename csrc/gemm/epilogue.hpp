// gemm/epilogue.hpp - the fused GEMM epilogue on a block of C (per ISA unit).
//
// apply_epilogue(ep, i0, i1, j0, j1, c, ldc) applies the steps of GemmEpilogue
// (include/fastprop/gemm.hpp) to C[i0:i1, j0:j1], row by row, each step one
// vectorisable pass over the row segment (the block is a micro-panel strip that the
// macro-kernel has just written, so it is in L1):
//   bias add, pre-activation copy, activation, activation-derivative product,
//   column sums (double, rows in increasing order, so a column owned by one thread
//   is summed in the same order for any thread count), non-finite check.
// The activation math is that of activations.cpp, from the same vmath.hpp helpers
// (vexp/vtanh/vsigmoid, gelu_value/gelu_derivative); results agree with
// activation_forward/activation_backward to a few ulp, and bit for bit for float
// sigmoid/tanh/gelu (and gelu') in the avx2 and avx512 units, where both run the same
// intrinsics (act_row_vector, vgelu_grad_span; tested).
#pragma once

#include <type_traits>

#include "fastprop/gemm.hpp"
#include "isa_common.hpp"
#include "vmath.hpp"

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

template <typename T>
inline bool epilogue_is_empty(const GemmEpilogue<T>& ep) {
    return ep.bias == nullptr && ep.preact == nullptr &&
           (ep.act <= kIdentity || ep.act >= kSoftmax) && ep.dsrc == nullptr &&
           ep.colsum == nullptr && ep.nonfinite == nullptr;
}

// f(ActTag<A>{}) for the activation code A in identity..gelu_erf, so that a loop can take
// the activation as a template parameter; false (f not called) for other codes.
template <int A>
struct ActTag {
    static constexpr int value = A;
};

template <typename F>
inline bool with_activation(int act, F&& f) {
    switch (act) {
        case kIdentity: f(ActTag<kIdentity>{}); return true;
        case kRelu: f(ActTag<kRelu>{}); return true;
        case kLeakyRelu: f(ActTag<kLeakyRelu>{}); return true;
        case kSigmoid: f(ActTag<kSigmoid>{}); return true;
        case kTanh: f(ActTag<kTanh>{}); return true;
        case kGelu: f(ActTag<kGelu>{}); return true;
        case kGeluErf: f(ActTag<kGeluErf>{}); return true;
        default: return false;
    }
}

// act(v) and act'(.) for one element, the activation a template parameter: the one
// place of these formulas for every epilogue form (and linear.cpp's backward pass).
template <int Act, typename T>
inline T act_value(T v, T a) {
    if constexpr (Act == kRelu) return v < T(0) ? T(0) : v;
    else if constexpr (Act == kLeakyRelu) return v > T(0) ? v : v * a;
    else if constexpr (Act == kSigmoid) return vsigmoid(v);
    else if constexpr (Act == kTanh) return vtanh(v);
    else if constexpr (Act == kGelu) return gelu_value(v);
    else if constexpr (Act == kGeluErf) return gelu_erf_value(v);
    else return v;
}

template <int DAct, typename T>
inline T dact_value(T d, T a) {
    if constexpr (DAct == kRelu) return d > T(0) ? T(1) : T(0);
    else if constexpr (DAct == kLeakyRelu) return d > T(0) ? T(1) : a;
    else if constexpr (DAct == kSigmoid) return d * (T(1) - d);
    else if constexpr (DAct == kTanh) return T(1) - d * d;
    else if constexpr (DAct == kGeluErf) return gelu_erf_derivative(d);
    else return gelu_derivative(d);
}

// Float rows of sigmoid, tanh and gelu use the activation kernels' own vector
// functions (vmath.hpp: vsigmoid_v/vtanh_v/vgelu_v on VecF, 16 lanes in the avx512
// unit, 8 in the avx2 unit), so a fused layer's output equals fp.ops.activation of its
// pre-activation bit for bit, and the row costs what the kernel's loop costs (GCC's
// vectorisation of the scalar forms was 1.3-1.4x slower for tanh and gelu).
template <int Act, typename T>
constexpr bool kVectorAct =
    std::is_same<T, float>::value && (Act == kSigmoid || Act == kTanh || Act == kGelu);

#if defined(FASTPROP_VECF)
template <int Act>
inline VF act_vector(VF v) {
    if constexpr (Act == kSigmoid) return vsigmoid_v(v);
    else if constexpr (Act == kTanh) return vtanh_v(v);
    else return vgelu_v(v);
}

// c[0:len] = act(c + b) (b may be null), z[0:len] = c + b first when z is not null.
// With k-masks (avx512) every vector is a masked one: one copy of the activation's
// code in the loop (two copies, plain and tail, made the tanh row 9% slower).  In the
// avx2 unit full vectors use plain loads and stores (AMD's vmaskmovps stores are
// slow) and only the tail is masked.
template <int Act>
inline void act_row_vector(float* c, const float* b, float* z, index_t len) {
    using O = VecF;
    if constexpr (O::kFreeMasks) {
        for (index_t j = 0; j < len; j += O::N) {
            const O::Tail m = O::tail(len - j);
            VF v = O::load(m, c + j);
            if (b != nullptr) v = O::add(v, O::load(m, b + j));
            if (z != nullptr) O::store(m, z + j, v);
            O::store(m, c + j, act_vector<Act>(v));
        }
        return;
    }
    index_t j = 0;
    for (; j + O::N <= len; j += O::N) {
        VF v = O::load(c + j);
        if (b != nullptr) v = O::add(v, O::load(b + j));
        if (z != nullptr) O::store(z + j, v);
        O::store(c + j, act_vector<Act>(v));
    }
    if (j < len) {
        const O::Tail m = O::tail(len - j);
        VF v = O::load(m, c + j);
        if (b != nullptr) v = O::add(v, O::load(m, b + j));
        if (z != nullptr) O::store(m, z + j, v);
        O::store(m, c + j, act_vector<Act>(v));
    }
}
#endif

// y[0:len] = act(y[0:len]) in place (identity and other codes: unchanged).
template <typename T>
inline void ep_activation(int act, T a, T* FASTPROP_RESTRICT y, index_t len) {
    if (act == kIdentity) return;
    with_activation(act, [&](auto tag) {
        constexpr int A = decltype(tag)::value;
#if defined(FASTPROP_VECF)
        if constexpr (kVectorAct<A, T>) {
            act_row_vector<A>(y, nullptr, nullptr, len);
            return;
        }
#endif
        for (index_t j = 0; j < len; ++j) y[j] = act_value<A>(y[j], a);
    });
}

// out[0:len] = g[0:len] * act'(d[0:len]) (d: forward output, or pre-activation for
// gelu); identity and other codes leave out unchanged.  Element-wise: out may alias
// g and/or d.
template <typename T>
inline void ep_derivative(int act, T a, const T* d, const T* g, T* out, index_t len) {
    if (act == kIdentity) return;
    with_activation(act, [&](auto tag) {
        constexpr int A = decltype(tag)::value;
#if defined(FASTPROP_VECF)
        if constexpr (A == kGelu && std::is_same<T, float>::value) {
            vgelu_grad_span(g, d, out, len);
            return;
        }
#endif
        if constexpr (A != kIdentity)
            for (index_t j = 0; j < len; ++j) out[j] = g[j] * dact_value<A>(d[j], a);
    });
}

// The two epilogues the dense layer uses, each one pass over a row segment with the
// value in a register: forward (bias, pre-activation copy, activation) and backward
// (derivative product, column sums).  The general row-by-row form below makes one
// short loop per step, and a value stored by one loop and loaded by the next with
// another vector width is not forwarded from the store buffer: bias + relu on a
// 16-column strip cost ~37 cycles per row that way (2048x10x128 float32: the
// epilogue 170 us over a 67 us GEMM).
template <int Act, typename T>
void epilogue_forward(const GemmEpilogue<T>& ep, index_t i0, index_t i1, index_t j0,
                      index_t len, T* c, index_t ldc) {
    const T a = T(ep.alpha);
    const T* FASTPROP_RESTRICT bj = ep.bias != nullptr ? ep.bias + j0 : nullptr;
#if defined(FASTPROP_VECF)
    if constexpr (kVectorAct<Act, T>) {
        for (index_t i = i0; i < i1; ++i)
            act_row_vector<Act>(c + i * ldc + j0, bj,
                                ep.preact != nullptr ? ep.preact + i * ep.ld_preact + j0 : nullptr,
                                len);
        return;
    }
#endif
    for (index_t i = i0; i < i1; ++i) {
        T* FASTPROP_RESTRICT ci = c + i * ldc + j0;
        if (ep.preact != nullptr) {
            T* FASTPROP_RESTRICT zi = ep.preact + i * ep.ld_preact + j0;
            if (ep.bias != nullptr) {
                for (index_t j = 0; j < len; ++j) {
                    const T v = ci[j] + bj[j];
                    zi[j] = v;
                    ci[j] = act_value<Act>(v, a);
                }
            } else {
                for (index_t j = 0; j < len; ++j) {
                    const T v = ci[j];
                    zi[j] = v;
                    ci[j] = act_value<Act>(v, a);
                }
            }
        } else if (ep.bias != nullptr) {
            for (index_t j = 0; j < len; ++j) ci[j] = act_value<Act>(ci[j] + bj[j], a);
        } else {
            for (index_t j = 0; j < len; ++j) ci[j] = act_value<Act>(ci[j], a);
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__)
#define FASTPROP_BACKWARD_COLS16 1
// 16 float columns of the backward epilogue in vector registers, for the derivatives
// that are a product by 1, 0 or alpha (identity: the column sums only; relu, leaky
// relu): the same products and the same additions in double, per column in row
// order, as the scalar form below, which GCC 12 compiled to scalar code with the sums
// on the stack (~4 ns an element: the 32 x 128 block of an MLP step's backward took
// 17 us in its epilogue after a 4 us product).  256-bit code in the avx512 unit too
// (the one form, tested wherever AVX2 runs).
template <int DAct>
constexpr bool kVectorBackward = DAct == kIdentity || DAct == kRelu || DAct == kLeakyRelu;

template <int DAct>
inline void backward_cols16_float(const GemmEpilogue<float>& ep, index_t i0, index_t i1,
                                  index_t j0, float* c, index_t ldc) {
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    const __m256 neg = DAct == kLeakyRelu ? _mm256_set1_ps(float(ep.dalpha)) : zero;
    auto product = [&](__m256 v, const float* d) {  // v * act'(d), as dact_value's
        if constexpr (DAct == kIdentity) {
            (void)d;
            return v;
        } else {  // (d > 0 false for NaN: the factor is then neg, as in dact_value)
            const __m256 gt = _mm256_cmp_ps(_mm256_loadu_ps(d), zero, _CMP_GT_OQ);
            return _mm256_mul_ps(v, _mm256_blendv_ps(neg, one, gt));
        }
    };
    double* sums = ep.colsum + j0;
    __m256d s0 = _mm256_loadu_pd(sums), s1 = _mm256_loadu_pd(sums + 4);
    __m256d s2 = _mm256_loadu_pd(sums + 8), s3 = _mm256_loadu_pd(sums + 12);
    for (index_t i = i0; i < i1; ++i) {
        float* ci = c + i * ldc + j0;
        const float* di = DAct == kIdentity ? nullptr : ep.dsrc + i * ep.ld_dsrc + j0;
        const __m256 v0 = product(_mm256_loadu_ps(ci), di);
        const __m256 v1 = product(_mm256_loadu_ps(ci + 8), DAct == kIdentity ? nullptr : di + 8);
        if constexpr (DAct != kIdentity) {
            _mm256_storeu_ps(ci, v0);
            _mm256_storeu_ps(ci + 8, v1);
        }
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(v0)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(v0, 1)));
        s2 = _mm256_add_pd(s2, _mm256_cvtps_pd(_mm256_castps256_ps128(v1)));
        s3 = _mm256_add_pd(s3, _mm256_cvtps_pd(_mm256_extractf128_ps(v1, 1)));
    }
    _mm256_storeu_pd(sums, s0);
    _mm256_storeu_pd(sums + 4, s1);
    _mm256_storeu_pd(sums + 8, s2);
    _mm256_storeu_pd(sums + 12, s3);
}
#endif

// Rows [i0, i1) of columns [j0, j0 + len) (len <= 16; W == len when W > 0, so the
// full-width instantiation has fixed trip counts): the column sums stay in
// registers across the rows (loaded from and stored to ep.colsum once) instead of a
// load-add-store chain through memory per row; the same additions in the same order.
template <int DAct, int W, typename T>
inline void epilogue_backward_cols(const GemmEpilogue<T>& ep, index_t i0, index_t i1,
                                   index_t j0, index_t len_rt, T* c, index_t ldc) {
#if defined(FASTPROP_BACKWARD_COLS16)
    if constexpr (W == 16 && std::is_same<T, float>::value && kVectorBackward<DAct>) {
        backward_cols16_float<DAct>(ep, i0, i1, j0, c, ldc);
        return;
    }
#endif
    const index_t len = W > 0 ? index_t(W) : len_rt;
    const T da = T(ep.dalpha);
    (void)da;  // unused for identity (column sums only)
    double acc[16];
    for (index_t j = 0; j < len; ++j) acc[j] = ep.colsum[j0 + j];
    for (index_t i = i0; i < i1; ++i) {
        T* FASTPROP_RESTRICT ci = c + i * ldc + j0;
        if constexpr (DAct == kIdentity) {
            for (index_t j = 0; j < len; ++j) acc[j] += double(ci[j]);
        } else {
            const T* FASTPROP_RESTRICT di = ep.dsrc + i * ep.ld_dsrc + j0;
#if defined(FASTPROP_VECF)
            if constexpr (DAct == kGelu && std::is_same<T, float>::value) {
                vgelu_grad_span(ci, di, ci, len);
                for (index_t j = 0; j < len; ++j) acc[j] += double(ci[j]);
                continue;
            }
#endif
            for (index_t j = 0; j < len; ++j) {
                const T v = ci[j] * dact_value<DAct>(di[j], da);
                ci[j] = v;
                acc[j] += double(v);
            }
        }
    }
    for (index_t j = 0; j < len; ++j) ep.colsum[j0 + j] = acc[j];
}

template <int DAct, typename T>
void epilogue_backward(const GemmEpilogue<T>& ep, index_t i0, index_t i1, index_t j0,
                       index_t len, T* c, index_t ldc) {
    if (ep.colsum != nullptr) {
        index_t j = 0;
        for (; j + 16 <= len; j += 16)
            epilogue_backward_cols<DAct, 16>(ep, i0, i1, j0 + j, 16, c, ldc);
        if (j < len) epilogue_backward_cols<DAct, 0>(ep, i0, i1, j0 + j, len - j, c, ldc);
        return;
    }
    for (index_t i = i0; i < i1; ++i)  // no sums: one derivative pass per row
        ep_derivative(DAct, T(ep.dalpha), ep.dsrc + i * ep.ld_dsrc + j0, c + i * ldc + j0,
                      c + i * ldc + j0, len);
}

// out[r, 0:w] = g[r, 0:w] * act'(d[r, 0:w]) for rows r < n (Act != identity) and, when
// acc != nullptr, acc[0:w] += the rows of out in increasing order (identity: the rows
// of g; out is not written).  One pass per row with the value in a register (a
// derivative loop followed by a sum loop reading it back stalls on store
// forwarding).  out may alias g or d.  Used by the backward epilogue over whole rows
// and by linear.cpp's layer backward.
template <int Act, typename T>
inline void backward_rows(index_t n, index_t w, const T* g, index_t ldg, const T* d,
                          index_t ldd, T a, T* out, index_t ldo, double* FASTPROP_RESTRICT acc) {
    (void)a;  // unused for identity
    for (index_t r = 0; r < n; ++r) {
        const T* gr = g + r * ldg;
        if constexpr (Act == kIdentity) {
            if (acc != nullptr)
                for (index_t j = 0; j < w; ++j) acc[j] += double(gr[j]);
        } else {
            const T* dr = d + r * ldd;
            T* o = out + r * ldo;
#if defined(FASTPROP_VECF)
            if constexpr (Act == kGelu && std::is_same<T, float>::value) {
                vgelu_grad_span(gr, dr, o, w);
                if (acc != nullptr)
                    for (index_t j = 0; j < w; ++j) acc[j] += double(o[j]);
                continue;
            }
#endif
            if (acc != nullptr) {
                for (index_t j = 0; j < w; ++j) {
                    const T v = gr[j] * dact_value<Act>(dr[j], a);
                    o[j] = v;
                    acc[j] += double(v);
                }
            } else {
                for (index_t j = 0; j < w; ++j) o[j] = gr[j] * dact_value<Act>(dr[j], a);
            }
        }
    }
}

// The backward form over whole rows, the sums in ep.colsum (the same additions in the
// same order as epilogue_backward_cols).  For the macro-kernel's by-rows form
// (macro_kernel.hpp).
template <int DAct, typename T>
void epilogue_backward_by_rows(const GemmEpilogue<T>& ep, index_t i0, index_t i1,
                               index_t j0, index_t len, T* c, index_t ldc) {
    T* ci = c + i0 * ldc + j0;
    const T* di = DAct == kIdentity ? nullptr : ep.dsrc + i0 * ep.ld_dsrc + j0;
    backward_rows<DAct>(i1 - i0, len, ci, ldc, di, ep.ld_dsrc, T(ep.dalpha), ci, ldc,
                        ep.colsum != nullptr ? ep.colsum + j0 : nullptr);
}

// True when the epilogue reads a second (m, n) array or sums columns (the backward
// forms): the ones the macro-kernel may run over whole rows.
template <typename T>
inline bool epilogue_reads_rows(const GemmEpilogue<T>& ep) {
    return ep.dsrc != nullptr || ep.colsum != nullptr;
}

// True when the epilogue is bias and/or relu (or identity) and nothing else: the
// TileEpilogue a micro-kernel applies in registers (gemm_config.hpp).
template <typename T>
inline bool tile_epilogue_fits(const GemmEpilogue<T>& ep) {
    return ep.preact == nullptr && ep.nonfinite == nullptr && !epilogue_reads_rows(ep) &&
           (ep.act <= kRelu || ep.act >= kSoftmax);
}

// The single-pass forms when the epilogue is one of them; false otherwise.
template <typename T>
bool apply_epilogue_fast(const GemmEpilogue<T>& ep, int act, int dact, index_t i0,
                         index_t i1, index_t j0, index_t len, T* c, index_t ldc, bool by_rows) {
    if (ep.nonfinite != nullptr) return false;
    if (dact == kIdentity && ep.dsrc == nullptr && ep.colsum == nullptr) {
        return with_activation(act, [&](auto tag) {
            epilogue_forward<decltype(tag)::value>(ep, i0, i1, j0, len, c, ldc);
        });
    }
    if (act == kIdentity && ep.bias == nullptr && ep.preact == nullptr &&
        (dact != kIdentity || ep.colsum != nullptr)) {
        return with_activation(dact, [&](auto tag) {
            if (by_rows)
                epilogue_backward_by_rows<decltype(tag)::value>(ep, i0, i1, j0, len, c, ldc);
            else
                epilogue_backward<decltype(tag)::value>(ep, i0, i1, j0, len, c, ldc);
        });
    }
    return false;
}

// by_rows: the range is whole rows of a block; the backward form then runs row by
// row (epilogue_backward_by_rows) instead of in 16-column groups.
template <typename T>
void apply_epilogue(const GemmEpilogue<T>& ep, index_t i0, index_t i1, index_t j0, index_t j1,
                    T* c, index_t ldc, bool by_rows = false) {
    const index_t len = j1 - j0;
    if (len <= 0 || i1 <= i0) return;
    const T a = T(ep.alpha), da = T(ep.dalpha);
    const int act = ep.act > kIdentity && ep.act < kSoftmax ? ep.act : kIdentity;
    const int dact = ep.dsrc != nullptr && ep.dact > kIdentity && ep.dact < kSoftmax
                         ? ep.dact : kIdentity;
    if (apply_epilogue_fast(ep, act, dact, i0, i1, j0, len, c, ldc, by_rows)) return;
    int bad = 0;
    T lanes[16];
    for (int l = 0; l < 16; ++l) lanes[l] = T(0);
    for (index_t i = i0; i < i1; ++i) {
        T* FASTPROP_RESTRICT ci = c + i * ldc + j0;
        if (ep.bias != nullptr) {
            const T* FASTPROP_RESTRICT bj = ep.bias + j0;
            for (index_t j = 0; j < len; ++j) ci[j] += bj[j];
        }
        if (ep.preact != nullptr) {
            T* FASTPROP_RESTRICT zi = ep.preact + i * ep.ld_preact + j0;
            for (index_t j = 0; j < len; ++j) zi[j] = ci[j];
        }
        if (act != kIdentity) ep_activation(act, a, ci, len);
        if (dact != kIdentity) ep_derivative(dact, da, ep.dsrc + i * ep.ld_dsrc + j0, ci, ci, len);
        if (ep.colsum != nullptr) {
            double* FASTPROP_RESTRICT s = ep.colsum + j0;
            for (index_t j = 0; j < len; ++j) s[j] += double(ci[j]);
        }
        if (ep.nonfinite != nullptr) {
            // x - x is 0 for finite x, NaN for NaN and +-inf: summed into 16 lanes that
            // live across the rows of the block, so the check vectorises (an int |= of
            // compares per row did not)
            index_t j = 0;
            for (; j + 16 <= len; j += 16)
                for (int l = 0; l < 16; ++l) lanes[l] += ci[j + l] - ci[j + l];
            for (int l = 0; j < len; ++j, ++l) lanes[l] += ci[j] - ci[j];
        }
    }
    if (ep.nonfinite != nullptr) {
        T total = T(0);
        for (int l = 0; l < 16; ++l) total += lanes[l];
        bad = !(total == T(0));
    }
    if (bad) {
#if defined(__GNUC__) || defined(__clang__)
        __atomic_store_n(ep.nonfinite, 1, __ATOMIC_RELAXED);
#else
        *ep.nonfinite = 1;
#endif
    }
}

}  // namespace
}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
