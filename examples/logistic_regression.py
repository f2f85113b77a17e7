"""Logistic regression by plain gradient descent — the classic TensorFlow 1 example,
written with fastprop.

TensorFlow 1 wrote it as::

    X = tf.placeholder(tf.float32, [None, 2]); y = tf.placeholder(tf.float32, [None, 1])
    W = tf.Variable(tf.zeros([2, 1])); b = tf.Variable(tf.zeros([1]))
    y_hat = tf.sigmoid(tf.matmul(X, W) + b)
    loss = tf.reduce_mean(-y * tf.log(y_hat) - (1 - y) * tf.log(1 - y_hat))
    train = tf.train.GradientDescentOptimizer(0.01).minimize(loss)
    for step in range(2000): sess.run(train, {X: X_data, y: y_data})

Here the same model is one fastprop Dense layer, ``sigmoid(X @ W + b)``, trained with
binary cross-entropy and SGD at lr 0.01 for 2000 full-batch steps on two separable
2-D Gaussian blobs; the four steps of backpropagation are written out.
"""

import numpy as np

import fastprop as fp


def make_blobs(n=200, seed=0):
    """Two Gaussian blobs centred at (-2, -2) and (2, 2); labels 0 and 1."""
    rng = np.random.default_rng(seed)
    half = n // 2
    X = np.vstack([rng.normal(-2.0, 0.75, size=(half, 2)), rng.normal(2.0, 0.75, size=(n - half, 2))])
    y = np.concatenate([np.zeros(half), np.ones(n - half)]).reshape(-1, 1)
    return X.astype(np.float32), y.astype(np.float32)


def main(steps=2000, lr=0.01, verbose=True):
    X, y = make_blobs()
    model = fp.nn.Dense(2, 1, activation="sigmoid", init="zeros")   # W = 0, b = 0
    loss_fn = fp.losses.BinaryCrossEntropy()
    opt = fp.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        opt.zero_grad()
        y_hat = model(X)                        # 1. forward
        loss = loss_fn(y_hat, y)                # 2. loss
        model.backward(loss_fn.backward())      # 3. backward
        opt.step()                              # 4. update
        if verbose and (step % 100 == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss:.4f}")
    accuracy = float(np.mean((model(X) > 0.5) == (y > 0.5)))
    if verbose:
        print(f"W = {model.weight.value.ravel()}, b = {model.bias.value}, accuracy {accuracy:.3f}")
    return loss, accuracy


if __name__ == "__main__":
    main()
