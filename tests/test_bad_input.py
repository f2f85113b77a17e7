"""Bad input, table-driven.

Each row: a call on a fresh context (a small trained model, its Adam optimizer and
data), the exception type it must raise, and a regex its message must match.  For
every row the test also asserts that the model's parameters, gradients, buffers
and training flags, and the optimizer's state, are bit-identical before and after
the rejected call.  Rows marked ``kernels=False`` run with a backend that fails the
test on any kernel call: their input must be rejected before it reaches a kernel.
"""

import re
from typing import Callable, NamedTuple, Optional

import numpy as np
import pytest

import fastprop as fp
from fastprop import backends, losses, nn, ops, optim
from _support import snapshot


class Ctx:
    def __init__(self):
        rng = np.random.default_rng(0)
        self.model = nn.Sequential(nn.Dense(4, 8, "relu", rng=0), nn.BatchNorm1d(8),
                                   nn.Dropout(0.1, seed=0), nn.Dense(8, 3, rng=1))
        self.opt = optim.Adam(self.model.parameters(), lr=0.01)
        self.X = rng.standard_normal((20, 4))
        self.y = np.arange(20) % 3
        # one real step: optimizer state exists, grads are non-zero
        self.model.fit(self.X, self.y, loss="cross_entropy", optimizer=self.opt, epochs=1,
                       batch_size=20, verbose=0)
        self.params = self.model.parameters()
        self.dense = self.model[0]
        self.bn = self.model[1]
        self.a = rng.standard_normal((3, 4))
        self.b = rng.standard_normal((4, 5))
        # a dense chain: its compiled step is the backend's whole-step kernel where
        # there is one (native); one real step so that its optimizer state exists
        self.chain = nn.Sequential(nn.Dense(4, 8, "relu", rng=2), nn.Dense(8, 3, rng=3))
        self.chain_opt = optim.Adam(self.chain.parameters(), lr=0.01)
        self.step = self.chain.compile("cross_entropy", self.chain_opt)
        self.step(self.X[:5], self.y[:5])

    def fit(self, X=None, y=None, **kw):
        kw.setdefault("loss", "cross_entropy")
        kw.setdefault("optimizer", self.opt)
        kw.setdefault("verbose", 0)
        kw.setdefault("batch_size", 4)
        return self.model.fit(self.X if X is None else X, self.y if y is None else y, **kw)

    def with_last(self, value, what="X"):
        """A copy of X (or y) whose *last* sample holds ``value``: a fit that does not
        validate up front would train on the earlier batches and change the model."""
        if what == "X":
            X = self.X.copy()
            X[-1, -1] = value
            return X
        y = self.y.copy()
        y[-1] = value
        return y


class Row(NamedTuple):
    id: str
    call: Callable
    exc: type
    match: str
    kernels: bool = False          # may a kernel run before the input is rejected?
    setup: Optional[Callable] = None
    xfail: str = ""                # a known, unfixed bug (strict: passing is reported)


def _readonly(shape, dtype=np.float64):
    a = np.zeros(shape, dtype)
    a.flags.writeable = False
    return a


def _cuda_unavailable(c):
    """As on a machine without a GPU, also where the backend works (the CUDA simulator
    is on for the whole session once test_cuda.py is collected: these rows were
    skipped in every CI run)."""
    import importlib.util
    if importlib.util.find_spec("numba") is None:
        return  # (unavailable as it is)
    from fastprop.backends import cuda, cuda_support
    c.monkeypatch.delitem(backends._loaded, "cuda", raising=False)
    c.monkeypatch.setattr(cuda, "_K", None)
    c.monkeypatch.setattr(cuda_support, "problem",
                          lambda: "no CUDA GPU found (numba-cuda is installed, but no CUDA "
                                  "driver or GPU was detected)")


def _complex(c):
    return c.a.astype(np.complex128)


def _no_dir(c):
    return "/nonexistent-dir-of-fastprop/run.ckpt"


def _with(a, index, value):
    """A copy of a with one element set."""
    a = np.array(a, copy=True)
    a[index] = value
    return a


def _fit_chain(c, **kw):
    kw.setdefault("loss", "cross_entropy")
    kw.setdefault("optimizer", c.chain_opt)
    kw.setdefault("verbose", 0)
    return c.chain.fit(kw.pop("X", c.X), kw.pop("y", c.y), **kw)


R = Row
ROWS = [
    # ---------------------------------------------------------------- ops.matmul
    R("matmul-a-1d", lambda c: ops.matmul(np.ones(4), c.b), ValueError, r"a must be 2-D.*1-D"),
    R("matmul-b-3d", lambda c: ops.matmul(c.a, np.ones((4, 5, 1))), ValueError, r"b must be 2-D"),
    R("matmul-inner", lambda c: ops.matmul(c.a, c.b.T), ValueError,
      r"inner dimensions.*\(3, 4\).*\(5, 4\)"),
    R("matmul-trans-inner", lambda c: ops.matmul(c.a, c.b, trans_a=True), ValueError,
      r"inner dimensions"),
    R("matmul-complex", lambda c: ops.matmul(_complex(c), c.b), TypeError, r"a .*complex128"),
    R("matmul-object", lambda c: ops.matmul(c.a.astype(object), c.b), TypeError, r"a .*object"),
    R("matmul-str", lambda c: ops.matmul(c.a, np.full((4, 5), "x")), TypeError, r"b .*<U1"),
    R("matmul-str-scalar", lambda c: ops.matmul("abc", c.b), TypeError, r"a must hold real"),
    R("matmul-none", lambda c: ops.matmul(None, c.b), TypeError, r"a must be an array, got None"),
    R("matmul-ragged", lambda c: ops.matmul([[1, 2], [3]], c.b), TypeError, r"a must be"),
    R("matmul-out-shape", lambda c: ops.matmul(c.a, c.b, out=np.zeros((3, 4))), ValueError,
      r"out must have shape \(3, 5\) and dtype float64, got shape \(3, 4\)"),
    R("matmul-out-dtype", lambda c: ops.matmul(c.a, c.b, out=np.zeros((3, 5), np.float32)),
      ValueError, r"dtype float64.*dtype float32"),
    R("matmul-out-int", lambda c: ops.matmul(c.a, c.b, out=np.zeros((3, 5), int)), ValueError,
      r"out must have"),
    R("matmul-out-readonly", lambda c: ops.matmul(c.a, c.b, out=_readonly((3, 5))), ValueError,
      r"out is read-only"),
    R("matmul-out-list", lambda c: ops.matmul(c.a, c.b, out=[[0.0] * 5] * 3), ValueError,
      r"out must be a numpy.ndarray"),
    R("matmul-out-byteswapped", lambda c: ops.matmul(c.a, c.b, out=np.zeros((3, 5), ">f8")),
      ValueError, r"out must have"),
    R("matmul-accumulate-no-out", lambda c: ops.matmul(c.a, c.b, accumulate=True), ValueError,
      r"accumulate=True requires out"),
    # ---------------------------------------------------------------- ops: linear & activations
    R("linear-x-1d", lambda c: ops.linear(np.ones(4), c.b), ValueError, r"x must be 2-D"),
    R("linear-w-1d", lambda c: ops.linear(c.a, np.ones(4)), ValueError, r"w must be 2-D"),
    R("linear-width", lambda c: ops.linear(c.a, c.b.T), ValueError, r"x has 4 features but w "
      r"expects 5"),
    R("linear-bias-shape", lambda c: ops.linear(c.a, c.b, np.ones(4)), ValueError,
      r"b must have shape \(5,\), got \(4,\)"),
    R("linear-unknown-activation", lambda c: ops.linear(c.a, c.b, activation="swish"), ValueError,
      r"unknown activation 'swish'.*relu"),
    R("linear-activation-type", lambda c: ops.linear(c.a, c.b, activation=3), TypeError,
      r"activation must be a str or None, got int"),
    R("linear-complex", lambda c: ops.linear(_complex(c), c.b), TypeError, r"x .*complex"),
    R("linear-backward-gelu-no-z", lambda c: ops.linear_backward(
        np.ones((3, 5)), c.a, c.b, np.ones((3, 5)), activation="gelu"), ValueError, r"z"),
    R("linear-backward-relu-no-y", lambda c: ops.linear_backward(
        np.ones((3, 5)), c.a, c.b, None, activation="relu"), ValueError, r"forward output y"),
    R("linear-backward-grad-shape", lambda c: ops.linear_backward(
        np.ones((3, 4)), c.a, c.b, np.ones((3, 5)), activation="relu"), ValueError,
      r"grad_y must have shape \(3, 5\)"),
    R("linear-backward-y-shape", lambda c: ops.linear_backward(
        np.ones((3, 5)), c.a, c.b, np.ones((3, 4)), activation="tanh"), ValueError,
      r"y must have shape \(3, 5\)"),
    # (an operand given but not needed is checked too: a wrong shape is a mistake)
    R("linear-backward-unused-z-shape", lambda c: ops.linear_backward(
        np.ones((3, 5)), c.a, c.b, np.ones((3, 5)), activation="relu", z=np.ones(15)),
      ValueError, r"z must have shape \(3, 5\), got \(15,\)"),
    R("linear-backward-unused-y-shape", lambda c: ops.linear_backward(
        np.ones((3, 5)), c.a, c.b, np.ones((5, 3)), activation="gelu", z=np.ones((3, 5))),
      ValueError, r"y must have shape \(3, 5\), got \(5, 3\)"),
    R("activation-backward-unused-x-shape", lambda c: ops.activation_backward(
        "relu", np.ones((2, 3)), np.ones((3, 2)), np.ones((2, 3))), ValueError,
      r"x must have shape \(2, 3\), got \(3, 2\)"),
    R("activation-unknown", lambda c: ops.activation("Relu", c.a), ValueError,
      r"unknown activation 'Relu'"),
    R("activation-none-name", lambda c: ops.activation(["relu"], c.a), TypeError,
      r"activation must be a str"),
    R("activation-object", lambda c: ops.activation("relu", np.array([1, None])), TypeError,
      r"x must hold real numbers.*object"),
    R("activation-out-readonly", lambda c: ops.activation("relu", c.a, out=_readonly((3, 4))),
      ValueError, r"read-only"),
    R("activation-out-shape", lambda c: ops.activation("relu", c.a, out=np.zeros((4, 3))),
      ValueError, r"out must have shape \(3, 4\)"),
    R("activation-alpha-negative", lambda c: ops.activation("leaky_relu", c.a, alpha=-0.1),
      ValueError, r"alpha"),
    R("softmax-0d", lambda c: ops.activation("softmax", np.float64(1.0)), ValueError,
      r"softmax needs at least 1-D"),
    R("activation-backward-y-shape", lambda c: ops.activation_backward(
        "sigmoid", np.ones((2, 3)), None, np.ones((3, 2))), ValueError, r"y must have shape"),
    R("activation-backward-gelu-no-x", lambda c: ops.activation_backward(
        "gelu", np.ones((2, 3)), None, np.ones((2, 3))), ValueError, r"gelu"),
    # ---------------------------------------------------------------- ops.softmax_cross_entropy
    R("xent-label-too-big", lambda c: ops.softmax_cross_entropy(c.a, [0, 1, 4]), ValueError,
      r"labels must lie in \[0, 4\).*\[0, 4\]"),
    R("xent-label-negative", lambda c: ops.softmax_cross_entropy(c.a, [0, -1, 2]), ValueError,
      r"labels must lie in \[0, 4\)"),
    R("xent-label-uint64-huge", lambda c: ops.softmax_cross_entropy(
        c.a, np.array([0, 2**63 + 1, 2], np.uint64)), ValueError,
      r"labels must lie in \[0, 4\).*\[0, 9223372036854775809\]"),
    R("xent-label-fraction", lambda c: ops.softmax_cross_entropy(c.a, [0, 1.5, 2]), ValueError,
      r"integer class ids"),
    R("xent-label-nan", lambda c: ops.softmax_cross_entropy(c.a, [0, np.nan, 2]), ValueError,
      r"integer class ids"),
    R("xent-label-bool", lambda c: ops.softmax_cross_entropy(c.a, [True, False, True]),
      TypeError, r"bool"),
    R("xent-label-str", lambda c: ops.softmax_cross_entropy(c.a, ["a", "b", "c"]), TypeError,
      r"labels must hold real"),
    R("xent-label-count", lambda c: ops.softmax_cross_entropy(c.a, [0, 1]), ValueError,
      r"labels must have shape \(3,\)"),
    R("xent-onehot-shape", lambda c: ops.softmax_cross_entropy(c.a, np.eye(3)), ValueError,
      r"\(3, 4\)"),
    R("xent-target-nan", lambda c: ops.softmax_cross_entropy(c.a, np.full((3, 4), np.nan)),
      ValueError, r"NaN"),
    R("xent-labels-3d", lambda c: ops.softmax_cross_entropy(c.a, np.zeros((3, 4, 1))),
      ValueError, r"labels must be"),
    R("xent-logits-1d", lambda c: ops.softmax_cross_entropy(np.ones(3), [0, 1, 2]), ValueError,
      r"logits must be 2-D"),
    R("xent-empty", lambda c: ops.softmax_cross_entropy(np.empty((0, 3)), np.empty(0, int)),
      ValueError, r"empty"),
    R("xent-no-classes", lambda c: ops.softmax_cross_entropy(np.empty((2, 0)), np.zeros((2, 0))),
      ValueError, r"at least one class"),
    # ---------------------------------------------------------------- layers
    R("dense-input-1d", lambda c: c.dense(np.ones(4)), ValueError,
      r"Dense\(4, 8\): expected input of shape \(batch, 4\), got \(4,\)"),
    R("dense-input-3d", lambda c: c.dense(np.ones((2, 4, 1))), ValueError, r"\(batch, 4\)"),
    R("dense-input-width", lambda c: c.dense(np.ones((2, 5))), ValueError,
      r"\(batch, 4\), got \(2, 5\)"),
    R("dense-input-complex", lambda c: c.dense(_complex(c)), TypeError, r"complex"),
    R("dense-input-str", lambda c: c.dense(np.full((2, 4), "1.0")), TypeError, r"x must hold"),
    R("dense-input-object", lambda c: c.dense(np.ones((2, 4), object)), TypeError, r"object"),
    R("dense-backward-shape", lambda c: c.dense.backward(np.ones((20, 7))), ValueError,
      r"grad_out must have the output's shape \(20, 8\), got \(20, 7\)",
      setup=lambda c: c.dense(c.X)),  # (fit's steps keep no caches)
    R("dense-backward-before-forward", lambda c: nn.Dense(2, 2).backward(np.ones((1, 2))),
      RuntimeError, r"before forward"),
    R("model-forward-width", lambda c: c.model(np.ones((5, 3))), ValueError, r"\(batch, 4\)"),
    R("dense-in-zero", lambda c: nn.Dense(0, 3), ValueError, r"in_features.*>= 1"),
    R("dense-out-negative", lambda c: nn.Dense(3, -1), ValueError, r"out_features"),
    R("dense-in-float", lambda c: nn.Dense(3.0, 2), TypeError, r"in_features must be an int"),
    R("dense-in-bool", lambda c: nn.Dense(True, 2), TypeError, r"in_features must be an int"),
    R("dense-activation", lambda c: nn.Dense(3, 2, activation="softplus"), ValueError,
      r"unknown activation 'softplus'"),
    R("dense-dtype-int", lambda c: nn.Dense(3, 2, dtype=np.int32), TypeError,
      r"dtype must be float32 or float64, got int32"),
    R("dense-dtype-f16", lambda c: nn.Dense(3, 2, dtype=np.float16), TypeError, r"float16"),
    R("dense-dtype-bogus", lambda c: nn.Dense(3, 2, dtype="bogus"), TypeError, r"dtype"),
    R("dense-init-unknown", lambda c: nn.Dense(3, 2, init="orthogonal"), ValueError,
      r"unknown init 'orthogonal'"),
    R("leaky-alpha", lambda c: nn.LeakyReLU(-0.5), ValueError, r"alpha"),
    R("dropout-p-big", lambda c: nn.Dropout(1.5), ValueError, r"Invalid p: 1.5"),
    R("dropout-p-negative", lambda c: nn.Dropout(-0.1), ValueError, r"Invalid p"),
    R("dropout-p-str", lambda c: nn.Dropout("0.5"), TypeError, r"p must be a real number"),
    R("batchnorm-eps-zero", lambda c: nn.BatchNorm1d(3, eps=0.0), ValueError, r"eps"),
    R("batchnorm-momentum", lambda c: nn.BatchNorm1d(3, momentum=1.5), ValueError, r"momentum"),
    R("batchnorm-one-sample", lambda c: c.model(np.ones((1, 4))), ValueError,
      r"more than 1 sample", kernels=True),
    R("batchnorm-width", lambda c: c.bn(np.ones((4, 3))), ValueError,
      r"BatchNorm1d\(8\): expected input of shape \(batch, 8\)"),
    R("layernorm-width", lambda c: nn.LayerNorm(3)(np.ones((2, 4))), ValueError,
      r"LayerNorm\(3\)"),
    R("layernorm-features", lambda c: nn.LayerNorm(0), ValueError, r"num_features"),
    R("residual-not-module", lambda c: nn.Residual(lambda x: x), TypeError,
      r"block must be a fastprop Module"),
    R("residual-shape", lambda c: nn.Residual(nn.Dense(4, 3)), ValueError,
      r"Residual: the block maps 4 features to 3"),
    R("sequential-not-module", lambda c: nn.Sequential(nn.ReLU(), "relu"), TypeError,
      r"layer 1 must be a fastprop Module, got str"),
    # ---------------------------------------------------------------- losses
    R("loss-unknown", lambda c: losses.get("hinge"), ValueError, r"unknown loss 'hinge'"),
    R("loss-backward-first", lambda c: losses.MSE().backward(), RuntimeError, r"before forward"),
    R("mse-target-shape", lambda c: losses.MSE()(np.ones((3, 2)), np.ones((2, 3))), ValueError,
      r"target must have the prediction's shape \(3, 2\), got \(2, 3\)"),
    R("mse-target-nan", lambda c: losses.MSE()(np.ones(3), [1, np.nan, 2]), ValueError,
      r"target contains 1 NaN"),
    R("mse-empty", lambda c: losses.MSE()(np.ones((0, 2)), np.ones((0, 2))), ValueError,
      r"pred is empty"),
    R("mse-pred-complex", lambda c: losses.MSE()(np.ones(2, complex), np.ones(2)), TypeError,
      r"pred must hold real"),
    R("bce-target-range", lambda c: losses.BinaryCrossEntropy()(np.full(3, 0.5), [0, 1, 2]),
      ValueError, r"target must lie in \[0, 1\]"),
    R("bce-target-negative", lambda c: losses.BinaryCrossEntropy(from_logits=True)(
        np.zeros(3), [0, -1, 1]), ValueError, r"target must lie in \[0, 1\]"),
    R("bce-pred-not-prob", lambda c: losses.BinaryCrossEntropy()(np.array([0.5, 1.5]), [0, 1]),
      ValueError, r"pred must be probabilities in \[0, 1\].*from_logits"),
    R("bce-pred-nan", lambda c: losses.BinaryCrossEntropy()(np.array([0.5, np.nan]), [0, 1]),
      ValueError, r"pred must be probabilities"),
    R("xent-loss-1d", lambda c: losses.SoftmaxCrossEntropy()(np.ones(3), [0]), ValueError,
      r"logits must be 2-D"),
    # ---------------------------------------------------------------- optimizers
    R("sgd-negative-lr", lambda c: optim.SGD(c.params, lr=-0.1), ValueError,
      r"Invalid lr: -0.1"),
    R("sgd-nan-lr", lambda c: optim.SGD(c.params, lr=float("nan")), ValueError, r"Invalid lr"),
    R("sgd-lr-str", lambda c: optim.SGD(c.params, lr="0.1"), TypeError,
      r"lr must be a real number, got str"),
    R("sgd-lr-none", lambda c: optim.SGD(c.params, lr=None), TypeError, r"lr must be a real"),
    R("sgd-lr-bool", lambda c: optim.SGD(c.params, lr=True), TypeError, r"lr must be a real"),
    R("sgd-negative-momentum", lambda c: optim.SGD(c.params, lr=0.1, momentum=-0.9), ValueError,
      r"Invalid momentum: -0.9"),
    R("sgd-nesterov-no-momentum", lambda c: optim.SGD(c.params, lr=0.1, nesterov=True),
      ValueError, r"Nesterov momentum requires momentum > 0"),
    R("sgd-nesterov-type", lambda c: optim.SGD(c.params, lr=0.1, momentum=0.9, nesterov="yes"),
      TypeError, r"nesterov must be a bool"),
    R("sgd-negative-wd", lambda c: optim.SGD(c.params, lr=0.1, weight_decay=-1e-4), ValueError,
      r"Invalid weight_decay"),
    R("adam-beta1-one", lambda c: optim.Adam(c.params, betas=(1.0, 0.999)), ValueError,
      r"Invalid beta parameter at index 0: 1.0"),
    R("adam-beta2-negative", lambda c: optim.Adam(c.params, betas=(0.9, -0.1)), ValueError,
      r"Invalid beta parameter at index 1: -0.1"),
    R("adam-beta2-big", lambda c: optim.Adam(c.params, betas=(0.9, 1.5)), ValueError,
      r"index 1"),
    R("adam-betas-scalar", lambda c: optim.Adam(c.params, betas=0.9), TypeError,
      r"betas must be a pair"),
    R("adam-betas-triple", lambda c: optim.Adam(c.params, betas=(0.9, 0.99, 0.9)), TypeError,
      r"betas must be a pair"),
    R("adam-beta-str", lambda c: optim.Adam(c.params, betas=("0.9", 0.99)), TypeError,
      r"betas\[0\] must be a real"),
    R("adam-negative-eps", lambda c: optim.Adam(c.params, eps=-1e-8), ValueError,
      r"Invalid eps"),
    R("adam-negative-lr", lambda c: optim.Adam(c.params, lr=-1e-3), ValueError, r"Invalid lr"),
    R("adam-negative-wd", lambda c: optim.Adam(c.params, weight_decay=-0.1), ValueError,
      r"Invalid weight_decay"),
    R("adamw-beta", lambda c: optim.AdamW(c.params, betas=(0.9, 1.0)), ValueError,
      r"Invalid beta parameter at index 1"),
    R("adamw-negative-wd", lambda c: optim.AdamW(c.params, weight_decay=-0.01), ValueError,
      r"Invalid weight_decay"),
    R("rmsprop-alpha", lambda c: optim.RMSprop(c.params, alpha=1.5), ValueError,
      r"Invalid alpha"),
    R("rmsprop-momentum", lambda c: optim.RMSprop(c.params, momentum=-0.5), ValueError,
      r"Invalid momentum"),
    R("rmsprop-eps", lambda c: optim.RMSprop(c.params, eps=-1.0), ValueError, r"Invalid eps"),
    R("rmsprop-lr", lambda c: optim.RMSprop(c.params, lr=-1.0), ValueError, r"Invalid lr"),
    R("adagrad-lr", lambda c: optim.Adagrad(c.params, lr=-0.01), ValueError, r"Invalid lr"),
    R("adagrad-eps", lambda c: optim.Adagrad(c.params, eps=-1e-10), ValueError, r"Invalid eps"),
    R("adagrad-wd", lambda c: optim.Adagrad(c.params, weight_decay=-1), ValueError,
      r"Invalid weight_decay"),
    R("optim-empty-params", lambda c: optim.Adam([]), ValueError, r"empty parameter list"),
    R("optim-empty-generator", lambda c: optim.SGD((p for p in []), lr=0.1), ValueError,
      r"empty parameter list"),
    R("optim-single-param", lambda c: optim.SGD(c.params[0], lr=0.1), TypeError,
      r"got a single Parameter"),
    R("optim-arrays", lambda c: optim.SGD([np.zeros(3)], lr=0.1), TypeError,
      r"params\[0\] must be a fastprop Parameter, got ndarray"),
    R("optim-none", lambda c: optim.Adam(None), TypeError, r"iterable of Parameters"),
    R("optim-int", lambda c: optim.Adam(5), TypeError, r"iterable of Parameters"),
    R("optim-duplicate", lambda c: optim.SGD([c.params[0], c.params[0]], lr=0.1), ValueError,
      r"params\[1\] appears more than once"),
    R("optim-unknown-name", lambda c: optim.get("lbfgs", c.params), ValueError,
      r"unknown optimizer 'lbfgs'"),
    R("grad-set-wrong-shape", lambda c: setattr(c.params[4], "grad", np.ones((3, 8))),
      ValueError, r"grad must have the parameter's shape \(8, 3\), got \(3, 8\)"),
    R("grad-set-junk", lambda c: setattr(c.params[4], "grad", "abc"), TypeError, r"grad"),
    # (the array itself replaced, as only code inside fastprop could)
    R("step-grad-wrong-shape", lambda c: c.opt.step(), ValueError,
      r"params\[4\]\.grad must be an array of shape \(8, 3\)",
      setup=lambda c: setattr(c.params[4], "_grad", np.ones((3, 8), np.float32))),
    R("step-grad-wrong-dtype", lambda c: c.opt.step(), ValueError, r"dtype float32",
      setup=lambda c: setattr(c.params[-1], "_grad", np.ones(3))),
    R("step-grad-none", lambda c: c.opt.step(), ValueError, r"params\[5\]\.grad",
      setup=lambda c: setattr(c.params[-1], "_grad", None)),
    R("load-state-dict-type", lambda c: c.opt.load_state_dict({"state": []}), ValueError,
      r"state_dict is for None"),
    R("load-state-dict-junk", lambda c: c.opt.load_state_dict([1, 2]), ValueError,
      r"state_dict must be a dict"),
    R("clip-norm-zero", lambda c: fp.clip_grad_norm(c.params, 0.0), ValueError,
      r"Invalid max_norm"),
    R("clip-norm-negative", lambda c: fp.clip_grad_norm(c.params, -1.0), ValueError,
      r"Invalid max_norm"),
    R("clip-norm-str", lambda c: fp.clip_grad_norm(c.params, "1"), TypeError, r"max_norm"),
    R("clip-value-negative", lambda c: fp.clip_grad_value(c.params, -1.0), ValueError,
      r"Invalid value"),
    R("clip-empty", lambda c: fp.clip_grad_norm([], 1.0), ValueError, r"empty"),
    # ---------------------------------------------------------------- fit / predict / evaluate
    R("fit-nan-x", lambda c: c.fit(X=c.with_last(np.nan)), ValueError,
      r"X contains 1 NaN or infinite value"),
    R("fit-inf-x", lambda c: c.fit(X=c.with_last(np.inf)), ValueError, r"X contains 1 NaN"),
    R("fit-neg-inf-x", lambda c: c.fit(X=c.with_last(-np.inf)), ValueError, r"X contains"),
    R("fit-nan-y-mse", lambda c: c.fit(y=np.r_[np.zeros((19, 3)), [[0, np.nan, 0]]],
                                       loss="mse"), ValueError, r"y contains 1 NaN"),
    R("fit-inf-y-mse", lambda c: c.fit(y=np.r_[np.zeros((19, 3)), [[0, np.inf, 0]]],
                                       loss="mse"), ValueError, r"y contains 1 NaN"),
    R("fit-label-out-of-range", lambda c: c.fit(y=c.with_last(3, "y")), ValueError,
      r"labels must lie in \[0, 3\)", kernels=True),
    R("fit-label-negative", lambda c: c.fit(y=c.with_last(-1, "y")), ValueError,
      r"labels must lie in \[0, 3\)", kernels=True),
    R("fit-label-fraction", lambda c: c.fit(y=c.y + np.r_[np.zeros(19), 0.5]), ValueError,
      r"integer class ids", kernels=True),
    R("fit-labels-str", lambda c: c.fit(y=np.array(["a"] * 20)), TypeError, r"y must hold real"),
    R("fit-x-1d", lambda c: c.fit(X=np.ones(20)), ValueError, r"X must be 2-D"),
    R("fit-x-3d", lambda c: c.fit(X=np.ones((20, 4, 1))), ValueError, r"X must be 2-D"),
    R("fit-x-width", lambda c: c.fit(X=np.ones((20, 5))), ValueError, r"X has 5 features \(shape \(20, 5\)\).* expects 4",
      kernels=True),
    R("fit-x-complex", lambda c: c.fit(X=c.X.astype(complex)), TypeError, r"X must hold real"),
    R("fit-x-object", lambda c: c.fit(X=c.X.astype(object)), TypeError, r"X must hold real"),
    R("fit-x-str", lambda c: c.fit(X=c.X.astype(str)), TypeError, r"X must hold real"),
    R("fit-x-none", lambda c: c.model.fit(None, c.y, loss="mse", optimizer=c.opt, verbose=0),
      TypeError, r"X must be an array"),
    R("fit-length-mismatch", lambda c: c.fit(y=c.y[:-1]), ValueError,
      r"y has 19 samples but X has 20"),
    R("fit-y-scalar", lambda c: c.fit(y=np.int64(1)), ValueError, r"y has 0 samples"),
    R("fit-onehot-width", lambda c: c.fit(y=np.eye(4)[c.y]), ValueError, r"\(20, 3\)",
      kernels=True),
    R("fit-mse-target-shape", lambda c: c.fit(y=np.zeros((20, 2)), loss="mse"), ValueError,
      r"target must have the prediction's shape \(20, 3\)", kernels=True),
    R("fit-empty", lambda c: c.fit(X=np.empty((0, 4)), y=np.empty(0, int)), ValueError,
      r"X is empty"),
    R("fit-epochs-negative", lambda c: c.fit(epochs=-1), ValueError, r"Invalid epochs: -1"),
    R("fit-epochs-float", lambda c: c.fit(epochs=2.0), TypeError, r"epochs must be an int"),
    R("fit-batch-zero", lambda c: c.fit(batch_size=0), ValueError, r"Invalid batch_size: 0"),
    R("fit-batch-float", lambda c: c.fit(batch_size=2.5), TypeError, r"batch_size must be an int"),
    R("fit-split-one", lambda c: c.fit(validation_split=1.0), ValueError,
      r"Invalid validation_split"),
    R("fit-split-negative", lambda c: c.fit(validation_split=-0.1), ValueError,
      r"Invalid validation_split"),
    R("fit-split-too-large", lambda c: c.fit(validation_split=0.999), ValueError,
      r"validation and 0 training samples", kernels=True),
    R("fit-valdata-not-pair", lambda c: c.fit(validation_data=c.X), TypeError,
      r"validation_data must be a pair", kernels=True),
    R("fit-valdata-nan", lambda c: c.fit(validation_data=(c.with_last(np.nan), c.y)), ValueError,
      r"validation_data\[0\] contains 1 NaN", kernels=True),
    R("fit-valdata-width", lambda c: c.fit(validation_data=(np.ones((5, 3)), np.zeros(5, int))),
      ValueError, r"validation_data\[0\] has 3 features, X has 4", kernels=True),
    R("fit-valdata-labels", lambda c: c.fit(validation_data=(c.X, c.with_last(7, "y"))),
      ValueError, r"labels must lie in \[0, 3\)", kernels=True),
    R("fit-valdata-length", lambda c: c.fit(validation_data=(c.X, c.y[:5])), ValueError,
      r"validation_data\[1\] has 5 samples but X has 20", kernels=True),
    R("fit-valdata-empty", lambda c: c.fit(validation_data=(np.empty((0, 4)), np.empty(0, int))),
      ValueError, r"validation_data\[0\] is empty", kernels=True),
    R("fit-batchnorm-last-batch-of-one", lambda c: c.fit(X=c.X[:17], y=c.y[:17], batch_size=4),
      ValueError, r"BatchNorm1d.*1 sample", kernels=True),
    R("fit-verbose", lambda c: c.fit(verbose=3), ValueError, r"verbose must be 0, 1 or 2"),
    R("fit-on-nonfinite", lambda c: c.fit(on_nonfinite="ignore"), ValueError, r"on_nonfinite"),
    R("fit-unknown-loss", lambda c: c.fit(loss="hinge"), ValueError, r"unknown loss 'hinge'"),
    R("fit-unknown-optimizer", lambda c: c.fit(optimizer="lbfgs"), ValueError,
      r"unknown optimizer 'lbfgs'"),
    R("fit-foreign-optimizer", lambda c: c.fit(optimizer=optim.SGD([fp.Parameter(np.zeros(2))],
                                                                   lr=0.1)),
      ValueError, r"optimizer does not hold any parameter of this model"),
    R("fit-no-loss", lambda c: nn.Dense(4, 3).fit(c.X, c.y, optimizer="sgd", verbose=0),
      ValueError, r"fit needs loss="),
    R("predict-width", lambda c: c.model.predict(np.ones((3, 5))), ValueError, r"\(batch, 4\)",
      kernels=True),
    R("predict-batch-size", lambda c: c.model.predict(c.X, batch_size=0), ValueError,
      r"Invalid batch_size"),
    R("predict-complex", lambda c: c.model.predict(c.X.astype(complex)), TypeError, r"X must"),
    R("evaluate-no-loss", lambda c: nn.Dense(4, 3).evaluate(c.X, c.y), ValueError,
      r"evaluate needs loss="),
    R("evaluate-nan", lambda c: c.model.evaluate(c.with_last(np.nan), c.y, loss="cross_entropy"),
      ValueError, r"X contains 1 NaN"),
    R("evaluate-labels", lambda c: c.model.evaluate(c.X, c.with_last(5, "y"),
                                                    loss="cross_entropy"),
      ValueError, r"labels must lie in", kernels=True),
    R("compile-foreign-optimizer", lambda c: c.model.compile(
        "mse", optim.SGD([fp.Parameter(np.zeros(2))], lr=0.1)), ValueError,
      r"optimizer does not hold"),
    R("fit-shuffle-str", lambda c: c.fit(shuffle="no"), TypeError, r"shuffle must be a bool"),
    R("fit-seed-negative", lambda c: c.fit(seed=-1), ValueError, r"Invalid seed: -1"),
    R("fit-seed-str", lambda c: c.fit(seed="0"), TypeError, r"seed must be an int"),
    R("fit-seed-float", lambda c: c.fit(seed=1.5), TypeError, r"seed must be an int"),
    # ---------------------------------------------------------------- fit checkpoints
    R("fit-checkpoint-type", lambda c: c.fit(checkpoint=5), TypeError,
      r"checkpoint must be a path"),
    R("fit-checkpoint-no-dir", lambda c: c.fit(checkpoint=_no_dir(c)), ValueError,
      r"checkpoint directory .* does not exist"),
    R("fit-checkpoint-is-dir", lambda c: c.fit(checkpoint="."), ValueError, r"is a directory"),
    R("fit-resume-no-checkpoint", lambda c: c.fit(resume=True), ValueError,
      r"resume=True needs checkpoint"),
    R("fit-resume-type", lambda c: c.fit(checkpoint="x.ckpt", resume="yes"), TypeError,
      r"resume must be a bool"),
    R("fit-checkpoint-every-zero", lambda c: c.fit(checkpoint_every=0), ValueError,
      r"Invalid checkpoint_every: 0"),
    R("fit-checkpoint-every-float", lambda c: c.fit(checkpoint_every=2.0), TypeError,
      r"checkpoint_every must be an int"),
    # ---------------------------------------------------------------- compiled step / fused path
    R("step-x-width", lambda c: c.step(np.ones((5, 3)), c.y[:5]), ValueError, r"\(batch, 4\)",
      kernels=True),
    R("step-x-1d", lambda c: c.step(np.ones(4), c.y[:1]), ValueError, r"\(batch, 4\)",
      kernels=True),
    R("step-x-complex", lambda c: c.step(c.X[:5].astype(complex), c.y[:5]), TypeError,
      r"x must hold real", kernels=True),
    R("step-x-none", lambda c: c.step(None, c.y[:5]), TypeError, r"x must be an array",
      kernels=True),
    R("step-labels-count", lambda c: c.step(c.X[:5], c.y[:4]), ValueError,
      r"labels must have shape \(5,\)", kernels=True),
    R("step-label-out-of-range", lambda c: c.step(c.X[:5], [0, 1, 2, 3, 0]), ValueError,
      r"labels must lie in \[0, 3\) for 3 classes, got values in \[0, 3\]", kernels=True),
    R("step-label-negative", lambda c: c.step(c.X[:5], [0, 1, -2, 1, 0]), ValueError,
      r"labels must lie in \[0, 3\) for 3 classes, got values in \[-2, 1\]", kernels=True),
    R("step-onehot-shape", lambda c: c.step(c.X[:5], np.eye(4)[:5]), ValueError,
      r"\(5, 3\)", kernels=True),
    R("step-labels-str", lambda c: c.step(c.X[:5], np.array(list("abcde"))), TypeError,
      r"labels must hold real", kernels=True),
    R("step-empty", lambda c: c.step(np.empty((0, 4)), np.empty(0, int)), ValueError,
      r"empty", kernels=True),
    R("step-x-nan", lambda c: c.step(_with(c.X[:5], (3, 1), np.nan), c.y[:5]), ValueError,
      r"x contains 1 NaN or infinite", kernels=True),
    R("step-x-inf", lambda c: c.step(_with(c.X[:5], (0, 0), -np.inf), c.y[:5]), ValueError,
      r"x contains 1 NaN or infinite", kernels=True),
    R("bn-step-x-nan", lambda c: c.model.compile("cross_entropy", c.opt)(
        _with(c.X[:5], (4, 3), np.nan), c.y[:5]), ValueError, r"x contains 1 NaN",
      kernels=True),
    R("bn-step-label-out-of-range", lambda c: c.model.compile("cross_entropy", c.opt)(
        c.X[:5], [0, 1, 2, 3, 0]), ValueError, r"labels must lie in \[0, 3\)", kernels=True),
    R("bn-step-mse-shape", lambda c: c.model.compile("mse", c.opt)(c.X[:5], np.zeros((5, 2))),
      ValueError, r"target must have the prediction's shape \(5, 3\)", kernels=True),
    R("bn-step-x-width", lambda c: c.model.compile("mse", c.opt)(c.X[:5, :3], np.zeros((5, 3))),
      ValueError, r"\(batch, 4\)", kernels=True),
    R("chain-fit-nan", lambda c: _fit_chain(c, X=c.with_last(np.nan)), ValueError,
      r"X contains 1 NaN", kernels=True),
    R("chain-fit-labels", lambda c: _fit_chain(c, y=c.with_last(3, "y")), ValueError,
      r"labels must lie in \[0, 3\)", kernels=True),
    R("chain-fit-mse-width", lambda c: _fit_chain(c, y=np.zeros((20, 4)), loss="mse"),
      ValueError, r"\(20, 3\)", kernels=True),
    # ---------------------------------------------------------------- misc entry points
    R("parameter-complex", lambda c: fp.Parameter(np.ones(3, complex)), TypeError,
      r"value must hold real"),
    R("parameter-str", lambda c: fp.Parameter(["a", "b"]), TypeError, r"value must hold real"),
    R("optim-set-lr-negative", lambda c: setattr(c.opt, "lr", -1.0), ValueError, r"Invalid lr"),
    R("optim-set-lr-inf", lambda c: setattr(c.opt, "lr", float("inf")), ValueError,
      r"Invalid lr: inf; expected a finite number"),
    R("sgd-momentum-inf", lambda c: optim.SGD(c.params, lr=0.1, momentum=float("inf")),
      ValueError, r"Invalid momentum: inf"),
    R("adam-eps-inf", lambda c: optim.Adam(c.params, eps=float("inf")), ValueError,
      r"Invalid eps: inf"),
    R("adamw-decay-inf", lambda c: optim.AdamW(c.params, weight_decay=float("inf")),
      ValueError, r"Invalid weight_decay: inf"),
    R("optim-set-lr-str", lambda c: setattr(c.opt, "lr", "big"), TypeError, r"lr must be a real"),
    R("load-state-dict-shape", lambda c: c.opt.load_state_dict(
        {**c.opt.state_dict(), "state": [{k: np.zeros(3) for k in s} for s in
                                          c.opt.state_dict()["state"]]}),
      ValueError, r"has shape \(3,\), expected \(4, 8\)"),
    R("load-state-dict-count", lambda c: c.opt.load_state_dict(
        {**c.opt.state_dict(), "state": c.opt.state_dict()["state"][:2]}),
      ValueError, r"state for 2 parameters, the optimizer has 6"),
    R("load-state-dict-hyper", lambda c: c.opt.load_state_dict(
        {**c.opt.state_dict(), "hyper": {**c.opt.hyper, "lr": -1}}), ValueError,
      r"state_dict has invalid hyperparameters: Invalid lr"),
    R("load-state-dict-group-lr", lambda c: c.opt.load_state_dict(
        {**c.opt.state_dict(), "param_groups": [{**g, "lr": -1} for g in
                                                c.opt.state_dict()["param_groups"]]}),
      ValueError, r"state_dict's parameter group 0 is invalid: Invalid lr"),
    R("load-state-dict-step", lambda c: c.opt.load_state_dict(
        {**c.opt.state_dict(), "step": -3}), ValueError, r"state_dict's step must be >= 0, got -3"),
    R("gradcheck-eps-zero", lambda c: fp.gradcheck(nn.Dense(2, 2), np.ones((1, 2)), eps=0.0),
      ValueError, r"Invalid eps"),
    R("gradcheck-rtol-str", lambda c: fp.gradcheck(nn.Dense(2, 2), np.ones((1, 2)), rtol="1"),
      TypeError, r"rtol must be a real"),
    R("load-none", lambda c: fp.load(None), TypeError, r"NoneType"),
    R("evaluate-length", lambda c: c.model.evaluate(c.X, c.y[:3], loss="cross_entropy"),
      ValueError, r"y has 3 samples but X has 20"),
    R("evaluate-batch-size", lambda c: c.model.evaluate(c.X, c.y, loss="mse", batch_size=-1),
      ValueError, r"Invalid batch_size"),
    R("predict-none", lambda c: c.model.predict(None), TypeError, r"X must be an array"),
    R("compile-not-module", lambda c: fp.train.compile_step(3, "mse", c.opt), TypeError,
      r"model must be a fastprop Module"),
    R("compile-unknown-loss", lambda c: c.chain.compile("hinge", "sgd"), ValueError,
      r"unknown loss 'hinge'"),
    R("init-bad-shape", lambda c: fp.init.xavier_uniform((2, 3, 4)), ValueError,
      r"shape must be 1-D or 2-D"),
    R("dense-alpha-str", lambda c: nn.Dense(3, 2, activation="leaky_relu", alpha="0.1"),
      TypeError, r"alpha must be a real"),
    R("layernorm-eps-str", lambda c: nn.LayerNorm(3, eps="1e-5"), TypeError, r"eps"),
    R("batchnorm-momentum-str", lambda c: nn.BatchNorm1d(3, momentum="0.1"), TypeError,
      r"momentum"),
    R("batchnorm-affine-str", lambda c: nn.BatchNorm1d(3, affine="False"), TypeError,
      r"affine must be a bool"),
    R("layernorm-bias-str", lambda c: nn.LayerNorm(3, bias="no"), TypeError,
      r"bias must be a bool"),
    # ---------------------------------------------------------------- backends & config
    R("backend-unknown", lambda c: fp.set_backend("tpu"), ValueError,
      r"unknown backend 'tpu'; expected one of \('native', 'numpy', 'cuda'\)"),
    R("backend-case", lambda c: fp.set_backend("NumPy"), ValueError, r"unknown backend 'NumPy'"),
    R("backend-type", lambda c: fp.set_backend(None), TypeError, r"backend must be a str"),
    R("use-backend-unknown", lambda c: fp.use_backend("gpu").__enter__(), ValueError,
      r"unknown backend 'gpu'"),
    R("backend-cuda", lambda c: fp.set_backend("cuda"), fp.BackendUnavailableError, r"cuda",
      setup=_cuda_unavailable),
    R("to-unknown-device", lambda c: c.model.to("gpu"), ValueError,
      r"device must be 'cpu' or 'cuda'"),
    R("to-cuda", lambda c: c.model.to("cuda"), fp.BackendUnavailableError, r"cuda",
      setup=_cuda_unavailable),
    R("threads-zero", lambda c: fp.set_num_threads(0), ValueError, r"Invalid n: 0"),
    R("threads-float", lambda c: fp.set_num_threads(1.5), TypeError, r"n must be an int"),
    R("save-non-module", lambda c: fp.save(c.params, "/nonexistent-dir/never.fp"), TypeError,
      r"model must be a fastprop Module"),
    # a compiled step that runs layer by layer (the model has BatchNorm and Dropout):
    # the forward runs before the loss sees the labels; the Dropout masks it drew are
    # given back with the running statistics
    R("layer-step-labels-out-of-range",
      lambda c: c.model.compile("cross_entropy", c.opt)(c.X[:5], np.full(5, 7)), ValueError,
      r"labels must lie in \[0, 3\)", kernels=True),
    R("layer-step-labels-none",
      lambda c: c.model.compile("cross_entropy", c.opt)(c.X[:5], None), TypeError,
      r"labels must be an array", kernels=True),
    # backward after the first layer ran alone on another batch: refused before the
    # later layers add to their gradients
    R("seq-backward-layer-run-alone", lambda c: c.model.backward(np.ones((5, 3))), ValueError,
      r"layer 0 \(Dense\)'s last forward gave shape \(7, 8\), but layer 1 "
      r"\(BatchNorm1d\)'s last forward took \(5, 8\)",
      setup=lambda c: (c.model(c.X[:5]), c.model[0](c.X[:7]))),
    R("zero-grad-set-to-none-str", lambda c: c.model.zero_grad(set_to_none="no"), TypeError,
      r"set_to_none must be a bool, got str"),
    R("opt-zero-grad-set-to-none-str", lambda c: c.opt.zero_grad("no"), TypeError,
      r"set_to_none must be a bool, got str"),
    R("backward-input-grad-str", lambda c: c.model.backward(np.ones((5, 3)), input_grad="no"),
      TypeError, r"input_grad must be a bool, got str", setup=lambda c: c.model(c.X[:5])),
    R("sgd-lr-int-beyond-float", lambda c: optim.SGD(c.model.parameters(), lr=10 ** 400),
      ValueError, r"Invalid lr: an integer too large for a float \(401 digits\)"),
    R("loss-get-int", lambda c: losses.get(3), TypeError,
      r"loss must be a fastprop.losses.Loss or a name, got int"),
    R("load-path-int", lambda c: fp.load(3), TypeError,
      r"path must be a file path \(str or os.PathLike\) or a binary file object with "
      r"read\(\), got int"),
    R("save-path-none", lambda c: fp.save(c.model, None), TypeError,
      r"path must be a file path .* with write\(\), got NoneType"),
    # (arrays of other shapes may be assigned, as in PyTorch's net surgery; the
    # forward refuses a layer whose arrays do not match its sizes, naming them)
    R("dense-weight-of-another-shape", lambda c: c.dense(c.X[:2]), ValueError,
      r"Dense\(4, 8\): weight must have shape \(4, 8\) and bias \(8,\), got \(32,\)",
      kernels=True,  # (the kernel refuses it; the layer then names the arrays)
      setup=lambda c: setattr(c.dense, "weight", fp.Parameter(np.ones(32, np.float32)))),
    R("bn-running-mean-of-another-shape", lambda c: c.bn(np.ones((3, 8))), ValueError,
      r"BatchNorm1d\(8\): running_mean must have shape \(8,\), got \(3,\)",
      kernels=True,  # (the kernel refuses it; the layer then names the array)
      setup=lambda c: setattr(c.bn, "running_mean", np.zeros(3, np.float32))),
    R("gradcheck-nan-input", lambda c: fp.gradcheck(c.dense, _with(c.a, (0, 0), np.nan)),
      ValueError, r"inputs contains 1 NaN"),
    R("gradcheck-non-callable", lambda c: fp.gradcheck(3, np.ones(2)), TypeError,
      r"gradcheck needs a Module"),
]


class _NoKernels:
    """A backend that fails the test if any kernel is called."""

    name = "numpy"

    def __getattr__(self, attr):
        raise AssertionError(f"kernel {attr!r} was called before the bad input was rejected")


def _ids(rows):
    ids = [r.id for r in rows]
    assert len(ids) == len(set(ids)), "duplicate row ids"
    return ids


def _params(rows):
    _ids(rows)
    return [pytest.param(r, id=r.id, marks=[pytest.mark.xfail(strict=True, reason=r.xfail)]
                         if r.xfail else []) for r in rows]


@pytest.mark.parametrize("row", _params(ROWS))
def test_bad_input(backend, row, monkeypatch):
    ctx = Ctx()
    ctx.monkeypatch = monkeypatch
    if row.setup is not None:
        row.setup(ctx)
    before = snapshot(ctx.model, ctx.opt) + snapshot(ctx.chain, ctx.chain_opt)
    backend_before = fp.get_backend()
    with pytest.raises(row.exc) as info:
        if row.kernels:
            row.call(ctx)
        else:
            prev = getattr(backends._state, "backend", None)
            backends._state.backend = _NoKernels()
            try:
                row.call(ctx)
            finally:
                backends._state.backend = prev
    assert type(info.value) is row.exc or row.exc is not TypeError, \
        f"expected exactly {row.exc.__name__}, got {type(info.value).__name__}"
    msg = str(info.value)
    assert re.search(row.match, msg), f"message {msg!r} does not match {row.match!r}"
    assert snapshot(ctx.model, ctx.opt) + snapshot(ctx.chain, ctx.chain_opt) == before, \
        "a rejected call changed a model or an optimizer"
    assert fp.get_backend() == backend_before


def test_table_covers_every_exception_kind():
    kinds = {r.exc for r in ROWS}
    assert {ValueError, TypeError, RuntimeError, fp.BackendUnavailableError} <= kinds
