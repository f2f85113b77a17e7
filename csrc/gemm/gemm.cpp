// gemm/gemm.cpp - the GEMM driver: shape dispatch, BLIS loops, threads (per ISA unit).
//
// Computes C = alpha * op(A) * op(B) + beta * C with an optional fused epilogue
// (include/fastprop/gemm.hpp for the contract).
//
// Algorithm (BLIS/GotoBLAS):
//   for jc over n in NC-wide blocks
//     for pc over k in KC-deep blocks
//       pack op(B)[pc:, jc:] into NR-column panels   (all threads, one panel range each)
//       for ic over this thread's rows in MC-tall blocks
//         pack op(A)[ic:, pc:] into MR-row panels    (per thread)
//         macro-kernel: for each NR strip, for each MR tile: micro-kernel
//                       (gemm/macro_kernel.hpp, gemm/ukernel.hpp), then the epilogue
//                       on the strip in the last k block
// Block sizes: gemm/gemm_config.hpp.  Packing (gemm/pack.hpp) absorbs transposes and
// leading dimensions.  Small products (m*n*k <= kSmallWork) skip packing: the
// micro-kernel reads A through its strides and B through its rows (NN, TN), and
// only a transposed B (NT, TT) is packed.  One-row and one-column products use the
// GEMV forms (gemm/gemv.hpp), then the epilogue; products of k <= 4 with wide rows
// and a forward epilogue or none the row-by-row form there (tiny_k_form).
//
// Threads (OpenMP, from kFlopGrain flops per thread): one parallel region around the
// loop nest; the threads form a tm x tn grid over C (rows split in MR multiples,
// the B block's NR panels split), pack the shared B block together (two barriers
// per (jc, pc) block) and their own A blocks.  A column sum in the epilogue forces
// tm = 1, so that every column is summed by one thread in row order.  A short op(A)
// with a deep k (m <= kUnpackedRowsB, two or more k blocks, B in place) is split
// over k instead (gemm_thread_ksplit): partial products of whole k blocks, added in
// block order.  Every element of C is computed by the same micro-kernel sequence
// over the same KC blocks, summed in the same order, for any thread count, so
// results are bit-identical across thread counts.
//
// Accuracy: each element is a sum of k products accumulated in T, one FMA chain per
// KC block in increasing k (the avx2 unit), blocks added in order.
// Speed (2-vCPU Zen4 VM, noisy; benchmarks/RESULTS.md has the tables): float32 NN 1
// thread ~96-104 GFLOP/s at n = 256..1024 (NumPy 93-98); 2 threads 173-197 at
// n = 256..1024 (0.98-1.04x NumPy), the MLP shapes 0.98-1.7x, the GEMV forms
// 1.3-1.5x (OpenBLAS runs them on one thread).  float64 2 threads 1.1-1.9x at
// n >= 256.  n = 32 / 64: 1.0-1.2x NumPy's OpenBLAS small-matrix kernels.
#include "gemm/epilogue.hpp"
#include "gemm/gemm_config.hpp"
#include "gemm/gemv.hpp"
#include "gemm/macro_kernel.hpp"
#include "gemm/pack.hpp"
#include "isa_common.hpp"
#include "kernels.hpp"
#include "runtime.hpp"

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

inline index_t round_up(index_t x, index_t to) { return (x + to - 1) / to * to; }
inline index_t ceil_div(index_t x, index_t d) { return (x + d - 1) / d; }

template <typename T>
struct GemmArgs {
    bool ta, tb;
    index_t m, n, k;
    T alpha;
    const T* a;
    index_t lda;
    const T* b;
    index_t ldb;
    T beta;
    T* c;
    index_t ldc;
    const GemmEpilogue<T>* ep;  // null: none
};

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

// Unpacked scalar fallback, used only if scratch memory cannot be allocated.
template <typename T>
void gemm_unpacked(const GemmArgs<T>& g) {
    for (index_t i = 0; i < g.m; ++i) {
        for (index_t j = 0; j < g.n; ++j) {
            T s = T(0);
            for (index_t p = 0; p < g.k; ++p)
                s += (g.ta ? g.a[p * g.lda + i] : g.a[i * g.lda + p]) *
                     (g.tb ? g.b[j * g.ldb + p] : g.b[p * g.ldb + j]);
            T& cij = g.c[i * g.ldc + j];
            cij = g.beta == T(0) ? g.alpha * s : g.alpha * s + g.beta * cij;
        }
    }
    if (g.ep != nullptr) apply_epilogue(*g.ep, 0, g.m, 0, g.n, g.c, g.ldc);
}

// The thread grid and the packing choices of one call.
struct Plan {
    int nt, tm, tn;
    bool pack_a, pack_b;
    bool ksplit;  // threads split k (gemm_thread_ksplit), not C
};

// Depth of the k blocks: equal blocks of at most KC (784 -> 3 x 262 rounded to 8,
// not 384 + 384 + 16: no thin last block); for a short op(A) (m <= kUnpackedRowsB)
// an even number of blocks, so that two threads can split k.  Depends on m and k
// only, so the sums are the same for any thread count.
template <typename T>
index_t k_step(index_t m, index_t k) {
    index_t blocks = ceil_div(k, GemmBlocks<T>::KC);
    if (m <= kUnpackedRowsB && blocks > 1 && blocks % 2 != 0) ++blocks;
    return round_up(ceil_div(k, blocks), 8);
}

template <typename T>
Plan make_plan(const GemmArgs<T>& g) {
    using Blk = GemmBlocks<T>;
    Plan pl{};
    const index_t work = g.m * g.n * g.k;
    const bool small = work <= kSmallWork;
    // A is packed when the product is large and A is reused across enough B strips;
    // a short A (m <= kUnpackedRowsA) stays in L1/L2 unpacked (measured: 64x256x256
    // float32, 1 thread, 96 vs 80 GFLOP/s unpacked vs packed).
    pl.pack_a = !small && g.m > kUnpackedRowsA && g.n > 4 * Blk::NR;
    pl.pack_b = g.tb || (!small && g.m > kUnpackedRowsB);
    // (at most kPlanThreads: a larger team fell back to one thread; the grid search
    // below is over divisors of nt)
    constexpr int kPlanThreads = 256;
    pl.nt = fp_min(threads_for(2 * work, kFlopGrain), kPlanThreads);
    pl.tm = 1, pl.tn = 1;
    if (pl.nt <= 1) {
        pl.nt = 1;
        return pl;
    }
    // A short op(A) with a deep k and B read in place (the forward GEMM of an MLP's
    // first layer at a small batch): the threads split k at block boundaries, each
    // reading its own rows of B, so that the training step's update of those weight
    // rows (row blocks per thread) finds them in its own core's cache, not in the
    // other's (Adam on 784 x 256 weights right after a column-split forward: 58 vs
    // 37 us).  Partial products of the later blocks go to scratch and are added in
    // block order: bit-identical to one thread.
    const index_t kb = ceil_div(g.k, k_step<T>(g.m, g.k));
    if (!pl.pack_b && !pl.pack_a && g.m <= kUnpackedRowsB && kb >= 2 &&
        g.m * g.n * ceil_div(kb, 2) <= (index_t(1) << 20)) {
        pl.nt = static_cast<int>(fp_min<index_t>(pl.nt, kb));
        pl.ksplit = true;
        return pl;
    }
    // The grid tm x tn == nt with the least cost of its busiest thread (tm = 1 when
    // the epilogue sums columns), ties to the smaller perimeter (packing):
    //   rows x column units: its MR-rounded rows times its strips, a last strip of at
    //   most NR / 2 columns counting half (the half-width micro-kernel runs it);
    //   times (1 + kSharedBRows / rows) for a row split (tm > 1): the threads then
    //   share one packed B block, each reading the panels that the other core packed
    //   and waiting at two barriers per block, which pays only when the block serves
    //   many rows per thread;
    //   times (1 + (NR / 2) / cols) for a column split of a packed A (tm = 1, nt > 1):
    //   every thread packs all of A for its share of the columns.
    // Measured (2 threads, us, row split vs column split, quiet rounds of one process),
    // where the rule before (least area, then perimeter) took the row split: float32
    // NT 32x256x784 93 vs 67, NT 64x256x784 149 vs 125, NT 128x256x784 264 vs 239,
    // 100^3 16.2 vs 14.2; float64 200x256x128 138 vs 132.  Where the row split stays:
    // float32 2048x784x256 3843 vs 3963, 1000x100x50 57 vs 62 (column shares of 2
    // strips and 1.1), 256x512x16 (one strip) 25 vs 40.
    // Only grids that give every thread work (rows and columns); with none for nt
    // threads, fewer threads (an idle thread only adds the fork and the barriers:
    // NT 16 x 15 columns x 784 deep, 2 threads with one idle 12.4 us, 1 thread 11.1).
    const bool col_only = g.ep != nullptr && g.ep->colsum != nullptr;
    const index_t nc = fp_min(g.n, Blk::NC);
    const index_t strips = ceil_div(nc, Blk::NR);
    const bool half_last = 2 * (nc - (strips - 1) * Blk::NR) <= Blk::NR;
    double best_cost = -1;
    index_t best_perim = 0;
    for (; pl.nt > 1; --pl.nt) {
        for (int tm = 1; tm <= pl.nt; ++tm) {
            if (pl.nt % tm != 0 || (col_only && tm != 1)) continue;
            const int tn = pl.nt / tm;
            const index_t rows = round_up(ceil_div(g.m, tm), Blk::MR);
            const index_t per = ceil_div(strips, tn);
            if ((tm - 1) * rows >= g.m || (tn - 1) * per >= strips) continue;  // an idle thread
            index_t units = 0;  // half strips of the busiest column share
            for (int tj = 0; tj < tn; ++tj) {
                const index_t s0 = fp_min(strips, tj * per), s1 = fp_min(strips, s0 + per);
                units = fp_max(units, 2 * (s1 - s0) - (s1 == strips && s1 > s0 && half_last));
            }
            const index_t cols = per * Blk::NR;
            double cost = double(rows) * double(units);
            if (tm > 1) cost *= 1.0 + double(kSharedBRows) / double(rows);
            if (tm == 1 && pl.pack_a) cost *= 1.0 + double(Blk::NR / 2) / double(cols);
            const index_t perim = rows + cols;
            if (best_cost < 0 || cost < best_cost || (cost == best_cost && perim < best_perim)) {
                best_cost = cost, best_perim = perim, pl.tm = tm, pl.tn = tn;
            }
        }
        if (best_cost >= 0) break;
    }
    // ... and one thread when the best grid's busiest thread costs as much as all the
    // work on one (a row split of a few rows: the same product split 8 + 8 rows,
    // 17 us on 2 threads)
    const double serial = double(round_up(g.m, Blk::MR)) * double(2 * strips - half_last);
    if (pl.nt <= 1 || best_cost >= serial) pl.nt = 1, pl.tm = 1, pl.tn = 1;
    return pl;
}

inline void team_barrier(int nt) {
#if defined(_OPENMP)
    if (nt > 1) {
#pragma omp barrier
    }
#else
    (void)nt;
#endif
}

// op(A)[ic, pc] (the block's first element), and a macro block reading A there in
// place through the micro-kernel's strides.
template <typename T>
const T* a_at(const GemmArgs<T>& g, index_t ic, index_t pc) {
    return g.ta ? g.a + pc * g.lda + ic : g.a + ic * g.lda + pc;
}

template <typename T>
void read_a_in_place(MacroBlock<T>& blk, const GemmArgs<T>& g, index_t ic, index_t pc) {
    blk.a = a_at(g, ic, pc);
    blk.a_packed = false;
    blk.rs_a = g.ta ? 1 : g.lda;
    blk.cs_a = g.ta ? g.lda : 1;
}

// One thread's part of the loop nest.  bp: the shared packed-B buffer (when
// pack_b); tid: this thread's index in the grid (row ti = tid / tn, column
// tj = tid % tn).  oks[tid] reports its scratch allocation; if any thread of the
// team lacks scratch, every thread returns before touching C (returns false).
template <typename T>
bool gemm_thread(const GemmArgs<T>& g, const Plan& pl, T* bp, int tid, bool* oks) {
    using Blk = GemmBlocks<T>;
    constexpr int MR = Blk::MR, NR = Blk::NR;
    const int ti = tid / pl.tn, tj = tid % pl.tn;
    const index_t rows_per = round_up(ceil_div(g.m, pl.tm), MR);
    const index_t r0 = fp_min(g.m, ti * rows_per), r1 = fp_min(g.m, r0 + rows_per);
    const index_t kc_step = k_step<T>(g.m, g.k);
    const index_t kc_max = fp_min(g.k, kc_step);
    T* ap = nullptr;
    T* b_edge = nullptr;
    bool ok = true;
    if (pl.pack_a && r1 > r0) {
        const index_t mc_max = round_up(fp_min(r1 - r0, Blk::MC), MR);
        ap = static_cast<T*>(detail::thread_scratch(0, sizeof(T) * mc_max * kc_max));
        ok = ap != nullptr;
    }
    if (!pl.pack_b) {
        b_edge = static_cast<T*>(detail::thread_scratch(2, sizeof(T) * NR * kc_max));
        ok = ok && b_edge != nullptr;
    }
    // B is shared (packed by the team, barriers) only when several thread rows read
    // it; with a column split (tm == 1) each thread packs its own panels into its own
    // buffer and the loop nest has no barrier at all (a descheduled thread on a busy
    // machine then delays only the final join, not every block).
    const bool shared_b = pl.pack_b && pl.tm > 1;
    // One row block of unpacked A (m <= kUnpackedRowsA per thread) with private B
    // panels: each panel is packed right before its strip is computed, so it is read
    // back from L1 instead of after a whole block of packing has pushed it out to L2.
    const bool interleave = pl.pack_b && !shared_b && !pl.pack_a && r1 - r0 <= Blk::MC;
    T* bp_own = nullptr;
    if (pl.pack_b && !shared_b) {
        const index_t nc_max = fp_min(g.n, Blk::NC);
        const index_t own = ceil_div(ceil_div(nc_max, NR), pl.tn) * NR;
        bp_own = pl.nt == 1 && bp != nullptr
                     ? bp
                     : static_cast<T*>(detail::thread_scratch(1, sizeof(T) * own * kc_max));
        ok = ok && bp_own != nullptr;
    }
    oks[tid] = ok;
    team_barrier(pl.nt);
    for (int t = 0; t < pl.nt; ++t)
        if (!oks[t]) return false;

    for (index_t jc = 0; jc < g.n; jc += Blk::NC) {
        const index_t nc = fp_min(Blk::NC, g.n - jc);
        const index_t strips = ceil_div(nc, NR);
        const index_t per = ceil_div(strips, pl.tn);
        const index_t s0 = fp_min(strips, tj * per), s1 = fp_min(strips, s0 + per);
        for (index_t pc = 0; pc < g.k; pc += kc_step) {
            const index_t kc = fp_min(kc_step, g.k - pc);
            const bool last_k = pc + kc >= g.k;
            const T* b_block = g.tb ? g.b + jc * g.ldb + pc : g.b + pc * g.ldb + jc;
            if (pl.pack_b && !shared_b) {
                // Column split: this thread packs only its own panels, no barrier.
                if (s1 > s0 && !interleave) {
                    const index_t j0 = s0 * NR;
                    const T* src = g.tb ? b_block + j0 * g.ldb : b_block + j0;
                    pack_b<T, NR>(g.tb, kc, fp_min(nc - j0, (s1 - s0) * NR), src, g.ldb, bp_own,
                                  0, s1 - s0);
                }
            } else if (pl.pack_b) {
                // The whole team packs the shared block, one panel range per thread;
                // barriers: nobody still reads the previous block / all panels done.
                team_barrier(pl.nt);
                const index_t pper = ceil_div(strips, pl.nt);
                const index_t p0 = fp_min(strips, tid * pper), p1 = fp_min(strips, p0 + pper);
                pack_b<T, NR>(g.tb, kc, nc, b_block, g.ldb, bp, p0, p1);
                team_barrier(pl.nt);
            } else if (s1 == strips && s1 > s0 && nc % NR != 0) {
                // Unpacked B: a zero-padded copy of the partial last strip.
                const index_t j0 = (strips - 1) * NR;
                pack_b<T, NR>(false, kc, nc - j0, b_block + j0, g.ldb, b_edge, 0, 1);
            }
            if (s1 <= s0) continue;
            const T beta = pc == 0 ? g.beta : T(1);
            for (index_t ic = r0; ic < r1; ic += Blk::MC) {
                const index_t mc = fp_min(Blk::MC, r1 - ic);
                MacroBlock<T> blk{};
                blk.mc = mc, blk.nc = nc, blk.kc = kc;
                if (pl.pack_a) {
                    pack_a<T, MR>(g.ta, mc, kc, a_at(g, ic, pc), g.lda, ap);
                    blk.a = ap, blk.a_packed = true;
                } else {
                    read_a_in_place(blk, g, ic, pc);
                }
                blk.b = !pl.pack_b ? b_block : (shared_b ? bp : bp_own);
                blk.b_first = pl.pack_b && !shared_b ? s0 : 0;
                blk.b_packed = pl.pack_b;
                blk.rs_b = g.ldb;
                blk.b_edge = b_edge;
                blk.c = g.c + ic * g.ldc + jc;
                blk.ldc = g.ldc;
                blk.alpha = g.alpha, blk.beta = beta;
                if (interleave) {
                    for (index_t q = s0; q < s1; q += kInterleavePanels) {
                        const index_t q1 = fp_min(s1, q + kInterleavePanels);
                        const index_t j0 = q * NR;
                        const T* src = g.tb ? b_block + j0 * g.ldb : b_block + j0;
                        pack_b<T, NR>(g.tb, kc, fp_min(nc - j0, (q1 - q) * NR), src, g.ldb,
                                      bp_own, 0, q1 - q);
                        blk.b_first = q;
                        macro_kernel(blk, q, q1, last_k ? g.ep : nullptr, g.c, ic, jc);
                    }
                } else {
                    macro_kernel(blk, s0, s1, last_k ? g.ep : nullptr, g.c, ic, jc);
                }
            }
        }
    }
    return true;
}

// One thread's part of a k-split product (Plan::ksplit): thread tid computes the k
// blocks [kb tid / nt, kb (tid + 1) / nt) over all of C, thread 0 into C (beta for
// its first block, then accumulating, as one thread would), the others each block
// into its own part of scratch (parts[tid]); after a barrier every thread adds the
// parts to its columns of C in block order and applies the epilogue there.  Each
// element is thus fl(...fl(fl(b0 + b1) + b2)...), the serial sum.
template <typename T>
bool gemm_thread_ksplit(const GemmArgs<T>& g, const Plan& pl, int tid, T** parts, bool* oks) {
    using Blk = GemmBlocks<T>;
    constexpr int NR = Blk::NR;
    const index_t kc_step = k_step<T>(g.m, g.k);
    const index_t kb = ceil_div(g.k, kc_step);
    auto first_block = [&](int t) { return kb * t / pl.nt; };
    const index_t b0 = first_block(tid), b1 = first_block(tid + 1);
    const index_t mn = g.m * g.n;
    T* b_edge = static_cast<T*>(detail::thread_scratch(2, sizeof(T) * NR * fp_min(g.k, kc_step)));
    T* part = tid == 0 ? nullptr
                       : static_cast<T*>(detail::thread_scratch(3, sizeof(T) * (b1 - b0) * mn));
    parts[tid] = part;
    oks[tid] = b_edge != nullptr && (tid == 0 || part != nullptr);
    team_barrier(pl.nt);
    for (int t = 0; t < pl.nt; ++t)
        if (!oks[t]) return false;
    for (index_t b = b0; b < b1; ++b) {
        const index_t pc = b * kc_step, kc = fp_min(kc_step, g.k - pc);
        T* dst = tid == 0 ? g.c : part + (b - b0) * mn;
        const index_t ldd = tid == 0 ? g.ldc : g.n;
        const T beta = tid != 0 ? T(0) : (b == 0 ? g.beta : T(1));
        for (index_t jc = 0; jc < g.n; jc += Blk::NC) {
            const index_t nc = fp_min(Blk::NC, g.n - jc);
            const index_t strips = ceil_div(nc, NR);
            const T* b_block = g.b + pc * g.ldb + jc;
            if (nc % NR != 0) {
                const index_t j0 = (strips - 1) * NR;
                pack_b<T, NR>(false, kc, nc - j0, b_block + j0, g.ldb, b_edge, 0, 1);
            }
            for (index_t ic = 0; ic < g.m; ic += Blk::MC) {
                MacroBlock<T> blk{};
                blk.mc = fp_min(Blk::MC, g.m - ic), blk.nc = nc, blk.kc = kc;
                read_a_in_place(blk, g, ic, pc);
                blk.b = b_block, blk.b_first = 0, blk.b_packed = false, blk.rs_b = g.ldb;
                blk.b_edge = b_edge;
                blk.c = dst + ic * ldd + jc, blk.ldc = ldd;
                blk.alpha = g.alpha, blk.beta = beta;
                macro_kernel<T>(blk, index_t(0), strips, nullptr, dst, ic, jc);
            }
        }
    }
    team_barrier(pl.nt);
    const index_t per = ceil_div(ceil_div(g.n, NR), pl.nt) * NR;
    const index_t j0 = fp_min(g.n, tid * per), j1 = fp_min(g.n, j0 + per);
    if (j0 >= j1) return true;
    for (int t = 1; t < pl.nt; ++t) {
        for (index_t b = first_block(t); b < first_block(t + 1); ++b) {
            const T* src = parts[t] + (b - first_block(t)) * mn;
            for (index_t i = 0; i < g.m; ++i) {
                T* FASTPROP_RESTRICT ci = g.c + i * g.ldc;
                const T* FASTPROP_RESTRICT si = src + i * g.n;
                for (index_t j = j0; j < j1; ++j) ci[j] += si[j];
            }
        }
    }
    if (g.ep != nullptr) apply_epilogue(*g.ep, 0, g.m, j0, j1, g.c, g.ldc);
    return true;
}

template <typename T>
void gemm_blocked(const GemmArgs<T>& g) {
    using Blk = GemmBlocks<T>;
    constexpr int kMaxThreads = 256;
    Plan pl = make_plan(g);
    if (pl.nt > kMaxThreads) pl = Plan{1, 1, 1, pl.pack_a, pl.pack_b, false};
    T* bp = nullptr;
    if (pl.pack_b && (pl.tm > 1 || pl.nt == 1)) {  // the shared (or serial) B buffer
        const index_t kc_max = fp_min(g.k, Blk::KC);
        const index_t nc_max = round_up(fp_min(g.n, Blk::NC), Blk::NR);
        bp = static_cast<T*>(detail::thread_scratch(1, sizeof(T) * kc_max * nc_max));
        if (bp == nullptr) return gemm_unpacked(g);
    }
    bool oks[kMaxThreads];
    [[maybe_unused]] T* parts[kMaxThreads];  // (the threaded branch's; none without OpenMP)
    bool done = false;
#if defined(_OPENMP)
    if (pl.nt > 1) {
        detail::note_thread_pool_started(pl.nt);
#pragma omp parallel num_threads(pl.nt)
        {
            const int tid = omp_get_thread_num();
            if (omp_get_num_threads() == pl.nt) {
                const bool r = pl.ksplit ? gemm_thread_ksplit(g, pl, tid, parts, oks)
                                         : gemm_thread(g, pl, bp, tid, oks);
                if (tid == 0) done = r;
            } else if (tid == 0) {  // fewer threads than asked for: run serially
                Plan serial{1, 1, 1, pl.pack_a, pl.pack_b, false};
                done = gemm_thread(g, serial, bp, 0, oks);
            }
        }
        detail::note_team_done();
        if (!done) gemm_unpacked(g);
        return;
    }
#endif
    Plan serial{1, 1, 1, pl.pack_a, pl.pack_b, false};
    done = gemm_thread(g, serial, bp, 0, oks);
    if (!done) gemm_unpacked(g);
}

template <typename T>
void gemm_dispatch(const GemmArgs<T>& g) {
    if (g.m <= 0 || g.n <= 0) return;
    if (g.k <= 0 || g.alpha == T(0)) {
        scale_c(g.m, g.n, g.beta, g.c, g.ldc);
        if (g.ep != nullptr) apply_epilogue(*g.ep, 0, g.m, 0, g.n, g.c, g.ldc);
        return;
    }
    if ((g.m <= kFewRows || g.n == 1) &&
        gemv_shapes(g.ta, g.tb, g.m, g.n, g.k, g.alpha, g.a, g.lda, g.b, g.ldb, g.beta, g.c,
                    g.ldc)) {
        if (g.ep != nullptr) apply_epilogue(*g.ep, 0, g.m, 0, g.n, g.c, g.ldc);
        return;
    }
    if (g.k <= kTinyK && g.n * index_t(sizeof(T)) >= kTinyKRowBytes &&
        tiny_k_form(g.ta, g.tb, g.m, g.n, g.k, g.alpha, g.a, g.lda, g.b, g.ldb, g.beta, g.c,
                    g.ldc, g.ep))
        return;
#if defined(__AVX2__) && defined(__FMA__)
    if constexpr (std::is_same<T, float>::value) {
        if (narrow_n_form(g.ta, g.tb, g.m, g.n, g.k, g.alpha, g.a, g.lda, g.b, g.ldb, g.beta,
                          g.c, g.ldc, g.ep))
            return;
    }
#endif
    gemm_blocked(g);
}

}  // namespace

template <typename T>
void gemm(bool ta, bool tb, index_t m, index_t n, index_t k, T alpha, const T* a,
          index_t lda, const T* b, index_t ldb, T beta, T* c, index_t ldc) {
    gemm_dispatch(GemmArgs<T>{ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, nullptr});
}

template <typename T>
void gemm_ex(bool ta, bool tb, index_t m, index_t n, index_t k, T alpha, const T* a,
             index_t lda, const T* b, index_t ldb, T beta, T* c, index_t ldc,
             const GemmEpilogue<T>& ep) {
    const GemmEpilogue<T>* e = epilogue_is_empty(ep) ? nullptr : &ep;
    gemm_dispatch(GemmArgs<T>{ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, e});
}

template void gemm<float>(bool, bool, index_t, index_t, index_t, float, const float*,
                          index_t, const float*, index_t, float, float*, index_t);
template void gemm<double>(bool, bool, index_t, index_t, index_t, double, const double*,
                           index_t, const double*, index_t, double, double*, index_t);
template void gemm_ex<float>(bool, bool, index_t, index_t, index_t, float, const float*,
                             index_t, const float*, index_t, float, float*, index_t,
                             const GemmEpilogue<float>&);
template void gemm_ex<double>(bool, bool, index_t, index_t, index_t, double, const double*,
                              index_t, const double*, index_t, double, double*, index_t,
                              const GemmEpilogue<double>&);

}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
