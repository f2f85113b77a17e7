"""The Numba CUDA backend (``fp.set_backend("cuda")``, ``model.to("cuda")``).

Two ways in:

* The kernel contract of :mod:`fastprop.backends` on host (NumPy) arrays: each call
  copies its inputs to the GPU, runs the kernels of
  :mod:`fastprop.backends.cuda_kernels` and copies its outputs back.  This is what
  layer-by-layer code and ``predict`` use; it is correct for every layer but pays a
  transfer per call.
* ``make_train_step``: a whole training step of a dense chain (every activation, the
  three losses, every optimizer) whose parameters, gradients, optimizer state and
  workspaces live on the GPU.  A step copies the batch in and the loss (and, when
  asked for, the output) out; ``sync()`` copies parameters, gradients and state back
  into the host arrays, in place.

numba is imported only by :func:`ensure_available`, which raises
:class:`~fastprop.backends.BackendUnavailableError` saying whether numba-cuda or a
GPU is missing (the CUDA simulator, ``NUMBA_ENABLE_CUDASIM=1``, counts as a GPU).

CUDA does not survive ``os.fork()``: in a child forked after this process used the
backend, every call refuses with BackendUnavailableError (multiprocessing's "spawn"
or "forkserver" start methods work).  Before the fork, the parent's device training
steps copy their parameters and optimizer state into the host arrays, so the child's
``model.to("cpu")`` goes on from them.  (The simulator is held to the same rule.)
"""

from __future__ import annotations

import math
import os
import threading
import weakref

import numpy as np

from . import ACTIVATIONS, PREACT_ACTIVATIONS, BackendUnavailableError, NonFiniteError, check_loss
from . import cuda_support
from .numpy import _check_features, _check_linear  # (the host kernels' refusals)
from .numpy import batchnorm_running_update  # noqa: F401  (host arrays: run on the host)

name = "cuda"

_K = None      # fastprop.backends.cuda_kernels, once ensure_available() succeeded
_cuda = None   # numba.cuda
_FORKED = None  # the refusal's text in a fork child of a process that used the backend

_IDENTITY = ACTIVATIONS["identity"]
_SIGMOID = ACTIVATIONS["sigmoid"]
_SOFTMAX = ACTIVATIONS["softmax"]


def ensure_available():
    """Import numba-cuda and the kernels, or raise BackendUnavailableError saying
    which of numba-cuda and a CUDA GPU is missing."""
    global _K, _cuda
    if _FORKED is not None:
        raise BackendUnavailableError(_FORKED)
    if _K is None:
        why = cuda_support.problem()
        if why is not None:
            raise BackendUnavailableError(f"the cuda backend is unavailable: {why}")
        from numba import cuda

        from . import cuda_kernels
        _cuda, _K = cuda, cuda_kernels
    return _K


def _after_fork_in_child():
    global _FORKED
    if _K is not None:  # (a parent that never used the backend leaves CUDA usable)
        _FORKED = (
            "the cuda backend is unavailable in this process: it is a fork child "
            "(os.fork, multiprocessing's 'fork' start method) of a process that had "
            "initialised CUDA, which does not survive a fork; start workers with "
            "multiprocessing.get_context('spawn') or 'forkserver'.  Models trained on "
            "the GPU in the parent hold its values here: model.to('cpu') goes on from them")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def get_num_threads() -> int:
    return 1


def set_num_threads(n: int) -> None:  # the GPU's parallelism is not set in threads
    pass


def config() -> dict:
    info = {"device": cuda_support.availability()}
    try:
        from importlib.metadata import version
        info["numba-cuda"] = version("numba-cuda")
    except Exception:  # not installed from a distribution (or an old numba)
        pass
    return info


# --------------------------------------------------------------------- host <-> device
def _dev(a):
    return _cuda.to_device(np.ascontiguousarray(a))


def _empty(like):
    return _cuda.device_array(like.shape, like.dtype)


def _back(d, host):
    """Copy device array ``d`` into the host array ``host`` (in place)."""
    if host.flags.c_contiguous:
        d.copy_to_host(host)
    else:
        host[...] = d.copy_to_host()


def _flat_dev(arrays):
    """One device array holding every array of the list, back to back."""
    return _cuda.to_device(np.concatenate([a.ravel() for a in arrays]))


def _scatter(d, arrays):
    """Copy the flat device array ``d`` back into the arrays of the list, in place."""
    host = d.copy_to_host()
    off = 0
    for a in arrays:
        np.copyto(a, host[off:off + a.size].reshape(a.shape))
        off += a.size


def _result():
    return _cuda.device_array(2, np.float64)


# --------------------------------------------------------------------- GEMM, dense
def gemm(a, b, c, trans_a, trans_b, accumulate):
    K = ensure_available()
    dc = _dev(c) if accumulate else _empty(c)
    K.gemm(_dev(a), _dev(b), dc, trans_a, trans_b, accumulate)
    _back(dc, c)


def linear_forward(x, w, b, act, alpha, y, z):
    _check_linear(x, w, b, y)
    K = ensure_available()
    dy = _empty(y)
    dz = None if z is None else _empty(z)
    K.linear_forward(_dev(x), _dev(w), None if b is None else _dev(b), act, alpha, dy, dz)
    _back(dy, y)
    if z is not None:
        _back(dz, z)


def linear_backward(grad_y, x, w, y, z, act, alpha, grad_x, grad_w, grad_b, work, accumulate):
    K = ensure_available()
    dgw = _dev(grad_w) if accumulate else _empty(grad_w)
    dgb = None if grad_b is None else (_dev(grad_b) if accumulate else _empty(grad_b))
    dgx = None if grad_x is None else _empty(grad_x)
    dwork = None if act == _IDENTITY else _empty(work)
    K.linear_backward(_dev(grad_y), _dev(x), _dev(w), None if y is None else _dev(y),
                      None if z is None else _dev(z), act, alpha, dgx, dgw, dgb, dwork,
                      accumulate)
    _back(dgw, grad_w)
    if grad_b is not None:
        _back(dgb, grad_b)
    if grad_x is not None:
        _back(dgx, grad_x)
    if dwork is not None:
        _back(dwork, work)


# --------------------------------------------------------------------- activations
def activation_forward(act, alpha, x, y):
    K = ensure_available()
    dy = _empty(y)
    K.activation_forward(act, alpha, _dev(x), dy)
    _back(dy, y)


def activation_backward(act, alpha, grad_y, x, y, grad_x):
    K = ensure_available()
    dgx = _empty(grad_x)
    K.activation_backward(act, alpha, _dev(grad_y), None if x is None else _dev(x),
                          None if y is None else _dev(y), dgx)
    _back(dgx, grad_x)


# --------------------------------------------------------------------- losses
def _loss_value(result) -> float:
    return float(result.copy_to_host()[0])


def softmax_xent(logits, labels, targets, grad):
    K = ensure_available()
    res = _result()
    dgrad = None if grad is None else _empty(grad)
    K.softmax_xent(_dev(logits), None if labels is None else _dev(labels.astype(np.int64)),
                   None if targets is None else _dev(targets), dgrad, res, 0)
    if grad is not None:
        _back(dgrad, grad)
    return _loss_value(res)


def bce(pred, target, from_logits, grad):
    K = ensure_available()
    res = _result()
    dgrad = None if grad is None else _empty(grad)
    K.bce(_dev(pred), _dev(target), from_logits, dgrad, res, 0)
    if grad is not None:
        _back(dgrad, grad)
    return _loss_value(res)


def mse(pred, target, half, grad):
    K = ensure_available()
    res = _result()
    dgrad = None if grad is None else _empty(grad)
    K.mse(_dev(pred), _dev(target), half, dgrad, res, 0)
    if grad is not None:
        _back(dgrad, grad)
    return _loss_value(res)


# --------------------------------------------------------------------- optimizers
# Host lists are packed into one flat device array per role: one launch per update.
def sgd_update(params, grads, bufs, lr, momentum, nesterov, weight_decay, first):
    K = ensure_available()
    dp, dg = _flat_dev(params), _flat_dev(grads)
    dbuf = _flat_dev(bufs) if momentum != 0 else None
    K.sgd_update(dp, dg, dbuf, lr, momentum, nesterov, weight_decay, first)
    _scatter(dp, params)
    if dbuf is not None:
        _scatter(dbuf, bufs)


def adam_update(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                weight_decay, decoupled):
    K = ensure_available()
    dp, dg, dm, dv = (_flat_dev(a) for a in (params, grads, exp_avgs, exp_avg_sqs))
    K.adam_update(dp, dg, dm, dv, step, lr, beta1, beta2, eps, weight_decay, decoupled)
    _scatter(dp, params)
    _scatter(dm, exp_avgs)
    _scatter(dv, exp_avg_sqs)


def rmsprop_update(params, grads, square_avgs, bufs, lr, alpha, eps, momentum, weight_decay):
    K = ensure_available()
    dp, dg, ds = (_flat_dev(a) for a in (params, grads, square_avgs))
    dbuf = _flat_dev(bufs) if momentum > 0 else None
    K.rmsprop_update(dp, dg, ds, dbuf, lr, alpha, eps, momentum, weight_decay)
    _scatter(dp, params)
    _scatter(ds, square_avgs)
    if dbuf is not None:
        _scatter(dbuf, bufs)


def adagrad_update(params, grads, sums, lr, eps, weight_decay):
    K = ensure_available()
    dp, dg, ds = (_flat_dev(a) for a in (params, grads, sums))
    K.adagrad_update(dp, dg, ds, lr, eps, weight_decay)
    _scatter(dp, params)
    _scatter(ds, sums)


def sum_squares(arrays) -> float:
    K = ensure_available()
    arrays = [a for a in arrays if a.size]
    if not arrays:
        return 0.0
    res = _result()
    K.sum_squares(_flat_dev(arrays), res, 0)
    return _loss_value(res)


def scale_(arrays, factor):
    K = ensure_available()
    arrays = [a for a in arrays if a.size]
    if arrays:
        d = _flat_dev(arrays)
        K.scale_(d, factor)
        _scatter(d, arrays)


def clip_(arrays, lo, hi):
    K = ensure_available()
    arrays = [a for a in arrays if a.size]
    if arrays:
        d = _flat_dev(arrays)
        K.clip_(d, lo, hi)
        _scatter(d, arrays)


# --------------------------------------------------------------------- normalization
def batchnorm_forward(x, gamma, beta, eps, y, mean, invstd):
    _check_features(x, gamma=gamma, beta=beta)
    K = ensure_available()
    dy, dmean, dinv = _empty(y), _empty(mean), _empty(invstd)
    K.batchnorm_forward(_dev(x), _dev(gamma), _dev(beta), eps, dy, dmean, dinv)
    _back(dy, y)
    _back(dmean, mean)
    _back(dinv, invstd)


def batchnorm_forward_eval(x, gamma, beta, running_mean, running_var, eps, y):
    _check_features(x, gamma=gamma, beta=beta, running_mean=running_mean,
                    running_var=running_var)
    K = ensure_available()
    dy = _empty(y)
    K.batchnorm_forward_eval(_dev(x), _dev(gamma), _dev(beta), _dev(running_mean),
                             _dev(running_var), eps, dy)
    _back(dy, y)


def batchnorm_backward(grad_y, x, gamma, mean, invstd, grad_x, grad_gamma, grad_beta):
    K = ensure_available()
    dgx, dgg, dgb = _empty(grad_x), _dev(grad_gamma), _dev(grad_beta)
    K.batchnorm_backward(_dev(grad_y), _dev(x), _dev(gamma), _dev(mean), _dev(invstd), dgx,
                         dgg, dgb)
    _back(dgx, grad_x)
    _back(dgg, grad_gamma)
    _back(dgb, grad_beta)


def layernorm_forward(x, gamma, beta, eps, y, mean, invstd):
    _check_features(x, gamma=gamma, beta=beta)
    K = ensure_available()
    dy, dmean, dinv = _empty(y), _empty(mean), _empty(invstd)
    K.layernorm_forward(_dev(x), _dev(gamma), _dev(beta), eps, dy, dmean, dinv)
    _back(dy, y)
    _back(dmean, mean)
    _back(dinv, invstd)


def layernorm_backward(grad_y, x, gamma, mean, invstd, grad_x, grad_gamma, grad_beta):
    K = ensure_available()
    dgx, dgg, dgb = _empty(grad_x), _dev(grad_gamma), _dev(grad_beta)
    K.layernorm_backward(_dev(grad_y), _dev(x), _dev(gamma), _dev(mean), _dev(invstd), dgx,
                         dgg, dgb)
    _back(dgx, grad_x)
    _back(dgg, grad_gamma)
    _back(dgb, grad_beta)


# --------------------------------------------------------------------- whole forwards
def make_forward(stages):
    """``forward(x) -> host array``: the dense chain ``stages`` (the model's current
    weights, uploaded once here) run on the GPU, the activations staying there; only
    the batch goes in and the output comes out.  For ``predict``/``evaluate``, whose
    weights do not change between batches (the layer-by-layer host contract uploads
    every weight and brings every activation back for each layer of each batch)."""
    ensure_available()
    dtype = stages[0].weight.dtype
    weights = [(_dev(st.weight.value), None if st.bias is None else _dev(st.bias.value))
               for st in stages]
    buffers = {}

    def forward(x):
        n = x.shape[0]
        bufs = buffers.get(n)
        if bufs is None:
            if len(buffers) >= 2:  # (the batch size and a last, smaller batch)
                buffers.pop(next(iter(buffers)))
            bufs = buffers[n] = [_cuda.device_array((n, stages[0].weight.shape[0]), dtype)] + [
                _cuda.device_array((n, st.weight.shape[1]), dtype) for st in stages]
        bufs[0].copy_to_device(np.ascontiguousarray(x, dtype=dtype))
        for i, (st, (w, b)) in enumerate(zip(stages, weights)):
            _K.linear_forward(bufs[i], w, b, st.act, st.alpha, bufs[i + 1], None)
        return bufs[-1].copy_to_host()

    return forward


# --------------------------------------------------------------------- whole training steps
def make_train_step(stages, loss, optimizer):
    """A device-resident training step for a dense chain, or None when this backend
    cannot run the combination (see :class:`DeviceTrainStep`)."""
    ensure_available()
    from .. import losses as _losses
    from .. import optim as _optim
    if type(optimizer) not in (_optim.SGD, _optim.Adam, _optim.AdamW, _optim.RMSprop,
                               _optim.Adagrad):
        return None
    if type(loss) not in (_losses.SoftmaxCrossEntropy, _losses.MSE, _losses.BinaryCrossEntropy):
        return None
    if (isinstance(loss, _losses.BinaryCrossEntropy) and not loss.from_logits
            and stages[-1].act not in (_SIGMOID, _SOFTMAX)):
        return None  # probabilities from an unbounded output: the Python path checks them
    owned = [p for st in stages for p in (st.weight, st.bias) if p is not None]
    if {id(p) for p in owned} != {id(p) for p in optimizer.params} or len(owned) != len(
            optimizer.params):
        return None
    dtypes = {p.dtype for p in owned}
    if len(dtypes) != 1 or dtypes.pop() not in (np.float32, np.float64):
        return None
    for prev, st in zip(stages, stages[1:]):
        if prev.weight.shape[1] != st.weight.shape[0]:
            return None
    return DeviceTrainStep(stages, loss, optimizer)


class _Workspace:
    """Device buffers of one batch size: input, target, activations, gradients."""

    def __init__(self, n, stages, dtype, cuda, K):
        self.n = n
        self.x = cuda.device_array((n, stages[0].weight.shape[0]), dtype)
        self.y, self.z, self.g = [], [], []
        for st in stages:
            shape = (n, st.weight.shape[1])
            self.y.append(cuda.device_array(shape, dtype))
            self.z.append(cuda.device_array(shape, dtype)
                          if st.act in PREACT_ACTIVATIONS
                          else None)
            self.g.append(cuda.device_array(shape, dtype))  # grad of y, then grad of z
        cols = max(K.colsum_partial_rows(n, st.weight.shape[1]) * st.weight.shape[1]
                   for st in stages)
        self.colsum = cuda.device_array(cols, dtype)
        self.row_loss = cuda.device_array(n, np.float64)
        self.labels = None
        self.targets = None


class DeviceTrainStep:
    """``step(x, y, check_finite) -> loss`` with everything on the GPU.

    Parameters, gradients and each optimizer state live in one flat device array per
    role (the layers' weights and biases are views into it), so the optimizer update
    and the finite check are one launch each.  The host arrays are the truth until
    the first step and after every :meth:`sync`; in between, the device is.  A step
    after a sync uploads the host values again, so changes made on the host between
    steps (``load_state_dict``, a learning-rate change, new weights) are honoured.
    """

    def __init__(self, stages, loss, optimizer):
        # (sync from a predicting thread and a step in the training one, serialised: a
        # step between sync's copy and its flag had its update undone by a re-upload)
        self._lock = threading.RLock()
        self.stages = list(stages)
        self.loss = loss
        self.optimizer = optimizer  # (which holds this step once it uploads: _upload)
        self.params = list(optimizer.params)
        self.dtype = self.params[0].dtype
        cuda = _cuda
        self._layout = []
        off = 0
        for p in self.params:
            self._layout.append((off, p.size))
            off += p.size
        self._total = off
        self._p = cuda.device_array(off, self.dtype)
        self._g = cuda.device_array(off, self.dtype)
        slot = {id(p): i for i, p in enumerate(self.params)}

        def view(flat, p):
            o, size = self._layout[slot[id(p)]]
            return flat[o:o + size].reshape(p.shape)

        self._views = []
        for st in self.stages:
            b = st.bias
            self._views.append((view(self._p, st.weight), view(self._g, st.weight),
                                None if b is None else view(self._p, b),
                                None if b is None else view(self._g, b)))
        self._names = ()
        self._state = {}
        self._result = cuda.device_array(2, np.float64)
        self._partial = _K.new_partials()
        self._workspaces = {}
        self._upload_needed = True
        self._dirty = False
        self._last = None
        self._output = None

    def _before_fork(self):
        """In the parent, before os.fork(): the host arrays get the device's values
        (a fork child cannot reach the GPU; it goes on from them on a CPU backend)."""
        try:
            self.sync()
        except Exception:  # (the fork goes on; the child refuses the backend anyway)
            pass

    def _after_fork(self):
        """In a fork child: the GPU is out of reach (the parent synced the values to the
        host arrays before the fork).  Returns False: the step drops this kernel."""
        self._lock = threading.RLock()  # (a lock a parent thread held stays held here)
        self._dirty = False
        return False

    # -- host <-> device ---------------------------------------------------------
    def _pack(self, arrays):
        flat = np.empty(self._total, self.dtype)
        for (o, size), a in zip(self._layout, arrays):
            flat[o:o + size] = a.ravel()
        return flat

    def _upload(self):
        opt = self.optimizer
        # (another device step of this optimizer, e.g. a second compile of the model
        # with another loss, may hold newer values: bring them to the host arrays
        # uploaded here; it uploads again when it next runs)
        ref = opt.__dict__.get("_device_step")
        other = ref() if ref is not None else None
        if other is not None and other is not self:
            other.sync()
        # (the optimizer's state_dict syncs this step first: the moments live here)
        opt._device_step = weakref.ref(self)
        names = tuple(opt.state_names)
        if names != self._names:
            self._state = {k: _cuda.device_array(self._total, self.dtype) for k in names}
            self._names = names
        # (the host arrays uploaded from: sync writes back into these only, so a value
        # the user assigned since, p.value = w, is not overwritten by the device's)
        self._hosts = [(p.value, p.grad) for p in self.params]
        self._p.copy_to_device(self._pack([p.value for p in self.params]))
        for k, d in self._state.items():
            arrays = [s.get(k) for s in opt.state]
            d.copy_to_device(self._pack([np.zeros(p.shape, self.dtype) if a is None else a
                                         for a, p in zip(arrays, self.params)]))
        self._upload_needed = False

    def sync(self):
        """Copy parameters, gradients and optimizer state into the host arrays (in
        place; missing optimizer state arrays are created).  Cheap when nothing changed."""
        with self._lock:
            self._sync()

    def _sync(self):
        if not self._dirty:
            return
        opt = self.optimizer
        for role, d in [("value", self._p), ("grad", self._g)] + list(self._state.items()):
            host = d.copy_to_host()
            for i, (p, (o, size)) in enumerate(zip(self.params, self._layout)):
                part = host[o:o + size].reshape(p.shape)
                if role == "value":
                    if p.value is self._hosts[i][0]:
                        np.copyto(p.value, part)
                elif role == "grad":
                    if p.grad is self._hosts[i][1]:
                        np.copyto(p.grad, part)
                else:
                    arr = opt.state[i].get(role)
                    if arr is None or arr.shape != p.shape or arr.dtype != p.dtype:
                        opt.state[i][role] = part.copy()
                    else:
                        np.copyto(arr, part)
        self._dirty = False
        self._upload_needed = True

    def _workspace(self, n):
        ws = self._workspaces.get(n)
        if ws is None:
            if len(self._workspaces) >= 2:  # a full batch and a last, smaller one
                self._workspaces.pop(next(iter(self._workspaces)))
            ws = self._workspaces[n] = _Workspace(n, self.stages, self.dtype, _cuda, _K)
        return ws

    @property
    def output(self):
        """The last forward output (n, out) as a host array (copied on first access)."""
        if self._output is None and self._last is not None:
            self._output = self._last.y[-1].copy_to_host()
        return self._output

    # -- the step --------------------------------------------------------------------
    def __call__(self, x, y, check_finite=False) -> float:
        with self._lock:
            return self._call(x, y, check_finite)

    def _call(self, x, y, check_finite):
        K = _K
        if self._upload_needed or tuple(self.optimizer.state_names) != self._names:
            if self._dirty:
                self.sync()
            self._upload()
        n = x.shape[0]
        ws = self._workspace(n)
        ws.x.copy_to_device(np.ascontiguousarray(x, dtype=self.dtype))
        self._last, self._output = None, None

        # forward
        inp = ws.x
        for st, (w, _, b, _), out, z in zip(self.stages, self._views, ws.y, ws.z):
            K.linear_forward(inp, w, b, st.act, st.alpha, out, z)
            inp = out

        # loss (its gradient goes to ws.g[-1])
        self._loss(ws, y)

        # backward: ws.g[i] is the gradient of y_i, made grad_z in place
        for i in range(len(self.stages) - 1, -1, -1):
            st = self.stages[i]
            w, gw, _, gb = self._views[i]
            K.linear_backward(ws.g[i], ws.x if i == 0 else ws.y[i - 1], w, ws.y[i], ws.z[i],
                              st.act, st.alpha, ws.g[i - 1] if i else None, gw, gb,
                              ws.g[i], False, ws.colsum)
        self._dirty = True
        self._last = ws

        if check_finite:
            K.sum_squares(self._g, self._result, 1, self._partial)
            loss, norm2 = self._result.copy_to_host()
            check_loss(loss, self.dtype)
            if not math.isfinite(norm2):
                raise NonFiniteError("non-finite gradient")
        self.optimizer.step_count += 1
        self._update()
        if not check_finite:
            loss = self._result.copy_to_host()[0]
        return float(loss)

    def _loss(self, ws, y):
        from .. import losses as _losses
        K, loss, out, grad = _K, self.loss, ws.y[-1], ws.g[-1]
        if isinstance(loss, _losses.SoftmaxCrossEntropy):
            labels, probs = y
            if labels is not None:
                if ws.labels is None:
                    ws.labels = _cuda.device_array(ws.n, np.int64)
                ws.labels.copy_to_device(np.ascontiguousarray(labels, dtype=np.int64))
                K.softmax_xent(out, ws.labels, None, grad, self._result, 0, ws.row_loss)
            else:
                self._put_targets(ws, probs)
                K.softmax_xent(out, None, ws.targets, grad, self._result, 0, ws.row_loss)
        else:
            self._put_targets(ws, y)
            if isinstance(loss, _losses.MSE):
                K.mse(out, ws.targets, loss.half, grad, self._result, 0, self._partial)
            else:
                K.bce(out, ws.targets, loss.from_logits, grad, self._result, 0, self._partial)

    def _put_targets(self, ws, t):
        if ws.targets is None:
            ws.targets = _cuda.device_array(ws.y[-1].shape, self.dtype)
        ws.targets.copy_to_device(np.ascontiguousarray(t, dtype=self.dtype).reshape(
            ws.y[-1].shape))

    def _update(self):
        from .. import optim as _optim
        K, opt, h = _K, self.optimizer, self.optimizer.hyper
        p, g, s = self._p, self._g, self._state
        if isinstance(opt, _optim.SGD):
            K.sgd_update(p, g, s.get("momentum_buffer"), h["lr"], h["momentum"], h["nesterov"],
                         h["weight_decay"], opt.step_count == 1)
        elif isinstance(opt, _optim.Adam):
            b1, b2 = h["betas"]
            K.adam_update(p, g, s["exp_avg"], s["exp_avg_sq"], opt.step_count, h["lr"], b1, b2,
                          h["eps"], h["weight_decay"], opt.decoupled)
        elif isinstance(opt, _optim.RMSprop):
            K.rmsprop_update(p, g, s["square_avg"], s.get("momentum_buffer"), h["lr"],
                             h["alpha"], h["eps"], h["momentum"], h["weight_decay"])
        else:
            K.adagrad_update(p, g, s["sum"], h["lr"], h["eps"], h["weight_decay"])
