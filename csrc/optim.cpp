// optim.cpp - SGD (momentum, Nesterov), Adam/AdamW, RMSprop and Adagrad updates of
// one parameter tensor, in place (per ISA unit).
//
// Algorithm: one fused pass over the elements (read p, g and the state once, write
// p and the state once).  optimizer_update takes every tensor of a model at once and
// treats them as one index space split over OpenMP threads (from 256k elements in
// all for SGD, 64k for the others; isa_common.hpp), so a model's update is one
// parallel region however many tensors it has; the single-tensor functions are
// one-tensor plans.  Scalar
// factors (lr, 1 - beta, Adam's bias corrections lr / (1 - beta1^step) and
// sqrt(1 - beta2^step)) are computed once in double and rounded to T; elementwise
// arithmetic is in T, in the same order as the NumPy reference, each operation
// rounded (compiled with -ffp-contract=off, CMakeLists.txt: no FMA contraction, so an
// element's result does not depend on which copy of a loop, vector or scalar, the
// compiler ran it in), so results agree with the reference to a few ulp of T.
// Speed (1 thread, 1M float32 parameters, Zen4): Adam ~0.5 ms (NumPy reference
// 2.5 ms), SGD with momentum ~0.2 ms (0.44 ms): memory-bound.
#include "isa_common.hpp"
#include "kernels.hpp"

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

inline double pow_int(double base, std::int64_t e) {  // base^e, e >= 0, by squaring
    double r = 1.0;
    while (e > 0) {
        if (e & 1) r *= base;
        base *= base;
        e >>= 1;
    }
    return r;
}

// Decaying state (momentum buffers, Adam's moments, RMSprop's average) of a
// parameter whose gradient stays 0 (a dead ReLU unit) shrinks geometrically into the
// subnormal range, where arithmetic on Zen4 is several times slower: after ~1000
// steps 28% of a 784-256-128-10 MLP's Adam state was subnormal and the update took
// 2.4x as long.  Momentum-like state (SGD's buffer, Adam's m, RMSprop's buffer)
// below the smallest normal is stored as 0 (a compare and a select per element): it
// moves a parameter by itself, so flushing changes an update by under lr * 1e-38.
// A second moment (Adam's v, RMSprop's average) is never flushed: it divides the
// update, and Adam is scale invariant (a gradient of 1e-20 gives a v of 1e-40 that
// still matters: flushed, the step was m / eps, 1e7 too large, or inf with eps = 0).
// A dead unit's m reaches the subnormals ~100x sooner than its v, which keeps most
// of the speed.  (Flushing v only where m is 0 cost 18% on Adam; other forms of that
// condition compiled to scalar code, 16x slower.)
template <typename T>
inline T flush_subnormal(T x) {
    constexpr T tiny = sizeof(T) == 4 ? T(1.17549435e-38f) : T(2.2250738585072014e-308);
    return (x < tiny && x > -tiny) ? T(0) : x;
}

// The element loops, one instantiation per variant (template flags), so that no
// test is left in the vectorised body.  kDecay: L2 weight decay g + wd p.
// kMode: 0 no momentum, 1 momentum, first step (buf = g), 2 momentum,
// +2: Nesterov (3 first step, 4 later steps).
template <typename T, bool kDecay, int kMode>
void sgd_range(index_t b, index_t e, T* p, const T* g, T* buf, T lr, T mom, T wd) {
    for (index_t i = b; i < e; ++i) {
        T d = kDecay ? g[i] + wd * p[i] : g[i];
        if (kMode != 0) {
            const T bi = flush_subnormal((kMode == 1 || kMode == 3) ? d : mom * buf[i] + d);
            buf[i] = bi;
            d = kMode >= 3 ? d + mom * bi : bi;
        }
        p[i] -= lr * d;
    }
}

// kDecay: 0 none, 1 decoupled (p *= shrink), 2 L2 (g += wd p); `decay` is shrink
// or wd accordingly.
template <typename T, int kDecay>
void adam_range(index_t b, index_t e, T* p, const T* g, T* m, T* v, T b1, T b2, T one_b1,
                T one_b2, T step_size, T eps, T decay) {
    for (index_t i = b; i < e; ++i) {
        T pi = p[i];
        T gi = g[i];
        if (kDecay == 1) pi *= decay;
        if (kDecay == 2) gi = gi + decay * pi;
        const T mi = flush_subnormal(b1 * m[i] + one_b1 * gi);
        const T vi = b2 * v[i] + one_b2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - step_size * mi / (fp_sqrt(vi) + eps);
    }
}

template <typename T, bool kDecay, bool kMomentum>
void rmsprop_range(index_t b, index_t e, T* p, const T* g, T* s, T* buf, T lr, T a, T one_a,
                   T eps, T mom, T wd) {
    for (index_t i = b; i < e; ++i) {
        const T gi = kDecay ? g[i] + wd * p[i] : g[i];
        const T si = a * s[i] + one_a * gi * gi;
        s[i] = si;
        const T avg = fp_sqrt(si) + eps;
        if (kMomentum) {
            const T bi = flush_subnormal(mom * buf[i] + gi / avg);
            buf[i] = bi;
            p[i] -= lr * bi;
        } else {
            p[i] -= lr * gi / avg;
        }
    }
}

template <typename T, bool kDecay>
void adagrad_range(index_t b, index_t e, T* p, const T* g, T* sum, T lr, T eps, T wd) {
    for (index_t i = b; i < e; ++i) {
        const T gi = kDecay ? g[i] + wd * p[i] : g[i];
        const T si = sum[i] + gi * gi;
        sum[i] = si;
        p[i] -= lr * gi / (fp_sqrt(si) + eps);
    }
}

// Adam's update p -= step_size * m / (sqrt(v) / c2 + eps) rewritten as
// p -= (step_size c2) * m / (sqrt(v) + eps c2): the same value up to rounding, with one
// division per element instead of two (Zen4: 0.31 vs 0.41 ns per element in cache).
template <typename T>
using Scalars = OptimizerScalars<T>;

}  // namespace

template <typename T>
OptimizerScalars<T> optimizer_scalars(const OptimizerPlan<T>& o) {
    OptimizerScalars<T> s;
    s.lr = T(o.lr);
    s.mom = T(o.momentum);
    s.wd = T(o.weight_decay);
    s.alpha = T(o.alpha);
    s.one_alpha = T(1.0 - o.alpha);
    s.b1 = T(o.beta1);
    s.b2 = T(o.beta2);
    s.one_b1 = T(1.0 - o.beta1);
    s.one_b2 = T(1.0 - o.beta2);
    s.step_size = s.eps = s.shrink = T(0);
    if (o.kind == kOptAdam) {
        const double c1 = 1.0 - pow_int(o.beta1, o.step);
        const double c2 = fp_sqrt(1.0 - pow_int(o.beta2, o.step));
        s.step_size = T(o.lr / c1 * c2);
        s.eps = T(o.eps * c2);
        s.shrink = T(1.0 - o.lr * o.weight_decay);
    } else {
        s.eps = T(o.eps);
    }
    return s;
}

namespace {

// Segments of tensor i: `segments(kernel)` calls kernel(b, e) for each element range
// [b, e) to update.  The variant (kind, decay, momentum mode) is resolved once, then
// every segment runs the same inlined, vectorised loop: the fused training step
// passes the rows of a GEMM block (16 elements each), whole-tensor updates one range.
template <typename T, typename Segments>
void update_segments(const OptimizerPlan<T>& o, const Scalars<T>& plan_scalars, index_t i,
                     Segments&& segments) {
    // a tensor that sat out steps (frozen for a while) takes its own step count: Adam's
    // bias corrections of that count (a few multiplications; per range, rare)
    const std::int64_t step =
        o.lag != nullptr ? fp_max<std::int64_t>(1, o.step - o.lag[i]) : o.step;
    const bool own_step = step != o.step && o.kind == kOptAdam;
    Scalars<T> own;
    if (own_step) {
        OptimizerPlan<T> mine = o;
        mine.step = step;
        own = optimizer_scalars(mine);
    }
    const Scalars<T>& s = own_step ? own : plan_scalars;
    T* p = o.params[i];
    const T* g = o.grads[i];
    T* s1 = o.state1 != nullptr ? o.state1[i] : nullptr;
    T* s2 = o.state2 != nullptr ? o.state2[i] : nullptr;
    const bool wd = o.weight_decay != 0.0 && (o.decay == nullptr || o.decay[i] != 0);
#define FASTPROP_SGD(kDecay, kMode)                                                    \
    segments([&](index_t b, index_t e) {                                               \
        sgd_range<T, kDecay, kMode>(b, e, p, g, s1, s.lr, s.mom, s.wd);                \
    })
    switch (o.kind) {
        case kOptSgd: {
            const int mode = (o.momentum == 0.0 || s1 == nullptr)
                                 ? 0
                                 : (step == 1 ? 1 : 2) + (o.nesterov ? 2 : 0);
            switch (mode + (wd ? 5 : 0)) {
                case 0: FASTPROP_SGD(false, 0); break;
                case 1: FASTPROP_SGD(false, 1); break;
                case 2: FASTPROP_SGD(false, 2); break;
                case 3: FASTPROP_SGD(false, 3); break;
                case 4: FASTPROP_SGD(false, 4); break;
                case 5: FASTPROP_SGD(true, 0); break;
                case 6: FASTPROP_SGD(true, 1); break;
                case 7: FASTPROP_SGD(true, 2); break;
                case 8: FASTPROP_SGD(true, 3); break;
                default: FASTPROP_SGD(true, 4); break;
            }
            break;
        }
#undef FASTPROP_SGD
        case kOptAdam:
            if (wd && o.decoupled)
                segments([&](index_t b, index_t e) {
                    adam_range<T, 1>(b, e, p, g, s1, s2, s.b1, s.b2, s.one_b1, s.one_b2,
                        s.step_size, s.eps, s.shrink);
                });
            else if (wd)
                segments([&](index_t b, index_t e) {
                    adam_range<T, 2>(b, e, p, g, s1, s2, s.b1, s.b2, s.one_b1, s.one_b2,
                        s.step_size, s.eps, s.wd);
                });
            else
                segments([&](index_t b, index_t e) {
                    adam_range<T, 0>(b, e, p, g, s1, s2, s.b1, s.b2, s.one_b1, s.one_b2,
                        s.step_size, s.eps, s.wd);
                });
            break;
        case kOptRmsprop: {
            const bool mom = o.momentum > 0.0 && s2 != nullptr;
            if (wd && mom)
                segments([&](index_t b, index_t e) {
                    rmsprop_range<T, true, true>(b, e, p, g, s1, s2, s.lr, s.alpha,
                        s.one_alpha, s.eps, s.mom, s.wd);
                });
            else if (wd)
                segments([&](index_t b, index_t e) {
                    rmsprop_range<T, true, false>(b, e, p, g, s1, s2, s.lr, s.alpha,
                        s.one_alpha, s.eps, s.mom, s.wd);
                });
            else if (mom)
                segments([&](index_t b, index_t e) {
                    rmsprop_range<T, false, true>(b, e, p, g, s1, s2, s.lr, s.alpha,
                        s.one_alpha, s.eps, s.mom, s.wd);
                });
            else
                segments([&](index_t b, index_t e) {
                    rmsprop_range<T, false, false>(b, e, p, g, s1, s2, s.lr, s.alpha,
                        s.one_alpha, s.eps, s.mom, s.wd);
                });
            break;
        }
        default:
            if (wd)
                segments([&](index_t b, index_t e) {
                    adagrad_range<T, true>(b, e, p, g, s1, s.lr, s.eps, s.wd);
                });
            else
                segments([&](index_t b, index_t e) {
                    adagrad_range<T, false>(b, e, p, g, s1, s.lr, s.eps, s.wd);
                });
            break;
    }
}

// Elements [b, e) of tensor i.
template <typename T>
void update_range(const OptimizerPlan<T>& o, const Scalars<T>& s, index_t i, index_t b,
                  index_t e) {
    update_segments(o, s, i, [b, e](auto&& kernel) { kernel(b, e); });
}

}  // namespace

// All tensors as one index space [0, sum of sizes): one parallel region, each thread
// a contiguous chunk that may span several tensors (no fork/join per tensor).
template <typename T>
void optimizer_update(const OptimizerPlan<T>& o) {
    index_t total = 0;
    for (index_t i = 0; i < o.count; ++i) total += o.sizes[i];
    if (total <= 0) return;
    const Scalars<T> s = optimizer_scalars(o);
    const index_t grain = o.kind == kOptSgd ? kElementGrain : kMathGrain;
    parallel_for(total, grain, [&](index_t b, index_t e) {
        index_t offset = 0;
        for (index_t i = 0; i < o.count && offset < e; ++i) {
            const index_t lo = fp_max(b, offset), hi = fp_min(e, offset + o.sizes[i]);
            if (lo < hi) update_range(o, s, i, lo - offset, hi - offset);
            offset += o.sizes[i];
        }
    });
}

namespace {

template <typename T>
OptimizerPlan<T> single(int kind, index_t* size, T** p, const T** g, T** s1, T** s2,
                        double lr, std::int64_t step) {
    OptimizerPlan<T> o;
    o.kind = kind;
    o.count = 1;
    o.params = p;
    o.grads = g;
    o.state1 = *s1 != nullptr ? s1 : nullptr;
    o.state2 = *s2 != nullptr ? s2 : nullptr;
    o.sizes = size;
    o.step = step;
    o.lr = lr;
    o.beta1 = o.beta2 = o.eps = o.weight_decay = o.momentum = o.alpha = 0.0;
    o.nesterov = o.decoupled = false;
    o.decay = nullptr;
    o.lag = nullptr;
    return o;
}

}  // namespace

template <typename T>
void sgd_update(index_t size, T* p, const T* g, T* buf, double lr, double momentum,
                bool nesterov, double weight_decay, bool first) {
    T* none = nullptr;
    OptimizerPlan<T> o = single<T>(kOptSgd, &size, &p, &g, &buf, &none, lr, first ? 1 : 2);
    o.momentum = momentum;
    o.nesterov = nesterov;
    o.weight_decay = weight_decay;
    optimizer_update(o);
}

template <typename T>
void adam_update(index_t size, T* p, const T* g, T* m, T* v, std::int64_t step, double lr,
                 double beta1, double beta2, double eps, double weight_decay,
                 bool decoupled) {
    OptimizerPlan<T> o = single<T>(kOptAdam, &size, &p, &g, &m, &v, lr, step);
    o.beta1 = beta1;
    o.beta2 = beta2;
    o.eps = eps;
    o.weight_decay = weight_decay;
    o.decoupled = decoupled;
    optimizer_update(o);
}

template <typename T>
void rmsprop_update(index_t size, T* p, const T* g, T* square_avg, T* buf, double lr,
                    double alpha, double eps, double momentum, double weight_decay) {
    OptimizerPlan<T> o = single<T>(kOptRmsprop, &size, &p, &g, &square_avg, &buf, lr, 1);
    o.alpha = alpha;
    o.eps = eps;
    o.momentum = momentum;
    o.weight_decay = weight_decay;
    optimizer_update(o);
}

template <typename T>
void adagrad_update(index_t size, T* p, const T* g, T* sum, double lr, double eps,
                    double weight_decay) {
    T* none = nullptr;
    OptimizerPlan<T> o = single<T>(kOptAdagrad, &size, &p, &g, &sum, &none, lr, 1);
    o.eps = eps;
    o.weight_decay = weight_decay;
    optimizer_update(o);
}

// Elements [begin, end) of tensor `tensor`, serially: the fused training step calls
// this right after a GEMM has written those gradient elements (still in cache).
template <typename T>
void optimizer_range(const OptimizerPlan<T>& o, const OptimizerScalars<T>& s, index_t tensor,
                     index_t begin, index_t end) {
    update_range(o, s, tensor, begin, end);
}

template OptimizerScalars<float> optimizer_scalars<float>(const OptimizerPlan<float>&);
template OptimizerScalars<double> optimizer_scalars<double>(const OptimizerPlan<double>&);
template void optimizer_range<float>(const OptimizerPlan<float>&,
                                     const OptimizerScalars<float>&, index_t, index_t,
                                     index_t);
template void optimizer_range<double>(const OptimizerPlan<double>&,
                                      const OptimizerScalars<double>&, index_t, index_t,
                                      index_t);
template void optimizer_update<float>(const OptimizerPlan<float>&);
template void optimizer_update<double>(const OptimizerPlan<double>&);
template void sgd_update<float>(index_t, float*, const float*, float*, double, double, bool,
                                double, bool);
template void sgd_update<double>(index_t, double*, const double*, double*, double, double,
                                 bool, double, bool);
template void adam_update<float>(index_t, float*, const float*, float*, float*, std::int64_t,
                                 double, double, double, double, double, bool);
template void adam_update<double>(index_t, double*, const double*, double*, double*,
                                  std::int64_t, double, double, double, double, double, bool);
template void rmsprop_update<float>(index_t, float*, const float*, float*, float*, double,
                                    double, double, double, double);
template void rmsprop_update<double>(index_t, double*, const double*, double*, double*,
                                     double, double, double, double, double);
template void adagrad_update<float>(index_t, float*, const float*, float*, double, double,
                                    double);
template void adagrad_update<double>(index_t, double*, const double*, double*, double,
                                     double, double);

}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
