"""Saving and loading models: architecture and arrays in one checksummed file.

File layout (little-endian)::

    magic      9 bytes   b"\\x93FASTPROP"
    version    uint32    1
    hlen       uint64    length of the JSON header
    header     hlen bytes UTF-8 JSON: {"model": <architecture tree>, "arrays": [...]}
    data       the raw bytes of every array, in header order
    digest     32 bytes  SHA-256 of everything before it

No pickle is involved: loading a file cannot run code.  ``save`` writes to a
temporary file in the same directory and renames it over the target, so a crash
never leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile

import numpy as np

from .nn import Module, Residual, Sequential, _registry

__all__ = ["save", "load", "model_to_tree", "model_from_tree"]

MAGIC = b"\x93FASTPROP"
VERSION = 1
_PREFIX = struct.Struct("<IQ")


def model_to_tree(model: Module) -> dict:
    tree = {"class": type(model).__name__, "config": model.get_config(),
            "training": model._training}
    children = model.children()
    if children:
        tree["children"] = [model_to_tree(c) for c in children]
    return tree


def model_from_tree(tree: dict) -> Module:
    try:
        cls = _registry[tree["class"]]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"unknown layer in model file: {exc}") from None
    children = [model_from_tree(c) for c in tree.get("children", [])]
    if cls is Sequential:
        model = Sequential(*children)
    elif cls is Residual:
        if len(children) != 1:
            raise ValueError("corrupt model file: Residual needs exactly one block")
        model = Residual(children[0])
    else:
        model = cls(**tree.get("config", {}))
    model.training = bool(tree.get("training", True))
    return model


def save(model: Module, path, extra: dict | None = None) -> None:
    """Write ``model`` (architecture, parameters, buffers) to ``path`` atomically."""
    if not isinstance(model, Module):
        raise TypeError(f"model must be a fastprop Module, got {type(model).__name__}")
    arrays = [(name, np.ascontiguousarray(a)) for name, a in model.state_arrays()]
    if extra:
        arrays += [(f"extra.{k}", np.ascontiguousarray(v)) for k, v in extra.items()]
    entries, offset = [], 0
    for name, a in arrays:
        entries.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape),
                        "offset": offset, "nbytes": a.nbytes})
        offset += a.nbytes
    header = json.dumps({"model": model_to_tree(model), "arrays": entries,
                         "tied": _tied_parameters(model)}).encode()
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=".fastprop-", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        with os.fdopen(fd, "wb") as f:
            for chunk in (MAGIC, _PREFIX.pack(VERSION, len(header)), header):
                f.write(chunk)
                digest.update(chunk)
            for _, a in arrays:
                buf = memoryview(a.reshape(-1)).cast("B") if a.size else b""
                f.write(buf)
                digest.update(buf)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _tied_parameters(model: Module) -> dict:
    """{"j.attr": "i.attr"}: the Parameter of module j's ``attr`` is the one first held
    by module i (weight tying), in ``model.modules()`` order as ``state_arrays`` names
    them; ``load`` restores the sharing."""
    first, tied = {}, {}
    for i, mod in enumerate(model.modules()):
        for attr in mod._params:
            p = getattr(mod, attr)
            if p is None:
                continue
            name = f"{i}.{attr}"
            if id(p) in first:
                tied[name] = first[id(p)]
            else:
                first[id(p)] = name
    return tied


def _tie_parameters(model: Module, tied, where: str) -> None:
    mods = list(model.modules())

    def holder(name):
        try:
            i, attr = name.split(".", 1)
            mod = mods[int(i)]
            if attr not in mod._params or getattr(mod, attr) is None:
                raise ValueError
            return mod, attr
        except (ValueError, IndexError, AttributeError):
            raise ValueError(f"{where}: corrupt parameter tie {name!r}") from None

    if not isinstance(tied, dict):
        raise ValueError(f"{where}: corrupt parameter ties")
    for name, source in tied.items():
        (mod, attr), (src_mod, src_attr) = holder(name), holder(str(source))
        p = getattr(src_mod, src_attr)
        if getattr(mod, attr).value.shape != p.value.shape:
            raise ValueError(f"{where}: tied parameters {name!r} and {source!r} differ in shape")
        setattr(mod, attr, p)


def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: the (briefly racy) set-and-restore
    os.umask(mask)
    return mask


def _read(path):
    path = os.fspath(path)
    with open(path, "rb") as f:  # OSError (FileNotFoundError, ...) propagates
        blob = f.read()
    head = len(MAGIC) + _PREFIX.size
    if len(blob) < head + 32 or not blob.startswith(MAGIC):
        raise ValueError(f"{path!r} is not a fastprop model file (bad magic or truncated)")
    version, hlen = _PREFIX.unpack_from(blob, len(MAGIC))
    if version != VERSION:
        raise ValueError(f"{path!r} has format version {version}; this fastprop reads {VERSION}")
    body, digest = blob[:-32], blob[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise ValueError(f"{path!r} is corrupt or truncated (checksum mismatch)")
    try:
        header = json.loads(body[head:head + hlen].decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{path!r} has a corrupt header: {exc!r}") from None
    data = memoryview(body)[head + hlen:]
    arrays = {}
    try:
        for e in header.get("arrays", []):
            dt = np.dtype(e["dtype"])
            count = int(np.prod(e["shape"], dtype=np.int64))
            if e["offset"] + count * dt.itemsize > len(data):
                raise ValueError(f"{path!r} is truncated: array {e['name']!r} runs past the end")
            arrays[e["name"]] = np.frombuffer(data, dtype=dt, count=count,
                                              offset=e["offset"]).reshape(e["shape"])
    except (AttributeError, KeyError, TypeError, OverflowError, MemoryError) as exc:
        raise ValueError(f"{path!r} has a corrupt array table: {exc!r}") from None
    return header, arrays


def load(path) -> Module:
    """Read a model written by :func:`save`.

    Raises:
        OSError: the file cannot be opened (e.g. it does not exist).
        ValueError: the file is not a fastprop model, or is corrupt or truncated.
    """
    header, arrays = _read(path)
    where = repr(os.fspath(path))
    try:
        model = model_from_tree(header["model"])
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
        raise ValueError(f"{where} describes an invalid model: {exc!r}") from None
    for name, target in model.state_arrays():
        src = arrays.get(name)
        if src is None or src.shape != target.shape or src.dtype != target.dtype:
            raise ValueError(f"{where}: array {name!r} is missing or has the wrong shape or "
                             f"dtype (want {target.shape} {target.dtype}, file has "
                             f"{getattr(src, 'shape', None)} {getattr(src, 'dtype', None)})")
        target[...] = src
    _tie_parameters(model, header.get("tied", {}), where)
    model._extra = {k[6:]: v.copy() for k, v in arrays.items() if k.startswith("extra.")}
    return model
