// kernel_table.hpp - the table of kernel entry points one ISA unit provides.
//
// Each ISA unit (namespace fastprop::<isa>) fills one KernelTable with pointers to
// its own template instantiations (kernel_table.cpp, compiled per ISA); dispatch.cpp
// picks one table at import and api.cpp calls through it.  The struct holds only
// function pointers: it generates no code that two ISA units could share.
#pragma once

#include <cstdint>

#include "fastprop/common.hpp"
#include "fastprop/gemm.hpp"
#include "fastprop/train_step.hpp"

namespace fastprop {
namespace detail {

template <typename T>
struct KernelOps {
    void (*gemm)(bool, bool, index_t, index_t, index_t, T, const T*, index_t, const T*,
                 index_t, T, T*, index_t);
    void (*gemm_ex)(bool, bool, index_t, index_t, index_t, T, const T*, index_t, const T*,
                    index_t, T, T*, index_t, const GemmEpilogue<T>&);
    void (*linear_forward)(index_t, index_t, index_t, const T*, const T*, const T*, int,
                           double, T*, T*);
    void (*linear_backward)(index_t, index_t, index_t, const T*, const T*, const T*,
                            const T*, const T*, int, double, T*, T*, T*, T*, bool);
    void (*activation_forward)(int, double, index_t, index_t, const T*, T*);
    void (*activation_backward)(int, double, index_t, index_t, const T*, const T*,
                                const T*, T*);
    double (*softmax_xent)(index_t, index_t, const T*, const std::int64_t*, const T*, T*);
    double (*bce)(index_t, const T*, const T*, bool, T*);
    double (*mse)(index_t, const T*, const T*, bool, T*);
    void (*sgd_update)(index_t, T*, const T*, T*, double, double, bool, double, bool);
    void (*adam_update)(index_t, T*, const T*, T*, T*, std::int64_t, double, double, double,
                        double, double, bool);
    void (*rmsprop_update)(index_t, T*, const T*, T*, T*, double, double, double, double,
                           double);
    void (*adagrad_update)(index_t, T*, const T*, T*, double, double, double);
    double (*sum_squares)(index_t, const T*);
    void (*scale)(index_t, T*, double);
    void (*clip)(index_t, T*, double, double);
    void (*batchnorm_forward)(index_t, index_t, const T*, const T*, const T*, double, T*,
                              T*, T*);
    void (*batchnorm_forward_eval)(index_t, index_t, const T*, const T*, const T*,
                                   const T*, const T*, double, T*);
    void (*batchnorm_running_update)(index_t, index_t, const T*, double, T*, T*);
    void (*batchnorm_forward_train)(index_t, index_t, const T*, const T*, const T*, double,
                                    T*, T*, T*, double, T*, T*);
    void (*batchnorm_backward)(index_t, index_t, const T*, const T*, const T*, const T*,
                               const T*, T*, T*, T*);
    void (*layernorm_forward)(index_t, index_t, const T*, const T*, const T*, double, T*,
                              T*, T*);
    void (*layernorm_backward)(index_t, index_t, const T*, const T*, const T*, const T*,
                               const T*, T*, T*, T*);
    double (*train_step)(const TrainStepPlan<T>&, int*);
    void (*optimizer_update)(const OptimizerPlan<T>&);
    double (*clip_grad_norm)(index_t, T* const*, const index_t*, double);
    double (*sum_squares_multi)(index_t, const T* const*, const index_t*);
};

struct KernelTable {
    const char* name;
    KernelOps<float> f32;
    KernelOps<double> f64;
};

}  // namespace detail
}  // namespace fastprop

namespace fastprop {
namespace detail {

// The table chosen at import (dispatch.cpp).
const KernelTable& active_table() noexcept;

}  // namespace detail
}  // namespace fastprop
