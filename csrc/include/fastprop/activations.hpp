// fastprop/activations.hpp - activation functions and their derivatives.
//
// Arrays are (rows, cols) C-contiguous; elementwise activations ignore the split,
// softmax normalises each row.  y may be x; grad_x may be grad_y.
// Backward: relu, leaky_relu, sigmoid, tanh, softmax read y; gelu reads x;
// identity reads neither (the unused pointer may be null).
// Stability: sigmoid uses exp(-|x|); softmax subtracts the row max and sums in
// double; gelu is evaluated as x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3),
// which equals 0.5 x (1 + tanh(u)) without its cancellation for x << 0.
// Every result is finite for finite |x| <= 1e4.
#pragma once

#include "fastprop/common.hpp"

namespace fastprop {

void activation_forward(int act, double alpha, index_t rows, index_t cols, const float* x,
                        float* y) noexcept;
void activation_forward(int act, double alpha, index_t rows, index_t cols, const double* x,
                        double* y) noexcept;

void activation_backward(int act, double alpha, index_t rows, index_t cols,
                         const float* grad_y, const float* x, const float* y,
                         float* grad_x) noexcept;
void activation_backward(int act, double alpha, index_t rows, index_t cols,
                         const double* grad_y, const double* x, const double* y,
                         double* grad_x) noexcept;

}  // namespace fastprop
