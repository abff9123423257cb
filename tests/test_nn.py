"""Modules: PyTorch parity (outputs, losses, gradients, running statistics, state dicts)
in both layouts, strict loading, the eval cache, validation."""
import numpy as np
import pytest

import fastnorm as fn
from fastnorm import nn

from model_pairs import (assert_close, batch, fn_cnn, fn_mlp, pair, to_layout, torch_cnn,
                         torch_mlp)

torch = pytest.importorskip("torch")

CASES = [("mlp", "NCHW"), ("mlp", "NHWC"), ("cnn", "NCHW"), ("cnn", "NHWC")]


def _forward_backward(tm, fm, kind, layout, seed=0):
    x, y = batch(kind, seed=seed)
    tx = torch.tensor(x, requires_grad=True)
    tout = tm(tx)
    tloss = torch.nn.functional.cross_entropy(tout, torch.tensor(y))
    tloss.backward()
    fx = fn.Tensor(to_layout(x, layout), requires_grad=True)
    fout = fm(fx)
    floss = fn.functional.cross_entropy(fout, y)
    floss.backward()
    return (tout, tloss, tx), (fout, floss, fx)


@pytest.mark.parametrize("kind,layout", CASES)
def test_training_forward_backward_matches_torch(kind, layout):
    tm, fm = pair(torch, kind, layout)
    (tout, tloss, tx), (fout, floss, fx) = _forward_backward(tm, fm, kind, layout)
    assert_close(fout.data, tout.detach().numpy(), what="output")
    assert_close(floss.data, tloss.item(), what="loss")
    assert_close(fx.grad, to_layout(tx.grad.numpy(), layout), what="input grad")
    tgrads = {k: p.grad.numpy() for k, p in tm.named_parameters()}
    fgrads = dict(fm.named_parameters())
    assert list(fgrads) == list(tgrads)
    # The bias of a layer followed by a training-mode BatchNorm has a zero gradient up
    # to rounding (the BatchNorm subtracts the mean): both must be at rounding level.
    tiny = 1e-4 * max(float(np.abs(g).max()) for g in tgrads.values())
    for k, g in tgrads.items():
        assert fgrads[k].grad is not None, k
        if np.abs(g).max() < tiny:
            assert np.abs(fgrads[k].grad).max() < tiny, k
        else:
            assert_close(fgrads[k].grad, g, what=f"grad of {k}")
    # the running statistics moved the same way
    ts, fs = tm.state_dict(), fm.state_dict()
    for k in ts:
        assert_close(fs[k], ts[k].numpy(), what=k)


@pytest.mark.parametrize("kind,layout", CASES)
def test_eval_matches_torch(kind, layout):
    tm, fm = pair(torch, kind, layout)
    _forward_backward(tm, fm, kind, layout)  # move the running stats away from 0/1
    tm.eval()
    fm.eval()
    x, _ = batch(kind, seed=3)
    with torch.no_grad():
        ref = tm(torch.tensor(x)).numpy()
    assert_close(fm(to_layout(x, layout)).data, ref, what="eval, grad mode on")
    with fn.inference_mode():
        assert_close(fm(to_layout(x, layout)).data, ref, what="eval, inference mode")
    # gradients still flow in eval mode (frozen statistics)
    fx = fn.Tensor(to_layout(x, layout), requires_grad=True)
    fm(fx).sum().backward()
    tx = torch.tensor(x, requires_grad=True)
    tm(tx).sum().backward()
    assert_close(fx.grad, to_layout(tx.grad.numpy(), layout), what="eval input grad")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_state_dict_keys_and_dtypes_match_torch(kind):
    tm, fm = pair(torch, kind)
    ts, fs = tm.state_dict(), fm.state_dict()
    assert list(fs) == list(ts)
    for k, v in ts.items():
        assert fs[k].shape == tuple(v.shape), k
        assert fs[k].dtype == v.numpy().dtype, k
    nbt = fs["1.num_batches_tracked"]
    assert nbt.shape == () and nbt.dtype == np.int64
    # and the other way round: fastnorm's state dict loads into torch
    tm2 = (torch_mlp if kind == "mlp" else torch_cnn)(torch)
    tm2.load_state_dict({k: torch.from_numpy(v) for k, v in fs.items()})


def test_state_dict_is_a_copy_and_layout_independent():
    a, b = fn_cnn("NCHW"), fn_cnn("NHWC")
    b.load_state_dict(a.state_dict())
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        np.testing.assert_array_equal(va, vb, err_msg=k)
    sd = a.state_dict()
    sd["0.weight"][...] = 0
    assert np.abs(a[0].weight.data).max() > 0


def _snapshot(m):
    return {k: v.copy() for k, v in m.state_dict().items()}


def _assert_unchanged(m, before):
    after = m.state_dict()
    assert list(after) == list(before)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


@pytest.mark.parametrize("corrupt,match", [
    (lambda d: d.pop("1.running_var"), "missing key.*1.running_var"),
    (lambda d: d.update({"5.weight": np.ones(3, np.float32)}), "unexpected key.*5.weight"),
    (lambda d: d.update({"3.weight": np.ones((3, 16), np.float32)}), "size mismatch for 3.weight"),
    (lambda d: d.update({"3.bias": np.array(["a"] * 4)}), "3.bias"),
])
def test_strict_load_errors_change_nothing(corrupt, match):
    m = fn_mlp()
    before = _snapshot(m)
    new = {k: v + 1 for k, v in m.state_dict().items()}  # every valid entry differs
    corrupt(new)
    with pytest.raises(ValueError, match=match):
        m.load_state_dict(new)
    with pytest.raises(RuntimeError):  # also a RuntimeError, as in torch
        m.load_state_dict(new)
    _assert_unchanged(m, before)


def test_load_casts_to_parameter_dtype_and_keeps_objects():
    m = fn_mlp(dtype=np.float32)
    w = m[0].weight
    data = w.data
    new = {k: v.astype(np.float64) if v.dtype.kind == "f" else v
           for k, v in m.state_dict().items()}
    new["0.weight"] = np.full((16, 6), 0.25)
    new["1.num_batches_tracked"] = np.array(7.0)
    m.load_state_dict(new)
    assert m[0].weight is w and w.data is data  # in place: optimizers keep their params
    assert w.data.dtype == np.float32 and np.all(w.data == 0.25)
    nbt = m[1].num_batches_tracked
    assert nbt.dtype == np.int64 and nbt.shape == () and int(nbt) == 7


def test_load_accepts_torch_tensors_directly():
    tm, fm = pair(torch, "mlp")
    fm2 = fn_mlp()
    fm2.load_state_dict(tm.state_dict())
    for k, v in fm.state_dict().items():
        np.testing.assert_array_equal(fm2.state_dict()[k], v, err_msg=k)


def test_non_strict_load_reports_keys():
    m = fn_mlp()
    sd = m.state_dict()
    sd.pop("0.bias")
    sd["extra"] = np.ones(1)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert missing == ["0.bias"] and unexpected == ["extra"]


# ------------------------------------------------------------------ BatchNorm ----
def test_eval_cache_follows_load_state_dict_and_eps():
    bn = nn.BatchNorm1d(3).eval()
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    y0 = bn(x).data
    np.testing.assert_allclose(y0, x / np.sqrt(1 + 1e-5), rtol=1e-6)
    sd = bn.state_dict()
    sd["running_mean"] = np.array([1.0, 2.0, 3.0], np.float32)
    sd["running_var"] = np.array([4.0, 4.0, 4.0], np.float32)
    bn.load_state_dict(sd)
    np.testing.assert_allclose(bn(x).data, (x - [1, 2, 3]) / np.sqrt(4 + 1e-5), rtol=1e-6)
    bn.eps = 1.0
    np.testing.assert_allclose(bn(x).data, (x - [1, 2, 3]) / np.sqrt(5.0), rtol=1e-6)
    bn.running_var = np.full(3, 8.0, np.float32)  # assignment invalidates too
    np.testing.assert_allclose(bn(x).data, (x - [1, 2, 3]) / 3.0, rtol=1e-6)


def test_eval_cache_follows_training_updates():
    bn = nn.BatchNorm2d(2)
    x = np.random.default_rng(0).standard_normal((3, 2, 4, 4)).astype(np.float32) * 3 + 1
    bn.eval()
    first = bn(x).data
    bn.train()
    bn(x)
    bn.eval()
    second = bn(x).data
    ref = torch.nn.BatchNorm2d(2)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in bn.state_dict().items()})
    ref.eval()
    with torch.no_grad():
        assert_close(second, ref(torch.tensor(x)).numpy())
    assert not np.allclose(first, second)


def test_rejected_call_changes_nothing():
    bn = nn.BatchNorm2d(3)
    before = _snapshot(bn)
    bad = [
        (np.ones((2, 4, 5, 5), np.float32), ValueError, "3 channels"),
        (np.ones((2, 3, 5), np.float32), ValueError, "4D"),
        (np.ones((1, 3, 1, 1), np.float32), ValueError, "more than 1 value"),
        (np.ones((2, 3, 5, 5), np.float64), TypeError, "float64.*float32"),
        (np.ones((0, 3, 5, 5), np.float32), ValueError, "empty|non-empty"),
    ]
    for x, exc, match in bad:
        with pytest.raises(exc, match=match):
            bn(x)
        _assert_unchanged(bn, before)
    assert int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize("cls,good,bad", [
    (nn.BatchNorm1d, [(4, 3), (4, 3, 5)], [(4, 3, 5, 5)]),
    (nn.BatchNorm2d, [(4, 3, 2, 2)], [(4, 3), (4, 3, 2, 2, 2)]),
    (nn.BatchNorm3d, [(4, 3, 2, 2, 2)], [(4, 3, 2, 2)]),
])
def test_batchnorm_rank_checks(cls, good, bad):
    m = cls(3)
    for shape in good:
        assert m(np.random.default_rng(0).standard_normal(shape).astype(np.float32)).shape == shape
    for shape in bad:
        with pytest.raises(ValueError, match=f"{len(shape)}D"):
            m(np.ones(shape, np.float32))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_batchnorm3d_and_no_running_stats_match_torch(momentum, layout):
    rng = np.random.default_rng(0)
    for track in (True, False):
        t = torch.nn.BatchNorm3d(3, momentum=momentum, track_running_stats=track)
        f = nn.BatchNorm3d(3, momentum=momentum, track_running_stats=track, layout=layout)
        for _ in range(3):
            x = rng.standard_normal((2, 3, 2, 3, 2)).astype(np.float32) * 2 + 0.5
            xf = x.transpose(0, 2, 3, 4, 1) if layout == "NHWC" else x
            out = f(np.ascontiguousarray(xf)).data
            ref = t(torch.tensor(x)).detach().numpy()
            assert_close(out, ref.transpose(0, 2, 3, 4, 1) if layout == "NHWC" else ref)
        ts, fs = t.state_dict(), f.state_dict()
        assert list(fs) == list(ts)
        for k in ts:
            assert_close(fs[k], ts[k].numpy(), what=k)
        t.eval()
        f.eval()
        out = f(np.ascontiguousarray(xf)).data
        ref = t(torch.tensor(x)).detach().numpy()
        assert_close(out, ref.transpose(0, 2, 3, 4, 1) if layout == "NHWC" else ref)


# ---------------------------------------------------------------- other norms ----
def _norm_pairs():
    T = torch.nn
    return [
        ("LayerNorm", lambda: T.LayerNorm((4, 5)), lambda l: nn.LayerNorm((4, 5)), (2, 3, 4, 5), False),
        ("LayerNorm-nobias", lambda: T.LayerNorm(5, bias=False),
         lambda l: nn.LayerNorm(5, bias=False), (2, 3, 5), False),
        ("RMSNorm", lambda: T.RMSNorm(5), lambda l: nn.RMSNorm(5), (2, 3, 5), False),
        ("RMSNorm-eps", lambda: T.RMSNorm((3, 5), eps=1e-3),
         lambda l: nn.RMSNorm((3, 5), eps=1e-3), (2, 3, 5), False),
        ("GroupNorm", lambda: T.GroupNorm(2, 4), lambda l: nn.GroupNorm(2, 4, layout=l),
         (2, 4, 3, 3), True),
        ("InstanceNorm2d", lambda: T.InstanceNorm2d(4, affine=True),
         lambda l: nn.InstanceNorm2d(4, affine=True, layout=l), (2, 4, 3, 3), True),
        ("InstanceNorm1d-track", lambda: T.InstanceNorm1d(4, track_running_stats=True),
         lambda l: nn.InstanceNorm1d(4, track_running_stats=True, layout=l), (2, 4, 6), True),
    ]


def _norm_cases():
    return [(*p[:4], layout) for p in _norm_pairs()
            for layout in (("NCHW", "NHWC") if p[4] else ("NCHW",))]


@pytest.mark.parametrize("name,make_t,make_f,shape,layout", _norm_cases(),
                         ids=[f"{c[0]}-{c[4]}" for c in _norm_cases()])
def test_norm_modules_match_torch(name, make_t, make_f, shape, layout):
    torch.manual_seed(0)
    t, f = make_t(), make_f(layout)
    with torch.no_grad():  # non-trivial affine parameters
        for p in t.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    f.load_state_dict(t.state_dict())
    assert list(f.state_dict()) == list(t.state_dict())
    perm = (0, *range(2, len(shape)), 1) if layout == "NHWC" else tuple(range(len(shape)))
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32) * 2 + 1
    dy = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    for mode in ("train", "eval"):
        getattr(t, mode)()
        getattr(f, mode)()
        tx = torch.tensor(x, requires_grad=True)
        tout = t(tx)
        tout.backward(torch.tensor(dy))
        fx = fn.Tensor(np.ascontiguousarray(x.transpose(perm)), requires_grad=True)
        fout = f(fx)
        fout.backward(np.ascontiguousarray(dy.transpose(perm)))
        assert_close(fout.data, tout.detach().numpy().transpose(perm), what=f"{mode} output")
        assert_close(fx.grad, tx.grad.numpy().transpose(perm), what=f"{mode} input grad")
        for (k, tp), (k2, fp) in zip(t.named_parameters(), f.named_parameters()):
            assert k == k2
            assert_close(fp.grad, tp.grad.numpy(), what=f"{mode} grad of {k}")
            tp.grad = None
            fp.grad = None
        for k, v in t.state_dict().items():
            assert_close(f.state_dict()[k], v.numpy(), what=k)


def test_group_norm_construction_error():
    with pytest.raises(ValueError, match="num_channels.*multiple of num_groups"):
        nn.GroupNorm(3, 8)
    nn.GroupNorm(4, 8)


def test_instance_norm_unbatched_input():
    m = nn.InstanceNorm1d(3)
    x = np.random.default_rng(0).standard_normal((3, 7)).astype(np.float32)
    ref = torch.nn.InstanceNorm1d(3)(torch.tensor(x)).numpy()
    assert_close(m(x).data, ref)


# ----------------------------------------------------------- module machinery ----
@pytest.mark.parametrize("make,x", [
    (lambda: nn.Linear(3, 2), np.ones((2, 3))),
    (lambda: nn.Conv2d(1, 2, 3), np.ones((1, 1, 4, 4))),
    (lambda: nn.BatchNorm1d(3), np.ones((2, 3))),
    (lambda: nn.LayerNorm(3), np.ones((2, 3))),
    (lambda: nn.GroupNorm(1, 3), np.ones((2, 3, 2))),
    (lambda: nn.RMSNorm(3), np.ones((2, 3))),
    (lambda: nn.InstanceNorm1d(3, affine=True), np.ones((2, 3, 4))),
])
def test_input_dtype_mismatch_is_a_type_error(make, x):
    m = make()
    with pytest.raises(TypeError, match="float64.*float32"):
        m(x)


def test_modules_without_parameters_take_either_dtype():
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float64)
    assert nn.InstanceNorm1d(3)(x).dtype == np.float64
    assert nn.LayerNorm(4, elementwise_affine=False)(x).dtype == np.float64
    assert nn.ReLU()(x).dtype == np.float64
    with pytest.raises(TypeError, match="Tensor or a numpy.ndarray"):
        nn.Linear(4, 2)([[1.0, 2.0, 3.0, 4.0]])


def test_float64_modules():
    m = fn_cnn(dtype=np.float64)
    x, _ = batch("cnn")
    out = m(x.astype(np.float64))
    assert out.dtype == np.float64
    assert all(v.dtype == np.float64 for k, v in m.state_dict().items() if "num_batches" not in k)
    with pytest.raises(TypeError, match="dtype"):
        nn.Linear(2, 2, dtype=np.int32)


def test_init_distributions_and_seeding():
    fn.manual_seed(0)
    a = nn.Linear(400, 300)
    fn.manual_seed(0)
    b = nn.Linear(400, 300)
    np.testing.assert_array_equal(a.weight.data, b.weight.data)
    bound = 1 / np.sqrt(400)
    w = a.weight.data
    assert w.dtype == np.float32 and np.abs(w).max() <= bound
    assert abs(w.std() - bound / np.sqrt(3)) < 0.02 * bound
    assert np.abs(a.bias.data).max() <= bound
    c = nn.Conv2d(4, 64, 3)
    assert c.weight.shape == (64, 4, 3, 3)
    assert np.abs(c.weight.data).max() <= 1 / np.sqrt(36)
    assert c.weight.data.std() > 0.8 / np.sqrt(36) / np.sqrt(3)
    bn = nn.BatchNorm2d(5)
    assert np.all(bn.weight.data == 1) and np.all(bn.bias.data == 0)


def test_module_api():
    m = fn_mlp()
    assert m.training and all(c.training for c in m.children())
    assert m.eval() is m and not any(c.training for c in m.modules())
    m.train()
    assert [type(c).__name__ for c in m.children()] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert len(list(m.modules())) == 5
    names = [k for k, _ in m.named_parameters()]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in m.parameters())
    assert isinstance(m[1].running_mean, np.ndarray)
    assert len(m) == 4 and isinstance(m[-1], nn.Linear)
    out = m(np.ones((2, 6), np.float32))
    assert isinstance(out, fn.Tensor) and out.shape == (2, 4)
    assert "BatchNorm1d(16" in repr(m)


def test_shared_parameters_are_listed_once():
    lin = nn.Linear(3, 3)
    m = nn.Sequential(lin, nn.ReLU(), lin)
    assert len(list(m.parameters())) == 2
    assert list(m.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_flatten_nhwc_uses_torch_order():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    a = nn.Flatten()(x).data
    b = nn.Flatten(layout="NHWC")(np.ascontiguousarray(x.transpose(0, 2, 3, 1))).data
    np.testing.assert_array_equal(a, x.reshape(2, -1))
    np.testing.assert_array_equal(b, a)


def test_activations_and_dropout():
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(4, 6)
    tx = torch.tensor(x)
    for f, t in [(nn.ReLU(), torch.nn.ReLU()), (nn.Sigmoid(), torch.nn.Sigmoid()),
                 (nn.Tanh(), torch.nn.Tanh()), (nn.GELU(), torch.nn.GELU())]:
        assert_close(f(x).data, t(tx).numpy(), 1e-6, what=type(f).__name__)
    d = nn.Dropout(0.5)
    fn.manual_seed(0)
    y = d(np.ones((100, 100), np.float32)).data
    assert set(np.unique(y)) <= {0.0, 2.0} and 0.4 < (y == 0).mean() < 0.6
    d.eval()
    np.testing.assert_array_equal(d(x).data, x)
    with pytest.raises(ValueError, match="p"):
        nn.Dropout(1.5)


def test_pools_match_torch():
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    for f, t in [(nn.MaxPool2d(2), torch.nn.MaxPool2d(2)),
                 (nn.AvgPool2d(3, stride=2, padding=1), torch.nn.AvgPool2d(3, 2, 1)),
                 (nn.MaxPool2d(3, 2, padding=1, layout="NHWC"), torch.nn.MaxPool2d(3, 2, 1))]:
        ref = t(torch.tensor(x)).numpy()
        if f.layout == "NHWC":
            out = f(np.ascontiguousarray(x.transpose(0, 2, 3, 1))).data.transpose(0, 3, 1, 2)
        else:
            out = f(x).data
        assert_close(out, ref, 1e-6)
