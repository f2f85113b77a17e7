"""scikit-learn estimators on fastprop's kernels: ``MLPClassifier`` and ``MLPRegressor``.

Drop-in replacements for :class:`sklearn.neural_network.MLPClassifier` and
:class:`~sklearn.neural_network.MLPRegressor`: change the import, keep the code.
They take the same constructor parameters with the same defaults, expose the same
fitted attributes and methods, and run the same algorithm, so that one
``random_state`` gives the same model up to floating-point rounding:

* Glorot-uniform initialisation drawn from ``random_state`` in scikit-learn's order,
  the same mini-batch order (``sklearn.utils.shuffle`` on the same generator) and
  the same early-stopping split;
* scikit-learn's loss: cross-entropy (softmax for multiclass, logistic for binary and
  multilabel), half squared error or half Poisson deviance, averaged over samples
  (weighted by ``sample_weight``), plus ``alpha / (2 * sum(sample_weight)) * ||W||^2``
  on the weights only (never the intercepts);
* scikit-learn's Adam and SGD updates, learning-rate schedules, (Nesterov) momentum,
  ``tol`` / ``n_iter_no_change`` stopping, and L-BFGS through ``scipy.optimize``.

What differs is where the time goes.  Every training step runs on the current
fastprop backend (``fastprop.backends.current()``): ``linear_forward`` per layer,
one fused loss-and-gradient kernel (``softmax_xent``, ``bce`` from logits or
``mse``), ``linear_backward`` per layer and one ``adam_update`` / ``sgd_update`` for
all weights plus one for all intercepts.  On the native backend the whole step is
one call of the compiled training step (``_FusedStep``: the same kernels in the same
order, each weight gradient's GEMM followed by its update while it is in cache)
whenever that computes exactly scikit-learn's step: dense input and no sample
weights.  Parameters, gradients and optimizer state
live in flat vectors (``coefs_`` and ``intercepts_`` are views into them), and every
activation / gradient buffer is allocated once per ``fit``, so a step allocates
nothing but the batch's index view.  Sparse input runs the first layer with scipy's
sparse products and the rest on the kernels.

How scikit-learn's optimizers map onto the kernel contract:

* Adam: scikit-learn applies ``lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``;
  the kernel's ``lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps')`` is the same
  update with ``eps' = eps / sqrt(1 - b2^t)``.
* SGD: scikit-learn keeps a velocity ``v = momentum v - lr g``; the kernel keeps
  ``buf = momentum buf + g``, and ``v = -lr buf`` while ``lr`` is constant.  When the
  schedule changes ``lr`` (invscaling, adaptive) the buffer is rescaled by
  ``lr_old / lr_new`` so that ``v`` carries over exactly as in scikit-learn.
* L2: the kernels' ``weight_decay`` (``g + wd p``) with ``wd = alpha / sum(weights)``
  on the weight vector, ``0`` on the intercept vector.

Requires scikit-learn >= 1.6 and scipy (the ``sklearn`` extra: ``pip install ".[sklearn]"``
in a checkout, or ``pip install scikit-learn scipy``).
``import fastprop`` does not import this module (nor scikit-learn).

Example:
    >>> from fastprop.sklearn import MLPClassifier      # was: from sklearn.neural_network
    >>> from sklearn.datasets import load_digits
    >>> X, y = load_digits(return_X_y=True)
    >>> clf = MLPClassifier((64,), max_iter=30, random_state=0).fit(X / 16, y)
"""

from __future__ import annotations

import math
import warnings

import numpy as np

try:
    import scipy.optimize
    import sklearn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(f"fastprop.sklearn needs scikit-learn >= 1.6 and scipy "
                      f"(pip install scikit-learn scipy, the sklearn extra): {exc}") from exc
import scipy.sparse as sp
from scipy.special import expit, xlogy
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, _fit_context, is_classifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier as _SkMLPClassifier
from sklearn.neural_network import MLPRegressor as _SkMLPRegressor
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils import check_random_state, column_or_1d, gen_batches
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import _check_partial_fit_first_call, type_of_target, unique_labels
from sklearn.utils.optimize import _check_optimize_result
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from . import backends

try:  # scipy >= 1.15 dropped L-BFGS-B's iprint; scikit-learn passes it only before that
    from sklearn.utils.fixes import _get_additional_lbfgs_options_dict
except ImportError:  # pragma: no cover - depends on the scikit-learn version
    def _get_additional_lbfgs_options_dict(key, value):
        return {}

__all__ = ["MLPClassifier", "MLPRegressor"]

_STOCHASTIC_SOLVERS = ("sgd", "adam")
# scikit-learn's hidden activation names -> fastprop kernel codes
_HIDDEN_CODES = {"identity": backends.ACTIVATIONS["identity"],
                 "logistic": backends.ACTIVATIONS["sigmoid"],
                 "tanh": backends.ACTIVATIONS["tanh"],
                 "relu": backends.ACTIVATIONS["relu"]}
_SOFTMAX = backends.ACTIVATIONS["softmax"]
_SIGMOID = backends.ACTIVATIONS["sigmoid"]


def _host_backend():
    """The current fastprop backend, or a CPU one when the current works on a device
    (these estimators keep NumPy arrays on the host)."""
    be = backends.current()
    if be.name == "cuda":  # pragma: no cover - no device backend in this build
        try:
            return backends.load("native")
        except backends.BackendUnavailableError:
            return backends.load("numpy")
    return be


def _kernel_array(a, dtype):
    """``a`` as a C-contiguous, writable array of ``dtype`` (copied only if needed:
    kernels may take mutable buffers, and read-only memmaps come from joblib)."""
    a = np.ascontiguousarray(a, dtype=dtype)
    return a if a.flags.writeable and a.flags.aligned else a.copy()


def _coef_dtype(coefs):
    """The dtype a fitted network computes in: its weights' (float64 if a user set
    them to anything but float32/float64)."""
    dtype = np.asarray(coefs[0]).dtype
    return dtype if dtype in (np.float32, np.float64) else np.dtype(np.float64)


def _shuffled(a, random_state):
    """``sklearn.utils.shuffle(a, random_state=random_state)`` for a 1-d array: the
    same permutation from the same draws (``resample`` without replacement shuffles
    ``arange(n)`` in place and indexes with it) without its input validation, ~100 ->
    18 us per epoch for 1,347 rows (5% of a digits fit's time otherwise)."""
    order = np.arange(a.shape[0])
    random_state.shuffle(order)
    return a[order]


# --------------------------------------------------------------------------- network
class _Workspace:
    """Buffers for a batch of ``m`` rows: every layer's output ``a[i + 1]``, the
    gradient ``g[i + 1]`` with respect to it, the activation-derivative scratch
    ``work[i]`` the kernel contract asks for, and (with ``gather``, for shuffled
    batches) the rows of inputs ``x``, targets ``t`` and sample weights ``sw``."""

    __slots__ = ("m", "x", "t", "sw", "a", "g", "work")

    def __init__(self, net, m, n_features, target_shape, target_dtype, weighted, gather):
        dt = net.dtype
        self.m = m
        self.x = np.empty((m, n_features), dt) if gather and not net.sparse else None
        self.t = np.empty((m,) + target_shape, target_dtype) if gather else None
        self.sw = np.empty(m, dt) if gather and weighted else None
        self.a = [None] + [np.empty((m, u), dt) for u in net.units[1:]]
        self.g = [None] + [np.empty((m, u), dt) for u in net.units[1:]]
        self.work = [None if act == 0 else np.empty((m, u), dt)
                     for act, u in zip(net.acts, net.units[1:])]


class _Network:
    """An MLP's parameters in flat vectors and its forward/loss/backward on the kernels.

    ``params`` holds every weight matrix (row-major, ``(fan_in, fan_out)``) and then
    every intercept vector, in the order of scikit-learn's ``_pack``; ``coefs`` and
    ``intercepts`` are views into it and ``grads`` mirrors it.  ``weights`` and
    ``biases`` (one-element lists, as the optimizer kernels take lists) view the two
    halves, so one kernel call updates all weights and one all intercepts.
    """

    def __init__(self, units, activation, out_activation, dtype, sparse):
        self.units = list(units)
        self.n_layers = len(units) - 1          # weight layers
        self.dtype = np.dtype(dtype)
        self.sparse = sparse
        self.out_activation = out_activation
        self.acts = [_HIDDEN_CODES[activation]] * (self.n_layers - 1) + [0]
        shapes = list(zip(units[:-1], units[1:]))
        self.n_coef = sum(i * o for i, o in shapes)
        total = self.n_coef + sum(units[1:])
        self.params = np.zeros(total, self.dtype)
        self.grads = np.zeros(total, self.dtype)
        self.weights, self.weight_grads = [self.params[:self.n_coef]], [self.grads[:self.n_coef]]
        self.biases, self.bias_grads = [self.params[self.n_coef:]], [self.grads[self.n_coef:]]
        self.coefs, self.intercepts = self.layer_views(self.weights + self.biases)
        self.coef_grads, self.intercept_grads = self.layer_views(
            self.weight_grads + self.bias_grads)
        self._workspaces = {}

    def layer_views(self, pair):
        """Per-layer views ``(weight matrices, intercept vectors)`` of a [weight vector,
        intercept vector] pair laid out like ``weights`` / ``biases`` (the parameters,
        their gradients, or an optimizer's state)."""
        coefs, intercepts, start = [], [], 0
        for fan_in, fan_out in zip(self.units[:-1], self.units[1:]):
            coefs.append(pair[0][start:start + fan_in * fan_out].reshape(fan_in, fan_out))
            start += fan_in * fan_out
        start = 0
        for fan_out in self.units[1:]:
            intercepts.append(pair[1][start:start + fan_out])
            start += fan_out
        return coefs, intercepts

    def load(self, coefs, intercepts):
        """Copy ``coefs`` / ``intercepts`` (lists of arrays) into the flat vector."""
        if len(coefs) != self.n_layers or len(intercepts) != self.n_layers:
            raise ValueError(f"coefs_ and intercepts_ must hold {self.n_layers} arrays for "
                             f"layer sizes {self.units}, got {len(coefs)} and {len(intercepts)}")
        for name, dst, src in (("coefs_", self.coefs, coefs),
                               ("intercepts_", self.intercepts, intercepts)):
            for i, (d, s) in enumerate(zip(dst, src)):
                s = np.asarray(s)
                if s.shape != d.shape:
                    raise ValueError(f"{name}[{i}] has shape {s.shape}, expected {d.shape} for "
                                     f"layer sizes {self.units} (hidden_layer_sizes changed?)")
                d[...] = s

    def workspace(self, m, n_features, target_shape, target_dtype, weighted, gather):
        ws = self._workspaces.get(m)
        if ws is None:
            if len(self._workspaces) >= 2:  # the full batches' size and the last one's
                self._workspaces.pop(next(iter(self._workspaces)))
            ws = _Workspace(self, m, n_features, target_shape, target_dtype, weighted, gather)
            self._workspaces[m] = ws
        return ws

    # -- one batch ---------------------------------------------------------------
    def loss_and_grads(self, be, x, t, sw, ws, alpha):
        """Forward, scikit-learn's loss (with its L2 term) and backward on one batch.

        Leaves in ``grads`` the gradient of the data term (scikit-learn's ``deltas``
        already divided by the sum of sample weights); the L2 gradient
        ``alpha / sw_sum * W`` is added by the caller (the optimizer's weight decay).
        Returns ``(loss, sw_sum)``.
        """
        a, g, work, acts = ws.a, ws.g, ws.work, self.acts
        coefs, intercepts = self.coefs, self.intercepts
        last = self.n_layers - 1
        h = x
        for i in range(self.n_layers):
            if i == 0 and self.sparse:
                np.copyto(a[1], x @ coefs[0])
                a[1] += intercepts[0]
                if acts[0]:
                    be.activation_forward(acts[0], 0.0, a[1], a[1])
            else:
                be.linear_forward(h, coefs[i], intercepts[i], acts[i], 0.0, a[i + 1], None)
            h = a[i + 1]
        loss = self._data_loss(be, a[-1], t, sw, g[-1])
        sw_sum = ws.m if sw is None else float(sw.sum(dtype=np.float64))
        if alpha:
            loss += 0.5 * alpha * be.sum_squares(self.weights) / sw_sum
        for i in range(last, -1, -1):
            if i == 0 and self.sparse:
                grad_z = g[1]
                if acts[0]:
                    be.activation_backward(acts[0], 0.0, g[1], None, a[1], work[0])
                    grad_z = work[0]
                np.copyto(self.coef_grads[0], x.T @ grad_z)
                np.sum(grad_z, axis=0, out=self.intercept_grads[0])
            else:
                be.linear_backward(g[i + 1], x if i == 0 else a[i], coefs[i], a[i + 1], None,
                                   acts[i], 0.0, g[i] if i else None, self.coef_grads[i],
                                   self.intercept_grads[i], work[i], False)
        return loss, sw_sum

    def _data_loss(self, be, z, t, sw, grad):
        """scikit-learn's data loss of output pre-activations ``z``; writes its output
        delta ``(p - y) * sw / sum(sw)`` into ``grad``.  (That is the loss's gradient,
        except for squared error with k > 1 outputs: scikit-learn averages that loss
        over outputs but not its gradient, which is k times larger; kept as is.)"""
        kind = self.out_activation
        if sw is not None or kind != "identity":
            # (the log losses: scikit-learn clips the probabilities to [eps, 1 - eps],
            # which the backends' loss kernels do not; the fused step's kernel does)
            return _reference_loss(kind, z, t, sw, grad)
        k = z.shape[1]
        loss = be.mse(z, t, True, grad)  # 0.5 * mean over all elements, as sklearn
        if k > 1:                    # sklearn's delta is (p - y) / n_samples
            be.scale_([grad], float(k))
        return loss


def _forward(be, X, coefs, intercepts, activation, out_activation, dtype):
    """The output activations of a fitted network for X (dense C-contiguous of
    ``dtype``, or CSR), computed on fresh arrays."""
    n = X.shape[0]
    last = len(coefs) - 1
    hidden = _HIDDEN_CODES[activation]
    h = X
    for i, (w, b) in enumerate(zip(coefs, intercepts)):
        w, b = _kernel_array(w, dtype), _kernel_array(b, dtype)
        act = hidden if i < last else 0
        out = np.empty((n, w.shape[1]), dtype)
        if sp.issparse(h):
            np.copyto(out, h @ w)
            out += b
            if act:
                be.activation_forward(act, 0.0, out, out)
        else:
            be.linear_forward(h, w, b, act, 0.0, out, None)
        h = out
    if out_activation == "softmax":
        be.activation_forward(_SOFTMAX, 0.0, h, h)
    elif out_activation == "logistic":
        be.activation_forward(_SIGMOID, 0.0, h, h)
    elif out_activation == "exp":
        np.exp(h, out=h)
    return h


def _reference_loss(kind, z, t, sw, grad):
    """scikit-learn's ``LOSS_FUNCTIONS`` written out in NumPy, for the cases without a
    kernel: sample weights and the Poisson loss.  ``t`` holds class ids for softmax,
    targets otherwise; writes ``(p - y) * sw / sum(sw)`` into ``grad``."""
    z64 = z.astype(np.float64)
    m = z.shape[0]
    if kind == "softmax":
        p = np.exp(z64 - z64.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        y = np.zeros_like(p)
        y[np.arange(m), t] = 1.0
    else:
        p = expit(z64) if kind == "logistic" else np.exp(z64) if kind == "exp" else z64
        y = t.astype(np.float64)
    if kind in ("softmax", "logistic"):
        eps = np.finfo(z.dtype).eps
        pc = np.clip(p, eps, 1 - eps)
        per = xlogy(y, pc)
        if kind == "logistic":
            per += xlogy(1 - y, 1 - pc)
        per = -per.sum(axis=1)
    elif kind == "exp":
        per = (xlogy(y, y / p) - y + p).sum(axis=1)
    else:
        per = 0.5 * ((y - p) ** 2).mean(axis=1)
    loss = float(np.average(per, weights=sw))
    delta = p - y
    if sw is None:
        delta /= m
    else:
        delta *= sw[:, None] / sw.sum()
    np.copyto(grad, delta, casting="unsafe")
    return loss


# --------------------------------------------------------------------------- optimizers
class _Optimizer:
    """State shared by the two stochastic optimizers: ``state_names`` lists the
    attributes holding a pair [weight-vector state, intercept-vector state]."""

    state_names: tuple = ()

    def prepare(self, net):
        """Make the state usable by the kernels for ``net`` (after unpickling, joblib
        may hand back read-only memory maps)."""
        sizes = (net.n_coef, net.params.size - net.n_coef)
        for name in self.state_names:
            pair = getattr(self, name)
            if pair is None:
                continue
            if tuple(a.size for a in pair) != sizes:
                raise ValueError(f"optimizer state does not match the network's {sum(sizes)} "
                                 "parameters; refit instead of continuing with partial_fit")
            setattr(self, name, [_kernel_array(a, net.dtype) for a in pair])


class _AdamOptimizer(_Optimizer):
    """scikit-learn's ``AdamOptimizer`` on the ``adam_update`` kernel (see the module
    docstring for the epsilon mapping).  State: first/second moments of the weight
    vector and of the intercept vector; ``t`` counts updates."""

    state_names = ("ms", "vs")

    def __init__(self, net, learning_rate_init, beta_1, beta_2, epsilon):
        self.learning_rate_init = learning_rate_init
        self.learning_rate = float(learning_rate_init)
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self.t = 0
        self.ms = [np.zeros(net.n_coef, net.dtype), np.zeros(net.params.size - net.n_coef, net.dtype)]
        self.vs = [np.zeros_like(m) for m in self.ms]

    def hyper(self, weight_decay):
        """Advance to the next update: ``(t, kernel hyperparameters)``."""
        self.t += 1
        t, b1, b2 = self.t, self.beta_1, self.beta_2
        self.learning_rate = self.learning_rate_init * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        return t, {"lr": self.learning_rate_init, "betas": (b1, b2),
                   "eps": self.epsilon / math.sqrt(1 - b2 ** t), "weight_decay": weight_decay}

    def update(self, be, net, weight_decay):
        t, h = self.hyper(weight_decay)
        (b1, b2), lr, eps = h["betas"], h["lr"], h["eps"]
        be.adam_update(net.weights, net.weight_grads, self.ms[:1], self.vs[:1], t, lr, b1, b2,
                       eps, weight_decay, False)
        be.adam_update(net.biases, net.bias_grads, self.ms[1:], self.vs[1:], t, lr, b1, b2,
                       eps, 0.0, False)

    def iteration_ends(self, time_step):
        pass

    def trigger_stopping(self, msg, verbose):
        if verbose:
            print(msg + " Stopping.")
        return True


class _SGDOptimizer(_Optimizer):
    """scikit-learn's ``SGDOptimizer`` on the ``sgd_update`` kernel.  ``bufs`` holds
    the kernel's momentum buffers, ``-velocity / learning_rate`` in scikit-learn's
    terms; ``_set_learning_rate`` rescales them so the velocity survives a change."""

    state_names = ("bufs",)

    def __init__(self, net, learning_rate_init, lr_schedule, momentum, nesterov, power_t):
        self.learning_rate_init = learning_rate_init
        self.learning_rate = float(learning_rate_init)
        self.lr_schedule = lr_schedule
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov) and momentum > 0
        self.power_t = power_t
        self.bufs = None
        if momentum > 0:
            self.bufs = [np.zeros(net.n_coef, net.dtype),
                         np.zeros(net.params.size - net.n_coef, net.dtype)]

    def hyper(self, weight_decay):
        """``(step, kernel hyperparameters)`` of the next update; the step is never the
        first (that would set the buffer to the gradient; it starts at zero instead)."""
        return 2, {"lr": self.learning_rate, "momentum": self.momentum,
                   "nesterov": self.nesterov, "weight_decay": weight_decay}

    def update(self, be, net, weight_decay):
        bufs, lr, mom, nest = self.bufs, self.learning_rate, self.momentum, self.nesterov
        be.sgd_update(net.weights, net.weight_grads, bufs and bufs[:1], lr, mom, nest,
                      weight_decay, False)
        be.sgd_update(net.biases, net.bias_grads, bufs and bufs[1:], lr, mom, nest, 0.0, False)

    def _set_learning_rate(self, value):
        # (the buffers hold velocity / lr: rescaled for a new rate; a rate that
        # underflowed to 0, or a ratio beyond float range, keeps them: nothing moves
        # at a zero rate, where scikit-learn's velocity, holding lr, moves by ~1e-323)
        if self.bufs is not None and value != self.learning_rate and value != 0:
            ratio = self.learning_rate / value
            if math.isfinite(ratio):
                for b in self.bufs:
                    b *= b.dtype.type(ratio)
        self.learning_rate = value

    def iteration_ends(self, time_step):
        if self.lr_schedule == "invscaling":
            self._set_learning_rate(
                float(self.learning_rate_init) / (time_step + 1) ** self.power_t)

    def trigger_stopping(self, msg, verbose):
        if self.lr_schedule != "adaptive":
            if verbose:
                print(msg + " Stopping.")
            return True
        if self.learning_rate <= 1e-6:
            if verbose:
                print(msg + " Learning rate too small. Stopping.")
            return True
        self._set_learning_rate(self.learning_rate / 5.0)
        if verbose:
            print(msg + " Setting learning rate to %f" % self.learning_rate)
        return False


# --------------------------------------------------------------------------- fused step
class _StepParam:
    """A parameter as the native training step reads it: ``value`` and ``grad``."""

    __slots__ = ("value", "grad")

    def __init__(self, value, grad):
        self.value, self.grad = value, grad


class _StepLoss:
    """The loss options the native step reads: scikit-learn's squared error is the half
    mean, its logistic loss takes the output pre-activations (logits), and its output
    delta is ``(p - y) / n_samples`` whatever the number of outputs k: k times the
    gradient of the kernels' mean over all n k elements (``grad_scale``).  ``clip``:
    scikit-learn's log losses clip the probabilities to [eps, 1 - eps] (eps of the
    computation's dtype), which caps each sample's loss at -log(eps); 0 for the squared
    error."""

    half = True
    from_logits = True

    def __init__(self, grad_scale, clip):
        self.grad_scale = float(grad_scale)
        self.clip = float(clip)


class _StepOptimizer:
    """What the native step reads of an optimizer: parameters, per-parameter state
    arrays, hyperparameters, the step counter, and which parameters weight decay
    (scikit-learn's L2 term) applies to: the weights, never the intercepts."""

    decoupled = False
    _lag = None  # (every parameter takes every step)

    def __init__(self, params, state, state_names, decay_mask):
        self.params, self.state, self.state_names = params, state, state_names
        self._decay_mask = decay_mask  # (read by the native step only)
        self.hyper = {}
        self.step_count = 0


class _FusedStep:
    """One training step of the network (forward, scikit-learn's loss, backward, L2
    and the optimizer update) in one native call: the compiled training step of
    csrc/train_step.cpp, which also overlaps each weight gradient's GEMM with its
    update.  It runs the same kernels in the same order as the layer-by-layer path
    (``_Network.loss_and_grads`` + ``update``), so both give the same model to the
    last bit or an ulp.  Used on the native backend when the step computes exactly
    what scikit-learn does: dense input, no sample weights, and a softmax, logistic
    or identity output (scikit-learn's logistic loss sums over the k outputs, and its
    delta for k logistic / identity outputs is k times the gradient of the kernels'
    mean over all elements: the kernel scales it, the logistic loss is scaled here)."""

    @classmethod
    def make(cls, be, net, optimizer, weighted):
        kinds = {"softmax": 0, "identity": 1, "logistic": 2}
        kind = kinds.get(net.out_activation)
        if be.name != "native" or net.sparse or weighted or kind is None:
            return None
        from . import _native
        return cls(_native.NativeTrainStep, net, optimizer, kind)

    def __init__(self, make_kernel, net, optimizer, loss_kind):
        from .train import DenseStage
        n = net.n_layers
        grads = list(net.coef_grads) + list(net.intercept_grads)
        params = [_StepParam(v, g) for v, g in zip(list(net.coefs) + list(net.intercepts), grads)]
        stages = [DenseStage(params[i], params[n + i], act, 0.0) for i, act in enumerate(net.acts)]
        if isinstance(optimizer, _AdamOptimizer):
            names, opt_kind = ("exp_avg", "exp_avg_sq"), 1
            pairs = (optimizer.ms, optimizer.vs)
        else:
            names, opt_kind = (("momentum_buffer",) if optimizer.bufs is not None else ()), 0
            pairs = (optimizer.bufs,) if optimizer.bufs is not None else ()
        views = [sum(net.layer_views(pair), []) for pair in pairs]  # weights, intercepts
        state = [{k: v[i] for k, v in zip(names, views)} for i in range(2 * n)]
        mask = np.array([1] * n + [0] * n, np.uint8)
        self.net, self.optimizer = net, optimizer
        self.opt = _StepOptimizer(params, state, names, mask)
        self.labels = loss_kind == 0
        k = net.units[-1]
        self.loss_factor = float(k) if loss_kind == 2 else 1.0
        clip = np.finfo(net.dtype).eps if loss_kind != 1 else 0.0
        self.kernel = make_kernel(stages, _StepLoss(1.0 if self.labels else k, clip), self.opt,
                                  loss_kind, opt_kind)

    def __call__(self, be, x, t, alpha):
        """The batch's loss, scikit-learn's L2 term included; updates the network."""
        m = x.shape[0]
        l2 = 0.5 * alpha * be.sum_squares(self.net.weights) / m if alpha else 0.0
        step, hyper = self.optimizer.hyper(alpha / m)
        self.opt.hyper = hyper
        self.opt.step_count = step - 1
        # (check_x=False: X was validated whole, by check_array and, where it was
        # narrowed to the network's dtype, again after the cast in _fit)
        return (self.kernel(x, (t, None) if self.labels else t, False, False)
                * self.loss_factor + l2)


# --------------------------------------------------------------------------- estimators
class _BaseMLP(BaseEstimator):
    """What MLPClassifier and MLPRegressor share: ``_fit`` and the solvers.

    Mirrors ``sklearn.neural_network._multilayer_perceptron.BaseMultilayerPerceptron``
    step for step (same attributes, messages, warnings and random-number draws); only
    the arithmetic is delegated to :class:`_Network` and the optimizer kernels.
    """

    # -- setup ---------------------------------------------------------------------
    def _initialize(self, y, layer_units, dtype):
        self.n_iter_ = 0
        self.t_ = 0
        self.n_outputs_ = y.shape[1]
        self.n_layers_ = len(layer_units)
        if not is_classifier(self):
            self.out_activation_ = "exp" if self.loss == "poisson" else "identity"
        elif self._label_binarizer.y_type_ == "multiclass":
            self.out_activation_ = "softmax"
        else:
            self.out_activation_ = "logistic"
        self.coefs_ = []
        self.intercepts_ = []
        for i in range(self.n_layers_ - 1):
            coef, intercept = self._init_coef(layer_units[i], layer_units[i + 1], dtype)
            self.coefs_.append(coef)
            self.intercepts_.append(intercept)
        self._best_coefs = [c.copy() for c in self.coefs_]
        self._best_intercepts = [i.copy() for i in self.intercepts_]
        if self.solver in _STOCHASTIC_SOLVERS:
            self.loss_curve_ = []
            self._no_improvement_count = 0
            if self.early_stopping:
                self.validation_scores_ = []
                self.best_validation_score_ = -np.inf
                self.best_loss_ = None
            else:
                self.best_loss_ = np.inf
                self.validation_scores_ = None
                self.best_validation_score_ = None

    def _init_coef(self, fan_in, fan_out, dtype):
        # Glorot et al.'s uniform initialisation, drawn as scikit-learn draws it
        factor = 2.0 if self.activation == "logistic" else 6.0
        bound = np.sqrt(factor / (fan_in + fan_out))
        coef = self._random_state.uniform(-bound, bound, (fan_in, fan_out))
        intercept = self._random_state.uniform(-bound, bound, fan_out)
        return coef.astype(dtype, copy=False), intercept.astype(dtype, copy=False)

    def _network(self, n_features, hidden, dtype, sparse):
        units = [n_features] + [np.shape(c)[1] for c in self.coefs_]
        fitted = units[1:-1]
        # hidden_layer_sizes changed since the network was fitted (warm_start,
        # partial_fit): scikit-learn's stochastic solvers take the shapes from coefs_
        # and keep training the fitted network, so ours do.  Its L-BFGS unpacks the
        # parameters by the new sizes (a network of the new sizes from the wrong
        # values, reading past the packed vector: NaN or an error), and a different
        # depth fails in every solver with an unrelated error: a clear one here.
        if fitted != [int(h) for h in hidden] and (
                len(fitted) != len(hidden) or self.solver not in _STOCHASTIC_SOLVERS):
            raise ValueError(f"hidden_layer_sizes={list(hidden)} does not match the fitted "
                             f"network's hidden layers {fitted}; refit without warm_start")
        net = _Network(units, self.activation, self.out_activation_, dtype, sparse)
        net.load(self.coefs_, self.intercepts_)
        return net

    def _targets(self, y, dtype):
        """Training targets as the loss kernels take them: class ids for softmax,
        a float (n, outputs) array otherwise."""
        if self.out_activation_ == "softmax":
            return np.ascontiguousarray(np.argmax(y, axis=1), dtype=np.int64)
        return _kernel_array(y, dtype)

    # -- fit -----------------------------------------------------------------------
    def _refuse_early_stopping(self):
        """partial_fit's refusal, scikit-learn's message, before anything changes
        (scikit-learn raises it after taking the classes and initialising the network;
        L-BFGS, which MLPRegressor.partial_fit also runs, as scikit-learn's, ignores
        early_stopping)."""
        if self.early_stopping and self.solver in _STOCHASTIC_SOLVERS:
            raise ValueError("partial_fit does not support early_stopping=True")

    def _fit(self, X, y, sample_weight=None, incremental=False):
        hidden = self.hidden_layer_sizes
        if not hasattr(hidden, "__iter__"):
            hidden = [hidden]
        hidden = list(hidden)
        if np.any(np.array(hidden) <= 0):
            raise ValueError("hidden_layer_sizes must be > 0, got %s." % hidden)
        first_pass = not hasattr(self, "coefs_") or (not self.warm_start and not incremental)

        X, y = self._validate_input(X, y, incremental, reset=first_pass)
        n_samples, n_features = X.shape
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, X)
        if y.ndim == 1:
            y = y.reshape((-1, 1))
        if not first_pass and np.shape(self.coefs_[-1])[1] != y.shape[1]:
            # (scikit-learn broadcasts the fitted outputs against y's and goes on with
            # n_outputs_ not matching what predict returns; or our kernels refused
            # with a message about their own arrays)
            raise ValueError(f"y has {y.shape[1]} outputs, the fitted network "
                             f"{np.shape(self.coefs_[-1])[1]}; refit without warm_start")
        if not first_pass and self.solver in _STOCHASTIC_SOLVERS:
            # (the bookkeeping a continued stochastic fit extends was set up by the
            # first fit for its own solver and early_stopping: scikit-learn trains an
            # epoch and then fails on a None with an unrelated error; refused here
            # before anything changes)
            stopping = self.early_stopping and not incremental
            if not isinstance(getattr(self, "loss_curve_", None), list):
                raise ValueError(f"the network was fitted by solver 'lbfgs', which keeps no "
                                 f"loss_curve_ for solver {self.solver!r} to continue; "
                                 f"refit without warm_start")
            if stopping and getattr(self, "validation_scores_", None) is None:
                raise ValueError("early_stopping=True, but the network was fitted without "
                                 "it (no validation_scores_ to continue); refit without "
                                 "warm_start")
            if not stopping and getattr(self, "best_loss_", None) is None:
                raise ValueError("the network was fitted with early_stopping=True (no "
                                 "best_loss_ for a fit without it to continue); refit "
                                 "without warm_start")
        self.n_outputs_ = y.shape[1]
        layer_units = [n_features] + hidden + [self.n_outputs_]
        self._random_state = check_random_state(self.random_state)
        if first_pass:
            self._initialize(y, layer_units, X.dtype)

        # computation dtype: the input's (float32 or float64) for a new network, the
        # network's own when it continues (warm_start, partial_fit); for L-BFGS, that
        # promoted with X's, as scikit-learn's X @ W promotes (see _fit_lbfgs)
        param_dtype = _coef_dtype(self.coefs_)
        dtype = X.dtype if first_pass else param_dtype
        if self.solver not in _STOCHASTIC_SOLVERS:
            dtype = np.result_type(X.dtype, param_dtype)
        sparse = sp.issparse(X)
        narrowed = np.dtype(dtype).itemsize < X.dtype.itemsize
        with np.errstate(over="ignore"):  # (checked just below)
            X = X.tocsr().astype(dtype, copy=False) if sparse else _kernel_array(X, dtype)
        if narrowed and not np.isfinite(X.data if sparse else X).all():
            # float64 X continued on a float32 network (warm_start, partial_fit):
            # check_array saw finite float64 values, some of which overflow here
            raise ValueError("Input X contains infinity or a value too large for "
                             f"dtype('{np.dtype(dtype).name}'), the network's dtype.")
        if (self.out_activation_ != "softmax" and y.dtype.kind == "f" and y.size
                and np.dtype(dtype).itemsize < y.dtype.itemsize
                and float(np.abs(y).max()) > float(np.finfo(dtype).max)):
            # (the loss kernels take y in the network's dtype: inf there, and a
            # "non-finite weights" error after training, blaming the weights)
            raise ValueError("Input y contains a value too large for "
                             f"dtype('{np.dtype(dtype).name}'), the network's dtype; "
                             "fit float64 X to train in float64.")
        if sample_weight is not None:
            given = sample_weight
            with np.errstate(over="ignore", under="ignore"):
                sample_weight = _kernel_array(sample_weight, dtype)
            if np.dtype(dtype).itemsize < given.dtype.itemsize and not (
                    np.isfinite(sample_weight).all()
                    and np.array_equal(sample_weight == 0, given == 0)):
                # (weights continued on a float32 network, which scikit-learn keeps
                # in X's float64: inf or 0 here trained a NaN model, or said the
                # weights summed to zero, after changing it)
                raise ValueError(
                    "sample_weight contains a value too large or too small (nonzero, "
                    f"rounding to 0) for dtype('{np.dtype(dtype).name}'), the network's "
                    "dtype; fit float64 X to train in float64.")
        net = self._network(n_features, hidden, dtype, sparse)
        # After an early-stopping fit scikit-learn's coefs_ / intercepts_ ARE the lists
        # _best_coefs / _best_intercepts (its restore assigns them), and its solvers
        # update those arrays in place: the "best" weights follow the live ones until a
        # new best validation score copies them, so a warm-started fit that never beats
        # the best_validation_score_ it carries over keeps the weights it trained.
        # net.load copied the weights; the live views take over both names.
        if getattr(self, "_best_coefs", None) is self.coefs_:
            self._best_coefs = net.coefs
        if getattr(self, "_best_intercepts", None) is self.intercepts_:
            self._best_intercepts = net.intercepts
        self.coefs_, self.intercepts_ = net.coefs, net.intercepts
        be = _host_backend()
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            if self.solver in _STOCHASTIC_SOLVERS:
                self._fit_stochastic(be, net, X, y, sample_weight, incremental)
            else:
                self._fit_lbfgs(be, net, X, y, sample_weight, param_dtype)

        if not all(np.isfinite(w).all() for w in (*self.coefs_, *self.intercepts_)):
            raise ValueError(
                "Solver produced non-finite parameter weights. The input data may"
                " contain large values and need to be preprocessed.")
        return self

    def _fit_lbfgs(self, be, net, X, y, sample_weight, param_dtype):
        """scipy's L-BFGS-B on the packed parameters, run as scikit-learn runs it.

        scikit-learn hands scipy its packed parameters in the network's dtype
        (``param_dtype``) and evaluates the loss at each point scipy hands back, in that
        point's dtype promoted with X's.  scipy >= 1.11 keeps a float32 start's dtype
        for those points, so a float32 fit evaluates in float32; older scipy makes them
        float64, and the fit computes in float64 from the float32-rounded start (the
        network is rebuilt in float64 at the first such point).  The result scipy
        returns is float64 either way, and becomes ``coefs_`` / ``intercepts_`` as it
        is, as scikit-learn's ``_unpack`` does: an L-BFGS model is float64 whatever X
        was.
        """
        alpha, n_coef = self.alpha, net.n_coef
        run = {}

        def bind(net):
            dt = net.dtype
            Xd = X.astype(dt, copy=False) if sp.issparse(X) else _kernel_array(X, dt)
            sw = None if sample_weight is None else _kernel_array(sample_weight, dt)
            T = self._targets(y, dt)
            ws = net.workspace(Xd.shape[0], Xd.shape[1], T.shape[1:], T.dtype, False, False)
            run["net"], run["args"] = net, (Xd, T, sw, ws)

        bind(net)

        def loss_grad(theta):
            net = run["net"]
            if np.result_type(theta.dtype, net.dtype) != net.dtype:
                bind(_Network(net.units, self.activation, self.out_activation_, theta.dtype,
                              net.sparse))
                net = run["net"]
            np.copyto(net.params, theta)             # exact: net.dtype holds theta's
            loss, sw_sum = net.loss_and_grads(be, *run["args"], alpha)
            grad = net.grads.astype(np.float64)     # a new array: scipy keeps it
            grad[:n_coef] += (alpha / sw_sum) * net.params[:n_coef]
            return np.float64(loss), grad  # (loss_ a NumPy float, as scikit-learn's)

        iprint = 1 if (self.verbose is True or self.verbose >= 1) else -1
        opt_res = scipy.optimize.minimize(
            loss_grad, net.params.astype(param_dtype), method="L-BFGS-B", jac=True,
            options={"maxfun": self.max_fun, "maxiter": self.max_iter, "gtol": self.tol,
                     **_get_additional_lbfgs_options_dict("iprint", iprint)})
        self.n_iter_ = _check_optimize_result("lbfgs", opt_res, self.max_iter)
        self.loss_ = opt_res.fun
        coefs, intercepts = net.layer_views([opt_res.x[:n_coef], opt_res.x[n_coef:]])
        # (_unpack fills scikit-learn's lists in place: _best_coefs / _best_intercepts
        # still name them if they did; see _fit)
        if self._best_coefs is self.coefs_:
            self._best_coefs = coefs
        if self._best_intercepts is self.intercepts_:
            self._best_intercepts = intercepts
        self.coefs_, self.intercepts_ = coefs, intercepts

    def _fit_stochastic(self, be, net, X, y, sample_weight, incremental):
        if not incremental or not hasattr(self, "_optimizer"):
            if self.solver == "sgd":
                self._optimizer = _SGDOptimizer(net, self.learning_rate_init, self.learning_rate,
                                                self.momentum, self.nesterovs_momentum,
                                                self.power_t)
            else:
                self._optimizer = _AdamOptimizer(net, self.learning_rate_init, self.beta_1,
                                                 self.beta_2, self.epsilon)
        optimizer = self._optimizer
        optimizer.prepare(net)
        early_stopping = self.early_stopping
        if early_stopping:
            # don't stratify in multilabel classification (scikit-learn's split exactly)
            stratify = y if is_classifier(self) and self.n_outputs_ == 1 else None
            if sample_weight is None:
                X_train, X_val, y_train, y_val = train_test_split(
                    X, y, random_state=self._random_state,
                    test_size=self.validation_fraction, stratify=stratify)
                sw_train = sw_val = None
            else:
                X_train, X_val, y_train, y_val, sw_train, sw_val = train_test_split(
                    X, y, sample_weight, random_state=self._random_state,
                    test_size=self.validation_fraction, stratify=stratify)
            if X_val.shape[0] < 2:
                raise ValueError(
                    "The validation set is too small. Increase 'validation_fraction' "
                    "or the size of your dataset.")
            if is_classifier(self):
                y_val = self._label_binarizer.inverse_transform(y_val)
            if not sp.issparse(X_train):
                X_train = _kernel_array(X_train, net.dtype)
        else:
            X_train, y_train, sw_train = X, y, sample_weight
            X_val = y_val = sw_val = None
        T = self._targets(y_train, net.dtype)

        n_samples = X_train.shape[0]
        sample_idx = np.arange(n_samples, dtype=int)
        if self.batch_size == "auto":
            batch_size = min(200, n_samples)
        else:
            if self.batch_size > n_samples:
                warnings.warn("Got `batch_size` less than 1 or larger than "
                              "sample size. It is going to be clipped")
            batch_size = int(np.clip(self.batch_size, 1, n_samples))
        batches = list(gen_batches(n_samples, batch_size))
        weighted = sw_train is not None
        spaces = {}
        for sl in batches[:1] + batches[-1:]:
            m = sl.stop - sl.start
            spaces[m] = net.workspace(m, X_train.shape[1], T.shape[1:], T.dtype, weighted,
                                      self.shuffle)

        alpha, do_shuffle, sparse = self.alpha, self.shuffle, net.sparse
        fused = _FusedStep.make(be, net, optimizer, weighted)
        try:
            self.n_iter_ = 0
            for _ in range(self.max_iter):
                if do_shuffle:
                    sample_idx = _shuffled(sample_idx, self._random_state)
                accumulated_loss = 0.0
                for sl in batches:
                    m = sl.stop - sl.start
                    ws = spaces[m]
                    swb = None
                    if do_shuffle:
                        idx = sample_idx[sl]
                        if sparse:
                            xb = X_train[idx]
                        else:
                            xb = np.take(X_train, idx, axis=0, out=ws.x, mode="clip")
                        tb = np.take(T, idx, axis=0, out=ws.t, mode="clip")
                        if weighted:
                            swb = np.take(sw_train, idx, out=ws.sw, mode="clip")
                    else:
                        xb, tb = X_train[sl], T[sl]
                        if weighted:
                            swb = sw_train[sl]
                    if fused is not None:
                        loss = fused(be, xb, tb, alpha)
                    else:
                        loss, sw_sum = net.loss_and_grads(be, xb, tb, swb, ws, alpha)
                        optimizer.update(be, net, alpha / sw_sum)
                    accumulated_loss += loss * m

                self.n_iter_ += 1
                self.loss_ = np.float64(accumulated_loss / X_train.shape[0])
                self.t_ += n_samples
                self.loss_curve_.append(self.loss_)
                if self.verbose:
                    print("Iteration %d, loss = %.8f" % (self.n_iter_, self.loss_))
                self._update_no_improvement_count(early_stopping, X_val, y_val, sw_val)
                optimizer.iteration_ends(self.t_)
                if self._no_improvement_count > self.n_iter_no_change:
                    if early_stopping:
                        msg = ("Validation score did not improve more than "
                               "tol=%f for %d consecutive epochs."
                               % (self.tol, self.n_iter_no_change))
                    else:
                        msg = ("Training loss did not improve more than tol=%f"
                               " for %d consecutive epochs." % (self.tol, self.n_iter_no_change))
                    if optimizer.trigger_stopping(msg, self.verbose):
                        break
                    self._no_improvement_count = 0
                if incremental:
                    break
                if self.n_iter_ == self.max_iter:
                    warnings.warn(
                        "Stochastic Optimizer: Maximum iterations (%d) "
                        "reached and the optimization hasn't converged yet." % self.max_iter,
                        ConvergenceWarning)
        except KeyboardInterrupt:
            warnings.warn("Training interrupted by user.")

        if early_stopping:  # restore the best weights
            self.coefs_ = self._best_coefs
            self.intercepts_ = self._best_intercepts

    def _update_no_improvement_count(self, early_stopping, X, y, sample_weight):
        if early_stopping:
            val_score = self._score(X, y, sample_weight=sample_weight)
            self.validation_scores_.append(val_score)
            if self.verbose:
                print("Validation score: %f" % self.validation_scores_[-1])
            last_valid_score = self.validation_scores_[-1]
            if last_valid_score < (self.best_validation_score_ + self.tol):
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if last_valid_score > self.best_validation_score_:
                self.best_validation_score_ = last_valid_score
                self._best_coefs = [c.copy() for c in self.coefs_]
                self._best_intercepts = [i.copy() for i in self.intercepts_]
        else:
            if self.loss_curve_[-1] > self.best_loss_ - self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if self.loss_curve_[-1] < self.best_loss_:
                self.best_loss_ = self.loss_curve_[-1]

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Fit the model to data matrix X and target(s) y.

        Parameters
        ----------
        X : ndarray or sparse matrix of shape (n_samples, n_features)
            The input data.
        y : ndarray of shape (n_samples,) or (n_samples, n_outputs)
            The target values (class labels in classification, real numbers in
            regression).
        sample_weight : array-like of shape (n_samples,), default=None
            Sample weights.

        Returns
        -------
        self : object
            Returns a trained MLP model.
        """
        return self._fit(X, y, sample_weight=sample_weight, incremental=False)

    def _check_solver(self):
        if self.solver not in _STOCHASTIC_SOLVERS:
            raise AttributeError("partial_fit is only available for stochastic"
                                 " optimizers. %s is not stochastic." % self.solver)
        return True

    # -- predict -------------------------------------------------------------------
    def _forward_pass_fast(self, X, check_input=True):
        """The network's output activations for X (n_samples, n_outputs)."""
        if check_input:
            X = validate_data(self, X, accept_sparse=["csr", "csc"], reset=False)
        # scikit-learn computes X @ W in NumPy's promoted type: a float32 network
        # predicts in float64 on float64 (or int64) X, from the unrounded X
        dtype = np.result_type(X.dtype, _coef_dtype(self.coefs_))
        if dtype.kind != "f" or dtype.itemsize > 8:
            dtype = np.dtype(np.float64)  # (long double X: the kernels compute in float64)
        X = X.tocsr().astype(dtype, copy=False) if sp.issparse(X) else _kernel_array(X, dtype)
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            return _forward(_host_backend(), X, self.coefs_, self.intercepts_, self.activation,
                            self.out_activation_, dtype)

    def _score_with_function(self, X, y, sample_weight, score_function):
        """Private score method without input validation."""
        y_pred = self._predict(X, check_input=False)
        if np.issubdtype(y_pred.dtype, np.floating) and not np.isfinite(y_pred).all():
            return np.nan
        return score_function(y, y_pred, sample_weight=sample_weight)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags


def _store_params(est, params):
    """Store every constructor argument as the attribute of the same name (what
    scikit-learn's estimators do one line at a time)."""
    for name, value in params.items():
        if name != "self":
            setattr(est, name, value)


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multi-layer perceptron classifier on fastprop's kernels.

    A drop-in for :class:`sklearn.neural_network.MLPClassifier`: the same parameters
    (hidden_layer_sizes, activation, solver, alpha, batch_size, learning_rate,
    learning_rate_init, power_t, max_iter, shuffle, random_state, tol, verbose,
    warm_start, momentum, nesterovs_momentum, early_stopping, validation_fraction,
    beta_1, beta_2, epsilon, n_iter_no_change, max_fun), defaults, attributes
    (``coefs_``, ``intercepts_``, ``loss_``, ``loss_curve_``, ``best_loss_``,
    ``validation_scores_``, ``best_validation_score_``, ``n_iter_``, ``t_``,
    ``n_layers_``, ``n_outputs_``, ``out_activation_``, ``classes_``,
    ``n_features_in_``, ``feature_names_in_``) and methods; see scikit-learn's
    documentation for their meaning.  Optimizes the log-loss with LBFGS, SGD or Adam;
    multiclass (softmax output), binary and multilabel (logistic outputs).
    """

    _parameter_constraints: dict = dict(_SkMLPClassifier._parameter_constraints)
    loss = "log_loss"   # a class constant, as scikit-learn's classifier has no loss parameter

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000):
        _store_params(self, locals())

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True,
                             dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if not hasattr(self, "classes_") or (not self.warm_start and not incremental):
            self._label_binarizer = LabelBinarizer()
            self._label_binarizer.fit(y)
            self.classes_ = self._label_binarizer.classes_
        else:
            classes = unique_labels(y)
            if self.warm_start:
                if set(classes) != set(self.classes_):
                    raise ValueError(
                        "warm_start can only be used where `y` has the same classes as in "
                        f"the previous call to fit. Previously got {self.classes_}, `y` has "
                        f"{classes}")
            elif len(np.setdiff1d(classes, self.classes_, assume_unique=True)):
                raise ValueError(
                    f"`y` has classes not in `self.classes_`. `self.classes_` has "
                    f"{self.classes_}. 'y' has {classes}.")
        y = self._label_binarizer.transform(y).astype(bool)
        return X, y

    def predict(self, X):
        """Predict using the multi-layer perceptron classifier.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            The input data.

        Returns
        -------
        y : ndarray, shape (n_samples,) or (n_samples, n_classes)
            The predicted classes.
        """
        check_is_fitted(self)
        return self._predict(X)

    def _predict(self, X, check_input=True):
        y_pred = self._forward_pass_fast(X, check_input=check_input)
        if self.n_outputs_ == 1:
            y_pred = y_pred.ravel()
        return self._label_binarizer.inverse_transform(y_pred)

    def _score(self, X, y, sample_weight=None):
        return self._score_with_function(X, y, sample_weight=sample_weight,
                                         score_function=accuracy_score)

    @available_if(lambda est: est._check_solver())
    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """Update the model with a single iteration over the given data.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            The input data.
        y : array-like of shape (n_samples,)
            The target values.
        sample_weight : array-like of shape (n_samples,), default=None
            Sample weights.
        classes : array of shape (n_classes,), default=None
            Classes across all calls to partial_fit; required on the first call
            (for multilabel targets too: ``np.arange(n_labels)``).

        Returns
        -------
        self : object
            Trained MLP model.
        """
        self._refuse_early_stopping()
        if _check_partial_fit_first_call(self, classes):
            self._label_binarizer = LabelBinarizer()
            if type_of_target(y).startswith("multilabel"):
                self._label_binarizer.fit(y)
            else:
                self._label_binarizer.fit(classes)
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)

    def predict_log_proba(self, X):
        """Return the log of probability estimates, shape (n_samples, n_classes)."""
        y_prob = self.predict_proba(X)
        return np.log(y_prob, out=y_prob)

    def predict_proba(self, X):
        """Probability estimates, shape (n_samples, n_classes), classes in the order
        of ``classes_``."""
        check_is_fitted(self)
        y_pred = self._forward_pass_fast(X)
        if self.n_outputs_ == 1:
            y_pred = y_pred.ravel()
        if y_pred.ndim == 1:
            return np.vstack([1 - y_pred, y_pred]).T
        return y_pred

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multi-layer perceptron regressor on fastprop's kernels.

    A drop-in for :class:`sklearn.neural_network.MLPRegressor`: the same parameters
    (``loss`` in {'squared_error', 'poisson'} plus those of :class:`MLPClassifier`),
    defaults, attributes and methods.  The output layer is the identity (``exp`` for
    the Poisson loss); multi-output targets are supported.
    """

    _parameter_constraints: dict = dict(_SkMLPRegressor._parameter_constraints)

    def __init__(self, loss="squared_error", hidden_layer_sizes=(100,), activation="relu", *,
                 solver="adam", alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000):
        _store_params(self, locals())

    def predict(self, X):
        """Predict using the multi-layer perceptron model.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            The input data.

        Returns
        -------
        y : ndarray of shape (n_samples, n_outputs)
            The predicted values (shape (n_samples,) for a single output).
        """
        check_is_fitted(self)
        return self._predict(X)

    def _predict(self, X, check_input=True):
        y_pred = self._forward_pass_fast(X, check_input=check_input)
        if y_pred.shape[1] == 1:
            return y_pred.ravel()
        return y_pred

    def _score(self, X, y, sample_weight=None):
        return self._score_with_function(X, y, sample_weight=sample_weight,
                                         score_function=r2_score)

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True,
                             y_numeric=True, dtype=(np.float64, np.float32), reset=reset)
        if y.dtype.kind not in "biuf":  # (strings: NumPy's conversion error, mid-fit)
            raise ValueError(f"y must hold numbers for regression, got dtype {y.dtype}")
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        return X, y

    # scikit-learn's MLPRegressor tests ``est._check_solver`` (the bound method, always
    # true) rather than calling it, so its partial_fit exists for every solver (and
    # runs L-BFGS for solver="lbfgs"); kept identical for a drop-in.
    @available_if(lambda est: est._check_solver)
    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y, sample_weight=None):
        """Update the model with a single iteration over the given data.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            The input data.
        y : ndarray of shape (n_samples,)
            The target values.
        sample_weight : array-like of shape (n_samples,), default=None
            Sample weights.

        Returns
        -------
        self : object
            Trained MLP model.
        """
        self._refuse_early_stopping()
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)
