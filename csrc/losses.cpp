// losses.cpp - softmax cross-entropy, binary cross-entropy and mean squared error
// (per ISA unit): mean loss and its gradient with respect to the prediction.
//
// Algorithm: one parallel pass over rows (softmax_xent) or elements (bce, mse);
// per-thread loss partials summed in double and combined in thread order.
// softmax_xent vectorises (vmath.hpp exp in T, 16-lane row sums in double); bce too
// (vmath.hpp exp, log and log1p in T, the sum in double) except scikit-learn's
// clipped-logits form, which follows scipy's arithmetic with libm.
//   softmax_xent: per row m = max x, s = sum exp(x - m) (double), lse = log s;
//     loss_i = lse - (x_label - m) or -sum_j t_j ((x_j - m) - lse);
//     grad = (exp(x - m) / s - t) / n, or with target rows (softmax sum_j t_j - t) / n,
//     the exact gradient when a row does not sum to 1.  Never overflows: every
//     exponent is <= 0.
//   bce (probabilities): -(t max(log p, -100) + (1-t) max(log1p(-p), -100)),
//     grad = (p - t) / max(p (1-p), 1e-12) / N (PyTorch's clamping).
//   bce (logits): max(x, 0) - x t + log1p(exp(-|x|)), grad = (sigmoid(x) - t) / N.
//   mse: mean (p - t)^2 (x 1/2 when half), grad = 2 (p - t) / N (x 1/2).
//   *_clipped: each row's / element's loss clamped to [lo, hi] = [-log(1 - clip),
//     -log(clip)] before the sum (NaN stays NaN); the gradients are unchanged.  bce
//     from logits evaluates scikit-learn's -(t log p + (1-t) log(1-p)) with p = expit(x)
//     rounded to T and clipped to [clip, 1 - clip] (its rounding of 1 - p included).
// Speed (1 thread, Zen4): softmax_xent 1024 x 100 float32 ~0.29 ms (NumPy reference
// 1.7 ms); bce 512k float32 logits, loss and gradient, 1.0 ms (libm in double: 11.1
// ms; PyTorch 1.4 ms), probabilities 1.3 ms (9.6 ms); mse 262k ~0.1 ms.
// Accuracy: mse is evaluated in double and rounded to T once; bce's element losses
// and gradients in T (within 4 ulp of T, tested over the range), the sum in double;
// softmax_xent evaluates exp(x - max) in T (a few ulp of T) and everything else (row
// sums, log, the loss sum) in double.  Loss sums are exact to about N * 2^-53 relative.
#include <limits>

#include "isa_common.hpp"
#include "kernels.hpp"
#include "vmath.hpp"

namespace fastprop {
namespace FASTPROP_ISA_NS {

namespace {

// The per-sample loss range of probabilities clipped to [clip, 1 - clip] (clip == 0:
// everything).  clamp keeps NaN (both comparisons false).
struct LossRange {
    static constexpr double kInf = std::numeric_limits<double>::infinity();
    double lo, hi;
    explicit LossRange(double clip)
        : lo(clip > 0.0 ? -fp_log1p(-clip) : -kInf), hi(clip > 0.0 ? -fp_log(clip) : kInf) {}
    double clamp(double v) const { return v < lo ? lo : (v > hi ? hi : v); }
};

// -sum_j t_j (x_j - m - lse) without the terms 0 * -inf (the cold path of a row whose
// plain sum is NaN); a NaN term (a row of -inf logits: x - m is NaN) still counts.
template <typename T>
[[gnu::noinline]] double xent_targets_masked(index_t c, const T* x, const T* t, double m,
                                             double lse) {
    double loss = 0.0;
    for (index_t j = 0; j < c; ++j) {
        const double tj = double(t[j]);
        const double d = (double(x[j]) - m) - lse;
        const bool infinite = d - d != 0.0 && d == d;
        if (tj != 0.0 || !infinite) loss -= tj * d;  // (0 * -inf: skipped)
    }
    return loss;
}

// One row of softmax cross-entropy: returns the row's loss and, when g is not null,
// writes its gradient (already divided by n).  label: pointer to the class id, or
// null when t (the target row) is given.
template <typename T>
double xent_row(index_t c, const T* x, const std::int64_t* label, const T* t, T* g,
                double inv_n) {
    // e_j = exp(x_j - m) in T (float exp for float logits: ~2 ulp, 2x the speed of a
    // double exp), summed in double; kept in g until the sum is known
    const T mt = max_of(x, c);
    const double m = double(mt);
    double s;
    if (g != nullptr) {
        s = lane_sum(0, c, [x, g, mt](index_t j) {
            const T e = vexp(T(x[j] - mt));
            g[j] = e;
            return double(e);
        });
    } else {
        s = lane_sum(0, c, [x, mt](index_t j) { return double(vexp(T(x[j] - mt))); });
    }
    const double lse = fp_log(s);
    double loss;
    double tsum = 1.0;  // rows of target probabilities need not sum to 1
    if (label != nullptr) {
        loss = lse - (double(x[*label]) - m);
    } else {
        loss = -lane_sum(0, c, [x, t, m, lse](index_t j) {
            return double(t[j]) * ((double(x[j]) - m) - lse);
        });
        // (a class of target 0 adds nothing, as 0 log 0 = 0 in the cross-entropy: a
        // masked -inf logit there gave NaN, PyTorch's result, 0 * -inf; summed again
        // without those terms only then, in a plain loop: the select inside
        // lane_sum's vectorised lanes gave wrong float64 sums)
        if (loss != loss) loss = xent_targets_masked(c, x, t, m, lse);
        tsum = lane_sum(0, c, [t](index_t j) { return double(t[j]); });
    }
    if (g != nullptr) {
        const double scale = inv_n / s;
        if (label != nullptr) {
            const T ts = T(scale);
            for (index_t j = 0; j < c; ++j) g[j] *= ts;
            const index_t l = *label;
            g[l] = T((vexp(double(x[l]) - m) / s - 1.0) * inv_n);
        } else {
            const double pscale = scale * tsum;
            for (index_t j = 0; j < c; ++j) g[j] = T(double(g[j]) * pscale - double(t[j]) * inv_n);
        }
    }
    return loss;
}

// Rows [r0, r1) with class ids and a gradient when rows are narrow (c <= 32, e.g.
// 10 classes): the same arithmetic as xent_row, but the exponentials of a block of
// rows run as one long loop across row boundaries, which vectorises, instead of one
// c-element loop per row, which for c < 16 is scalar.  2048 x 10 float32, 1 thread:
// 110 -> 49 us (128 x 10: 7.6 -> 3.8 us).
template <typename T>
double xent_rows_narrow(index_t r0, index_t r1, index_t c, const T* x,
                        const std::int64_t* labels, T* g, double inv_n, LossRange range) {
    constexpr index_t kBlock = 64;
    T mx[kBlock];
    double loss = 0.0;
    for (index_t b0 = r0; b0 < r1; b0 += kBlock) {
        const index_t b1 = fp_min(r1, b0 + kBlock);
        for (index_t r = b0; r < b1; ++r) {
            const T* FASTPROP_RESTRICT xr = x + r * c;
            T* FASTPROP_RESTRICT gr = g + r * c;
            const T m = max_of(xr, c);
            mx[r - b0] = m;
            for (index_t j = 0; j < c; ++j) gr[j] = T(xr[j] - m);
        }
        T* FASTPROP_RESTRICT gb = g + b0 * c;
        const index_t len = (b1 - b0) * c;
        for (index_t i = 0; i < len; ++i) gb[i] = vexp(gb[i]);
        for (index_t r = b0; r < b1; ++r) {
            const T* xr = x + r * c;
            T* FASTPROP_RESTRICT gr = g + r * c;
            const double m = double(mx[r - b0]);
            // (four partial sums in registers: lane_sum's 16-lane array, filled by
            // scalar stores for c < 16 and reduced with vector loads, stalls on store
            // forwarding, ~40% of this loop's time)
            double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
            index_t j = 0;
            for (; j + 4 <= c; j += 4) {
                s0 += double(gr[j]);
                s1 += double(gr[j + 1]);
                s2 += double(gr[j + 2]);
                s3 += double(gr[j + 3]);
            }
            for (; j < c; ++j) s0 += double(gr[j]);
            const double s = (s0 + s1) + (s2 + s3);
            const index_t l = labels[r];
            loss += range.clamp(fp_log(s) - (double(xr[l]) - m));
            const T ts = T(inv_n / s);
            for (index_t j = 0; j < c; ++j) gr[j] *= ts;
            gr[l] = T((vexp(double(xr[l]) - m) / s - 1.0) * inv_n);
        }
    }
    return loss;
}

constexpr index_t kNarrowXent = 32;

}  // namespace

template <typename T>
double softmax_xent_clipped(index_t n, index_t c, const T* logits, const std::int64_t* labels,
                            const T* targets, T* grad, double clip) {
    if (n <= 0 || c <= 0) return 0.0;
    const double inv_n = 1.0 / double(n);
    const LossRange range(clip);
    const index_t grain = fp_max<index_t>(1, kExpGrain / c);
    const bool narrow = c <= kNarrowXent && labels != nullptr && grad != nullptr;
    const double total = parallel_sum(n, grain, [=](index_t r0, index_t r1) {
        if (narrow) return xent_rows_narrow(r0, r1, c, logits, labels, grad, inv_n, range);
        double loss = 0.0;
        for (index_t r = r0; r < r1; ++r)
            loss += range.clamp(xent_row(c, logits + r * c, labels != nullptr ? labels + r : nullptr,
                                         targets != nullptr ? targets + r * c : nullptr,
                                         grad != nullptr ? grad + r * c : nullptr, inv_n));
        return loss;
    });
    return total * inv_n;
}

template <typename T>
double softmax_xent(index_t n, index_t c, const T* logits, const std::int64_t* labels,
                    const T* targets, T* grad) {
    return softmax_xent_clipped(n, c, logits, labels, targets, grad, 0.0);
}

template <typename T>
double bce_clipped(index_t count, const T* pred, const T* target, bool from_logits, T* grad,
                   double clip) {
    if (count <= 0) return 0.0;
    const double inv_n = 1.0 / double(count);
    const LossRange range(clip);
    const double total = parallel_sum(count, kExpGrain, [=](index_t b, index_t e) {
        double loss = 0.0;
        if (from_logits && clip > 0.0) {
            // scikit-learn's arithmetic: p = expit(x) as scipy evaluates it, rounded
            // to T, clipped, then log p and log(1 - p): its loss of a saturated output
            // (p within a few ulp of 1) carries the rounding of 1 - p, which the exact
            // form below does not (x = 34.5: 34.5 exactly vs ~34.4-34.6)
            const T lo = T(clip), hi = T(1.0 - clip);
            for (index_t i = b; i < e; ++i) {
                const double x = double(pred[i]), t = double(target[i]);
                T p = T(1.0 / (1.0 + fp_exp(-x)));
                p = p < lo ? lo : (p > hi ? hi : p);  // (NaN stays NaN)
                loss -= t * fp_log(double(p)) + (1.0 - t) * fp_log(double(T(1) - p));
                if (grad != nullptr) grad[i] = T((vsigmoid(x) - t) * inv_n);
            }
        } else if (from_logits) {
            // e = exp(-|x|) serves the loss's log1p and the gradient.  The element's
            // arithmetic is in T (float exp and log for float logits, as softmax_xent:
            // 16 lanes instead of 8 and no Pade division), the sum in double.
            const T tn = T(inv_n);
            // Both written so that nothing cancels: sigmoid(x) - t is (1 - t) - e r for
            // x >= 0 (sigmoid(x) = 1 - e r, e = exp(-|x|), r = 1 / (1 + e); rounding
            // sigmoid(x) first lost every digit of a confident correct prediction's
            // gradient, x = 16, t = 1), e r - t otherwise; max(x, 0) - x t is
            // x (1 - t) or -x t (t = 0.999, x = 1000: 1000 - 999 lost ~10 bits).
            loss = lane_sum(b, e, [=](index_t i) {
                const T x = pred[i], t = target[i];
                const T ex = vexp_nonpos(x < T(0) ? x : -x);
                const bool pos = x >= T(0);
                if (grad != nullptr) {
                    const T er = ex * (T(1) / (T(1) + ex));
                    grad[i] = (pos ? (T(1) - t) - er : er - t) * tn;
                }
                return double((pos ? x * (T(1) - t) : -x * t) + vlog1p(ex));
            });
        } else {
            const T tn = T(inv_n);
            loss = lane_sum(b, e, [=](index_t i) {
                const T p = pred[i], t = target[i];
                const T log_p = fp_max(vlog(p), T(-100));
                const T log_1p = fp_max(vlog1p(-p), T(-100));
                if (grad != nullptr)
                    grad[i] = (p - t) / fp_max(p * (T(1) - p), T(1e-12)) * tn;
                return range.clamp(-(double(t) * double(log_p) +
                                     (1.0 - double(t)) * double(log_1p)));
            });
        }
        return loss;
    });
    return total * inv_n;
}

template <typename T>
double bce(index_t count, const T* pred, const T* target, bool from_logits, T* grad) {
    return bce_clipped(count, pred, target, from_logits, grad, 0.0);
}

template <typename T>
double mse(index_t count, const T* pred, const T* target, bool half, T* grad) {
    if (count <= 0) return 0.0;
    const double scale = half ? 0.5 : 1.0;
    const double gscale = 2.0 * scale / double(count);
    const double total = parallel_sum(count, kElementGrain, [=](index_t b, index_t e) {
        const double part = lane_sum(b, e, [pred, target](index_t i) {
            const double d = double(pred[i]) - double(target[i]);
            return d * d;
        });
        if (grad != nullptr) {
            const double gs = gscale;  // a local: a captured double could alias grad
            for (index_t j = b; j < e; ++j) grad[j] = T((double(pred[j]) - double(target[j])) * gs);
        }
        return part;
    });
    return scale * total / double(count);
}

template double softmax_xent<float>(index_t, index_t, const float*, const std::int64_t*,
                                    const float*, float*);
template double softmax_xent<double>(index_t, index_t, const double*, const std::int64_t*,
                                     const double*, double*);
template double softmax_xent_clipped<float>(index_t, index_t, const float*,
                                            const std::int64_t*, const float*, float*, double);
template double softmax_xent_clipped<double>(index_t, index_t, const double*,
                                             const std::int64_t*, const double*, double*,
                                             double);
template double bce_clipped<float>(index_t, const float*, const float*, bool, float*, double);
template double bce_clipped<double>(index_t, const double*, const double*, bool, double*,
                                    double);
template double bce<float>(index_t, const float*, const float*, bool, float*);
template double bce<double>(index_t, const double*, const double*, bool, double*);
template double mse<float>(index_t, const float*, const float*, bool, float*);
template double mse<double>(index_t, const double*, const double*, bool, double*);

}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
