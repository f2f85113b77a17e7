// kernels.hpp - the per-ISA kernel templates (internal).
//
// Included by the ISA units, which are compiled once per ISA with
// -DFASTPROP_ISA_NS=<isa>: every symbol lands in namespace fastprop::<isa>, so
// the generic and the AVX2 instantiations never share a mangled name and the
// linker cannot substitute one for the other.  Each template is explicitly
// instantiated for float and double in its source file.  Semantics: the public
// headers under include/fastprop/.
#pragma once

#include <cstdint>

#include "fastprop/common.hpp"
#include "fastprop/gemm.hpp"
#include "fastprop/optim.hpp"
#include "fastprop/train_step.hpp"
#include "kernel_table.hpp"

#ifndef FASTPROP_ISA_NS
#error "compile ISA units with -DFASTPROP_ISA_NS=<isa>"
#endif

namespace fastprop {
namespace FASTPROP_ISA_NS {

const detail::KernelTable* kernel_table() noexcept;

template <typename T>
void gemm(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, T alpha, const T* a,
          index_t lda, const T* b, index_t ldb, T beta, T* c, index_t ldc);
template <typename T>
void gemm_ex(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, T alpha, const T* a,
             index_t lda, const T* b, index_t ldb, T beta, T* c, index_t ldc,
             const GemmEpilogue<T>& ep);

template <typename T>
void linear_forward(index_t n, index_t in, index_t out, const T* x, const T* w, const T* b,
                    int act, double alpha, T* y, T* z);
template <typename T>
void linear_backward(index_t n, index_t in, index_t out, const T* grad_y, const T* x,
                     const T* w, const T* y, const T* z, int act, double alpha, T* grad_x,
                     T* grad_w, T* grad_b, T* work, bool accumulate);

template <typename T>
void activation_forward(int act, double alpha, index_t rows, index_t cols, const T* x, T* y);
template <typename T>
void activation_backward(int act, double alpha, index_t rows, index_t cols, const T* grad_y,
                         const T* x, const T* y, T* grad_x);

template <typename T>
double softmax_xent(index_t n, index_t c, const T* logits, const std::int64_t* labels,
                    const T* targets, T* grad);
template <typename T>
double bce(index_t count, const T* pred, const T* target, bool from_logits, T* grad);
// The same with each row's (softmax_xent) or element's (bce) loss clamped to
// [-log(1 - clip), -log(clip)] before the sum (clip in (0, 1/2); 0: no clamp): the loss
// of probabilities clipped to [clip, 1 - clip], scikit-learn's log_loss with clip = eps
// (the gradient is not clipped, as in scikit-learn).  For softmax rows this is that
// loss for class ids and one-hot targets.
template <typename T>
double softmax_xent_clipped(index_t n, index_t c, const T* logits, const std::int64_t* labels,
                            const T* targets, T* grad, double clip);
template <typename T>
double bce_clipped(index_t count, const T* pred, const T* target, bool from_logits, T* grad,
                   double clip);
template <typename T>
double mse(index_t count, const T* pred, const T* target, bool half, T* grad);

template <typename T>
void optimizer_update(const OptimizerPlan<T>& plan);
// Scalar factors of one step (bias corrections etc., computed once in double) and the
// serial update of elements [begin, end) of one tensor.
template <typename T>
struct OptimizerScalars {
    T lr, mom, wd, b1, b2, one_b1, one_b2, step_size, eps, shrink, alpha, one_alpha;
};
template <typename T>
OptimizerScalars<T> optimizer_scalars(const OptimizerPlan<T>& plan);
template <typename T>
void optimizer_range(const OptimizerPlan<T>& plan, const OptimizerScalars<T>& s,
                     index_t tensor, index_t begin, index_t end);
template <typename T>
void sgd_update(index_t size, T* p, const T* g, T* buf, double lr, double momentum,
                bool nesterov, double weight_decay, bool first);
template <typename T>
void adam_update(index_t size, T* p, const T* g, T* m, T* v, std::int64_t step, double lr,
                 double beta1, double beta2, double eps, double weight_decay, bool decoupled);
template <typename T>
void rmsprop_update(index_t size, T* p, const T* g, T* square_avg, T* buf, double lr,
                    double alpha, double eps, double momentum, double weight_decay);
template <typename T>
void adagrad_update(index_t size, T* p, const T* g, T* sum, double lr, double eps,
                    double weight_decay);

template <typename T>
double sum_squares(index_t size, const T* x);
template <typename T>
double sum_squares_multi(index_t count, const T* const* arrays, const index_t* sizes);
template <typename T>
double clip_grad_norm(index_t count, T* const* arrays, const index_t* sizes, double max_norm);
template <typename T>
void scale(index_t size, T* x, double factor);
template <typename T>
void clip(index_t size, T* x, double lo, double hi);
// sums[j] (+)= sum_i x[i, j] over rows x (rows, cols), accumulated in double.
template <typename T>
void column_sums(index_t rows, index_t cols, const T* x, T* sums, bool accumulate);
template <typename T>
void column_sums_double(index_t rows, index_t cols, const T* x, double* sums);

template <typename T>
void batchnorm_forward(index_t n, index_t f, const T* x, const T* gamma, const T* beta,
                       double eps, T* y, T* mean, T* invstd);
template <typename T>
void batchnorm_forward_eval(index_t n, index_t f, const T* x, const T* gamma, const T* beta,
                            const T* running_mean, const T* running_var, double eps, T* y);
template <typename T>
void batchnorm_running_update(index_t n, index_t f, const T* x, double momentum,
                              T* running_mean, T* running_var);
template <typename T>
void batchnorm_forward_train(index_t n, index_t f, const T* x, const T* gamma, const T* beta,
                             double eps, T* y, T* mean, T* invstd, double momentum,
                             T* running_mean, T* running_var);
template <typename T>
void batchnorm_backward(index_t n, index_t f, const T* grad_y, const T* x, const T* gamma,
                        const T* mean, const T* invstd, T* grad_x, T* grad_gamma,
                        T* grad_beta);
template <typename T>
void layernorm_forward(index_t n, index_t f, const T* x, const T* gamma, const T* beta,
                       double eps, T* y, T* mean, T* invstd);
template <typename T>
void layernorm_backward(index_t n, index_t f, const T* grad_y, const T* x, const T* gamma,
                        const T* mean, const T* invstd, T* grad_x, T* grad_gamma,
                        T* grad_beta);

// A whole training step (train_step.cpp); returns the loss, *status as in
// fastprop/train_step.hpp.
template <typename T>
double train_step(const TrainStepPlan<T>& plan, int* status);

}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
