// api.cpp - the public C++ kernel API (include/fastprop/*.hpp): each function
// forwards to the kernel table chosen at import (baseline unit only).
//
// One indirect call per kernel; no computation here.  Semantics and accuracy: the
// public headers and the per-kernel sources.
#include "fastprop/activations.hpp"
#include "fastprop/gemm.hpp"
#include "fastprop/linear.hpp"
#include "fastprop/losses.hpp"
#include "fastprop/norms.hpp"
#include "fastprop/optim.hpp"
#include "fastprop/reductions.hpp"
#include "fastprop/train_step.hpp"
#include "kernel_table.hpp"

namespace fastprop {
namespace {

template <typename T>
const detail::KernelOps<T>& ops() noexcept;
template <>
const detail::KernelOps<float>& ops<float>() noexcept {
    return detail::active_table().f32;
}
template <>
const detail::KernelOps<double>& ops<double>() noexcept {
    return detail::active_table().f64;
}

}  // namespace

#define FASTPROP_DEFINE_API(T)                                                                \
    void gemm(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, T alpha,           \
              const T* a, index_t lda, const T* b, index_t ldb, T beta, T* c,                 \
              index_t ldc) noexcept {                                                         \
        ops<T>().gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);        \
    }                                                                                         \
    void gemm_ex(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, T alpha,        \
                 const T* a, index_t lda, const T* b, index_t ldb, T beta, T* c, index_t ldc, \
                 const GemmEpilogue<T>& ep) noexcept {                                        \
        ops<T>().gemm_ex(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep); \
    }                                                                                         \
    void linear_forward(index_t n, index_t in, index_t out, const T* x, const T* w,           \
                        const T* b, int act, double alpha, T* y, T* z) noexcept {             \
        ops<T>().linear_forward(n, in, out, x, w, b, act, alpha, y, z);                       \
    }                                                                                         \
    void linear_backward(index_t n, index_t in, index_t out, const T* grad_y, const T* x,     \
                         const T* w, const T* y, const T* z, int act, double alpha,           \
                         T* grad_x, T* grad_w, T* grad_b, T* work, bool accumulate) noexcept { \
        ops<T>().linear_backward(n, in, out, grad_y, x, w, y, z, act, alpha, grad_x, grad_w,  \
                                 grad_b, work, accumulate);                                   \
    }                                                                                         \
    void activation_forward(int act, double alpha, index_t rows, index_t cols, const T* x,    \
                            T* y) noexcept {                                                  \
        ops<T>().activation_forward(act, alpha, rows, cols, x, y);                            \
    }                                                                                         \
    void activation_backward(int act, double alpha, index_t rows, index_t cols,               \
                             const T* grad_y, const T* x, const T* y, T* grad_x) noexcept {   \
        ops<T>().activation_backward(act, alpha, rows, cols, grad_y, x, y, grad_x);           \
    }                                                                                         \
    double softmax_xent(index_t n, index_t c, const T* logits, const std::int64_t* labels,    \
                        const T* targets, T* grad) noexcept {                                 \
        return ops<T>().softmax_xent(n, c, logits, labels, targets, grad);                    \
    }                                                                                         \
    double bce(index_t count, const T* pred, const T* target, bool from_logits,               \
               T* grad) noexcept {                                                            \
        return ops<T>().bce(count, pred, target, from_logits, grad);                          \
    }                                                                                         \
    double mse(index_t count, const T* pred, const T* target, bool half, T* grad) noexcept {  \
        return ops<T>().mse(count, pred, target, half, grad);                                 \
    }                                                                                         \
    void sgd_update(index_t size, T* p, const T* g, T* buf, double lr, double momentum,       \
                    bool nesterov, double weight_decay, bool first) noexcept {                \
        ops<T>().sgd_update(size, p, g, buf, lr, momentum, nesterov, weight_decay, first);    \
    }                                                                                         \
    void adam_update(index_t size, T* p, const T* g, T* m, T* v, std::int64_t step,           \
                     double lr, double beta1, double beta2, double eps, double weight_decay,  \
                     bool decoupled) noexcept {                                               \
        ops<T>().adam_update(size, p, g, m, v, step, lr, beta1, beta2, eps, weight_decay,     \
                             decoupled);                                                      \
    }                                                                                         \
    void rmsprop_update(index_t size, T* p, const T* g, T* square_avg, T* buf, double lr,     \
                        double alpha, double eps, double momentum,                            \
                        double weight_decay) noexcept {                                       \
        ops<T>().rmsprop_update(size, p, g, square_avg, buf, lr, alpha, eps, momentum,        \
                                weight_decay);                                                \
    }                                                                                         \
    void adagrad_update(index_t size, T* p, const T* g, T* sum, double lr, double eps,        \
                        double weight_decay) noexcept {                                       \
        ops<T>().adagrad_update(size, p, g, sum, lr, eps, weight_decay);                      \
    }                                                                                         \
    double sum_squares(index_t size, const T* x) noexcept {                                   \
        return ops<T>().sum_squares(size, x);                                                 \
    }                                                                                         \
    void scale(index_t size, T* x, double factor) noexcept {                                  \
        ops<T>().scale(size, x, factor);                                                      \
    }                                                                                         \
    void clip(index_t size, T* x, double lo, double hi) noexcept {                            \
        ops<T>().clip(size, x, lo, hi);                                                       \
    }                                                                                         \
    void batchnorm_forward(index_t n, index_t f, const T* x, const T* gamma, const T* beta,   \
                           double eps, T* y, T* mean, T* invstd) noexcept {                   \
        ops<T>().batchnorm_forward(n, f, x, gamma, beta, eps, y, mean, invstd);               \
    }                                                                                         \
    void batchnorm_forward_eval(index_t n, index_t f, const T* x, const T* gamma,             \
                                const T* beta, const T* running_mean, const T* running_var,   \
                                double eps, T* y) noexcept {                                  \
        ops<T>().batchnorm_forward_eval(n, f, x, gamma, beta, running_mean, running_var, eps, \
                                        y);                                                   \
    }                                                                                         \
    void batchnorm_running_update(index_t n, index_t f, const T* x, double momentum,          \
                                  T* running_mean, T* running_var) noexcept {                 \
        ops<T>().batchnorm_running_update(n, f, x, momentum, running_mean, running_var);      \
    }                                                                                         \
    void batchnorm_forward_train(index_t n, index_t f, const T* x, const T* gamma,            \
                                 const T* beta, double eps, T* y, T* mean, T* invstd,         \
                                 double momentum, T* running_mean, T* running_var) noexcept { \
        ops<T>().batchnorm_forward_train(n, f, x, gamma, beta, eps, y, mean, invstd,          \
                                         momentum, running_mean, running_var);                \
    }                                                                                         \
    void batchnorm_backward(index_t n, index_t f, const T* grad_y, const T* x,                \
                            const T* gamma, const T* mean, const T* invstd, T* grad_x,        \
                            T* grad_gamma, T* grad_beta) noexcept {                           \
        ops<T>().batchnorm_backward(n, f, grad_y, x, gamma, mean, invstd, grad_x, grad_gamma, \
                                    grad_beta);                                               \
    }                                                                                         \
    void layernorm_forward(index_t n, index_t f, const T* x, const T* gamma, const T* beta,   \
                           double eps, T* y, T* mean, T* invstd) noexcept {                   \
        ops<T>().layernorm_forward(n, f, x, gamma, beta, eps, y, mean, invstd);               \
    }                                                                                         \
    void layernorm_backward(index_t n, index_t f, const T* grad_y, const T* x,                \
                            const T* gamma, const T* mean, const T* invstd, T* grad_x,        \
                            T* grad_gamma, T* grad_beta) noexcept {                           \
        ops<T>().layernorm_backward(n, f, grad_y, x, gamma, mean, invstd, grad_x, grad_gamma, \
                                    grad_beta);                                               \
    }

FASTPROP_DEFINE_API(float)
FASTPROP_DEFINE_API(double)
#undef FASTPROP_DEFINE_API

double clip_grad_norm(index_t count, float* const* arrays, const index_t* sizes,
                      double max_norm) noexcept {
    return ops<float>().clip_grad_norm(count, arrays, sizes, max_norm);
}
double clip_grad_norm(index_t count, double* const* arrays, const index_t* sizes,
                      double max_norm) noexcept {
    return ops<double>().clip_grad_norm(count, arrays, sizes, max_norm);
}
double sum_squares_multi(index_t count, const float* const* arrays,
                         const index_t* sizes) noexcept {
    return ops<float>().sum_squares_multi(count, arrays, sizes);
}
double sum_squares_multi(index_t count, const double* const* arrays,
                         const index_t* sizes) noexcept {
    return ops<double>().sum_squares_multi(count, arrays, sizes);
}
void optimizer_update(const OptimizerPlan<float>& plan) noexcept {
    ops<float>().optimizer_update(plan);
}
void optimizer_update(const OptimizerPlan<double>& plan) noexcept {
    ops<double>().optimizer_update(plan);
}
double train_step(const TrainStepPlan<float>& plan, int* status) noexcept {
    return ops<float>().train_step(plan, status);
}
double train_step(const TrainStepPlan<double>& plan, int* status) noexcept {
    return ops<double>().train_step(plan, status);
}

}  // namespace fastprop
