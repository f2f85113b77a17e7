// train_step.cpp - a whole training step of a dense network in one call (per ISA).
//
// Forward, loss, backward and update of fastprop/train_step.hpp, calling this ISA
// unit's own kernels directly (no dispatch, no Python between layers):
//   forward   one GEMM per layer with the bias + activation epilogue (linear_forward)
//   loss      softmax_xent / mse / bce write dloss/da_L into the last layer's g; the
//             last activation's derivative is applied in place, db_L = column sums
//   backward  per layer l = L..1, g_l holding dloss/dz_l:
//               dW_l = a_{l-1}^T g_l                       (TN GEMM; epilogue flags
//                                                           non-finite values)
//               g_{l-1} = (g_l W_l^T) * act_{l-1}'(.)      (NT GEMM; epilogue applies
//               db_{l-1} = column sums of g_{l-1}           the derivative and sums the
//                                                           columns in double)
//             so no activation-derivative, bias-gradient or finiteness pass touches
//             the gradients separately (softmax, a row operation, is the exception).
//   check     optional: loss, weight gradients (GEMM flags) and bias gradients finite,
//             else stop before the update
//   update    one multi-tensor optimizer pass over every parameter (optim.cpp)
// The arithmetic equals the layer-by-layer path's (same kernels and epilogue
// formulas, same summation orders), so the two agree to the last bit or, where the
// fused epilogue rounds once less, to an ulp.
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

// db = colsum (rounded to T); false if any is not finite.
template <typename T>
bool store_bias_grad(const DenseLayerPlan<T>& d) {
    bool ok = true;
    for (index_t j = 0; j < d.out; ++j) {
        d.gb[j] = T(d.colsum[j]);
        ok = ok && finite(d.colsum[j]);
    }
    return ok;
}

// max |x[i]| over count elements; *all_finite = no NaN/inf (16 vectorisable lanes).
template <typename T>
double max_abs(const T* x, index_t count, bool* all_finite) {
    T m[16], z[16];
    for (int l = 0; l < 16; ++l) m[l] = z[l] = T(0);
    index_t i = 0;
    for (; i + 16 <= count; i += 16) {
        for (int l = 0; l < 16; ++l) {
            const T v = x[i + l];
            const T a = v < T(0) ? -v : v;
            m[l] = m[l] < a ? a : m[l];
            z[l] += v - v;  // 0, or NaN for NaN/inf
        }
    }
    for (int l = 0; i < count; ++i, ++l) {
        const T v = x[i];
        const T a = v < T(0) ? -v : v;
        m[l] = m[l] < a ? a : m[l];
        z[l] += v - v;
    }
    T mx = T(0), zs = T(0);
    for (int l = 0; l < 16; ++l) {
        mx = mx < m[l] ? m[l] : mx;
        zs += z[l];
    }
    *all_finite = zs == T(0);
    return double(mx);
}

// dW = a^T g computed one block of rows at a time, each block's optimizer update
// applied while the block is still in cache.  Blocks are ~64 KiB of dW and are split
// over threads (each thread runs serial GEMMs on its blocks: a GEMM inside a parallel
// region uses one thread), so p, m, v and dW stream through memory in order.
template <typename T>
void fused_weight_update(const DenseLayerPlan<T>& d, index_t n, const T* a_prev,
                         const OptimizerPlan<T>& plan, const OptimizerScalars<T>& s) {
    const index_t out = fp_max<index_t>(d.out, 1);
    const index_t block = fp_max<index_t>(8, index_t(16384) / out);
    // Rows per thread: half the optimizer's kMathGrain elements, counting each row's
    // GEMM work (2 n out flops) as n / 16 more optimizer elements per weight; so a
    // 256 x 128 layer uses both threads at batch 32 (2.1 MFLOP + 32k Adam elements,
    // ~30 us: the MLP step 339-398 -> 294-302 us) and at batch 1 (its phase 20 ->
    // 15 us).
    const index_t grain = fp_max<index_t>(8, (kMathGrain / 2) / (out + out * n / 16));
    parallel_for(d.in, grain, [&](index_t r0, index_t r1) {
        for (index_t i0 = r0; i0 < r1; i0 += block) {
            const index_t rows = fp_min(block, r1 - i0);
            gemm<T>(true, false, rows, d.out, n, T(1), a_prev + i0, d.in, d.g, d.out, T(0),
                    d.gw + i0 * d.out, d.out);
            optimizer_range(plan, s, d.w_index, i0 * d.out, (i0 + rows) * d.out);
        }
    });
}

constexpr int kMaxTensors = 256;

// The largest finite value of T.
template <typename T>
constexpr double kHugeValue = 1.7976931348623157e308;
template <>
constexpr double kHugeValue<float> = 3.4028234663852886e38;

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
    // loss: dloss/da_L into the last layer's g, then dloss/dz_L and db_L
    const DenseLayerPlan<T>& last = p.layer[L - 1];
    const double loss = loss_and_grad(p, last);
    if (p.check_finite && !finite(loss)) {
        *status = 1;
        return loss;
    }
    bool ok = true;
    if (last.act != kIdentity)
        activation_backward<T>(last.act, last.alpha, p.n, last.out, last.g, last.z, last.y,
                               last.g);
    if (last.gb != nullptr) {
        for (index_t j = 0; j < last.out; ++j) last.colsum[j] = 0.0;
        column_sums_double<T>(p.n, last.out, last.g, last.colsum);
        ok = store_bias_grad(last);
    }
    // backward: g_{l-1} = (g_l W_l^T) * act_{l-1}' and db_{l-1} in the GEMM epilogue,
    // every W_l still the one the forward pass used
    for (int l = L - 1; l > 0; --l) {
        const DenseLayerPlan<T>& d = p.layer[l];
        const DenseLayerPlan<T>& prev = p.layer[l - 1];
        GemmEpilogue<T> eg;
        const bool fuse = prev.act != kSoftmax;
        if (fuse && prev.act != kIdentity) {
            eg.dact = prev.act;
            eg.dalpha = prev.alpha;
            eg.dsrc = prev.act == kGelu ? prev.z : prev.y;
            eg.ld_dsrc = prev.out;
        }
        if (prev.gb != nullptr) {
            for (index_t j = 0; j < prev.out; ++j) prev.colsum[j] = 0.0;
            if (fuse) eg.colsum = prev.colsum;
        }
        gemm_ex<T>(false, true, p.n, prev.out, d.out, T(1), d.g, d.out, d.w, d.out, T(0),
                   prev.g, prev.out, eg);
        if (!fuse) {
            activation_backward<T>(kSoftmax, prev.alpha, p.n, prev.out, prev.g, prev.z,
                                   prev.y, prev.g);
            if (prev.gb != nullptr) column_sums_double<T>(p.n, prev.out, prev.g, prev.colsum);
        }
        if (prev.gb != nullptr) ok = store_bias_grad(prev) && ok;
    }
    // Weight gradients.  A layer's update is fused with its dW GEMM (block by block,
    // fused_weight_update) when reading its inputs and gradients (n (in + out)) costs
    // less than a quarter of a pass over dW (in out): the blocks' small unpacked GEMMs
    // lose to one packed GEMM as n grows (784-256-128-10 at batch 128: fusing layer
    // 1 made the step ~6% slower; at batch 32 neutral, at batch 1 a gain);
    // such a dW is known finite beforehand when a and g are finite and
    // n max|a| max|g| cannot overflow.  The other layers' dW are computed first,
    // with the GEMM's non-finite flag, so nothing is updated before all is checked.
    bool fused[kMaxTensors];
    const bool can_fuse = p.opt.count <= kMaxTensors && L <= kMaxTensors;
    const double limit = double(kHugeValue<T>) / 4.0;
    int nonfinite = 0;
    for (int l = 0; l < L; ++l) {
        const DenseLayerPlan<T>& d = p.layer[l];
        const T* a_prev = l > 0 ? p.layer[l - 1].y : p.x;
        bool f = can_fuse && d.w_index >= 0 && 4 * p.n * (d.in + d.out) <= d.in * d.out;
        if (f && p.check_finite) {
            bool fa = true, fg = true;
            const double am = max_abs(a_prev, p.n * d.in, &fa);
            const double gm = max_abs(d.g, p.n * d.out, &fg);
            if (!fa || !fg) {  // then dW has a NaN/inf: every product with one does
                *status = 2;
                return loss;
            }
            f = double(p.n) * am * gm < limit;
        }
        if (can_fuse) fused[l] = f;
        if (!f) {
            GemmEpilogue<T> ew;
            ew.nonfinite = p.check_finite ? &nonfinite : nullptr;
            gemm_ex<T>(true, false, d.in, d.out, p.n, T(1), a_prev, d.in, d.g, d.out, T(0),
                       d.gw, d.out, ew);
        }
    }
    if (p.check_finite && (nonfinite || !ok)) {
        *status = 2;
        return loss;
    }
    if (!can_fuse) {
        optimizer_update<T>(p.opt);
        return loss;
    }
    // update: fused layers inside their dW GEMM, every other tensor in one pass
    const OptimizerScalars<T> scalars = optimizer_scalars(p.opt);
    bool done[kMaxTensors];
    for (index_t i = 0; i < p.opt.count; ++i) done[i] = false;
    for (int l = 0; l < L; ++l) {
        if (!fused[l]) continue;
        const DenseLayerPlan<T>& d = p.layer[l];
        fused_weight_update(d, p.n, l > 0 ? p.layer[l - 1].y : p.x, p.opt, scalars);
        done[d.w_index] = true;
    }
    T* params[kMaxTensors];
    const T* grads[kMaxTensors];
    T* s1[kMaxTensors];
    T* s2[kMaxTensors];
    index_t sizes[kMaxTensors];
    OptimizerPlan<T> rest = p.opt;
    index_t k = 0;
    for (index_t i = 0; i < p.opt.count; ++i) {
        if (done[i]) continue;
        params[k] = p.opt.params[i];
        grads[k] = p.opt.grads[i];
        s1[k] = p.opt.state1 != nullptr ? p.opt.state1[i] : nullptr;
        s2[k] = p.opt.state2 != nullptr ? p.opt.state2[i] : nullptr;
        sizes[k] = p.opt.sizes[i];
        ++k;
    }
    rest.count = k;
    rest.params = params;
    rest.grads = grads;
    rest.state1 = p.opt.state1 != nullptr ? s1 : nullptr;
    rest.state2 = p.opt.state2 != nullptr ? s2 : nullptr;
    rest.sizes = sizes;
    if (k > 0) optimizer_update<T>(rest);
    return loss;
}

template double train_step<float>(const TrainStepPlan<float>&, int*);
template double train_step<double>(const TrainStepPlan<double>&, int*);

}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
