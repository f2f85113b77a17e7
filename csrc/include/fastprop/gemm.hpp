// fastprop/gemm.hpp - general matrix multiply, the C++ API.
//
//   C = alpha * op(A) * op(B) + beta * C,   op(X) = X or X^T,
//
// row-major, op(A) is m x k, op(B) is k x n, C is m x n.  A is stored (m, k) with
// leading dimension lda, or (k, m) when trans_a; B is stored (k, n), or (n, k) when
// trans_b; C is (m, n) with leading dimension ldc (row i starts at c + i*ldc).
// beta == 0 means C is not read (it may hold NaN).  k == 0 gives C = beta * C.
// C must not overlap A or B.  Threads: OpenMP, omp_get_max_threads() above a size
// threshold.  Accuracy: each element is a sum of k products accumulated in T.
#pragma once

#include "fastprop/common.hpp"

namespace fastprop {

void gemm(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, float alpha,
          const float* a, index_t lda, const float* b, index_t ldb, float beta, float* c,
          index_t ldc) noexcept;
void gemm(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, double alpha,
          const double* a, index_t lda, const double* b, index_t ldb, double beta,
          double* c, index_t ldc) noexcept;

}  // namespace fastprop
