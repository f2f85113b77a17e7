// norms.cpp - batch normalisation (statistics per column over the batch) and layer
// normalisation (statistics per row over the features), forward and backward
// (per ISA unit).  x is (n, f), C-contiguous.
//
// Algorithm: batch norm walks 256-column strips (double accumulators on the stack,
// rows streamed in order): a pass for the mean, one for the biased variance
// (two-pass, no cancellation; float32 one shifted pass, bounded below, column_moments),
// one for y; strips run on separate threads when the tensor is large.  Layer norm
// does the same per row (16-lane row sums, isa_common.hpp; a float32 row converted
// to double once), rows split over threads.
// Backward uses the saved mean and invstd:
//   xhat = (x - mean) invstd
//   batch: grad_x = gamma invstd / n (n g - sum_rows g - xhat sum_rows(g xhat))
//   layer: gh = g gamma; grad_x = invstd / f (f gh - sum_cols gh - xhat sum_cols(gh xhat))
//   grad_gamma += sum_rows(g xhat), grad_beta += sum_rows g (sums rounded to T, added in T)
// Speed (1 thread, 1024 x 512 float32, Zen4): batch norm forward/backward ~0.35 ms
// each, layer norm ~0.37 / 0.72 ms (NumPy reference 4.6-10.8 ms).
// Accuracy: statistics, xhat and outputs are computed in double and rounded to T
// once, matching the NumPy reference to about one ulp of T (float32 batch statistics
// from one shifted pass, column_moments, with the bounds given there).  Backward recomputes xhat
// from the mean and invstd as saved, rounded to T (as PyTorch does): on float32 data
// whose mean is ~1e6 times its spread the rounding of the mean shows in grad_x (mean
// 1e4, std 0.01: 2e-3 relative for batch norm, 3e-2 for layer norm; PyTorch float32
// 4e-3 and 7e-2).
#include "isa_common.hpp"
#include "kernels.hpp"

#include <type_traits>

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

constexpr index_t kStrip = 256;

// body(j0, w) over the 256-column strips of f columns, strips split over threads
// when rows * f is large.
template <typename F>
void for_each_strip(index_t rows, index_t f, F&& body) {
    const index_t strips = (f + kStrip - 1) / kStrip;
    const index_t per_strip = fp_max<index_t>(1, rows * kStrip);
    const index_t grain = fp_max<index_t>(1, kElementGrain / per_strip);
    parallel_for(strips, grain, [&](index_t s0, index_t s1) {
        for (index_t s = s0; s < s1; ++s) {
            const index_t j0 = s * kStrip;
            body(j0, fp_min(kStrip, f - j0));
        }
    });
}

// Column means and sums of squared deviations (in double) of the w columns from j0
// over the n rows of x: the statistics of batch norm's forward and of its
// running-statistics update.
//   float64: two passes (the mean, then the squared deviations from it).
//   float32: one pass over d = x - k, k the column's first value (0 if not finite):
//     mean = k + S1/n, sum of squared deviations S2 - S1 (S1/n), two rows at a time.
//     S2 - S1^2/n cancels at most a factor n + 1 (k is one of the values, so
//     (k - mean)^2 <= the sum of squared deviations), and x - k, d^2 and the sums
//     are exact or rounded in double, 29 bits finer than float32.  Bounds: the mean
//     within ~n^1.5 2^-53 of the column's standard deviation (3e-11 at n = 4096), the
//     variance within ~n^2 2^-53 relative (2e-9).  So the statistics round to the
//     same float32 as two passes' except near a rounding boundary, or where the
//     first value is an extreme outlier: a mean near 0 next to a first value 1e4
//     standard deviations out is then off by many of its own (tiny) ulps, still
//     ~1e-11 of the spread, and at n = 2^22 with a first value 1e6 out invstd moved
//     by up to 8 ulps (a review's reproduction).  None differed in the tests'
//     random columns (means up to 1e6 times the spread, outliers 1e3 out).
//     Half the passes over x, which is what a large batch's forward waits on (4096 x
//     256 float32 forward, 1 thread: 774 -> 469 us with the output pass below).
template <typename T>
inline void column_moments(index_t n, index_t f, const T* x, index_t j0, index_t w,
                           double* mu, double* ss) {
    const double inv_n = 1.0 / double(n);
    for (index_t j = 0; j < w; ++j) mu[j] = ss[j] = 0.0;
    if (std::is_same<T, float>::value) {
        double k[kStrip];
        for (index_t j = 0; j < w; ++j) {
            const double v = double(x[j0 + j]);
            k[j] = v - v == 0.0 ? v : 0.0;
        }
        index_t r = 0;
        for (; r + 2 <= n; r += 2) {
            const T* FASTPROP_RESTRICT xr = x + r * f + j0;
            const T* FASTPROP_RESTRICT xs = xr + f;
            for (index_t j = 0; j < w; ++j) {
                const double d = double(xr[j]) - k[j], e = double(xs[j]) - k[j];
                mu[j] += d + e;
                ss[j] += d * d + e * e;
            }
        }
        for (; r < n; ++r) {
            const T* FASTPROP_RESTRICT xr = x + r * f + j0;
            for (index_t j = 0; j < w; ++j) {
                const double d = double(xr[j]) - k[j];
                mu[j] += d;
                ss[j] += d * d;
            }
        }
        for (index_t j = 0; j < w; ++j) {
            const double m = mu[j] * inv_n;
            ss[j] -= mu[j] * m;
            mu[j] = k[j] + m;
        }
        return;
    }
    for (index_t r = 0; r < n; ++r) {
        const T* xr = x + r * f + j0;
        for (index_t j = 0; j < w; ++j) mu[j] += double(xr[j]);
    }
    for (index_t j = 0; j < w; ++j) mu[j] *= inv_n;
    for (index_t r = 0; r < n; ++r) {
        const T* xr = x + r * f + j0;
        for (index_t j = 0; j < w; ++j) {
            const double d = double(xr[j]) - mu[j];
            ss[j] += d * d;
        }
    }
}

inline index_t row_grain(index_t f) { return fp_max<index_t>(1, kElementGrain / fp_max<index_t>(f, 1)); }

// Layer norm: column sums of g and g * xhat over the rows of one strip, added to
// grad_beta and grad_gamma (each sum rounded to T, then added in T).
template <typename T>
void layernorm_affine_grads(index_t n, index_t f, index_t j0, index_t w, const T* gy,
                            const T* x, const T* mean, const T* invstd, T* grad_gamma,
                            T* grad_beta) {
    double sg[kStrip], sgx[kStrip];
    for (index_t j = 0; j < w; ++j) sg[j] = sgx[j] = 0.0;
    for (index_t r = 0; r < n; ++r) {
        const T* gr = gy + r * f + j0;
        const T* xr = x + r * f + j0;
        const double m = double(mean[r]), is = double(invstd[r]);
        for (index_t j = 0; j < w; ++j) {
            const double g = double(gr[j]);
            sg[j] += g;
            sgx[j] += g * ((double(xr[j]) - m) * is);
        }
    }
    for (index_t j = 0; j < w; ++j) {
        grad_beta[j0 + j] += T(sg[j]);
        grad_gamma[j0 + j] += T(sgx[j]);
    }
}

// running = keep running + momentum stat, rounded to T once, for the w columns' mean
// mu and unbiased variance ss / (n - 1) (PyTorch's running statistics).
template <typename T>
inline void running_blend(index_t w, const double* mu, const double* ss, double inv_n1,
                          double keep, double momentum, T* rm, T* rv) {
    for (index_t j = 0; j < w; ++j) {
        rm[j] = T(keep * double(rm[j]) + momentum * mu[j]);
        rv[j] = T(keep * double(rv[j]) + momentum * (ss[j] * inv_n1));
    }
}

// The training forward; with running_mean (n >= 2), also the running-statistics
// update of batchnorm_running_update from the same column moments (the same bits as
// calling it after, without reading x again: BatchNorm1d's training forward,
// 4096 x 256 float32, 1 thread, 725-736 -> 569 us).
template <typename T>
void batchnorm_forward_impl(index_t n, index_t f, const T* x, const T* gamma, const T* beta,
                            double eps, T* y, T* mean, T* invstd, double momentum,
                            T* running_mean, T* running_var) {
    if (n <= 0 || f <= 0) return;
    const double inv_n = 1.0 / double(n);
    const double inv_n1 = n > 1 ? 1.0 / double(n - 1) : 0.0;
    const double keep = 1.0 - momentum;
    for_each_strip(n, f, [=](index_t j0, index_t w) {
        double mu[kStrip], inv[kStrip], scale[kStrip], shift[kStrip];
        column_moments(n, f, x, j0, w, mu, inv);
        if (running_mean != nullptr && n > 1)  // (n < 2: no update, as batchnorm_running_update)
            running_blend(w, mu, inv, inv_n1, keep, momentum, running_mean + j0,
                          running_var + j0);
        for (index_t j = 0; j < w; ++j) {
            inv[j] = 1.0 / fp_sqrt(inv[j] * inv_n + eps);
            mean[j0 + j] = T(mu[j]);
            invstd[j0 + j] = T(inv[j]);
            scale[j] = inv[j] * double(gamma[j0 + j]);
            shift[j] = double(beta[j0 + j]);
        }
        // y = (x - mean) (invstd gamma) + beta, in double, rounded once (float64: the
        // product (x - mean) invstd first, then gamma, as the NumPy reference does)
        for (index_t r = 0; r < n; ++r) {
            const T* FASTPROP_RESTRICT xr = x + r * f + j0;
            T* FASTPROP_RESTRICT yr = y + r * f + j0;
            if (std::is_same<T, float>::value) {
                for (index_t j = 0; j < w; ++j)
                    yr[j] = T((double(xr[j]) - mu[j]) * scale[j] + shift[j]);
            } else {
                for (index_t j = 0; j < w; ++j)
                    yr[j] = T((double(xr[j]) - mu[j]) * inv[j] * double(gamma[j0 + j]) +
                              shift[j]);
            }
        }
    });
}

}  // namespace

template <typename T>
void batchnorm_forward(index_t n, index_t f, const T* x, const T* gamma, const T* beta,
                       double eps, T* y, T* mean, T* invstd) {
    batchnorm_forward_impl<T>(n, f, x, gamma, beta, eps, y, mean, invstd, 0.0, nullptr,
                              nullptr);
}

template <typename T>
void batchnorm_forward_train(index_t n, index_t f, const T* x, const T* gamma, const T* beta,
                             double eps, T* y, T* mean, T* invstd, double momentum,
                             T* running_mean, T* running_var) {
    batchnorm_forward_impl<T>(n, f, x, gamma, beta, eps, y, mean, invstd, momentum,
                              running_mean, running_var);
}

// Running statistics (PyTorch's update, with the unbiased variance): the column mean
// and variance of x recomputed in double (column_moments, over rows just read by
// the forward, so from cache), blended into running_mean/var and rounded to T once.
template <typename T>
void batchnorm_running_update(index_t n, index_t f, const T* x, double momentum,
                              T* running_mean, T* running_var) {
    if (n < 2 || f <= 0) return;
    const double inv_n1 = 1.0 / double(n - 1);
    const double keep = 1.0 - momentum;
    for_each_strip(n, f, [=](index_t j0, index_t w) {
        double mu[kStrip], ss[kStrip];
        column_moments(n, f, x, j0, w, mu, ss);
        running_blend(w, mu, ss, inv_n1, keep, momentum, running_mean + j0, running_var + j0);
    });
}

template <typename T>
void batchnorm_forward_eval(index_t n, index_t f, const T* x, const T* gamma, const T* beta,
                            const T* running_mean, const T* running_var, double eps, T* y) {
    if (n <= 0 || f <= 0) return;
    for_each_strip(n, f, [=](index_t j0, index_t w) {
        double scale[kStrip], shift[kStrip], rm[kStrip];
        for (index_t j = 0; j < w; ++j) {
            scale[j] = double(gamma[j0 + j]) / fp_sqrt(double(running_var[j0 + j]) + eps);
            shift[j] = double(beta[j0 + j]);
            rm[j] = double(running_mean[j0 + j]);
        }
        for (index_t r = 0; r < n; ++r) {
            const T* xr = x + r * f + j0;
            T* yr = y + r * f + j0;
            for (index_t j = 0; j < w; ++j) yr[j] = T((double(xr[j]) - rm[j]) * scale[j] + shift[j]);
        }
    });
}

template <typename T>
void batchnorm_backward(index_t n, index_t f, const T* grad_y, const T* x, const T* gamma,
                        const T* mean, const T* invstd, T* grad_x, T* grad_gamma,
                        T* grad_beta) {
    if (n <= 0 || f <= 0) return;
    const double dn = double(n);
    for_each_strip(n, f, [=](index_t j0, index_t w) {
        double mu[kStrip], inv[kStrip], sg[kStrip], sgx[kStrip], coef[kStrip];
        for (index_t j = 0; j < w; ++j) {
            mu[j] = double(mean[j0 + j]);
            inv[j] = double(invstd[j0 + j]);
            sg[j] = sgx[j] = 0.0;
        }
        if (std::is_same<T, float>::value) {
            // float32: two rows at a time, sum g (x - mean) scaled by invstd once at
            // the end, and grad_x = a g + b (x - mean) + c per column (the same terms
            // regrouped, in double: differences of ~1e-16 relative, far below
            // float32's rounding); half the accumulator loads and stores
            double a[kStrip], b[kStrip], c[kStrip];
            index_t r = 0;
            for (; r + 2 <= n; r += 2) {
                const T* FASTPROP_RESTRICT gr = grad_y + r * f + j0;
                const T* FASTPROP_RESTRICT xr = x + r * f + j0;
                for (index_t j = 0; j < w; ++j) {
                    const double g0 = double(gr[j]), g1 = double(gr[j + f]);
                    sg[j] += g0 + g1;
                    sgx[j] += g0 * (double(xr[j]) - mu[j]) + g1 * (double(xr[j + f]) - mu[j]);
                }
            }
            for (; r < n; ++r) {
                const T* FASTPROP_RESTRICT gr = grad_y + r * f + j0;
                const T* FASTPROP_RESTRICT xr = x + r * f + j0;
                for (index_t j = 0; j < w; ++j) {
                    const double g = double(gr[j]);
                    sg[j] += g;
                    sgx[j] += g * (double(xr[j]) - mu[j]);
                }
            }
            for (index_t j = 0; j < w; ++j) {
                sgx[j] *= inv[j];
                coef[j] = double(gamma[j0 + j]) * inv[j] / dn;
                grad_beta[j0 + j] += T(sg[j]);
                grad_gamma[j0 + j] += T(sgx[j]);
                a[j] = coef[j] * dn;
                b[j] = -coef[j] * sgx[j] * inv[j];
                c[j] = -coef[j] * sg[j];
            }
            for (r = 0; r < n; ++r) {
                const T* FASTPROP_RESTRICT gr = grad_y + r * f + j0;
                const T* FASTPROP_RESTRICT xr = x + r * f + j0;
                T* FASTPROP_RESTRICT out = grad_x + r * f + j0;
                for (index_t j = 0; j < w; ++j)
                    out[j] = T(a[j] * double(gr[j]) + b[j] * (double(xr[j]) - mu[j]) + c[j]);
            }
            return;
        }
        for (index_t r = 0; r < n; ++r) {
            const T* gr = grad_y + r * f + j0;
            const T* xr = x + r * f + j0;
            for (index_t j = 0; j < w; ++j) {
                const double g = double(gr[j]);
                sg[j] += g;
                sgx[j] += g * ((double(xr[j]) - mu[j]) * inv[j]);
            }
        }
        for (index_t j = 0; j < w; ++j) {
            coef[j] = double(gamma[j0 + j]) * inv[j] / dn;
            grad_beta[j0 + j] += T(sg[j]);
            grad_gamma[j0 + j] += T(sgx[j]);
        }
        for (index_t r = 0; r < n; ++r) {
            const T* gr = grad_y + r * f + j0;
            const T* xr = x + r * f + j0;
            T* out = grad_x + r * f + j0;
            for (index_t j = 0; j < w; ++j) {
                const double xhat = (double(xr[j]) - mu[j]) * inv[j];
                out[j] = T(coef[j] * (dn * double(gr[j]) - sg[j] - xhat * sgx[j]));
            }
        }
    });
}

// Layer norm rows of at most kRowBuf features: float32 rows are converted to double
// once, into a buffer on the stack, instead of once per pass (3 passes forward, 3
// backward: the conversions bound those loops on AVX2, one per cycle); gamma and
// beta once per thread.  The row routines below read either the arrays or those
// buffers (S = T or double; double(s) of a double is itself): the same terms and
// sums in the same order, the same bits either way.
constexpr index_t kRowBuf = 1024;  // (3 buffers: 24 KiB of stack)

template <typename T>
constexpr bool kBufferRows = std::is_same<T, float>::value;

namespace {

// One row's statistics and output.
template <typename T, typename S>
inline void layernorm_row(index_t f, double inv_f, double eps, const S* FASTPROP_RESTRICT xr,
                          const S* gamma, const S* beta, T* FASTPROP_RESTRICT yr, T* mean,
                          T* invstd) {
    const double mu = lane_sum(0, f, [xr](index_t j) { return double(xr[j]); }) * inv_f;
    const double q = lane_sum(0, f, [xr, mu](index_t j) {
        const double d = double(xr[j]) - mu;
        return d * d;
    });
    const double inv = 1.0 / fp_sqrt(q * inv_f + eps);
    *mean = T(mu);
    *invstd = T(inv);
    for (index_t j = 0; j < f; ++j)
        yr[j] = T((double(xr[j]) - mu) * inv * double(gamma[j]) + double(beta[j]));
}

// One row's grad_x (m, inv: the row's saved statistics).
template <typename T, typename S>
inline void layernorm_row_backward(index_t f, double df, double m, double inv,
                                   const S* FASTPROP_RESTRICT gr, const S* FASTPROP_RESTRICT xr,
                                   const S* gamma, T* FASTPROP_RESTRICT out) {
    const double sgh = lane_sum(0, f, [gr, gamma](index_t j) {
        return double(gr[j]) * double(gamma[j]);
    });
    const double sghx = lane_sum(0, f, [gr, xr, gamma, m, inv](index_t j) {
        return double(gr[j]) * double(gamma[j]) * ((double(xr[j]) - m) * inv);
    });
    const double coef = inv / df;
    for (index_t j = 0; j < f; ++j) {
        const double gh = double(gr[j]) * double(gamma[j]);
        const double xhat = (double(xr[j]) - m) * inv;
        out[j] = T(coef * (df * gh - sgh - xhat * sghx));
    }
}

}  // namespace

template <typename T>
void layernorm_forward(index_t n, index_t f, const T* x, const T* gamma, const T* beta,
                       double eps, T* y, T* mean, T* invstd) {
    if (n <= 0 || f <= 0) return;
    const double inv_f = 1.0 / double(f);
    const bool buffered = kBufferRows<T> && f <= kRowBuf;
    parallel_for(n, row_grain(f), [=](index_t r0, index_t r1) {
        if (!buffered) {
            for (index_t r = r0; r < r1; ++r)
                layernorm_row(f, inv_f, eps, x + r * f, gamma, beta, y + r * f, mean + r,
                              invstd + r);
            return;
        }
        double gd[kRowBuf], bd[kRowBuf], xd[kRowBuf];
        for (index_t j = 0; j < f; ++j) {
            gd[j] = double(gamma[j]);
            bd[j] = double(beta[j]);
        }
        for (index_t r = r0; r < r1; ++r) {
            const T* FASTPROP_RESTRICT xr = x + r * f;
            for (index_t j = 0; j < f; ++j) xd[j] = double(xr[j]);
            layernorm_row(f, inv_f, eps, xd, gd, bd, y + r * f, mean + r, invstd + r);
        }
    });
}

template <typename T>
void layernorm_backward(index_t n, index_t f, const T* grad_y, const T* x, const T* gamma,
                        const T* mean, const T* invstd, T* grad_x, T* grad_gamma,
                        T* grad_beta) {
    if (n <= 0 || f <= 0) return;
    const double df = double(f);
    // grad_gamma / grad_beta: column sums over the rows, strip by strip.
    for_each_strip(n, f, [=](index_t j0, index_t w) {
        layernorm_affine_grads(n, f, j0, w, grad_y, x, mean, invstd, grad_gamma, grad_beta);
    });
    // grad_x: row by row.
    const bool buffered = kBufferRows<T> && f <= kRowBuf;
    parallel_for(n, row_grain(f), [=](index_t r0, index_t r1) {
        if (!buffered) {
            for (index_t r = r0; r < r1; ++r)
                layernorm_row_backward(f, df, double(mean[r]), double(invstd[r]),
                                       grad_y + r * f, x + r * f, gamma, grad_x + r * f);
            return;
        }
        double gam[kRowBuf], gd[kRowBuf], xd[kRowBuf];
        for (index_t j = 0; j < f; ++j) gam[j] = double(gamma[j]);
        for (index_t r = r0; r < r1; ++r) {
            const T* FASTPROP_RESTRICT gr = grad_y + r * f;
            const T* FASTPROP_RESTRICT xr = x + r * f;
            for (index_t j = 0; j < f; ++j) {
                gd[j] = double(gr[j]);
                xd[j] = double(xr[j]);
            }
            layernorm_row_backward(f, df, double(mean[r]), double(invstd[r]), gd, xd, gam,
                                   grad_x + r * f);
        }
    });
}

#define FASTPROP_INSTANTIATE_NORMS(T)                                                      \
    template void batchnorm_forward<T>(index_t, index_t, const T*, const T*, const T*,     \
                                       double, T*, T*, T*);                                \
    template void batchnorm_forward_eval<T>(index_t, index_t, const T*, const T*, const T*, \
                                            const T*, const T*, double, T*);               \
    template void batchnorm_running_update<T>(index_t, index_t, const T*, double, T*, T*); \
    template void batchnorm_forward_train<T>(index_t, index_t, const T*, const T*, const T*, \
                                             double, T*, T*, T*, double, T*, T*);          \
    template void batchnorm_backward<T>(index_t, index_t, const T*, const T*, const T*,    \
                                        const T*, const T*, T*, T*, T*);                   \
    template void layernorm_forward<T>(index_t, index_t, const T*, const T*, const T*,     \
                                       double, T*, T*, T*);                                \
    template void layernorm_backward<T>(index_t, index_t, const T*, const T*, const T*,    \
                                        const T*, const T*, T*, T*, T*);
FASTPROP_INSTANTIATE_NORMS(float)
FASTPROP_INSTANTIATE_NORMS(double)
#undef FASTPROP_INSTANTIATE_NORMS

}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
