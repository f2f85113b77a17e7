"""Learning-rate schedulers against their formulas written out here and, when
PyTorch is installed, against torch.optim.lr_scheduler itself (rates per epoch)."""

import math

import numpy as np
import pytest

import fastprop as fp
from fastprop import nn, optim
from fastprop.optim import lr_scheduler as sched

EPOCHS = 14


def blobs(rng, n, classes):
    centers = 4 * rng.standard_normal((classes, 2))
    y = np.arange(n) % classes
    return centers[y] + 0.5 * rng.standard_normal((n, 2)), y


def _two_groups(lib="fp"):
    """An SGD with two parameter groups (lr 0.1 and 0.02), in fastprop or torch."""
    if lib == "fp":
        model = nn.Sequential(nn.Dense(3, 4, rng=0), nn.Dense(4, 2, rng=1))
        return optim.SGD([{"params": model[0].parameters()},
                          {"params": model[1].parameters(), "lr": 0.02}], lr=0.1, momentum=0.9)
    import torch
    a, b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    return torch.optim.SGD([{"params": a.parameters()},
                            {"params": b.parameters(), "lr": 0.02}], lr=0.1, momentum=0.9)


# name: (arguments, the rate at epoch t from base rate b)
CASES = {
    "StepLR": ({"step_size": 3, "gamma": 0.5}, lambda b, t: b * 0.5 ** (t // 3)),
    "MultiStepLR": ({"milestones": [2, 5, 5, 9], "gamma": 0.1},
                    lambda b, t: b * 0.1 ** ((t >= 2) + 2 * (t >= 5) + (t >= 9))),
    "ConstantLR": ({"factor": 0.25, "total_iters": 4}, lambda b, t: b * (0.25 if t < 4 else 1.0)),
    "LinearLR": ({"start_factor": 0.1, "end_factor": 1.0, "total_iters": 5},
                 lambda b, t: b * (0.1 + 0.9 * min(t, 5) / 5)),
    "ExponentialLR": ({"gamma": 0.8}, lambda b, t: b * 0.8 ** t),
    "PolynomialLR": ({"total_iters": 8, "power": 2.0}, lambda b, t: b * (1 - min(t, 8) / 8) ** 2),
    "CosineAnnealingLR": ({"T_max": 6, "eta_min": 0.001},
                          lambda b, t: 0.001 + (b - 0.001) * (1 + math.cos(math.pi * t / 6)) / 2),
}


def _rates(opt_lib, make, epochs=EPOCHS):
    opt = _two_groups(opt_lib)
    s = make(opt)
    out = [list(s.get_last_lr())]
    for _ in range(epochs):
        opt.step()
        s.step()
        out.append(list(s.get_last_lr()))
    return out, opt


@pytest.mark.parametrize("name", sorted(CASES))
def test_scheduler_rates_match_formula_and_torch(name, peer):
    kw, formula = CASES[name]
    ours, opt = _rates("fp", lambda o: getattr(sched, name)(o, **kw))
    for t, rates in enumerate(ours):
        np.testing.assert_allclose(rates, [formula(0.1, t), formula(0.02, t)], rtol=1e-13)
    assert [g["lr"] for g in opt.param_groups] == ours[-1]
    assert opt.lr == ours[-1][0] or len(set(ours[-1])) == 2
    if peer is None:
        return
    torch = peer
    theirs, _ = _rates("torch", lambda o: getattr(torch.optim.lr_scheduler, name)(o, **kw))
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-15)


def test_lambda_multiplicative_and_sequential_schedulers(peer):
    ours, _ = _rates("fp", lambda o: sched.LambdaLR(o, [lambda t: 1 / (t + 1), lambda t: 0.9 ** t]))
    assert ours[3] == pytest.approx([0.1 / 4, 0.02 * 0.9 ** 3], rel=1e-14)
    mult, _ = _rates("fp", lambda o: sched.MultiplicativeLR(o, lambda t: 0.5))
    assert mult[0] == [0.1, 0.02] and mult[2] == pytest.approx([0.025, 0.005], rel=1e-14)

    def warm_then_cosine(o, lib=sched):
        warm = lib.LinearLR(o, start_factor=0.2, total_iters=3)
        cos = lib.CosineAnnealingLR(o, T_max=8)
        return lib.SequentialLR(o, [warm, cos], milestones=[3])

    seq, _ = _rates("fp", warm_then_cosine)
    for t in range(EPOCHS + 1):
        f = 0.2 + 0.8 * t / 3 if t < 3 else (1 + math.cos(math.pi * (t - 3) / 8)) / 2
        assert seq[t] == pytest.approx([0.1 * f, 0.02 * f], rel=1e-13, abs=1e-16), t
    if peer is None:
        return
    torch = peer
    for make_ours, make_theirs in (
            (lambda o: sched.LambdaLR(o, [lambda t: 1 / (t + 1), lambda t: 0.9 ** t]),
             lambda o: torch.optim.lr_scheduler.LambdaLR(o, [lambda t: 1 / (t + 1),
                                                             lambda t: 0.9 ** t])),
            (lambda o: sched.MultiplicativeLR(o, lambda t: 0.5),
             lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda t: 0.5)),
            (warm_then_cosine, lambda o: warm_then_cosine(o, torch.optim.lr_scheduler))):
        ours, _ = _rates("fp", make_ours)
        theirs, _ = _rates("torch", make_theirs)
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-15)


PLATEAU = [1.0, 0.9, 0.95, 0.9, 0.91, 0.92, float("nan"), 0.5, 0.6, 0.7, 0.8, 0.9, 0.49999]


@pytest.mark.parametrize("kw", [{}, {"patience": 1, "cooldown": 2, "factor": 0.5},
                                {"mode": "max", "patience": 0, "threshold_mode": "abs",
                                 "threshold": 0.05, "min_lr": [0.05, 0.0]},
                                {"mode": "max", "patience": 1, "threshold_mode": "rel",
                                 "threshold": 0.15, "factor": 0.5},
                                {"mode": "min", "patience": 1, "threshold_mode": "rel",
                                 "threshold": 0.15}])
def test_reduce_lr_on_plateau_matches_torch(kw, peer):
    kw = {"patience": 2, **kw}

    def run(lib, opt):
        s = lib.ReduceLROnPlateau(opt, **kw)
        out = []
        for m in PLATEAU:
            s.step(m)
            out.append([g["lr"] for g in opt.param_groups])
        return out

    ours = run(sched, _two_groups())
    if kw == {"patience": 2}:  # bad: 0.95, 0.9 (not 1e-4 better than 0.9), 0.91: cut
        assert ours[4] == [pytest.approx(0.01), pytest.approx(0.002)] and ours[3] == [0.1, 0.02]
    if peer is None:
        return
    torch = peer
    np.testing.assert_allclose(ours, run(torch.optim.lr_scheduler, _two_groups("torch")),
                               rtol=1e-14)


def test_schedulers_refuse_bad_input_and_change_nothing():
    opt = _two_groups()
    s = sched.LambdaLR(opt, lambda t: 1.0 - t)  # negative from epoch 2
    s.step()
    with pytest.raises(ValueError, match="lr=-0.1.*group 0"):
        s.step()
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0] and s.last_epoch == 1
    with pytest.raises(TypeError, match="Optimizer"):
        sched.StepLR(object(), 2)
    with pytest.raises(ValueError, match="step_size"):
        sched.StepLR(opt, 0)
    with pytest.raises(ValueError, match="Expected 2 lr_lambdas"):
        sched.LambdaLR(opt, [lambda t: 1.0])
    with pytest.raises(ValueError, match="Factor should be < 1.0"):
        sched.ReduceLROnPlateau(opt, factor=1.0)
    with pytest.raises(ValueError, match="milestones"):
        sched.SequentialLR(opt, [sched.StepLR(opt, 2), sched.StepLR(opt, 3)], milestones=[])
    with pytest.raises(TypeError, match="LRScheduler"):
        sched.SequentialLR(opt, [sched.ReduceLROnPlateau(opt)], milestones=[])
    with pytest.raises(KeyError, match="initial_lr"):
        sched.StepLR(_two_groups(), 2, last_epoch=3)
    with pytest.raises(ValueError, match="lr=-0.1"):
        sched.LambdaLR(_two_groups(), lambda t: t - 1.0)
    fresh = _two_groups()
    with pytest.raises(ValueError):
        sched.LambdaLR(fresh, lambda t: t - 1.0)
    assert all("initial_lr" not in g for g in fresh.param_groups)  # (left as they were)
    # a state_dict round trip resumes the schedule
    a, b = _two_groups(), _two_groups()
    sa, sb = sched.CosineAnnealingLR(a, T_max=5), sched.CosineAnnealingLR(b, T_max=5)
    for _ in range(3):
        sa.step()
    b.load_state_dict(a.state_dict())  # (the rates: a step goes on from the current one)
    sb.load_state_dict(sa.state_dict())
    sa.step()
    sb.step()
    assert sa.get_last_lr() == sb.get_last_lr()
    with pytest.raises(ValueError, match="keys"):
        sb.load_state_dict({"nope": 1})


def test_schedulers_as_fit_callbacks_and_resume(rng, tmp_path):
    """A scheduler passed to fit steps after each epoch (the epochs train at the
    scheduled rates); ReduceLROnPlateau reads val_loss, refuses a fit without it before
    anything changes; a resumed fit with either ends bit-identical to an uninterrupted
    one."""
    X, y = blobs(rng, n=60, classes=3)
    X = X.astype(np.float32)

    def make():
        return nn.Sequential(nn.Dense(2, 8, "relu", rng=0), nn.Dense(8, 3, rng=1))

    model = make()
    opt = optim.SGD(model.parameters(), lr=0.2)
    seen = []
    cos = sched.CosineAnnealingLR(opt, T_max=4)
    model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=4, verbose=0,
              callbacks=[lambda e, logs: seen.append(opt.lr), cos])
    assert seen == pytest.approx([0.2 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)])
    assert cos.last_epoch == 4 and opt.lr == pytest.approx(0.0, abs=1e-17)

    plateau = sched.ReduceLROnPlateau(opt, patience=0)
    before = [p.value.copy() for p in model.parameters()]
    with pytest.raises(ValueError, match="monitors 'val_loss'"):
        model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=2, verbose=0,
                  callbacks=[plateau])
    for p, b in zip(model.parameters(), before):
        np.testing.assert_array_equal(p.value, b)

    for make_sched in (lambda o: sched.StepLR(o, 2, 0.5),
                       lambda o: sched.ReduceLROnPlateau(o, patience=0, factor=0.5)):
        ends = []
        for resumed in (False, True):
            m = make()
            o = optim.SGD(m.parameters(), lr=0.3, momentum=0.9)
            s = make_sched(o)
            kw = dict(loss="cross_entropy", optimizer=o, batch_size=16, seed=2, verbose=0,
                      validation_split=0.25, checkpoint=tmp_path / f"{resumed}.ckpt")
            if resumed:
                m.fit(X, y, epochs=3, callbacks=[s], **kw)
                m2 = make()  # a new process: new model, optimizer and scheduler
                o2 = optim.SGD(m2.parameters(), lr=0.3, momentum=0.9)
                s2 = make_sched(o2)
                m2.fit(X, y, epochs=6, callbacks=[s2], resume=True, **{**kw, "optimizer": o2})
                m, o, s = m2, o2, s2
            else:
                m.fit(X, y, epochs=6, callbacks=[s], **kw)
            ends.append(([p.value.copy() for p in m.parameters()], o.lr, s.get_last_lr()))
        for a, b in zip(ends[0][0], ends[1][0]):
            np.testing.assert_array_equal(a, b)
        assert ends[0][1:] == ends[1][1:]


def test_reduce_lr_on_plateau_rebuilds_its_counts_on_resume():
    """on_resume replays the restored history's figures into best / bad epochs /
    cooldown without touching the rates (restored with the optimizer), so the next
    epoch cuts where an uninterrupted run would."""
    import types
    opt = _two_groups()
    s = sched.ReduceLROnPlateau(opt, patience=2, cooldown=1, factor=0.5)
    history = types.SimpleNamespace(epoch=[0, 1, 2, 3, 4],
                                    history={"val_loss": [1.0, 1.1, 1.2, 1.3, 0.9]})
    for v in history.history["val_loss"][:3]:
        s(0, {"val_loss": v})
    s(0, {"val_loss": 1.3})  # cut (3 bad epochs), cooldown 1
    s(0, {"val_loss": 0.9})
    uninterrupted = (s.best, s.num_bad_epochs, s.cooldown_counter, s.last_epoch)
    fresh = sched.ReduceLROnPlateau(_two_groups(), patience=2, cooldown=1, factor=0.5)
    lrs = [g["lr"] for g in fresh.optimizer.param_groups]
    fresh.on_resume(history)
    assert (fresh.best, fresh.num_bad_epochs, fresh.cooldown_counter, fresh.last_epoch) == \
        uninterrupted == (0.9, 0, 0, 5)
    assert [g["lr"] for g in fresh.optimizer.param_groups] == lrs
    s(0, {"val_loss": 1.0})
    fresh(0, {"val_loss": 1.0})
    assert fresh.num_bad_epochs == s.num_bad_epochs == 1


def _pair(lib, opt):
    return [lib.ExponentialLR(opt, gamma=0.9), lib.MultiStepLR(opt, milestones=[3], gamma=0.1)]


def test_schedulers_chain_and_build_on_the_current_rate_as_torch(peer):
    """Two schedulers stepped together multiply (PyTorch's chaining); a rate set by hand
    between steps is what the next step starts from; step(epoch) jumps with the closed
    form; a group added later is scheduled from its rate then; the PyTorch resume
    pattern (load the optimizer's state_dict, then last_epoch=k) works."""
    def run(lib, opt):
        a, b = _pair(lib, opt)
        out = []
        for t in range(6):
            opt.step()
            a.step()
            b.step()
            if t == 1:
                for g in opt.param_groups:
                    g["lr"] = 0.5 * g["lr"]  # by hand
            out.append([g["lr"] for g in opt.param_groups])
        return out

    ours = run(sched, _two_groups())
    f = [0.9, 0.81 / 2, 0.729 / 2 * 0.1, 0.6561 / 2 * 0.1, 0.59049 / 2 * 0.1, 0.531441 / 2 * 0.1]
    np.testing.assert_allclose(ours, [[0.1 * x, 0.02 * x] for x in f], rtol=1e-14)
    s = sched.StepLR(_two_groups(), step_size=2, gamma=0.5)
    s.step(5)
    assert s.get_last_lr() == [0.1 * 0.25, 0.02 * 0.25] and s.last_epoch == 5

    opt = _two_groups()
    s = sched.StepLR(opt, step_size=2, gamma=0.5)
    s.step()
    opt.add_param_group({"params": [fp.Parameter(np.ones(2))], "lr": 0.4, "name": "late"})
    s.step()
    assert s.get_last_lr() == [0.05, 0.01, 0.2] and opt.param_groups[2]["initial_lr"] == 0.4
    sd = opt.state_dict()
    assert sd["param_groups"][2]["name"] == "late" and sd["param_groups"][0]["initial_lr"] == 0.1
    model = nn.Sequential(nn.Dense(3, 4, rng=0), nn.Dense(4, 2, rng=1))
    again = optim.SGD([{"params": model[0].parameters()},
                       {"params": model[1].parameters(), "lr": 0.02},
                       {"params": [fp.Parameter(np.ones(2))], "lr": 0.4}], lr=0.1, momentum=0.9)
    again.load_state_dict(sd)
    resumed = sched.StepLR(again, step_size=2, gamma=0.5, last_epoch=2)
    assert resumed.get_last_lr() == [0.05, 0.01, 0.2]  # (epoch 3: no change)
    resumed.step()
    assert resumed.get_last_lr() == [0.025, 0.005, 0.1]
    with pytest.raises(TypeError, match="'name' must be a str"):
        optim.SGD([{"params": model.parameters(), "name": 3}], lr=0.1)

    if peer is None:
        return
    torch = peer
    np.testing.assert_allclose(ours, run(torch.optim.lr_scheduler, _two_groups("torch")),
                               rtol=1e-15)
    topt = _two_groups("torch")
    ts = torch.optim.lr_scheduler.StepLR(topt, step_size=2, gamma=0.5)
    topt.step()
    ts.step()
    topt.add_param_group({"params": [torch.ones(2, requires_grad=True)], "lr": 0.4})
    topt.step()
    ts.step()
    assert ts.get_last_lr() == [0.05, 0.01, 0.2]


def test_sequential_state_dict_keeps_its_schedulers():
    def make(opt):
        warm = sched.LinearLR(opt, start_factor=0.2, total_iters=3)
        cos = sched.CosineAnnealingLR(opt, T_max=8)
        return sched.SequentialLR(opt, [warm, cos], milestones=[3])

    a, b = _two_groups(), _two_groups()
    sa, sb = make(a), make(b)
    for _ in range(5):
        sa.step()
    sd = sa.state_dict()
    assert len(sd["_schedulers"]) == 2
    for g, h in zip(b.param_groups, a.param_groups):
        g["lr"] = h["lr"]
    sb.load_state_dict(sd)
    for _ in range(3):
        sa.step()
        sb.step()
    assert sa.get_last_lr() == sb.get_last_lr()


def test_one_cycle_and_warm_restarts(peer):
    """OneCycleLR (rates and the momentum it cycles, SGD's or Adam's beta1) and
    CosineAnnealingWarmRestarts against their formulas and, when installed, PyTorch's;
    stepping OneCycleLR past total_steps is refused with nothing changed."""
    opt = _two_groups()
    s = sched.OneCycleLR(opt, max_lr=1.0, total_steps=10, pct_start=0.3)
    rates, momenta = [s.get_last_lr()[0]], [opt.param_groups[0]["momentum"]]
    for _ in range(9):
        opt.step()
        s.step()
        rates.append(s.get_last_lr()[0])
        momenta.append(opt.param_groups[0]["momentum"])

    def cos(a, b, pct):
        return b + (a - b) / 2 * (math.cos(math.pi * pct) + 1)

    up, total = 0.3 * 10 - 1, 9
    want = [cos(0.04, 1.0, t / up) if t <= up else cos(1.0, 0.04 / 1e4, (t - up) / (total - up))
            for t in range(10)]
    np.testing.assert_allclose(rates, want, rtol=1e-13)
    assert momenta[0] == 0.95 and min(momenta) == pytest.approx(0.85)
    assert rates[-1] == pytest.approx(0.04 / 1e4)
    s.step()  # (step 10 of 10: the last one allowed)
    before = [(g["lr"], g["momentum"]) for g in opt.param_groups]
    with pytest.raises(ValueError, match="Tried to step 11 times"):
        s.step()
    assert s.last_epoch == 10 and [(g["lr"], g["momentum"]) for g in opt.param_groups] == before
    adam = optim.Adam(nn.Dense(2, 2, rng=0).parameters(), lr=0.1, betas=(0.9, 0.99))
    sched.OneCycleLR(adam, max_lr=0.1, total_steps=5, base_momentum=0.8, max_momentum=0.9)
    assert adam.param_groups[0]["betas"] == (0.9, 0.99)
    with pytest.raises(ValueError, match="momentum or beta1"):
        sched.OneCycleLR(optim.Adagrad(nn.Dense(2, 2).parameters()), max_lr=0.1, total_steps=5)
    fresh = _two_groups()
    with pytest.raises(ValueError, match="total_steps"):
        sched.OneCycleLR(fresh, max_lr=0.1)
    with pytest.raises(ValueError, match="max_lr"):
        sched.OneCycleLR(fresh, max_lr=[0.1], total_steps=5)
    assert [g["momentum"] for g in fresh.param_groups] == [0.9, 0.9]
    assert all("initial_lr" not in g for g in fresh.param_groups)

    opt = _two_groups()
    w = sched.CosineAnnealingWarmRestarts(opt, T_0=2, T_mult=2, eta_min=0.001)
    got = [w.get_last_lr()[0]]
    for _ in range(7):
        w.step()
        got.append(w.get_last_lr()[0])
    phase = [(0, 2), (1, 2), (0, 4), (1, 4), (2, 4), (3, 4), (0, 8), (1, 8)]
    np.testing.assert_allclose(
        got, [0.001 + 0.099 * (1 + math.cos(math.pi * c / T)) / 2 for c, T in phase], rtol=1e-13)
    w.step(4.5)  # (a fractional epoch: 2.5 into the second cycle of 4)
    assert w.get_last_lr()[0] == pytest.approx(0.001 + 0.099 * (1 + math.cos(math.pi * 2.5 / 4)) / 2)

    if peer is None:
        return
    torch = peer
    for kw in ({"max_lr": 0.5, "total_steps": 20},
               {"max_lr": [0.5, 0.1], "total_steps": 17, "anneal_strategy": "linear",
                "three_phase": True}):
        ours, theirs = _two_groups(), _two_groups("torch")
        a = sched.OneCycleLR(ours, **kw)
        b = torch.optim.lr_scheduler.OneCycleLR(theirs, **kw)
        for _ in range(kw["total_steps"] - 1):
            ours.step()
            theirs.step()
            a.step()
            b.step()
            assert [(g["lr"], g["momentum"]) for g in ours.param_groups] == \
                [(g["lr"], g["momentum"]) for g in theirs.param_groups]


def test_every_batch_steps_a_scheduler_per_update_in_fit_and_resumes(rng, tmp_path):
    """every_batch(sched) steps it after each update of a fit (a warm-up over updates,
    OneCycleLR over all of them); a resumed fit puts it at the restored update count
    and ends bit-identical to an uninterrupted one."""
    X, y = blobs(rng, n=50, classes=3)
    X = X.astype(np.float32)

    def make():
        m = nn.Sequential(nn.Dense(2, 8, "relu", rng=0), nn.Dense(8, 3, rng=1))
        o = optim.Adam(m.parameters(), lr=0.01)
        return m, o

    model, opt = make()
    warm = sched.LinearLR(opt, start_factor=0.1, total_iters=10)
    seen = []

    class Spy:
        def on_train_batch_end(self, batch, logs):
            seen.append((batch, opt.lr, logs["loss"]))

        def __call__(self, epoch, logs):
            pass

    model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=16, verbose=0,
              shuffle=False, callbacks=[sched.every_batch(warm), Spy()])
    assert [b for b, _, _ in seen] == [0, 1, 2, 3] * 2  # (4 batches of 50 per epoch)
    assert [lr for _, lr, _ in seen] == pytest.approx(
        [0.01 * (0.1 + 0.9 * min(t, 10) / 10) for t in range(1, 9)])
    assert warm.last_epoch == opt.step_count == 8
    with pytest.raises(TypeError, match="LRScheduler"):
        sched.every_batch(sched.ReduceLROnPlateau(opt))

    ends = []
    for resumed in (False, True):
        m, o = make()
        cyc = sched.every_batch(sched.OneCycleLR(o, max_lr=0.05, total_steps=24))
        kw = dict(loss="cross_entropy", optimizer=o, batch_size=16, seed=4, verbose=0,
                  checkpoint=tmp_path / f"{resumed}.ckpt")
        if resumed:
            m.fit(X, y, epochs=3, callbacks=[cyc], **kw)
            m, o = make()  # (a new process)
            cyc = sched.every_batch(sched.OneCycleLR(o, max_lr=0.05, total_steps=24))
            m.fit(X, y, epochs=6, callbacks=[cyc], resume=True, **{**kw, "optimizer": o})
        else:
            m.fit(X, y, epochs=6, callbacks=[cyc], **kw)
        assert cyc.scheduler.last_epoch == o.step_count == 24
        ends.append(([p.value.copy() for p in m.parameters()], o.lr, o.param_groups[0]["betas"]))
    for a, b in zip(ends[0][0], ends[1][0]):
        np.testing.assert_array_equal(a, b)
    assert ends[0][1:] == ends[1][1:]


def test_review_edge_cases():
    """A refused SequentialLR.load_state_dict changes nothing; OneCycleLR refuses a
    phase of no length (PyTorch divides by zero); SmoothL1 with a beta that rounds to
    0 in float32 is L1 (no 0/0)."""
    opt = _two_groups()
    seq = sched.SequentialLR(opt, [sched.LinearLR(opt, total_iters=2), sched.ExponentialLR(opt, 0.9)],
                             milestones=[2])
    sd = seq.state_dict()
    sd["_schedulers"][1] = {**sd["_schedulers"][1], "T_max": 3}
    for _ in range(3):
        seq.step()
    before = (seq.last_epoch, [s.last_epoch for s in seq._schedulers])
    with pytest.raises(ValueError, match="T_max"):
        seq.load_state_dict(sd)
    assert (seq.last_epoch, [s.last_epoch for s in seq._schedulers]) == before
    fresh = _two_groups()
    with pytest.raises(ValueError, match="no length"):
        sched.OneCycleLR(fresh, max_lr=1.0, total_steps=10, pct_start=0.1)
    assert [g["momentum"] for g in fresh.param_groups] == [0.9, 0.9]
    p = np.array([[0.5, 1.0, -1.0]], np.float32)
    loss = fp.losses.SmoothL1(beta=1e-50)
    assert loss(p, np.array([[0.5, 0.0, 0.0]], np.float32)) == pytest.approx(2 / 3)
    np.testing.assert_array_equal(loss.backward(), np.float32([[0, 1 / 3, -1 / 3]]))


@pytest.mark.parametrize("strategy", ["linear", "cos"])
def test_one_cycle_per_batch_over_exactly_total_steps_in_fit(strategy):
    """The documented recipe every_batch(OneCycleLR(total_steps=epochs * batches)): the
    step after the last update (t == total_steps, never used) is past the anneal's
    end, where PyTorch's linear rate is negative; fit raised there, after training.
    That rate is 0 now (cos: PyTorch's own, small and positive; the rates before it
    are PyTorch's, test_one_cycle_and_warm_restarts)."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((64, 4)), rng.integers(0, 3, 64)
    model = fp.nn.Sequential(fp.nn.Dense(4, 8, "relu", rng=0), fp.nn.Dense(8, 3, rng=1))
    opt = fp.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cycle = sched.OneCycleLR(opt, max_lr=0.01, total_steps=12, anneal_strategy=strategy)
    hist = model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=3, batch_size=16,
                     verbose=0, callbacks=[sched.every_batch(cycle)])
    assert len(hist["loss"]) == 3 and opt.step_count == 12
    assert opt.lr >= 0.0 and (opt.lr == 0.0) == (strategy == "linear")


def test_state_dicts_are_copies_both_ways():
    """A state_dict shares nothing with the scheduler, and a loaded one nothing with
    the caller's dict (OneCycleLR's per-group levels, dicts in a list, were shared:
    editing the returned dict changed the live scheduler's rates)."""
    def make():
        opt = optim.SGD([fp.Parameter(np.zeros(2))], lr=0.1, momentum=0.9)
        return opt, sched.OneCycleLR(opt, max_lr=1.0, total_steps=20)
    opt, one = make()
    one.step()
    sd = one.state_dict()
    sd["_levels"][0]["max"] = 123.0
    for _ in range(3):
        one.step()
    assert max(one.get_last_lr()) <= 1.0
    opt2, other = make()
    sd = one.state_dict()
    other.load_state_dict(sd)
    sd["_levels"][0]["max"] = 123.0
    for _ in range(3):
        one.step()
        other.step()
    assert other.get_last_lr() == one.get_last_lr()
    plateau = sched.ReduceLROnPlateau(opt)
    sd = plateau.state_dict()
    assert all(v is not plateau.__dict__[k] for k, v in sd.items()
               if isinstance(v, (list, dict)))

    class Logged(sched.StepLR):  # (a subclass' own attribute: kept as is, not copied)
        def __init__(self, *args, **kwargs):
            import threading
            self.lock = threading.Lock()
            super().__init__(*args, **kwargs)

    logged = Logged(opt, step_size=2)
    sd = logged.state_dict()
    assert sd["lock"] is logged.lock
    logged.load_state_dict(sd)


def test_load_state_dict_checks_the_values_before_anything_changes():
    """Each loaded entry is of the kind the scheduler holds (counts are integers in
    range, numbers finite and >= 0, base rates one per group): a refused state_dict
    changes nothing, where PyTorch would load it and fail (or train on) at a later
    step.  Every scheduler's own state_dict loads, at any point of its schedule."""
    opt = _two_groups()
    s = sched.StepLR(opt, step_size=1, gamma=0.5)
    s.step()
    sd = s.state_dict()
    before = (s.state_dict(), [g["lr"] for g in opt.param_groups])
    for key, value, exc, match in [
            ("step_size", 0, ValueError, r"'step_size'\] must be >= 1, got 0"),
            ("step_size", -1, ValueError, r"must be >= 1"),
            ("step_size", 2.0, TypeError, r"'step_size'\] must be an integer, got float"),
            ("last_epoch", "x", TypeError, r"'last_epoch'\] must be an integer, got str"),
            ("last_epoch", -2, ValueError, r"'last_epoch'\] must be >= -1"),
            ("gamma", math.nan, ValueError, r"'gamma'\] must be a finite number >= 0"),
            ("gamma", -2.0, ValueError, r"'gamma'\] must be a finite number >= 0"),
            ("gamma", True, TypeError, r"'gamma'\] must be a real number, got bool"),
            ("base_lrs", [-1.0, 0.1], ValueError, r"'base_lrs'\] must hold finite rates >= 0"),
            ("base_lrs", [0.1], ValueError, r"must hold 2 entries"),
            ("_is_initial", 1, TypeError, r"must be a bool")]:
        with pytest.raises(exc, match=match):
            s.load_state_dict({**sd, key: value})
        assert (s.state_dict(), [g["lr"] for g in opt.param_groups]) == before
    plateau = sched.ReduceLROnPlateau(_two_groups(), patience=2)
    psd = plateau.state_dict()
    for key, value, match in [("mode", "maximum", r"'mode'\] must be one of \['min', 'max'\]"),
                              ("factor", 1.5, r"'factor'\] must be in \[0, 1\)"),
                              ("patience", -1, r"'patience'\] must be >= 0")]:
        with pytest.raises(ValueError, match=match):
            plateau.load_state_dict({**psd, key: value})
    assert plateau.state_dict() == psd
    plateau.load_state_dict({**psd, "best": -0.5})  # (best may be inf, or negative)
    s.load_state_dict(sd)  # (the good one still loads)
    table = [1.0, 0.5, 0.25]
    for make, steps in ((lambda o: sched.OneCycleLR(o, max_lr=1.0, total_steps=10), 9),
                        (lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=3), 5),
                        (lambda o: sched.MultiStepLR(o, [2, 4]), 5),
                        (lambda o: sched.PolynomialLR(o), 7),
                        (lambda o: sched.ConstantLR(o, total_iters=0), 2),
                        (lambda o: sched.LambdaLR(o, lambda t: table[t]), 2)):
        a = make(_two_groups())
        for _ in range(steps):  # (to the schedule's end: no next rate is computed)
            a.step()
        make(_two_groups()).load_state_dict(a.state_dict())
    cawr = sched.CosineAnnealingWarmRestarts(_two_groups(), T_0=3)
    for i in range(4):
        cawr.step(1 + i / 4)  # (PyTorch's per-batch fractional epochs: T_cur a float)
    sched.CosineAnnealingWarmRestarts(_two_groups(), T_0=3).load_state_dict(cawr.state_dict())


def test_load_state_dict_refuses_what_a_schedule_divides_by():
    for make, key in ((lambda o: sched.CosineAnnealingLR(o, T_max=5), "T_max"),
                      (lambda o: sched.LinearLR(o), "start_factor")):
        s = make(_two_groups())
        sd = s.state_dict()
        with pytest.raises(ValueError, match=rf"'{key}'\] must be > 0, got 0"):
            s.load_state_dict({**sd, key: 0.0 if isinstance(sd[key], float) else 0})


def test_cosine_annealing_takes_0_where_the_recursive_form_dips_below_0():
    """Rates halved by hand every epoch under CosineAnnealingLR(T_max=2, eta_min=1e-4):
    PyTorch's recursive form (which follows hand changes) gives -5e-5 and -7.5e-5 at
    the fourth epoch and applies them (a step uphill); the rates are 0 there and
    training goes on (refusing them recomputed the same values, refusing every later
    step too).  Up to that epoch the rates are PyTorch's (2.13)."""
    p = [fp.Parameter(np.zeros(2)), fp.Parameter(np.zeros(2))]
    opt = fp.optim.SGD([{"params": [p[0]]}, {"params": [p[1]], "lr": 5e-5}], lr=1e-4)
    sched = fp.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2, eta_min=1e-4)
    rates = []
    for _ in range(12):
        for g in opt.param_groups:
            g["lr"] *= 0.5
        opt.step()
        sched.step()
        rates.append([g["lr"] for g in opt.param_groups])
    np.testing.assert_allclose(rates[:3], [[7.5e-5, 6.25e-5], [1e-4, 1e-4], [5e-5, 2.5e-5]],
                               rtol=1e-12)
    assert rates[3] == [0.0, 0.0]
    assert all(r >= 0 for row in rates for r in row) and all(r > 0 for r in rates[4])


def test_schedulers_import_as_from_torch_optim():
    """`from fastprop.optim.lr_scheduler import StepLR`, as PyTorch code writes it
    (fastprop.optim is a module, not a package: the import failed)."""
    import subprocess
    import sys
    code = ("from fastprop.optim.lr_scheduler import StepLR\n"
            "import fastprop as fp\n"
            "assert StepLR is fp.lr_scheduler.StepLR\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_fit_refuses_a_scheduler_of_another_optimizer():
    """fit(optimizer="sgd", callbacks=[StepLR(opt)]) trained a new SGD at a constant
    rate and stepped the unused opt: refused, before anything changes."""
    X, y = np.random.default_rng(0).standard_normal((8, 3)), np.zeros((8, 2))
    model = fp.nn.Sequential(fp.nn.Dense(3, 2))
    opt, other = (fp.optim.SGD(model.parameters(), lr=0.1) for _ in range(2))
    before = [p.value.copy() for p in model.parameters()]
    for kw in (dict(optimizer="sgd", callbacks=[fp.optim.lr_scheduler.StepLR(opt, 1)]),
               dict(optimizer=opt, callbacks=[fp.optim.lr_scheduler.every_batch(
                   fp.optim.lr_scheduler.StepLR(other, 1))]),
               dict(optimizer=opt, callbacks=[fp.optim.lr_scheduler.ReduceLROnPlateau(other)])):
        with pytest.raises(ValueError, match=r"callbacks\[0\] is a \w+ of another optimizer"):
            model.fit(X, y, loss="mse", epochs=2, verbose=0, **kw)
        assert all(np.array_equal(a, p.value) for a, p in zip(before, model.parameters()))
        assert opt.lr == other.lr == 0.1 and opt.step_count == 0
    model.fit(X, y, loss="mse", optimizer=opt, epochs=2, verbose=0,
              callbacks=[fp.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)])
    assert opt.lr == 0.025
