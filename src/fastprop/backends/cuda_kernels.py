"""Numba CUDA kernels of the ``cuda`` backend, and their launchers (device arrays in).

Every launcher here takes numba device arrays and launches on the default stream; the
host-array contract and the device-resident training step are in
:mod:`fastprop.backends.cuda`.  This module imports numba: import it only after
:func:`fastprop.backends.cuda_support.problem` said the backend is usable.

Kernels are built by factories, one per dtype (and per tile shape and transpose pair
for GEMM), so that constants, shared and local arrays have the element type of the
data: float32 kernels do float32 arithmetic, except the losses and ``sum_squares``,
which accumulate in float64 as the contract asks.

GEMM (``gemm_kernel``): C (+)= op(A) op(B), then optionally the dense-layer epilogue
z = C + bias, y = act(z).  A block of TX x TY threads computes a BM x BN tile of C,
looping over K in slabs of BK.  The threads load the A slab (BM x BK) and the B slab
(BK x BN) into shared memory, consecutive threads on consecutive addresses of the
operand's contiguous axis (coalesced for every transpose case); the A slab is stored
k-major and both slabs are padded by 32 / BK columns so that the transposing stores
hit distinct banks.  Each thread then accumulates a TM x TN register tile whose rows
are ty + i TY and columns tx + j TX: a warp's stores to C are coalesced and its shared
reads are broadcasts or distinct banks.  The epilogue adds the bias, stores z and
applies the activation in registers (softmax, a row operation, runs after).

Reductions (loss values, bias gradients, norms) are two-pass and deterministic: each
block tree-reduces in shared memory and writes one partial; a second small kernel
sums the partials.  Elementwise kernels use grid-stride loops.

Launch geometry (:class:`Geometry`) has GPU values and, under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, which runs every thread as a Python thread), tiny blocks
and tiles so that the same kernels run on tiny shapes in seconds.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from numba import cuda

try:  # numba-cuda re-exports the scalar types; older numba has them at the top level
    from numba.cuda import float32 as _nb_float32, float64 as _nb_float64
except ImportError:  # pragma: no cover - depends on the numba version
    from numba import float32 as _nb_float32, float64 as _nb_float64

from . import ACTIVATIONS
from .cuda_support import is_simulator

_NB = {np.dtype(np.float32): _nb_float32, np.dtype(np.float64): _nb_float64}

IDENTITY = ACTIVATIONS["identity"]
RELU = ACTIVATIONS["relu"]
LEAKY = ACTIVATIONS["leaky_relu"]
SIGMOID = ACTIVATIONS["sigmoid"]
TANH = ACTIVATIONS["tanh"]
GELU = ACTIVATIONS["gelu"]
GELU_ERF = ACTIVATIONS["gelu_erf"]
SOFTMAX = ACTIVATIONS["softmax"]

SIMULATOR = is_simulator()
if not SIMULATOR:
    try:
        from numba.cuda.core import config as _numba_config
    except ImportError:  # pragma: no cover - older numba
        from numba import config as _numba_config
    # The finishing reductions are one block by design: silence numba's small-grid warning.
    _numba_config.CUDA_LOW_OCCUPANCY_WARNINGS = 0


# ----------------------------------------------------------------------- geometry
class Tiles(NamedTuple):
    """GEMM block tile BM x BN, K slab BK, per-thread register tile TM x TN."""
    bm: int
    bn: int
    bk: int
    tm: int
    tn: int

    @property
    def block(self):
        return (self.bn // self.tn, self.bm // self.tm)


class Geometry(NamedTuple):
    large: dict        # dtype -> Tiles for big outputs
    small: dict        # dtype -> Tiles when large tiles leave SMs idle
    narrow: Tiles      # outputs at most narrow.bn columns wide
    threads: int       # block size of elementwise kernels
    max_blocks: int    # grid cap of grid-stride kernels
    reduce: int        # block size (power of two) of reduction kernels = shared array size
    partials: int      # most blocks of a partial-sum kernel
    col_block: tuple   # (CX, CY) of the column-sum kernel
    row_min: int       # smallest block (power of two) of a row kernel
    sms: int           # multiprocessors (block-count targets)


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)


def _geometry() -> Geometry:
    if SIMULATOR:
        t = Tiles(8, 8, 4, 2, 2)
        return Geometry({_F32: t, _F64: t}, {_F32: t, _F64: t}, Tiles(8, 4, 4, 2, 1),
                        threads=16, max_blocks=4, reduce=8, partials=4, col_block=(4, 2),
                        row_min=2, sms=1)
    try:
        sms = int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
    except Exception:  # pragma: no cover - depends on the driver
        sms = 80
    small = Tiles(64, 64, 8, 4, 4)
    return Geometry({_F32: Tiles(128, 128, 8, 8, 8), _F64: small}, {_F32: small, _F64: small},
                    Tiles(64, 16, 16, 4, 1), threads=256, max_blocks=32 * sms, reduce=256,
                    partials=1024, col_block=(32, 8), row_min=32, sms=sms)


GEOMETRY = _geometry()


def _cdiv(a, b):
    return -(-a // b)


_MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y and .z (x: 2^31 - 1)


def choose_tiles(dtype, m, n, geometry=None) -> Tiles:
    """Large tiles when they still give every SM a block, narrow ones for thin outputs."""
    geometry = geometry or GEOMETRY
    if n <= geometry.narrow.bn:
        return geometry.narrow
    big = geometry.large[dtype]
    if _cdiv(m, big.bm) * _cdiv(n, big.bn) >= geometry.sms:
        return big
    return geometry.small[dtype]


# ----------------------------------------------------------------------- device functions
@cuda.jit(device=True)
def _block_sum(sh, v):
    """Sum of ``v`` over the (1-D, power-of-two) block; every thread gets the result."""
    t = cuda.threadIdx.x
    sh[t] = v
    cuda.syncthreads()
    h = cuda.blockDim.x // 2
    while h > 0:
        if t < h:
            sh[t] += sh[t + h]
        cuda.syncthreads()
        h //= 2
    r = sh[0]
    cuda.syncthreads()
    return r


@cuda.jit(device=True)
def _block_max(sh, v):
    """Maximum of ``v`` over the (1-D, power-of-two) block; every thread gets it."""
    t = cuda.threadIdx.x
    sh[t] = v
    cuda.syncthreads()
    h = cuda.blockDim.x // 2
    while h > 0:
        if t < h:
            sh[t] = max(sh[t], sh[t + h])
        cuda.syncthreads()
        h //= 2
    r = sh[0]
    cuda.syncthreads()
    return r


class _Activations(NamedTuple):
    forward: object    # forward(v, act, alpha) -> act(v)
    backward: object   # backward(g, x, y, act, alpha) -> g act'(.) (x for gelu, y otherwise)


@lru_cache(maxsize=None)
def activations(dtype) -> _Activations:
    """Device functions of the elementwise activations in ``dtype`` arithmetic."""
    t = np.dtype(dtype).type
    zero, one = t(0), t(1)
    gk3 = t(3 * 0.044715)
    gc2, gck2 = t(2 * math.sqrt(2.0 / math.pi)), t(2 * math.sqrt(2.0 / math.pi) * 0.044715)
    gclip = t(20.0)
    rsqrt2, rsqrt2pi, eclip = math.sqrt(0.5), 1 / math.sqrt(2 * math.pi), t(40.0)

    @cuda.jit(device=True)
    def forward(v, act, alpha):
        if act == RELU:
            return zero if v < zero else v  # (NaN stays NaN, as on the other backends)
        if act == LEAKY:
            return v if v > zero else v * alpha
        if act == SIGMOID:
            e = math.exp(-abs(v))  # never overflows
            r = one / (one + e)
            return r if v >= zero else e * r
        if act == TANH:
            return math.tanh(v)
        if act == GELU:
            # beyond |x| = 20 gelu is x or -0 to the last bit (the numpy backend's
            # form): clamping keeps x^3 finite and -inf * 0 out (NaN propagates)
            if v < -gclip:
                return -zero
            vc = gclip if v > gclip else v  # (comparisons, not min: NaN stays NaN)
            # 0.5 (1 + tanh(u)) as sigmoid(2u): no cancellation for v << 0
            w = vc * (gc2 + gck2 * vc * vc)
            e = math.exp(-abs(w))
            r = one / (one + e)
            return v * (r if w >= zero else e * r)
        if act == GELU_ERF:
            # x Phi(x), Phi(x) = erfc(-x / sqrt 2) / 2 (the other backends' form), in
            # double for float32 too (erfc's condition number 2 t^2: a float t alone
            # costs ~85 ulp at x = -12)
            if v < -eclip:
                return -zero
            if v > eclip:
                return v
            vd = float(v)
            return t(vd * (0.5 * math.erfc(-vd * rsqrt2)))
        return v

    @cuda.jit(device=True)
    def backward(g, x, y, act, alpha):
        if act == RELU:
            return g if y > zero else zero
        if act == LEAKY:
            return g if y > zero else g * alpha
        if act == SIGMOID:
            return g * (y * (one - y))
        if act == TANH:
            return g * (one - y * y)
        if act == GELU:
            # beyond |x| = 20 the derivative is 1 or 0 to the last bit; clamping keeps
            # x^3 finite (0 * inf = NaN for |x| > 1.8e19 in float32), as the numpy backend
            xc = gclip if x > gclip else (-gclip if x < -gclip else x)  # NaN stays NaN
            # s (1 - s) = e / (1 + e)^2: 1 - s would cancel where s rounds to 1
            w = xc * (gc2 + gck2 * xc * xc)
            e = math.exp(-abs(w))
            r = one / (one + e)
            s = r if w >= zero else e * r
            return g * (s + xc * (e * r * r) * gc2 * (one + gk3 * xc * xc))
        if act == GELU_ERF:
            if x < -eclip:
                return g * zero
            if x > eclip:
                return g
            xd = float(x)
            return g * t(0.5 * math.erfc(-xd * rsqrt2) + xd * (rsqrt2pi * math.exp(-0.5 * xd * xd)))
        return g

    return _Activations(forward, backward)


# ----------------------------------------------------------------------- GEMM
@lru_cache(maxsize=None)
def gemm_kernel(dtype, tiles: Tiles, trans_a: bool, trans_b: bool):
    """kernel(a, b, c, bias, z, act, alpha, accumulate) on a grid of
    (ceil(m / BM), min(ceil(n / BN), 65535)) blocks of ``tiles.block`` threads: the
    rows on grid x (up to 2^31 - 1 blocks; grid y and z stop at 65535), the column
    tiles on grid y, a block looping over every gridDim.y-th one.

    c[m, n] (+)= op(a) @ op(b); with the epilogue (bias/z not None, act != 0):
    z = op(a) @ op(b) + bias, c = act(z).  bias and z may be None; accumulate is
    for the plain product (with an activation, c = act(z + c)).
    """
    dtype = np.dtype(dtype)
    BM, BN, BK, TM, TN = tiles
    TX, TY = tiles.block
    NT = TX * TY
    if (BM * BK) % NT or (BN * BK) % NT or BM % TM or BN % TN:
        raise ValueError(f"inconsistent GEMM tiles {tiles}")
    A_LOADS, B_LOADS = BM * BK // NT, BN * BK // NT
    PAD = max(1, 32 // BK)
    A_SHAPE, B_SHAPE = (BK, BM + PAD), (BK, BN + PAD)  # constants: numba needs literal shapes
    nbt = _NB[dtype]
    zero = dtype.type(0)
    act_forward = activations(dtype).forward

    def gemm(a, b, c, bias, z, act, alpha, accumulate):
        As = cuda.shared.array(A_SHAPE, nbt)  # As[kk, i] = op(a)[row0 + i, k0 + kk]
        Bs = cuda.shared.array(B_SHAPE, nbt)  # Bs[kk, j] = op(b)[k0 + kk, col0 + j]
        acc = cuda.local.array((TM, TN), nbt)
        ra = cuda.local.array(TM, nbt)
        rb = cuda.local.array(TN, nbt)
        m = c.shape[0]
        n = c.shape[1]
        if trans_a:
            k = a.shape[0]
        else:
            k = a.shape[1]
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * TX + tx
        row0 = cuda.blockIdx.x * BM
        for col0 in range(cuda.blockIdx.y * BN, n, cuda.gridDim.y * BN):
            for i in range(TM):
                for j in range(TN):
                    acc[i, j] = zero
            for k0 in range(0, k, BK):
                for ld in range(A_LOADS):
                    e = tid + ld * NT
                    if trans_a:  # a is (k, m), contiguous along m
                        kk = e // BM
                        i = e - kk * BM
                    else:        # a is (m, k), contiguous along k
                        i = e // BK
                        kk = e - i * BK
                    gi = row0 + i
                    gk = k0 + kk
                    v = zero
                    if gi < m and gk < k:
                        if trans_a:
                            v = a[gk, gi]
                        else:
                            v = a[gi, gk]
                    As[kk, i] = v
                for ld in range(B_LOADS):
                    e = tid + ld * NT
                    if trans_b:  # b is (n, k), contiguous along k
                        j = e // BK
                        kk = e - j * BK
                    else:        # b is (k, n), contiguous along n
                        kk = e // BN
                        j = e - kk * BN
                    gj = col0 + j
                    gk = k0 + kk
                    v = zero
                    if gj < n and gk < k:
                        if trans_b:
                            v = b[gj, gk]
                        else:
                            v = b[gk, gj]
                    Bs[kk, j] = v
                cuda.syncthreads()
                for kk in range(BK):
                    for i in range(TM):
                        ra[i] = As[kk, ty + i * TY]
                    for j in range(TN):
                        rb[j] = Bs[kk, tx + j * TX]
                    for i in range(TM):
                        for j in range(TN):
                            acc[i, j] += ra[i] * rb[j]
                cuda.syncthreads()
            # epilogue, in two passes so that the first (which indexes the register tile)
            # stays small enough to unroll: acc never leaves registers
            for i in range(TM):
                r = row0 + ty + i * TY
                for j in range(TN):
                    col = col0 + tx + j * TX
                    if r < m and col < n:
                        v = acc[i, j]
                        if bias is not None:
                            v += bias[col]
                        if z is not None:
                            z[r, col] = v
                        if accumulate:
                            v += c[r, col]
                        c[r, col] = v
            if act != IDENTITY:  # the thread rereads its own stores (L1 hits)
                for i in range(TM):
                    r = row0 + ty + i * TY
                    for j in range(TN):
                        col = col0 + tx + j * TX
                        if r < m and col < n:
                            c[r, col] = act_forward(c[r, col], act, alpha)

    if SIMULATOR:
        return cuda.jit(gemm)
    # two resident blocks per SM: caps the 8x8 register tile at 128 registers a thread
    return cuda.jit(launch_bounds=(NT, 2))(gemm)


def gemm(a, b, c, trans_a=False, trans_b=False, accumulate=False, bias=None, z=None,
         act=IDENTITY, alpha=0.0, tiles=None):
    """c (+)= op(a) @ op(b) on device arrays, with the optional dense epilogue
    (z = product + bias, c = act(z); softmax is not an epilogue: see linear_forward)."""
    m, n = c.shape
    if m == 0 or n == 0:
        return
    dtype = np.dtype(c.dtype)
    tiles = tiles or choose_tiles(dtype, m, n)
    kern = gemm_kernel(dtype, tiles, bool(trans_a), bool(trans_b))
    grid = (_cdiv(m, tiles.bm), min(_cdiv(n, tiles.bn), _MAX_GRID_Y))
    kern[grid, tiles.block](a, b, c, bias, z, int(act), dtype.type(alpha), bool(accumulate))


# ----------------------------------------------------------------------- elementwise
class _Elementwise(NamedTuple):
    act_forward: object
    act_backward: object
    softmax_forward: object
    softmax_backward: object
    act_grad_colsum: object
    colsum_finish: object
    scale: object
    clip: object
    sgd: object
    adam: object
    rmsprop: object
    adagrad: object


@lru_cache(maxsize=None)
def kernels(dtype) -> _Elementwise:
    """The non-GEMM kernels of one dtype (see each kernel's comment for its launch)."""
    dtype = np.dtype(dtype)
    t = dtype.type
    nbt = _NB[dtype]
    zero, one = t(0), t(1)
    neg_inf = t(-np.inf)
    RED = GEOMETRY.reduce
    CX, CY = GEOMETRY.col_block
    COL_SHAPE = (CY, CX)
    fwd, bwd = activations(dtype)

    @cuda.jit
    def act_forward(act, alpha, x, y):                 # flat x, y; grid-stride
        for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            y[i] = fwd(x[i], act, alpha)

    @cuda.jit
    def act_backward(act, alpha, g, x, y, out):        # flat; out may be g
        for i in range(cuda.grid(1), g.size, cuda.gridsize(1)):
            out[i] = bwd(g[i], x[i], y[i], act, alpha)

    @cuda.jit
    def softmax_forward(x, y):                          # (rows, c); a block per row; y may be x
        sh = cuda.shared.array(RED, nbt)
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        rows, c = x.shape
        for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
            mx = neg_inf
            for j in range(tid, c, nt):
                mx = max(mx, x[r, j])
            mx = _block_max(sh, mx)
            s = zero
            for j in range(tid, c, nt):
                e = math.exp(x[r, j] - mx)
                y[r, j] = e
                s += e
            inv = one / _block_sum(sh, s)
            for j in range(tid, c, nt):
                y[r, j] *= inv

    @cuda.jit
    def softmax_backward(g, y, out):                    # out = y (g - sum(g y)); out may be g
        sh = cuda.shared.array(RED, nbt)
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        rows, c = y.shape
        for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
            s = zero
            for j in range(tid, c, nt):
                s += g[r, j] * y[r, j]
            dot = _block_sum(sh, s)
            for j in range(tid, c, nt):
                out[r, j] = y[r, j] * (g[r, j] - dot)

    @cuda.jit
    def act_grad_colsum(g, x, y, act, alpha, out, partial):
        # (n, c) arrays; blocks of (CX, CY) threads on a grid (ceil(c / CX), R):
        # out = g act'(.) (skipped when out is None), partial[R, c] = per-block column
        # sums of it (skipped when partial is None).  out may be g.
        sh = cuda.shared.array(COL_SHAPE, nbt)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        n, c = g.shape
        col = cuda.blockIdx.x * CX + tx
        s = zero
        if col < c:
            for r in range(cuda.blockIdx.y * CY + ty, n, CY * cuda.gridDim.y):
                v = bwd(g[r, col], x[r, col], y[r, col], act, alpha)
                if out is not None:
                    out[r, col] = v
                s += v
        if partial is not None:
            sh[ty, tx] = s
            cuda.syncthreads()
            h = CY // 2
            while h > 0:
                if ty < h:
                    sh[ty, tx] += sh[ty + h, tx]
                cuda.syncthreads()
                h //= 2
            if ty == 0 and col < c:
                partial[cuda.blockIdx.y, col] = sh[0, tx]

    @cuda.jit
    def colsum_finish(partial, out, accumulate):        # a thread per column
        col = cuda.grid(1)
        if col < out.size:
            s = zero
            for r in range(partial.shape[0]):
                s += partial[r, col]
            if accumulate:
                out[col] += s
            else:
                out[col] = s

    @cuda.jit
    def scale(x, factor):
        for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            x[i] *= factor

    @cuda.jit
    def clip(x, lo, hi):
        for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            x[i] = min(max(x[i], lo), hi)

    # Optimizers: flat arrays, scalars already in the dtype.  ``buf`` is None when unused.
    @cuda.jit
    def sgd(p, g, buf, lr, momentum, weight_decay, nesterov, first):
        for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
            d = g[i]
            if weight_decay != zero:
                d += weight_decay * p[i]
            if buf is not None:
                if first:
                    b = d
                else:
                    b = momentum * buf[i] + d
                buf[i] = b
                if nesterov:
                    d = d + momentum * b
                else:
                    d = b
            p[i] -= lr * d

    @cuda.jit
    def adam(p, g, m, v, step_size, beta1, one_m_beta1, beta2, one_m_beta2, eps, bias_c2_sqrt,
             weight_decay, decay_factor, decoupled):
        for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
            w = p[i]
            d = g[i]
            if decoupled:
                w *= decay_factor
            elif weight_decay != zero:
                d += weight_decay * w
            mi = beta1 * m[i] + one_m_beta1 * d
            vi = beta2 * v[i] + one_m_beta2 * d * d
            m[i] = mi
            v[i] = vi
            p[i] = w - step_size * mi / (math.sqrt(vi) / bias_c2_sqrt + eps)

    @cuda.jit
    def rmsprop(p, g, sq, buf, lr, alpha, one_m_alpha, eps, momentum, weight_decay):
        for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
            d = g[i]
            if weight_decay != zero:
                d += weight_decay * p[i]
            s = alpha * sq[i] + one_m_alpha * d * d
            sq[i] = s
            avg = math.sqrt(s) + eps
            if buf is not None:
                b = momentum * buf[i] + d / avg
                buf[i] = b
                p[i] -= lr * b
            else:
                p[i] -= lr * d / avg

    @cuda.jit
    def adagrad(p, g, sums, lr, eps, weight_decay):
        for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
            d = g[i]
            if weight_decay != zero:
                d += weight_decay * p[i]
            s = sums[i] + d * d
            sums[i] = s
            p[i] -= lr * d / (math.sqrt(s) + eps)

    return _Elementwise(act_forward, act_backward, softmax_forward, softmax_backward,
                        act_grad_colsum, colsum_finish, scale, clip, sgd, adam, rmsprop, adagrad)


# ----------------------------------------------------------------------- losses, norms
class _Reductions(NamedTuple):
    xent_rows: object
    mse: object
    bce: object
    sumsq: object


@lru_cache(maxsize=None)
def reductions(dtype) -> _Reductions:
    """Loss and norm kernels of one dtype: float64 arithmetic, a partial per block (or a
    loss per row) summed by :func:`finish_sum`."""
    dtype = np.dtype(dtype)
    t = dtype.type
    f64 = _nb_float64
    RED = GEOMETRY.reduce
    neg_inf = -np.inf

    @cuda.jit
    def xent_rows(logits, labels, targets, grad, row_loss, inv_n):
        # A block per row (grid-stride over rows).  row_loss[r] = -sum_j t_rj log p_rj;
        # grad = (p - t) inv_n unless grad is None.  Exactly one of labels/targets is None.
        sh = cuda.shared.array(RED, f64)
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        rows, c = logits.shape
        for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
            mx = neg_inf
            for j in range(tid, c, nt):
                mx = max(mx, f64(logits[r, j]))
            mx = _block_max(sh, mx)
            s = 0.0
            for j in range(tid, c, nt):
                s += math.exp(f64(logits[r, j]) - mx)
            lse = math.log(_block_sum(sh, s))
            # (separate `is not None` tests: numba prunes each on its own argument)
            part = 0.0
            label = -1
            if labels is not None:
                label = labels[r]
                if tid == 0:
                    part = lse - (f64(logits[r, label]) - mx)
            tsum = 1.0  # target rows need not sum to 1: grad = softmax * sum(t) - t
            if targets is not None:
                ts = 0.0
                for j in range(tid, c, nt):
                    tj = f64(targets[r, j])
                    d = f64(logits[r, j]) - mx - lse
                    if tj != 0.0 or not math.isinf(d):  # (0 log 0 = 0: a masked -inf
                        part -= tj * d                   # logit adds nothing; NaN counts)
                    ts += tj
                part = _block_sum(sh, part)
                tsum = _block_sum(sh, ts)
            if grad is not None:
                for j in range(tid, c, nt):
                    p = math.exp(f64(logits[r, j]) - mx - lse) * tsum
                    if j == label:
                        p -= 1.0
                    if targets is not None:
                        p -= f64(targets[r, j])
                    grad[r, j] = t(p * inv_n)
            if tid == 0:
                row_loss[r] = part

    @cuda.jit
    def mse(pred, target, grad, partial, grad_scale):
        # flat; partial[block] = sum (p - t)^2; grad = grad_scale (p - t) unless None
        sh = cuda.shared.array(RED, f64)
        s = 0.0
        for i in range(cuda.grid(1), pred.size, cuda.gridsize(1)):
            d = f64(pred[i]) - f64(target[i])
            s += d * d
            if grad is not None:
                grad[i] = t(d * grad_scale)
        s = _block_sum(sh, s)
        if cuda.threadIdx.x == 0:
            partial[cuda.blockIdx.x] = s

    @cuda.jit
    def bce(pred, target, from_logits, grad, partial, inv_count):
        sh = cuda.shared.array(RED, f64)
        s = 0.0
        for i in range(cuda.grid(1), pred.size, cuda.gridsize(1)):
            x = f64(pred[i])
            y = f64(target[i])
            if from_logits:
                e = math.exp(-abs(x))
                s += max(x, 0.0) - x * y + math.log1p(e)
                if grad is not None:
                    sig = 1.0 / (1.0 + e)
                    if x < 0.0:
                        sig = e * sig
                    grad[i] = t((sig - y) * inv_count)
            else:
                log_p = -100.0
                if x > 0.0:
                    log_p = max(math.log(x), -100.0)
                log_q = -100.0
                if x < 1.0:
                    log_q = max(math.log1p(-x), -100.0)
                s -= y * log_p + (1.0 - y) * log_q
                if grad is not None:
                    grad[i] = t((x - y) / max(x * (1.0 - x), 1e-12) * inv_count)
        s = _block_sum(sh, s)
        if cuda.threadIdx.x == 0:
            partial[cuda.blockIdx.x] = s

    @cuda.jit
    def sumsq(x, partial):
        sh = cuda.shared.array(RED, f64)
        s = 0.0
        for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            v = f64(x[i])
            s += v * v
        s = _block_sum(sh, s)
        if cuda.threadIdx.x == 0:
            partial[cuda.blockIdx.x] = s

    return _Reductions(xent_rows, mse, bce, sumsq)


@lru_cache(maxsize=None)
def _finish_kernel():
    RED = GEOMETRY.reduce

    @cuda.jit
    def finish(partial, count, result, slot, scale):
        # one block: result[slot] = scale * sum(partial[:count]) (float64)
        sh = cuda.shared.array(RED, _nb_float64)
        s = 0.0
        for i in range(cuda.threadIdx.x, count, cuda.blockDim.x):
            s += partial[i]
        s = _block_sum(sh, s)
        if cuda.threadIdx.x == 0:
            result[slot] = s * scale

    return finish


# ----------------------------------------------------------------------- normalization
@cuda.jit(device=True)
def _col_sum(sh, v):
    """Sum of ``v`` over threadIdx.y (power-of-two blockDim.y), per threadIdx.x."""
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    sh[ty, tx] = v
    cuda.syncthreads()
    h = cuda.blockDim.y // 2
    while h > 0:
        if ty < h:
            sh[ty, tx] += sh[ty + h, tx]
        cuda.syncthreads()
        h //= 2
    r = sh[0, tx]
    cuda.syncthreads()
    return r


class _Norms(NamedTuple):
    bn_forward: object
    bn_forward_eval: object
    bn_backward: object
    ln_forward: object
    ln_backward: object
    ln_param_grads: object


@lru_cache(maxsize=None)
def norms(dtype) -> _Norms:
    """Batch and layer normalization, float64 arithmetic as the NumPy reference.

    Batch statistics are column reductions: a block of (CX, CY) threads owns CX
    features and walks every row (two passes for mean and variance, one to write).
    Layer statistics are row reductions: a block per row, as softmax.
    """
    dtype = np.dtype(dtype)
    t = dtype.type
    f64 = _nb_float64
    RED = GEOMETRY.reduce
    CX, CY = GEOMETRY.col_block
    COL_SHAPE = (CY, CX)

    @cuda.jit
    def bn_forward(x, gamma, beta, eps, y, mean, invstd):  # grid ceil(f / CX)
        sh = cuda.shared.array(COL_SHAPE, f64)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        n, f = x.shape
        col = cuda.blockIdx.x * CX + tx
        s = 0.0
        if col < f:
            for r in range(ty, n, CY):
                s += f64(x[r, col])
        mu = _col_sum(sh, s) / n
        s = 0.0
        if col < f:
            for r in range(ty, n, CY):
                d = f64(x[r, col]) - mu
                s += d * d
        inv = 1.0 / math.sqrt(_col_sum(sh, s) / n + eps)
        if col < f:
            if ty == 0:
                mean[col] = t(mu)
                invstd[col] = t(inv)
            gm = f64(gamma[col])
            bt = f64(beta[col])
            for r in range(ty, n, CY):
                y[r, col] = t((f64(x[r, col]) - mu) * inv * gm + bt)

    @cuda.jit
    def bn_forward_eval(x, gamma, beta, running_mean, running_var, eps, y):  # flat grid
        n, f = x.shape
        for i in range(cuda.grid(1), n * f, cuda.gridsize(1)):
            r = i // f
            col = i - r * f
            scale = f64(gamma[col]) / math.sqrt(f64(running_var[col]) + eps)
            y[r, col] = t((f64(x[r, col]) - f64(running_mean[col])) * scale + f64(beta[col]))

    @cuda.jit
    def bn_backward(g, x, gamma, mean, invstd, grad_x, grad_gamma, grad_beta):
        sh = cuda.shared.array(COL_SHAPE, f64)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        n, f = x.shape
        col = cuda.blockIdx.x * CX + tx
        mu = 0.0
        inv = 0.0
        if col < f:
            mu = f64(mean[col])
            inv = f64(invstd[col])
        sg = 0.0
        sgx = 0.0
        if col < f:
            for r in range(ty, n, CY):
                gv = f64(g[r, col])
                sg += gv
                sgx += gv * (f64(x[r, col]) - mu) * inv
        sg = _col_sum(sh, sg)
        sgx = _col_sum(sh, sgx)
        if col < f:
            if ty == 0:
                grad_beta[col] += t(sg)
                grad_gamma[col] += t(sgx)
            k = f64(gamma[col]) * inv / n
            for r in range(ty, n, CY):
                xhat = (f64(x[r, col]) - mu) * inv
                grad_x[r, col] = t(k * (n * f64(g[r, col]) - sg - xhat * sgx))

    @cuda.jit
    def ln_forward(x, gamma, beta, eps, y, mean, invstd):  # a block per row
        sh = cuda.shared.array(RED, f64)
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        n, f = x.shape
        for r in range(cuda.blockIdx.x, n, cuda.gridDim.x):
            s = 0.0
            for j in range(tid, f, nt):
                s += f64(x[r, j])
            mu = _block_sum(sh, s) / f
            s = 0.0
            for j in range(tid, f, nt):
                d = f64(x[r, j]) - mu
                s += d * d
            inv = 1.0 / math.sqrt(_block_sum(sh, s) / f + eps)
            if tid == 0:
                mean[r] = t(mu)
                invstd[r] = t(inv)
            for j in range(tid, f, nt):
                y[r, j] = t((f64(x[r, j]) - mu) * inv * f64(gamma[j]) + f64(beta[j]))

    @cuda.jit
    def ln_backward(g, x, gamma, mean, invstd, grad_x):  # a block per row
        sh = cuda.shared.array(RED, f64)
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        n, f = x.shape
        for r in range(cuda.blockIdx.x, n, cuda.gridDim.x):
            mu = f64(mean[r])
            inv = f64(invstd[r])
            a = 0.0
            b = 0.0
            for j in range(tid, f, nt):
                gh = f64(g[r, j]) * f64(gamma[j])
                a += gh
                b += gh * (f64(x[r, j]) - mu) * inv
            a = _block_sum(sh, a)
            b = _block_sum(sh, b)
            for j in range(tid, f, nt):
                gh = f64(g[r, j]) * f64(gamma[j])
                xhat = (f64(x[r, j]) - mu) * inv
                grad_x[r, j] = t(inv / f * (f * gh - a - xhat * b))

    @cuda.jit
    def ln_param_grads(g, x, mean, invstd, grad_gamma, grad_beta):  # grid ceil(f / CX)
        sh = cuda.shared.array(COL_SHAPE, f64)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        n, f = x.shape
        col = cuda.blockIdx.x * CX + tx
        sg = 0.0
        sgx = 0.0
        if col < f:
            for r in range(ty, n, CY):
                gv = f64(g[r, col])
                sg += gv
                sgx += gv * (f64(x[r, col]) - f64(mean[r])) * f64(invstd[r])
        sg = _col_sum(sh, sg)
        sgx = _col_sum(sh, sgx)
        if col < f and ty == 0:
            grad_beta[col] += t(sg)
            grad_gamma[col] += t(sgx)

    return _Norms(bn_forward, bn_forward_eval, bn_backward, ln_forward, ln_backward,
                  ln_param_grads)


# ----------------------------------------------------------------------- launchers
def _blocks(size):
    g = GEOMETRY
    return max(1, min(_cdiv(size, g.threads), g.max_blocks))


def _partial_blocks(size):
    g = GEOMETRY
    return max(1, min(_cdiv(size, g.reduce), g.partials))


def _row_threads(c):
    """Power-of-two block size for a row kernel on rows of c elements."""
    t = GEOMETRY.row_min
    while t < c and t < GEOMETRY.reduce:
        t *= 2
    return min(t, GEOMETRY.reduce)


def _row_blocks(rows):
    return max(1, min(rows, GEOMETRY.max_blocks))


def new_partials():
    """A float64 scratch array for partial sums (one per block of a partial kernel)."""
    return cuda.device_array(GEOMETRY.partials, np.float64)


def finish_sum(partial, count, result, slot, scale=1.0):
    """result[slot] = scale * sum(partial[:count]) (one block)."""
    _finish_kernel()[1, GEOMETRY.reduce](partial, count, result, slot, float(scale))


def row_view(a):
    """A (rows, last) view of a C-contiguous device array."""
    c = a.shape[a.ndim - 1] if a.ndim else 1
    return a.reshape(a.size // c if c else 0, c)


def flat(a):
    return a.reshape(a.size)


def activation_forward(act, alpha, x, y):
    """y = act(x) on device arrays of any shape (softmax over the last axis); y may be x."""
    k = kernels(x.dtype)
    if act == SOFTMAX:
        xr, yr = row_view(x), row_view(y)
        k.softmax_forward[_row_blocks(xr.shape[0]), _row_threads(xr.shape[1])](xr, yr)
    else:
        k.act_forward[_blocks(x.size), GEOMETRY.threads](int(act), x.dtype.type(alpha),
                                                        flat(x), flat(y))


def activation_backward(act, alpha, g, x, y, out):
    """out = g act'(.) on device arrays; x (gelu) or y (others) may be None; out may be g."""
    k = kernels(g.dtype)
    if act == SOFTMAX:
        gr, yr, outr = row_view(g), row_view(y), row_view(out)
        k.softmax_backward[_row_blocks(gr.shape[0]), _row_threads(gr.shape[1])](gr, yr, outr)
    else:
        x = g if x is None else x
        y = g if y is None else y
        k.act_backward[_blocks(g.size), GEOMETRY.threads](
            int(act), g.dtype.type(alpha), flat(g), flat(x), flat(y), flat(out))


def linear_forward(x, w, b, act, alpha, y, z):
    """z = x @ w + b; y = act(z) (fused into the GEMM epilogue except for softmax)."""
    if act == SOFTMAX:
        gemm(x, w, y, bias=b, z=z)
        activation_forward(SOFTMAX, alpha, y, y)
    else:
        gemm(x, w, y, bias=b, z=z, act=act, alpha=alpha)


def colsum_partial_rows(n, c):
    """Row-chunk count R of the column-sum kernel for an (n, c) array."""
    g = GEOMETRY
    cx, cy = g.col_block
    want = max(1, (4 * g.sms) // _cdiv(c, cx))
    return max(1, min(_cdiv(n, cy), want, 64))


def act_grad_colsum(g, x, y, act, alpha, out, grad_b, accumulate, partial=None):
    """out = g act'(.) (elementwise activations; out may be g, or None when act is
    identity) and grad_b (+)= column sums of it (grad_b may be None)."""
    n, c = g.shape
    if c == 0:  # (a launch of 0 blocks is an error on a GPU)
        return
    k = kernels(g.dtype)
    cx, cy = GEOMETRY.col_block
    rows = colsum_partial_rows(n, c)
    if grad_b is not None and partial is None:
        partial = cuda.device_array((rows, c), g.dtype)
    if grad_b is None:
        partial = None
    elif partial.shape != (rows, c):
        partial = partial[:rows * c].reshape(rows, c)
    x = g if x is None else x
    y = g if y is None else y
    k.act_grad_colsum[(_cdiv(c, cx), rows), (cx, cy)](g, x, y, int(act), g.dtype.type(alpha),
                                                      out, partial)
    if grad_b is not None:
        k.colsum_finish[_cdiv(c, GEOMETRY.threads), GEOMETRY.threads](partial, grad_b,
                                                                      bool(accumulate))


def linear_backward(grad_y, x, w, y, z, act, alpha, grad_x, grad_w, grad_b, work, accumulate,
                    partial=None):
    """The dense backward on device arrays (see the kernel contract); work may be grad_y
    (then grad_y is overwritten with grad_z)."""
    if act == IDENTITY:
        grad_z = grad_y
        if grad_b is not None:
            act_grad_colsum(grad_y, None, None, IDENTITY, alpha, None, grad_b, accumulate, partial)
    elif act == SOFTMAX:
        activation_backward(SOFTMAX, alpha, grad_y, None, y, work)
        grad_z = work
        if grad_b is not None:
            act_grad_colsum(work, None, None, IDENTITY, alpha, None, grad_b, accumulate, partial)
    else:
        act_grad_colsum(grad_y, z, y, act, alpha, work, grad_b, accumulate, partial)
        grad_z = work
    gemm(x, grad_z, grad_w, trans_a=True, accumulate=accumulate)
    if grad_x is not None:
        gemm(grad_z, w, grad_x, trans_b=True)


# losses: each writes the mean loss into result[slot] (float64 device array)
def softmax_xent(logits, labels, targets, grad, result, slot, row_loss=None):
    n, c = logits.shape
    if row_loss is None:
        row_loss = cuda.device_array(n, np.float64)
    reductions(logits.dtype).xent_rows[_row_blocks(n), _row_threads(c)](
        logits, labels, targets, grad, row_loss, 1.0 / n)
    finish_sum(row_loss, n, result, slot, 1.0 / n)


def mse(pred, target, half, grad, result, slot, partial=None):
    count = pred.size
    scale = 0.5 if half else 1.0
    partial = new_partials() if partial is None else partial
    blocks = _partial_blocks(count)
    reductions(pred.dtype).mse[blocks, GEOMETRY.reduce](
        flat(pred), flat(target), None if grad is None else flat(grad), partial,
        2.0 * scale / count)
    finish_sum(partial, blocks, result, slot, scale / count)


def bce(pred, target, from_logits, grad, result, slot, partial=None):
    count = pred.size
    partial = new_partials() if partial is None else partial
    blocks = _partial_blocks(count)
    reductions(pred.dtype).bce[blocks, GEOMETRY.reduce](
        flat(pred), flat(target), bool(from_logits), None if grad is None else flat(grad),
        partial, 1.0 / count)
    finish_sum(partial, blocks, result, slot, 1.0 / count)


def sum_squares(x, result, slot, partial=None):
    """result[slot] = sum of squares of the device array x (float64)."""
    partial = new_partials() if partial is None else partial
    blocks = _partial_blocks(x.size)
    reductions(x.dtype).sumsq[blocks, GEOMETRY.reduce](flat(x), partial)
    finish_sum(partial, blocks, result, slot)


def scale_(x, factor):
    kernels(x.dtype).scale[_blocks(x.size), GEOMETRY.threads](flat(x), x.dtype.type(factor))


def clip_(x, lo, hi):
    t = x.dtype.type
    kernels(x.dtype).clip[_blocks(x.size), GEOMETRY.threads](flat(x), t(lo), t(hi))


# optimizers on flat device arrays (one launch for every parameter of one dtype)
def sgd_update(p, g, buf, lr, momentum, nesterov, weight_decay, first):
    t = p.dtype.type
    kernels(p.dtype).sgd[_blocks(p.size), GEOMETRY.threads](
        p, g, buf, t(lr), t(momentum), t(weight_decay), bool(nesterov), bool(first))


def adam_update(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled):
    t = p.dtype.type
    bias_c1 = 1.0 - beta1 ** step
    bias_c2_sqrt = math.sqrt(1.0 - beta2 ** step)
    kernels(p.dtype).adam[_blocks(p.size), GEOMETRY.threads](
        p, g, m, v, t(lr / bias_c1), t(beta1), t(1.0 - beta1), t(beta2), t(1.0 - beta2), t(eps),
        t(bias_c2_sqrt), t(weight_decay), t(1.0 - lr * weight_decay),
        bool(decoupled and weight_decay != 0))


def rmsprop_update(p, g, sq, buf, lr, alpha, eps, momentum, weight_decay):
    t = p.dtype.type
    kernels(p.dtype).rmsprop[_blocks(p.size), GEOMETRY.threads](
        p, g, sq, buf if momentum > 0 else None, t(lr), t(alpha), t(1.0 - alpha), t(eps),
        t(momentum), t(weight_decay))


def adagrad_update(p, g, sums, lr, eps, weight_decay):
    t = p.dtype.type
    kernels(p.dtype).adagrad[_blocks(p.size), GEOMETRY.threads](
        p, g, sums, t(lr), t(eps), t(weight_decay))


# normalization on device arrays (x is (n, f); see the kernel contract)
def _col_grid(f):  # (at least one block: a launch of 0 blocks is an error on a GPU)
    return max(1, _cdiv(f, GEOMETRY.col_block[0])), GEOMETRY.col_block


def batchnorm_forward(x, gamma, beta, eps, y, mean, invstd):
    grid, block = _col_grid(x.shape[1])
    norms(x.dtype).bn_forward[grid, block](x, gamma, beta, float(eps), y, mean, invstd)


def batchnorm_forward_eval(x, gamma, beta, running_mean, running_var, eps, y):
    norms(x.dtype).bn_forward_eval[_blocks(x.size), GEOMETRY.threads](
        x, gamma, beta, running_mean, running_var, float(eps), y)


def batchnorm_backward(g, x, gamma, mean, invstd, grad_x, grad_gamma, grad_beta):
    grid, block = _col_grid(x.shape[1])
    norms(x.dtype).bn_backward[grid, block](g, x, gamma, mean, invstd, grad_x, grad_gamma,
                                            grad_beta)


def layernorm_forward(x, gamma, beta, eps, y, mean, invstd):
    n, f = x.shape
    norms(x.dtype).ln_forward[_row_blocks(n), _row_threads(f)](x, gamma, beta, float(eps), y,
                                                              mean, invstd)


def layernorm_backward(g, x, gamma, mean, invstd, grad_x, grad_gamma, grad_beta):
    n, f = x.shape
    k = norms(x.dtype)
    k.ln_backward[_row_blocks(n), _row_threads(f)](g, x, gamma, mean, invstd, grad_x)
    grid, block = _col_grid(f)
    k.ln_param_grads[grid, block](g, x, mean, invstd, grad_gamma, grad_beta)
