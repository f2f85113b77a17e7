// gemm/gemv.hpp - the m == 1 and n == 1 shapes of GEMM (matrix-vector products),
// included by gemm_blocked.cpp in each ISA unit (internal linkage).
//
// Computes c = alpha op(A) op(B) + beta c when op(A) has one row (a single-sample
// forward pass) or op(B) one column, without packing: packing would copy the
// whole matrix once to read it once.  Two loop forms, chosen by which operand has
// contiguous rows:
//   axpy form  c[0:len] += s_p * row_p[0:len] over p (rows contiguous in the
//              output index; accumulated in a contiguous buffer);
//   dot form   c_i = sum_p u_p v_p with both vectors contiguous, 16 partial sums.
// A strided vector operand is first gathered into thread-local scratch.
// Accuracy: sums of k products in T, as in the blocked GEMM (different order).
#pragma once

#include "isa_common.hpp"
#include "runtime.hpp"

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

// Dot product in T over 16 interleaved partial sums (vectorisable).
template <typename T>
inline T dot_lanes(const T* FASTPROP_RESTRICT x, const T* FASTPROP_RESTRICT y, index_t k) {
    constexpr int kLanes = 16;
    T acc[kLanes];
    for (int l = 0; l < kLanes; ++l) acc[l] = T(0);
    index_t p = 0;
    for (; p + kLanes <= k; p += kLanes)
        for (int l = 0; l < kLanes; ++l) acc[l] += x[p + l] * y[p + l];
    for (int l = 0; p < k; ++p, ++l) acc[l] += x[p] * y[p];
    for (int w = kLanes / 2; w > 0; w /= 2)
        for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
    return acc[0];
}

// out[0:len] = sum_p vec[p] * rows[p*ld + 0:len]  (out must not alias rows).
template <typename T>
inline void axpy_rows(index_t k, index_t len, const T* FASTPROP_RESTRICT vec,
                      const T* FASTPROP_RESTRICT rows, index_t ld, T* FASTPROP_RESTRICT out) {
    for (index_t j = 0; j < len; ++j) out[j] = T(0);
    for (index_t p = 0; p < k; ++p) {
        const T s = vec[p];
        const T* row = rows + p * ld;
        for (index_t j = 0; j < len; ++j) out[j] += s * row[j];
    }
}

// x[i*stride] for i < len as a contiguous array (scratch slot `slot` when strided).
template <typename T>
inline const T* contiguous(const T* x, index_t stride, index_t len, int slot) {
    if (stride == 1 || len <= 1) return x;
    T* buf = static_cast<T*>(detail::thread_scratch(slot, sizeof(T) * len));
    if (buf == nullptr) return nullptr;
    for (index_t i = 0; i < len; ++i) buf[i] = x[i * stride];
    return buf;
}

// c = alpha * dst-vector + beta * c (beta == 0: c not read), c strided.
template <typename T>
inline void store_scaled(index_t len, const T* v, T alpha, T beta, T* c, index_t stride) {
    if (beta == T(0)) {
        for (index_t i = 0; i < len; ++i) c[i * stride] = alpha * v[i];
    } else {
        for (index_t i = 0; i < len; ++i) c[i * stride] = alpha * v[i] + beta * c[i * stride];
    }
}

// Handles m == 1 or n == 1 (k >= 1); returns false if it did not (other shapes, or
// no scratch memory), leaving C untouched.
template <typename T>
bool gemv_shapes(bool ta, bool tb, index_t m, index_t n, index_t k, T alpha, const T* a,
                 index_t lda, const T* b, index_t ldb, T beta, T* c, index_t ldc) {
    if (m == 1) {
        // u = op(A)[0, :] (stride lda when transposed); c[0, :] has unit stride.
        const T* u = contiguous(a, ta ? lda : 1, k, 2);
        T* acc = static_cast<T*>(detail::thread_scratch(3, sizeof(T) * n));
        if (u == nullptr || acc == nullptr) return false;
        if (!tb) {
            axpy_rows(k, n, u, b, ldb, acc);  // op(B) rows are rows of b
        } else {
            for (index_t j = 0; j < n; ++j) acc[j] = dot_lanes(u, b + j * ldb, k);
        }
        store_scaled(n, acc, alpha, beta, c, 1);
        return true;
    }
    if (n == 1) {
        // v = op(B)[:, 0] (stride ldb unless transposed); c[:, 0] has stride ldc.
        const T* v = contiguous(b, tb ? 1 : ldb, k, 2);
        T* acc = static_cast<T*>(detail::thread_scratch(3, sizeof(T) * m));
        if (v == nullptr || acc == nullptr) return false;
        if (ta) {
            axpy_rows(k, m, v, a, lda, acc);  // op(A)^T rows are rows of a
        } else {
            for (index_t i = 0; i < m; ++i) acc[i] = dot_lanes(a + i * lda, v, k);
        }
        store_scaled(m, acc, alpha, beta, c, ldc);
        return true;
    }
    return false;
}

}  // namespace
}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
