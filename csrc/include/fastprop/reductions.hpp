// fastprop/reductions.hpp - whole-tensor reductions and in-place maps used by
// gradient clipping: sum of squares (accumulated in double, 16 interleaved partial
// sums per thread, combined in a fixed order), scale and clip in place.
#pragma once

#include "fastprop/common.hpp"

namespace fastprop {

double sum_squares(index_t size, const float* x) noexcept;
double sum_squares(index_t size, const double* x) noexcept;

// Sum of squares of `count` arrays in one call (one parallel region).
double sum_squares_multi(index_t count, const float* const* arrays,
                         const index_t* sizes) noexcept;
double sum_squares_multi(index_t count, const double* const* arrays,
                         const index_t* sizes) noexcept;

// Global-norm clipping of `count` arrays (sizes[i] elements each) in one call:
// returns norm = sqrt(sum of all squares); if finite and > max_norm, scales every
// element by max_norm / (norm + 1e-6).
double clip_grad_norm(index_t count, float* const* arrays, const index_t* sizes,
                      double max_norm) noexcept;
double clip_grad_norm(index_t count, double* const* arrays, const index_t* sizes,
                      double max_norm) noexcept;

// x *= factor (factor rounded to T once).
void scale(index_t size, float* x, double factor) noexcept;
void scale(index_t size, double* x, double factor) noexcept;

// x = min(max(x, lo), hi); NaN stays NaN.
void clip(index_t size, float* x, double lo, double hi) noexcept;
void clip(index_t size, double* x, double lo, double hi) noexcept;

}  // namespace fastprop
