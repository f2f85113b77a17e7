// activations.cpp - activation functions forward and backward (per ISA unit).
//
// Computes y = act(x) and grad_x = grad_y * act'(.) for identity, relu, leaky_relu,
// sigmoid, tanh, gelu (tanh approximation) and row-wise softmax, on (rows, cols)
// C-contiguous arrays; y may alias x and grad_x may alias grad_y.
//
// Algorithm: one pass per element (softmax: per row max, exp, sum, scale), all
// vectorised: exp and tanh come from vmath.hpp (Cephes polynomials), row sums use
// 8 double partial sums.  Split over OpenMP threads for large arrays
// (isa_common.hpp: from 32k elements for exp/tanh, 256k for the rest).  Backward
// of relu, leaky_relu, sigmoid, tanh and softmax uses the forward output y; gelu
// uses x.
// Formulas:
//   sigmoid(x) = 1/(1+e) for x >= 0 and e/(1+e) for x < 0 with e = exp(-|x|)
//   gelu(x)    = 0.5 x (1 + tanh(u)) = x s, s = sigmoid(2u),
//                u = sqrt(2/pi) (x + 0.044715 x^3);
//   gelu'(x)   = s + 2 x s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 x^2), with s (1 - s)
//                computed as e / (1 + e)^2, e = exp(-|2u|) (1 - s cancels where s ~ 1)
//   softmax    = exp(x - max) / sum, sum accumulated in double.
// Speed (1 thread, float32, avx512 unit, Zen4): relu ~7-11 Gelem/s, sigmoid ~3,
// tanh/gelu ~2, softmax ~1.0-1.3 Gelem/s (NumPy: tanh 2.7, sigmoid expression 0.25).
// Accuracy: forward results are within a few ulp of T (vmath.hpp), except gelu and
// gelu' in the negative tail, where exp's conditioning gives a relative error of about
// (3 |2u| + 8) ulp (float32: at most 214 ulp, at x = -10.04; vmath.hpp); the gelu
// form has no cancellation for x << 0, so it is more accurate there than the literal
// 0.5 x (1 + tanh(u)) (PyTorch's loses every digit below x ~ -5.5).  sigmoid' and
// tanh' are computed from the output y, y (1 - y) and 1 - y^2, as PyTorch's are: their
// error is a few eps absolute, not relative, so near saturation they lose digits
// (float32 tanh' for |x| in [4, 8) is off by up to ~2e6 ulp of its tiny value; 0 from
// |x| ~ 8.7, sigmoid' 0 from x ~ 16.6; the kernels keep y, not x, for them).  No
// overflow or NaN for finite |x| <= 1e4.
#include "isa_common.hpp"
#include "kernels.hpp"
#include "vmath.hpp"

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

// Rows per thread: enough rows for `grain` elements.
inline index_t row_grain(index_t cols, index_t grain) {
    const index_t g = grain / (cols > 0 ? cols : 1);
    return g > 0 ? g : 1;
}

template <typename T>
void softmax_rows(index_t r0, index_t r1, index_t cols, const T* x, T* y) {
    for (index_t r = r0; r < r1; ++r) {
        const T* xr = x + r * cols;
        T* yr = y + r * cols;
        const T mx = max_of(xr, cols);
        for (index_t j = 0; j < cols; ++j) yr[j] = vexp(xr[j] - mx);
        const T inv = T(1.0 / sum_double(yr, cols));
        for (index_t j = 0; j < cols; ++j) yr[j] *= inv;
    }
}

template <typename T>
void softmax_backward_rows(index_t r0, index_t r1, index_t cols, const T* gy, const T* y,
                           T* gx) {
    for (index_t r = r0; r < r1; ++r) {
        const T* gr = gy + r * cols;
        const T* yr = y + r * cols;
        T* out = gx + r * cols;
        const T d = T(dot_double(gr, yr, cols));
        for (index_t j = 0; j < cols; ++j) out[j] = yr[j] * (gr[j] - d);
    }
}

}  // namespace

template <typename T>
void activation_forward(int act, double alpha, index_t rows, index_t cols, const T* x, T* y) {
    const index_t size = rows * cols;
    if (size <= 0) return;
    if (act == kSoftmax) {
        parallel_for(rows, row_grain(cols, kExpGrain), [=](index_t r0, index_t r1) {
            softmax_rows(r0, r1, cols, x, y);
        });
        return;
    }
    const bool cheap = act == kIdentity || act == kRelu || act == kLeakyRelu;
    parallel_for(size, cheap ? kElementGrain : kExpGrain, [=](index_t i0, index_t i1) {
        const T a = T(alpha);  // a local: a captured T could alias the stores to y
        switch (act) {
            case kIdentity:
                if (x != y)
                    for (index_t i = i0; i < i1; ++i) y[i] = x[i];
                break;
            case kRelu:  // x < 0 ? 0 : x keeps NaN, like np.maximum
                for (index_t i = i0; i < i1; ++i) y[i] = x[i] < T(0) ? T(0) : x[i];
                break;
            case kLeakyRelu:
                for (index_t i = i0; i < i1; ++i) y[i] = x[i] > T(0) ? x[i] : x[i] * a;
                break;
            case kSigmoid:
                vsigmoid_span(x + i0, y + i0, i1 - i0);
                break;
            case kTanh:
                vtanh_span(x + i0, y + i0, i1 - i0);
                break;
            case kGelu:
                vgelu_span(x + i0, y + i0, i1 - i0);
                break;
            case kGeluErf:
                for (index_t i = i0; i < i1; ++i) y[i] = gelu_erf_value(x[i]);
                break;
            default:
                break;
        }
    });
}

template <typename T>
void activation_backward(int act, double alpha, index_t rows, index_t cols, const T* gy,
                         const T* x, const T* y, T* gx) {
    const index_t size = rows * cols;
    if (size <= 0) return;
    if (act == kSoftmax) {
        parallel_for(rows, row_grain(cols, kElementGrain), [=](index_t r0, index_t r1) {
            softmax_backward_rows(r0, r1, cols, gy, y, gx);
        });
        return;
    }
    const bool cheap_grad = act != kGelu && act != kGeluErf;
    parallel_for(size, cheap_grad ? kElementGrain : kExpGrain, [=](index_t i0, index_t i1) {
        const T a = T(alpha);  // a local: a captured T could alias the stores to gx
        switch (act) {
            case kIdentity:
                if (gx != gy)
                    for (index_t i = i0; i < i1; ++i) gx[i] = gy[i];
                break;
            case kRelu:
                for (index_t i = i0; i < i1; ++i) gx[i] = gy[i] * (y[i] > T(0) ? T(1) : T(0));
                break;
            case kLeakyRelu:
                for (index_t i = i0; i < i1; ++i) gx[i] = gy[i] * (y[i] > T(0) ? T(1) : a);
                break;
            case kSigmoid:
                for (index_t i = i0; i < i1; ++i) gx[i] = gy[i] * (y[i] * (T(1) - y[i]));
                break;
            case kTanh:
                for (index_t i = i0; i < i1; ++i) gx[i] = gy[i] * (T(1) - y[i] * y[i]);
                break;
            case kGelu:
                vgelu_grad_span(gy + i0, x + i0, gx + i0, i1 - i0);
                break;
            case kGeluErf:
                for (index_t i = i0; i < i1; ++i) gx[i] = gy[i] * gelu_erf_derivative(x[i]);
                break;
            default:
                break;
        }
    });
}

template void activation_forward<float>(int, double, index_t, index_t, const float*, float*);
template void activation_forward<double>(int, double, index_t, index_t, const double*,
                                         double*);
template void activation_backward<float>(int, double, index_t, index_t, const float*,
                                         const float*, const float*, float*);
template void activation_backward<double>(int, double, index_t, index_t, const double*,
                                          const double*, const double*, double*);

}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
