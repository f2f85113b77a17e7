// fastprop/linear.hpp - the dense layer y = act(x @ w + b) and its backward pass.
//
// x (n, in), w (in, out), b (out,) or null, y and z (n, out), all C-contiguous.
// linear_forward: z = x @ w + b (into z when z is not null, else into y), y = act(z).
// linear_backward: grad_z = grad_y * act'(.) into work (n, out) (work may be null
//   for identity, whose grad_z is grad_y itself); grad_w (+)= x^T grad_z,
//   grad_b (+)= column sums of grad_z (accumulated in double; grad_b may be null),
//   grad_x = grad_z w^T (grad_x may be null).  '+=' when accumulate.
//   relu/leaky_relu/sigmoid/tanh/softmax read y, gelu reads z; if y is null the
//   forward output is recomputed from z into work.
#pragma once

#include "fastprop/common.hpp"

namespace fastprop {

void linear_forward(index_t n, index_t in, index_t out, const float* x, const float* w,
                    const float* b, int act, double alpha, float* y, float* z) noexcept;
void linear_forward(index_t n, index_t in, index_t out, const double* x, const double* w,
                    const double* b, int act, double alpha, double* y, double* z) noexcept;

void linear_backward(index_t n, index_t in, index_t out, const float* grad_y,
                     const float* x, const float* w, const float* y, const float* z,
                     int act, double alpha, float* grad_x, float* grad_w, float* grad_b,
                     float* work, bool accumulate) noexcept;
void linear_backward(index_t n, index_t in, index_t out, const double* grad_y,
                     const double* x, const double* w, const double* y, const double* z,
                     int act, double alpha, double* grad_x, double* grad_w,
                     double* grad_b, double* work, bool accumulate) noexcept;

}  // namespace fastprop
