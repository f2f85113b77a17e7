// fastprop/optim.hpp - in-place optimizer updates of one parameter tensor of `size`
// contiguous elements (p parameters, g gradients read only, state arrays updated).
//
// Hyperparameters arrive in double; scalar factors (bias corrections, 1 - beta, ...)
// are computed once in double and rounded to T; the elementwise arithmetic is in T,
// as in the NumPy reference.  See fastprop.backends for the exact update rules.
#pragma once

#include <cstdint>

#include "fastprop/common.hpp"

namespace fastprop {

enum OptimizerKind : int { kOptSgd = 0, kOptAdam = 1, kOptRmsprop = 2, kOptAdagrad = 3 };

// Every tensor of a model in one call (the multi-tensor form the single-tensor
// functions below also use): count tensors of sizes[i] elements; state1 is the
// momentum buffer (SGD), exp_avg (Adam), square_avg (RMSprop) or sum (Adagrad);
// state2 is exp_avg_sq (Adam) or the momentum buffer (RMSprop); either may be null
// when the update has no such state.  Plain data: the caller zero-fills it.
template <typename T>
struct OptimizerPlan {
    int kind;
    index_t count;                // parameter tensors
    T* const* params;             // count pointers each
    const T* const* grads;
    T* const* state1;             // momentum buffer / exp_avg / square_avg / sum (or null)
    T* const* state2;             // exp_avg_sq / RMSprop momentum buffer (or null)
    const index_t* sizes;
    std::int64_t step;            // the step being taken, from 1
    double lr, beta1, beta2, eps, weight_decay;
    const unsigned char* decay;   // per tensor: 0 exempts it from weight_decay (null: none
                                  // exempt), e.g. scikit-learn's L2 on weights, not biases
    const std::int64_t* lag;      // per tensor: steps it sat out (frozen), so its own
                                  // step is step - lag[i], as PyTorch's per-parameter
                                  // count (Adam's bias corrections); null: none
    double momentum, alpha;
    bool nesterov, decoupled;
};

void optimizer_update(const OptimizerPlan<float>& plan) noexcept;
void optimizer_update(const OptimizerPlan<double>& plan) noexcept;

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
