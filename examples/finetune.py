"""Transfer learning as in a PyTorch script: pretrain, freeze the body, train a new
head, then unfreeze the body with a smaller learning rate.

The PyTorch version reads::

    body = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
    ...pretrain body + head_a on task A, with OneCycleLR stepped every batch...
    for p in body.parameters(): p.requires_grad_(False)
    model = nn.Sequential(body, nn.Linear(64, 3)); opt = Adam(model[1].parameters())
    ...train the head...
    for p in body.parameters(): p.requires_grad_(True)
    opt.add_param_group({"params": body.parameters(), "lr": 1e-4})
    sched = CosineAnnealingLR(opt, T_max=epochs)  # stepped every epoch

Here each line has its fastprop twin: ``requires_grad_``, ``add_param_group``, the
schedulers of ``fp.optim.lr_scheduler`` as ``fit`` callbacks (``every_batch`` for a
per-update schedule).  Backward skips the frozen body, and Adam counts each
parameter's own steps, so the body's first updates after unfreezing are bias-corrected
as its first ones (as in PyTorch), not as the optimizer's n-th.

Task A sorts 20-feature points into 5 clusters; task B (fewer samples) asks which
third of the plane of two hidden directions a point lies in; both share the body's
features.
"""

import numpy as np

import fastprop as fp
from fastprop.optim import lr_scheduler


def make_tasks(seed=0):
    rng = np.random.default_rng(seed)
    centers = 3.0 * rng.standard_normal((5, 20))
    ya = rng.integers(0, 5, 2000)
    Xa = centers[ya] + rng.standard_normal((2000, 20))
    Xb = centers[rng.integers(0, 5, 600)] + rng.standard_normal((600, 20))
    u, v = rng.standard_normal((2, 20))
    angle = np.arctan2(Xb @ u, Xb @ v)
    yb = np.digitize(angle, [-np.pi / 3, np.pi / 3])
    return (Xa.astype(np.float32), ya), (Xb.astype(np.float32), yb)


def main(verbose=True):
    (Xa, ya), (Xb, yb) = make_tasks()
    fit = dict(loss="cross_entropy", batch_size=32, seed=0, verbose=0)
    body = fp.nn.Sequential(fp.nn.Dense(20, 64, "relu", rng=0), fp.nn.Dense(64, 64, "relu", rng=1))

    # 1. pretrain body + head A, one cycle over all updates
    model_a = fp.nn.Sequential(body, fp.nn.Dense(64, 5, rng=2))
    opt = fp.optim.AdamW(model_a.parameters(), lr=1e-3)
    epochs = 4
    steps = epochs * -(-Xa.shape[0] // 32)
    cycle = lr_scheduler.every_batch(lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps))
    model_a.fit(Xa, ya, optimizer=opt, epochs=epochs, callbacks=[cycle], **fit)
    acc_a = float(np.mean(model_a.predict(Xa).argmax(1) == ya))

    # 2. freeze the body, train a new head on task B
    split = 450
    body.requires_grad_(False)
    head = fp.nn.Dense(64, 3, rng=3)
    model_b = fp.nn.Sequential(body, head)
    frozen = [p.value.copy() for p in body.parameters()]
    opt = fp.optim.Adam(head.parameters(), lr=1e-2)
    model_b.fit(Xb[:split], yb[:split], optimizer=opt, epochs=15, **fit)
    assert all(np.array_equal(p.value, f) for p, f in zip(body.parameters(), frozen))
    acc_head = float(np.mean(model_b.predict(Xb[split:]).argmax(1) == yb[split:]))

    # 3. unfreeze the body with a 10x smaller rate; cosine decay over the epochs
    body.requires_grad_(True)
    opt.add_param_group({"params": body.parameters(), "lr": 1e-3})
    cosine = lr_scheduler.CosineAnnealingLR(opt, T_max=15)
    model_b.fit(Xb[:split], yb[:split], optimizer=opt, epochs=15, callbacks=[cosine], **fit)
    acc_tuned = float(np.mean(model_b.predict(Xb[split:]).argmax(1) == yb[split:]))
    if verbose:
        print(f"task A (train) {acc_a:.3f}; task B held out: head only {acc_head:.3f}, "
              f"fine-tuned {acc_tuned:.3f}")
    return acc_a, acc_head, acc_tuned


if __name__ == "__main__":
    main()
