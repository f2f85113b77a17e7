# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True, embedsignature=True
"""Native kernels of fastprop (C++ through Cython), the ``native`` backend.

Tier 2 of the two-tier scikit-learn layout: thin ``def`` wrappers with exactly the
signatures of the kernel contract (:mod:`fastprop.backends`).  Each wrapper checks
the dtype once and calls a ``cdef`` specialisation for float or double that takes
typed memoryviews (fixed-rank arguments) or holds raw buffers (any-shape
arguments), checks that the shapes agree (cheap integer checks: the C++ kernels
never read or write out of bounds), derives leading dimensions from strides,
releases the GIL and calls the C++ kernel declared in _native.pxd.

Errors: TypeError for a wrong dtype, ValueError for a wrong shape or layout, each
naming the argument.  The Python layer (fastprop.ops, nn, losses, optim) validates
values before it gets here; these checks only guard memory safety.
"""

from cpython.buffer cimport (PyBUF_C_CONTIGUOUS, PyBUF_FORMAT, PyBUF_RECORDS,
                             PyBUF_RECORDS_RO, PyBUF_WRITABLE,
                             PyBuffer_Release, PyObject_GetBuffer)
cimport cython
from cython cimport floating
from libc.stdint cimport int64_t

import numpy as np

cdef object _F32 = np.dtype(np.float32)
cdef object _F64 = np.dtype(np.float64)
cdef object _I64 = np.dtype(np.int64)

cdef enum:
    ACT_IDENTITY = 0
    ACT_RELU = 1
    ACT_LEAKY_RELU = 2
    ACT_SIGMOID = 3
    ACT_TANH = 4
    ACT_GELU = 5
    ACT_GELU_ERF = 6
    ACT_SOFTMAX = 7
    N_ACTIVATIONS = 8

fp_init_dispatch()  # choose the kernel table now (reads FASTPROP_ISA)


# ------------------------------------------------------------------ configuration
def isa():
    """The instruction set of the kernels in use: "generic", "avx2" or "avx512"."""
    return fp_isa_name().decode("ascii")


def isa_requested():
    """FASTPROP_ISA as read at import (lower-cased; "" when unset)."""
    return fp_isa_requested().decode("ascii", "replace")


def isa_note():
    """Why the FASTPROP_ISA request was not honoured ("" when it was, or unset)."""
    return fp_dispatch_note().decode("ascii", "replace")


def available_isas():
    """The kernel sets this build and this CPU can run, e.g. ["generic", "avx2", "avx512"]."""
    return fp_available_isas().decode("ascii").split(",")


def cpu_features():
    """CPU features as detected (cpuid, and xgetbv for OS support of AVX state)."""
    cdef CpuFeatures f = fp_cpu_features()
    return {"sse4_2": bool(f.sse4_2), "avx": bool(f.avx), "avx2": bool(f.avx2),
            "fma": bool(f.fma), "avx512f": bool(f.avx512f), "avx512": bool(f.avx512)}


def openmp():
    """Whether the kernels were built with OpenMP threads."""
    return bool(fp_openmp_enabled())


def get_num_threads():
    """Threads a kernel may use: omp_get_max_threads() (1 without OpenMP, and 1 in a
    process forked after the OpenMP thread pool started, or from a process with more
    than one thread: GNU OpenMP cannot reuse a pool across fork, so such a child runs
    every kernel serially instead of deadlocking)."""
    return fp_get_num_threads()


def set_num_threads(n):
    """Set the OpenMP thread count (omp_set_num_threads), n >= 1 (any count is
    accepted, as OpenMP accepts it; a kernel starts at most 256 threads)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    fp_set_num_threads(<int>min(int(n), 1 << 20))


def threads_usable():
    """False in a fork child of a process whose OpenMP pool had started (or that had
    more than one thread): every kernel runs serially there, and set_num_threads is
    kept for a later process but not used."""
    return bool(fp_threads_usable())


def threads_free(nt):
    """Threads a kernel that asks for ``nt`` would use now: ``nt``, or fewer while
    other threads keep the cores busy (the online CPUs less the other runnable
    threads of /proc/loadavg, read at most every 10 ms; in a process pinned to some
    CPUs, those CPUs less this process' own other runnable threads; at least 1).
    Results do not depend on it.  ``FASTPROP_BACKOFF=0`` turns it off."""
    if isinstance(nt, bool) or not isinstance(nt, (int, np.integer)) or nt < 1:
        raise ValueError(f"nt must be an int >= 1, got {nt!r}")
    return fp_threads_free(<int>min(int(nt), 1 << 20))


def backoff():
    """Whether kernels use fewer threads while other processes keep the cores busy
    (on unless FASTPROP_BACKOFF=0 was set at start, or ``set_backoff(False)``)."""
    return bool(fp_backoff_enabled())


def backoff_state():
    """"on", "off" (FASTPROP_BACKOFF=0 or set_backoff(False)) or "pinned" (on, but
    counting only this process' own threads on the CPUs of its affinity: it leaves
    out some online CPUs, and the machine-wide count says nothing about its cores),
    as the kernels see it now."""
    return ("off", "on", "pinned")[fp_backoff_state()]


def own_runnable_threads():
    """Runnable threads of this process, the caller included (state R in
    /proc/self/task), as the back-off counts them in a pinned process; -1 without
    /proc.  For the tests."""
    cdef int n
    with nogil:
        n = fp_own_runnable_threads()
    return n


def _force_pinned(on):
    """Tests: treat this process as pinned to the CPUs it has (the back-off then
    counts its own threads, as in a process pinned to some CPUs)."""
    fp_force_pinned(bool(on))


def set_backoff(on):
    """Turn the back-off of :func:`threads_free` on or off, for the whole process (a
    benchmark that measures the threads' speed-up on a machine it knows is quiet)."""
    if not isinstance(on, (bool, np.bool_)):
        raise TypeError(f"on must be a bool, got {type(on).__name__}")
    fp_set_backoff(bool(on))


def build_info():
    """Compiler and per-ISA compile flags of the C++ kernels."""
    return {"compiler": fp_compiler_id().decode("ascii", "replace"),
            "baseline_flags": fp_baseline_flags().decode("ascii", "replace"),
            "avx2_flags": fp_avx2_flags().decode("ascii", "replace"),
            "avx512_flags": fp_avx512_flags().decode("ascii", "replace")}


# ------------------------------------------------------------------ checking helpers
cdef int _kind(object arr, str name) except -1:
    """4 for a float32 array, 8 for float64; TypeError otherwise."""
    try:
        dt = arr.dtype
    except AttributeError:
        raise TypeError(f"{name} must be a NumPy array, got {type(arr).__name__}") from None
    if dt is _F32:
        return 4
    if dt is _F64:
        return 8
    if dt == _F32:
        return 4
    if dt == _F64:
        return 8
    raise TypeError(f"{name} must be float32 or float64, got dtype {dt}")


cdef int _same_kind(object arr, int kind, str name, bint required=True) except -1:
    """Check arr's dtype matches kind; None is accepted only when not required."""
    if arr is None:
        if required:
            raise TypeError(f"{name} must be an array, got None")
        return 0
    if _kind(arr, name) != kind:
        raise TypeError(f"{name} must have dtype {'float32' if kind == 4 else 'float64'}, "
                        f"got {arr.dtype}")
    return 0


cdef int _check_act(int act) except -1:
    if act < 0 or act >= N_ACTIVATIONS:
        raise ValueError(f"unknown activation code {act}; expected 0..{N_ACTIVATIONS - 1}")
    return 0


cdef str _fmt(Py_ssize_t* shape, int ndim):
    return "(" + ", ".join([str(shape[i]) for i in range(ndim)]) + ("," if ndim == 1 else "") + ")"


cdef int _shape_error(str name, str expected, Py_ssize_t* got, int ndim) except -1:
    raise ValueError(f"{name} must have shape {expected}, got shape {_fmt(got, ndim)}")


cdef inline int _need2(str name, Py_ssize_t* shape, Py_ssize_t r, Py_ssize_t c) except -1:
    if shape[0] != r or shape[1] != c:
        _shape_error(name, f"({r}, {c})", shape, 2)
    return 0


cdef inline int _need1(str name, Py_ssize_t* shape, Py_ssize_t r) except -1:
    if shape[0] != r:
        _shape_error(name, f"({r},)", shape, 1)
    return 0


cdef int64_t _lead(str name, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t s0,
                   Py_ssize_t s1, Py_ssize_t item) except -1:
    """Leading dimension (in elements) of a 2-D operand with a unit-stride last axis."""
    if cols > 1 and s1 != item:
        raise ValueError(f"{name} must have a unit-stride last axis, got strides ({s0}, {s1})")
    if rows <= 1:
        return cols if cols > 0 else 1
    if s0 < 0 or s0 % item != 0:
        raise ValueError(f"{name} must have a non-negative first-axis stride that is a "
                         f"multiple of {item} bytes, got strides ({s0}, {s1})")
    return s0 // item


cdef class _Held:
    """Py_buffer views of any-shape C-contiguous arrays, held for one kernel call."""
    cdef Py_buffer views[8]
    cdef int count

    def __cinit__(self):
        self.count = 0

    cdef Py_buffer* take(self, object obj, int kind, bint writable, str name,
                         Py_ssize_t index=-1) except NULL:
        cdef Py_buffer* v
        cdef int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT
        if writable:
            flags |= PyBUF_WRITABLE
        if self.count >= 8:
            raise RuntimeError("internal error: too many buffers held")
        if index >= 0:
            name = f"{name}[{index}]"
        _same_kind(obj, kind, name)
        v = &self.views[self.count]
        try:
            PyObject_GetBuffer(obj, v, flags)
        except (BufferError, ValueError) as exc:
            raise ValueError(f"{name}: {exc}") from None
        self.count += 1
        if v.itemsize != kind:
            raise TypeError(f"{name} must have {kind}-byte floats, got itemsize {v.itemsize}")
        return v

    cdef void release(self) noexcept:
        while self.count > 0:
            self.count -= 1
            PyBuffer_Release(&self.views[self.count])

    def __dealloc__(self):
        self.release()


cdef int _same_shape(Py_buffer* a, Py_buffer* b, str name_a, str name_b,
                     Py_ssize_t index=-1) except -1:
    cdef int i
    cdef bint same = a.ndim == b.ndim
    if same:
        for i in range(a.ndim):
            if a.shape[i] != b.shape[i]:
                same = False
                break
    if not same:
        if index >= 0:
            name_a, name_b = f"{name_a}[{index}]", f"{name_b}[{index}]"
        raise ValueError(f"{name_b} must have the shape of {name_a}, "
                         f"{_fmt(a.shape, a.ndim)}, got {_fmt(b.shape, b.ndim)}")
    return 0


cdef inline int64_t _size(Py_buffer* v) noexcept:
    return v.len // v.itemsize


# ------------------------------------------------------------------ GEMM, dense layer
cdef int _gemm(const floating[:, :] a, const floating[:, :] b, floating[:, :] c,
               bint trans_a, bint trans_b, bint accumulate) except -1:
    cdef Py_ssize_t item = sizeof(floating)
    cdef int64_t m = c.shape[0], n = c.shape[1]
    cdef int64_t am = a.shape[1] if trans_a else a.shape[0]
    cdef int64_t k = a.shape[0] if trans_a else a.shape[1]
    cdef int64_t bk = b.shape[1] if trans_b else b.shape[0]
    cdef int64_t bn = b.shape[0] if trans_b else b.shape[1]
    if am != m or bk != k or bn != n:
        raise ValueError(
            f"gemm: shapes do not agree: op(a) is ({am}, {k}), op(b) is ({bk}, {bn}), "
            f"c is ({m}, {n}) (trans_a={bool(trans_a)}, trans_b={bool(trans_b)})")
    cdef int64_t lda = _lead("a", a.shape[0], a.shape[1], a.strides[0], a.strides[1], item)
    cdef int64_t ldb = _lead("b", b.shape[0], b.shape[1], b.strides[0], b.strides[1], item)
    cdef int64_t ldc = _lead("c", c.shape[0], c.shape[1], c.strides[0], c.strides[1], item)
    if m == 0 or n == 0:
        return 0
    cdef const floating* pa = &a[0, 0]
    cdef const floating* pb = &b[0, 0]
    cdef floating* pc = &c[0, 0]
    cdef floating beta = 1 if accumulate else 0
    with nogil:
        fp_gemm(trans_a, trans_b, m, n, k, <floating>1, pa, lda, pb, ldb, beta, pc, ldc)
    return 0


def gemm(a, b, c, trans_a, trans_b, accumulate):
    """c[m, n] (+)= op(a) @ op(b); op(x) = x.T when trans_x.

    a is (m, k) or (k, m) (trans_a), b is (k, n) or (n, k) (trans_b).  Operands need a
    unit-stride last axis; the first-axis stride (leading dimension) is free.  k may
    be 0 (then c = 0, or unchanged when accumulate).
    """
    if (type(a) is _ndarray and type(b) is _ndarray and type(c) is _ndarray
            and _gemm_buffers(a, b, c, trans_a, trans_b, accumulate, False) is not None):
        return  # (the common case without memoryviews: ~0.35 us less a call)
    cdef int kind = _kind(c, "c")
    _same_kind(a, kind, "a")
    _same_kind(b, kind, "b")
    if kind == 4:
        _gemm[float](a, b, c, trans_a, trans_b, accumulate)
    else:
        _gemm[double](a, b, c, trans_a, trans_b, accumulate)


# ------------------------------------------------ fp.ops.matmul's common case
cdef object _ndarray = np.ndarray
cdef object _empty = np.empty


cdef object _NP_TRUE = np.True_
cdef object _NP_FALSE = np.False_


cdef inline int _flag_of(object v):
    """1 or 0 for a flag fastprop takes (True/False, NumPy's bools, the ints 1 and
    0), -1 for anything else (the general path refuses it)."""
    if v is True or v is _NP_TRUE:
        return 1
    if v is False or v is _NP_FALSE:
        return 0
    if type(v) is int:
        return 1 if v == 1 else (0 if v == 0 else -1)
    return -1


cdef inline int _float_kind(Py_buffer* v) noexcept:
    """4 or 8 for a native-order float32/float64 buffer ("f"/"d"), 0 otherwise."""
    cdef const char* f = v.format
    if f == NULL or f[0] == 0 or f[1] != 0:
        return 0
    if f[0] == b'f' and v.itemsize == 4:
        return 4
    if f[0] == b'd' and v.itemsize == 8:
        return 8
    return 0


cdef struct _Operand:
    char* data       # first element
    int64_t rows     # of op(x) after a possible flip
    int64_t cols
    int64_t ld       # leading dimension, elements
    bint trans       # trans flag after a flip
    char* lo         # the bytes the view spans, [lo, hi)
    char* hi


cdef inline bint _operand(Py_buffer* v, bint trans, bint flip, _Operand* o) noexcept:
    """A 2-D view as a GEMM operand: as stored when its last axis has unit stride (a
    length-1 axis' stride is free, as ``gemm`` takes it), else, with flip, as its
    transpose (trans flipped) when its first axis has, as fastprop.ops.matmul's
    general path reads it; False otherwise, or when the other stride is negative or
    not a multiple of the item size.  (A zero stride, rows repeated, is read as such,
    as the general path passes it.)"""
    cdef Py_ssize_t item = v.itemsize
    cdef Py_ssize_t r = v.shape[0], c = v.shape[1]
    cdef Py_ssize_t s0 = v.strides[0], s1 = v.strides[1]
    if flip:  # (the general path's choice, _gemm_operand: its numerics exactly)
        if s1 == item and s0 >= 0 and s0 % item == 0:
            o.rows, o.cols, o.ld, o.trans = r, c, s0 // item, trans
        elif s0 == item and s1 >= 0 and s1 % item == 0:
            o.rows, o.cols, o.ld, o.trans = c, r, s1 // item, not trans
        else:
            return False
    else:  # (gemm's rule, _lead)
        if c > 1 and s1 != item:
            return False
        if r > 1 and (s0 < 0 or s0 % item):
            return False
        o.rows, o.cols, o.ld, o.trans = r, c, s0 // item, trans
    if o.rows <= 1:
        o.ld = o.cols if o.cols > 0 else 1
    o.data = <char*>v.buf
    o.lo = o.data
    o.hi = o.data
    if o.rows > 0 and o.cols > 0:
        o.hi = o.data + ((o.rows - 1) * o.ld + o.cols) * item
    return True


cdef object _gemm_buffers(object a, object b, object c, bint ta, bint tb, bint acc,
                          bint flip):
    """c (+)= op(a) @ op(b) straight from the arrays' buffers (no memoryviews): the
    product when a and b are 2-D native float32/float64 arrays of one dtype with a
    unit-stride last axis (or, with flip, first axis), non-empty, c a writable array
    of the product's shape and dtype with unit-stride rows, apart from both (c None:
    allocated).  Returns c, or None, having changed nothing, for any other call."""
    cdef Py_buffer va, vb, vc
    cdef bint got_a = False, got_b = False, got_c = False
    cdef _Operand oa, ob
    cdef int kind
    cdef int64_t m, n, k, ldc
    cdef char* pc
    cdef char* c_hi
    try:
        try:
            PyObject_GetBuffer(a, &va, PyBUF_RECORDS_RO)
            got_a = True
            PyObject_GetBuffer(b, &vb, PyBUF_RECORDS_RO)
            got_b = True
        except (BufferError, ValueError, TypeError):
            return None  # (a dtype with no buffer format)
        if va.ndim != 2 or vb.ndim != 2:
            return None
        kind = _float_kind(&va)
        if kind == 0 or _float_kind(&vb) != kind:
            return None
        if not _operand(&va, ta, flip, &oa) or not _operand(&vb, tb, flip, &ob):
            return None
        # op(a) is (m, k): a is stored (m, k) row-major unless trans
        m, k = (oa.cols, oa.rows) if oa.trans else (oa.rows, oa.cols)
        n = ob.rows if ob.trans else ob.cols
        if (ob.cols if ob.trans else ob.rows) != k or m == 0 or n == 0 or k == 0:
            return None
        if c is None:
            c = _empty((m, n), _F32 if kind == 4 else _F64)
        try:
            PyObject_GetBuffer(c, &vc, PyBUF_RECORDS)
            got_c = True
        except (BufferError, ValueError, TypeError):
            return None  # (read-only)
        if (vc.ndim != 2 or vc.shape[0] != m or vc.shape[1] != n
                or _float_kind(&vc) != kind):
            return None
        if n > 1 and vc.strides[1] != kind:
            return None
        ldc = n
        if m > 1:
            if vc.strides[0] < n * kind or vc.strides[0] % kind:
                return None
            ldc = vc.strides[0] // kind
        pc = <char*>vc.buf
        c_hi = pc + ((m - 1) * ldc + n) * kind
        if (pc < oa.hi and oa.lo < c_hi) or (pc < ob.hi and ob.lo < c_hi):
            return None  # (overlap)
        if kind == 4:
            with nogil:
                fp_gemm(oa.trans, ob.trans, m, n, k, <float>1, <const float*>oa.data, oa.ld,
                        <const float*>ob.data, ob.ld, <float>(1 if acc else 0),
                        <float*>pc, ldc)
        else:
            with nogil:
                fp_gemm(oa.trans, ob.trans, m, n, k, <double>1, <const double*>oa.data,
                        oa.ld, <const double*>ob.data, ob.ld, <double>(1 if acc else 0),
                        <double*>pc, ldc)
        return c
    finally:
        if got_c:
            PyBuffer_Release(&vc)
        if got_b:
            PyBuffer_Release(&vb)
        if got_a:
            PyBuffer_Release(&va)


def matmul_fast(a, b, trans_a, trans_b, out, accumulate):
    """``fastprop.ops.matmul`` for its common case, in one C call: two NumPy arrays
    of one native float dtype, each with a unit-stride axis, non-empty, the flags
    given as True/False, ``out`` None or a writable array of the result's shape and
    dtype with unit-stride rows, apart from both operands.  Returns the result, or
    None for every other call, which the general Python path then takes
    (conversions, copies, messages, empty products)."""
    cdef int ta = _flag_of(trans_a), tb = _flag_of(trans_b), acc = _flag_of(accumulate)
    if ta < 0 or tb < 0 or acc < 0:
        return None
    if type(a) is not _ndarray or type(b) is not _ndarray:
        return None
    if out is None:
        if acc:
            return None
    elif type(out) is not _ndarray:
        return None
    return _gemm_buffers(a, b, out, ta, tb, acc, True)


cdef int _gemm_ex(const floating[:, :] a, const floating[:, :] b, floating[:, :] c,
                  bint trans_a, bint trans_b, double alpha, double beta,
                  const floating[::1] bias, floating[:, :] preact, int act, double act_alpha,
                  const floating[:, :] dsrc, int dact, double dalpha, double[::1] colsum,
                  int[::1] nonfinite) except -1:
    cdef Py_ssize_t item = sizeof(floating)
    cdef int64_t m = c.shape[0], n = c.shape[1]
    cdef int64_t am = a.shape[1] if trans_a else a.shape[0]
    cdef int64_t k = a.shape[0] if trans_a else a.shape[1]
    cdef int64_t bk = b.shape[1] if trans_b else b.shape[0]
    cdef int64_t bn = b.shape[0] if trans_b else b.shape[1]
    if am != m or bk != k or bn != n:
        raise ValueError(f"gemm_ex: shapes do not agree: op(a) is ({am}, {k}), op(b) is "
                         f"({bk}, {bn}), c is ({m}, {n})")
    cdef GemmEpilogue[floating] ep
    ep.act = act
    ep.alpha = act_alpha
    ep.dact = dact
    ep.dalpha = dalpha
    if bias is not None:
        _need1("bias", &bias.shape[0], n)
        ep.bias = &bias[0]
    if preact is not None:
        _need2("preact", &preact.shape[0], m, n)
        ep.ld_preact = _lead("preact", preact.shape[0], preact.shape[1], preact.strides[0],
                             preact.strides[1], item)
        ep.preact = &preact[0, 0]
    if dsrc is not None:
        _need2("dsrc", &dsrc.shape[0], m, n)
        ep.ld_dsrc = _lead("dsrc", dsrc.shape[0], dsrc.shape[1], dsrc.strides[0],
                           dsrc.strides[1], item)
        ep.dsrc = &dsrc[0, 0]
    if colsum is not None:
        _need1("colsum", &colsum.shape[0], n)
        ep.colsum = &colsum[0]
    if nonfinite is not None:
        _need1("nonfinite", &nonfinite.shape[0], 1)
        ep.nonfinite = &nonfinite[0]
    cdef int64_t lda = _lead("a", a.shape[0], a.shape[1], a.strides[0], a.strides[1], item)
    cdef int64_t ldb = _lead("b", b.shape[0], b.shape[1], b.strides[0], b.strides[1], item)
    cdef int64_t ldc = _lead("c", c.shape[0], c.shape[1], c.strides[0], c.strides[1], item)
    if m == 0 or n == 0:
        return 0
    cdef const floating* pa = &a[0, 0] if a.shape[0] > 0 and a.shape[1] > 0 else NULL
    cdef const floating* pb = &b[0, 0] if b.shape[0] > 0 and b.shape[1] > 0 else NULL
    cdef floating* pc = &c[0, 0]
    with nogil:
        fp_gemm_ex(trans_a, trans_b, m, n, k, <floating>alpha, pa, lda, pb, ldb,
                   <floating>beta, pc, ldc, ep)
    return 0


def gemm_ex(a, b, c, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, *, bias=None,
            preact=None, int act=0, double act_alpha=0.01, dsrc=None, int dact=0,
            double dalpha=0.01, colsum=None, nonfinite=None):
    """c = alpha op(a) @ op(b) + beta c, then the fused epilogue (C++ gemm_ex).

    Internal (tests and benchmarks of the C++ API that the fused training step uses):
    bias (n,) added; preact (m, n) receives the biased value; act applied (codes
    0..6); c *= act'(dsrc) for dact (dsrc: y, or z for gelu); colsum (n,) float64
    += column sums of the final c; nonfinite (1,) intc set to 1 if c has NaN/Inf.
    Operands need a unit-stride last axis (any leading dimension).
    """
    cdef int kind = _kind(c, "c")
    _same_kind(a, kind, "a")
    _same_kind(b, kind, "b")
    if bias is not None:
        _same_kind(bias, kind, "bias")
    if preact is not None:
        _same_kind(preact, kind, "preact")
    if dsrc is not None:
        _same_kind(dsrc, kind, "dsrc")
    if not 0 <= act < ACT_SOFTMAX or not 0 <= dact < ACT_SOFTMAX:
        raise ValueError(f"gemm_ex: act and dact must be epilogue codes 0..6, got {act}, {dact}")
    if kind == 4:
        _gemm_ex[float](a, b, c, trans_a, trans_b, alpha, beta, bias, preact, act, act_alpha,
                        dsrc, dact, dalpha, colsum, nonfinite)
    else:
        _gemm_ex[double](a, b, c, trans_a, trans_b, alpha, beta, bias, preact, act,
                         act_alpha, dsrc, dact, dalpha, colsum, nonfinite)


cdef int _linear_forward(const floating[:, ::1] x, const floating[:, ::1] w,
                         const floating[::1] b, int act, double alpha, floating[:, ::1] y,
                         floating[:, ::1] z) except -1:
    cdef int64_t n = x.shape[0], n_in = x.shape[1], n_out = w.shape[1]
    _need2("w", w.shape, n_in, n_out)
    _need2("y", y.shape, n, n_out)
    cdef const floating* pb = NULL
    cdef floating* pz = NULL
    if b is not None:
        _need1("b", b.shape, n_out)
        pb = &b[0]
    if z is not None:
        _need2("z", z.shape, n, n_out)
        pz = &z[0, 0]
    if n == 0 or n_out == 0:
        return 0
    cdef const floating* px = &x[0, 0]
    cdef const floating* pw = &w[0, 0]
    cdef floating* py = &y[0, 0]
    with nogil:
        fp_linear_forward(n, n_in, n_out, px, pw, pb, act, alpha, py, pz)
    return 0


def linear_forward(x, w, b, int act, double alpha, y, z):
    """z = x @ w + b (b may be None); y = act(z).  z is None or (n, out)."""
    _check_act(act)
    cdef int kind = _kind(y, "y")
    _same_kind(x, kind, "x")
    _same_kind(w, kind, "w")
    _same_kind(b, kind, "b", False)
    _same_kind(z, kind, "z", False)
    if kind == 4:
        _linear_forward[float](x, w, b, act, alpha, y, z)
    else:
        _linear_forward[double](x, w, b, act, alpha, y, z)


cdef int _linear_backward(const floating[:, ::1] grad_y, const floating[:, ::1] x,
                          const floating[:, ::1] w, const floating[:, ::1] y,
                          const floating[:, ::1] z, int act, double alpha,
                          floating[:, ::1] grad_x, floating[:, ::1] grad_w,
                          floating[::1] grad_b, floating[:, ::1] work,
                          bint accumulate) except -1:
    cdef int64_t n = x.shape[0], n_in = x.shape[1], n_out = w.shape[1]
    _need2("w", w.shape, n_in, n_out)
    _need2("grad_y", grad_y.shape, n, n_out)
    _need2("grad_w", grad_w.shape, n_in, n_out)
    cdef const floating* py = NULL
    cdef const floating* pz = NULL
    cdef floating* pgx = NULL
    cdef floating* pgb = NULL
    cdef floating* pwork = NULL
    if y is not None:
        _need2("y", y.shape, n, n_out)
        py = &y[0, 0]
    if z is not None:
        _need2("z", z.shape, n, n_out)
        pz = &z[0, 0]
    if grad_x is not None:
        _need2("grad_x", grad_x.shape, n, n_in)
        pgx = &grad_x[0, 0]
    if grad_b is not None:
        _need1("grad_b", grad_b.shape, n_out)
        pgb = &grad_b[0]
    if work is not None:
        _need2("work", work.shape, n, n_out)
        pwork = &work[0, 0]
    if act != ACT_IDENTITY:
        if work is None:
            raise ValueError("linear_backward: work (n, out) is required for a non-identity "
                             "activation")
        if (act == ACT_GELU or act == ACT_GELU_ERF) and z is None:
            raise ValueError("linear_backward: gelu needs the pre-activation z")
        if y is None and z is None:
            raise ValueError("linear_backward: this activation needs the forward output y "
                             "(or the pre-activation z)")
    if n_out == 0:  # (no outputs: grad_x = grad_z @ w.T is zeros)
        if grad_x is not None and n > 0 and n_in > 0:
            grad_x[:, :] = 0
        return 0
    cdef const floating* pgy = &grad_y[0, 0]
    cdef const floating* px = &x[0, 0]
    cdef const floating* pw = &w[0, 0]
    cdef floating* pgw = &grad_w[0, 0]
    with nogil:
        fp_linear_backward(n, n_in, n_out, pgy, px, pw, py, pz, act, alpha, pgx, pgw, pgb,
                           pwork, accumulate)
    return 0


def linear_backward(grad_y, x, w, y, z, int act, double alpha, grad_x, grad_w, grad_b, work,
                    accumulate):
    """grad_z = grad_y * act'(.) into work; grad_w (+)= x.T @ grad_z;
    grad_b (+)= grad_z.sum(0); grad_x = grad_z @ w.T ('+=' when accumulate)."""
    _check_act(act)
    cdef int kind = _kind(grad_w, "grad_w")
    _same_kind(grad_y, kind, "grad_y")
    _same_kind(x, kind, "x")
    _same_kind(w, kind, "w")
    _same_kind(y, kind, "y", False)
    _same_kind(z, kind, "z", False)
    _same_kind(grad_x, kind, "grad_x", False)
    _same_kind(grad_b, kind, "grad_b", False)
    _same_kind(work, kind, "work", False)
    if kind == 4:
        _linear_backward[float](grad_y, x, w, y, z, act, alpha, grad_x, grad_w, grad_b, work,
                                accumulate)
    else:
        _linear_backward[double](grad_y, x, w, y, z, act, alpha, grad_x, grad_w, grad_b,
                                 work, accumulate)


# ------------------------------------------------------------------ activations
cdef inline void _rows_cols(Py_buffer* v, int64_t* rows, int64_t* cols) noexcept:
    """Split an any-shape array into (rows, last-axis length); a 0-d array is (1, 1)."""
    cdef int64_t size = _size(v)
    if v.ndim == 0:
        rows[0] = 1
        cols[0] = 1
    else:
        cols[0] = v.shape[v.ndim - 1]
        rows[0] = size // cols[0] if cols[0] > 0 else 0


def activation_forward(int act, double alpha, x, y):
    """y = act(x) for any shape (softmax over the last axis); y may be x."""
    _check_act(act)
    cdef int kind = _kind(x, "x")
    cdef _Held held = _Held()
    cdef Py_buffer* bx
    cdef Py_buffer* by
    cdef int64_t rows, cols
    try:
        bx = held.take(x, kind, False, "x")
        by = held.take(y, kind, True, "y")
        _same_shape(bx, by, "x", "y")
        if act == ACT_SOFTMAX and bx.ndim == 0:
            raise ValueError("softmax needs an array of at least 1 dimension")
        _rows_cols(bx, &rows, &cols)
        if rows * cols == 0:
            return
        with nogil:
            if kind == 4:
                fp_activation_forward(act, alpha, rows, cols, <const float*>bx.buf,
                                      <float*>by.buf)
            else:
                fp_activation_forward(act, alpha, rows, cols, <const double*>bx.buf,
                                      <double*>by.buf)
    finally:
        held.release()


def activation_backward(int act, double alpha, grad_y, x, y, grad_x):
    """grad_x = grad_y * act'(.); relu/leaky_relu/sigmoid/tanh/softmax read y, gelu
    reads x, identity neither (the unused one may be None).  grad_x may be grad_y."""
    _check_act(act)
    cdef int kind = _kind(grad_y, "grad_y")
    cdef _Held held = _Held()
    cdef Py_buffer* bgy
    cdef Py_buffer* bgx
    cdef Py_buffer* bin
    cdef const void* px = NULL
    cdef const void* py = NULL
    cdef int64_t rows, cols
    try:
        bgy = held.take(grad_y, kind, False, "grad_y")
        bgx = held.take(grad_x, kind, True, "grad_x")
        _same_shape(bgy, bgx, "grad_y", "grad_x")
        if act == ACT_SOFTMAX and bgy.ndim == 0:
            raise ValueError("softmax needs an array of at least 1 dimension")
        if act == ACT_GELU or act == ACT_GELU_ERF:
            if x is None:
                raise ValueError("activation_backward: gelu needs x")
            bin = held.take(x, kind, False, "x")
            _same_shape(bgy, bin, "grad_y", "x")
            px = bin.buf
        elif act != ACT_IDENTITY:
            if y is None:
                raise ValueError("activation_backward: this activation needs y")
            bin = held.take(y, kind, False, "y")
            _same_shape(bgy, bin, "grad_y", "y")
            py = bin.buf
        _rows_cols(bgy, &rows, &cols)
        if rows * cols == 0:
            return
        with nogil:
            if kind == 4:
                fp_activation_backward(act, alpha, rows, cols, <const float*>bgy.buf,
                                       <const float*>px, <const float*>py, <float*>bgx.buf)
            else:
                fp_activation_backward(act, alpha, rows, cols, <const double*>bgy.buf,
                                       <const double*>px, <const double*>py,
                                       <double*>bgx.buf)
    finally:
        held.release()


# ------------------------------------------------------------------ losses
cdef double _softmax_xent(const floating[:, ::1] logits, const int64_t[::1] labels,
                          const floating[:, ::1] targets, floating[:, ::1] grad) except? -1:
    cdef int64_t n = logits.shape[0], c = logits.shape[1], i, bad = -1
    cdef const int64_t* pl = NULL
    cdef const floating* pt = NULL
    cdef floating* pg = NULL
    cdef double loss
    if (labels is None) == (targets is None):
        raise ValueError("softmax_xent: pass exactly one of labels and targets")
    if n == 0 or c == 0:
        raise ValueError(f"softmax_xent: logits must be non-empty, got shape ({n}, {c})")
    if labels is not None:
        _need1("labels", labels.shape, n)
        pl = &labels[0]
        with nogil:  # an out-of-range label would index out of bounds in C++
            for i in range(n):
                if pl[i] < 0 or pl[i] >= c:
                    bad = i
                    break
        if bad >= 0:
            raise ValueError(f"labels[{bad}] = {labels[bad]} is outside [0, {c})")
    else:
        _need2("targets", targets.shape, n, c)
        pt = &targets[0, 0]
    if grad is not None:
        _need2("grad", grad.shape, n, c)
        pg = &grad[0, 0]
    cdef const floating* px = &logits[0, 0]
    with nogil:
        loss = fp_softmax_xent(n, c, px, pl, pt, pg)
    return loss


def softmax_xent(logits, labels, targets, grad):
    """Mean softmax cross-entropy of logits (n, c) against labels (n,) int64 class ids
    or targets (n, c); writes (softmax - t) / n into grad unless grad is None."""
    cdef int kind = _kind(logits, "logits")
    _same_kind(targets, kind, "targets", False)
    _same_kind(grad, kind, "grad", False)
    if labels is not None and getattr(labels, "dtype", None) != _I64:
        raise TypeError(f"labels must be an int64 array, got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)}")
    if kind == 4:
        return _softmax_xent[float](logits, labels, targets, grad)
    return _softmax_xent[double](logits, labels, targets, grad)


cdef double _pointwise_loss(int which, pred, target, bint flag, grad) except? -1:
    """which: 0 = bce, 1 = mse; pred/target/grad any shape, equal shapes."""
    cdef int kind = _kind(pred, "pred")
    cdef _Held held = _Held()
    cdef Py_buffer* bp
    cdef Py_buffer* bt
    cdef Py_buffer* bg
    cdef void* pg = NULL
    cdef int64_t size
    cdef double loss = 0.0
    try:
        bp = held.take(pred, kind, False, "pred")
        bt = held.take(target, kind, False, "target")
        _same_shape(bp, bt, "pred", "target")
        if grad is not None:
            bg = held.take(grad, kind, True, "grad")
            _same_shape(bp, bg, "pred", "grad")
            pg = bg.buf
        size = _size(bp)
        if size == 0:
            raise ValueError("pred is empty: the mean loss of 0 elements is undefined")
        with nogil:
            if which == 0:
                if kind == 4:
                    loss = fp_bce(size, <const float*>bp.buf, <const float*>bt.buf, flag,
                                  <float*>pg)
                else:
                    loss = fp_bce(size, <const double*>bp.buf, <const double*>bt.buf, flag,
                                  <double*>pg)
            else:
                if kind == 4:
                    loss = fp_mse(size, <const float*>bp.buf, <const float*>bt.buf, flag,
                                  <float*>pg)
                else:
                    loss = fp_mse(size, <const double*>bp.buf, <const double*>bt.buf, flag,
                                  <double*>pg)
    finally:
        held.release()
    return loss


def bce(pred, target, from_logits, grad):
    """Mean binary cross-entropy over all elements (probabilities or logits)."""
    return _pointwise_loss(0, pred, target, from_logits, grad)


def mse(pred, target, half, grad):
    """Mean squared error over all elements (times 1/2 when half)."""
    return _pointwise_loss(1, pred, target, half, grad)


# ------------------------------------------------------------------ optimizers
def sgd_update(params, grads, bufs, double lr, double momentum, bint nesterov,
               double weight_decay, bint first):
    """SGD step in place for each (param, grad[, momentum buffer]); one C++ call."""
    if momentum != 0 and bufs is None:
        raise ValueError("sgd_update: bufs is required when momentum != 0")
    _optimizer_lists(0, params, grads, bufs if momentum != 0 else None, None,
                     1 if first else 2, lr, 0.0, 0.0, 0.0, weight_decay, momentum, 0.0,
                     nesterov, False)


def adam_update(params, grads, exp_avgs, exp_avg_sqs, step, double lr, double beta1,
                double beta2, double eps, double weight_decay, bint decoupled):
    """Adam (decoupled: AdamW) step in place; step counts from 1; one C++ call."""
    cdef int64_t istep = step
    if istep < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if exp_avgs is None or exp_avg_sqs is None:
        raise ValueError("adam_update: exp_avgs and exp_avg_sqs are required")
    _optimizer_lists(1, params, grads, exp_avgs, exp_avg_sqs, istep, lr, beta1, beta2, eps,
                     weight_decay, 0.0, 0.0, False, decoupled)


def rmsprop_update(params, grads, square_avgs, bufs, double lr, double alpha, double eps,
                   double momentum, double weight_decay):
    """RMSprop step in place; bufs is None when momentum == 0; one C++ call."""
    if square_avgs is None:
        raise ValueError("rmsprop_update: square_avgs is required")
    if momentum > 0 and bufs is None:
        raise ValueError("rmsprop_update: bufs is required when momentum > 0")
    _optimizer_lists(2, params, grads, square_avgs, bufs if momentum > 0 else None, 1, lr,
                     0.0, 0.0, eps, weight_decay, momentum, alpha, False, False)


def adagrad_update(params, grads, sums, double lr, double eps, double weight_decay):
    """Adagrad step in place; one C++ call."""
    if sums is None:
        raise ValueError("adagrad_update: sums is required")
    _optimizer_lists(3, params, grads, sums, None, 1, lr, 0.0, 0.0, eps, weight_decay, 0.0,
                     0.0, False, False)


def sum_squares(arrays):
    """Sum of squares of every element of every array, accumulated in double, in one
    C++ call (one parallel region over all the arrays)."""
    arrays = list(arrays)
    cdef Py_ssize_t count = len(arrays)
    cdef double total = 0.0
    if count == 0:
        return 0.0
    cdef int kind = _kind(arrays[0], "arrays[0]")
    cdef _ArrayLists lists = _ArrayLists(count)
    lists.take(-1, arrays, kind, False, "arrays")
    with nogil:
        if kind == 4:
            total = fp_sum_squares_multi(count, <const float**>lists.ptrs, lists.sizes)
        else:
            total = fp_sum_squares_multi(count, <const double**>lists.ptrs, lists.sizes)
    return total


cdef int _map_arrays(arrays, int op, double a, double b) except -1:
    """op 0: x *= a; op 1: x = min(max(x, a), b); in place, array by array."""
    cdef _Held held = _Held()
    cdef Py_buffer* v
    cdef int kind
    cdef int64_t size
    cdef Py_ssize_t i = 0
    for arr in arrays:
        kind = _kind(arr, f"arrays[{i}]")
        try:
            v = held.take(arr, kind, True, "arrays", i)
            size = _size(v)
            with nogil:
                if kind == 4:
                    if op == 0:
                        fp_scale(size, <float*>v.buf, a)
                    else:
                        fp_clip(size, <float*>v.buf, a, b)
                else:
                    if op == 0:
                        fp_scale(size, <double*>v.buf, a)
                    else:
                        fp_clip(size, <double*>v.buf, a, b)
        finally:
            held.release()
        i += 1
    return 0


def scale_(arrays, double factor):
    """a *= factor in place for every array."""
    _map_arrays(arrays, 0, factor, 0.0)


def clip_(arrays, double lo, double hi):
    """a = min(max(a, lo), hi) in place for every array."""
    _map_arrays(arrays, 1, lo, hi)


# ------------------------------------------------------------------ normalisation
cdef int _running_args(int64_t n, int64_t f, Py_ssize_t* rm_shape, Py_ssize_t* rv_shape,
                       double momentum) except -1:
    """The running statistics' checks: (f,) each, n >= 2 rows, momentum in [0, 1]."""
    _need1("running_mean", rm_shape, f)
    _need1("running_var", rv_shape, f)
    if n < 2:
        raise ValueError(f"x needs at least 2 rows (the unbiased variance), got {n}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    return 0


cdef int _norm_forward(bint layer, const floating[:, ::1] x, const floating[::1] gamma,
                       const floating[::1] beta, double eps, floating[:, ::1] y,
                       floating[::1] mean, floating[::1] invstd, bint running=False,
                       double momentum=0.0, floating[::1] running_mean=None,
                       floating[::1] running_var=None) except -1:
    # (running: batch norm's training forward with its running statistics' update)
    cdef int64_t n = x.shape[0], f = x.shape[1]
    cdef int64_t stats = n if layer else f
    if gamma is None or beta is None or y is None or mean is None or invstd is None:
        raise ValueError("gamma, beta, y, mean and invstd are required")
    _need1("gamma", gamma.shape, f)
    _need1("beta", beta.shape, f)
    _need2("y", y.shape, n, f)
    _need1("mean", mean.shape, stats)
    _need1("invstd", invstd.shape, stats)
    cdef floating* prm = NULL
    cdef floating* prv = NULL
    if running:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required")
        _running_args(n, f, running_mean.shape, running_var.shape, momentum)
        if f:
            prm = &running_mean[0]
            prv = &running_var[0]
    if n == 0 or f == 0:
        return 0
    cdef const floating* px = &x[0, 0]
    cdef const floating* pgamma = &gamma[0]
    cdef const floating* pbeta = &beta[0]
    cdef floating* py = &y[0, 0]
    cdef floating* pmean = &mean[0]
    cdef floating* pinv = &invstd[0]
    with nogil:
        if layer:
            fp_layernorm_forward(n, f, px, pgamma, pbeta, eps, py, pmean, pinv)
        elif running:
            fp_batchnorm_forward_train(n, f, px, pgamma, pbeta, eps, py, pmean, pinv,
                                       momentum, prm, prv)
        else:
            fp_batchnorm_forward(n, f, px, pgamma, pbeta, eps, py, pmean, pinv)
    return 0


cdef int _norm_backward(bint layer, const floating[:, ::1] grad_y, const floating[:, ::1] x,
                        const floating[::1] gamma, const floating[::1] mean,
                        const floating[::1] invstd, floating[:, ::1] grad_x,
                        floating[::1] grad_gamma, floating[::1] grad_beta) except -1:
    cdef int64_t n = x.shape[0], f = x.shape[1]
    cdef int64_t stats = n if layer else f
    if (grad_y is None or gamma is None or mean is None or invstd is None or grad_x is None
            or grad_gamma is None or grad_beta is None):
        raise ValueError("grad_y, gamma, mean, invstd, grad_x, grad_gamma and grad_beta "
                         "are required")
    _need2("grad_y", grad_y.shape, n, f)
    _need1("gamma", gamma.shape, f)
    _need1("mean", mean.shape, stats)
    _need1("invstd", invstd.shape, stats)
    _need2("grad_x", grad_x.shape, n, f)
    _need1("grad_gamma", grad_gamma.shape, f)
    _need1("grad_beta", grad_beta.shape, f)
    if n == 0 or f == 0:
        return 0
    cdef const floating* pgy = &grad_y[0, 0]
    cdef const floating* px = &x[0, 0]
    cdef const floating* pgamma = &gamma[0]
    cdef const floating* pmean = &mean[0]
    cdef const floating* pinv = &invstd[0]
    cdef floating* pgx = &grad_x[0, 0]
    cdef floating* pgg = &grad_gamma[0]
    cdef floating* pgb = &grad_beta[0]
    with nogil:
        if layer:
            fp_layernorm_backward(n, f, pgy, px, pgamma, pmean, pinv, pgx, pgg, pgb)
        else:
            fp_batchnorm_backward(n, f, pgy, px, pgamma, pmean, pinv, pgx, pgg, pgb)
    return 0


cdef int _norm_kinds(int kind, arrays, names) except -1:
    for arr, name in zip(arrays, names):
        _same_kind(arr, kind, name)
    return 0


def batchnorm_forward(x, gamma, beta, double eps, y, mean, invstd):
    """Training-mode batch norm of x (n, f): batch mean and 1/sqrt(var + eps) per column
    into mean/invstd (f,); y = (x - mean) invstd gamma + beta."""
    cdef int kind = _kind(x, "x")
    _norm_kinds(kind, (gamma, beta, y, mean, invstd), ("gamma", "beta", "y", "mean", "invstd"))
    if kind == 4:
        _norm_forward[float](False, x, gamma, beta, eps, y, mean, invstd)
    else:
        _norm_forward[double](False, x, gamma, beta, eps, y, mean, invstd)


def batchnorm_forward_train(x, gamma, beta, double eps, y, mean, invstd, double momentum,
                            running_mean, running_var):
    """batchnorm_forward and then batchnorm_running_update of the same x (n >= 2 rows),
    the column statistics computed once: the same results as the two calls, one pass
    over x fewer.  Every argument is checked before anything is written."""
    cdef int kind = _kind(x, "x")
    _norm_kinds(kind, (gamma, beta, y, mean, invstd, running_mean, running_var),
                ("gamma", "beta", "y", "mean", "invstd", "running_mean", "running_var"))
    if kind == 4:
        _norm_forward[float](False, x, gamma, beta, eps, y, mean, invstd, True, momentum,
                             running_mean, running_var)
    else:
        _norm_forward[double](False, x, gamma, beta, eps, y, mean, invstd, True, momentum,
                              running_mean, running_var)


cdef int _bn_eval(const floating[:, ::1] x, const floating[::1] gamma,
                  const floating[::1] beta, const floating[::1] running_mean,
                  const floating[::1] running_var, double eps, floating[:, ::1] y) except -1:
    cdef int64_t n = x.shape[0], f = x.shape[1]
    if gamma is None or beta is None or running_mean is None or running_var is None or y is None:
        raise ValueError("gamma, beta, running_mean, running_var and y are required")
    _need1("gamma", gamma.shape, f)
    _need1("beta", beta.shape, f)
    _need1("running_mean", running_mean.shape, f)
    _need1("running_var", running_var.shape, f)
    _need2("y", y.shape, n, f)
    if n == 0 or f == 0:
        return 0
    cdef const floating* px = &x[0, 0]
    cdef const floating* pgamma = &gamma[0]
    cdef const floating* pbeta = &beta[0]
    cdef const floating* prm = &running_mean[0]
    cdef const floating* prv = &running_var[0]
    cdef floating* py = &y[0, 0]
    with nogil:
        fp_batchnorm_forward_eval(n, f, px, pgamma, pbeta, prm, prv, eps, py)
    return 0


def batchnorm_forward_eval(x, gamma, beta, running_mean, running_var, double eps, y):
    """Inference-mode batch norm: y = (x - running_mean) / sqrt(running_var + eps)
    gamma + beta."""
    cdef int kind = _kind(x, "x")
    _norm_kinds(kind, (gamma, beta, running_mean, running_var, y),
                ("gamma", "beta", "running_mean", "running_var", "y"))
    if kind == 4:
        _bn_eval[float](x, gamma, beta, running_mean, running_var, eps, y)
    else:
        _bn_eval[double](x, gamma, beta, running_mean, running_var, eps, y)


cdef int _bn_running(const floating[:, ::1] x, double momentum, floating[::1] running_mean,
                     floating[::1] running_var) except -1:
    cdef int64_t n = x.shape[0], f = x.shape[1]
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required")
    _running_args(n, f, running_mean.shape, running_var.shape, momentum)
    if f == 0:
        return 0
    cdef const floating* px = &x[0, 0]
    cdef floating* prm = &running_mean[0]
    cdef floating* prv = &running_var[0]
    with nogil:
        fp_batchnorm_running_update(n, f, px, momentum, prm, prv)
    return 0


def batchnorm_running_update(x, double momentum, running_mean, running_var):
    """Blend x's column mean and unbiased variance (n >= 2 rows, computed in double) into
    the running statistics, in place: r = (1 - momentum) r + momentum stat."""
    cdef int kind = _kind(x, "x")
    _norm_kinds(kind, (running_mean, running_var), ("running_mean", "running_var"))
    if kind == 4:
        _bn_running[float](x, momentum, running_mean, running_var)
    else:
        _bn_running[double](x, momentum, running_mean, running_var)


cdef int _norm_backward_any(bint layer, grad_y, x, gamma, mean, invstd, grad_x, grad_gamma,
                            grad_beta) except -1:
    cdef int kind = _kind(x, "x")
    _norm_kinds(kind, (grad_y, gamma, mean, invstd, grad_x, grad_gamma, grad_beta),
                ("grad_y", "gamma", "mean", "invstd", "grad_x", "grad_gamma", "grad_beta"))
    if kind == 4:
        _norm_backward[float](layer, grad_y, x, gamma, mean, invstd, grad_x, grad_gamma,
                              grad_beta)
    else:
        _norm_backward[double](layer, grad_y, x, gamma, mean, invstd, grad_x, grad_gamma,
                               grad_beta)
    return 0


def batchnorm_backward(grad_y, x, gamma, mean, invstd, grad_x, grad_gamma, grad_beta):
    """Batch-norm backward; grad_gamma/grad_beta accumulate (+=), grad_x is overwritten."""
    _norm_backward_any(False, grad_y, x, gamma, mean, invstd, grad_x, grad_gamma, grad_beta)


def layernorm_forward(x, gamma, beta, double eps, y, mean, invstd):
    """Layer norm of x (n, f) over the last axis; mean/invstd (n,)."""
    cdef int kind = _kind(x, "x")
    _norm_kinds(kind, (gamma, beta, y, mean, invstd), ("gamma", "beta", "y", "mean", "invstd"))
    if kind == 4:
        _norm_forward[float](True, x, gamma, beta, eps, y, mean, invstd)
    else:
        _norm_forward[double](True, x, gamma, beta, eps, y, mean, invstd)


def layernorm_backward(grad_y, x, gamma, mean, invstd, grad_x, grad_gamma, grad_beta):
    """Layer-norm backward; grad_gamma/grad_beta accumulate (+=), grad_x is overwritten."""
    _norm_backward_any(True, grad_y, x, gamma, mean, invstd, grad_x, grad_gamma, grad_beta)


include "_train_step.pxi"
