"""One grid over every norm: backend x layout x rank x dtype x affine x running stats.

Each point is checked against the NumPy reference backend (float64 1e-10, float32 1e-5)
and against PyTorch (float64 1e-9, float32 1e-4): forward in training, forward in eval,
running statistics over several steps, and the backward (dx, dweight, dbias vs autograd).
The grid lives in ``norm_specs.grid()``; NHWC reaches PyTorch transposed to NCHW.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastnorm as fn  # noqa: E402
import fastnorm.functional as F  # noqa: E402
from norm_specs import (REF_RTOL, SPECS, TORCH_RTOL, assert_close, case_for,  # noqa: E402
                        copy_params, grid, torch_run)

GRID = grid()


@pytest.fixture(autouse=True, scope="module")
def _torch_single_thread():
    """PyTorch on one thread here: its OpenMP pool and fastnorm's, called alternately on
    tiny arrays, only wait for each other (and on a busy machine each PyTorch call can
    then take a scheduler tick); the values do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
WITH_RUNNING = [c for c in GRID if c.running]

# Momenta of the successive training steps of the running-statistics test.
MOMENTA = (0.1, 0.1, 0.5, 0.0, 1.0, 0.3, 0.1)


def _reference(call):
    with fn.use_backend("numpy"):
        return call()


def _check_dtype(arrays, case):
    for a in arrays:
        if a is not None:
            assert a.dtype == np.dtype(case.dtype)


@pytest.mark.parametrize("case", GRID, ids=str)
def test_forward_train(case):
    spec = case.spec
    x, p = case.inputs()
    p_ref = copy_params(p)
    with fn.use_backend(case.backend):
        y = spec.forward(x, copy_params(p), case, training=True)
        y_train, saved = spec.train(x, p, case)
    assert y.shape == x.shape
    _check_dtype([y, y_train, *saved], case)
    # the torch-like function and *_train run the same computation
    np.testing.assert_array_equal(y, y_train)

    y_ref, saved_ref = _reference(lambda: spec.train(x, p_ref, case))
    assert_close(y, y_ref, REF_RTOL[case.dtype], "y vs reference")
    for i, (s, s_ref) in enumerate(zip(saved, saved_ref)):
        assert s.shape == spec.stat_shape(x, case)
        assert_close(s, s_ref, REF_RTOL[case.dtype], f"saved statistic {i} vs reference")

    y_torch, _ = torch_run(case, x, p, training=True)
    assert_close(y, y_torch, TORCH_RTOL[case.dtype], "y vs torch")


@pytest.mark.parametrize("case", WITH_RUNNING, ids=str)
def test_forward_eval(case):
    spec = case.spec
    x, p = case.inputs()
    before = copy_params(p)
    with fn.use_backend(case.backend):
        y = spec.forward(x, p, case, training=False)
    _check_dtype([y], case)
    for k, v in before.items():  # eval reads the buffers and writes nothing
        if v is not None:
            np.testing.assert_array_equal(p[k], v, err_msg=k)

    y_ref = _reference(lambda: spec.forward(x, copy_params(p), case, training=False))
    assert_close(y, y_ref, REF_RTOL[case.dtype], "eval y vs reference")
    y_torch, _ = torch_run(case, x, p, training=False)
    assert_close(y, y_torch, TORCH_RTOL[case.dtype], "eval y vs torch")

    if case.norm == "batch_norm":  # the folded form with given statistics
        invstd = 1.0 / np.sqrt(p["running_var"].astype(np.float64) + 1e-5)
        with fn.use_backend(case.backend):
            y2 = F.batch_norm_eval(x, p["running_mean"], invstd, p["weight"], p["bias"],
                                   layout=case.layout)
        assert_close(y2, y_ref, REF_RTOL[case.dtype], "batch_norm_eval vs reference")


@pytest.mark.parametrize("case", WITH_RUNNING, ids=str)
def test_running_stats(case):
    """Several training steps with varying momentum update the buffers like PyTorch;
    then eval uses them."""
    spec = case.spec
    _, p = case.inputs()
    p_ref = copy_params(p)
    _, p_torch = torch_run(case, *case.inputs(), training=False)  # torch copies of p
    rtol_ref, rtol_torch = REF_RTOL[case.dtype], TORCH_RTOL[case.dtype]
    for step, momentum in enumerate(MOMENTA):
        x, _ = case.inputs("step", step)
        with fn.use_backend(case.backend):
            y = spec.forward(x, p, case, training=True, momentum=momentum)
        y_ref = _reference(lambda: spec.forward(x, p_ref, case, True, momentum))
        xt = torch.tensor(np.ascontiguousarray(spec.torch_x(x, case)))
        y_torch = spec.from_torch(
            spec.torch_forward(xt, p_torch, case, training=True, momentum=momentum).numpy(),
            case)
        assert_close(y, y_ref, rtol_ref, f"step {step}: y vs reference")
        assert_close(y, y_torch, rtol_torch, f"step {step}: y vs torch")
        for k in ("running_mean", "running_var"):
            assert p[k].dtype == np.dtype(case.dtype)
            assert_close(p[k], p_ref[k], rtol_ref, f"step {step}: {k} vs reference")
            assert_close(p[k], p_torch[k].numpy(), rtol_torch, f"step {step}: {k} vs torch")

    x, _ = case.inputs("eval")
    with fn.use_backend(case.backend):
        y = spec.forward(x, p, case, training=False)
    xt = torch.tensor(np.ascontiguousarray(spec.torch_x(x, case)))
    y_torch = spec.from_torch(spec.torch_forward(xt, p_torch, case, training=False).numpy(),
                              case)
    assert_close(y, y_torch, rtol_torch, "eval after training vs torch")


@pytest.mark.parametrize("case", GRID, ids=str)
def test_backward(case):
    spec = case.spec
    x, p = case.inputs()
    dy = case.rng("dy").standard_normal(x.shape).astype(case.dtype)
    with fn.use_backend(case.backend):
        _, saved = spec.train(x, p, case)
        grads = spec.backward(dy, x, saved, p, case)

    def ref():
        _, saved_ref = spec.train(x, p, case)
        return spec.backward(dy, x, saved_ref, p, case)
    grads_ref = _reference(ref)
    _, grads_torch, _ = torch_run(case, x, p, training=True, dy=dy)

    assert grads["input"].shape == x.shape
    names = ["input"]
    if p["weight"] is not None:
        names.append("weight")
        if p["bias"] is not None:
            names.append("bias")
    else:
        assert grads["weight"] is None and grads["bias"] is None
    for name in names:
        g = grads[name]
        assert g is not None, name
        assert g.dtype == np.dtype(case.dtype), name
        assert_close(g, grads_ref[name], REF_RTOL[case.dtype], f"d{name} vs reference")
        assert_close(g, grads_torch[name], TORCH_RTOL[case.dtype], f"d{name} vs torch")


# ---------------------------------------------------------- specific semantics ----
@pytest.mark.parametrize("backend", fn.backends())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rms_norm_eps_none_is_finfo_eps(backend, dtype):
    """eps=None means np.finfo(dtype).eps, as torch.nn.functional.rms_norm.  The input is
    small enough that eps matters."""
    rng = np.random.default_rng(3)
    eps = float(np.finfo(dtype).eps)
    x = (rng.standard_normal((5, 16)) * np.sqrt(eps)).astype(dtype)
    w = rng.uniform(0.5, 1.5, 16).astype(dtype)
    with fn.use_backend(backend):
        y_none = F.rms_norm(x, 16, w)
        y_eps = F.rms_norm(x, (16,), w, eps=eps)
        y_other = F.rms_norm(x, 16, w, eps=1e-5)
        _, invrms = F.rms_norm_train(x, 16, w)
    np.testing.assert_array_equal(y_none, y_eps)
    assert np.max(np.abs(y_none - y_other)) > 0.1
    x64 = x.astype(np.float64)
    assert_close(invrms, 1 / np.sqrt((x64 ** 2).mean(1) + eps), REF_RTOL[dtype])
    yt = torch.nn.functional.rms_norm(torch.tensor(x), (16,), torch.tensor(w)).numpy()
    assert_close(y_none, yt, TORCH_RTOL[dtype])


@pytest.mark.parametrize("backend", fn.backends())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_norm_without_bias(backend, dtype):
    """LayerNorm(bias=False): weight only, multi-dim normalized_shape; gradient of weight."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 4, 5, 6)).astype(dtype)
    w = rng.uniform(0.5, 1.5, (5, 6)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    with fn.use_backend(backend):
        y, mean, invstd = F.layer_norm_train(x, (5, 6), w)
        dx, dw, db = F.layer_norm_backward(dy, x, mean, invstd, (5, 6), w)
    assert mean.shape == invstd.shape == (3, 4)
    assert dw.shape == db.shape == (5, 6)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    yt = torch.nn.functional.layer_norm(xt, (5, 6), wt, None)
    yt.backward(torch.tensor(dy))
    rtol = TORCH_RTOL[dtype]
    assert_close(y, yt.detach().numpy(), rtol)
    assert_close(dx, xt.grad.numpy(), rtol)
    assert_close(dw, wt.grad.numpy(), rtol)
    assert_close(db, dy.sum(axis=(0, 1)), rtol)  # what dbias would be


@pytest.mark.parametrize("backend", fn.backends())
@pytest.mark.parametrize("normalized_shape", [(6,), (5, 6), (4, 5, 6), (3, 4, 5, 6)])
def test_layer_norm_normalized_shapes(backend, normalized_shape):
    """Every trailing normalized_shape up to the whole input; an int equals a 1-tuple."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 5, 6)) + 3
    w = rng.uniform(0.5, 1.5, normalized_shape)
    b = rng.standard_normal(normalized_shape)
    with fn.use_backend(backend):
        y = F.layer_norm(x, normalized_shape, w, b)
        yr = F.rms_norm(x, normalized_shape, w, eps=1e-6)
        if len(normalized_shape) == 1:
            np.testing.assert_array_equal(F.layer_norm(x, normalized_shape[0], w, b), y)
    yt = torch.nn.functional.layer_norm(torch.tensor(x), normalized_shape, torch.tensor(w),
                                        torch.tensor(b)).numpy()
    yrt = torch.nn.functional.rms_norm(torch.tensor(x), normalized_shape, torch.tensor(w),
                                       eps=1e-6).numpy()
    assert_close(y, yt, 1e-9)
    assert_close(yr, yrt, 1e-9)


@pytest.mark.parametrize("backend", fn.backends())
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_instance_norm_running_buffers_eval(backend, layout):
    """InstanceNorm use_input_stats=False normalizes with the running buffers (per
    channel, like BatchNorm eval) and leaves them unchanged; training moves them to the
    batch average of the per-instance statistics (unbiased variance)."""
    rng = np.random.default_rng(6)
    spec = SPECS["instance_norm"]
    c = case_for("instance_norm", backend, layout, affine="full", running=True)
    x, p = c.inputs()
    p_torch = {k: torch.tensor(v) for k, v in p.items()}
    with fn.use_backend(backend):
        y_train = spec.forward(x, p, c, training=True, momentum=0.2)
        rm, rv = p["running_mean"].copy(), p["running_var"].copy()
        x2 = (rng.standard_normal(x.shape) * 2 + 1).astype(x.dtype)
        y_eval = spec.forward(x2, p, c, training=False)
    np.testing.assert_array_equal(p["running_mean"], rm)
    np.testing.assert_array_equal(p["running_var"], rv)
    xt = torch.tensor(np.ascontiguousarray(spec.torch_x(x, c)))
    yt_train = spec.torch_forward(xt, p_torch, c, training=True, momentum=0.2).numpy()
    xt2 = torch.tensor(np.ascontiguousarray(spec.torch_x(x2, c)))
    yt_eval = spec.torch_forward(xt2, p_torch, c, training=False).numpy()
    assert_close(y_train, spec.from_torch(yt_train, c), 1e-9)
    assert_close(rm, p_torch["running_mean"].numpy(), 1e-9)
    assert_close(rv, p_torch["running_var"].numpy(), 1e-9)
    assert_close(y_eval, spec.from_torch(yt_eval, c), 1e-9)


@pytest.mark.parametrize("backend", fn.backends())
@pytest.mark.parametrize("eps", [1e-3, 0.5])
@pytest.mark.parametrize("norm", list(SPECS))
def test_eps_values(backend, eps, norm):
    """A non-default eps reaches the computation (forward and saved invstd)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 6, 5)) * 0.3
    tx = torch.tensor(x)
    TF = torch.nn.functional
    with fn.use_backend(backend):
        if norm == "batch_norm":
            y, _, invstd = F.batch_norm_train(x, eps=eps)
            yt = TF.batch_norm(tx, None, None, training=True, eps=eps)
            assert_close(invstd, 1 / np.sqrt(x.var(axis=(0, 2)) + eps), 1e-10)
        elif norm == "layer_norm":
            y = F.layer_norm(x, 5, eps=eps)
            yt = TF.layer_norm(tx, (5,), eps=eps)
        elif norm == "group_norm":
            y = F.group_norm(x, 3, eps=eps)
            yt = TF.group_norm(tx, 3, eps=eps)
        elif norm == "instance_norm":
            y = F.instance_norm(x, eps=eps)
            yt = TF.instance_norm(tx, eps=eps)
        else:
            y = F.rms_norm(x, 5, eps=eps)
            yt = TF.rms_norm(tx, (5,), eps=eps)
    assert_close(y, yt.numpy(), 1e-9)
