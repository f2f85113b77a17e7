// gemm/gemm_config.hpp - the block-size table: register tile and cache blocks per ISA
// unit and dtype, and the size thresholds of the GEMM driver (per ISA unit).
//
// One row per (ISA, dtype), BLIS style; the driver (gemm.cpp) reads nothing else.
//   MR x NR   register tile of the micro-kernel (MR rows of C, NR columns: NR / VL
//             vectors of VL lanes; 2 * MR accumulators);
//   KC        depth of a packed block: one MR x KC sliver of A and one KC x NR
//             sliver of B stay in L1 (32 KiB) while a tile is computed;
//   MC        rows of a packed A block (MC x KC stays in L2: 1 MiB per core on Zen4);
//   NC        columns of a packed B block (KC x NC shared by both cores in L3).
// Measured on the 2-core Zen4 dev box (float32, avx2, 1 thread, n = 1024): KC 256 ->
// 384 and MC 120 -> 144 gave +3%; larger KC/MC lost again (L1/L2 misses).
//
// Thresholds:
//   kSmallWork    m*n*k at or below which nothing is packed (the micro-kernel reads
//                 A through its strides and B through its rows; NT/TT pack only B):
//                 packing A costs a pass over it that a small product cannot repay.
//   kUnpackedRowsA  at most this many rows of op(A): A is never packed (it stays in
//                 L1/L2 and the strided micro-kernel reads it as fast as panels).
//   kUnpackedRowsB  at most this many rows of op(A): B (NN/TN) is read in place, not
//                 packed; each B element serves only m FMAs, too few to repay copying
//                 it (32x784x256 with 2 threads: 95 -> 80 us; the MLP step at batch 32
//                 337 -> 320 us).
//   kSharedBRows  rows per thread at which a row split's shared B block costs twice
//                 its share of the work (gemm.cpp, make_plan: the grid's cost model).
//   kFlopGrain    flops per thread before a second thread is used: 2 threads from
//                 256 kFLOP.  On a quiet machine 2 threads pay from there (float32, 2
//                 threads vs 1, us: 64^3 4.4 vs 5.7, 100x100x30 5.5 vs 7.6, the
//                 n = 10 output layer 200x128x10 6.6 vs 8.8, its NT backward
//                 200x10x128 7.5 vs 7.9; 32x128x32 at the limit: equal), so the
//                 scikit-learn digits step (batch 200, 64-256-128-10) went from 365
//                 to 352 us.  Earlier, 4 -> 1 MFLOP took the MLP training step at
//                 batch 32/128/512 from 433/1082/3828 to 343/857/3118 us.  On an
//                 oversubscribed machine a worker that is not running when a region
//                 starts costs a scheduler timeslice (4-20 ms, measured on the shared
//                 dev box): there threads_free() (runtime.hpp) runs the kernels with
//                 fewer threads, whatever this threshold.
#pragma once

#include "isa_common.hpp"

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

template <typename T>
struct GemmBlocks;

// The part of a forward epilogue that a micro-kernel applies to a full tile in
// registers, before its store (gemm/ukernel.hpp, macro_kernel.hpp): C += bias[j]
// (bias at the tile's first column; null: none), then relu.
template <typename T>
struct TileEpilogue {
    const T* bias = nullptr;
    bool relu = false;
};

#if defined(__AVX2__) && defined(__FMA__)
// avx2 unit: gemm/sgemm_avx2_6x16.hpp, gemm/dgemm_avx2_6x8.hpp (16 ymm registers:
// 12 accumulators, 2 B vectors, 1 A broadcast).  The avx512 unit runs the same
// 256-bit float kernel with 8 rows: AVX-512VL gives it 32 ymm registers (16
// accumulators, 2 B vectors, 1 A broadcast; Zen4 splits 512-bit FMAs, so wider
// vectors would not compute faster), and 8 rows split the small batches of an MLP
// (32, 64, 200) into whole tiles with a B row loaded per 16 FMAs instead of 12
// (float32 32x784x256: 1 thread 141 -> 134 us, 2 threads 79-80 -> 67-74 us).
template <>
struct GemmBlocks<float> {
#if defined(__AVX512VL__)
    static constexpr int MR = 8, NR = 16;
#else
    static constexpr int MR = 6, NR = 16;
#endif
    static constexpr index_t KC = 384, MC = 144, NC = 4080;
};
template <>
struct GemmBlocks<double> {  // 8 x 8 in the avx512 unit: no faster (~53 GFLOP/s, 1 thread)
    static constexpr int MR = 6, NR = 8;
    static constexpr index_t KC = 256, MC = 96, NC = 2040;
};
#else
// generic unit: gemm/gemm_ref_6x2v.hpp on the baseline vectors (SSE 16 bytes on
// x86-64-v2, NEON on aarch64): 6 rows x 2 vectors.
template <>
struct GemmBlocks<float> {
    static constexpr int MR = 6, NR = 8;
    static constexpr index_t KC = 256, MC = 120, NC = 3072;
};
template <>
struct GemmBlocks<double> {
    static constexpr int MR = 6, NR = 4;
    static constexpr index_t KC = 256, MC = 96, NC = 2048;
};
#endif

constexpr index_t kSmallWork = index_t(96) * 96 * 96;
constexpr index_t kUnpackedRowsA = 128;
constexpr index_t kUnpackedRowsB = 48;
constexpr index_t kFlopGrain = index_t(1) << 17;
constexpr index_t kInterleavePanels = 1;
constexpr index_t kSharedBRows = 32;

}  // namespace
}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
