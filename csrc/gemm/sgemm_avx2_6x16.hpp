// gemm/sgemm_avx2_6x16.hpp - the float32 AVX2+FMA micro-kernel, 6 x 16 (avx2 unit;
// 8 x 16 in the avx512 unit, whose AVX-512VL has 32 ymm registers: gemm_config.hpp).
//
// Contract (the BLIS micro-kernel, with strides so that the same kernel also runs
// on unpacked operands):
//   C[i, j] := alpha * sum_{p<k} A(i, p) B(p, j) + beta * C[i, j]
//   for i < M (M <= MR rows, a template parameter) and j < nr (1 <= nr <= 16), where
//   A(i, p) = a[i*rs_a + p*cs_a]  (packed A: rs_a = 1, cs_a = MR, PackedA = true),
//   B(p, j) = b[p*rs_b + j]       (16 readable values per row p, also past nr:
//                                  packed or zero-padded B),
//   C[i, j] = c[i*rs_c + j].      beta == 0: C is not read (it may hold NaN).
// Algorithm: 2*M ymm accumulators (6 x 16 -> 12 of the 16 registers); per k step two
// 8-wide loads of B, M broadcasts of A, 2*M FMAs; k loop unrolled 4x.  Columns past
// nr are computed and dropped (masked stores); rows past M are never touched.
// Accuracy: each C element is one FMA chain over p in increasing order (one rounding
// per step), then alpha and beta are applied (alpha == 1 exactly skips the product).
// Speed (2-core Zen4 dev box, 1 thread, float32 NN): ~96-101 GFLOP/s at n = 256..1024
// (about the 2 x 256-bit FMA peak; NumPy/OpenBLAS's AVX-512 kernel 93-98 in the same runs).
#pragma once

#include <immintrin.h>

#include "gemm/gemm_config.hpp"
#include "isa_common.hpp"

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

// Lanes j with j < rem (rem may be <= 0 or >= 8).
inline __m256i sgemm_avx2_lane_mask(index_t rem) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int r = rem < 0 ? 0 : (rem > 8 ? 8 : static_cast<int>(rem));
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(r), idx);
}

template <int M, int NV, bool PackedA, bool Tile = false>
inline void sgemm_avx2_6x16(index_t k, const float* FASTPROP_RESTRICT a, index_t rs_a,
                            index_t cs_a, const float* FASTPROP_RESTRICT b, index_t rs_b,
                            float* FASTPROP_RESTRICT c, index_t rs_c, index_t nr, float alpha,
                            float beta, const TileEpilogue<float>* tep = nullptr) {
    constexpr int MR = GemmBlocks<float>::MR;
    static_assert(M >= 1 && M <= MR && (NV == 1 || NV == 2), "tile is at most MR x 16");
    if (PackedA) rs_a = 1, cs_a = MR;
    __m256 acc[M][NV];
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_ps();
        _mm_prefetch(reinterpret_cast<const char*>(c + i * rs_c), _MM_HINT_T0);
    }
#pragma GCC unroll 1
    for (index_t p = 0; p < k; ++p) {
        __m256 bv[NV];
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(b + v * 8);
#pragma GCC unroll 8
        for (int i = 0; i < M; ++i) {
            const __m256 av = _mm256_broadcast_ss(a + i * rs_a);
#pragma GCC unroll 2
            for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(av, bv[v], acc[i][v]);
        }
        a += cs_a;
        b += rs_b;
    }
    const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
    const bool scale = alpha != 1.0f, read_c = beta != 0.0f;
    // Three written-out store loops (full, EVEX-masked, VEX-masked) on purpose: one
    // loop taking the load/store as lambdas that captured acc by reference (724d4e0)
    // made GCC keep the accumulators in memory, and every FMA above went through the
    // stack (512^3 on 2 threads: 205 -> 86 GFLOP/s, results still exact).  Check the
    // GFLOP/s (benchmarks/bench_gemm.py) after any change to this function.
    if (nr == NV * 8) {
        // tep (full tiles only): bias and relu applied in registers, the same
        // operations in the same order as the epilogue pass (gemm/epilogue.hpp);
        // max(0, r) keeps NaN and -0 as relu's r < 0 ? 0 : r does.
        const __m256 zero = _mm256_setzero_ps();
        const bool add_bias = Tile && tep->bias != nullptr;
        const bool relu = Tile && tep->relu;
        __m256 bias[NV];
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) bias[v] = add_bias ? _mm256_loadu_ps(tep->bias + v * 8) : zero;
#pragma GCC unroll 8
        for (int i = 0; i < M; ++i) {
#pragma GCC unroll 2
            for (int v = 0; v < NV; ++v) {
                float* cp = c + i * rs_c + v * 8;
                __m256 r = scale ? _mm256_mul_ps(va, acc[i][v]) : acc[i][v];
                if (read_c) r = _mm256_fmadd_ps(vb, _mm256_loadu_ps(cp), r);
                if (add_bias) r = _mm256_add_ps(r, bias[v]);
                if (relu) r = _mm256_max_ps(zero, r);
                _mm256_storeu_ps(cp, r);
            }
        }
        return;
    }
#if defined(__AVX512VL__)
    // EVEX masked moves: the VEX vmaskmovps reaches only ymm0-15, and the register
    // allocator would then keep the accumulators there and spill the 8-row tile.
    __mmask8 mask[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
        const index_t rem = nr - v * 8;
        mask[v] = static_cast<__mmask8>(rem <= 0 ? 0 : rem >= 8 ? 0xff : (1u << rem) - 1);
    }
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) {
            float* cp = c + i * rs_c + v * 8;
            __m256 r = scale ? _mm256_mul_ps(va, acc[i][v]) : acc[i][v];
            if (read_c) r = _mm256_fmadd_ps(vb, _mm256_maskz_loadu_ps(mask[v], cp), r);
            _mm256_mask_storeu_ps(cp, mask[v], r);
        }
    }
#else
    __m256i mask[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) mask[v] = sgemm_avx2_lane_mask(nr - v * 8);
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) {
            float* cp = c + i * rs_c + v * 8;
            __m256 r = scale ? _mm256_mul_ps(va, acc[i][v]) : acc[i][v];
            if (read_c) r = _mm256_fmadd_ps(vb, _mm256_maskload_ps(cp, mask[v]), r);
            _mm256_maskstore_ps(cp, mask[v], r);
        }
    }
#endif
}

}  // namespace
}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
