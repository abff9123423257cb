"""Optimizers: PyTorch's update rules, step for step, on bare tensors and on whole models."""
import numpy as np
import pytest

import fastnorm as fn
from fastnorm import optim

from model_pairs import assert_close, batch, pair, to_layout

torch = pytest.importorskip("torch")

CONFIGS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("SGD", dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=1e-2)),
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)),
    ("AdamW", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
]


@pytest.mark.parametrize("one_pass", [True, False], ids=["cython", "numpy"])
@pytest.mark.parametrize("name,kw", CONFIGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_update_rule_matches_torch(name, kw, dtype, one_pass, monkeypatch):
    """Both ways of updating (the one-pass Cython kernel where built, NumPy operations)."""
    if not one_pass:
        monkeypatch.setattr(optim, "_kernels", None)
    elif optim._kernels is None:
        pytest.skip("the Cython optimizer kernels are not built")
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 3)).astype(dtype)
    p = fn.Tensor(w.copy(), requires_grad=True)
    tp = torch.nn.Parameter(torch.tensor(w))
    opt = getattr(optim, name)([p], **kw)
    topt = getattr(torch.optim, name)([tp], **kw)
    for _ in range(6):
        g = rng.standard_normal(w.shape).astype(dtype)
        p.grad = g.copy()
        tp.grad = torch.tensor(g)
        opt.step()
        topt.step()
    assert p.data.dtype == dtype
    assert_close(p.data, tp.detach().numpy(), 1e-6 if dtype == np.float32 else 1e-12)


def test_zero_grad_sets_none_and_step_skips_params_without_grad():
    a = fn.Tensor(np.ones(3, np.float32), requires_grad=True)
    b = fn.Tensor(np.ones(3, np.float32), requires_grad=True)
    opt = optim.SGD([a, b], lr=0.5, momentum=0.9)
    a.grad = np.ones(3, np.float32)
    opt.step()
    np.testing.assert_array_equal(a.data, 0.5)
    np.testing.assert_array_equal(b.data, 1.0)
    opt.zero_grad()
    assert a.grad is None and b.grad is None
    opt.step()  # no gradients: nothing moves
    np.testing.assert_array_equal(a.data, 0.5)


def test_param_groups_override_defaults():
    a = fn.Tensor(np.ones(2), requires_grad=True)
    b = fn.Tensor(np.ones(2), requires_grad=True)
    opt = optim.SGD([{"params": [a]}, {"params": [b], "lr": 1.0}], lr=0.1)
    a.grad = np.ones(2)
    b.grad = np.ones(2)
    opt.step()
    np.testing.assert_allclose(a.data, 0.9)
    np.testing.assert_allclose(b.data, 0.0)


@pytest.mark.parametrize("make,match", [
    (lambda p: optim.SGD(p, lr=-1), "lr"),
    (lambda p: optim.SGD(p, lr=0.1, momentum=-0.5), "momentum"),
    (lambda p: optim.SGD(p, lr=0.1, nesterov=True), "nesterov"),
    (lambda p: optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
    (lambda p: optim.SGD(p, lr=0.1, weight_decay=-1), "weight_decay"),
    (lambda p: optim.Adam(p, lr=float("nan")), "lr"),
    (lambda p: optim.Adam(p, betas=(1.0, 0.999)), r"betas\[0\]"),
    (lambda p: optim.Adam(p, betas=(0.9, -0.1)), r"betas\[1\]"),
    (lambda p: optim.Adam(p, betas=0.9), "betas"),
    (lambda p: optim.AdamW(p, eps=-1e-8), "eps"),
    (lambda p: optim.Adam([], lr=0.1), "empty"),
    (lambda p: optim.Adam(p + p), "more than once"),
    (lambda p: optim.Adam([{"params": p, "momentum": 0.9}]), "unknown"),
])
def test_bad_hyperparameters(make, match):
    params = [fn.Tensor(np.ones(2, np.float32), requires_grad=True)]
    with pytest.raises(ValueError, match=match):
        make(params)


def test_bad_params_type():
    with pytest.raises(TypeError, match="params"):
        optim.SGD([np.ones(3)], lr=0.1)
    with pytest.raises(TypeError, match="single Tensor"):
        optim.SGD(fn.Tensor(np.ones(3), requires_grad=True), lr=0.1)


def test_wrong_grad_shape_is_a_clear_error():
    p = fn.Tensor(np.ones(3, np.float32), requires_grad=True)
    opt = optim.Adam([p])
    p.grad = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="shape"):
        opt.step()
    np.testing.assert_array_equal(p.data, 1.0)


# ---------------------------------------------------------------- whole models ----
MODEL_OPTIMIZERS = [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("Adam", dict(lr=1e-2, weight_decay=1e-3)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.05)),
]


# The bias of a layer followed by a training-mode BatchNorm has a gradient that is zero
# up to rounding; Adam divides it by its own magnitude and turns the rounding noise into
# full-size steps, different in every library.  Adam and AdamW leave those biases out.
PRE_BN_BIASES = {"mlp": {"0.bias"}, "cnn": {"0.bias", "4.bias"}}


def _params(model, kind, name):
    skip = PRE_BN_BIASES[kind] if name.startswith("Adam") else set()
    return [p for k, p in model.named_parameters() if k not in skip]


def _train(tm, fm, kind, layout, name, kw, steps=5):
    topt = getattr(torch.optim, name)(_params(tm, kind, name), **kw)
    fopt = getattr(optim, name)(_params(fm, kind, name), **kw)
    tm.train()
    fm.train()
    for step in range(steps):
        x, y = batch(kind, seed=100 + step)
        tloss = torch.nn.functional.cross_entropy(tm(torch.tensor(x)), torch.tensor(y))
        topt.zero_grad()
        tloss.backward()
        topt.step()
        floss = fn.functional.cross_entropy(fm(to_layout(x, layout)), y)
        fopt.zero_grad()
        floss.backward()
        fopt.step()
        assert_close(floss.data, tloss.item(), what=f"loss at step {step}")


@pytest.mark.parametrize("name,kw", MODEL_OPTIMIZERS)
@pytest.mark.parametrize("kind,layout", [("mlp", "NCHW"), ("cnn", "NCHW"), ("cnn", "NHWC")])
def test_five_steps_match_torch(kind, layout, name, kw):
    tm, fm = pair(torch, kind, layout)
    _train(tm, fm, kind, layout, name, kw)
    ts = tm.state_dict()
    fs = fm.state_dict()
    assert list(fs) == list(ts)
    for k in ts:
        assert_close(fs[k], ts[k].numpy(), what=k)
    # And the trained models agree in eval mode.
    tm.eval()
    fm.eval()
    x, _ = batch(kind, seed=7)
    with torch.no_grad():
        ref = tm(torch.tensor(x)).numpy()
    assert_close(fm(to_layout(x, layout)).data, ref, what="eval output")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_running_stats_with_cumulative_average(kind):
    """momentum=None: running stats are the average over all batches so far."""
    tm, fm = pair(torch, kind, momentum=None)
    _train(tm, fm, kind, "NCHW", "SGD", dict(lr=0.05, momentum=0.9), steps=4)
    ts, fs = tm.state_dict(), fm.state_dict()
    for k in ts:
        if "running" in k or "num_batches" in k:
            assert fs[k].dtype == ts[k].numpy().dtype, k
            assert_close(fs[k], ts[k].numpy(), what=k)
    assert int(fs["1.num_batches_tracked"]) == 4
