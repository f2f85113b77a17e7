"""fp.save / fp.load: identical predictions, clear errors, atomic writes."""

import hashlib
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import fastprop as fp
from fastprop import nn, optim
from fastprop import serialization


def _trained_model(rng, dtype=np.float32):
    model = nn.Sequential(
        nn.Dense(4, 8, "leaky_relu", alpha=0.2, rng=0, dtype=dtype),
        nn.BatchNorm1d(8, momentum=0.3, dtype=dtype),
        nn.Dropout(0.25, seed=1),
        nn.Residual(nn.Sequential(nn.Dense(8, 8, "gelu", rng=2, dtype=dtype),
                                  nn.LayerNorm(8, dtype=dtype))),
        nn.Tanh(),
        nn.Dense(8, 3, "softmax", bias=False, rng=3, dtype=dtype),
        nn.Dense(3, 3, rng=4, dtype=dtype),
    )
    X = rng.standard_normal((64, 4))
    y = rng.integers(0, 3, 64)
    model.fit(X, y, loss="cross_entropy", optimizer=optim.Adam(model.parameters(), 0.01),
              epochs=2, batch_size=16, seed=0, verbose=0)
    return model, X


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_gives_identical_predictions(backend, rng, tmp_path, dtype):
    model, X = _trained_model(rng, dtype)
    bn = model[1]
    assert bn.running_mean.any() and not np.allclose(bn.running_var, 1)  # non-trivial stats
    path = tmp_path / "model.fp"
    fp.save(model, path)
    loaded = fp.load(path)
    assert repr(loaded) == repr(model)
    assert np.array_equal(loaded.predict(X), model.predict(X))
    for (na, a), (nb, b) in zip(model.state_arrays(), loaded.state_arrays()):
        assert na == nb and a.dtype == b.dtype and np.array_equal(a, b)
    assert np.array_equal(loaded[1].running_mean, bn.running_mean)
    assert np.array_equal(loaded[1].running_var, bn.running_var)
    assert loaded[0].alpha == 0.2 and loaded[5].bias is None
    assert [m.training for m in loaded.modules()] == [m.training for m in model.modules()]
    # the loaded model is independent of the file and trainable
    loaded.fit(X, np.zeros(64, int), loss="cross_entropy", optimizer="sgd", epochs=1, verbose=0)
    assert np.array_equal(fp.load(path).predict(X), model.predict(X))


def test_round_trip_eval_mode_and_str_path(backend, rng, tmp_path):
    model, X = _trained_model(rng)
    model.eval()
    path = str(tmp_path / "m.bin")
    fp.save(model, path)
    loaded = fp.load(path)
    assert not any(m.training for m in loaded.modules())
    assert np.array_equal(loaded(X.astype(np.float32)), model(X.astype(np.float32)))


def test_file_objects(rng, tmp_path):
    """save and load take binary file objects, as torch.save/torch.load: the bytes are
    those save writes to a path, and a text-mode file or a truncated stream is a clear error."""
    model, X = _trained_model(rng)
    buf = io.BytesIO()
    fp.save(model, buf)
    fp.save(model, tmp_path / "m.fp")
    assert buf.getvalue() == (tmp_path / "m.fp").read_bytes()
    buf.seek(0)
    loaded = fp.load(buf)
    assert np.array_equal(loaded.predict(X), model.predict(X))
    with open(tmp_path / "f.fp", "wb") as f:
        fp.save(model, f)
    with open(tmp_path / "f.fp", "rb") as f:
        assert np.array_equal(fp.load(f).predict(X), model.predict(X))
    with open(tmp_path / "f.fp", encoding="latin-1") as f:
        with pytest.raises(TypeError, match="binary mode"):
            fp.load(f)
    with pytest.raises(ValueError, match=r"'<BytesIO>'.*checksum"):
        fp.load(io.BytesIO(buf.getvalue()[:-1]))
    with pytest.raises(ValueError, match=r"f\.fp'.*not a fastprop model"):
        with open(tmp_path / "f.fp", "rb") as f:
            f.seek(3)
            fp.load(f)


def test_single_layer_and_extra_arrays(tmp_path, rng):
    layer = nn.Dense(3, 2, "sigmoid", rng=0)
    fp.save(layer, tmp_path / "d.fp", extra={"classes": np.array([3, 7])})
    loaded = fp.load(tmp_path / "d.fp")
    assert isinstance(loaded, nn.Dense) and loaded.activation == "sigmoid"
    assert np.array_equal(loaded.weight.value, layer.weight.value)
    assert np.array_equal(loaded._extra["classes"], [3, 7])


def test_save_overwrites_existing_file(tmp_path):
    path = tmp_path / "m.fp"
    fp.save(nn.Dense(2, 2, rng=0), path)
    second = nn.Dense(2, 5, rng=1)
    fp.save(second, path)
    assert np.array_equal(fp.load(path).weight.value, second.weight.value)


def test_missing_file_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        fp.load(tmp_path / "nope.fp")
    with pytest.raises(OSError):
        fp.load(tmp_path)  # a directory


def _saved_bytes(tmp_path):
    path = tmp_path / "good.fp"
    model = nn.Sequential(nn.Dense(3, 4, "relu", rng=0), nn.BatchNorm1d(4), nn.Dense(4, 2, rng=1))
    fp.save(model, path)
    return path.read_bytes()


@pytest.mark.parametrize("keep", [0, 1, 5, 9, 20, 0.5, -33, -32, -1])
def test_truncated_file_raises_valueerror(tmp_path, keep):
    blob = _saved_bytes(tmp_path)
    n = int(len(blob) * keep) if isinstance(keep, float) else (keep % len(blob) if keep < 0
                                                               else keep)
    bad = tmp_path / "bad.fp"
    bad.write_bytes(blob[:n])
    with pytest.raises(ValueError):
        fp.load(bad)


@pytest.mark.parametrize("where", [0, 3, 9, 12, 20, 40, 0.5, -40, -1])
def test_corrupted_byte_raises_valueerror(tmp_path, where):
    blob = bytearray(_saved_bytes(tmp_path))
    i = int(len(blob) * where) if isinstance(where, float) else where
    blob[i] ^= 0x5A
    bad = tmp_path / "bad.fp"
    bad.write_bytes(bytes(blob))
    with pytest.raises(ValueError):
        fp.load(bad)


def test_foreign_files_raise_valueerror(tmp_path):
    for i, content in enumerate([b"", b"hello world" * 10, b"\x93NUMPY" + b"\0" * 100,
                                 os.urandom(500)]):
        path = tmp_path / f"f{i}"
        path.write_bytes(content)
        with pytest.raises(ValueError):
            fp.load(path)


def test_appended_bytes_raise_valueerror(tmp_path):
    bad = tmp_path / "bad.fp"
    bad.write_bytes(_saved_bytes(tmp_path) + b"\0")
    with pytest.raises(ValueError):
        fp.load(bad)


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    model = nn.Sequential(nn.Dense(3, 2, rng=0))
    fp.save(model, tmp_path / "a.fp")
    fp.save(model, tmp_path / "a.fp")
    fp.save(model, pathlib.Path(tmp_path, "b.fp"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.fp", "b.fp"]


def test_failed_write_keeps_old_file_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "m.fp"
    old = nn.Dense(2, 2, rng=0)
    fp.save(old, path)
    old_bytes = path.read_bytes()

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        fp.save(nn.Dense(2, 3, rng=1), path)
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert [p.name for p in tmp_path.iterdir()] == ["m.fp"]


def test_save_rejects_non_modules(tmp_path):
    with pytest.raises(TypeError, match="Module"):
        fp.save({"w": np.zeros(3)}, tmp_path / "x.fp")
    assert list(tmp_path.iterdir()) == []


def _craft(header: bytes, data: bytes = b"\0" * 16) -> bytes:
    """A file with a valid magic, version and checksum around ``header``."""
    body = (serialization.MAGIC + serialization._PREFIX.pack(serialization.VERSION, len(header))
            + header + data)
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize("header", [
    b"[1, 2]",
    b"\xff\xfe",
    b"{not json",
    {"model": {"class": "ReLU"}, "arrays": 5},
    {"model": {"class": "ReLU"}, "arrays": [{"name": "x", "shape": [1], "offset": 0}]},
    {"model": {"class": "ReLU"}, "arrays": [{"name": "x", "dtype": "zz", "shape": [1],
                                             "offset": 0}]},
    {"model": {"class": "ReLU"}, "arrays": [{"name": "x", "dtype": "<f8", "shape": [1],
                                             "offset": -8}]},
    {"model": {"class": "ReLU"}, "arrays": [{"name": "x", "dtype": "<f8", "shape": [9],
                                             "offset": 0}]},
    {"model": {"class": "ReLU"}, "arrays": [{"name": "x", "dtype": "|O", "shape": [1],
                                             "offset": 0}]},
    {"model": {"class": "ReLU"}, "arrays": [{"name": "x", "dtype": "<f8", "shape": [10**20],
                                             "offset": 0}]},   # (was an OverflowError)
    {"model": {"class": "ReLU"}, "arrays": [{"name": "x", "dtype": "<f8", "shape": [2**62, 4],
                                             "offset": 0}]},
    {"model": [1], "arrays": []},
    {"model": {"class": "NoSuchLayer"}, "arrays": []},
    {"model": {"class": "Dense", "config": [1]}, "arrays": []},
    {"model": {"class": "Dense", "config": {"in_features": -1, "out_features": 2}},
     "arrays": []},
    {"model": {"class": "Dense", "config": {"in_features": 2, "out_features": 2}},
     "arrays": []},
    {"model": {"class": "Sequential", "children": 3}, "arrays": []},
    {"model": {"class": "Residual", "children": []}, "arrays": []},
    {"arrays": []},
    b"[" * 100000 + b"]" * 100000,                      # nesting past the recursion limit
    {"model": {"class": "Dense", "config": {"in_features": 1, "out_features": 1}},
     "arrays": [{"name": "0.weight", "dtype": "<f8", "shape": [1, 1], "offset": 0},
                {"name": "0.bias", "dtype": "<f8", "shape": [1], "offset": 8}]},  # dtype
    {"model": {"class": "Dense", "config": {"in_features": 1, "out_features": 1}},
     "arrays": [{"name": "0.weight", "dtype": "<f4", "shape": [1, 1], "offset": 0},
                {"name": "0.bias", "dtype": "<f4", "shape": [1], "offset": 4}],
     "tied": {"0.bias": "7.weight"}},
], ids=lambda h: "raw" if isinstance(h, bytes) else json.dumps(h)[:40])
def test_malformed_header_with_valid_checksum_raises_valueerror(tmp_path, header):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "crafted.fp"
    path.write_bytes(_craft(raw))
    with pytest.raises(ValueError):
        fp.load(path)


def test_saved_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "m.fp"
        fp.save(nn.Dense(2, 2), path)
        assert (path.stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(old)


def test_tied_weights_stay_tied(backend, rng, tmp_path):
    """Two layers sharing one weight Parameter load sharing one Parameter, and train
    on as the original does."""
    a, b = nn.Dense(4, 4, "tanh", rng=1), nn.Dense(4, 4, rng=2)
    b.weight = a.weight
    model = nn.Sequential(a, nn.Dense(4, 4, rng=3), b)
    fp.save(model, tmp_path / "tied.fp")
    loaded = fp.load(tmp_path / "tied.fp")
    assert loaded[0].weight is loaded[2].weight
    assert len(loaded.parameters()) == len(model.parameters()) == 5
    X, y = rng.standard_normal((8, 4)), rng.integers(0, 4, 8)
    for m in (model, loaded):
        m.fit(X, y, loss="cross_entropy", optimizer=fp.optim.SGD(m.parameters(), lr=0.1),
              epochs=2, batch_size=4, shuffle=False, verbose=0)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))


def test_dropout_seed_survives_a_round_trip(tmp_path):
    x = np.ones((2, 8))
    model = nn.Sequential(nn.Dropout(0.5, seed=123))
    fp.save(model, tmp_path / "d.fp")
    loaded = fp.load(tmp_path / "d.fp")
    assert loaded[0].seed == 123
    np.testing.assert_array_equal(loaded(x), nn.Dropout(0.5, seed=123)(x))


def test_dropout_with_a_numpy_or_generator_seed_saves(tmp_path):
    model = nn.Sequential(nn.Dropout(0.5, seed=np.int64(3)),
                          nn.Dropout(0.5, seed=np.random.default_rng(0)))
    fp.save(model, tmp_path / "d.fp")
    loaded = fp.load(tmp_path / "d.fp")
    assert loaded[0].seed == 3 and loaded[1].seed is None


def test_pickles_of_an_older_fastprop_still_load():
    """Unpickling calls __setstate__ with the old attribute dict: a Dense whose
    activation name lived in `activation` (before it was a property) and a Dropout
    without `_shape` (before backward checked it) work after loading."""
    import pickle
    rng = np.random.default_rng(0)
    dense = fp.nn.Dense(3, 2, activation="tanh", rng=rng)
    drop = fp.nn.Dropout(0.5, seed=1)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    y = drop(dense(x))
    old = []
    for m in (dense, drop):
        state = dict(m.__dict__)  # (as pickled then: caches included)
        if "_activation" in state:
            state["activation"] = state.pop("_activation")
        state.pop("_shape", None)
        fresh = type(m).__new__(type(m))
        fresh.__setstate__(state)
        old.append(fresh)  # (a pickle made now would leave out the caches)
        pickle.dumps(fresh)
    d2, p2 = old
    assert d2.activation == "tanh" and d2.act == dense.act
    np.testing.assert_array_equal(d2.forward(x), dense.forward(x))
    g = np.ones_like(y)
    np.testing.assert_array_equal(p2.backward(g), drop.backward(g))
    with pytest.raises(ValueError, match="shape"):
        p2.backward(np.ones((1, 1), np.float32))


def test_pickles_made_before_gelu_erf_keep_their_activations():
    """The kernel codes were renumbered when gelu_erf came (softmax 6 -> 7): a Dense or
    an activation layer pickled before keeps its activation (a softmax unpickled as
    code 6 ran gelu_erf: rows no longer summing to 1, silently), and a Softmax from
    before its ``dim`` is the last axis."""
    import pickle
    x = np.random.default_rng(0).standard_normal((4, 3))
    layers = [fp.nn.Dense(3, 5, activation="softmax", dtype=np.float64, rng=0),
              fp.nn.Softmax(), fp.nn.GELU(), fp.nn.Tanh()]
    for m in layers:
        want = m.forward(x)
        state = pickle.loads(pickle.dumps(m)).__dict__
        if m.act == fp.backends.ACTIVATIONS["softmax"]:
            state["act"] = 6  # (the old code)
            state.pop("dim", None)  # (a Softmax had no dim then)
        fresh = type(m).__new__(type(m))
        fresh.__setstate__(dict(state))
        np.testing.assert_array_equal(fresh.forward(x), want, err_msg=type(m).__name__)
    exact = fp.nn.GELU(approximate="none")
    assert pickle.loads(pickle.dumps(exact)).approximate == "none"


# ------------------------------------------------ from a review of crafted files and flags
@pytest.mark.parametrize("config", [
    {"class": "Dense", "config": {"in_features": 20000, "out_features": 20000}},
    {"class": "Dense", "config": {"in_features": 10**6, "out_features": 10**6}},
    {"class": "Sequential", "children": [
        {"class": "Dense", "config": {"in_features": 2, "out_features": 2}},
        {"class": "BatchNorm1d", "config": {"num_features": 10**9}}]},
], ids=["dense-1.6GB", "dense-4TB", "batchnorm-16GB"])
def test_crafted_config_cannot_make_load_allocate(tmp_path, config):
    """A layer whose configuration needs more array bytes than the file holds is
    refused before it is built (a 200-byte file took 4.6 GB and 19 s, or leaked a
    MemoryError)."""
    path = tmp_path / "crafted.fp"
    path.write_bytes(_craft(json.dumps({"model": config, "arrays": []}).encode()))
    with pytest.raises(ValueError, match="needs .* bytes of arrays; the file holds 16"):
        fp.load(path)


def test_load_draws_no_initialisation_and_keeps_values(tmp_path, rng):
    """Loaded weights are the file's; the layer's init setting is the default."""
    model = nn.Sequential(nn.Dense(5, 4, "relu", init="xavier_normal", rng=1),
                          nn.Dense(4, 2, rng=2))
    fp.save(model, tmp_path / "m.fp")
    back = fp.load(tmp_path / "m.fp")
    for (n1, a), (n2, b) in zip(model.state_arrays(), back.state_arrays()):
        assert n1 == n2 and np.array_equal(a, b)
    assert back.layers[0].init is None


class Dense(nn.Module):  # (a user's layer that happens to share a built-in's name)
    def __init__(self, width=3):
        super().__init__()
        self.width = width

    def get_config(self):
        return {"width": self.width}

    def forward(self, x):
        return 2 * np.asarray(x)


def test_a_users_class_named_like_a_builtin_does_not_replace_it(tmp_path, rng):
    """Files name a user's class by module and name, fastprop's by name: a user class
    called Dense neither changes how fastprop's Dense loads nor loses its own
    identity; private bases are not loadable."""
    assert nn._registry["Dense"] is nn.Dense
    x = rng.standard_normal((3, 4)).astype(np.float32)
    builtin = nn.Dense(4, 2, rng=0)
    fp.save(builtin, tmp_path / "b.fp")
    np.testing.assert_array_equal(fp.load(tmp_path / "b.fp")(x), builtin(x))
    fp.save(nn.Sequential(Dense(5), nn.ReLU()), tmp_path / "u.fp")
    back = fp.load(tmp_path / "u.fp")
    assert type(back.layers[0]) is Dense and back.layers[0].width == 5
    for name in ("_Norm", "Module"):
        path = tmp_path / f"{name}.fp"
        path.write_bytes(_craft(json.dumps({"model": {"class": name, "config": {}},
                                            "arrays": []}).encode()))
        with pytest.raises(ValueError):
            fp.load(path)


_SCRIPT_LAYER = """
import sys
import numpy as np
import fastprop as fp

class Gated(fp.nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.n = n
        self.scale = fp.Parameter(np.arange(n, dtype=np.float32))

    def get_config(self):
        return {"n": self.n}

    def forward(self, x):
        return x * self.scale.value

path = sys.argv[2]
if sys.argv[1] == "save":
    model = fp.nn.Sequential(fp.nn.Dense(2, 3, rng=0), Gated())
    model.layers[1].scale.value = [5.0, 6.0, 7.0]
    fp.save(model, path)
back = fp.load(path)
assert type(back.layers[1]) is Gated, type(back.layers[1])
print(back.layers[1].scale.value.tolist())
"""


def test_a_layer_class_defined_in_the_script_run_saves_and_loads(tmp_path):
    """A class defined in the script being run (module ``__main__``) loads back, in the
    same process and in a later run of the script (its key "__main__.Gated" starts with
    "_", as fastprop's private bases do: they alone are left unregistered)."""
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT_LAYER)
    for mode in ("save", "load"):
        out = subprocess.run([sys.executable, str(script), mode, str(tmp_path / "m.fp")],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        # (the last line: an editable install may print its rebuild first)
        assert out.stdout.strip().splitlines()[-1].split() == ["[5.0,", "6.0,", "7.0]"]


def test_a_file_naming_a_user_class_by_its_bare_name_still_loads(tmp_path):
    """Files written before classes were saved with their module name a user's class
    by its bare name; it is found when only one registered class has that name."""
    class OldStyleLayer(nn.Module):
        def forward(self, x):
            return x

    path = tmp_path / "old.fp"
    path.write_bytes(_craft(json.dumps({"model": {"class": "OldStyleLayer", "config": {}},
                                        "arrays": []}).encode()))
    assert type(fp.load(path)) is OldStyleLayer


@pytest.mark.parametrize("entry", [
    {"name": 5, "dtype": "<f4", "shape": [1], "offset": 0},
    {"name": "x", "dtype": "<f4", "shape": [1.5], "offset": 0},
    {"name": "x", "dtype": "<f4", "shape": 1, "offset": 0},
    {"name": "x", "dtype": "<f4", "shape": [1], "offset": "0"},
])
def test_array_table_entries_of_the_wrong_type(tmp_path, entry):
    path = tmp_path / "crafted.fp"
    path.write_bytes(_craft(json.dumps({"model": {"class": "ReLU"},
                                        "arrays": [entry]}).encode()))
    with pytest.raises(ValueError, match="corrupt array table"):
        fp.load(path)


def test_training_flag_must_be_a_bool(tmp_path):
    path = tmp_path / "crafted.fp"
    path.write_bytes(_craft(json.dumps({"model": {"class": "ReLU", "training": "false"},
                                        "arrays": []}).encode()))
    with pytest.raises(ValueError, match="training must be a bool"):
        fp.load(path)


def test_requires_grad_flags_survive_save_and_load(tmp_path):
    """Frozen parameters load frozen (pickle kept them; the file did not)."""
    model = nn.Sequential(nn.Dense(4, 3, rng=0), nn.Dense(3, 2, rng=1))
    model.layers[0].weight.requires_grad = False
    model.layers[1].bias.requires_grad = False
    fp.save(model, tmp_path / "m.fp")
    back = fp.load(tmp_path / "m.fp")
    assert [p.requires_grad for p in back.parameters()] == [False, True, True, False]


def test_save_keeps_the_mode_and_writes_through_a_link(tmp_path):
    """Re-saving a 0600 file keeps 0600; saving to a symbolic link replaces its
    target and keeps the link."""
    path = tmp_path / "m.fp"
    fp.save(nn.Dense(2, 2, rng=0), path)
    os.chmod(path, 0o600)
    fp.save(nn.Dense(2, 2, rng=1), path)
    assert (path.stat().st_mode & 0o777) == 0o600
    link = tmp_path / "link.fp"
    link.symlink_to(path)
    model = nn.Dense(2, 2, rng=2)
    fp.save(model, link)
    assert link.is_symlink()
    np.testing.assert_array_equal(fp.load(path).weight.value, model.weight.value)


def test_a_file_written_big_endian_loads_and_files_are_written_little_endian(rng):
    """The layout is little-endian: save writes every array so (dtype strings '<f4',
    '<i8'), and a file from a big-endian machine (arrays byte-swapped, '>f4', as
    fastprop wrote them there before) loads, converted, with the same values (a
    BatchNorm's int64 count and a checkpoint's optimizer state included)."""
    import hashlib
    import io
    import json
    from fastprop import serialization as S
    model = nn.Sequential(nn.Dense(3, 4, "relu", rng=0), nn.BatchNorm1d(4),
                          nn.Dense(4, 2, rng=1, dtype=np.float32))
    model.fit(rng.standard_normal((16, 3)), rng.integers(0, 2, 16), loss="cross_entropy",
              optimizer="adam", verbose=0)
    buf = io.BytesIO()
    fp.save(model, buf, extra={"m": np.arange(3.0)})
    blob = buf.getvalue()
    m = len(S.MAGIC)
    version, hlen = S._PREFIX.unpack_from(blob, m)
    head = m + S._PREFIX.size
    header = json.loads(blob[head:head + hlen])
    assert all(e["dtype"][0] in "<|" for e in header["arrays"])
    data = bytearray(blob[head + hlen:-32])
    for e in header["arrays"]:
        dt = np.dtype(e["dtype"])
        a = np.frombuffer(bytes(data[e["offset"]:e["offset"] + e["nbytes"]]), dt).byteswap()
        data[e["offset"]:e["offset"] + e["nbytes"]] = a.tobytes()
        e["dtype"] = dt.newbyteorder(">").str
    h = json.dumps(header).encode()
    body = S.MAGIC + S._PREFIX.pack(version, len(h)) + h + bytes(data)
    loaded = fp.load(io.BytesIO(body + hashlib.sha256(body).digest()))
    for (name, a), (_, b) in zip(model.state_arrays(), loaded.state_arrays()):
        assert b.dtype == a.dtype and b.dtype.isnative, name
        np.testing.assert_array_equal(b, a)
    assert loaded._extra["m"].dtype.isnative
    np.testing.assert_array_equal(loaded._extra["m"], np.arange(3.0))


def test_save_refuses_a_layer_that_load_could_not_make_again(tmp_path):
    """A layer of one's own whose constructor takes arguments that get_config() does not
    return: fp.save refuses it, naming get_config, and writes nothing (the file was
    written, and fp.load then failed); with get_config it round-trips; a fit
    checkpoint of it is still written (it resumes into a model one builds)."""

    class Scale(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.n = n

        def forward(self, x):
            return 2 * x

        def backward(self, g, input_grad=True):
            return 2 * g

    class Kept(Scale):
        def get_config(self):
            return {"n": self.n}

    path = tmp_path / "m.fp"
    model = nn.Sequential(nn.Dense(3, 3), Scale(3))
    with pytest.raises(ValueError, match=r"Scale cannot be saved: .*Scale\(\*\*get_config\(\)\)"
                                         r".*returns \{\}.*define get_config\(\)"):
        fp.save(model, path)
    assert not path.exists()
    fp.save(nn.Sequential(nn.Dense(3, 3), Kept(3)), path)
    assert fp.load(path)[1].n == 3
    X, y = np.ones((4, 3)), np.zeros((4, 3))
    model.fit(X, y, loss="mse", optimizer="sgd", epochs=1, verbose=0,
              checkpoint=tmp_path / "c.ckpt")
    assert (tmp_path / "c.ckpt").exists()


def test_save_and_load_errors_name_what_was_passed(tmp_path):
    """A missing directory is named as the path asked for (it was the temporary file's
    name); a text-mode file object is a TypeError saying to open it in binary mode (it
    was a UnicodeDecodeError, or write()'s own TypeError)."""
    model = nn.Sequential(nn.Dense(2, 2))
    target = tmp_path / "missing" / "m.fp"
    with pytest.raises(FileNotFoundError) as info:
        fp.save(model, target)
    assert info.value.filename == str(target) and ".tmp" not in str(info.value)
    fp.save(model, tmp_path / "m.fp")
    with open(tmp_path / "m.fp") as f, pytest.raises(TypeError, match=r"text mode.*'rb'"):
        fp.load(f)
    with open(tmp_path / "t.fp", "w") as f, pytest.raises(TypeError, match=r"text mode.*'wb'"):
        fp.save(model, f)
