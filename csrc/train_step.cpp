// train_step.cpp - a whole training step of a dense network in one call (per ISA).
//
// Forward, loss, backward and update of fastprop/train_step.hpp, calling this ISA
// unit's own kernels directly (no dispatch, no Python between layers):
//   forward   linear_forward per layer (GEMM + bias + activation)
//   loss      softmax_xent / mse / bce writing dloss/da_L into the last layer's g
//   backward  linear_backward per layer, in place: g_l (dloss/da_l on entry) becomes
//             dloss/dz_l, then dW_l = a_{l-1}^T g_l, db_l = column sums, and
//             g_{l-1} = g_l W_l^T (skipped for the first layer: no input gradient)
//   check     optional: loss and sum of squared gradients finite, else stop
//   update    one multi-tensor optimizer pass over every parameter (optim.cpp)
// Results equal the layer-by-layer path (same kernels, same order), so the compiled
// step and the Python path agree to the last bit on one backend and thread count.
#include "fastprop/train_step.hpp"
#include "isa_common.hpp"
#include "kernels.hpp"

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

template <typename T>
double loss_and_grad(const TrainStepPlan<T>& p, const DenseLayerPlan<T>& last) {
    const index_t count = p.n * last.out;
    switch (p.loss) {
        case kLossSoftmaxXent:
            return softmax_xent<T>(p.n, last.out, last.y, p.labels, p.targets, last.g);
        case kLossMse:
            return mse<T>(count, last.y, p.targets, p.half, last.g);
        default:
            return bce<T>(count, last.y, p.targets, p.from_logits, last.g);
    }
}

inline bool finite(double v) { return v - v == 0.0; }

}  // namespace

template <typename T>
double train_step(const TrainStepPlan<T>& p, int* status) {
    *status = 0;
    const int L = p.layers;
    if (p.labels != nullptr) {  // class ids index the gradient rows: never trust them
        const index_t classes = p.layer[L - 1].out;
        for (index_t i = 0; i < p.n; ++i) {
            if (p.labels[i] < 0 || p.labels[i] >= classes) {
                *status = 3;
                return 0.0;
            }
        }
    }
    // forward
    const T* a = p.x;
    for (int l = 0; l < L; ++l) {
        const DenseLayerPlan<T>& d = p.layer[l];
        linear_forward<T>(p.n, d.in, d.out, a, d.w, d.b, d.act, d.alpha, d.y, d.z);
        a = d.y;
    }
    // loss: dloss/da_L into the last layer's g
    const double loss = loss_and_grad(p, p.layer[L - 1]);
    if (p.check_finite && !finite(loss)) {
        *status = 1;
        return loss;
    }
    // backward, in place through the g workspaces
    for (int l = L - 1; l >= 0; --l) {
        const DenseLayerPlan<T>& d = p.layer[l];
        const T* a_prev = l > 0 ? p.layer[l - 1].y : p.x;
        T* grad_prev = l > 0 ? p.layer[l - 1].g : nullptr;
        linear_backward<T>(p.n, d.in, d.out, d.g, a_prev, d.w, d.y, d.z, d.act, d.alpha,
                           grad_prev, d.gw, d.gb, d.g, false);
    }
    if (p.check_finite) {
        const double s = sum_squares_multi<T>(p.opt.count, p.opt.grads, p.opt.sizes);
        if (!finite(s)) {
            *status = 2;
            return loss;
        }
    }
    optimizer_update<T>(p.opt);
    return loss;
}

template double train_step<float>(const TrainStepPlan<float>&, int*);
template double train_step<double>(const TrainStepPlan<double>&, int*);

}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
