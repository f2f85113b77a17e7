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
import inspect
import io
import json
import os
import secrets
import stat
import struct

import numpy as np

from ._checks import flag
from .ops import activation_code
from .nn import (_COUNT_KEY, Module, Residual, Sequential, _check_count_array, _loading,
                 _registry, _registry_key)

__all__ = ["save", "load", "model_to_tree", "model_from_tree"]

MAGIC = b"\x93FASTPROP"
VERSION = 1
_PREFIX = struct.Struct("<IQ")


def model_to_tree(model: Module) -> dict:
    tree = {"class": _registry_key(type(model)), "config": model.get_config(),
            "training": model._training}
    children = model.children()
    if children:
        tree["children"] = [model_to_tree(c) for c in children]
    return tree


_NONE = object()
# (a Dropout's seed: a resumed fit restores the generators' states whatever it was)
_NOT_ARCHITECTURE = frozenset({"seed"})


def _config_defaults(cls) -> dict:
    """The constructor's JSON-able defaults, by argument name."""
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return {}
    out = {}
    for p in params:
        if p.default is not p.empty:
            try:
                out[p.name] = json.loads(json.dumps(p.default))
            except (TypeError, ValueError):
                pass
    return out


def _activation_code(name):
    try:
        return activation_code(name)
    except (TypeError, ValueError):
        return name


def architecture_mismatch(tree, model: Module, where: str = "model"):
    """None when the file's architecture ``tree`` describes ``model`` (the same layer
    classes, nesting, and configuration values where both name one: a file written
    before a setting existed does not lack it); else where they first differ."""
    if not isinstance(tree, dict):
        return f"{where}: a layer entry is {type(tree).__name__}"
    try:
        cls = _layer_class(tree.get("class"))
    except ValueError:
        cls = None
    if cls is not type(model):
        return f"{where}: {tree.get('class')} in the file, {type(model).__name__} here"
    saved, now = tree.get("config") or {}, model.get_config()
    if isinstance(saved, dict):
        now = json.loads(json.dumps(now))  # (as the file holds it: lists, not tuples)
        defaults = _config_defaults(cls)
        for key in sorted((saved.keys() | now.keys()) - _NOT_ARCHITECTURE):
            # (a setting a config leaves out is at its default: GELU's form; one
            # without a default, a file written before it existed, is not compared)
            a, b = saved.get(key, defaults.get(key, _NONE)), now.get(key, defaults.get(key, _NONE))
            if a is _NONE or b is _NONE:
                continue
            shown = a, b
            if key == "activation":  # (names of one activation: None, "identity", "linear")
                a, b = _activation_code(a), _activation_code(b)
            elif key == "dim" and cls.__name__ == "Softmax":  # (the last axis of 2-D input)
                a, b = (-1 if v == 1 else v for v in (a, b))
            if a != b:
                return (f"{where} ({type(model).__name__}): {key}={shown[0]!r} in the "
                        f"file, {shown[1]!r} here")
    kids, saved_kids = model.children(), tree.get("children") or []
    if not isinstance(saved_kids, list) or len(saved_kids) != len(kids):
        return (f"{where} ({type(model).__name__}): {len(saved_kids)} submodules in the "
                f"file, {len(kids)} here")
    for i, (sub, mod) in enumerate(zip(saved_kids, kids)):
        found = architecture_mismatch(sub, mod, f"{where}[{i}]")
        if found is not None:
            return found
    return None


def _layer_class(name):
    """The registered class a file names; a bare name that is not fastprop's (a file
    written before user classes were saved with their module) finds the user's
    class of that name when exactly one is registered."""
    cls = _registry.get(name) if isinstance(name, str) else None
    if cls is None and isinstance(name, str) and "." not in name:
        found = [c for key, c in _registry.items() if "." in key and c.__name__ == name]
        cls = found[0] if len(found) == 1 else None
    if cls is None:
        raise ValueError(f"unknown layer in model file: {name!r}")
    return cls


def model_from_tree(tree: dict, budget: list | None = None) -> Module:
    """The model a file's tree describes (unfilled).  ``budget``: ``[bytes]`` of array
    data the file holds, which the layers' configurations may not exceed (a crafted
    file cannot make the loader allocate more than the file itself provides)."""
    if budget is None:
        budget = [float("inf")]
    if not _loading.get():
        try:
            _loading.set(True)
            return model_from_tree(tree, budget)
        finally:
            _loading.set(False)
    if not isinstance(tree, dict):
        raise ValueError(f"corrupt model file: a layer entry is {type(tree).__name__}")
    cls = _layer_class(tree.get("class"))
    children = [model_from_tree(c, budget) for c in tree.get("children", [])]
    if cls is Sequential:
        model = Sequential(*children)
    elif cls is Residual:
        if len(children) != 1:
            raise ValueError("corrupt model file: Residual needs exactly one block")
        model = Residual(children[0])
    else:
        config = tree.get("config", {})
        if not isinstance(config, dict):
            raise ValueError(f"corrupt model file: a config is {type(config).__name__}")
        model = cls._from_file(config, budget)
    try:
        model.training = flag(tree.get("training", True), "training")
    except TypeError as exc:
        raise ValueError(f"corrupt model file: {exc}") from None
    return model


def _unbuildable(model: Module):
    """(module, its config, the TypeError) for the first module that ``load`` could not
    make again from its ``get_config()`` (a user's layer whose constructor takes
    arguments that ``get_config`` does not return), else None."""
    for mod in model.modules():
        cls = type(mod)
        if cls in (Sequential, Residual) or cls._from_file.__func__ is not \
                Module._from_file.__func__:
            continue
        config = mod.get_config()
        try:
            sig = inspect.signature(cls)
        except (TypeError, ValueError):  # (no signature to read: not checked)
            continue
        try:
            sig.bind(**config)
        except TypeError as exc:
            return mod, config, exc
    return None


def save(model: Module, path, extra: dict | None = None, checkpoint: bool = False) -> None:
    """Write ``model`` (architecture, parameters, buffers) to ``path`` atomically
    (``checkpoint``: the extra arrays are a fit checkpoint's, which ``load`` leaves
    out of the model).  ``path`` may also be a binary file object (``io.BytesIO``, a
    file opened ``"wb"``), as ``torch.save`` takes: written from its position, not
    atomically.  A layer of your own is made again by ``load`` as
    ``cls(**layer.get_config())``: one whose constructor needs arguments returns them
    from ``get_config`` (else ``save`` refuses it, ValueError, writing nothing; a fit
    checkpoint is still written, and resumes into a model you build)."""
    if not isinstance(model, Module):
        hint = (" (fp.save writes one model; to checkpoint a loop of your own, pickle a "
                "dict of the model, the optimizer and the scheduler's state_dict() (a "
                "scheduler built with a lambda does not pickle), or let "
                "fit(..., checkpoint=path) do it)" if isinstance(model, dict) else "")
        raise TypeError(f"model must be a fastprop Module, got {type(model).__name__}{hint}")
    if not checkpoint:
        found = _unbuildable(model)
        if found is not None:
            mod, config, exc = found
            raise ValueError(
                f"{type(mod).__name__} cannot be saved: load makes each layer again as "
                f"{type(mod).__name__}(**get_config()), and its get_config() returns "
                f"{config!r} ({exc}); define get_config() to return its constructor's "
                f"arguments (as a JSON-able dict)")
    model._sync_device()  # (a compiled step training on a device holds the values)
    arrays = [(name, _little(a)) for name, a in model.state_arrays()]
    if extra:
        arrays += [(f"extra.{k}", _little(np.ascontiguousarray(v))) for k, v in extra.items()]
    entries, offset = [], 0
    for name, a in arrays:
        entries.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape),
                        "offset": offset, "nbytes": a.nbytes})
        offset += a.nbytes
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    header = json.dumps({"model": model_to_tree(model), "arrays": entries,
                         "tied": _tied_parameters(model), "frozen": frozen,
                         "checkpoint": bool(checkpoint)}).encode()
    _not_text(path, "wb")
    if _is_stream(path, "write"):  # a file object, as torch.save takes (no atomic rename)
        for chunk in _chunks(header, arrays):
            path.write(chunk)
        return
    # (through a symbolic link: its target is replaced, and the link kept)
    path = os.path.realpath(_fspath(path, "write"))
    directory = os.path.dirname(path)
    try:  # a file replaced keeps its permissions (the temporary file is made 0600)
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = 0o666 & ~_umask()
    # (a name of our own, created inside the try: an exception anywhere after this
    # point, Ctrl-C included, removes the file; mkstemp's descriptor, handed on
    # outside any try, could leak with its file)
    tmp = os.path.join(directory, f".fastprop-{secrets.token_hex(16)}.tmp")
    try:
        # (exclusive: never another's file; 0600 while it is written; the opener's
        # descriptor is the file object's as open returns)
        with open(tmp, "xb", opener=lambda p, flags: os.open(p, flags, 0o600)) as f:
            os.chmod(tmp, mode)
            for chunk in _chunks(header, arrays):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.filename == tmp:  # (name what was asked for:
            # a missing or read-only directory, not the temporary file's name)
            raise type(exc)(exc.errno, exc.strerror, path) from None
        raise
    dfd = -1
    try:  # the rename itself on disk (where the file system allows)
        dfd = os.open(directory, os.O_RDONLY)
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        if dfd >= 0:
            os.close(dfd)


def _stream_name(stream) -> str:
    """What messages call a file object: its name, or its type."""
    return getattr(stream, "name", None) or f"<{type(stream).__name__}>"


def _not_text(path, mode) -> None:
    """TypeError for a file object opened in text mode (its read() gives str)."""
    if isinstance(path, io.TextIOBase):
        raise TypeError(f"path is a file object in text mode ({_stream_name(path)!r}): "
                        f"open it in binary mode ({mode!r})")


def _is_stream(obj, method) -> bool:
    """A file object (with ``read``/``write``), not a path."""
    return not isinstance(obj, (str, bytes, os.PathLike)) and callable(
        getattr(obj, method, None))


def _fspath(path, method) -> str:
    """``os.fspath(path)``, with a TypeError naming ``path`` for anything that is neither
    a path nor a binary file object."""
    try:
        return os.fspath(path)
    except TypeError:
        raise TypeError(f"path must be a file path (str or os.PathLike) or a binary file "
                        f"object with {method}(), got {type(path).__name__}") from None


def _chunks(header: bytes, arrays):
    """The file's bytes, in pieces: magic, version and header length, header, the
    arrays' data, and the SHA-256 of all that."""
    digest = hashlib.sha256()
    for chunk in (MAGIC, _PREFIX.pack(VERSION, len(header)), header):
        digest.update(chunk)
        yield chunk
    for _, a in arrays:
        buf = memoryview(a.reshape(-1)).cast("B") if a.size else b""
        digest.update(buf)
        yield buf
    yield digest.digest()


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


def frozen_names(params: dict, names, where: str) -> set:
    """The names of the frozen parameters a file lists, checked against ``params``
    (``named_parameters``)."""
    if not isinstance(names, list) or not all(isinstance(n, str) and n in params
                                              for n in names):
        raise ValueError(f"{where}: corrupt list of frozen parameters {names!r}")
    return set(names)


def freeze(model: Module, names, where: str) -> None:
    """Set ``requires_grad=False`` on the parameters a file lists as frozen (every
    name checked first; older files list none)."""
    params = dict(model.named_parameters())
    for name in frozen_names(params, names, where):
        params[name].requires_grad = False


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
    """(header, {name: read-only array view, or a native-byte-order copy of another
    byte order}, bytes of array data) of a model file."""
    _not_text(path, "rb")
    if _is_stream(path, "read"):  # a file object opened in binary mode, at the start
        blob = path.read()
        if not isinstance(blob, (bytes, bytearray)):
            raise TypeError(f"the file object must be opened in binary mode ('rb'): its "
                            f"read() returned {type(blob).__name__}, not bytes")
        path = _stream_name(path)
    else:
        path = _fspath(path, "read")
        with open(path, "rb") as f:  # OSError (FileNotFoundError, ...) propagates
            blob = f.read()
    head = len(MAGIC) + _PREFIX.size
    if len(blob) < head + 32 or not blob.startswith(MAGIC):
        raise ValueError(f"{path!r} is not a fastprop model file (bad magic or truncated)")
    version, hlen = _PREFIX.unpack_from(blob, len(MAGIC))
    if version != VERSION:
        raise ValueError(f"{path!r} has format version {version}; this fastprop reads {VERSION}")
    body, digest = memoryview(blob)[:-32], blob[-32:]  # (no copy of the body)
    if hashlib.sha256(body).digest() != digest:
        raise ValueError(f"{path!r} is corrupt or truncated (checksum mismatch)")
    try:
        header = json.loads(bytes(body[head:head + hlen]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{path!r} has a corrupt header: {exc!r}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path!r} has a corrupt header: not an object")
    data = body[head + hlen:]
    arrays = {}
    try:
        for e in header.get("arrays", []):
            name, shape, offset = e["name"], e["shape"], e["offset"]
            if (not isinstance(name, str) or not isinstance(shape, list)
                    or not all(type(d) is int and d >= 0 for d in shape)
                    or type(offset) is not int or offset < 0):
                raise TypeError(f"entry {e!r}")
            dt = np.dtype(e["dtype"])
            count = int(np.prod(shape, dtype=np.int64))
            if offset + count * dt.itemsize > len(data):
                raise ValueError(f"{path!r} is truncated: array {name!r} runs past the end")
            a = np.frombuffer(data, dtype=dt, count=count, offset=offset).reshape(shape)
            # (native byte order: a file from a big-endian machine is converted here)
            arrays[name] = a if dt.isnative else a.astype(dt.newbyteorder("="))
    except (AttributeError, KeyError, TypeError, OverflowError, MemoryError) as exc:
        raise ValueError(f"{path!r} has a corrupt array table: {exc!r}") from None
    return header, arrays, len(data)


def _little(a) -> np.ndarray:
    """``a`` C-contiguous in little-endian byte order, as the file layout says (a
    copy only on a big-endian machine)."""
    a = np.asarray(a, order="C")
    return a.astype(a.dtype.newbyteorder("<"), copy=False)


def load(path) -> Module:
    """Read a model written by :func:`save`, from a path or a binary file object
    (read from its position to its end).

    Raises:
        OSError: the file cannot be opened (e.g. it does not exist).
        ValueError: the file is not a fastprop model, or is corrupt or truncated.
    """
    header, arrays, data_bytes = _read(path)
    where = repr(_stream_name(path) if _is_stream(path, "read") else os.fspath(path))
    try:
        model = model_from_tree(header["model"], [data_bytes])
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError,
            MemoryError) as exc:
        raise ValueError(f"{where} describes an invalid model: {exc!r}") from None
    for name, target in model.state_arrays():
        src = arrays.get(name)
        if src is None and name.endswith(_COUNT_KEY):
            continue  # (a BatchNorm's batch count: files written before it was kept)
        if src is not None and name.endswith(_COUNT_KEY):
            _check_count_array(src, f"{where}: array {name!r}")
        if src is None or src.shape != target.shape or src.dtype != target.dtype:
            raise ValueError(f"{where}: array {name!r} is missing or has the wrong shape or "
                             f"dtype (want {target.shape} {target.dtype}, file has "
                             f"{getattr(src, 'shape', None)} {getattr(src, 'dtype', None)})")
        target[...] = src
    _tie_parameters(model, header.get("tied", {}), where)
    freeze(model, header.get("frozen", []), where)
    # (a fit checkpoint's own extras, the optimizer state and fit metadata, are not
    # the model's: a checkpoint loaded for inference does not carry them)
    model._extra = {} if header.get("checkpoint") is True else {
        k[6:]: v.copy() for k, v in arrays.items() if k.startswith("extra.")}
    return model
