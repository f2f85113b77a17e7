// linear.cpp - the dense layer y = act(x @ w + b) and its backward pass (per ISA).
//
// Forward: one GEMM into z (or straight into y when z is not kept), a bias pass and
// the activation in place.  Backward: grad_z = grad_y * act'(.) into the caller's
// work array (identity uses grad_y directly), then grad_w (+)= x^T grad_z and
// grad_x = grad_z w^T as two GEMMs with transposed operands (no transpose is
// materialised) and grad_b (+)= column sums of grad_z accumulated in double.
// When the forward output y is not given for an activation whose derivative needs
// it, it is recomputed from z into work first.
// Accuracy: that of gemm (sums of products in T) and of the activations.
#include "isa_common.hpp"
#include "kernels.hpp"

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

template <typename T>
void add_bias_rows(index_t n, index_t out, const T* FASTPROP_RESTRICT b,
                   T* FASTPROP_RESTRICT z) {
    const index_t grain = fp_max<index_t>(1, kElementGrain / fp_max<index_t>(out, 1));
    parallel_for(n, grain, [=](index_t r0, index_t r1) {
        for (index_t r = r0; r < r1; ++r) {
            T* zr = z + r * out;
            for (index_t j = 0; j < out; ++j) zr[j] += b[j];
        }
    });
}

}  // namespace

template <typename T>
void linear_forward(index_t n, index_t in, index_t out, const T* x, const T* w, const T* b,
                    int act, double alpha, T* y, T* z) {
    if (n <= 0 || out <= 0) return;
    T* pre = z != nullptr ? z : y;
    gemm<T>(false, false, n, out, in, T(1), x, in, w, out, T(0), pre, out);
    if (b != nullptr) add_bias_rows(n, out, b, pre);
    if (act != kIdentity || pre != y) activation_forward<T>(act, alpha, n, out, pre, y);
}

template <typename T>
void linear_backward(index_t n, index_t in, index_t out, const T* grad_y, const T* x,
                     const T* w, const T* y, const T* z, int act, double alpha, T* grad_x,
                     T* grad_w, T* grad_b, T* work, bool accumulate) {
    if (out <= 0) return;
    const T* grad_z = grad_y;
    if (act != kIdentity && n > 0) {
        const bool needs_y = act != kGelu;
        if (needs_y && y == nullptr) {  // recompute the forward output from z
            activation_forward<T>(act, alpha, n, out, z, work);
            y = work;
        }
        activation_backward<T>(act, alpha, n, out, grad_y, z, y, work);
        grad_z = work;
    }
    const T beta = accumulate ? T(1) : T(0);
    if (in > 0) gemm<T>(true, false, in, out, n, T(1), x, in, grad_z, out, beta, grad_w, out);
    if (grad_b != nullptr) column_sums<T>(n, out, grad_z, grad_b, accumulate);
    if (grad_x != nullptr && in > 0)
        gemm<T>(false, true, n, in, out, T(1), grad_z, out, w, out, T(0), grad_x, in);
}

template void linear_forward<float>(index_t, index_t, index_t, const float*, const float*,
                                    const float*, int, double, float*, float*);
template void linear_forward<double>(index_t, index_t, index_t, const double*,
                                     const double*, const double*, int, double, double*,
                                     double*);
template void linear_backward<float>(index_t, index_t, index_t, const float*, const float*,
                                     const float*, const float*, const float*, int, double,
                                     float*, float*, float*, float*, bool);
template void linear_backward<double>(index_t, index_t, index_t, const double*,
                                      const double*, const double*, const double*,
                                      const double*, int, double, double*, double*, double*,
                                      double*, bool);

}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
