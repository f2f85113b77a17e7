// fastprop/common.hpp - types shared by every header of the C++ kernel API.
//
// The API is plain functions on raw pointers, sizes and leading dimensions, in
// row-major order, overloaded for float and double.  Callers own every buffer; no
// function allocates memory the caller sees, and none includes Python.h.
// Functions marked noexcept never throw; they trust their arguments (the Cython
// layer checks shapes before calling).
#pragma once

#include <cstdint>

namespace fastprop {

using index_t = std::int64_t;

// Activation codes; equal to fastprop.backends.ACTIVATIONS.
enum Activation : int {
    kIdentity = 0,
    kRelu = 1,
    kLeakyRelu = 2,
    kSigmoid = 3,
    kTanh = 4,
    kGelu = 5,      // tanh approximation
    kGeluErf = 6,   // exact (erf) form, PyTorch's default
    kSoftmax = 7,
};

}  // namespace fastprop
