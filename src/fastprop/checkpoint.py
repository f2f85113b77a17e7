"""Training checkpoints for ``fit(..., checkpoint=path, resume=True)``.

A checkpoint is an ordinary model file (:func:`fastprop.save`: atomic, checksummed;
``fastprop.load`` reads it as a model) whose extra arrays hold everything else a
resumed ``fit`` needs to continue exactly where the interrupted one stopped:

* ``opt.<i>.<name>``: the optimizer's per-parameter state arrays;
* ``fit``: UTF-8 JSON (as uint8) with the format version, the epochs done, the
  optimizer's type, hyperparameters and step count, the bit-generator states of the
  shuffling generator and of every Dropout layer, the history so far, and the fit
  settings that decide which batches are drawn (sample count, batch size, shuffle).

Resuming with the same model architecture, data, settings, backend and thread count
gives bit-identical parameters to a run that was never interrupted.
"""

from __future__ import annotations

import json
import os

import numpy as np

from . import serialization
from .nn import _COUNT_KEY, Dropout, Module
from .nn import _check_count_array as check_count_array

FORMAT = 1


#: optimizer state that sums squares (never negative; +inf after an overflow)
_SECOND_MOMENTS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})


def check_path(path, resume) -> str:
    """Validate fit's ``checkpoint=`` / ``resume=`` arguments; the path as a str."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path (str or os.PathLike), got "
                        f"{type(path).__name__}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"checkpoint directory {directory!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is a directory, not a file path")
    if not isinstance(resume, (bool, np.bool_)):
        raise TypeError(f"resume must be a bool, got {type(resume).__name__}")
    return path


def _dropouts(model: Module) -> list:
    return [m for m in model.modules() if isinstance(m, Dropout)]


def _rng_state(gen) -> dict:
    """A generator's bit-generator state as JSON (arrays, e.g. MT19937's key, as
    tagged lists)."""
    def enc(v):
        if isinstance(v, dict):
            return {k: enc(x) for k, x in v.items()}
        if isinstance(v, np.ndarray):
            return {"__ndarray__": v.tolist(), "dtype": v.dtype.str}
        if isinstance(v, np.integer):
            return int(v)
        return v
    return enc(gen.bit_generator.state)


def _rng_from_state(state) -> np.random.Generator:
    """A new generator of the bit generator a saved state names, in that state."""
    def ints(v, low, high, what):
        # (every integer of a bit generator's state is unsigned; NumPy 1.x wraps a
        # negative or oversized one silently where NumPy 2 raises: checked here)
        if isinstance(v, list):
            for x in v:
                ints(x, low, high, what)
        elif isinstance(v, int) and not low <= v < high:
            raise ValueError(f"the saved random state's {what} holds {v}, outside "
                             f"[{low}, {high})")

    def dec(v, key="state"):
        if isinstance(v, dict):
            if set(v) == {"__ndarray__", "dtype"}:
                dtype = np.dtype(v["dtype"])
                if dtype.kind in "ui":
                    info = np.iinfo(dtype)
                    ints(v["__ndarray__"], int(info.min), int(info.max) + 1, key)
                return np.array(v["__ndarray__"], dtype=dtype)
            return {k: dec(x, k) for k, x in v.items()}
        ints(v, 0, 2 ** 128, key)
        return v
    state = dec(state)
    kind = getattr(np.random, str(state["bit_generator"]), None)
    if not (isinstance(kind, type) and issubclass(kind, np.random.BitGenerator)):
        raise ValueError(f"unknown bit generator {state['bit_generator']!r}")
    bits = kind()
    bits.state = state
    return np.random.Generator(bits)


def save(path, model, optimizer, epochs_done, rng, history, settings) -> None:
    """Write the state after ``epochs_done`` epochs to ``path`` atomically."""
    sd = optimizer.state_dict()
    extra = {f"opt.{i}.{k}": v for i, s in enumerate(sd["state"]) for k, v in s.items()}
    meta = {
        "format": FORMAT,
        "epochs_done": int(epochs_done),
        "settings": settings,
        "optimizer": {"type": sd["type"], "hyper": sd["hyper"], "step": int(sd["step"]),
                      "steps": sd["steps"], "groups": sd["param_groups"]},
        "rng": _rng_state(rng),
        "dropout_rngs": [_rng_state(m.rng) for m in _dropouts(model)],
        "history": {"epoch": history.epoch, "history": history.history,
                    "skipped_steps": history.skipped_steps,
                    "stopped_epoch": history.stopped_epoch},
    }
    extra["fit"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    serialization.save(model, path, extra=extra, checkpoint=True)


def prepare_resume(path, model, optimizer, settings):
    """Read and check the checkpoint at ``path`` against ``model``, ``optimizer`` and
    the fit ``settings``; returns ``restore(rng, history) -> epochs_done``, which
    applies it.  Nothing changes until ``restore`` is called, so a checkpoint of
    another architecture, optimizer or fit setting (ValueError) leaves every object
    as it was.
    """
    header, arrays, _ = serialization._read(path)
    where = f"checkpoint {os.fspath(path)!r}"
    raw = arrays.get("extra.fit")
    if raw is None:
        raise ValueError(f"{where} is a model file, not a fit checkpoint")
    try:
        meta = json.loads(bytes(raw).decode())
        epochs_done = int(meta["epochs_done"])
        opt_meta = meta["optimizer"]
        if not isinstance(opt_meta, dict):
            raise TypeError(f"optimizer entry {opt_meta!r}")
        hist = meta["history"]
        rng_state, drop_states = meta["rng"], meta["dropout_rngs"]
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')}; this fastprop reads {FORMAT}")
        # generators: build them now, so that a bad state fails before any change
        new_rng = _rng_from_state(rng_state)
        new_drops = [_rng_from_state(s) for s in drop_states]
        history_epoch = [int(e) for e in hist["epoch"]]
        if not 0 <= epochs_done == len(history_epoch):
            raise ValueError(f"{epochs_done} epochs done, {len(history_epoch)} in the history")
        history_logs = {str(k): [float(x) for x in v] for k, v in hist["history"].items()}
        skipped = int(hist["skipped_steps"])
        stopped = hist.get("stopped_epoch")  # (absent before callbacks existed)
        stopped = None if stopped is None else int(stopped)
    except (UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError,
            OverflowError) as exc:
        raise ValueError(f"{where} has invalid fit metadata: {exc}") from None
    saved = meta.get("settings")
    if isinstance(saved, dict) and "loss" not in saved:  # (written before it was saved)
        settings = {k: v for k, v in settings.items() if k != "loss"}
    if saved != settings:
        raise ValueError(f"{where} was written by a fit with settings {meta.get('settings')}; "
                         f"this fit has {settings}: resume with the same data and settings")
    # the model: same architecture (layer classes, nesting, settings such as the
    # activations and Dropout rates), every array present with its shape and dtype
    # (a BatchNorm's batch count may be missing: written before it was kept)
    found = serialization.architecture_mismatch(header.get("model"), model)
    if found is not None:
        raise ValueError(f"{where} holds another architecture than this model: {found}")
    targets = model.state_arrays()
    names = {e.get("name") for e in header.get("arrays", [])}
    names = {n for n in names if isinstance(n, str) and not n.startswith("extra.")}
    want = {name for name, _ in targets}
    if not names <= want or any(not n.endswith(_COUNT_KEY) for n in want - names):
        raise ValueError(f"{where} holds another architecture than this model")
    for name, target in targets:
        src = arrays.get(name)
        if src is None:
            continue
        if src.shape != target.shape or src.dtype != target.dtype:
            raise ValueError(f"{where}: array {name!r} has shape {src.shape} / {src.dtype}, "
                             f"the model {target.shape} / {target.dtype}")
        if name.endswith(_COUNT_KEY):
            check_count_array(src, f"{where}: array {name!r}")
    # (a fit never writes NaN or inf into a parameter or buffer: the step that makes
    # one is not applied; an optimizer's second moment, though, can overflow to +inf
    # from a finite gradient, as PyTorch's does: kept, so that the run goes on as it
    # would have.  A first moment or momentum at +-inf would make the next update
    # non-finite: never written with finite parameters)
    for key, arr in arrays.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            if (key.startswith("extra.opt.") and key.rsplit(".", 1)[-1] in _SECOND_MOMENTS
                    and not (np.isnan(arr).any() or np.isneginf(arr).any())):
                continue
            raise ValueError(f"{where}: array {key!r} holds NaN or infinite values")
    frozen = header.get("frozen")  # (absent before the flags were saved)
    params = dict(model.named_parameters())
    if frozen is not None:
        frozen = serialization.frozen_names(params, frozen, where)
    drops = _dropouts(model)
    if len(new_drops) != len(drops):
        raise ValueError(f"{where} has {len(new_drops)} Dropout generators, the model "
                         f"{len(drops)}")
    state = [{} for _ in optimizer.params]
    for key, arr in arrays.items():
        if key.startswith("extra.opt."):
            i, _, name = key[len("extra.opt."):].partition(".")
            if not i.isdigit() or int(i) >= len(state):
                raise ValueError(f"{where} has optimizer state for parameter {i}; the "
                                 f"optimizer has {len(state)} parameters")
            state[int(i)][name] = arr
    sd = {"type": opt_meta.get("type"), "hyper": opt_meta.get("hyper"),
          "step": opt_meta.get("step", 0), "state": state}
    if opt_meta.get("groups") is not None:  # (absent before parameter groups)
        sd["param_groups"] = opt_meta["groups"]
    if opt_meta.get("steps") is not None:  # (absent before per-parameter step counts)
        sd["steps"] = opt_meta["steps"]
    # validate on a throwaway optimizer of the same type over the same parameters
    try:
        optimizer._probe().load_state_dict(sd)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        raise ValueError(f"{where} has an invalid optimizer state: {exc}") from None

    def restore(rng, history) -> int:
        optimizer.load_state_dict(sd)
        if frozen is not None:
            for name, p in params.items():
                p.requires_grad = name not in frozen
        for name, target in targets:
            if name in arrays:
                target[...] = arrays[name]
        rng.bit_generator.state = new_rng.bit_generator.state
        for m, g in zip(drops, new_drops):
            m.rng = g
        history.epoch[:] = history_epoch
        history.history.clear()
        history.history.update(history_logs)
        history.skipped_steps = skipped
        history.stopped_epoch = stopped
        return epochs_done

    return restore
