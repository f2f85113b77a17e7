// fastprop/norms.hpp - batch and layer normalisation, forward and backward.
//
// x (n, f) C-contiguous; gamma, beta (f,).  Batch norm normalises each column over
// the n rows (statistics mean/invstd are (f,)); layer norm normalises each row over
// its f columns (statistics (n,)).  invstd = 1 / sqrt(biased var + eps).  All
// statistics and the normalised values are computed in double (two-pass variance;
// float32 batch statistics from one pass shifted by a column's first value: the
// mean within ~n^1.5 2^-53 of the column's standard deviation, the variance ~n^2
// 2^-53 relative, csrc/norms.cpp) and rounded to T once.  Backward: grad_gamma and grad_beta accumulate (+=),
// grad_x is overwritten.  batchnorm_running_update (n >= 2): the batch mean and the
// unbiased variance of x's columns, computed in double as above, blended into the
// running statistics: r = (1 - momentum) r + momentum stat, rounded to T once.
// batchnorm_forward_train (n >= 2): batchnorm_forward and then batchnorm_running_update
// in one pass over the statistics (the same results).
#pragma once

#include "fastprop/common.hpp"

namespace fastprop {

#define FASTPROP_DECLARE_NORMS(T)                                                         \
    void batchnorm_forward(index_t n, index_t f, const T* x, const T* gamma,              \
                           const T* beta, double eps, T* y, T* mean, T* invstd) noexcept; \
    void batchnorm_forward_eval(index_t n, index_t f, const T* x, const T* gamma,         \
                                const T* beta, const T* running_mean,                     \
                                const T* running_var, double eps, T* y) noexcept;         \
    void batchnorm_running_update(index_t n, index_t f, const T* x, double momentum,      \
                                  T* running_mean, T* running_var) noexcept;              \
    void batchnorm_forward_train(index_t n, index_t f, const T* x, const T* gamma,        \
                                 const T* beta, double eps, T* y, T* mean, T* invstd,     \
                                 double momentum, T* running_mean,                        \
                                 T* running_var) noexcept;                                \
    void batchnorm_backward(index_t n, index_t f, const T* grad_y, const T* x,            \
                            const T* gamma, const T* mean, const T* invstd, T* grad_x,    \
                            T* grad_gamma, T* grad_beta) noexcept;                        \
    void layernorm_forward(index_t n, index_t f, const T* x, const T* gamma,              \
                           const T* beta, double eps, T* y, T* mean, T* invstd) noexcept; \
    void layernorm_backward(index_t n, index_t f, const T* grad_y, const T* x,            \
                            const T* gamma, const T* mean, const T* invstd, T* grad_x,    \
                            T* grad_gamma, T* grad_beta) noexcept;

FASTPROP_DECLARE_NORMS(float)
FASTPROP_DECLARE_NORMS(double)
#undef FASTPROP_DECLARE_NORMS

}  // namespace fastprop
