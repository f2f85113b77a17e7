// isa_common.hpp - helpers for the ISA units: scalar math, min/max, threading.
//
// Everything here has internal linkage (an unnamed namespace inside
// fastprop::<isa>), and nothing calls a std:: template or inline function: the
// math goes through compiler builtins (libm calls or inline code), min/max are our
// own.  So an AVX2 unit never emits a weak symbol that the linker could pick for the
// baseline unit (the -march=native / ODR hazard NumPy and PyTorch guard against).
//
// Threading: parallel_for / parallel_sum split [0, n) into one contiguous chunk per
// thread when the work is large enough (at least `grain` items per thread) and no
// OpenMP region is already active; thread count from omp_get_max_threads().
// parallel_sum combines per-thread partial sums in thread order, so the result is
// deterministic for a given thread count.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fastprop/common.hpp"
#include "runtime.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif
#if !(defined(__GNUC__) || defined(__clang__))
#include <math.h>
#endif

#ifndef FASTPROP_ISA_NS
#error "compile ISA units with -DFASTPROP_ISA_NS=<isa>"
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FASTPROP_RESTRICT __restrict__
#elif defined(_MSC_VER)
#define FASTPROP_RESTRICT __restrict
#else
#define FASTPROP_RESTRICT
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FASTPROP_NOINLINE __attribute__((noinline))
#elif defined(_MSC_VER)
#define FASTPROP_NOINLINE __declspec(noinline)
#else
#define FASTPROP_NOINLINE
#endif

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

// Minimum work per thread before a loop uses another thread.  Waking an OpenMP
// team costs microseconds on an idle machine and a scheduler quantum on a busy one,
// so each thread must get ~100 us of work:
//   kElementGrain  memory-bound loops (copies, relu, scale, clip, SGD, sums, norms):
//                  128k elements per thread (a second thread from 256k elements);
//   kMathGrain     loops with a division or sqrt per element (Adam, RMSprop,
//                  Adagrad): 32k elements per thread (from 64k);
//   kExpGrain      loops with exp/log/tanh per element (sigmoid, tanh, gelu,
//                  softmax, cross-entropies): 16k elements per thread (from 32k).
constexpr index_t kElementGrain = index_t(1) << 17;
constexpr index_t kMathGrain = index_t(1) << 15;
constexpr index_t kExpGrain = index_t(1) << 14;

// ------------------------------------------------------------------ min / max
template <typename T>
inline T fp_min(T a, T b) {
    return b < a ? b : a;
}
template <typename T>
inline T fp_max(T a, T b) {
    return a < b ? b : a;
}

// ------------------------------------------------------------------ math
#if defined(__GNUC__) || defined(__clang__)
inline float fp_exp(float x) { return __builtin_expf(x); }
inline double fp_exp(double x) { return __builtin_exp(x); }
inline float fp_log(float x) { return __builtin_logf(x); }
inline double fp_log(double x) { return __builtin_log(x); }
inline double fp_log1p(double x) { return __builtin_log1p(x); }
inline float fp_tanh(float x) { return __builtin_tanhf(x); }
inline double fp_tanh(double x) { return __builtin_tanh(x); }
inline float fp_sqrt(float x) { return __builtin_sqrtf(x); }
inline double fp_sqrt(double x) { return __builtin_sqrt(x); }
inline float fp_abs(float x) { return __builtin_fabsf(x); }
inline double fp_abs(double x) { return __builtin_fabs(x); }
inline float fp_copysign(float x, float s) { return __builtin_copysignf(x, s); }
inline double fp_copysign(double x, double s) { return __builtin_copysign(x, s); }
#else
inline float fp_exp(float x) { return ::expf(x); }
inline double fp_exp(double x) { return ::exp(x); }
inline float fp_log(float x) { return ::logf(x); }
inline double fp_log(double x) { return ::log(x); }
inline double fp_log1p(double x) { return ::log1p(x); }
inline float fp_tanh(float x) { return ::tanhf(x); }
inline double fp_tanh(double x) { return ::tanh(x); }
inline float fp_sqrt(float x) { return ::sqrtf(x); }
inline double fp_sqrt(double x) { return ::sqrt(x); }
inline float fp_abs(float x) { return ::fabsf(x); }
inline double fp_abs(double x) { return ::fabs(x); }
inline float fp_copysign(float x, float s) { return ::copysignf(x, s); }
inline double fp_copysign(double x, double s) { return ::copysign(x, s); }
#endif

// ------------------------------------------------------------------ row helpers
// Sum over i in [b, e) of term(i) (a double), in 16 interleaved partial sums combined
// pairwise: vectorisable (the lanes are independent), enough independent chains
// to hide the add latency, deterministic, and the rounding error grows like
// n/16 + log2(16) instead of n.
// Beware: a term of the form `cond ? 0.0 : v` (a conditional reduction) is
// mis-vectorised by GCC 12 at -O3 -fno-trapping-math for AVX2 and AVX-512 (wrong
// sums; generic and Clang are right): softmax_xent's probability targets hit it, and
// sum such terms in a plain loop instead (losses.cpp, xent_targets_masked).
constexpr int kSumLanes = 16;

template <typename F>
inline double lane_sum(index_t b, index_t e, F term) {
    double acc[kSumLanes];
    for (int l = 0; l < kSumLanes; ++l) acc[l] = 0.0;
    index_t i = b;
    for (; i + kSumLanes <= e; i += kSumLanes)
        for (int l = 0; l < kSumLanes; ++l) acc[l] += term(i + l);
    // The tail and the pairwise combination with constant indices only, unrolled: an
    // index known only at run time (the tail's lane, a combining loop left rolled)
    // puts the partial sums on the stack, ~20 ns a call whatever the length (a
    // 256-float row's sum 45 -> 28 ns).  Same lanes, same order: the same bits.
    const index_t rem = e - i;
#pragma GCC unroll 16
    for (int l = 0; l < kSumLanes; ++l)
        if (l < rem) acc[l] += term(i + l);
    static_assert(kSumLanes == 16, "the combination below is written for 16 lanes");
#pragma GCC unroll 8
    for (int l = 0; l < 8; ++l) acc[l] += acc[l + 8];
#pragma GCC unroll 4
    for (int l = 0; l < 4; ++l) acc[l] += acc[l + 4];
    acc[0] += acc[2];
    acc[1] += acc[3];
    return acc[0] + acc[1];
}

// Sum of x[0:n] in double.
template <typename T>
inline double sum_double(const T* FASTPROP_RESTRICT x, index_t n) {
    return lane_sum(0, n, [x](index_t i) { return double(x[i]); });
}

// Sum of x[i] * y[i] in double.
template <typename T>
inline double dot_double(const T* FASTPROP_RESTRICT x, const T* FASTPROP_RESTRICT y,
                         index_t n) {
    return lane_sum(0, n, [x, y](index_t i) { return double(x[i]) * double(y[i]); });
}

// max of x[0:n], n >= 1 (8 interleaved partial maxima; NaN-agnostic).
template <typename T>
inline T max_of(const T* FASTPROP_RESTRICT x, index_t n) {
    constexpr int kLanes = 8;
    if (n < kLanes) {
        T m = x[0];
        for (index_t i = 1; i < n; ++i) m = fp_max(m, x[i]);
        return m;
    }
    T acc[kLanes];
    for (int l = 0; l < kLanes; ++l) acc[l] = x[l];
    index_t i = kLanes;
    for (; i + kLanes <= n; i += kLanes)
        for (int l = 0; l < kLanes; ++l) acc[l] = fp_max(acc[l], x[i + l]);
    T m = acc[0];
    for (int l = 1; l < kLanes; ++l) m = fp_max(m, acc[l]);
    for (; i < n; ++i) m = fp_max(m, x[i]);
    return m;
}

// ------------------------------------------------------------------ threads
// Threads available to a kernel: 1 inside an enclosing OpenMP region or in a child
// forked after the thread pool started (see runtime.hpp).
inline int max_threads() {
#if defined(_OPENMP)
    if (omp_in_parallel() || !detail::threads_usable()) return 1;
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// Number of threads worth using for `work` units when each thread needs `grain`
// (``busy``: also no more than the cores other processes leave free, runtime.hpp).
inline int threads_for(index_t work, index_t grain, bool busy = true) {
    // (at most 256, as GEMM's plan: set_num_threads(10**9) is accepted as OpenMP
    // accepts it, and a team of one thread per grain would start thousands)
    const int nt = fp_min(max_threads(), 256);
    if (nt <= 1 || work < 2 * grain) return 1;
    const index_t useful = work / grain;
    const int want = useful < nt ? static_cast<int>(useful) : nt;
    return busy ? detail::threads_free(want) : want;
}

// body(begin, end) over one contiguous chunk of [0, n) per thread.  Chunk
// boundaries are multiples of 16 items so vector loops start aligned.
template <typename F>
inline void parallel_for(index_t n, index_t grain, F&& body) {
#if defined(_OPENMP)
    const int nt = threads_for(n, grain);
    if (nt > 1) {
        detail::note_thread_pool_started(nt);
#pragma omp parallel num_threads(nt)
        {
            const index_t t = omp_get_thread_num();
            const index_t nthreads = omp_get_num_threads();
            index_t chunk = (n + nthreads - 1) / nthreads;
            chunk = (chunk + 15) & ~index_t(15);
            const index_t begin = t * chunk;
            const index_t end = fp_min(n, begin + chunk);
            if (begin < end) body(begin, end);
        }
        detail::note_team_done();
        return;
    }
#endif
    (void)grain;
    body(index_t(0), n);
}

// Sum of body(begin, end) -> double over per-thread chunks, combined in order.  The
// chunks follow the thread count set (omp_get_max_threads()), not the threads usable
// now: when other processes keep the cores busy, or in a fork child whose threads are
// unusable, the same chunks run on fewer threads (in turn), and the sum is the same
// (a fork-start worker pool gets the parent's bits).
template <typename F>
inline double parallel_sum(index_t n, index_t grain, F&& body) {
#if defined(_OPENMP)
    constexpr int kMaxThreads = 256;
    int parts = 1;
    if (!omp_in_parallel()) {
        const int nominal = omp_get_max_threads();
        if (nominal > 1 && n >= 2 * grain) {
            const index_t useful = n / grain;
            parts = useful < nominal ? static_cast<int>(useful) : nominal;
        }
    }
    if (parts > kMaxThreads) parts = kMaxThreads;
    if (parts > 1) {
        index_t chunk = (n + parts - 1) / parts;
        chunk = (chunk + 15) & ~index_t(15);
        double partial[kMaxThreads];
        for (int i = 0; i < parts; ++i) partial[i] = 0.0;
        auto run = [&](int t) {
            const index_t begin = t * chunk;
            const index_t end = fp_min(n, begin + chunk);
            if (begin < end) partial[t] = body(begin, end);
        };
        const int nt = detail::threads_usable() ? detail::threads_free(parts) : 1;
        if (nt > 1) {
            detail::note_thread_pool_started(nt);
#pragma omp parallel num_threads(nt)
            {
                const int team = omp_get_num_threads();
                for (int t = omp_get_thread_num(); t < parts; t += team) run(t);
            }
            detail::note_team_done();
        } else {
            for (int t = 0; t < parts; ++t) run(t);
        }
        double total = 0.0;
        for (int i = 0; i < parts; ++i) total += partial[i];
        return total;
    }
#endif
    (void)grain;
    return body(index_t(0), n);
}

}  // namespace
}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
