// optim.cpp - SGD (momentum, Nesterov), Adam/AdamW, RMSprop and Adagrad updates of
// one parameter tensor, in place (per ISA unit).
//
// Algorithm: one fused pass over the elements (read p, g and the state once, write
// p and the state once), split over OpenMP threads for large tensors
// (from 256k elements for SGD, 64k for the others; isa_common.hpp).  Scalar
// factors (lr, 1 - beta, Adam's bias corrections lr / (1 - beta1^step) and
// sqrt(1 - beta2^step)) are computed once in double and rounded to T; elementwise
// arithmetic is in T, in the same order as the NumPy reference, so results agree
// to a few ulp of T (the avx2 unit may contract a*b + c into one FMA).
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

}  // namespace

template <typename T>
void sgd_update(index_t size, T* p, const T* g, T* buf, double lr, double momentum,
                bool nesterov, double weight_decay, bool first) {
    const T tlr = T(lr), mom = T(momentum), wd = T(weight_decay);
    const bool use_wd = weight_decay != 0.0;
    const bool use_mom = momentum != 0.0 && buf != nullptr;
    parallel_for(size, kElementGrain, [&](index_t b, index_t e) {
        for (index_t i = b; i < e; ++i) {
            T d = use_wd ? g[i] + wd * p[i] : g[i];
            if (use_mom) {
                const T bi = first ? d : mom * buf[i] + d;
                buf[i] = bi;
                d = nesterov ? d + mom * bi : bi;
            }
            p[i] -= tlr * d;
        }
    });
}

template <typename T>
void adam_update(index_t size, T* p, const T* g, T* m, T* v, std::int64_t step, double lr,
                 double beta1, double beta2, double eps, double weight_decay,
                 bool decoupled) {
    const double bias_c1 = 1.0 - pow_int(beta1, step);
    const double bias_c2_sqrt = fp_sqrt(1.0 - pow_int(beta2, step));
    const T step_size = T(lr / bias_c1), c2 = T(bias_c2_sqrt), teps = T(eps);
    const T b1 = T(beta1), b2 = T(beta2), one_b1 = T(1.0 - beta1), one_b2 = T(1.0 - beta2);
    const T wd = T(weight_decay), shrink = T(1.0 - lr * weight_decay);
    const bool use_wd = weight_decay != 0.0;
    parallel_for(size, kMathGrain, [&](index_t b, index_t e) {
        for (index_t i = b; i < e; ++i) {
            T pi = p[i];
            T gi = g[i];
            if (use_wd) {
                if (decoupled)
                    pi *= shrink;
                else
                    gi = gi + wd * pi;
            }
            const T mi = b1 * m[i] + one_b1 * gi;
            const T vi = b2 * v[i] + one_b2 * gi * gi;
            m[i] = mi;
            v[i] = vi;
            p[i] = pi - step_size * mi / (fp_sqrt(vi) / c2 + teps);
        }
    });
}

template <typename T>
void rmsprop_update(index_t size, T* p, const T* g, T* square_avg, T* buf, double lr,
                    double alpha, double eps, double momentum, double weight_decay) {
    const T tlr = T(lr), a = T(alpha), one_a = T(1.0 - alpha), teps = T(eps);
    const T mom = T(momentum), wd = T(weight_decay);
    const bool use_wd = weight_decay != 0.0;
    const bool use_mom = momentum > 0.0 && buf != nullptr;
    parallel_for(size, kMathGrain, [&](index_t b, index_t e) {
        for (index_t i = b; i < e; ++i) {
            const T gi = use_wd ? g[i] + wd * p[i] : g[i];
            const T si = a * square_avg[i] + one_a * gi * gi;
            square_avg[i] = si;
            const T avg = fp_sqrt(si) + teps;
            if (use_mom) {
                const T bi = mom * buf[i] + gi / avg;
                buf[i] = bi;
                p[i] -= tlr * bi;
            } else {
                p[i] -= tlr * gi / avg;
            }
        }
    });
}

template <typename T>
void adagrad_update(index_t size, T* p, const T* g, T* sum, double lr, double eps,
                    double weight_decay) {
    const T tlr = T(lr), teps = T(eps), wd = T(weight_decay);
    const bool use_wd = weight_decay != 0.0;
    parallel_for(size, kMathGrain, [&](index_t b, index_t e) {
        for (index_t i = b; i < e; ++i) {
            const T gi = use_wd ? g[i] + wd * p[i] : g[i];
            const T si = sum[i] + gi * gi;
            sum[i] = si;
            p[i] -= tlr * gi / (fp_sqrt(si) + teps);
        }
    });
}

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
