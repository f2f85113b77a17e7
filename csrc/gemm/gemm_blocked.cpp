// gemm/gemm_blocked.cpp - cache-blocked GEMM, compiled once per ISA unit.
//
// Computes C = alpha * op(A) * op(B) + beta * C (row-major, leading dimensions; see
// include/fastprop/gemm.hpp for the contract).
//
// Algorithm (the BLIS/GotoBLAS loop nest, without intrinsics):
//   for jc over n in NC-wide blocks
//     for pc over k in KC-deep blocks           (B block: KC x NC, stays in L3)
//       pack op(B)[pc:, jc:] into NR-wide panels        (one panel: L1)
//       for ic over m in MC-tall blocks         (A block: MC x KC, stays in L2)
//         pack op(A)[ic:, pc:] into MR-tall panels
//         for each NR panel, for each MR panel: micro-kernel
// Packing absorbs the transposes and the leading dimensions, and zero-pads edge
// panels, so the micro-kernel always runs a full MR x NR tile over contiguous
// data: an MR x NR accumulator block, fully unrolled, which the compiler keeps in
// vector registers (SSE2 in the generic unit, AVX2+FMA in the avx2 unit); edges are
// handled at write-back.  One-row and one-column products skip packing
// (gemm/gemv.hpp).  Threads: the m x n output is split into a tm x tn grid of
// independent sub-problems (one per OpenMP thread, each packing its own panels into
// thread-local scratch) once the product has at least ~8 MFLOP per thread.
// A later revision replaces the micro-kernel with intrinsic kernels under gemm/.
//
// Accuracy: each element is a sum of k products accumulated in T in order of
// increasing k within KC blocks (FMA-contracted in the avx2 unit), so the error is
// the usual O(k eps) of a dot product.
// Speed (2-core AMD Zen4 dev box, shared and noisy; GFLOP/s, float32 NN, avx2 unit,
// vs NumPy/OpenBLAS): 1 thread n=256 ~97 (101), n=1024 ~92 (100); 2 threads n=256
// ~157 (164), n=1024 ~146 (186).  float64 1 thread n=1024 ~39 (50).  Small sizes
// lag (n=64: ~52 vs 91) because packing is not amortised.
#include "gemm/gemv.hpp"
#include "isa_common.hpp"
#include "kernels.hpp"
#include "runtime.hpp"

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

// Register tile MR x NR and cache blocks KC, MC, NC per dtype and ISA.  The tile
// uses 12 vector accumulators (6 rows x 2 vectors) of the unit's vector width.
template <typename T>
struct Blocking;
#if defined(__AVX2__)
template <>
struct Blocking<float> {
    static constexpr int MR = 6, NR = 16;
    static constexpr index_t KC = 256, MC = 120, NC = 3072;
};
template <>
struct Blocking<double> {
    static constexpr int MR = 6, NR = 8;
    static constexpr index_t KC = 256, MC = 96, NC = 2048;
};
#else
template <>
struct Blocking<float> {
    static constexpr int MR = 6, NR = 8;
    static constexpr index_t KC = 256, MC = 120, NC = 3072;
};
template <>
struct Blocking<double> {
    static constexpr int MR = 6, NR = 4;
    static constexpr index_t KC = 256, MC = 96, NC = 2048;
};
#endif

// Minimum flops per thread before GEMM uses another thread (~8.4 MFLOP, about
// 100 us of one core: enough to amortise waking the OpenMP team even on a busy
// machine).  Two threads from about 200 x 200 x 200.
constexpr index_t kGemmFlopGrain = index_t(1) << 23;

inline index_t round_up(index_t x, index_t to) { return (x + to - 1) / to * to; }

// Pack op(A)[0:mc, 0:kc] into MR-row panels: panel r holds element (r*MR + i, p)
// at ap[r*MR*kc + p*MR + i]; rows past mc are zero.  `a` points at op(A)[0, 0].
template <typename T, int MR>
void pack_a(bool trans, index_t mc, index_t kc, const T* FASTPROP_RESTRICT a, index_t lda,
            T* FASTPROP_RESTRICT ap) {
    for (index_t i0 = 0; i0 < mc; i0 += MR) {
        const index_t mr = fp_min<index_t>(MR, mc - i0);
        if (trans) {  // op(A)[i, p] = a[p*lda + i]: rows of a are contiguous in i
            for (index_t p = 0; p < kc; ++p) {
                const T* src = a + p * lda + i0;
                T* dst = ap + p * MR;
                index_t i = 0;
                for (; i < mr; ++i) dst[i] = src[i];
                for (; i < MR; ++i) dst[i] = T(0);
            }
        } else {  // op(A)[i, p] = a[i*lda + p]
            index_t i = 0;
            for (; i < mr; ++i) {
                const T* src = a + (i0 + i) * lda;
                for (index_t p = 0; p < kc; ++p) ap[p * MR + i] = src[p];
            }
            for (; i < MR; ++i)
                for (index_t p = 0; p < kc; ++p) ap[p * MR + i] = T(0);
        }
        ap += MR * kc;
    }
}

// Pack op(B)[0:kc, 0:nc] into NR-column panels: panel s holds element (p, s*NR + j)
// at bp[s*NR*kc + p*NR + j]; columns past nc are zero.  `b` points at op(B)[0, 0].
template <typename T, int NR>
void pack_b(bool trans, index_t kc, index_t nc, const T* FASTPROP_RESTRICT b, index_t ldb,
            T* FASTPROP_RESTRICT bp) {
    for (index_t j0 = 0; j0 < nc; j0 += NR) {
        const index_t nr = fp_min<index_t>(NR, nc - j0);
        if (trans) {  // op(B)[p, j] = b[j*ldb + p]
            index_t j = 0;
            for (; j < nr; ++j) {
                const T* src = b + (j0 + j) * ldb;
                for (index_t p = 0; p < kc; ++p) bp[p * NR + j] = src[p];
            }
            for (; j < NR; ++j)
                for (index_t p = 0; p < kc; ++p) bp[p * NR + j] = T(0);
        } else {  // op(B)[p, j] = b[p*ldb + j]: rows of b are contiguous in j
            for (index_t p = 0; p < kc; ++p) {
                const T* src = b + p * ldb + j0;
                T* dst = bp + p * NR;
                if (nr == NR) {
                    for (index_t j = 0; j < NR; ++j) dst[j] = src[j];
                } else {
                    index_t j = 0;
                    for (; j < nr; ++j) dst[j] = src[j];
                    for (; j < NR; ++j) dst[j] = T(0);
                }
            }
        }
        bp += NR * kc;
    }
}

// The accumulator block as an array of native vectors (GCC/Clang vector extensions:
// the compiler emits SSE2 or AVX2+FMA code from the same source); plain arrays for
// other compilers.
#if defined(__GNUC__) || defined(__clang__)
#if defined(__AVX__)
#define FASTPROP_VEC_BYTES 32
#else
#define FASTPROP_VEC_BYTES 16
#endif
typedef float vec_f32 __attribute__((vector_size(FASTPROP_VEC_BYTES)));
typedef double vec_f64 __attribute__((vector_size(FASTPROP_VEC_BYTES)));
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
    using type = vec_f32;
};
template <>
struct VecOf<double> {
    using type = vec_f64;
};

// acc[i][0:NR] = sum_p ap[p*MR + i] * bp[p*NR + 0:NR], stored into out[MR][NR].
template <typename T, int MR, int NR>
inline void tile_product(index_t kc, const T* FASTPROP_RESTRICT ap,
                         const T* FASTPROP_RESTRICT bp, T (&out)[MR][NR]) {
    using V = typename VecOf<T>::type;
    constexpr int VL = FASTPROP_VEC_BYTES / sizeof(T);
    constexpr int NV = NR / VL;
    static_assert(NR % VL == 0, "NR must be a multiple of the vector length");
    V acc[MR][NV];
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) acc[i][v] = V{};
    for (index_t p = 0; p < kc; ++p) {
        V bv[NV];
        for (int v = 0; v < NV; ++v) __builtin_memcpy(&bv[v], bp + p * NR + v * VL, sizeof(V));
        const T* a = ap + p * MR;
        for (int i = 0; i < MR; ++i) {
            const T ai = a[i];
            for (int v = 0; v < NV; ++v) acc[i][v] += ai * bv[v];
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) __builtin_memcpy(&out[i][v * VL], &acc[i][v], sizeof(V));
}
#else
template <typename T, int MR, int NR>
inline void tile_product(index_t kc, const T* FASTPROP_RESTRICT ap,
                         const T* FASTPROP_RESTRICT bp, T (&out)[MR][NR]) {
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) out[i][j] = T(0);
    for (index_t p = 0; p < kc; ++p)
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j) out[i][j] += ap[p * MR + i] * bp[p * NR + j];
}
#endif

// C[0:mr, 0:nr] = alpha * (Ap Bp) + beta * C over one packed MR x NR tile.
// beta == 0: C is not read.
template <typename T, int MR, int NR>
inline void micro_kernel(index_t kc, const T* FASTPROP_RESTRICT ap,
                         const T* FASTPROP_RESTRICT bp, T* FASTPROP_RESTRICT c, index_t ldc,
                         index_t mr, index_t nr, T alpha, T beta) {
    T acc[MR][NR];
    tile_product<T, MR, NR>(kc, ap, bp, acc);
    if (mr == MR && nr == NR) {
        if (beta == T(0)) {
            for (int i = 0; i < MR; ++i)
                for (int j = 0; j < NR; ++j) c[i * ldc + j] = alpha * acc[i][j];
        } else if (beta == T(1)) {
            for (int i = 0; i < MR; ++i)
                for (int j = 0; j < NR; ++j) c[i * ldc + j] += alpha * acc[i][j];
        } else {
            for (int i = 0; i < MR; ++i)
                for (int j = 0; j < NR; ++j)
                    c[i * ldc + j] = alpha * acc[i][j] + beta * c[i * ldc + j];
        }
        return;
    }
    for (index_t i = 0; i < mr; ++i) {
        T* ci = c + i * ldc;
        if (beta == T(0)) {
            for (index_t j = 0; j < nr; ++j) ci[j] = alpha * acc[i][j];
        } else {
            for (index_t j = 0; j < nr; ++j) ci[j] = alpha * acc[i][j] + beta * ci[j];
        }
    }
}

// C = beta * C over m x n (beta == 0 writes zeros without reading C).
template <typename T>
void scale_c(index_t m, index_t n, T beta, T* c, index_t ldc) {
    if (beta == T(1)) return;
    for (index_t i = 0; i < m; ++i) {
        T* ci = c + i * ldc;
        if (beta == T(0)) {
            for (index_t j = 0; j < n; ++j) ci[j] = T(0);
        } else {
            for (index_t j = 0; j < n; ++j) ci[j] *= beta;
        }
    }
}

// Unpacked fallback, used only if scratch memory cannot be allocated.
template <typename T>
void gemm_unpacked(bool ta, bool tb, index_t m, index_t n, index_t k, T alpha, const T* a,
                   index_t lda, const T* b, index_t ldb, T beta, T* c, index_t ldc) {
    for (index_t i = 0; i < m; ++i) {
        for (index_t j = 0; j < n; ++j) {
            T s = T(0);
            for (index_t p = 0; p < k; ++p)
                s += (ta ? a[p * lda + i] : a[i * lda + p]) * (tb ? b[j * ldb + p] : b[p * ldb + j]);
            T& cij = c[i * ldc + j];
            cij = beta == T(0) ? alpha * s : alpha * s + beta * cij;
        }
    }
}

// One thread's GEMM on its sub-problem (m, n, k >= 1).
template <typename T>
void gemm_serial(bool ta, bool tb, index_t m, index_t n, index_t k, T alpha, const T* a,
                 index_t lda, const T* b, index_t ldb, T beta, T* c, index_t ldc) {
    using Blk = Blocking<T>;
    constexpr int MR = Blk::MR, NR = Blk::NR;
    const index_t kc_max = fp_min(k, Blk::KC);
    const index_t mc_max = round_up(fp_min(m, Blk::MC), MR);
    const index_t nc_max = round_up(fp_min(n, Blk::NC), NR);
    T* ap = static_cast<T*>(detail::thread_scratch(0, sizeof(T) * mc_max * kc_max));
    T* bp = static_cast<T*>(detail::thread_scratch(1, sizeof(T) * kc_max * nc_max));
    if (ap == nullptr || bp == nullptr) {
        gemm_unpacked(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    for (index_t jc = 0; jc < n; jc += Blk::NC) {
        const index_t nc = fp_min(Blk::NC, n - jc);
        for (index_t pc = 0; pc < k; pc += Blk::KC) {
            const index_t kc = fp_min(Blk::KC, k - pc);
            const T beta_block = pc == 0 ? beta : T(1);
            const T* b_block = tb ? b + jc * ldb + pc : b + pc * ldb + jc;
            pack_b<T, NR>(tb, kc, nc, b_block, ldb, bp);
            for (index_t ic = 0; ic < m; ic += Blk::MC) {
                const index_t mc = fp_min(Blk::MC, m - ic);
                const T* a_block = ta ? a + pc * lda + ic : a + ic * lda + pc;
                pack_a<T, MR>(ta, mc, kc, a_block, lda, ap);
                for (index_t jr = 0; jr < nc; jr += NR) {
                    const index_t nr = fp_min<index_t>(NR, nc - jr);
                    for (index_t ir = 0; ir < mc; ir += MR) {
                        const index_t mr = fp_min<index_t>(MR, mc - ir);
                        micro_kernel<T, MR, NR>(kc, ap + ir * kc, bp + jr * kc,
                                                c + (ic + ir) * ldc + jc + jr, ldc, mr, nr,
                                                alpha, beta_block);
                    }
                }
            }
        }
    }
}

}  // namespace

template <typename T>
void gemm(bool ta, bool tb, index_t m, index_t n, index_t k, T alpha, const T* a,
          index_t lda, const T* b, index_t ldb, T beta, T* c, index_t ldc) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0 || alpha == T(0)) {
        scale_c(m, n, beta, c, ldc);
        return;
    }
    if ((m == 1 || n == 1) && gemv_shapes(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc))
        return;
    using Blk = Blocking<T>;
    const index_t flops = 2 * m * n * k;
    const int nt = threads_for(flops, kGemmFlopGrain);
    if (nt <= 1) {
        gemm_serial(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    // Split C into a tm x tn grid (tm * tn == nt) minimising the largest tile, then
    // the packing traffic (tile perimeter).
    index_t best_tm = 1, best_rows = m, best_cols = n, best_area = -1, best_perim = 0;
    for (index_t tm = 1; tm <= nt; ++tm) {
        if (nt % tm != 0) continue;
        const index_t tn = nt / tm;
        const index_t rows = round_up((m + tm - 1) / tm, Blk::MR);
        const index_t cols = round_up((n + tn - 1) / tn, Blk::NR);
        const index_t area = rows * cols, perim = rows + cols;
        if (best_area < 0 || area < best_area || (area == best_area && perim < best_perim)) {
            best_tm = tm, best_rows = rows, best_cols = cols, best_area = area,
            best_perim = perim;
        }
    }
    const index_t tm = best_tm, tn = nt / best_tm;
    const index_t rows = best_rows, cols = best_cols;
#if defined(_OPENMP)
    detail::note_thread_pool_started();
#pragma omp parallel num_threads(nt)
    {
        const index_t tid = omp_get_thread_num();
        const index_t nthreads = omp_get_num_threads();
        for (index_t tile = tid; tile < tm * tn; tile += nthreads) {
            const index_t i0 = (tile / tn) * rows, j0 = (tile % tn) * cols;
            if (i0 >= m || j0 >= n) continue;
            const index_t mi = fp_min(rows, m - i0), nj = fp_min(cols, n - j0);
            gemm_serial(ta, tb, mi, nj, k, alpha, ta ? a + i0 : a + i0 * lda, lda,
                        tb ? b + j0 * ldb : b + j0, ldb, beta, c + i0 * ldc + j0, ldc);
        }
    }
#else
    (void)tm, (void)tn, (void)rows, (void)cols;
    gemm_serial(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#endif
}

template void gemm<float>(bool, bool, index_t, index_t, index_t, float, const float*,
                          index_t, const float*, index_t, float, float*, index_t);
template void gemm<double>(bool, bool, index_t, index_t, index_t, double, const double*,
                           index_t, const double*, index_t, double, double*, index_t);

}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
