// fastprop/train_step.hpp - one whole training step of a dense network in one call.
//
//   forward   a_l = act_l(a_{l-1} W_l + b_l),  l = 1..L,  a_0 = x
//   loss      softmax cross-entropy (labels or target rows), MSE or BCE on a_L
//   backward  g_L = dloss/da_L * act_L';  dW_l = a_{l-1}^T g_l;  db_l = sum_rows g_l;
//             g_{l-1} = (g_l W_l^T) * act_{l-1}'        (l = L..1; no input gradient)
//   update    SGD (momentum, Nesterov), Adam/AdamW, RMSprop or Adagrad on every tensor
//
// Gradients are overwritten (the step starts from zero gradients).  The caller owns
// every buffer: parameters, gradients, optimizer state and the per-layer workspaces
// (y: outputs, z: pre-activations for gelu, g: gradients), all C-contiguous.
// The structs are plain data (no initialisers: the caller zero-fills them).
// With check_finite, a non-finite loss or gradient stops the step before the update
// and is reported in *status (1: loss, 2: gradient); a class id outside
// [0, classes) stops it before anything runs (*status = 3), as does NaN or inf in x
// with check_x (*status = 4); otherwise *status = 0.  Gradient clipping (clip_value,
// clip_norm, as fastprop.clip_grad_value / clip_grad_norm in that order) runs after
// the check and before the update; every weight gradient is then stored whole first
// (no layer's update fused into its dW GEMM).
#pragma once

#include <cstdint>

#include "fastprop/common.hpp"
#include "fastprop/optim.hpp"

namespace fastprop {

enum LossKind : int { kLossSoftmaxXent = 0, kLossMse = 1, kLossBce = 2 };

template <typename T>
struct DenseLayerPlan {
    index_t in, out;
    const T* w;                   // (in, out)
    const T* b;                   // (out,) or null
    T* gw;                        // (in, out)
    T* gb;                        // (out,) or null (when b is null)
    int act;
    double alpha;
    T* y;                         // (n, out) forward output
    T* z;                         // (n, out) pre-activation, gelu only (else null)
    T* g;                         // (n, out) gradient workspace
    double* colsum;               // (out,) scratch: the bias gradient summed in double
    index_t w_index, b_index;     // the weight's / bias's tensor index in opt (b: -1 if none)
};


template <typename T>
struct TrainStepPlan {
    index_t n;                    // batch rows (>= 1)
    int layers;
    const DenseLayerPlan<T>* layer;
    const T* x;                   // (n, layer[0].in)
    int loss;
    bool half;                    // MSE: 1/2 factor
    bool from_logits;             // BCE
    double loss_clip;             // softmax xent / BCE: 0, or each sample's (element's)
                                  // loss clamped as for probabilities clipped to
                                  // [clip, 1 - clip] (scikit-learn's eps)
    double grad_scale;            // dloss/da_L times this (0 or 1: as is), e.g. the
                                  // output count for scikit-learn's multi-output deltas
    const std::int64_t* labels;   // softmax xent: (n,) class ids, or
    const T* targets;             // (n, out) target rows (all losses)
    OptimizerPlan<T> opt;
    bool check_finite;
    bool check_x;                 // refuse NaN/inf in x (*status = 4); false when the
                                  // caller validated all of X beforehand (fit)
    double clip_value;            // > 0: every gradient element clamped to
                                  // [-clip_value, clip_value] before the update
    double clip_norm;             // > 0: then the gradients scaled to a global 2-norm of
                                  // at most clip_norm (clip_grad_norm's rule: by
                                  // clip_norm / (norm + 1e-6) when below 1, not when
                                  // the norm is not finite)
};

double train_step(const TrainStepPlan<float>& plan, int* status) noexcept;
double train_step(const TrainStepPlan<double>& plan, int* status) noexcept;

}  // namespace fastprop
