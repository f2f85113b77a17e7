// fastprop/gemm.hpp - general matrix multiply with an optional fused epilogue, the
// C++ API.
//
//   C = alpha * op(A) * op(B) + beta * C,   op(X) = X or X^T,
//
// row-major, op(A) is m x k, op(B) is k x n, C is m x n.  A is stored (m, k) with
// leading dimension lda, or (k, m) when trans_a; B is stored (k, n), or (n, k) when
// trans_b; C is (m, n) with leading dimension ldc (row i starts at c + i*ldc).
// beta == 0 means C is not read (it may hold NaN).  k == 0 gives C = beta * C.
// C must not overlap A or B.  Threads: OpenMP, omp_get_max_threads() above a size
// threshold.  Results are bit-identical for any thread count.  Accuracy: each
// element is a sum of k products accumulated in T (one FMA chain per KC block in
// the SIMD units).
//
// gemm_ex additionally applies a GemmEpilogue to every element of C after the full
// k-sum, while the tile is in cache (see the struct).  gemm() == gemm_ex() with an
// empty epilogue.
#pragma once

#include "fastprop/common.hpp"

namespace fastprop {

template <typename T>
struct GemmEpilogue {
    // Applied to each element of C after the full k-sum (C = alpha*op(A)op(B) + beta*C),
    // while the tile is in registers/cache, in this order:
    const T* bias = nullptr;                    // 1. C[i][j] += bias[j]               (forward)
    T* preact = nullptr; index_t ld_preact = 0;  // 2. preact[i][j] = C[i][j]  (forward, gelu keeps z)
    int act = 0; double alpha = 0.01;           // 3. C = act(C) for act codes 0..6 (identity, relu,
                                                //    leaky_relu, sigmoid, tanh, gelu-tanh, gelu-erf);
                                                //    softmax (7) is NOT an epilogue (ignored here)
    const T* dsrc = nullptr; index_t ld_dsrc = 0; int dact = 0; double dalpha = 0.01;
                                                // 4. backward: C[i][j] *= act'(dsrc[i][j]) where dsrc
                                                //    is the forward output y for relu/leaky_relu/
                                                //    sigmoid/tanh and the pre-activation z for gelu
                                                //    (same formulas as activation_backward)
    double* colsum = nullptr;                   // 5. colsum[j] += sum_i C[i][j] (bias gradient),
                                                //    deterministic (same result for any thread
                                                //    count), accumulated in double, rows in order
    int* nonfinite = nullptr;                   // 6. if any C element is NaN/Inf: *nonfinite = 1
                                                //    (never cleared)
};

void gemm(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, float alpha,
          const float* a, index_t lda, const float* b, index_t ldb, float beta, float* c,
          index_t ldc) noexcept;
void gemm(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, double alpha,
          const double* a, index_t lda, const double* b, index_t ldb, double beta,
          double* c, index_t ldc) noexcept;

void gemm_ex(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, float alpha,
             const float* a, index_t lda, const float* b, index_t ldb, float beta,
             float* c, index_t ldc, const GemmEpilogue<float>& ep) noexcept;
void gemm_ex(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, double alpha,
             const double* a, index_t lda, const double* b, index_t ldb, double beta,
             double* c, index_t ldc, const GemmEpilogue<double>& ep) noexcept;

}  // namespace fastprop
