// gemm/gemm_ref_6x2v.hpp - the portable reference micro-kernel, 6 x (2 vectors),
// float and double (generic unit; always built, also on non-x86).
//
// Contract: that of gemm/sgemm_avx2_6x16.hpp with NR = 2 * VL, VL = lanes of the
// baseline vector (16 bytes: SSE on x86-64-v2, NEON on aarch64; 6 x 8 float,
// 6 x 4 double):
//   C[i, j] := alpha * sum_{p<k} A(i, p) B(p, j) + beta * C[i, j],  i < M <= 6,
//   j < nr <= NR; A(i, p) = a[i*rs_a + p*cs_a] (packed: rs_a = 1, cs_a = 6);
//   B(p, j) = b[p*rs_b + j] with NR readable values per row; C[i, j] = c[i*rs_c + j];
//   beta == 0: C is not read.
// Algorithm: the accumulator block as GCC/Clang vector-extension values (12
// registers), which the compiler maps to the target's vector unit; plain scalar
// loops for other compilers.  Columns past nr are computed and dropped.
// Accuracy: one multiply-add chain per element over p in increasing order
// (contracted to FMA only where the target has it).
// Speed (Zen4, SSE4.2 unit, 1 thread): ~30 GFLOP/s float32 (a third of AVX2+FMA).
#pragma once

#include "isa_common.hpp"

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

#if defined(__GNUC__) || defined(__clang__)
typedef float gemm_ref_vf __attribute__((vector_size(16)));
typedef double gemm_ref_vd __attribute__((vector_size(16)));
template <typename T>
struct GemmRefVec;
template <>
struct GemmRefVec<float> {
    using type = gemm_ref_vf;
};
template <>
struct GemmRefVec<double> {
    using type = gemm_ref_vd;
};

template <typename T, int M, int NV, bool PackedA>
inline void gemm_ref_6x2v(index_t k, const T* FASTPROP_RESTRICT a, index_t rs_a,
                          index_t cs_a, const T* FASTPROP_RESTRICT b, index_t rs_b,
                          T* FASTPROP_RESTRICT c, index_t rs_c, index_t nr, T alpha, T beta) {
    using V = typename GemmRefVec<T>::type;
    constexpr int VL = 16 / sizeof(T);
    if (PackedA) rs_a = 1, cs_a = 6;
    V acc[M][NV];
    for (int i = 0; i < M; ++i)
        for (int v = 0; v < NV; ++v) acc[i][v] = V{};
    for (index_t p = 0; p < k; ++p) {
        V bv[NV];
        for (int v = 0; v < NV; ++v) __builtin_memcpy(&bv[v], b + v * VL, sizeof(V));
        for (int i = 0; i < M; ++i) {
            const T ai = a[i * rs_a];
            for (int v = 0; v < NV; ++v) acc[i][v] += ai * bv[v];
        }
        a += cs_a;
        b += rs_b;
    }
    T out[M][NV * VL];
    for (int i = 0; i < M; ++i)
        for (int v = 0; v < NV; ++v) __builtin_memcpy(&out[i][v * VL], &acc[i][v], sizeof(V));
    for (int i = 0; i < M; ++i) {
        T* ci = c + i * rs_c;
        if (beta == T(0)) {
            for (index_t j = 0; j < nr; ++j) ci[j] = alpha * out[i][j];
        } else {
            for (index_t j = 0; j < nr; ++j) ci[j] = alpha * out[i][j] + beta * ci[j];
        }
    }
}
#else
template <typename T, int M, int NV, bool PackedA>
inline void gemm_ref_6x2v(index_t k, const T* a, index_t rs_a, index_t cs_a, const T* b,
                          index_t rs_b, T* c, index_t rs_c, index_t nr, T alpha, T beta) {
    constexpr int VL = 16 / sizeof(T);
    if (PackedA) rs_a = 1, cs_a = 6;
    T acc[M][NV * VL] = {};
    for (index_t p = 0; p < k; ++p)
        for (int i = 0; i < M; ++i)
            for (int j = 0; j < NV * VL; ++j) acc[i][j] += a[i * rs_a + p * cs_a] * b[p * rs_b + j];
    for (int i = 0; i < M; ++i)
        for (index_t j = 0; j < nr; ++j)
            c[i * rs_c + j] = beta == T(0) ? alpha * acc[i][j] : alpha * acc[i][j] + beta * c[i * rs_c + j];
}
#endif

}  // namespace
}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
