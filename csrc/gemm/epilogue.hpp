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
// activation_forward/activation_backward to the last bit when the compiler emits
// the same instructions for both (tested to a few ulp).
#pragma once

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

// y[0:len] = act(y[0:len]) in place.
template <typename T>
inline void ep_activation(int act, T a, T* FASTPROP_RESTRICT y, index_t len) {
    switch (act) {
        case kRelu:
            for (index_t j = 0; j < len; ++j) y[j] = y[j] < T(0) ? T(0) : y[j];
            break;
        case kLeakyRelu:
            for (index_t j = 0; j < len; ++j) y[j] = y[j] > T(0) ? y[j] : y[j] * a;
            break;
        case kSigmoid:
            for (index_t j = 0; j < len; ++j) y[j] = vsigmoid(y[j]);
            break;
        case kTanh:
            for (index_t j = 0; j < len; ++j) y[j] = vtanh(y[j]);
            break;
        case kGelu:
            for (index_t j = 0; j < len; ++j) y[j] = gelu_value(y[j]);
            break;
        default:
            break;
    }
}

// out[0:len] = g[0:len] * act'(d[0:len]) (d: forward output, or pre-activation for
// gelu).  Element-wise: out may alias g and/or d.
template <typename T>
inline void ep_derivative(int act, T a, const T* d, const T* g, T* out, index_t len) {
    switch (act) {
        case kRelu:
            for (index_t j = 0; j < len; ++j) out[j] = g[j] * (d[j] > T(0) ? T(1) : T(0));
            break;
        case kLeakyRelu:
            for (index_t j = 0; j < len; ++j) out[j] = g[j] * (d[j] > T(0) ? T(1) : a);
            break;
        case kSigmoid:
            for (index_t j = 0; j < len; ++j) out[j] = g[j] * (d[j] * (T(1) - d[j]));
            break;
        case kTanh:
            for (index_t j = 0; j < len; ++j) out[j] = g[j] * (T(1) - d[j] * d[j]);
            break;
        case kGelu:
            for (index_t j = 0; j < len; ++j) out[j] = g[j] * gelu_derivative(d[j]);
            break;
        default:
            break;
    }
}

template <typename T>
void apply_epilogue(const GemmEpilogue<T>& ep, index_t i0, index_t i1, index_t j0, index_t j1,
                    T* c, index_t ldc) {
    const index_t len = j1 - j0;
    if (len <= 0 || i1 <= i0) return;
    const T a = T(ep.alpha), da = T(ep.dalpha);
    const int act = ep.act > kIdentity && ep.act < kSoftmax ? ep.act : kIdentity;
    const int dact = ep.dsrc != nullptr && ep.dact > kIdentity && ep.dact < kSoftmax
                         ? ep.dact : kIdentity;
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
