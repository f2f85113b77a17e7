"""The logistic-regression example and the demo network train to their targets."""

import importlib.util
import pathlib

import numpy as np
import pytest

import fastprop as fp

ROOT = pathlib.Path(__file__).resolve().parents[1]
BACKENDS = [b for b in ("native", "numpy") if b != "native" or
            importlib.util.find_spec("fastprop._native") is not None]


def _load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("backend", BACKENDS)
def test_logistic_regression_reaches_low_loss(backend):
    example = _load_example("logistic_regression")
    with fp.use_backend(backend):
        loss, accuracy = example.main(verbose=False)
    assert loss < 0.1
    assert accuracy == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_demo_network_reaches_95_percent(backend):
    pytest.importorskip("sklearn")
    from fastprop.cli import train_digits
    accuracy, _, model = train_digits(backend, epochs=30, verbose=0)
    assert accuracy >= 0.95
    assert all(np.isfinite(p.value).all() for p in model.parameters())


def test_demo_cli_prints_accuracy_and_ratio(capsys):
    pytest.importorskip("sklearn")
    from fastprop.cli import main
    assert main(["demo", "--epochs", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out
    if len(BACKENDS) == 2:
        assert "native/numpy training-time ratio" in out


def test_info_prints_config(capsys):
    from fastprop.cli import main
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend" in out and fp.__version__ in out


def test_info_reports_an_unavailable_backend_instead_of_failing(capsys, monkeypatch):
    from fastprop import backends
    from fastprop.cli import main

    def unavailable():
        raise backends.BackendUnavailableError("the cuda backend is unavailable: no GPU")
    monkeypatch.setattr(backends, "get_backend", unavailable)
    assert main(["info"]) == 0
    assert "unavailable (BackendUnavailableError" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["demo", "--epochs", "-1"], ["demo", "--batch-size", "0"],
                                  ["demo", "--epochs", "two"], ["demo", "--seed", "-1"],
                                  ["demo", "--seed", str(2**32)],
                                  ["bench", "--plot", "/no/such/folder/chart.png"]])
def test_cli_rejects_bad_arguments_as_usage_errors(args, capsys):
    """Before any work: a seed scikit-learn's split would refuse with a traceback, and
    a chart path whose folder is missing (found after the whole benchmark ran)."""
    from fastprop.cli import main
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "error: argument" in capsys.readouterr().err


def test_demo_without_epochs_prints_no_ratio(capsys):
    pytest.importorskip("sklearn")
    from fastprop.cli import main
    assert main(["demo", "--epochs", "0", "--quiet"]) == 0
    assert "ratio" not in capsys.readouterr().out


@pytest.mark.parametrize("backend", BACKENDS)
def test_finetune_example(backend):
    """Pretrain with a per-update OneCycleLR, freeze the body (asserted unchanged in
    the example), train a new head, unfreeze with add_param_group and a cosine
    schedule: the unfrozen body improves the held-out accuracy."""
    example = _load_example("finetune")
    with fp.use_backend(backend):
        acc_a, acc_head, acc_tuned = example.main(verbose=False)
    assert acc_a >= 0.95 and acc_head >= 0.8 and acc_tuned >= acc_head


def test_every_public_class_function_method_and_property_has_a_docstring():
    """help() on anything public says what it does (an override inherits its base's
    text, as inspect.getdoc finds it)."""
    import inspect
    from fastprop import init, losses, lr_scheduler, nn, ops, optim, train
    sk = pytest.importorskip("fastprop.sklearn")
    missing = set()
    for mod in (fp, nn, ops, optim, losses, init, train, lr_scheduler, sk):
        for name in getattr(mod, "__all__", [n for n in dir(mod) if not n.startswith("_")]):
            obj = getattr(mod, name, None)
            if not (getattr(obj, "__module__", None) or "").startswith("fastprop"):
                continue
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and not inspect.getdoc(obj):
                missing.add(f"{obj.__module__}.{obj.__qualname__}")
            if inspect.isclass(obj):
                for k, v in vars(obj).items():
                    if k.startswith("_"):
                        continue
                    if isinstance(v, property):
                        doc = inspect.getdoc(v)
                    elif inspect.isfunction(v) or isinstance(v, (staticmethod, classmethod)):
                        doc = inspect.getdoc(getattr(obj, k))
                    else:
                        continue
                    if not doc:
                        missing.add(f"{obj.__module__}.{obj.__qualname__}.{k}")
    assert not missing, sorted(missing)


def test_cli_version(capsys):
    from fastprop.cli import main
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastprop {fp.__version__}"


def test_python_dash_m_runs_the_command_line():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "fastprop", "--version"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(f"fastprop {fp.__version__}")
