// kernel_table.cpp - this ISA unit's table of kernel entry points (per ISA unit).
//
// Fills a constant detail::KernelTable with the addresses of the float and double
// instantiations of fastprop::<isa>::*; dispatch.cpp selects one such table at
// import.  Constant-initialised: no code runs before the table is used.
#include "kernels.hpp"

#define FASTPROP_STR2(x) #x
#define FASTPROP_STR(x) FASTPROP_STR2(x)

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

template <typename T>
constexpr detail::KernelOps<T> make_ops() {
    return detail::KernelOps<T>{
        &gemm<T>,
        &gemm_ex<T>,
        &linear_forward<T>,
        &linear_backward<T>,
        &activation_forward<T>,
        &activation_backward<T>,
        &softmax_xent<T>,
        &bce<T>,
        &mse<T>,
        &sgd_update<T>,
        &adam_update<T>,
        &rmsprop_update<T>,
        &adagrad_update<T>,
        &sum_squares<T>,
        &scale<T>,
        &clip<T>,
        &batchnorm_forward<T>,
        &batchnorm_forward_eval<T>,
        &batchnorm_running_update<T>,
        &batchnorm_forward_train<T>,
        &batchnorm_backward<T>,
        &layernorm_forward<T>,
        &layernorm_backward<T>,
        &train_step<T>,
        &optimizer_update<T>,
        &clip_grad_norm<T>,
        &sum_squares_multi<T>,
    };
}

constexpr detail::KernelTable kTable{FASTPROP_STR(FASTPROP_ISA_NS), make_ops<float>(),
                                     make_ops<double>()};

}  // namespace

const detail::KernelTable* kernel_table() noexcept { return &kTable; }

}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
