// fastprop/losses.hpp - loss functions: mean loss (returned, computed and summed in
// double) and its gradient with respect to the prediction (written when grad is not
// null).
//
// softmax_xent: logits (n, c); labels (n,) class ids in [0, c) or targets (n, c)
//   (exactly one not null).  loss = mean_i -sum_j t_ij log softmax_ij via
//   log-sum-exp; grad = (softmax - t) / n.
// bce: count elements.  Probabilities: -(t log p + (1-t) log(1-p)), logs clamped at
//   -100, grad = (p - t) / max(p (1-p), 1e-12) / count.  Logits:
//   max(x,0) - x t + log1p(exp(-|x|)), grad = (sigmoid(x) - t) / count.
// mse: mean (p - t)^2 (times 1/2 when half); grad = 2 (p - t) / count (times 1/2).
#pragma once

#include "fastprop/common.hpp"

namespace fastprop {

double softmax_xent(index_t n, index_t c, const float* logits, const std::int64_t* labels,
                    const float* targets, float* grad) noexcept;
double softmax_xent(index_t n, index_t c, const double* logits, const std::int64_t* labels,
                    const double* targets, double* grad) noexcept;

double bce(index_t count, const float* pred, const float* target, bool from_logits,
           float* grad) noexcept;
double bce(index_t count, const double* pred, const double* target, bool from_logits,
           double* grad) noexcept;

double mse(index_t count, const float* pred, const float* target, bool half,
           float* grad) noexcept;
double mse(index_t count, const double* pred, const double* target, bool half,
           double* grad) noexcept;

}  // namespace fastprop
