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
#pragma once

#include "isa_common.hpp"

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

template <typename T, int MR>
void pack_a(bool trans, index_t mc, index_t kc, const T* FASTPROP_RESTRICT a, index_t lda,
            T* FASTPROP_RESTRICT ap) {
    index_t i0 = 0;
    for (; i0 + MR <= mc; i0 += MR, ap += MR * kc) {
        if (trans) {  // op(A)[i, p] = a[p*lda + i]: MR contiguous values per p
            for (index_t p = 0; p < kc; ++p) {
                const T* src = a + p * lda + i0;
                for (int i = 0; i < MR; ++i) ap[p * MR + i] = src[i];
            }
        } else {  // op(A)[i, p] = a[i*lda + p]: MR rows read side by side
            const T* src = a + i0 * lda;
            for (index_t p = 0; p < kc; ++p)
                for (int i = 0; i < MR; ++i) ap[p * MR + i] = src[i * lda + p];
        }
    }
    if (i0 < mc) {
        const index_t mr = mc - i0;
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
