# cython: language_level=3
"""Tier 1: declarations of the C++ kernel API (csrc/include/fastprop/*.hpp).

Every function is ``noexcept nogil``: the kernels never raise and never touch
Python objects.  C++ names get an ``fp_`` prefix here so that the ``def`` wrappers
in _native.pyx can carry the contract's names; each is overloaded for float and
double.
"""

from libc.stdint cimport int64_t
from libcpp cimport bool as cbool


cdef extern from "fastprop/dispatch.hpp" namespace "fastprop" nogil:
    cdef struct CpuFeatures "fastprop::CpuFeatures":
        cbool sse4_2
        cbool avx
        cbool avx2
        cbool fma
        cbool avx512f
        cbool avx512

    void fp_init_dispatch "fastprop::init_dispatch"() noexcept
    const char* fp_isa_name "fastprop::isa_name"() noexcept
    const char* fp_isa_requested "fastprop::isa_requested"() noexcept
    const char* fp_dispatch_note "fastprop::dispatch_note"() noexcept
    const char* fp_available_isas "fastprop::available_isas"() noexcept
    CpuFeatures fp_cpu_features "fastprop::cpu_features"() noexcept
    cbool fp_openmp_enabled "fastprop::openmp_enabled"() noexcept
    int fp_get_num_threads "fastprop::get_num_threads"() noexcept
    void fp_set_num_threads "fastprop::set_num_threads"(int n) noexcept
    cbool fp_threads_usable "fastprop::threads_usable"() noexcept
    int fp_threads_free "fastprop::threads_free"(int nt) noexcept
    cbool fp_backoff_enabled "fastprop::backoff_enabled"() noexcept
    void fp_set_backoff "fastprop::set_backoff"(cbool on) noexcept
    int fp_backoff_state "fastprop::backoff_state"() noexcept
    int fp_own_runnable_threads "fastprop::own_runnable_threads"() noexcept nogil
    void fp_force_pinned "fastprop::force_pinned"(cbool on) noexcept
    const char* fp_compiler_id "fastprop::compiler_id"() noexcept
    const char* fp_baseline_flags "fastprop::baseline_flags"() noexcept
    const char* fp_avx2_flags "fastprop::avx2_flags"() noexcept
    const char* fp_avx512_flags "fastprop::avx512_flags"() noexcept


cdef extern from "fastprop/gemm.hpp" nogil:
    void fp_gemm "fastprop::gemm"(cbool trans_a, cbool trans_b, int64_t m, int64_t n,
                                  int64_t k, float alpha, const float* a, int64_t lda,
                                  const float* b, int64_t ldb, float beta, float* c,
                                  int64_t ldc) noexcept
    void fp_gemm "fastprop::gemm"(cbool trans_a, cbool trans_b, int64_t m, int64_t n,
                                  int64_t k, double alpha, const double* a, int64_t lda,
                                  const double* b, int64_t ldb, double beta, double* c,
                                  int64_t ldc) noexcept

    cdef cppclass GemmEpilogue "fastprop::GemmEpilogue"[T]:
        const T* bias
        T* preact
        int64_t ld_preact
        int act
        double alpha
        const T* dsrc
        int64_t ld_dsrc
        int dact
        double dalpha
        double* colsum
        int* nonfinite

    void fp_gemm_ex "fastprop::gemm_ex"(cbool trans_a, cbool trans_b, int64_t m, int64_t n,
                                        int64_t k, float alpha, const float* a, int64_t lda,
                                        const float* b, int64_t ldb, float beta, float* c,
                                        int64_t ldc, const GemmEpilogue[float]& ep) noexcept
    void fp_gemm_ex "fastprop::gemm_ex"(cbool trans_a, cbool trans_b, int64_t m, int64_t n,
                                        int64_t k, double alpha, const double* a, int64_t lda,
                                        const double* b, int64_t ldb, double beta, double* c,
                                        int64_t ldc, const GemmEpilogue[double]& ep) noexcept


cdef extern from "fastprop/linear.hpp" nogil:
    void fp_linear_forward "fastprop::linear_forward"(
        int64_t n, int64_t n_in, int64_t n_out, const float* x, const float* w,
        const float* b, int act, double alpha, float* y, float* z) noexcept
    void fp_linear_forward "fastprop::linear_forward"(
        int64_t n, int64_t n_in, int64_t n_out, const double* x, const double* w,
        const double* b, int act, double alpha, double* y, double* z) noexcept
    void fp_linear_backward "fastprop::linear_backward"(
        int64_t n, int64_t n_in, int64_t n_out, const float* grad_y, const float* x,
        const float* w, const float* y, const float* z, int act, double alpha,
        float* grad_x, float* grad_w, float* grad_b, float* work, cbool accumulate) noexcept
    void fp_linear_backward "fastprop::linear_backward"(
        int64_t n, int64_t n_in, int64_t n_out, const double* grad_y, const double* x,
        const double* w, const double* y, const double* z, int act, double alpha,
        double* grad_x, double* grad_w, double* grad_b, double* work,
        cbool accumulate) noexcept


cdef extern from "fastprop/activations.hpp" nogil:
    void fp_activation_forward "fastprop::activation_forward"(
        int act, double alpha, int64_t rows, int64_t cols, const float* x, float* y) noexcept
    void fp_activation_forward "fastprop::activation_forward"(
        int act, double alpha, int64_t rows, int64_t cols, const double* x,
        double* y) noexcept
    void fp_activation_backward "fastprop::activation_backward"(
        int act, double alpha, int64_t rows, int64_t cols, const float* grad_y,
        const float* x, const float* y, float* grad_x) noexcept
    void fp_activation_backward "fastprop::activation_backward"(
        int act, double alpha, int64_t rows, int64_t cols, const double* grad_y,
        const double* x, const double* y, double* grad_x) noexcept


cdef extern from "fastprop/losses.hpp" nogil:
    double fp_softmax_xent "fastprop::softmax_xent"(
        int64_t n, int64_t c, const float* logits, const int64_t* labels,
        const float* targets, float* grad) noexcept
    double fp_softmax_xent "fastprop::softmax_xent"(
        int64_t n, int64_t c, const double* logits, const int64_t* labels,
        const double* targets, double* grad) noexcept
    double fp_bce "fastprop::bce"(int64_t count, const float* pred, const float* target,
                                  cbool from_logits, float* grad) noexcept
    double fp_bce "fastprop::bce"(int64_t count, const double* pred, const double* target,
                                  cbool from_logits, double* grad) noexcept
    double fp_mse "fastprop::mse"(int64_t count, const float* pred, const float* target,
                                  cbool half, float* grad) noexcept
    double fp_mse "fastprop::mse"(int64_t count, const double* pred, const double* target,
                                  cbool half, double* grad) noexcept


cdef extern from "fastprop/optim.hpp" nogil:
    void fp_sgd_update "fastprop::sgd_update"(
        int64_t size, float* p, const float* g, float* buf, double lr, double momentum,
        cbool nesterov, double weight_decay, cbool first) noexcept
    void fp_sgd_update "fastprop::sgd_update"(
        int64_t size, double* p, const double* g, double* buf, double lr, double momentum,
        cbool nesterov, double weight_decay, cbool first) noexcept
    void fp_adam_update "fastprop::adam_update"(
        int64_t size, float* p, const float* g, float* m, float* v, int64_t step,
        double lr, double beta1, double beta2, double eps, double weight_decay,
        cbool decoupled) noexcept
    void fp_adam_update "fastprop::adam_update"(
        int64_t size, double* p, const double* g, double* m, double* v, int64_t step,
        double lr, double beta1, double beta2, double eps, double weight_decay,
        cbool decoupled) noexcept
    void fp_rmsprop_update "fastprop::rmsprop_update"(
        int64_t size, float* p, const float* g, float* square_avg, float* buf, double lr,
        double alpha, double eps, double momentum, double weight_decay) noexcept
    void fp_rmsprop_update "fastprop::rmsprop_update"(
        int64_t size, double* p, const double* g, double* square_avg, double* buf,
        double lr, double alpha, double eps, double momentum, double weight_decay) noexcept
    void fp_adagrad_update "fastprop::adagrad_update"(
        int64_t size, float* p, const float* g, float* sum, double lr, double eps,
        double weight_decay) noexcept
    void fp_adagrad_update "fastprop::adagrad_update"(
        int64_t size, double* p, const double* g, double* sum, double lr, double eps,
        double weight_decay) noexcept


cdef extern from "fastprop/reductions.hpp" nogil:
    double fp_sum_squares "fastprop::sum_squares"(int64_t size, const float* x) noexcept
    double fp_sum_squares "fastprop::sum_squares"(int64_t size, const double* x) noexcept
    void fp_scale "fastprop::scale"(int64_t size, float* x, double factor) noexcept
    void fp_scale "fastprop::scale"(int64_t size, double* x, double factor) noexcept
    void fp_clip "fastprop::clip"(int64_t size, float* x, double lo, double hi) noexcept
    void fp_clip "fastprop::clip"(int64_t size, double* x, double lo, double hi) noexcept


cdef extern from "fastprop/norms.hpp" nogil:
    void fp_batchnorm_forward "fastprop::batchnorm_forward"(
        int64_t n, int64_t f, const float* x, const float* gamma, const float* beta,
        double eps, float* y, float* mean, float* invstd) noexcept
    void fp_batchnorm_forward "fastprop::batchnorm_forward"(
        int64_t n, int64_t f, const double* x, const double* gamma, const double* beta,
        double eps, double* y, double* mean, double* invstd) noexcept
    void fp_batchnorm_forward_eval "fastprop::batchnorm_forward_eval"(
        int64_t n, int64_t f, const float* x, const float* gamma, const float* beta,
        const float* running_mean, const float* running_var, double eps,
        float* y) noexcept
    void fp_batchnorm_forward_eval "fastprop::batchnorm_forward_eval"(
        int64_t n, int64_t f, const double* x, const double* gamma, const double* beta,
        const double* running_mean, const double* running_var, double eps,
        double* y) noexcept
    void fp_batchnorm_running_update "fastprop::batchnorm_running_update"(
        int64_t n, int64_t f, const float* x, double momentum, float* running_mean,
        float* running_var) noexcept
    void fp_batchnorm_running_update "fastprop::batchnorm_running_update"(
        int64_t n, int64_t f, const double* x, double momentum, double* running_mean,
        double* running_var) noexcept
    void fp_batchnorm_forward_train "fastprop::batchnorm_forward_train"(
        int64_t n, int64_t f, const float* x, const float* gamma, const float* beta,
        double eps, float* y, float* mean, float* invstd, double momentum,
        float* running_mean, float* running_var) noexcept
    void fp_batchnorm_forward_train "fastprop::batchnorm_forward_train"(
        int64_t n, int64_t f, const double* x, const double* gamma, const double* beta,
        double eps, double* y, double* mean, double* invstd, double momentum,
        double* running_mean, double* running_var) noexcept
    void fp_batchnorm_backward "fastprop::batchnorm_backward"(
        int64_t n, int64_t f, const float* grad_y, const float* x, const float* gamma,
        const float* mean, const float* invstd, float* grad_x, float* grad_gamma,
        float* grad_beta) noexcept
    void fp_batchnorm_backward "fastprop::batchnorm_backward"(
        int64_t n, int64_t f, const double* grad_y, const double* x, const double* gamma,
        const double* mean, const double* invstd, double* grad_x, double* grad_gamma,
        double* grad_beta) noexcept
    void fp_layernorm_forward "fastprop::layernorm_forward"(
        int64_t n, int64_t f, const float* x, const float* gamma, const float* beta,
        double eps, float* y, float* mean, float* invstd) noexcept
    void fp_layernorm_forward "fastprop::layernorm_forward"(
        int64_t n, int64_t f, const double* x, const double* gamma, const double* beta,
        double eps, double* y, double* mean, double* invstd) noexcept
    void fp_layernorm_backward "fastprop::layernorm_backward"(
        int64_t n, int64_t f, const float* grad_y, const float* x, const float* gamma,
        const float* mean, const float* invstd, float* grad_x, float* grad_gamma,
        float* grad_beta) noexcept
    void fp_layernorm_backward "fastprop::layernorm_backward"(
        int64_t n, int64_t f, const double* grad_y, const double* x, const double* gamma,
        const double* mean, const double* invstd, double* grad_x, double* grad_gamma,
        double* grad_beta) noexcept


cdef extern from "fastprop/train_step.hpp" namespace "fastprop" nogil:
    cdef cppclass DenseLayerPlan[T]:
        int64_t n_in "in"
        int64_t n_out "out"
        const T* w
        const T* b
        T* gw
        T* gb
        int act
        double alpha
        T* y
        T* z
        T* g
        double* colsum
        int64_t w_index, b_index

    cdef cppclass OptimizerPlan[T]:
        int kind
        int64_t count
        T** params
        const T** grads
        T** state1
        T** state2
        const int64_t* sizes
        int64_t step
        double lr, beta1, beta2, eps, weight_decay, momentum, alpha
        cbool nesterov, decoupled
        const unsigned char* decay
        const int64_t* lag

    cdef cppclass TrainStepPlan[T]:
        int64_t n
        int layers
        const DenseLayerPlan[T]* layer
        const T* x
        int loss
        cbool half, from_logits
        double loss_clip
        double grad_scale
        const int64_t* labels
        const T* targets
        OptimizerPlan[T] opt
        cbool check_finite
        cbool check_x
        double clip_value
        double clip_norm

    void fp_optimizer_update "fastprop::optimizer_update"(
        const OptimizerPlan[float]& plan) noexcept
    void fp_optimizer_update "fastprop::optimizer_update"(
        const OptimizerPlan[double]& plan) noexcept
    double fp_train_step "fastprop::train_step"(const TrainStepPlan[float]& plan,
                                                int* status) noexcept
    double fp_train_step "fastprop::train_step"(const TrainStepPlan[double]& plan,
                                                int* status) noexcept


cdef extern from "fastprop/reductions.hpp" namespace "fastprop" nogil:
    double fp_clip_grad_norm "fastprop::clip_grad_norm"(
        int64_t count, float** arrays, const int64_t* sizes, double max_norm) noexcept
    double fp_clip_grad_norm "fastprop::clip_grad_norm"(
        int64_t count, double** arrays, const int64_t* sizes, double max_norm) noexcept
    double fp_sum_squares_multi "fastprop::sum_squares_multi"(
        int64_t count, const float** arrays, const int64_t* sizes) noexcept
    double fp_sum_squares_multi "fastprop::sum_squares_multi"(
        int64_t count, const double** arrays, const int64_t* sizes) noexcept
