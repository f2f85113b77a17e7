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
//   update    one parallel region: the fused layers' dW blocks, each followed by its
//             optimizer update, and the other tensors' updates (update_pieces)
// The arithmetic equals the layer-by-layer path's (same kernels and epilogue
// formulas, same summation orders), so the two agree to the last bit or, where the
// fused epilogue rounds once less, to an ulp.
#include "fastprop/train_step.hpp"
#include "isa_common.hpp"
#include "kernels.hpp"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace fastprop {
namespace FASTPROP_ISA_NS {
namespace {

template <typename T>
double loss_and_grad(const TrainStepPlan<T>& p, const DenseLayerPlan<T>& last) {
    const index_t count = p.n * last.out;
    switch (p.loss) {
        case kLossSoftmaxXent:
            return softmax_xent_clipped<T>(p.n, last.out, last.y, p.labels, p.targets, last.g,
                                           p.loss_clip);
        case kLossMse:
            return mse<T>(count, last.y, p.targets, p.half, last.g);
        default:
            return bce_clipped<T>(count, last.y, p.targets, p.from_logits, last.g, p.loss_clip);
    }
}

inline bool finite(double v) { return v - v == 0.0; }

// db = colsum (rounded to T); false if any is not finite, as rounded (a float32 sum
// above FLT_MAX is finite in double and inf once stored).
template <typename T>
bool store_bias_grad(const DenseLayerPlan<T>& d) {
    bool ok = true;
    for (index_t j = 0; j < d.out; ++j) {
        const T v = T(d.colsum[j]);
        d.gb[j] = v;
        ok = ok && finite(double(v));
    }
    return ok;
}

// max |x[i]| over count elements; *all_finite = no NaN/inf.  On the bit patterns
// with the sign cleared, as signed integers: their order is the order of |x|, and
// inf and every NaN lie above the largest finite value (an integer max reduction
// vectorises; the float form without -ffinite-math-only compiled to scalar code).
template <typename T>
double max_abs(const T* x, index_t count, bool* all_finite) {
    using I = std::conditional_t<sizeof(T) == 4, std::int32_t, std::int64_t>;
    constexpr I kAbs = std::numeric_limits<I>::max();
    constexpr I kInf = sizeof(T) == 4 ? I(0x7f800000) : I(0x7ff0000000000000);
    I m = 0;
    for (index_t i = 0; i < count; ++i) {
        I b;
        std::memcpy(&b, x + i, sizeof(I));
        b &= kAbs;
        m = b > m ? b : m;
    }
    *all_finite = m < kInf;
    T r;
    std::memcpy(&r, &m, sizeof(T));
    return double(r);
}

// Rows of a fused layer's dW block: ~64 KiB of dW, so that the block's gradient is
// still in cache when the optimizer reads it.
inline index_t fused_block_rows(index_t out) {
    return fp_max<index_t>(8, index_t(16384) / fp_max<index_t>(out, 1));
}

// dW = a^T g for rows [r0, r1) of a layer (one block), then the optimizer update of
// those rows while their gradient is still in cache.  Serial: the caller runs it
// inside the update's parallel region, where a GEMM uses one thread.
template <typename T>
void fused_weight_rows(const DenseLayerPlan<T>& d, index_t n, const T* a_prev,
                       const OptimizerPlan<T>& plan, const OptimizerScalars<T>& s,
                       index_t r0, index_t r1) {
    gemm<T>(true, false, r1 - r0, d.out, n, T(1), a_prev + r0, d.in, d.g, d.out, T(0),
            d.gw + r0 * d.out, d.out);
    optimizer_range(plan, s, d.w_index, r0 * d.out, r1 * d.out);
}

// One piece of the update: the rows of a fused layer (dW block GEMMs + optimizer) or
// the elements of a tensor updated from its stored gradient, cut into chunks of
// `chunk` units (a fused layer's dW blocks; 8k elements).  `cost`: per unit, in
// optimizer elements (a fused row: out weights, plus its GEMM work 2 n out flops
// counted as n out / 16 elements).
struct UpdatePiece {
    int layer;       // >= 0: fused layer (units are rows); -1: tensor (units are elements)
    index_t tensor;  // the tensor, for layer == -1
    index_t units;
    index_t chunk;
    index_t cost;
};

// A thread's range of chunks [lo, hi) in one word: the owner takes from the front,
// a thread that has run out takes from the back (CAS on the pair).
class ChunkRange {
  public:
    void set(index_t lo, index_t hi) {
        word_.store(std::uint64_t(lo) | (std::uint64_t(hi) << 32), std::memory_order_relaxed);
    }
    bool take(bool front, index_t* c) {
        std::uint64_t w = word_.load(std::memory_order_relaxed);
        for (;;) {
            const std::uint64_t lo = w & 0xffffffffu, hi = w >> 32;
            if (lo >= hi) return false;
            const std::uint64_t next = front ? (lo + 1) | (hi << 32) : lo | ((hi - 1) << 32);
            if (word_.compare_exchange_weak(w, next, std::memory_order_relaxed)) {
                *c = index_t(front ? lo : hi - 1);
                return true;
            }
        }
    }

  private:
    alignas(64) std::atomic<std::uint64_t> word_{0};
};

// Part t of nt of a piece: units [lo, hi) (element parts start on multiples of 16).
inline void piece_part(const UpdatePiece& pc, index_t t, index_t nt, index_t* lo, index_t* hi) {
    auto at = [&](index_t k) {
        if (k >= nt) return pc.units;
        const index_t u = pc.units * k / nt;
        return pc.layer >= 0 ? u : (u & ~index_t(15));
    };
    *lo = at(t);
    *hi = at(t + 1);
}

inline index_t part_chunks(const UpdatePiece& pc, index_t t, index_t nt) {
    index_t lo, hi;
    piece_part(pc, t, nt, &lo, &hi);
    return (hi - lo + pc.chunk - 1) / pc.chunk;
}

// The whole update in one parallel region.  Thread t's share is part t of every
// piece (its rows of each fused layer, its elements of each other tensor): the
// rows whose weights its core read last (the forward GEMM of a short batch splits
// k, so each core reads a contiguous half of the weight rows; the backward NT GEMM
// splits its output columns, i.e. the rows of W), so the update finds them in its
// own cache.  A thread that finishes its share takes chunks from the back of the
// others' (a vCPU of a busy machine may stall).  Results do not depend on which
// thread runs a chunk (elementwise updates; each dW element is one GEMM sum
// whatever block holds its row).
template <typename T>
void update_pieces(const TrainStepPlan<T>& p, const OptimizerScalars<T>& s,
                   const UpdatePiece* pieces, int count) {
    [[maybe_unused]] index_t work = 0;  // (sizes the thread count; none without OpenMP)
    for (int i = 0; i < count; ++i) work += pieces[i].units * pieces[i].cost;
    constexpr int kMaxThreads = 64;
    int nt = 1;
#if defined(_OPENMP)
    // Threads from half the optimizer's kMathGrain per thread, GEMM work included
    // (the 256 x 128 layer at batch 32, 2.1 MFLOP + 32k Adam elements, ~30 us, uses both).
    nt = fp_min(threads_for(work, kMathGrain / 2), kMaxThreads);
#endif
    index_t start[kMaxThreads + 1];  // share t: chunks [start[t], start[t + 1])
    start[0] = 0;
    for (int t = 0; t < nt; ++t) {
        start[t + 1] = start[t];
        for (int i = 0; i < count; ++i) start[t + 1] += part_chunks(pieces[i], t, nt);
    }
    const index_t chunks = start[nt];
    auto run_chunk = [&](index_t c) {
        int t = 0;
        while (c >= start[t + 1]) ++t;
        c -= start[t];
        int i = 0;
        while (c >= part_chunks(pieces[i], t, nt)) c -= part_chunks(pieces[i++], t, nt);
        const UpdatePiece& pc = pieces[i];
        index_t lo, hi;
        piece_part(pc, t, nt, &lo, &hi);
        const index_t u0 = lo + c * pc.chunk, u1 = fp_min(hi, u0 + pc.chunk);
        if (pc.layer >= 0) {
            const DenseLayerPlan<T>& d = p.layer[pc.layer];
            const T* a_prev = pc.layer > 0 ? p.layer[pc.layer - 1].y : p.x;
            fused_weight_rows(d, p.n, a_prev, p.opt, s, u0, u1);
        } else {
            optimizer_range(p.opt, s, pc.tensor, u0, u1);
        }
    };
#if defined(_OPENMP)
    if (nt > 1 && chunks < (index_t(1) << 31)) {
        ChunkRange ranges[kMaxThreads];
        for (int k = 0; k < nt; ++k) ranges[k].set(start[k], start[k + 1]);
        detail::note_thread_pool_started(nt);
#pragma omp parallel num_threads(nt)
        {
            // (a team smaller than nt leaves shares that the others take)
            const int me = omp_get_thread_num();
            index_t k;
            while (ranges[me].take(true, &k)) run_chunk(k);
            for (int o = 1; o < nt; ++o) {
                ChunkRange& other = ranges[(me + o) % nt];
                while (other.take(false, &k)) run_chunk(k);
            }
        }
        detail::note_team_done();
        return;
    }
#endif
    for (index_t c = 0; c < chunks; ++c) run_chunk(c);
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
    if (p.check_x) {  // NaN or inf in x is bad input: refused before anything runs (one
        // vectorised integer max over x, ~1 us for 32 x 784 floats)
        bool finite_x = true;
        max_abs(p.x, p.n * p.layer[0].in, &finite_x);
        if (!finite_x) {
            *status = 4;
            return 0.0;
        }
    }
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
    if (p.grad_scale != 0.0 && p.grad_scale != 1.0) {
        const T scale = T(p.grad_scale);
        for (index_t i = 0; i < p.n * last.out; ++i) last.g[i] *= scale;
    }
    // (a float32 loss above FLT_MAX, finite in double, is inf in PyTorch's float32
    // sum; its gradients overflow Adam's squared moments to inf: refused as well)
    if (p.check_finite && !(std::fabs(loss) <= kHugeValue<T>)) {
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
            eg.dsrc = prev.act == kGelu || prev.act == kGeluErf ? prev.z : prev.y;
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
    // fused_weight_rows) when reading its inputs and gradients (n (in + out)) costs
    // less than a quarter of a pass over dW (in out): the blocks' small unpacked GEMMs
    // lose to one packed GEMM as n grows (784-256-128-10 at batch 128: fusing layer
    // 1 made the step ~6% slower; at batch 32 neutral, at batch 1 a gain);
    // such a dW is known finite beforehand when a and g are finite and
    // n max|a| max|g| cannot overflow.  The other layers' dW are computed first,
    // with the GEMM's non-finite flag, so nothing is updated before all is checked.
    bool fused[kMaxTensors];
    const bool clips = p.clip_value > 0.0 || p.clip_norm > 0.0;  // (all of dW first)
    const bool can_fuse = p.opt.count <= kMaxTensors && L <= kMaxTensors;
    const double limit = double(kHugeValue<T>) / 4.0;
    int nonfinite = 0;
    for (int l = 0; l < L; ++l) {
        const DenseLayerPlan<T>& d = p.layer[l];
        const T* a_prev = l > 0 ? p.layer[l - 1].y : p.x;
        bool f = can_fuse && !clips && d.w_index >= 0 &&
                 4 * p.n * (d.in + d.out) <= d.in * d.out;
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
    if (clips) {  // (the optimizer's gradients: every layer's, all stored by now)
        T* const* grads = const_cast<T* const*>(p.opt.grads);
        if (p.clip_value > 0.0)
            for (index_t i = 0; i < p.opt.count; ++i)
                clip<T>(p.opt.sizes[i], grads[i], -p.clip_value, p.clip_value);
        if (p.clip_norm > 0.0) clip_grad_norm<T>(p.opt.count, grads, p.opt.sizes, p.clip_norm);
    }
    if (!can_fuse) {
        optimizer_update<T>(p.opt);
        return loss;
    }
    // update: fused layers inside their dW GEMM, every other tensor from its stored
    // gradient, all in one parallel region
    UpdatePiece pieces[2 * kMaxTensors];
    bool done[kMaxTensors];
    int count = 0;
    for (index_t i = 0; i < p.opt.count; ++i) done[i] = false;
    for (int l = 0; l < L; ++l) {
        if (!fused[l]) continue;
        const DenseLayerPlan<T>& d = p.layer[l];
        pieces[count++] =
            UpdatePiece{l, 0, d.in, fused_block_rows(d.out), d.out + d.out * p.n / 16};
        done[d.w_index] = true;
    }
    for (index_t i = 0; i < p.opt.count; ++i)
        if (!done[i] && p.opt.sizes[i] > 0)
            pieces[count++] = UpdatePiece{-1, i, p.opt.sizes[i], 8192, 1};
    update_pieces(p, optimizer_scalars(p.opt), pieces, count);
    return loss;
}

template double train_step<float>(const TrainStepPlan<float>&, int*);
template double train_step<double>(const TrainStepPlan<double>&, int*);

}  // namespace FASTPROP_ISA_NS
}  // namespace fastprop
