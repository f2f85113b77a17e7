// fastprop/optim.hpp - in-place optimizer updates of one parameter tensor of `size`
// contiguous elements (p parameters, g gradients read only, state arrays updated).
//
// Hyperparameters arrive in double; scalar factors (bias corrections, 1 - beta, ...)
// are computed once in double and rounded to T; the elementwise arithmetic is in T,
// as in the NumPy reference.  See fastprop.backends for the exact update rules.
#pragma once

#include "fastprop/common.hpp"

namespace fastprop {

// g = grad + wd p; buf = g (first) or momentum buf + g; g = g + momentum buf
// (nesterov) or buf; p -= lr g.  buf may be null when momentum == 0.
void sgd_update(index_t size, float* p, const float* g, float* buf, double lr,
                double momentum, bool nesterov, double weight_decay, bool first) noexcept;
void sgd_update(index_t size, double* p, const double* g, double* buf, double lr,
                double momentum, bool nesterov, double weight_decay, bool first) noexcept;

// Adam (decoupled = AdamW); step counts from 1.
void adam_update(index_t size, float* p, const float* g, float* m, float* v,
                 std::int64_t step, double lr, double beta1, double beta2, double eps,
                 double weight_decay, bool decoupled) noexcept;
void adam_update(index_t size, double* p, const double* g, double* m, double* v,
                 std::int64_t step, double lr, double beta1, double beta2, double eps,
                 double weight_decay, bool decoupled) noexcept;

// RMSprop; buf may be null when momentum == 0.
void rmsprop_update(index_t size, float* p, const float* g, float* square_avg, float* buf,
                    double lr, double alpha, double eps, double momentum,
                    double weight_decay) noexcept;
void rmsprop_update(index_t size, double* p, const double* g, double* square_avg,
                    double* buf, double lr, double alpha, double eps, double momentum,
                    double weight_decay) noexcept;

void adagrad_update(index_t size, float* p, const float* g, float* sum, double lr,
                    double eps, double weight_decay) noexcept;
void adagrad_update(index_t size, double* p, const double* g, double* sum, double lr,
                    double eps, double weight_decay) noexcept;

}  // namespace fastprop
