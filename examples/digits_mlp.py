"""Train the demo MLP (64-128-64-10, ReLU, softmax cross-entropy, Adam) on digits.

Run with ``python examples/digits_mlp.py [native|numpy]``.
"""

import sys

from fastprop.cli import train_digits

if __name__ == "__main__":
    backend = sys.argv[1] if len(sys.argv) > 1 else "native"
    accuracy, seconds, model = train_digits(backend, epochs=30)
    print(model)
    print(f"{backend}: test accuracy {accuracy:.4f} in {seconds:.2f} s")
