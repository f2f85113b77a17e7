// gemm/ukernel.hpp - this ISA unit's micro-kernels behind one interface (per ISA).
//
// GemmUkr<T>::run<PackedA>(m, k, a, rs_a, cs_a, b, rs_b, c, rs_c, nr, alpha, beta)
// computes one tile C[0:m, 0:nr] := alpha * A B + beta * C (m <= MR, nr <= NR; the
// contract of gemm/sgemm_avx2_6x16.hpp) by choosing the instantiation for m rows and
// for 1 or 2 vectors of columns, so edge tiles do only the work they need:
//   avx2 unit     sgemm_avx2_6x16 (float), dgemm_avx2_6x8 (double);
//   generic unit  gemm_ref_6x2v (float 6 x 8, double 6 x 4 on 16-byte vectors).
#pragma once

#include "gemm/gemm_config.hpp"
#if defined(__AVX2__) && defined(__FMA__)
#include "gemm/dgemm_avx2_6x8.hpp"
#include "gemm/sgemm_avx2_6x16.hpp"
#else
#include "gemm/gemm_ref_6x2v.hpp"
#endif

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

#if defined(__AVX2__) && defined(__FMA__)
template <int M, int NV, bool PackedA>
struct UkrImpl {
    static constexpr bool kTileEpilogue = true;
    static void run(index_t k, const float* a, index_t rs_a, index_t cs_a, const float* b,
                    index_t rs_b, float* c, index_t rs_c, index_t nr, float alpha, float beta,
                    const TileEpilogue<float>* tep) {
        if (tep != nullptr)  // its own instantiation: the plain one's code is unchanged
            sgemm_avx2_6x16<M, NV, PackedA, true>(k, a, rs_a, cs_a, b, rs_b, c, rs_c, nr,
                                                  alpha, beta, tep);
        else
            sgemm_avx2_6x16<M, NV, PackedA>(k, a, rs_a, cs_a, b, rs_b, c, rs_c, nr, alpha,
                                            beta);
    }
    static void run(index_t k, const double* a, index_t rs_a, index_t cs_a, const double* b,
                    index_t rs_b, double* c, index_t rs_c, index_t nr, double alpha,
                    double beta, const TileEpilogue<double>* tep) {
        if (tep != nullptr)
            dgemm_avx2_6x8<M, NV, PackedA, true>(k, a, rs_a, cs_a, b, rs_b, c, rs_c, nr, alpha,
                                                 beta, tep);
        else
            dgemm_avx2_6x8<M, NV, PackedA>(k, a, rs_a, cs_a, b, rs_b, c, rs_c, nr, alpha, beta);
    }
};
#else
template <int M, int NV, bool PackedA>
struct UkrImpl {
    static constexpr bool kTileEpilogue = false;  // the epilogue pass applies it
    template <typename T>
    static void run(index_t k, const T* a, index_t rs_a, index_t cs_a, const T* b,
                    index_t rs_b, T* c, index_t rs_c, index_t nr, T alpha, T beta,
                    const TileEpilogue<T>*) {
        gemm_ref_6x2v<T, M, NV, PackedA>(k, a, rs_a, cs_a, b, rs_b, c, rs_c, nr, alpha, beta);
    }
};
#endif

template <typename T>
struct GemmUkr {
    static constexpr int MR = GemmBlocks<T>::MR, NR = GemmBlocks<T>::NR;
    static constexpr int VL = NR / 2;

    // Whether the micro-kernels apply a TileEpilogue (full tiles); if not, tep is ignored.
    static constexpr bool kTileEpilogue = UkrImpl<1, 1, true>::kTileEpilogue;

    template <bool PackedA, int NV>
    static void run_nv(int m, index_t k, const T* a, index_t rs_a, index_t cs_a, const T* b,
                       index_t rs_b, T* c, index_t rs_c, index_t nr, T alpha, T beta,
                       const TileEpilogue<T>* tep) {
        if constexpr (MR >= 8) {
            if (m == 8) return UkrImpl<8, NV, PackedA>::run(k, a, rs_a, cs_a, b, rs_b, c, rs_c, nr, alpha, beta, tep);
            if (m == 7) return UkrImpl<7, NV, PackedA>::run(k, a, rs_a, cs_a, b, rs_b, c, rs_c, nr, alpha, beta, tep);
        }
        switch (m) {
            case 6: UkrImpl<6, NV, PackedA>::run(k, a, rs_a, cs_a, b, rs_b, c, rs_c, nr, alpha, beta, tep); break;
            case 5: UkrImpl<5, NV, PackedA>::run(k, a, rs_a, cs_a, b, rs_b, c, rs_c, nr, alpha, beta, tep); break;
            case 4: UkrImpl<4, NV, PackedA>::run(k, a, rs_a, cs_a, b, rs_b, c, rs_c, nr, alpha, beta, tep); break;
            case 3: UkrImpl<3, NV, PackedA>::run(k, a, rs_a, cs_a, b, rs_b, c, rs_c, nr, alpha, beta, tep); break;
            case 2: UkrImpl<2, NV, PackedA>::run(k, a, rs_a, cs_a, b, rs_b, c, rs_c, nr, alpha, beta, tep); break;
            default: UkrImpl<1, NV, PackedA>::run(k, a, rs_a, cs_a, b, rs_b, c, rs_c, nr, alpha, beta, tep); break;
        }
    }

    template <bool PackedA>
    static void run(int m, index_t k, const T* a, index_t rs_a, index_t cs_a, const T* b,
                    index_t rs_b, T* c, index_t rs_c, index_t nr, T alpha, T beta,
                    const TileEpilogue<T>* tep = nullptr) {
        if (nr > VL)
            run_nv<PackedA, 2>(m, k, a, rs_a, cs_a, b, rs_b, c, rs_c, nr, alpha, beta, tep);
        else
            run_nv<PackedA, 1>(m, k, a, rs_a, cs_a, b, rs_b, c, rs_c, nr, alpha, beta, tep);
    }
};

}  // namespace
}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
