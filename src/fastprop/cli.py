"""The ``fastprop`` command: ``fastprop demo``, ``fastprop info``, ``fastprop bench``."""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def _digits(seed):
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:  # pragma: no cover - the demo extra installs it
        sys.exit("fastprop demo needs scikit-learn for its bundled digits data: "
                 "pip install scikit-learn (the demo extra)")
    data = load_digits()
    X = (data.data / 16.0).astype(np.float32)
    return train_test_split(X, data.target, test_size=0.2, random_state=seed,
                            stratify=data.target)


def build_mlp(seed):
    """The demo network: 64-128-64-10, ReLU, He-initialised, float32."""
    import fastprop as fp
    rng = np.random.default_rng(seed)
    return fp.nn.Sequential(
        fp.nn.Dense(64, 128, activation="relu", rng=rng),
        fp.nn.Dense(128, 64, activation="relu", rng=rng),
        fp.nn.Dense(64, 10, rng=rng),
    )


def train_digits(backend, epochs=30, batch_size=32, seed=0, verbose=1):
    """Train the demo MLP on digits with ``backend``; returns (accuracy, seconds, model)."""
    import fastprop as fp
    X_train, X_test, y_train, y_test = _digits(seed)
    with fp.use_backend(backend):
        model = build_mlp(seed)
        opt = fp.optim.Adam(model.parameters(), lr=1e-3)
        t0 = time.perf_counter()
        model.fit(X_train, y_train, loss=fp.losses.SoftmaxCrossEntropy(), optimizer=opt,
                  epochs=epochs, batch_size=batch_size, seed=seed, verbose=verbose)
        seconds = time.perf_counter() - t0
        accuracy = float(np.mean(model.predict(X_test).argmax(axis=1) == y_test))
    return accuracy, seconds, model


def demo(args) -> int:
    import fastprop as fp
    _digits(args.seed)  # (scikit-learn missing: said before anything is printed)
    print("fastprop demo: MLP 64-128-64-10 (ReLU, softmax cross-entropy, Adam) on the "
          "scikit-learn digits data set\n")
    results = {}
    for backend in ("native", "numpy"):
        try:
            fp.backends.load(backend)
        except fp.BackendUnavailableError as exc:
            print(f"[{backend}] skipped: {exc}")
            continue
        print(f"[{backend}] training {args.epochs} epochs, batch {args.batch_size}")
        acc, secs, _ = train_digits(backend, args.epochs, args.batch_size, args.seed,
                                    verbose=0 if args.quiet else 1)
        results[backend] = (acc, secs)
        print(f"[{backend}] test accuracy {acc:.4f}, training time {secs:.3f} s\n")
    for backend, (acc, secs) in results.items():
        print(f"{backend:>7}: accuracy {acc:.4f}  time {secs:.3f} s")
    if len(results) == 2 and args.epochs:  # (no epochs: no training time to compare)
        ratio = results["numpy"][1] / results["native"][1]
        how = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
        print(f"native/numpy training-time ratio: {results['native'][1] / results['numpy'][1]:.3f}"
              f" (native is {how})")
    return 0


def info(args) -> int:
    import fastprop as fp
    fp.show_config()
    return 0


def bench(args) -> int:
    from . import _bench
    return _bench.main(quick=not args.full, plot=args.plot)


def _count(low, high=None):
    """argparse type: an int in [low, high] (a usage error otherwise, not a traceback)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value
    return parse


def _png_path(text):
    """argparse type: a path whose directory exists (checked before a long run)."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the directory of {text!r} does not exist")
    return text


def _version():
    from . import __version__
    return __version__


def main(argv=None) -> int:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="fastprop", description="fastprop's command line: demo, info and bench.")
    parser.add_argument("--version", action="version", version=f"fastprop {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train an MLP on digits with the native and numpy backends",
                       formatter_class=fmt)
    p.add_argument("--epochs", type=_count(0), default=30, help="passes over the training set")
    p.add_argument("--batch-size", type=_count(1), default=32, help="samples per step")
    p.add_argument("--seed", type=_count(0, 2**32 - 1), default=0,
                   help="seeds the split, weights and shuffles")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=demo)
    p = sub.add_parser("info", help="print the configuration (show_config)")
    p.set_defaults(func=info)
    p = sub.add_parser("bench", help="quick benchmark table: native vs numpy vs torch",
                       formatter_class=fmt)
    p.add_argument("--full", action="store_true", help="more sizes and repeats")
    p.add_argument("--plot", type=_png_path, default="fastprop-bench.png",
                   help="PNG bar chart of the ratios (needs matplotlib)")
    p.set_defaults(func=bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
