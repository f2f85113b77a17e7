// gemm/pack.hpp - packing of GEMM operands into micro-panels (per ISA unit).
//
// pack_a: op(A)[0:mc, 0:kc] -> MR-row panels.  Panel r holds op(A)[r*MR + i, p] at
//   ap[r*MR*kc + p*MR + i] (the micro-kernel's A with rs_a = 1, cs_a = MR); rows of
//   a last, partial panel past mc are left unwritten (the edge micro-kernel reads
//   only its m rows).
// pack_b: op(B)[0:kc, 0:nc] -> NR-column panels.  Panel s holds op(B)[p, s*NR + j] at
//   bp[s*NR*kc + p*NR + j]; columns past nc are zero (the micro-kernel reads NR).
// Both absorb the transposes and the leading dimensions, so the macro-kernel sees
// one layout whatever the operand layout (NN, NT, TN, TT).  `a`/`b` point at
// op(X)[0, 0]; `trans` says the operand is stored transposed.
// Cost: one read and one write of each element per (pc, ic) or (jc, pc) block.
// The transposed B (an NT product: grad_x = grad_z @ w^T packs w on every call) is
// a gather of NR rows; in the AVX2 units whole panels go through 8 x 8 (float) or
// 4 x 4 (double) register transposes (pack_b_trans_avx2) instead of NR scalar
// loads and stores per p.  The pack stays bound by reading b from L2/L3: float32 NT
// 32x784x256, 1 thread, its share of the time 16% -> 13% (11% once each panel is
// packed right before use, gemm.cpp), the whole product 138 -> 129 us.
// A row-major op(A) (NN, NT: the forward's activations, grad_z) is packed the same
// way when MR is 6 (the avx2 unit; the avx512 unit's float32 MR = 8 keeps the element
// loop), 6 rows x 8 (float) / 4 (double) values per register transpose
// (pack_a_rows6_avx2), and a transposed one (TN: the weight gradient's x^T) a row
// segment at a time: its share of float32 200x256x128, 1 thread (perf samples),
// 6.5% -> 4.9% (NN) and 8.9% -> 5.2% (TN).
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <cstring>

#include "isa_common.hpp"

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

#if defined(__AVX2__)
// dst[p*NR + j] = src[j*ldb + p] for j < NR (NR a multiple of 8) and p < kc: NR rows
// of b read 8 values at a time, transposed in registers (unpack, shuffle, lane
// permute), 8 rows of dst written per block; the last kc % 8 values per row scalar.
template <int NR>
inline void pack_b_trans_avx2(index_t kc, const float* FASTPROP_RESTRICT src, index_t ldb,
                              float* FASTPROP_RESTRICT dst) {
    static_assert(NR % 8 == 0, "NR must be a multiple of 8");
    index_t p = 0;
    for (; p + 8 <= kc; p += 8) {
        for (int j0 = 0; j0 < NR; j0 += 8) {
            const float* s = src + j0 * ldb + p;
            const __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + ldb);
            const __m256 r2 = _mm256_loadu_ps(s + 2 * ldb), r3 = _mm256_loadu_ps(s + 3 * ldb);
            const __m256 r4 = _mm256_loadu_ps(s + 4 * ldb), r5 = _mm256_loadu_ps(s + 5 * ldb);
            const __m256 r6 = _mm256_loadu_ps(s + 6 * ldb), r7 = _mm256_loadu_ps(s + 7 * ldb);
            const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
            const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
            const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
            const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
            // u0 = rows 0-3 at p+0 (and p+4 in the high lane), u1 at p+1, ...
            const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
            const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            float* d = dst + p * NR + j0;
            _mm256_storeu_ps(d + 0 * NR, _mm256_permute2f128_ps(u0, u4, 0x20));
            _mm256_storeu_ps(d + 1 * NR, _mm256_permute2f128_ps(u1, u5, 0x20));
            _mm256_storeu_ps(d + 2 * NR, _mm256_permute2f128_ps(u2, u6, 0x20));
            _mm256_storeu_ps(d + 3 * NR, _mm256_permute2f128_ps(u3, u7, 0x20));
            _mm256_storeu_ps(d + 4 * NR, _mm256_permute2f128_ps(u0, u4, 0x31));
            _mm256_storeu_ps(d + 5 * NR, _mm256_permute2f128_ps(u1, u5, 0x31));
            _mm256_storeu_ps(d + 6 * NR, _mm256_permute2f128_ps(u2, u6, 0x31));
            _mm256_storeu_ps(d + 7 * NR, _mm256_permute2f128_ps(u3, u7, 0x31));
        }
    }
    for (; p < kc; ++p)
        for (int j = 0; j < NR; ++j) dst[p * NR + j] = src[j * ldb + p];
}

// The float64 form: NR a multiple of 4, 4 x 4 blocks (unpack, lane permute).
template <int NR>
inline void pack_b_trans_avx2(index_t kc, const double* FASTPROP_RESTRICT src, index_t ldb,
                              double* FASTPROP_RESTRICT dst) {
    static_assert(NR % 4 == 0, "NR must be a multiple of 4");
    index_t p = 0;
    for (; p + 4 <= kc; p += 4) {
        for (int j0 = 0; j0 < NR; j0 += 4) {
            const double* s = src + j0 * ldb + p;
            const __m256d r0 = _mm256_loadu_pd(s), r1 = _mm256_loadu_pd(s + ldb);
            const __m256d r2 = _mm256_loadu_pd(s + 2 * ldb), r3 = _mm256_loadu_pd(s + 3 * ldb);
            const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
            const __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
            double* d = dst + p * NR + j0;
            _mm256_storeu_pd(d + 0 * NR, _mm256_permute2f128_pd(t0, t2, 0x20));
            _mm256_storeu_pd(d + 1 * NR, _mm256_permute2f128_pd(t1, t3, 0x20));
            _mm256_storeu_pd(d + 2 * NR, _mm256_permute2f128_pd(t0, t2, 0x31));
            _mm256_storeu_pd(d + 3 * NR, _mm256_permute2f128_pd(t1, t3, 0x31));
        }
    }
    for (; p < kc; ++p)
        for (int j = 0; j < NR; ++j) dst[p * NR + j] = src[j * ldb + p];
}

// t = the pairwise interleaves of 6 rows of vectors at s (rows lda apart):
// unpacklo/unpackhi of rows (0, 1), (2, 3), (4, 5).
inline void interleave_rows6(const float* s, index_t lda, __m256 (&t)[6]) {
    for (int i = 0; i < 3; ++i) {
        const __m256 x = _mm256_loadu_ps(s + 2 * i * lda);
        const __m256 y = _mm256_loadu_ps(s + (2 * i + 1) * lda);
        t[2 * i] = _mm256_unpacklo_ps(x, y), t[2 * i + 1] = _mm256_unpackhi_ps(x, y);
    }
}
inline void interleave_rows6(const double* s, index_t lda, __m256d (&t)[6]) {
    for (int i = 0; i < 3; ++i) {
        const __m256d x = _mm256_loadu_pd(s + 2 * i * lda);
        const __m256d y = _mm256_loadu_pd(s + (2 * i + 1) * lda);
        t[2 * i] = _mm256_unpacklo_pd(x, y), t[2 * i + 1] = _mm256_unpackhi_pd(x, y);
    }
}

// One 6-row panel of a row-major A: dst[p*6 + i] = src[i*lda + p] for i < 6 and p
// below the returned count (kc rounded down to 8 floats / 4 doubles; pack_a copies the
// rest one by one).  The values of each row are read a vector at a time and
// transposed in registers, as pack_b_trans_avx2 does for B; each p's 6 values are
// stored as a 4-value and a 2-value piece (no store past the panel).  The same values
// in the same places as the scalar loop: packing only moves them.
inline index_t pack_a_rows6_avx2(index_t kc, const float* FASTPROP_RESTRICT src, index_t lda,
                                 float* FASTPROP_RESTRICT dst) {
    index_t p = 0;
    for (; p + 8 <= kc; p += 8) {
        __m256 t[6];
        interleave_rows6(src + p, lda, t);
        // rows 0-3 at p+q (q < 4) in the low lane of u[q], at p+4+q in its high lane
        const __m256 u[4] = {
            _mm256_shuffle_ps(t[0], t[2], 0x44), _mm256_shuffle_ps(t[0], t[2], 0xEE),
            _mm256_shuffle_ps(t[1], t[3], 0x44), _mm256_shuffle_ps(t[1], t[3], 0xEE)};
        // rows 4-5: p, p+1 in w[0] (t[4]'s low lane), p+2, p+3 in w[1], p+4.. in w[2], w[3]
        const __m128 w[4] = {_mm256_castps256_ps128(t[4]), _mm256_castps256_ps128(t[5]),
                             _mm256_extractf128_ps(t[4], 1), _mm256_extractf128_ps(t[5], 1)};
        float* d = dst + p * 6;
        for (int q = 0; q < 4; ++q) {
            _mm_storeu_ps(d + q * 6, _mm256_castps256_ps128(u[q]));
            _mm_storeu_ps(d + (q + 4) * 6, _mm256_extractf128_ps(u[q], 1));
        }
        for (int h = 0; h < 2; ++h) {  // w[2h], w[2h+1]: p+4h+{0,1}, p+4h+{2,3}
            _mm_storel_pi(reinterpret_cast<__m64*>(d + (4 * h + 0) * 6 + 4), w[2 * h]);
            _mm_storeh_pi(reinterpret_cast<__m64*>(d + (4 * h + 1) * 6 + 4), w[2 * h]);
            _mm_storel_pi(reinterpret_cast<__m64*>(d + (4 * h + 2) * 6 + 4), w[2 * h + 1]);
            _mm_storeh_pi(reinterpret_cast<__m64*>(d + (4 * h + 3) * 6 + 4), w[2 * h + 1]);
        }
    }
    return p;
}

inline index_t pack_a_rows6_avx2(index_t kc, const double* FASTPROP_RESTRICT src, index_t lda,
                                 double* FASTPROP_RESTRICT dst) {
    index_t p = 0;
    for (; p + 4 <= kc; p += 4) {
        __m256d t[6];
        interleave_rows6(src + p, lda, t);  // rows 4-5: p, p+2 in t[4]; p+1, p+3 in t[5]
        double* d = dst + p * 6;
        for (int q = 0; q < 2; ++q) {  // p+q and p+2+q: rows 0-3 from t[q], t[2+q]
            _mm256_storeu_pd(d + q * 6, _mm256_permute2f128_pd(t[q], t[2 + q], 0x20));
            _mm_storeu_pd(d + q * 6 + 4, _mm256_castpd256_pd128(t[4 + q]));
            _mm256_storeu_pd(d + (q + 2) * 6, _mm256_permute2f128_pd(t[q], t[2 + q], 0x31));
            _mm_storeu_pd(d + (q + 2) * 6 + 4, _mm256_extractf128_pd(t[4 + q], 1));
        }
    }
    return p;
}
#endif

template <typename T, int MR>
void pack_a(bool trans, index_t mc, index_t kc, const T* FASTPROP_RESTRICT a, index_t lda,
            T* FASTPROP_RESTRICT ap) {
    const index_t full = mc / MR;  // whole panels
    if (trans) {
        // op(A)[i, p] = a[p*lda + i]: each p's row segment a[p*lda + 0:mc] is read once,
        // front to back, and dealt to the panels MR values at a time (fixed-size
        // copies; panel by panel, the loads strode lda per p and waited on L2)
        for (index_t p = 0; p < kc; ++p) {
            const T* src = a + p * lda;
            T* dst = ap + p * MR;
            for (index_t r = 0; r < full; ++r)
                std::memcpy(dst + r * MR * kc, src + r * MR, sizeof(T) * MR);
        }
    } else {
        for (index_t r = 0; r < full; ++r) {  // op(A)[i, p] = a[i*lda + p]: MR rows side by side
            const T* src = a + r * MR * lda;
            T* dst = ap + r * MR * kc;
            index_t p = 0;
#if defined(__AVX2__)
            if constexpr (MR == 6) p = pack_a_rows6_avx2(kc, src, lda, dst);
#endif
            for (; p < kc; ++p)
                for (int i = 0; i < MR; ++i) dst[p * MR + i] = src[i * lda + p];
        }
    }
    const index_t i0 = full * MR;
    if (i0 < mc) {
        const index_t mr = mc - i0;
        ap += full * MR * kc;
        for (index_t p = 0; p < kc; ++p)
            for (index_t i = 0; i < mr; ++i)
                ap[p * MR + i] = trans ? a[p * lda + i0 + i] : a[(i0 + i) * lda + p];
    }
}

// Panels [s0, s1) of the NR-column panels of op(B)[0:kc, 0:nc].
template <typename T, int NR>
void pack_b(bool trans, index_t kc, index_t nc, const T* FASTPROP_RESTRICT b, index_t ldb,
            T* FASTPROP_RESTRICT bp, index_t s0, index_t s1) {
    for (index_t s = s0; s < s1; ++s) {
        const index_t j0 = s * NR;
        const index_t nr = fp_min<index_t>(NR, nc - j0);
        T* dst = bp + s * NR * kc;
        if (trans) {  // op(B)[p, j] = b[j*ldb + p]
            if (nr == NR) {
                const T* src = b + j0 * ldb;
#if defined(__AVX2__)
                pack_b_trans_avx2<NR>(kc, src, ldb, dst);
                continue;
#endif
                for (index_t p = 0; p < kc; ++p)
                    for (int j = 0; j < NR; ++j) dst[p * NR + j] = src[j * ldb + p];
            } else {
                for (index_t p = 0; p < kc; ++p) {
                    index_t j = 0;
                    for (; j < nr; ++j) dst[p * NR + j] = b[(j0 + j) * ldb + p];
                    for (; j < NR; ++j) dst[p * NR + j] = T(0);
                }
            }
        } else {  // op(B)[p, j] = b[p*ldb + j]: rows contiguous in j
            if (nr == NR) {
                for (index_t p = 0; p < kc; ++p) {
                    const T* src = b + p * ldb + j0;
                    for (int j = 0; j < NR; ++j) dst[p * NR + j] = src[j];
                }
            } else {
                for (index_t p = 0; p < kc; ++p) {
                    const T* src = b + p * ldb + j0;
                    index_t j = 0;
                    for (; j < nr; ++j) dst[p * NR + j] = src[j];
                    for (; j < NR; ++j) dst[p * NR + j] = T(0);
                }
            }
        }
    }
}

}  // namespace
}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
