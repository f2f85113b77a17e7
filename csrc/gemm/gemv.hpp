// gemm/gemv.hpp - the GEMM shapes that skip the blocked kernel: m == 1 and n == 1
// (matrix-vector products), a few rows times a wide B, and shallow products (k <= 4,
// tiny_k_form, below); included by gemm.cpp in each ISA unit (internal linkage).
//
// Computes c = alpha op(A) op(B) + beta c when op(A) has one row (a single-sample
// forward pass) or op(B) one column, without packing: packing would copy the
// whole matrix once to read it once.  Two loop forms, chosen by which operand has
// contiguous rows:
//   axpy form  c[0:len] += s_p * row_p[0:len] over p, four rows per pass over c;
//   dot form   c_i = sum_p u_p v_p with both vectors contiguous, four outputs at a
//              time, 16 partial sums each (8 in double).
// A strided vector operand is first gathered into thread-local scratch.  The
// outputs are split over threads (gemv_split) from 128k matrix elements: the
// product is bound by reading the matrix from L2, and two cores have two L2s.
// Accuracy: sums of k products in T, in blocks of kSumBlock as in the blocked GEMM
// (different order); each output is computed by one thread, so results do not
// depend on the thread count.
// Speed (Zen4 VM, float32 1x784x256, median of interleaved runs): 1 thread
// 10.5-11.5 us (NumPy/OpenBLAS 9.8-11.2), 2 threads 6.5-6.8 us (NumPy 9.2-10.2:
// OpenBLAS runs this GEMV on one thread).
#pragma once

#include "isa_common.hpp"
#include "runtime.hpp"
#include "gemm/epilogue.hpp"
#include "gemm/gemm_config.hpp"

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

// Long sums are blocked as the packed GEMM's KC blocks are: each output's running
// sum takes block sums of at most kSumBlock products (in the dot forms, blocks of
// kDotBlock: kSumBlock per lane of float, 2 x kSumBlock per lane of double), not
// every product (a float32 chain stops growing at 2^24 times the terms: a
// one-output layer's weight gradient over 2^22 samples had 9e-4 relative error,
// all-ones sums of 2^25 terms gave 2^24).
constexpr index_t kSumBlock = 512;

// The dot forms' vectors: 32 bytes of T (GCC vector extensions: one register in the
// AVX2 and AVX-512 units, two SSE registers in the generic one), two per sum: 16
// partial sums in float, 8 in double.  (Written with arrays of 16 lanes and a tail
// loop indexing them, GCC kept the four rows' sums on the stack: 4096 x k float32
// dot products took 20 us at k = 16 and 32, 27-31 us at k = 4 and 15, against 3-7
// us now; NumPy 3-10.)
// (-Wpsabi, to the end of dot_rows_plain: GCC notes that passing a 32-byte vector
// without AVX, in the generic unit, has another ABI than with it; these functions
// are inlined and internal to one unit.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename T>
struct DotVec {
    typedef T type __attribute__((vector_size(32)));
    static constexpr index_t W = index_t(32 / sizeof(T));
};

template <typename T>
inline typename DotVec<T>::type dot_load(const T* p) {
    typename DotVec<T>::type v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

// The lanes of v summed as a pairwise tree.
template <typename T>
inline T dot_hsum(const typename DotVec<T>::type& v) {
    constexpr int n = int(DotVec<T>::W);
    T s[n];
    __builtin_memcpy(s, &v, sizeof v);
    for (int w = n / 2; w > 0; w /= 2)
        for (int l = 0; l < w; ++l) s[l] += s[l + w];
    return s[0];
}

// Dot product in T: two vectors of partial sums, the last < W products in a scalar.
template <typename T>
inline T dot_lanes_plain(const T* FASTPROP_RESTRICT x, const T* FASTPROP_RESTRICT y,
                         index_t k) {
    using V = typename DotVec<T>::type;
    constexpr index_t W = DotVec<T>::W;
    V a = {}, b = {};
    index_t p = 0;
    for (; p + 2 * W <= k; p += 2 * W) {
        a += dot_load(x + p) * dot_load(y + p);
        b += dot_load(x + p + W) * dot_load(y + p + W);
    }
    if (p + W <= k) {
        a += dot_load(x + p) * dot_load(y + p);
        p += W;
    }
    T t = T(0);
    for (; p < k; ++p) t += x[p] * y[p];
    return dot_hsum<T>(a + b) + t;
}

// The dot forms' block: kSumBlock products per lane of float (2 x 8 lanes).
constexpr index_t kDotBlock = 16 * kSumBlock;

template <typename T>
inline T dot_lanes(const T* FASTPROP_RESTRICT x, const T* FASTPROP_RESTRICT y, index_t k) {
    if (k < 2 * kDotBlock) return dot_lanes_plain(x, y, k);
    T sum = T(0);
    for (index_t p = 0; p < k; p += kDotBlock)
        sum += dot_lanes_plain(x + p, y + p, fp_min(kDotBlock, k - p));
    return sum;
}

// out[0:len] = sum_p vec[p] * rows[p*ld + 0:len]  (out must not alias rows).
// Four rows at a time: out[j] += s0 r0[j] + s1 r1[j] + s2 r2[j] + s3 r3[j] (in that
// order, so each output is summed over p in increasing order as in the plain loop),
// one load and one store of out per four matrix loads, the matrix read as four
// sequential streams.
// (not inlined: GCC 12 inlined into sum_in_blocks' lambda made an 8-row loop that
// read the matrix 1.45x slower, 1x100000x64 in 1.2 ms against 0.82)
template <typename T>
FASTPROP_NOINLINE void axpy_block(index_t k, index_t len, const T* FASTPROP_RESTRICT vec,
                                  const T* FASTPROP_RESTRICT rows, index_t ld,
                                  T* FASTPROP_RESTRICT out) {
    for (index_t j = 0; j < len; ++j) out[j] = T(0);
    index_t p = 0;
    for (; p + 4 <= k; p += 4) {
        const T s0 = vec[p], s1 = vec[p + 1], s2 = vec[p + 2], s3 = vec[p + 3];
        const T* FASTPROP_RESTRICT r0 = rows + p * ld;
        const T* FASTPROP_RESTRICT r1 = r0 + ld;
        const T* FASTPROP_RESTRICT r2 = r1 + ld;
        const T* FASTPROP_RESTRICT r3 = r2 + ld;
        for (index_t j = 0; j < len; ++j) {
            T acc = out[j];
            acc += s0 * r0[j];
            acc += s1 * r1[j];
            acc += s2 * r2[j];
            acc += s3 * r3[j];
            out[j] = acc;
        }
    }
    for (index_t t = 0, rem = k - p; t < rem && t < 4; ++t) {  // (fewer than 4 rows)
        const T s = vec[p + t];
        const T* row = rows + (p + t) * ld;
        for (index_t j = 0; j < len; ++j) out[j] += s * row[j];
    }
}

// out[0:len] = the sum over blocks of k of block_sums(p, kb, i0, w, dst), which writes
// the sums of block [p, p + kb) for outputs [i0, i0 + w) into dst: the first block
// straight into out, the others through a tile on the stack added to it.
template <index_t kTile, typename T, typename F>
inline void sum_in_blocks(index_t k, index_t len, index_t block, T* FASTPROP_RESTRICT out,
                          F&& block_sums) {
    alignas(64) T part[kTile];
    for (index_t i0 = 0; i0 < len; i0 += kTile) {
        const index_t w = fp_min(kTile, len - i0);
        block_sums(index_t(0), fp_min(block, k), i0, w, out + i0);
        for (index_t p = block; p < k; p += block) {
            block_sums(p, fp_min(block, k - p), i0, w, part);
            for (index_t j = 0; j < w; ++j) out[i0 + j] += part[j];
        }
    }
}

// axpy_block over blocks of kSumBlock rows.
template <typename T>
inline void axpy_rows(index_t k, index_t len, const T* FASTPROP_RESTRICT vec,
                      const T* FASTPROP_RESTRICT rows, index_t ld, T* FASTPROP_RESTRICT out) {
    if (k <= kSumBlock) {
        axpy_block(k, len, vec, rows, ld, out);
        return;
    }
    // (tiles of 4096 columns: each row read in long runs; 256 made a 1x4096x4096
    // product 1.7x slower, its rows read in 1 KB pieces)
    sum_in_blocks<4096>(k, len, kSumBlock, out, [&](index_t p, index_t kb, index_t j0,
                                                    index_t w, T* dst) {
        axpy_block(kb, w, vec + p, rows + p * ld + j0, ld, dst);
    });
}

// R (2..4) rows of op(A) at once: out_r[0:len] = sum_p vec[r*lda + p] rows[p*ld + 0:len]
// for r < R, the matrix read once for all R outputs, four of its rows at a time as in
// axpy_block (each output summed over p in increasing order: the same sums as R
// single-row products).  For a short op(A) and a wide B the blocked GEMM reads B in
// place 16 columns at a time down a whole k block, one cache line a row 4 KiB or more
// apart: 2x1024x1024 float32 took 410 us against 55 us for one row.
template <int R, typename T>
FASTPROP_NOINLINE void axpy_block_rows(index_t k, index_t len, const T* FASTPROP_RESTRICT vec,
                                       index_t lda, const T* FASTPROP_RESTRICT rows,
                                       index_t ld, T* FASTPROP_RESTRICT out, index_t ldo) {
    static_assert(R >= 2 && R <= 4, "2 to 4 rows");
    T* FASTPROP_RESTRICT o0 = out;
    T* FASTPROP_RESTRICT o1 = out + ldo;
    T* FASTPROP_RESTRICT o2 = out + (R > 2 ? 2 * ldo : 0);
    T* FASTPROP_RESTRICT o3 = out + (R > 3 ? 3 * ldo : 0);
    for (index_t j = 0; j < len; ++j) {
        o0[j] = T(0);
        o1[j] = T(0);
        if (R > 2) o2[j] = T(0);
        if (R > 3) o3[j] = T(0);
    }
    index_t p = 0;
    for (; p + 4 <= k; p += 4) {
        T s[4][4];
        for (int r = 0; r < R; ++r)
            for (int q = 0; q < 4; ++q) s[r][q] = vec[r * lda + p + q];
        const T* FASTPROP_RESTRICT r0 = rows + p * ld;
        const T* FASTPROP_RESTRICT r1 = r0 + ld;
        const T* FASTPROP_RESTRICT r2 = r1 + ld;
        const T* FASTPROP_RESTRICT r3 = r2 + ld;
        for (index_t j = 0; j < len; ++j) {
            const T b0 = r0[j], b1 = r1[j], b2 = r2[j], b3 = r3[j];
            // (one output: its running sum plus the four products, in order)
            const auto step = [&](T* FASTPROP_RESTRICT o, const T* sr) {
                T acc = o[j];
                acc += sr[0] * b0;
                acc += sr[1] * b1;
                acc += sr[2] * b2;
                acc += sr[3] * b3;
                o[j] = acc;
            };
            step(o0, s[0]);
            step(o1, s[1]);
            if (R > 2) step(o2, s[2]);
            if (R > 3) step(o3, s[3]);
        }
    }
    for (; p < k; ++p) {  // (fewer than 4 rows left)
        const T* row = rows + p * ld;
        const T t0 = vec[p], t1 = vec[lda + p];
        const T t2 = R > 2 ? vec[2 * lda + p] : T(0), t3 = R > 3 ? vec[3 * lda + p] : T(0);
        for (index_t j = 0; j < len; ++j) {
            o0[j] += t0 * row[j];
            o1[j] += t1 * row[j];
            if (R > 2) o2[j] += t2 * row[j];
            if (R > 3) o3[j] += t3 * row[j];
        }
    }
}

// axpy_block_rows over blocks of kSumBlock rows of the matrix (as axpy_rows), in
// column tiles of 1024 (each matrix row read in 4-8 KB runs; R partial tiles on the
// stack for the blocks after the first).
template <int R, typename T>
inline void axpy_rows_multi(index_t k, index_t len, const T* vec, index_t lda, const T* rows,
                            index_t ld, T* out, index_t ldo) {
    constexpr index_t kTile = 1024;
    alignas(64) T part[R * kTile];
    for (index_t j0 = 0; j0 < len; j0 += kTile) {
        const index_t w = fp_min(kTile, len - j0);
        axpy_block_rows<R>(fp_min(kSumBlock, k), w, vec, lda, rows + j0, ld, out + j0, ldo);
        for (index_t p = kSumBlock; p < k; p += kSumBlock) {
            axpy_block_rows<R>(fp_min(kSumBlock, k - p), w, vec + p, lda, rows + p * ld + j0,
                               ld, part, kTile);
            for (int r = 0; r < R; ++r)
                for (index_t j = 0; j < w; ++j) out[r * ldo + j0 + j] += part[r * kTile + j];
        }
    }
}

// out[i] = dot(u, rows[i*ld + 0:k]) for i < len, four rows at a time so that each
// load of u serves four products (as dot_lanes_plain for each row); k shorter than a
// vector: one scalar sum a row.
template <typename T>
inline void dot_rows_plain(index_t k, index_t len, const T* FASTPROP_RESTRICT u,
                           const T* FASTPROP_RESTRICT rows, index_t ld,
                           T* FASTPROP_RESTRICT out) {
    using V = typename DotVec<T>::type;
    constexpr index_t W = DotVec<T>::W;
    index_t i = 0;
    if (k < W) {
        for (; i < len; ++i) {
            const T* r = rows + i * ld;
            T s = T(0);
            for (index_t p = 0; p < k; ++p) s += u[p] * r[p];
            out[i] = s;
        }
        return;
    }
    for (; i + 4 <= len; i += 4) {
        const T* r0 = rows + i * ld;
        const T* r1 = r0 + ld;
        const T* r2 = r1 + ld;
        const T* r3 = r2 + ld;
        V a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
        index_t p = 0;
        for (; p + 2 * W <= k; p += 2 * W) {
            const V x = dot_load(u + p), y = dot_load(u + p + W);
            a0 += x * dot_load(r0 + p);
            a1 += x * dot_load(r1 + p);
            a2 += x * dot_load(r2 + p);
            a3 += x * dot_load(r3 + p);
            b0 += y * dot_load(r0 + p + W);
            b1 += y * dot_load(r1 + p + W);
            b2 += y * dot_load(r2 + p + W);
            b3 += y * dot_load(r3 + p + W);
        }
        if (p + W <= k) {
            const V x = dot_load(u + p);
            a0 += x * dot_load(r0 + p);
            a1 += x * dot_load(r1 + p);
            a2 += x * dot_load(r2 + p);
            a3 += x * dot_load(r3 + p);
            p += W;
        }
        T t0 = T(0), t1 = T(0), t2 = T(0), t3 = T(0);
        for (; p < k; ++p) {
            const T x = u[p];
            t0 += x * r0[p];
            t1 += x * r1[p];
            t2 += x * r2[p];
            t3 += x * r3[p];
        }
        out[i] = dot_hsum<T>(a0 + b0) + t0;
        out[i + 1] = dot_hsum<T>(a1 + b1) + t1;
        out[i + 2] = dot_hsum<T>(a2 + b2) + t2;
        out[i + 3] = dot_hsum<T>(a3 + b3) + t3;
    }
    for (; i < len; ++i) out[i] = dot_lanes_plain(u, rows + i * ld, k);
}
#pragma GCC diagnostic pop  // (-Wpsabi, above)

// dot_rows_plain over blocks of kDotBlock columns.
template <typename T>
inline void dot_rows(index_t k, index_t len, const T* FASTPROP_RESTRICT u,
                     const T* FASTPROP_RESTRICT rows, index_t ld, T* FASTPROP_RESTRICT out) {
    if (k < 2 * kDotBlock) {
        dot_rows_plain(k, len, u, rows, ld, out);
        return;
    }
    sum_in_blocks<256>(k, len, kDotBlock, out, [&](index_t p, index_t kb, index_t i0,
                                                   index_t w, T* dst) {
        dot_rows_plain(kb, w, u + p, rows + i0 * ld + p, ld, dst);
    });
}

// Threads for a matrix-vector product reading a k x len matrix: one contiguous
// chunk of outputs per thread (parallel_for: multiples of 16), each thread reading
// its own part of the matrix (on repeated calls that part stays in its core's L2:
// 1x784x256 float32 is 800 KB, more than one Zen4 L2; half of it fits).  A second
// thread from 2 kGemvGrain matrix elements.  Every output is computed by one thread
// in the same order, so results do not depend on the thread count.
constexpr index_t kGemvGrain = index_t(1) << 16;

template <typename F>
inline void gemv_split(index_t k, index_t len, F&& body) {
    parallel_for(len, fp_max<index_t>(16, kGemvGrain / fp_max<index_t>(k, 1)), body);
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

// A few rows (2..kFewRows) of A times a B whose rows are long: the rows in groups of
// 4, each group reading B once in long runs (axpy_rows_multi).  2 rows from B rows of
// 2 KiB, 3-4 rows from 4 KiB (2-4 KiB rows of 3-4 rows: the blocked GEMM's 6x8 double
// kernel won, float64 4x2048x300 160 vs 210 us); 5 to 8 rows (two passes over B) only
// for a B of at least kTwoPassBytes, which the blocked GEMM reads from memory in its
// pathological way (below that it reads B once from cache, and wins); and k of at
// least kFewRowsMinK (a shallower product is mostly the k-tail loop's passes over C:
// float32 4x16x2048 10.3 vs 8.1 us blocked).  A sweep of 162 shapes (m 2-4, k 4-2048,
// rows 2-16 KiB, both dtypes) against the blocked path in one process: 151 faster.
// Measured, 1 thread, us, blocked -> this form: float32 2x1024x1024 410 -> 90,
// 4x2048x2048 2046 -> 671, 8x2048x2048 3861 -> 1268; float64 2x784x256 61 -> 34.
constexpr index_t kFewRows = 8;
constexpr index_t kWideRowBytes = 2048;
constexpr index_t kFewRowsMinK = 32;
constexpr index_t kTwoPassBytes = index_t(8) << 20;

inline bool few_rows_form(index_t m, index_t n, index_t k, index_t elem) {
    const index_t row = n * elem;
    if (m < 2 || m > kFewRows || k < kFewRowsMinK || row < kWideRowBytes) return false;
    if (m == 2) return true;
    if (row < 2 * kWideRowBytes) return false;
    return m <= 4 || k * row >= kTwoPassBytes;
}

// A shallow product (1 <= k <= kTinyK) with rows of at least kTinyKRowBytes, and a
// forward epilogue if any (a layer with a few inputs): C row by row, each row the sum of k rows of op(B) scaled by that row's k elements of
// op(A), vectorised along the row.  The blocked GEMM is bound there by its per-tile
// overheads and by its stores, which go down MR-row tiles column strip by column
// strip: with rows a multiple of 2 KiB apart those lines share two L1 sets (float64
// 512x3x256, 1 thread: 69 us into rows 2 KiB apart, 41 us into padded rows, 29 us
// this way; NumPy 26-27).  A sweep of 750 shapes (k 1-8, m 2-4096, n 3-1000, NN/NT/TN,
// both dtypes, 1 thread) against the blocked path: for rows of 64+ floats, median
// 1.2-2.2x faster at k 1-5 and slower at k = 8 (float32 0.93x); for narrower rows
// the per-row cost loses (4096x8x3 float32: 8 -> 34 us).  Rows are split over
// threads; each element is summed over p in increasing order, whatever the thread
// count.
constexpr index_t kTinyK = 4;
constexpr index_t kTinyKRowBytes = 256;

template <int K, typename T>
inline void tiny_k_row(index_t n, const T* FASTPROP_RESTRICT av, const T* FASTPROP_RESTRICT bp,
                       index_t ldb, T alpha, T beta, bool direct, T* FASTPROP_RESTRICT ci) {
    T s[K];
    for (int p = 0; p < K; ++p) s[p] = av[p];
    if (direct) {
        for (index_t j = 0; j < n; ++j) {
            T acc = s[0] * bp[j];
            for (int p = 1; p < K; ++p) acc += s[p] * bp[p * ldb + j];
            ci[j] = acc;
        }
    } else if (beta == T(0)) {
        for (index_t j = 0; j < n; ++j) {
            T acc = s[0] * bp[j];
            for (int p = 1; p < K; ++p) acc += s[p] * bp[p * ldb + j];
            ci[j] = alpha * acc;
        }
    } else {
        for (index_t j = 0; j < n; ++j) {
            T acc = s[0] * bp[j];
            for (int p = 1; p < K; ++p) acc += s[p] * bp[p * ldb + j];
            ci[j] = alpha * acc + beta * ci[j];
        }
    }
}

// (A forward epilogue, ep: bias, activation, pre-activation; applied to each group
// of kTinyKRows rows as soon as they are computed, while they are in L1.)
constexpr index_t kTinyKRows = 16;

template <int K, typename T>
void tiny_k_rows(bool ta, index_t m, index_t n, T alpha, const T* a, index_t lda,
                 const T* bp, index_t ldb, T beta, T* c, index_t ldc,
                 const GemmEpilogue<T>* ep) {
    const bool direct = alpha == T(1) && beta == T(0);
    const index_t grain = fp_max<index_t>(1, kElementGrain / fp_max<index_t>(n, 1));
    parallel_for(m, grain, [&](index_t i0, index_t i1) {
        for (index_t g0 = i0; g0 < i1; g0 += kTinyKRows) {
            const index_t g1 = fp_min(i1, g0 + kTinyKRows);
            for (index_t i = g0; i < g1; ++i) {
                T av[K];
                for (int p = 0; p < K; ++p) av[p] = ta ? a[p * lda + i] : a[i * lda + p];
                tiny_k_row<K>(n, av, bp, ldb, alpha, beta, direct, c + i * ldc);
            }
            if (ep != nullptr) apply_epilogue(*ep, g0, g1, 0, n, c, ldc);
        }
    });
}

template <typename T>
bool tiny_k_form(bool ta, bool tb, index_t m, index_t n, index_t k, T alpha, const T* a,
                 index_t lda, const T* b, index_t ldb, T beta, T* c, index_t ldc,
                 const GemmEpilogue<T>* ep) {
    if (ep != nullptr && epilogue_reads_rows(*ep)) return false;  // (backward forms)
    const T* bp = b;
    index_t ldbp = ldb;
    if (tb) {  // op(B) = b^T: its k rows gathered (k x n, contiguous)
        T* buf = static_cast<T*>(detail::thread_scratch(2, sizeof(T) * k * n));
        if (buf == nullptr) return false;
        for (index_t j = 0; j < n; ++j)
            for (index_t p = 0; p < k; ++p) buf[p * n + j] = b[j * ldb + p];
        bp = buf, ldbp = n;
    }
    switch (k) {
        case 1: tiny_k_rows<1>(ta, m, n, alpha, a, lda, bp, ldbp, beta, c, ldc, ep); break;
        case 2: tiny_k_rows<2>(ta, m, n, alpha, a, lda, bp, ldbp, beta, c, ldc, ep); break;
        case 3: tiny_k_rows<3>(ta, m, n, alpha, a, lda, bp, ldbp, beta, c, ldc, ep); break;
        case 4: tiny_k_rows<4>(ta, m, n, alpha, a, lda, bp, ldbp, beta, c, ldc, ep); break;
        default: return false;
    }
    if (tb) detail::trim_scratch(2);
    return true;
}

#if defined(__AVX2__) && defined(__FMA__)
// Narrow float32 outputs (n < 16 columns, not 8) from a short k (<= 32; <= 8 when A
// is transposed), m >= 64 rows (a classifier head or the layers of a toy network on a
// large batch): op(B) is gathered once into a
// zero-padded k x 16 buffer, and each row of C is its k rows scaled by the row's k
// elements of op(A), accumulated in one or two vector registers (four rows at a time)
// and stored masked.  The blocked GEMM's 6x16 micro-kernel wastes 16 - n of its
// columns there and pays its per-tile cost every 6 rows (4096x8x10, 1 thread: 75 us
// that way, NumPy 37).  Each element is summed over p in increasing order with fused
// multiply-adds, whatever the thread count (rows are split over threads); a forward
// epilogue (bias, activation, pre-activation) is applied to each 16 rows as they are
// computed.  Not the backward epilogues (their column sums run down all rows in order).
// A sweep of 735 shapes (m 64-4096, k 1-32, n 2-16, NN/NT/TN, 1 thread) against the
// blocked path: median 1.7x faster on the shapes this form takes, 0.6-1.1x at n = 8
// and 16 and 0.7-0.9x for TN with k >= 16 at m = 4096, which it leaves.
constexpr index_t kNarrowMaxN = 16;  // (n < 16, the width of the buffer's rows)
constexpr index_t kNarrowMaxK = 32;
constexpr index_t kNarrowMaxKTransposed = 8;
constexpr index_t kNarrowMinRows = 64;

// Rows [i0, i1) of C (n columns: one vector, or two when Two).  A row's last, partial
// vector is stored whole when `spill` (rows contiguous, beta 0: its extra lanes land
// in the next rows, which are stored after it by the same thread) unless it would
// reach row `limit` (the end of this thread's rows), masked otherwise:
// a masked store costs ~10x a plain one on Zen3 (4096x2x3: 28 us masked, 12 us so).
template <bool Two>
inline void narrow_rows(index_t i0, index_t i1, index_t k, bool ta, const float* a,
                        index_t lda, const float* bp, float alpha, float beta, bool direct,
                        bool spill, index_t n, __m256i m0, __m256i m1, float* c,
                        index_t ldc, index_t limit) {
    const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
    auto at = [&](index_t i, index_t p) { return ta ? a + p * lda + i : a + i * lda + p; };
    auto put = [](float* p, __m256i m, __m256 v, bool whole) {
        if (whole)
            _mm256_storeu_ps(p, v);
        else
            _mm256_maskstore_ps(p, m, v);
    };
    auto store = [&](index_t i, __m256 lo, __m256 hi) {
        float* ci = c + i * ldc;
        if (!direct) {
            lo = _mm256_mul_ps(va, lo);
            if (Two) hi = _mm256_mul_ps(va, hi);
            if (beta != 0.0f) {
                lo = _mm256_fmadd_ps(vb, _mm256_maskload_ps(ci, m0), lo);
                if (Two) hi = _mm256_fmadd_ps(vb, _mm256_maskload_ps(ci + 8, m1), hi);
            }
        }
        // (the whole vector ends within the rows before `limit`: with n < 8 it can
        // reach several rows on)
        const bool whole = spill && i * ldc + (Two ? 16 : 8) <= limit * ldc;
        if (Two) {
            _mm256_storeu_ps(ci, lo);
            put(ci + 8, m1, hi, whole || n == 16);
        } else {
            put(ci, m0, lo, whole || n == 8);
        }
    };
    index_t i = i0;
    for (; i + 4 <= i1; i += 4) {
        __m256 l0 = _mm256_setzero_ps(), l1 = l0, l2 = l0, l3 = l0;
        __m256 h0 = l0, h1 = l0, h2 = l0, h3 = l0;
        for (index_t p = 0; p < k; ++p) {
            const __m256 b0 = _mm256_loadu_ps(bp + p * kNarrowMaxN);
            const __m256 a0 = _mm256_broadcast_ss(at(i, p)), a1 = _mm256_broadcast_ss(at(i + 1, p));
            const __m256 a2 = _mm256_broadcast_ss(at(i + 2, p)), a3 = _mm256_broadcast_ss(at(i + 3, p));
            l0 = _mm256_fmadd_ps(a0, b0, l0);
            l1 = _mm256_fmadd_ps(a1, b0, l1);
            l2 = _mm256_fmadd_ps(a2, b0, l2);
            l3 = _mm256_fmadd_ps(a3, b0, l3);
            if (Two) {
                const __m256 b1 = _mm256_loadu_ps(bp + p * kNarrowMaxN + 8);
                h0 = _mm256_fmadd_ps(a0, b1, h0);
                h1 = _mm256_fmadd_ps(a1, b1, h1);
                h2 = _mm256_fmadd_ps(a2, b1, h2);
                h3 = _mm256_fmadd_ps(a3, b1, h3);
            }
        }
        store(i, l0, h0);
        store(i + 1, l1, h1);
        store(i + 2, l2, h2);
        store(i + 3, l3, h3);
    }
    for (; i < i1; ++i) {
        __m256 l0 = _mm256_setzero_ps(), h0 = l0;
        for (index_t p = 0; p < k; ++p) {
            const __m256 a0 = _mm256_broadcast_ss(at(i, p));
            l0 = _mm256_fmadd_ps(a0, _mm256_loadu_ps(bp + p * kNarrowMaxN), l0);
            if (Two) h0 = _mm256_fmadd_ps(a0, _mm256_loadu_ps(bp + p * kNarrowMaxN + 8), h0);
        }
        store(i, l0, h0);
    }
}

inline bool narrow_n_form(bool ta, bool tb, index_t m, index_t n, index_t k, float alpha,
                          const float* a, index_t lda, const float* b, index_t ldb,
                          float beta, float* c, index_t ldc, const GemmEpilogue<float>* ep) {
    // (n = 8 and 16 fill the micro-kernel's half-width and full tiles, and a transposed
    // A read in place strides across k: the blocked path stays ahead there)
    if (n >= kNarrowMaxN || n == 8 || k > kNarrowMaxK || m < kNarrowMinRows ||
        (ta && k > kNarrowMaxKTransposed))
        return false;
    if (ep != nullptr && epilogue_reads_rows(*ep)) return false;  // (backward forms)
    alignas(32) float bp[kNarrowMaxK * kNarrowMaxN];
    for (index_t p = 0; p < k; ++p)
        for (index_t j = 0; j < kNarrowMaxN; ++j)
            bp[p * kNarrowMaxN + j] = j < n ? (tb ? b[j * ldb + p] : b[p * ldb + j]) : 0.0f;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(fp_min<index_t>(n, 8))), lane);
    const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n > 8 ? n - 8 : 0)), lane);
    const bool direct = alpha == 1.0f && beta == 0.0f;
    const bool spill = beta == 0.0f && ldc == n;
    const index_t grain = fp_max<index_t>(kTinyKRows, kFlopGrain / fp_max<index_t>(1, k * n));
    parallel_for(m, grain, [&](index_t i0, index_t i1) {
        for (index_t g0 = i0; g0 < i1; g0 += kTinyKRows) {
            const index_t g1 = fp_min(i1, g0 + kTinyKRows);
            // (a row's spill reaches the next group's first row, computed after it; the
            // epilogue of this group does not read it)
            if (n > 8)
                narrow_rows<true>(g0, g1, k, ta, a, lda, bp, alpha, beta, direct, spill, n, m0,
                                  m1, c, ldc, i1);
            else
                narrow_rows<false>(g0, g1, k, ta, a, lda, bp, alpha, beta, direct, spill, n,
                                   m0, m1, c, ldc, i1);
            if (ep != nullptr) apply_epilogue(*ep, g0, g1, 0, n, c, ldc);
        }
    });
    return true;
}
#endif

// Handles m == 1 or n == 1 (k >= 1), and the few-rows-wide-B shapes above; returns
// false if it did not (other shapes, or no scratch memory), leaving C untouched.
template <typename T>
bool gemv_shapes(bool ta, bool tb, index_t m, index_t n, index_t k, T alpha, const T* a,
                 index_t lda, const T* b, index_t ldb, T beta, T* c, index_t ldc) {
    // The sums go straight into C when C is contiguous and the product is stored
    // as it is (alpha 1, beta 0: the usual forward pass); otherwise into per-thread
    // scratch, then scaled into C.  (Scratch for every shape kept a buffer as large
    // as the largest output ever computed for the life of the thread.)
    const bool direct = alpha == T(1) && beta == T(0);
    if (m == 1 && n == 1) {
        // A dot product, in vector lanes whatever the layouts (the axpy form below ran
        // NN as a single chain: slower, and 5e-6 relative error at k = 2^24 + 2^22
        // in float32 against the dot form's 4e-7).
        const T* u = contiguous(a, ta ? lda : 1, k, 2);
        const T* v = contiguous(b, tb ? 1 : ldb, k, 3);
        if (u == nullptr || v == nullptr) return false;
        T sum;
        dot_rows(k, 1, u, v, k, &sum);
        store_scaled(1, &sum, alpha, beta, c, 1);
        detail::trim_scratch(2);
        detail::trim_scratch(3);
        return true;
    }
    if (m == 1) {
        // u = op(A)[0, :] (stride lda when transposed); c[0, :] has unit stride.
        const T* u = contiguous(a, ta ? lda : 1, k, 2);
        T* acc = direct ? c : static_cast<T*>(detail::thread_scratch(3, sizeof(T) * n));
        if (u == nullptr || acc == nullptr) return false;
        gemv_split(k, n, [&](index_t j0, index_t j1) {
            if (!tb)
                axpy_rows(k, j1 - j0, u, b + j0, ldb, acc + j0);  // op(B) rows: rows of b
            else
                dot_rows(k, j1 - j0, u, b + j0 * ldb, ldb, acc + j0);
            if (!direct) store_scaled(j1 - j0, acc + j0, alpha, beta, c + j0, 1);
        });
        detail::trim_scratch(2);  // (scratch sized by the problem: not kept if large)
        detail::trim_scratch(3);
        return true;
    }
    if (!ta && !tb && direct && few_rows_form(m, n, k, index_t(sizeof(T)))) {
        // A few contiguous rows of A times a wide B (rows of B contiguous), stored as
        // is: the rows in groups of up to 4, each group reading B once.
        gemv_split(k, n, [&](index_t j0, index_t j1) {
            for (index_t i = 0; i < m; i += 4) {
                const index_t r = fp_min<index_t>(4, m - i);
                const T* ai = a + i * lda;
                T* ci = c + i * ldc + j0;
                if (r == 1)
                    axpy_rows(k, j1 - j0, ai, b + j0, ldb, ci);
                else if (r == 2)
                    axpy_rows_multi<2>(k, j1 - j0, ai, lda, b + j0, ldb, ci, ldc);
                else if (r == 3)
                    axpy_rows_multi<3>(k, j1 - j0, ai, lda, b + j0, ldb, ci, ldc);
                else
                    axpy_rows_multi<4>(k, j1 - j0, ai, lda, b + j0, ldb, ci, ldc);
            }
        });
        return true;
    }
    if (n == 1) {
        // v = op(B)[:, 0] (stride ldb unless transposed); c[:, 0] has stride ldc.
        const T* v = contiguous(b, tb ? 1 : ldb, k, 2);
        const bool into_c = direct && ldc == 1;
        T* acc = into_c ? c : static_cast<T*>(detail::thread_scratch(3, sizeof(T) * m));
        if (v == nullptr || acc == nullptr) return false;
        gemv_split(k, m, [&](index_t i0, index_t i1) {
            if (ta)
                axpy_rows(k, i1 - i0, v, a + i0, lda, acc + i0);  // op(A)^T rows: rows of a
            else
                dot_rows(k, i1 - i0, v, a + i0 * lda, lda, acc + i0);
            if (!into_c) store_scaled(i1 - i0, acc + i0, alpha, beta, c + i0 * ldc, ldc);
        });
        detail::trim_scratch(2);
        detail::trim_scratch(3);
        return true;
    }
    return false;
}

}  // namespace
}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
