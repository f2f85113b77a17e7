// linear.cpp - the dense layer y = act(x @ w + b) and its backward pass (per ISA).
//
// Forward: one GEMM (gemm_ex) whose epilogue adds the bias, keeps the
// pre-activation z when asked, and applies the activation while each C strip is in
// L1 (gemm/epilogue.hpp): x @ w + b and act() never make a separate pass over y.
// Softmax is a row operation, not an epilogue: GEMM + bias (+ z) fused, then one
// softmax row pass in place.
// Backward: grad_z = grad_y * act'(.) into the caller's work array and the bias
// gradient grad_b (+)= column sums of grad_z in one fused pass (column strips of
// 256, sums in double over rows in order: deterministic for any thread count);
// identity skips the product (grad_z is grad_y).  Then grad_w (+)= x^T grad_z (TN)
// and grad_x = grad_z w^T (NT) as two GEMMs on the operands in place (no transpose
// is materialised).  When the forward output y is not given for an activation whose
// derivative needs it, it is recomputed from z into work first.
// Accuracy: that of gemm (sums of products in T) and of the activations
// (activations.cpp formulas, vmath.hpp); bias gradient summed in double.
// Speed (2-core Zen4, float32, 784 -> 256 relu, batch 128, 2 threads): forward
// ~1.2-1.4x the NumPy composition np.maximum(x @ w + b, 0); see
// benchmarks/RESULTS.md.
#include "gemm/epilogue.hpp"
#include "isa_common.hpp"
#include "kernels.hpp"

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

// work = grad_y * act'(d) and grad_b (+)= column sums of work, columns [c0, c1).
template <typename T>
void grad_z_and_bias(index_t n, index_t out, index_t c0, index_t c1, const T* grad_y,
                     const T* d, int act, double alpha, T* work, T* grad_b, bool accumulate) {
    constexpr index_t kStrip = 256;
    const T a = T(alpha);
    for (index_t j0 = c0; j0 < c1; j0 += kStrip) {
        const index_t w = fp_min(kStrip, c1 - j0);
        double acc[kStrip];
        for (index_t j = 0; j < w; ++j) acc[j] = 0.0;
        double* sums = grad_b != nullptr ? acc : nullptr;
        const auto rows = [&](auto tag) {
            // work may alias d (y recomputed into work)
            backward_rows<decltype(tag)::value>(n, w, grad_y + j0, out,
                                                d != nullptr ? d + j0 : nullptr, out, a,
                                                work != nullptr ? work + j0 : nullptr, out,
                                                sums);
        };
        if (!with_activation(act, rows)) rows(ActTag<kIdentity>{});  // (softmax: not here)
        if (grad_b == nullptr) continue;
        T* s = grad_b + j0;
        if (accumulate) {
            for (index_t j = 0; j < w; ++j) s[j] = T(double(s[j]) + acc[j]);
        } else {
            for (index_t j = 0; j < w; ++j) s[j] = T(acc[j]);
        }
    }
}

}  // namespace

template <typename T>
void linear_forward(index_t n, index_t in, index_t out, const T* x, const T* w, const T* b,
                    int act, double alpha, T* y, T* z) {
    if (n <= 0 || out <= 0) return;
    GemmEpilogue<T> ep;
    ep.bias = b;
    ep.preact = z;
    ep.ld_preact = out;
    ep.act = act == kSoftmax ? kIdentity : act;
    ep.alpha = alpha;
    gemm_ex<T>(false, false, n, out, in, T(1), x, in, w, out, T(0), y, out, ep);
    if (act == kSoftmax) activation_forward<T>(kSoftmax, alpha, n, out, y, y);
}

template <typename T>
void linear_backward(index_t n, index_t in, index_t out, const T* grad_y, const T* x,
                     const T* w, const T* y, const T* z, int act, double alpha, T* grad_x,
                     T* grad_w, T* grad_b, T* work, bool accumulate) {
    if (out <= 0) {  // (no outputs: grad_x = grad_z w^T is zeros)
        if (grad_x != nullptr)
            for (index_t i = 0; i < n * in; ++i) grad_x[i] = T(0);
        return;
    }
    const T* grad_z = grad_y;
    if (n > 0 && act == kSoftmax) {
        if (y == nullptr) {
            activation_forward<T>(act, alpha, n, out, z, work);
            y = work;
        }
        activation_backward<T>(act, alpha, n, out, grad_y, z, y, work);
        grad_z = work;
        if (grad_b != nullptr) column_sums<T>(n, out, grad_z, grad_b, accumulate);
    } else if (n > 0 && (act != kIdentity || grad_b != nullptr)) {
        const bool needs_y = act != kGelu && act != kGeluErf && act != kIdentity;
        if (needs_y && y == nullptr) {  // recompute the forward output from z
            activation_forward<T>(act, alpha, n, out, z, work);
            y = work;
        }
        const T* d = act == kGelu || act == kGeluErf ? z : y;
        // One chunk of columns per thread: each column summed by one thread.
        const index_t grain = fp_max<index_t>(16, kElementGrain / fp_max<index_t>(n, 1));
        parallel_for(out, grain, [=](index_t c0, index_t c1) {
            grad_z_and_bias(n, out, c0, c1, grad_y, d, act, alpha, work, grad_b, accumulate);
        });
        if (act != kIdentity) grad_z = work;
    } else if (grad_b != nullptr && !accumulate) {
        for (index_t j = 0; j < out; ++j) grad_b[j] = T(0);  // n == 0
    }
    const T beta = accumulate ? T(1) : T(0);
    if (in > 0) gemm<T>(true, false, in, out, n, T(1), x, in, grad_z, out, beta, grad_w, out);
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
