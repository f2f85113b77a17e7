// gemm/macro_kernel.hpp - the BLIS macro-kernel: one mc x nc block of C from an A
// block and a B block, by micro-kernel tiles (per ISA unit).
//
// For each NR-column strip jr (in [s0, s1) of the block's strips) and each MR-row
// tile ir: the micro-kernel (gemm/ukernel.hpp) computes the MR x NR tile of C over
// the block's kc.  Operands come either packed (A: MR-row panels, B: NR-column
// panels; gemm/pack.hpp) or unpacked, described by strides:
//   A(i, p) = a[i*rs_a + p*cs_a]   (packed: panel r at a + r*MR*kc, rs_a = 1, cs_a = MR)
//   B(p, j) = b[p*rs_b + j]        (packed: panel s at b + s*NR*kc, rs_b = NR;
//                                   unpacked: rows of op(B) with unit column stride;
//                                   a partial last strip comes from `b_edge`, a
//                                   zero-padded kc x NR copy)
// After a strip is done in the last k block, the epilogue (when ep is given) runs on
// it (mc x NR of C, still in L1).  The backward epilogue (it reads a second (m, n)
// array and sums columns) runs instead once all strips are done, over whole rows of
// the block, when rows are a multiple of 2 KiB apart (few_l1_sets): a strip then
// reads one cache line per row, all in a few L1 sets, and they evict each other
// (float64 NT 200x256x128 with relu' and column sums, 1 thread: 303 -> 265 us; float32
// 1024x1024x64, 2 threads: 1.17-1.21 -> 0.91-0.95 ms).  At other strides the strip
// form measured as fast or faster (float32 200x256x128, 2 threads: 70 vs 87 us).
// row0/col0 place the block in C, whose [0, 0] is c00.
// Loop order jr-outer, ir-inner: one B sliver (kc x NR) stays in L1
// while the A block streams from L2.
#pragma once

#include "gemm/epilogue.hpp"
#include "gemm/ukernel.hpp"

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

template <typename T>
struct MacroBlock {
    index_t mc, nc, kc;        // block size
    const T* a;                // packed panels, or op(A)[ic, pc] for unpacked
    index_t rs_a, cs_a;        // strides of unpacked A
    bool a_packed;
    const T* b;                // packed panels (panel s at b + (s - b_first)*NR*kc), or
                               // op(B)[pc, jc] for unpacked
    index_t b_first;           // first panel held in b (private per-thread packing)
    index_t rs_b;              // row stride of unpacked B
    bool b_packed;
    const T* b_edge;           // unpacked B: kc x NR copy of a partial last strip
    T* c;                      // C[ic, jc]
    index_t ldc;
    T alpha, beta;
};

// Rows ld elements apart fall into at most 2 of the 64 sets of a 32 KiB 8-way L1
// when the row stride is a multiple of 2 KiB (widths 256 float64, 512 float32, ...),
// so a strip's lines (one per row, mc rows) evict each other.
template <typename T>
inline bool few_l1_sets(index_t ld) {
    return ld > 0 && (ld * index_t(sizeof(T))) % 2048 == 0;
}

template <typename T>
void macro_kernel(const MacroBlock<T>& blk, index_t s0, index_t s1,
                  const GemmEpilogue<T>* ep, T* c00, index_t row0, index_t col0) {
    using U = GemmUkr<T>;
    constexpr int MR = U::MR, NR = U::NR;
    const index_t kc = blk.kc;
    const bool by_rows = ep != nullptr && s1 > s0 && epilogue_reads_rows(*ep) &&
                         (few_l1_sets<T>(blk.ldc) || few_l1_sets<T>(ep->ld_dsrc));
    // A bias + relu/identity epilogue goes into the micro-kernel's stores on full
    // strips of packed A (no reload of C; epilogue.hpp's pass stays for partial strips).
    // Not with unpacked A, where the fused form measured slower than the pass (float32
    // 128x784x256 + bias + relu, 1 thread: 481 -> 502 us; that kernel also holds
    // eight row offsets in general registers).
    const bool in_tile = U::kTileEpilogue && blk.a_packed && ep != nullptr &&
                         tile_epilogue_fits(*ep);
    TileEpilogue<T> tep;
    if (in_tile) tep.relu = ep->act == kRelu;
    for (index_t s = s0; s < s1; ++s) {
        const index_t jr = s * NR;
        const index_t nr = fp_min<index_t>(NR, blk.nc - jr);
        const T* bs;
        index_t rs_b;
        if (blk.b_packed) {
            bs = blk.b + (s - blk.b_first) * NR * kc, rs_b = NR;
        } else if (nr < NR) {
            bs = blk.b_edge, rs_b = NR;
        } else {
            bs = blk.b + jr, rs_b = blk.rs_b;
        }
        T* cs = blk.c + jr;
        const bool fused = in_tile && nr == NR;
        if (fused && ep->bias != nullptr) tep.bias = ep->bias + col0 + jr;
        const TileEpilogue<T>* te = fused ? &tep : nullptr;
        if (blk.a_packed) {
            for (index_t ir = 0; ir < blk.mc; ir += MR) {
                const int mr = static_cast<int>(fp_min<index_t>(MR, blk.mc - ir));
                U::template run<true>(mr, kc, blk.a + ir * kc, 1, MR, bs, rs_b,
                                      cs + ir * blk.ldc, blk.ldc, nr, blk.alpha, blk.beta,
                                      te);
            }
        } else {
            // Unpacked A can be split anywhere: the last MR+1..2MR-1 rows go into two
            // near-equal tiles (32 rows: 6,6,6,6,4,4 instead of 6,6,6,6,6,2), since a
            // 1- or 2-row tile has too few independent FMA chains to run at speed.
            for (index_t ir = 0; ir < blk.mc;) {
                const index_t rem = blk.mc - ir;
                const int mr = static_cast<int>(rem >= 2 * MR ? MR
                                                : rem > MR ? (rem + 1) / 2 : rem);
                U::template run<false>(mr, kc, blk.a + ir * blk.rs_a, blk.rs_a, blk.cs_a, bs,
                                       rs_b, cs + ir * blk.ldc, blk.ldc, nr, blk.alpha,
                                       blk.beta);  // (no tile epilogue: in_tile needs packed A)
                ir += mr;
            }
        }
        if (ep != nullptr && !by_rows && !fused)
            apply_epilogue(*ep, row0, row0 + blk.mc, col0 + jr, col0 + jr + nr,
                           c00, blk.ldc);
    }
    if (by_rows)
        apply_epilogue(*ep, row0, row0 + blk.mc, col0 + s0 * NR,
                       col0 + fp_min(s1 * NR, blk.nc), c00, blk.ldc, true);
}

}  // namespace
}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
