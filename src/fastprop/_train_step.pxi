# Included by _native.pyx: the whole-training-step kernel (csrc/train_step.cpp).
#
# NativeTrainStep holds a TrainStepPlan for float or double: pointers to the
# parameters, gradients and optimizer state of a chain of dense layers, and per-batch
# -size workspaces (outputs, pre-activations, gradients) allocated once and reused.
# A call checks that every array it points to is still the one it bound (rebinding if
# a Parameter value, gradient or optimizer state array was replaced), fills in the
# batch, the step number and the current hyperparameters, and runs forward, loss,
# backward and update in one C++ call without the GIL.

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.string cimport memset


cdef void* _data_ptr(arr) except NULL:
    """The data pointer of a C-contiguous ndarray whose dtype and flags the caller has
    checked, read through the buffer protocol (``arr.ctypes.data`` builds a ctypes
    object: ~1 us per call, several per training step)."""
    cdef Py_buffer view
    PyObject_GetBuffer(arr, &view, PyBUF_C_CONTIGUOUS)
    cdef void* p = view.buf
    PyBuffer_Release(&view)
    if p == NULL:
        raise ValueError("array has no data pointer")
    return p


cdef struct _BoundArray:
    # what a bound array was when its pointer was taken: the fast path of _bind
    # re-reads it (one buffer request each, ~40 ns) so that an array made read-only,
    # reshaped or resized in place since is bound (and refused) anew
    char* lo
    char* hi
    Py_ssize_t rows
    int ndim
    int flags   # (PyBUF_WRITABLE among them: an array the step writes)


cdef class NativeTrainStep:
    """make_train_step's result for the native backend (see the kernel contract)."""

    cdef TrainStepPlan[float] p32
    cdef TrainStepPlan[double] p64
    cdef DenseLayerPlan[float]* l32
    cdef DenseLayerPlan[double]* l64
    cdef void** ptrs          # 4 * count: params, grads, state1, state2
    cdef int64_t* sizes
    cdef _BoundArray* checks  # nchecks entries, for the arrays in check_arrays
    cdef int nchecks
    cdef object check_arrays  # (a list while _bind records, else a tuple or None)
    cdef int nlayers, count, kind
    cdef object stages, loss, optimizer, state_names, bound, workspaces, dtype, colsums
    cdef object decay_mask
    cdef bint decoupled, busy
    cdef int64_t bound_n
    cdef public object output

    def __cinit__(self):
        self.l32 = NULL
        self.l64 = NULL
        self.ptrs = NULL
        self.sizes = NULL
        self.checks = NULL
        self.nchecks = 0

    def __dealloc__(self):
        PyMem_Free(self.checks)
        PyMem_Free(self.l32)
        PyMem_Free(self.l64)
        PyMem_Free(self.ptrs)
        PyMem_Free(self.sizes)

    @cython.boundscheck(True)  # Python tuples/lists: checked indexing
    def __init__(self, stages, loss, optimizer, int loss_kind, int opt_kind):
        cdef int i
        self.stages = list(stages)
        self.loss = loss
        self.optimizer = optimizer
        self.nlayers = len(self.stages)
        self.count = len(optimizer.params)
        self.dtype = self.stages[0].weight.value.dtype
        self.kind = self.dtype.itemsize
        self.workspaces = {}
        for l, st in enumerate(self.stages):  # before any shape[1] below
            if st.weight.value.ndim != 2:
                raise ValueError(f"layer {l}: weight must be 2-D, got shape "
                                 f"{st.weight.value.shape}")
        self.colsums = [np.zeros(st.weight.value.shape[1], np.float64) for st in self.stages]
        self.bound = None
        self.bound_n = -1
        self.output = None
        memset(&self.p32, 0, sizeof(self.p32))
        memset(&self.p64, 0, sizeof(self.p64))
        if self.kind == 4:
            self.l32 = <DenseLayerPlan[float]*>PyMem_Malloc(
                self.nlayers * sizeof(DenseLayerPlan[float]))
            if self.l32 == NULL:
                raise MemoryError()
            memset(self.l32, 0, self.nlayers * sizeof(DenseLayerPlan[float]))
        else:
            self.l64 = <DenseLayerPlan[double]*>PyMem_Malloc(
                self.nlayers * sizeof(DenseLayerPlan[double]))
            if self.l64 == NULL:
                raise MemoryError()
            memset(self.l64, 0, self.nlayers * sizeof(DenseLayerPlan[double]))
        self.ptrs = <void**>PyMem_Malloc(4 * self.count * sizeof(void*))
        self.sizes = <int64_t*>PyMem_Malloc(self.count * sizeof(int64_t))
        if self.ptrs == NULL or self.sizes == NULL:
            raise MemoryError()
        memset(self.ptrs, 0, 4 * self.count * sizeof(void*))
        for i in range(self.count):
            self.sizes[i] = optimizer.params[i].value.size
        self.p32.loss = self.p64.loss = loss_kind
        self.p32.opt.kind = self.p64.opt.kind = opt_kind
        self.p32.layers = self.p64.layers = self.nlayers
        self.p32.layer = self.l32
        self.p64.layer = self.l64
        self.p32.opt.count = self.p64.opt.count = self.count
        self.p32.opt.params = <float**>self.ptrs
        self.p64.opt.params = <double**>self.ptrs
        self.p32.opt.grads = <const float**>(self.ptrs + self.count)
        self.p64.opt.grads = <const double**>(self.ptrs + self.count)
        self.p32.opt.sizes = self.p64.opt.sizes = self.sizes

    @property
    def checks_x(self):
        """The kernel refuses NaN/inf in x itself (status 4)."""
        return True

    @property
    def clips(self):
        """The kernel clips the gradients itself (clip_value, clip_norm arguments)."""
        return True

    @property
    def checks_labels(self):
        """Class ids outside [0, classes) are refused before anything runs."""
        return True

    def sync(self):
        """Nothing to copy: the native step works on the host arrays in place."""

    cdef void* _ptr(self, arr, str name, bint writable) except NULL:
        if (not isinstance(arr, np.ndarray) or arr.dtype != self.dtype
                or not arr.flags.c_contiguous or (writable and not arr.flags.writeable)):
            raise ValueError(f"{name} must be a writable C-contiguous {self.dtype} array")
        if type(self.check_arrays) is list:  # (recording, in _bind)
            self.check_arrays.append((arr, writable))
        return _data_ptr(arr)

    cdef int _record_checks(self) except -1:
        """Note each array _bind took a pointer to, as it is now (see _BoundArray)."""
        cdef Py_buffer view
        cdef int j, n
        seen = {}  # (an array bound twice, as a layer's and as a parameter, once)
        for arr, writable in self.check_arrays:
            seen[id(arr)] = (arr, writable or seen.get(id(arr), (None, False))[1])
        self.check_arrays = list(seen.values())
        n = len(self.check_arrays)
        PyMem_Free(self.checks)
        self.nchecks = 0
        self.checks = <_BoundArray*>PyMem_Malloc(max(n, 1) * sizeof(_BoundArray))
        if self.checks == NULL:
            self.check_arrays = None
            raise MemoryError()
        arrays = []
        for j in range(n):
            arr, writable = self.check_arrays[j]
            self.checks[j].flags = PyBUF_C_CONTIGUOUS | (PyBUF_WRITABLE if writable else 0)
            PyObject_GetBuffer(arr, &view, self.checks[j].flags)
            self.checks[j].lo = <char*>view.buf
            self.checks[j].hi = <char*>view.buf + view.len
            self.checks[j].ndim = view.ndim
            self.checks[j].rows = view.shape[0] if view.ndim else 1
            PyBuffer_Release(&view)
            arrays.append(arr)
        self.check_arrays = tuple(arrays)
        self.nchecks = n
        return 0

    @cython.boundscheck(True)  # Python tuples/lists: checked indexing
    cdef bint _unchanged(self):
        """Whether every bound array still has the pointer, size, shape, contiguity
        and (where written) writability it had when bound."""
        cdef Py_buffer view
        cdef int j
        cdef bint same
        if self.check_arrays is None:
            return False
        for j in range(self.nchecks):
            try:
                PyObject_GetBuffer(self.check_arrays[j], &view, self.checks[j].flags)
            except Exception:
                return False
            same = (<char*>view.buf == self.checks[j].lo
                    and <char*>view.buf + view.len == self.checks[j].hi
                    and view.ndim == self.checks[j].ndim
                    and (view.ndim == 0 or view.shape[0] == self.checks[j].rows))
            PyBuffer_Release(&view)
            if not same:
                return False
        return True

    cdef bint _aliased(self, arr, int64_t n):
        """Whether arr (C-contiguous) shares memory with an array the step writes: a
        gradient, a parameter or optimizer state (x given as a weight's .grad, zeroed
        first), or this batch size's workspace (``step.output`` given back as x or as
        the target would be overwritten by the forward before it is read)."""
        cdef Py_buffer view
        cdef int j, l, k
        cdef char* lo
        cdef char* hi
        cdef char* bufs[3]
        cdef Py_ssize_t span
        PyObject_GetBuffer(arr, &view, PyBUF_C_CONTIGUOUS)
        lo = <char*>view.buf
        hi = lo + view.len
        PyBuffer_Release(&view)
        for j in range(self.nchecks):
            if (self.checks[j].flags & PyBUF_WRITABLE and lo < self.checks[j].hi
                    and self.checks[j].lo < hi):
                return True
        for l in range(self.nlayers):
            if self.kind == 4:
                span = n * self.l32[l].n_out * 4
                bufs[0] = <char*>self.l32[l].y
                bufs[1] = <char*>self.l32[l].g
                bufs[2] = <char*>self.l32[l].z
            else:
                span = n * self.l64[l].n_out * 8
                bufs[0] = <char*>self.l64[l].y
                bufs[1] = <char*>self.l64[l].g
                bufs[2] = <char*>self.l64[l].z
            for k in range(3):
                if bufs[k] != NULL and lo < bufs[k] + span and bufs[k] < hi:
                    return True
        return False

    @cython.boundscheck(True)  # Python tuples/lists: checked indexing
    cdef list _current(self):
        """Every array the plan points to, in binding order (creating missing
        optimizer state the way Optimizer.step does)."""
        opt = self.optimizer
        names = opt.state_names
        # the pointer tables hold self.count entries per list
        if len(opt.params) != self.count or len(opt.state) != self.count:
            raise ValueError(f"the optimizer's parameter or state list changed length "
                             f"({len(opt.params)}/{len(opt.state)}, built for {self.count})")
        arrays = []
        for st in self.stages:
            arrays += [st.weight.value, st.weight.grad]
            if st.bias is not None:
                arrays += [st.bias.value, st.bias.grad]
        for i, p in enumerate(opt.params):
            state = opt.state[i]
            for key in names:
                if key not in state:
                    state[key] = np.zeros_like(p.value)
            arrays += [p.value, p.grad] + [state[key] for key in names]
        arrays.append(opt._lag)  # (per-parameter steps sat out; None: none)
        return arrays

    @cython.boundscheck(True)  # Python tuples/lists: checked indexing
    cdef int _bind(self) except -1:
        cdef int i, l
        arrays = self._current()
        if self.bound is not None and len(arrays) == len(self.bound):
            for i in range(len(arrays)):
                if arrays[i] is not self.bound[i]:
                    break
            else:
                if self._unchanged():
                    return 0
        self.bound = None
        self.check_arrays = []  # (_ptr records what it is given)
        try:
            self._bind_arrays(arrays)
            self._record_checks()
        except BaseException:
            self.check_arrays = None
            raise
        self.bound = arrays
        self.bound_n = -1
        return 0

    @cython.boundscheck(True)  # Python tuples/lists: checked indexing
    cdef int _bind_arrays(self, list arrays) except -1:
        cdef int i, l
        opt = self.optimizer
        names = tuple(opt.state_names)
        for l, st in enumerate(self.stages):
            w, b = st.weight, st.bias
            if w.value.shape != w.grad.shape or w.value.ndim != 2:
                raise ValueError(f"layer {l}: weight and its gradient must be 2-D and alike")
            if b is not None and (b.value.shape != (w.value.shape[1],)
                                  or b.grad.shape != b.value.shape):
                raise ValueError(f"layer {l}: bias must have shape ({w.value.shape[1]},)")
            if self.colsums[l].shape != (w.value.shape[1],):
                raise ValueError(f"layer {l} changed width since the step was compiled")
            if self.kind == 4:
                self.l32[l].n_in = w.value.shape[0]
                self.l32[l].n_out = w.value.shape[1]
                self.l32[l].w = <const float*>self._ptr(w.value, "weight", False)
                self.l32[l].gw = <float*>self._ptr(w.grad, "weight.grad", True)
                self.l32[l].b = <const float*>(self._ptr(b.value, "bias", False) if b is not None else NULL)
                self.l32[l].gb = <float*>(self._ptr(b.grad, "bias.grad", True) if b is not None else NULL)
                self.l32[l].act = st.act
                self.l32[l].alpha = st.alpha
                self.l32[l].colsum = <double*>_data_ptr(self.colsums[l])
            else:
                self.l64[l].n_in = w.value.shape[0]
                self.l64[l].n_out = w.value.shape[1]
                self.l64[l].w = <const double*>self._ptr(w.value, "weight", False)
                self.l64[l].gw = <double*>self._ptr(w.grad, "weight.grad", True)
                self.l64[l].b = <const double*>(self._ptr(b.value, "bias", False) if b is not None else NULL)
                self.l64[l].gb = <double*>(self._ptr(b.grad, "bias.grad", True) if b is not None else NULL)
                self.l64[l].act = st.act
                self.l64[l].alpha = st.alpha
                self.l64[l].colsum = <double*>_data_ptr(self.colsums[l])
        index = {id(q): i for i, q in enumerate(opt.params)}
        for l, st in enumerate(self.stages):
            wi = index.get(id(st.weight), -1)
            bi = index.get(id(st.bias), -1) if st.bias is not None else -1
            if self.kind == 4:
                self.l32[l].w_index, self.l32[l].b_index = wi, bi
            else:
                self.l64[l].w_index, self.l64[l].b_index = wi, bi
        for l in range(1, self.nlayers):
            if self.stages[l].weight.value.shape[0] != self.stages[l - 1].weight.value.shape[1]:
                raise ValueError(f"layer {l} expects {self.stages[l].weight.value.shape[0]} "
                                 f"inputs, layer {l - 1} gives {self.stages[l - 1].weight.value.shape[1]}")
        for i, p in enumerate(opt.params):
            if p.value.size != self.sizes[i] or p.grad.shape != p.value.shape:
                raise ValueError(f"params[{i}] changed size or its gradient does not match")
            self.ptrs[i] = self._ptr(p.value, f"params[{i}]", True)
            self.ptrs[self.count + i] = self._ptr(p.grad, f"params[{i}].grad", False)
            for k in range(2):
                if k < len(names):
                    s = opt.state[i][names[k]]
                    if s.shape != p.value.shape:
                        raise ValueError(f"optimizer state {names[k]!r} of params[{i}] has "
                                         f"shape {s.shape}, expected {p.value.shape}")
                    self.ptrs[(2 + k) * self.count + i] = self._ptr(s, names[k], True)
                else:
                    self.ptrs[(2 + k) * self.count + i] = NULL
        has1 = len(names) >= 1
        has2 = len(names) >= 2
        self.p32.opt.state1 = <float**>(self.ptrs + 2 * self.count) if has1 else NULL
        self.p64.opt.state1 = <double**>(self.ptrs + 2 * self.count) if has1 else NULL
        self.p32.opt.state2 = <float**>(self.ptrs + 3 * self.count) if has2 else NULL
        self.p64.opt.state2 = <double**>(self.ptrs + 3 * self.count) if has2 else NULL
        # the optional per-parameter weight-decay mask (uint8, 0: no decay; absent or
        # None: decay on every parameter), read when the arrays are bound (not looked
        # up on every call: a missed attribute costs ~1 us through __getattr__)
        mask = getattr(opt, "_decay_mask", None)  # (fastprop.sklearn's)
        if mask is not None and (not isinstance(mask, np.ndarray) or mask.dtype != np.uint8
                                 or mask.shape != (self.count,) or not mask.flags.c_contiguous):
            raise ValueError(f"decay_mask must be a C-contiguous uint8 array of shape "
                             f"({self.count},), got {getattr(mask, 'shape', None)} / "
                             f"{getattr(mask, 'dtype', None)}")
        self.p32.opt.decay = self.p64.opt.decay = (
            <const unsigned char*>_data_ptr(mask) if mask is not None else NULL)
        self.decay_mask = mask
        # the steps each parameter sat out while frozen (int64; its own step count is
        # step - lag, for Adam's bias corrections); updated in place by Optimizer.step
        lag = opt._lag
        if lag is not None and (not isinstance(lag, np.ndarray) or lag.dtype != _I64
                                or lag.shape != (self.count,) or not lag.flags.c_contiguous):
            raise ValueError(f"the optimizer's step lags must be a C-contiguous int64 array "
                             f"of shape ({self.count},)")
        self.p32.opt.lag = self.p64.opt.lag = (
            <const int64_t*>_data_ptr(lag) if lag is not None and self.count > 0 else NULL)
        # options read once per binding, like the mask (missing attributes are slow);
        # the loss's options (half, from_logits, clip) are read on every call
        self.p32.grad_scale = self.p64.grad_scale = getattr(self.loss, "grad_scale", 1.0)
        self.decoupled = getattr(opt, "decoupled", False)
        return 0

    @cython.boundscheck(True)  # Python tuples/lists: checked indexing
    cdef int _workspace(self, int64_t n) except -1:
        cdef int l
        if n == self.bound_n:
            return 0
        ws = self.workspaces.get(n)
        if ws is None:
            # buffers for the last two batch sizes (fit's full batches and its last,
            # smaller one): a loop over ever new sizes does not keep them all
            if len(self.workspaces) >= 2:
                self.workspaces.pop(next(iter(self.workspaces)))
            ws = []
            for st in self.stages:
                out = st.weight.value.shape[1]
                y = np.empty((n, out), self.dtype)
                g = np.empty((n, out), self.dtype)
                z = (np.empty((n, out), self.dtype)
                     if st.act == ACT_GELU or st.act == ACT_GELU_ERF else None)
                ws.append((y, z, g))
            self.workspaces[n] = ws
        for l in range(self.nlayers):
            y, z, g = ws[l]
            if self.kind == 4:
                self.l32[l].y = <float*>self._ptr(y, "y", True)
                self.l32[l].g = <float*>self._ptr(g, "g", True)
                self.l32[l].z = <float*>(self._ptr(z, "z", True) if z is not None else NULL)
            else:
                self.l64[l].y = <double*>self._ptr(y, "y", True)
                self.l64[l].g = <double*>self._ptr(g, "g", True)
                self.l64[l].z = <double*>(self._ptr(z, "z", True) if z is not None else NULL)
        self.bound_n = n
        self.output = ws[self.nlayers - 1][0]
        return 0

    def _after_fork(self):
        """In a fork child, where no thread is inside the kernel: a parent thread's
        call in progress at the fork left ``busy`` set."""
        self.busy = False

    def __call__(self, x, y, bint check_finite=False, bint check_x=True,
                 double clip_value=0.0, double clip_norm=0.0):
        """Forward, loss, backward and update on batch (x, y); returns the loss.
        check_x=False skips the NaN/inf check of x (the caller validated X).

        One call at a time: the plan (batch size, workspace pointers) is shared, and
        the kernel runs without the GIL, so a second thread's call is refused
        (RuntimeError) rather than let it rebind the buffers under the first."""
        if self.busy:
            raise RuntimeError("this compiled step is already running in another thread: "
                               "a compiled step (and its model) trains on one thread at a "
                               "time; give each thread its own model")
        if not (clip_value >= 0.0 and clip_norm >= 0.0):  # (NaN too)
            raise ValueError(f"clip_value and clip_norm must be >= 0 (0: none), got "
                             f"{clip_value} and {clip_norm}")
        self.busy = True
        try:
            return self._run(x, y, check_finite, check_x, clip_value, clip_norm)
        finally:
            self.busy = False

    @cython.boundscheck(True)  # Python tuples/lists: checked indexing
    cdef double _run(self, x, y, bint check_finite, bint check_x, double clip_value,
                     double clip_norm) except? -1.0:
        cdef int status = 0
        cdef double loss
        cdef int64_t n, n_in, n_out
        self._bind()
        n_in = self.stages[0].weight.value.shape[0]
        n_out = self.stages[self.nlayers - 1].weight.value.shape[1]
        if (not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != n_in
                or x.dtype != self.dtype or not x.flags.c_contiguous or x.shape[0] < 1):
            raise ValueError(f"x must be a C-contiguous {self.dtype} array of shape (n >= 1, "
                             f"{n_in}), got {getattr(x, 'shape', None)}")
        n = x.shape[0]
        labels = targets = None
        if isinstance(y, tuple):
            labels, targets = y
        else:
            targets = y
        if labels is not None:
            if (not isinstance(labels, np.ndarray) or labels.dtype != _I64
                    or labels.shape != (n,) or not labels.flags.c_contiguous):
                raise ValueError(f"labels must be a C-contiguous int64 array of shape ({n},)")
        elif (not isinstance(targets, np.ndarray) or targets.shape != (n, n_out)
                or targets.dtype != self.dtype or not targets.flags.c_contiguous):
            raise ValueError(f"targets must be a C-contiguous {self.dtype} array of shape "
                             f"({n}, {n_out})")
        self._workspace(n)
        if self._aliased(x, n):
            x = x.copy()
        if targets is not None and self._aliased(targets, n):
            targets = targets.copy()
        opt = self.optimizer
        h = opt.hyper
        step = opt.step_count + 1
        betas = h.get("betas", (0.9, 0.999))
        loss_obj = self.loss
        cdef bint half = getattr(loss_obj, "half", False)
        cdef bint from_logits = getattr(loss_obj, "from_logits", False)
        cdef double clip = getattr(loss_obj, "clip", 0.0)
        if self.kind == 4:
            self.p32.n = n
            self.p32.x = <const float*>self._ptr(x, "x", False)
            self.p32.labels = <const int64_t*>_data_ptr(labels) if labels is not None else NULL
            self.p32.targets = <const float*>self._ptr(targets, "targets", False) if targets is not None else NULL
            self.p32.half = half
            self.p32.from_logits = from_logits
            self.p32.loss_clip = clip
            self.p32.check_finite = check_finite
            self.p32.check_x = check_x
            self.p32.clip_value = clip_value
            self.p32.clip_norm = clip_norm
            _fill_opt32(&self.p32.opt, h, step, betas, self.decoupled)
            with nogil:
                loss = fp_train_step(self.p32, &status)
        else:
            self.p64.n = n
            self.p64.x = <const double*>self._ptr(x, "x", False)
            self.p64.labels = <const int64_t*>_data_ptr(labels) if labels is not None else NULL
            self.p64.targets = <const double*>self._ptr(targets, "targets", False) if targets is not None else NULL
            self.p64.half = half
            self.p64.from_logits = from_logits
            self.p64.loss_clip = clip
            self.p64.check_finite = check_finite
            self.p64.check_x = check_x
            self.p64.clip_value = clip_value
            self.p64.clip_norm = clip_norm
            _fill_opt64(&self.p64.opt, h, step, betas, self.decoupled)
            with nogil:
                loss = fp_train_step(self.p64, &status)
        if status == 4:  # (the message of _checks.check_finite)
            from fastprop._checks import check_finite as _check_finite_array
            _check_finite_array(x, "x")
            raise ValueError("x must be finite, got NaN or inf")
        if status == 3:  # (the message of _checks.class_labels)
            raise ValueError(f"labels must lie in [0, {n_out}) for {n_out} classes, got "
                             f"values in [{labels.min()}, {labels.max()}]")
        if status == 1:  # (NaN, inf, or above the dtype's range)
            from fastprop.backends import check_loss
            check_loss(loss, self.dtype)
            raise AssertionError(f"status 1 for loss {loss}")  # pragma: no cover
        if status == 2:
            from fastprop.backends import NonFiniteError
            raise NonFiniteError("non-finite gradient")
        opt.step_count = step
        return loss


cdef int _fill_opt32(OptimizerPlan[float]* o, dict h, int64_t step, betas, bint decoupled) except -1:
    o.step = step
    o.lr = h["lr"]
    o.beta1 = betas[0]
    o.beta2 = betas[1]
    o.eps = h.get("eps", 0.0)
    o.weight_decay = h.get("weight_decay", 0.0)
    o.momentum = h.get("momentum", 0.0)
    o.alpha = h.get("alpha", 0.99)
    o.nesterov = h.get("nesterov", False)
    o.decoupled = decoupled
    return 0


cdef int _fill_opt64(OptimizerPlan[double]* o, dict h, int64_t step, betas, bint decoupled) except -1:
    o.step = step
    o.lr = h["lr"]
    o.beta1 = betas[0]
    o.beta2 = betas[1]
    o.eps = h.get("eps", 0.0)
    o.weight_decay = h.get("weight_decay", 0.0)
    o.momentum = h.get("momentum", 0.0)
    o.alpha = h.get("alpha", 0.99)
    o.nesterov = h.get("nesterov", False)
    o.decoupled = decoupled
    return 0


cdef class _ArrayLists:
    """Buffers of up to four parallel lists of arrays (params, grads, two states),
    held for one call; pointer tables for an OptimizerPlan."""
    cdef Py_buffer* views
    cdef void** ptrs
    cdef int64_t* sizes
    cdef Py_ssize_t count, held

    def __cinit__(self, Py_ssize_t count):
        self.count = count
        self.held = 0
        self.views = <Py_buffer*>PyMem_Malloc(4 * count * sizeof(Py_buffer) + 1)
        self.ptrs = <void**>PyMem_Malloc(4 * count * sizeof(void*) + 1)
        self.sizes = <int64_t*>PyMem_Malloc(count * sizeof(int64_t) + 1)
        if self.views == NULL or self.ptrs == NULL or self.sizes == NULL:
            raise MemoryError()
        memset(self.ptrs, 0, 4 * count * sizeof(void*))

    def __dealloc__(self):
        while self.held > 0:
            self.held -= 1
            PyBuffer_Release(&self.views[self.held])
        PyMem_Free(self.views)
        PyMem_Free(self.ptrs)
        PyMem_Free(self.sizes)

    cdef int take(self, int slot, seq, int kind, bint writable, str name) except -1:
        """Hold seq[i] for every i as pointer slot*count + i; shapes must match params."""
        cdef Py_ssize_t i
        cdef Py_buffer* v
        cdef int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT
        if writable:
            flags |= PyBUF_WRITABLE
        if len(seq) != self.count:
            raise ValueError(f"{name} must have {self.count} arrays (one per parameter), "
                             f"got {len(seq)}")
        for i in range(self.count):
            obj = seq[i]
            _same_kind(obj, kind, f"{name}[{i}]")
            v = &self.views[self.held]
            try:
                PyObject_GetBuffer(obj, v, flags)
            except (BufferError, ValueError) as exc:
                raise ValueError(f"{name}[{i}]: {exc}") from None
            self.held += 1
            if v.itemsize != kind:
                raise TypeError(f"{name}[{i}] must have {kind}-byte floats, "
                                f"got itemsize {v.itemsize}")
            if slot <= 0:  # -1: a plain list of arrays (no shapes to match)
                self.sizes[i] = _size(v)
            elif slot > 0 and _size(v) != self.sizes[i]:
                raise ValueError(f"{name}[{i}] must have the shape of params[{i}]")
            if slot > 0 and not _same_buffer_shape(v, &self.views[i]):
                raise ValueError(f"{name}[{i}] must have the shape of params[{i}], "
                                 f"{_fmt(self.views[i].shape, self.views[i].ndim)}, got "
                                 f"{_fmt(v.shape, v.ndim)}")
            self.ptrs[(slot if slot > 0 else 0) * self.count + i] = v.buf
        return 0


cdef bint _same_buffer_shape(Py_buffer* a, Py_buffer* b) noexcept:
    cdef int i
    if a.ndim != b.ndim:
        return False
    for i in range(a.ndim):
        if a.shape[i] != b.shape[i]:
            return False
    return True


cdef int _optimizer_lists(int opt_kind, params, grads, s1, s2, int64_t step, double lr,
                          double beta1, double beta2, double eps, double weight_decay,
                          double momentum, double alpha, bint nesterov,
                          bint decoupled) except -1:
    """Every parameter in one optimizer_update call (one parallel region)."""
    cdef Py_ssize_t count = len(params)
    if count == 0:
        return 0
    cdef int kind = _kind(params[0], "params[0]")
    cdef _ArrayLists lists = _ArrayLists(count)
    cdef OptimizerPlan[float] o32
    cdef OptimizerPlan[double] o64
    lists.take(0, params, kind, True, "params")
    lists.take(1, grads, kind, False, "grads")
    if s1 is not None:
        lists.take(2, s1, kind, True, "state")
    if s2 is not None:
        lists.take(3, s2, kind, True, "state")
    memset(&o32, 0, sizeof(o32))
    memset(&o64, 0, sizeof(o64))
    if kind == 4:
        o32.kind = opt_kind
        o32.count = count
        o32.params = <float**>lists.ptrs
        o32.grads = <const float**>(lists.ptrs + count)
        o32.state1 = <float**>(lists.ptrs + 2 * count) if s1 is not None else NULL
        o32.state2 = <float**>(lists.ptrs + 3 * count) if s2 is not None else NULL
        o32.sizes = lists.sizes
        o32.step = step
        o32.lr, o32.beta1, o32.beta2, o32.eps = lr, beta1, beta2, eps
        o32.weight_decay, o32.momentum, o32.alpha = weight_decay, momentum, alpha
        o32.nesterov, o32.decoupled = nesterov, decoupled
        with nogil:
            fp_optimizer_update(o32)
    else:
        o64.kind = opt_kind
        o64.count = count
        o64.params = <double**>lists.ptrs
        o64.grads = <const double**>(lists.ptrs + count)
        o64.state1 = <double**>(lists.ptrs + 2 * count) if s1 is not None else NULL
        o64.state2 = <double**>(lists.ptrs + 3 * count) if s2 is not None else NULL
        o64.sizes = lists.sizes
        o64.step = step
        o64.lr, o64.beta1, o64.beta2, o64.eps = lr, beta1, beta2, eps
        o64.weight_decay, o64.momentum, o64.alpha = weight_decay, momentum, alpha
        o64.nesterov, o64.decoupled = nesterov, decoupled
        with nogil:
            fp_optimizer_update(o64)
    return 0


def clip_grad_norm_(arrays, double max_norm):
    """Global-norm clipping of every array in one C++ call (reduce, then scale);
    returns the norm before clipping."""
    cdef Py_ssize_t count = len(arrays)
    cdef double norm
    if count == 0:
        return 0.0
    cdef int kind = _kind(arrays[0], "arrays[0]")
    cdef _ArrayLists lists = _ArrayLists(count)
    lists.take(0, arrays, kind, True, "arrays")
    with nogil:
        if kind == 4:
            norm = fp_clip_grad_norm(count, <float**>lists.ptrs, lists.sizes, max_norm)
        else:
            norm = fp_clip_grad_norm(count, <double**>lists.ptrs, lists.sizes, max_norm)
    return norm
