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


cdef class NativeTrainStep:
    """make_train_step's result for the native backend (see the kernel contract)."""

    cdef TrainStepPlan[float] p32
    cdef TrainStepPlan[double] p64
    cdef DenseLayerPlan[float]* l32
    cdef DenseLayerPlan[double]* l64
    cdef void** ptrs          # 4 * count: params, grads, state1, state2
    cdef int64_t* sizes
    cdef int nlayers, count, kind
    cdef object stages, loss, optimizer, state_names, bound, workspaces, dtype
    cdef int64_t bound_n
    cdef public object output

    def __cinit__(self):
        self.l32 = NULL
        self.l64 = NULL
        self.ptrs = NULL
        self.sizes = NULL

    def __dealloc__(self):
        PyMem_Free(self.l32)
        PyMem_Free(self.l64)
        PyMem_Free(self.ptrs)
        PyMem_Free(self.sizes)

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

    def sync(self):
        """Nothing to copy: the native step works on the host arrays in place."""

    cdef void* _ptr(self, arr, str name, bint writable) except NULL:
        if (not isinstance(arr, np.ndarray) or arr.dtype != self.dtype
                or not arr.flags.c_contiguous or (writable and not arr.flags.writeable)):
            raise ValueError(f"{name} must be a writable C-contiguous {self.dtype} array")
        return <void*><size_t>arr.ctypes.data

    cdef list _current(self):
        """Every array the plan points to, in binding order (creating missing
        optimizer state the way Optimizer.step does)."""
        opt = self.optimizer
        names = opt.state_names
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
        return arrays

    cdef int _bind(self) except -1:
        cdef int i, l
        arrays = self._current()
        if self.bound is not None and len(arrays) == len(self.bound):
            for i in range(len(arrays)):
                if arrays[i] is not self.bound[i]:
                    break
            else:
                return 0
        opt = self.optimizer
        names = tuple(opt.state_names)
        for l, st in enumerate(self.stages):
            w, b = st.weight, st.bias
            if w.value.shape != w.grad.shape or w.value.ndim != 2:
                raise ValueError(f"layer {l}: weight and its gradient must be 2-D and alike")
            if b is not None and (b.value.shape != (w.value.shape[1],)
                                  or b.grad.shape != b.value.shape):
                raise ValueError(f"layer {l}: bias must have shape ({w.value.shape[1]},)")
            if self.kind == 4:
                self.l32[l].n_in = w.value.shape[0]
                self.l32[l].n_out = w.value.shape[1]
                self.l32[l].w = <const float*>self._ptr(w.value, "weight", False)
                self.l32[l].gw = <float*>self._ptr(w.grad, "weight.grad", True)
                self.l32[l].b = <const float*>(self._ptr(b.value, "bias", False) if b is not None else NULL)
                self.l32[l].gb = <float*>(self._ptr(b.grad, "bias.grad", True) if b is not None else NULL)
                self.l32[l].act = st.act
                self.l32[l].alpha = st.alpha
            else:
                self.l64[l].n_in = w.value.shape[0]
                self.l64[l].n_out = w.value.shape[1]
                self.l64[l].w = <const double*>self._ptr(w.value, "weight", False)
                self.l64[l].gw = <double*>self._ptr(w.grad, "weight.grad", True)
                self.l64[l].b = <const double*>(self._ptr(b.value, "bias", False) if b is not None else NULL)
                self.l64[l].gb = <double*>(self._ptr(b.grad, "bias.grad", True) if b is not None else NULL)
                self.l64[l].act = st.act
                self.l64[l].alpha = st.alpha
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
        self.bound = arrays
        self.bound_n = -1
        return 0

    cdef int _workspace(self, int64_t n) except -1:
        cdef int l
        if n == self.bound_n:
            return 0
        ws = self.workspaces.get(n)
        if ws is None:
            ws = []
            for st in self.stages:
                out = st.weight.value.shape[1]
                y = np.empty((n, out), self.dtype)
                g = np.empty((n, out), self.dtype)
                z = np.empty((n, out), self.dtype) if st.act == ACT_GELU else None
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

    def __call__(self, x, y, bint check_finite=False):
        """Forward, loss, backward and update on batch (x, y); returns the loss."""
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
        opt = self.optimizer
        h = opt.hyper
        step = opt.step_count + 1
        betas = h.get("betas", (0.9, 0.999))
        if self.kind == 4:
            self.p32.n = n
            self.p32.x = <const float*>self._ptr(x, "x", False)
            self.p32.labels = <const int64_t*><size_t>labels.ctypes.data if labels is not None else NULL
            self.p32.targets = <const float*>self._ptr(targets, "targets", False) if targets is not None else NULL
            self.p32.half = getattr(self.loss, "half", False)
            self.p32.from_logits = getattr(self.loss, "from_logits", False)
            self.p32.check_finite = check_finite
            _fill_opt32(&self.p32.opt, h, step, betas, getattr(opt, "decoupled", False))
            with nogil:
                loss = fp_train_step(self.p32, &status)
        else:
            self.p64.n = n
            self.p64.x = <const double*>self._ptr(x, "x", False)
            self.p64.labels = <const int64_t*><size_t>labels.ctypes.data if labels is not None else NULL
            self.p64.targets = <const double*>self._ptr(targets, "targets", False) if targets is not None else NULL
            self.p64.half = getattr(self.loss, "half", False)
            self.p64.from_logits = getattr(self.loss, "from_logits", False)
            self.p64.check_finite = check_finite
            _fill_opt64(&self.p64.opt, h, step, betas, getattr(opt, "decoupled", False))
            with nogil:
                loss = fp_train_step(self.p64, &status)
        if status == 3:
            raise ValueError(f"labels must lie in [0, {n_out})")
        if status == 1:
            from fastprop.backends import NonFiniteError
            raise NonFiniteError(f"non-finite loss {loss}")
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
