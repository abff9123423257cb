"""Numerics and behaviour of the norms beyond the grid: finite-difference gradients,
accuracy on offset data, NaN/Inf, thread-count independence, non-contiguous input,
``out=``, backend and thread selection, and property tests over random shapes."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastnorm as fn
import fastnorm.functional as F
from fastnorm._backend import get_kernels
from norm_specs import (BACKENDS, COMPILED, LAYOUTS, NORMS, REF_RTOL, SPECS, assert_close,
                        case_for, rel_error, rng_for)

ROW_NORMS = ("layer_norm", "rms_norm")


def layouts_of(norm):
    return SPECS[norm].layouts


def norm_layouts():
    return [(n, lay) for n in NORMS for lay in layouts_of(n)]


@pytest.fixture
def restore_threads():
    n = fn.get_num_threads()
    yield
    fn.set_num_threads(n)


# ------------------------------------------------------ finite-difference gradients ----
def _loss(spec, case, x, p, u):
    """<u, f(x)> with f the training forward."""
    y, _ = spec.train(x, p, case)
    return float(np.vdot(u, y))


@pytest.mark.parametrize("affine", ["none", "full"])
@pytest.mark.parametrize("norm,layout", norm_layouts())
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_matches_finite_differences(backend, norm, layout, affine):
    """Along random directions v: (L(x + h v) - L(x - h v)) / 2h == <dL/dx, v> for
    L = <u, f(x)> and a random cotangent u; likewise for weight and bias."""
    case = case_for(norm, backend, layout, rank=4, affine=affine)
    spec = case.spec
    x, p = case.inputs()
    rng = case.rng("fd")
    u = rng.standard_normal(x.shape)
    h = 1e-5
    with fn.use_backend(backend):
        _, saved = spec.train(x, p, case)
        grads = spec.backward(u, x, saved, p, case)
        for name in ("input", "weight", "bias"):
            base = x if name == "input" else p[name]
            if base is None:
                continue
            for _ in range(3):
                v = rng.standard_normal(base.shape)

                def at(t, name=name, base=base, v=v):
                    if name == "input":
                        return _loss(spec, case, base + t * v, p, u)
                    return _loss(spec, case, x, {**p, name: base + t * v}, u)
                numeric = (at(h) - at(-h)) / (2 * h)
                analytic = float(np.vdot(grads[name], v))
                assert numeric == pytest.approx(analytic, rel=1e-6, abs=1e-7), name


# --------------------------------------------------------------------- accuracy ----
ACCURACY_SHAPES = [
    ("batch_norm", "NCHW", (8, 6, 7, 9)),
    ("batch_norm", "NHWC", (8, 7, 9, 6)),
    ("batch_norm", "NCHW", (2, 1, 70000)),     # one channel split into parts
    ("batch_norm", "NHWC", (64, 8, 8, 32)),    # column path with row blocks
    ("layer_norm", "last1", (16, 300)),
    ("layer_norm", "last2", (4, 20, 30)),
    ("layer_norm", "last1", (1, 1 << 17)),     # one long row split into parts
    ("group_norm", "NCHW", (4, 8, 9, 9)),
    ("group_norm", "NHWC", (4, 9, 9, 8)),
    ("instance_norm", "NCHW", (3, 5, 11, 13)),
    ("instance_norm", "NHWC", (3, 11, 13, 5)),
    ("instance_norm", "NHWC", (2, 64, 64, 16)),
    ("rms_norm", "last1", (16, 300)),
    ("rms_norm", "last2", (4, 20, 30)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm,layout,shape", ACCURACY_SHAPES,
                         ids=[f"{n}-{lay}-{'x'.join(map(str, s))}"
                              for n, lay, s in ACCURACY_SHAPES])
def test_float32_offset_data_accuracy(backend, norm, layout, shape):
    """float32 input whose mean is 1e4 times its std normalizes (and differentiates) to
    within 1e-3 of a float64 computation on the same values: statistics must not cancel."""
    case = case_for(norm, backend, layout, dtype=np.float32, affine="full", shape=shape,
                    groups=2 if norm == "group_norm" else None)
    spec = case.spec
    rng = case.rng("offset")
    std = 0.25
    x = (std * (1e4 + rng.standard_normal(shape))).astype(np.float32)
    _, p = case.inputs()
    dy = rng.standard_normal(shape).astype(np.float32)
    with fn.use_backend(backend):
        y, saved = spec.train(x, p, case)
        g = spec.backward(dy, x, saved, p, case)
    x64 = x.astype(np.float64)
    p64 = {k: (None if v is None else v.astype(np.float64)) for k, v in p.items()}
    c64 = case.with_(dtype=np.float64)
    with fn.use_backend("numpy"):
        y64, saved64 = spec.train(x64, p64, c64)
        g64 = spec.backward(dy.astype(np.float64), x64, saved64, p64, c64)
    assert rel_error(y, y64) < 1e-3
    assert rel_error(g["input"], g64["input"]) < 1e-3
    assert rel_error(g["weight"], g64["weight"]) < 1e-3


# ---------------------------------------------------------------------- NaN/Inf ----
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("norm,layout", norm_layouts())
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_inf_propagate_like_torch(backend, norm, layout):
    """NaN, +Inf and -Inf in a few places of the input: the output has NaN/Inf exactly
    where PyTorch has them, the other values match, and so do the gradients."""
    torch = pytest.importorskip("torch")
    from norm_specs import torch_run
    case = case_for(norm, backend, layout, rank=4, affine="full",
                    shape=(4, 6, 5, 3) if layout == "NCHW" else
                    (4, 5, 3, 6) if layout == "NHWC" else (4, 6, 5, 3))
    spec = case.spec
    x, p = case.inputs()
    flat = x.reshape(-1)
    flat[[0, 17, 100, 101, 250]] = [np.nan, np.inf, -np.inf, np.inf, np.nan]
    dy = case.rng("dy").standard_normal(x.shape)
    with fn.use_backend(backend):
        y = spec.forward(x, p, case, training=True)
        _, saved = spec.train(x, p, case)
        grads = spec.backward(dy, x, saved, p, case)
    y_torch, grads_torch, _ = torch_run(case, x, p, training=True, dy=dy)
    assert np.isnan(y).any()
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y_torch))
    np.testing.assert_array_equal(np.isposinf(y), np.isposinf(y_torch))
    np.testing.assert_array_equal(np.isneginf(y), np.isneginf(y_torch))
    assert_close(y, y_torch, 1e-9)
    for name in ("input", "weight", "bias"):
        if grads_torch[name] is None:
            continue
        np.testing.assert_array_equal(np.isfinite(grads[name]),
                                      np.isfinite(grads_torch[name]), err_msg=name)
    del torch


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_eval_stays_local(backend, layout):
    """In eval a NaN only affects its own output value."""
    case = case_for("batch_norm", backend, layout, running=True)
    x, p = case.inputs()
    x.reshape(-1)[7] = np.nan
    with fn.use_backend(backend):
        y = F.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"],
                         layout=layout)
    assert np.isnan(y).sum() == 1 and np.isnan(y.reshape(-1)[7])


# ---------------------------------------------------------------------- threads ----
class _Recorder:
    """Wraps a kernel module and records which kernels the driver calls."""

    def __init__(self, module):
        self._module = module
        self.called = set()

    def __getattr__(self, name):
        self.called.add(name)
        return getattr(self._module, name)


THREAD_SHAPES = [
    # (norm, layout, shape, groups, kernels the driver must call for it)
    ("batch_norm", "NCHW", (2, 1, 70000), None, {"seg_sums", "seg_grad_sums"}),
    # large NCHW: columns of runs (RUN_COLUMNS_MIN_ELEMENTS), fewer channels than threads
    ("batch_norm", "NCHW", (3, 4, 40000), None, {"col_sums", "col_grad_sums"}),
    ("batch_norm", "NCHW", (16, 32, 16, 16), None, {"seg_forward", "seg_backward"}),
    ("batch_norm", "NHWC", (64, 8, 8, 32), None, {"col_sums", "col_grad_sums"}),
    # blocks of rows over the cache chunks: summed four rows at a time (_simd.h)
    ("batch_norm", "NHWC", (32, 32, 32, 40), None, {"col_sums", "col_grad_sums"}),
    ("layer_norm", "last1", (1, 1 << 18), None, {"seg_sums", "seg_grad_sums"}),
    ("layer_norm", "last1", (192, 768), None, {"seg_forward", "rows_backward"}),
    # rows long enough for their parameter gradients to go in blocks of columns
    ("layer_norm", "last1", (4, 1 << 15), None, {"seg_forward", "seg_backward",
                                                  "row_param_grads"}),
    ("rms_norm", "last1", (2, 1 << 17), None, {"seg_sums", "seg_grad_sums"}),
    ("group_norm", "NCHW", (1, 4, 1 << 15), 2, {"seg_sums", "seg_grad_sums"}),
    ("group_norm", "NHWC", (4, 48, 48, 16), 4, {"col_sums", "col_grad_sums"}),
    ("instance_norm", "NHWC", (2, 64, 64, 16), None, {"col_sums", "col_grad_sums"}),
    ("instance_norm", "NCHW", (1, 2, 256, 256), None, {"seg_sums", "seg_grad_sums"}),
]


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("norm,layout,shape,groups,kernels", THREAD_SHAPES,
                         ids=[f"{n}-{lay}-{'x'.join(map(str, s))}"
                              for n, lay, s, _, _ in THREAD_SHAPES])
def test_results_independent_of_thread_count(backend, norm, layout, shape, groups, kernels,
                                             restore_threads, monkeypatch):
    case = case_for(norm, backend, layout, dtype=np.float32, affine="full", shape=shape,
                    groups=groups)
    spec = case.spec
    x, p = case.inputs()
    dy = case.rng("dy").standard_normal(shape).astype(np.float32)
    backend_obj = get_kernels(backend)
    recorder = _Recorder(backend_obj.k)
    monkeypatch.setattr(backend_obj, "k", recorder)
    monkeypatch.setattr(fn._config, "FUSED_PASSES", False)  # see test_fused_passes_*
    results = []
    for n in (1, 2, 3):
        fn.set_num_threads(n)
        with fn.use_backend(backend):
            y, saved = spec.train(x, p, case)
            g = spec.backward(dy, x, saved, p, case)
        results.append((y, g))
    assert kernels <= recorder.called, f"shape does not take the intended path: {recorder.called}"
    y1, g1 = results[0]
    for y, g in results[1:]:
        assert_close(y, y1, 1e-6)
        for name in ("input", "weight", "bias"):
            assert_close(g[name], g1[name], 1e-6, name)
    # these paths are not reached by the small shapes of the grid: check them here
    with fn.use_backend("numpy"):
        y_ref, saved_ref = spec.train(x, p, case)
        g_ref = spec.backward(dy, x, saved_ref, p, case)
    assert_close(y1, y_ref, REF_RTOL[np.float32], "y vs reference")
    for name in ("input", "weight", "bias"):
        assert_close(g1[name], g_ref[name], REF_RTOL[np.float32], f"d{name} vs reference")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_batchnorm_argument_paths_agree(layout):
    """BatchNorm recognises arguments the kernels take as they are with a few attribute
    reads (norms._bn_args); others (a strided input, float64 parameters for float32 input,
    a layout alias) are validated and converted.  Both give the same results."""
    rng = np.random.default_rng(3)
    shape = (4, 6, 5, 3) if layout == "NCHW" else (4, 5, 3, 6)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.uniform(0.5, 1.5, 6).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    alias = "channels_first" if layout == "NCHW" else "channels_last"
    xs = np.asfortranarray(x)  # same values, not C-contiguous
    runs = []
    for xa, wa, ba, lay in ((x, w, b, layout),
                            (xs, w.astype(np.float64), b.astype(np.float64), alias)):
        y, mean, invstd = F.batch_norm_train(xa, wa, ba, layout=lay)
        dx, dw, db = F.batch_norm_backward(dy, xa, mean, invstd, wa, layout=lay)
        ye = F.batch_norm_eval(xa, mean, invstd, wa, ba, layout=lay)
        runs.append((y, mean, invstd, dx, dw, db, ye))
    for a, c in zip(*runs):
        np.testing.assert_array_equal(a, c)


# Shapes around the driver's thresholds (fastnorm._config): segments, columns (NHWC),
# columns of runs (NCHW from 256K values), segments split into parts (few channels of
# 64K+ values: the one-call entries decline, the driver's general path runs), 2-D.
FRONT_SHAPES = [((4, 6, 5, 3), "NCHW"), ((4, 5, 3, 6), "NHWC"), ((32, 16, 8, 8), "NCHW"),
                ((8, 8, 64, 64), "NCHW"), ((2, 3, 200, 200), "NCHW"), ((2, 5), "NCHW"),
                ((300, 7), "NHWC"), ((2, 70000, 3), "NHWC")]


def _cython_backend():
    if "cython" not in fn.backends():
        pytest.skip("the Cython extension is not built")
    return get_kernels("cython")


@pytest.mark.parametrize("shape,layout", FRONT_SHAPES)
def test_batchnorm_front_view_is_the_drivers(shape, layout):
    """The one-call BatchNorm entries (bn_train/bn_eval/bn_backward) pick the view, row
    blocks and thread count as the driver does, and decline where its one-call passes
    do not serve (segments split into parts)."""
    from fastnorm import _config, norms
    k = _cython_backend()
    x = np.zeros(shape, np.float32)
    C, dims = norms.channel_view(x, layout)
    for nthreads in (1, 2, 3):
        got = k.k.bn_view(x, layout, nthreads)
        served = k._is_columns(dims) or k._nparts(dims) == 1
        if not served:
            assert got is None
            continue
        threads = 1 if x.size < _config.PARALLEL_MIN_ELEMENTS else nthreads
        assert got == (dims[1], C, dims[4], k._nch(dims), threads)
    assert k.k.bn_view(x, layout.lower(), 1) is None  # spelled otherwise: declined
    strided = np.zeros(shape[:-1] + (2 * shape[-1],), np.float32)[..., ::2]
    assert k.k.bn_view(strided, layout, 1) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,layout", FRONT_SHAPES)
def test_batchnorm_front_matches_validated_path(shape, layout, dtype):
    """BatchNorm through the one-call entries gives the bits of the validated path (the
    layout spelled as an alias, which the entries decline): train with running buffers
    (float32 and float64), eval from them, backward with and without parameter
    gradients, fresh outputs and ``out=``."""
    _cython_backend()
    rng = np.random.default_rng(5)
    C = shape[1] if layout == "NCHW" else shape[-1]
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    alias = "channels_first" if layout == "NCHW" else "channels_last"
    runs = []
    with fn.use_backend("cython"):
        for lay in (layout, alias):
            rm = np.zeros(C, np.float32)
            rv = np.ones(C, np.float64)
            y, mean, invstd = F.batch_norm_train(x, w, b, layout=lay, running_mean=rm,
                                                 running_var=rv, momentum=0.25)
            out = np.empty_like(x)
            y2 = F.batch_norm(x, rm, rv, w, None, training=True, layout=lay, out=out)
            assert y2 is out
            ye = F.batch_norm(x, rm, rv, w, b, training=False, layout=lay)
            dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w, layout=lay)
            dx2, dw2, db2 = F.batch_norm_backward(dy, x, mean, invstd, None, layout=lay,
                                                  out=np.empty_like(x), param_grads=True)
            dx3, dw3, _ = F.batch_norm_backward(dy, x, mean, invstd, w, layout=lay,
                                                param_grads=False)
            assert dw3 is None
            runs.append((y, mean, invstd, rm, rv, y2, ye, dx, dw, db, dx2, dw2, db2, dx3))
    for a, c in zip(*runs):
        assert a.dtype == c.dtype and a.shape == c.shape
        np.testing.assert_array_equal(a, c)


def _assert_declines(entry, base, bad, tail, kept=()):
    """``entry(*args, *tail)`` returns None for ``base`` changed by each dict of ``bad``
    (arguments in base's order), and the arrays in ``kept`` stay as they were."""
    for change in bad:
        args = dict(base)
        args.update(change)
        before = [a.copy() for a in kept]
        assert entry(*args.values(), *tail) is None, change
        for a, b in zip(kept, before):
            np.testing.assert_array_equal(a, b)


def test_batchnorm_front_declines_what_it_does_not_take():
    """Arguments the one-call entries do not take as they are give None (the validated
    path then converts or raises), and nothing is written."""
    k = _cython_backend()
    x = np.ones((4, 3, 2, 2), np.float32)
    w = np.ones(3, np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    ro = rm.copy()
    ro.flags.writeable = False
    bad = [dict(x=x.astype(np.float16)), dict(x=x[:, :, :, :1]), dict(layout="nchw"),
           dict(weight=w.astype(np.float64)), dict(weight=np.ones(4, np.float32)),
           dict(eps=0.0), dict(eps=1), dict(momentum=2.0), dict(running_mean=ro),
           dict(running_var=np.ones(4, np.float32)), dict(out=np.empty((4, 3, 2, 2))),
           dict(out=np.empty((4, 3, 2, 1), np.float32)), dict(x=np.ones((1, 3), np.float32))]
    _assert_declines(k.bn_train, dict(x=x, weight=w, bias=None, eps=1e-5, layout="NCHW",
                                      out=None, running_mean=rm, running_var=rv,
                                      momentum=0.1), bad, (2,), kept=(rm, rv))
    assert k.bn_eval(x, None, rv, w, None, 1e-5, "NCHW", None, 1) is None
    assert k.bn_backward(x.astype(np.float64), x, rm, rv, w, "NCHW", None, None, 1) is None
    assert k.bn_backward(x, x, rm, rv, w, "NCHW", None, 1, 1) is None  # param_grads not bool


def _assert_front_is_the_driver(run, k, entries, monkeypatch):
    """``run()`` (a list of results) gives the same bits, dtypes and shapes with the
    one-call ``entries`` of backend ``k`` and without them (the driver's path), on 1 and
    2 threads."""
    with fn.use_backend("cython"):
        for threads in (1, 2):
            fn.set_num_threads(threads)
            try:
                front = run()
                with monkeypatch.context() as m:
                    for name in entries:
                        m.setattr(k, name, None)
                    driver = run()
            finally:
                fn.set_num_threads(2)
            for a, c in zip(front, driver, strict=True):
                assert (a is None) == (c is None)
                if a is not None:
                    assert a.dtype == c.dtype and a.shape == c.shape
                    np.testing.assert_array_equal(a, c)


def _front_data(seed, shape, pshape, dtype):
    """x, dy of ``shape`` and a weight and bias of ``pshape`` for the one-call entry tests."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return (x, dy, rng.uniform(0.5, 1.5, pshape).astype(dtype),
            rng.standard_normal(pshape).astype(dtype))


# LayerNorm/RMSNorm rows around the thresholds: short rows, a 1-D input, two normalized
# dimensions, rows on two threads, few long rows split into parts (train declined), rows
# whose parameter gradients go by blocks of columns (backward declined).
ROW_FRONT_SHAPES = [((32, 16), 16), ((4, 3, 768), 768), ((300,), 300), ((2, 4, 5), (4, 5)),
                    ((3, 40, 1024), (1024,)), ((8, 70000), 70000), ((4, 70000), 70000),
                    ((2, 40000), 40000)]


@pytest.mark.parametrize("shape,ns", ROW_FRONT_SHAPES)
def test_row_front_serves_what_the_driver_fuses(shape, ns):
    """The one-call LayerNorm/RMSNorm entries (row_train/row_backward) take the rows the
    driver's one-call passes serve, and decline the others."""
    from fastnorm import norms
    k = _cython_backend()
    x = np.ones(shape, np.float32)
    nd = 1 if isinstance(ns, int) else len(ns)
    dims = norms.row_view(x, shape[len(shape) - nd:])
    R = dims[0]
    mean = invstd = np.ones(R, np.float32)
    for nthreads in (1, 2):
        fwd = k.k.row_train(x, ns, None, None, 1e-5, True, nthreads)
        assert (fwd is not None) == (k._nparts(dims) == 1)
        bwd = k.k.row_backward(x, x, mean, invstd, ns, None, None, nthreads)
        assert (bwd is not None) == (k._backward_split(dims) is not None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,ns", ROW_FRONT_SHAPES)
def test_row_front_matches_validated_path(shape, ns, dtype, monkeypatch):
    """LayerNorm and RMSNorm through the one-call entries give the bits, dtypes and
    shapes of the driver's path: with and without parameters, parameter gradients or
    not, on 1 and 2 threads."""
    k = _cython_backend()
    x, dy, w, b = _front_data(6, shape, (ns,) if isinstance(ns, int) else ns, dtype)

    def run():
        out = []
        for wa, ba in ((w, b), (None, None), (w, None)):
            y, mean, invstd = F.layer_norm_train(x, ns, wa, ba)
            out += [y, mean, invstd, *F.layer_norm_backward(dy, x, mean, invstd, ns, wa),
                    *F.layer_norm_backward(dy, x, mean, invstd, ns, wa, param_grads=True)]
            y, invrms = F.rms_norm_train(x, ns, wa)
            out += [y, invrms, *F.rms_norm_backward(dy, x, invrms, ns, wa)]
        return out

    _assert_front_is_the_driver(run, k, ("row_train", "row_backward"), monkeypatch)


def test_row_front_declines_what_it_does_not_take():
    """Arguments the one-call row entries do not take as they are give None (the
    validated path then converts or raises)."""
    k = _cython_backend()
    x = np.ones((4, 3, 8), np.float32)
    w = np.ones(8, np.float32)
    bad = [dict(x=x.astype(np.float16)), dict(x=x[:, :, ::2]), dict(x=x.tolist()),
           dict(ns=[8]), dict(ns=(np.int64(8),)), dict(ns=7), dict(ns=(3, 7)),
           dict(ns=(2, 4, 3, 8)), dict(ns=()), dict(ns=2 ** 70), dict(ns=True),
           dict(weight=w.astype(np.float64)), dict(weight=np.ones(7, np.float32)),
           dict(weight=np.ones((1, 8), np.float32)), dict(bias=w[::-1]), dict(eps=0.0),
           dict(eps=1), dict(eps=float("nan")), dict(x=np.ones((4, 0), np.float32), ns=0)]
    _assert_declines(k.row_train, dict(x=x, ns=8, weight=w, bias=None, eps=1e-5), bad,
                     (True, 2))
    stat = np.ones(12, np.float32)
    assert k.row_backward(x.astype(np.float64), x, stat, stat, 8, w, None, 1) is None
    assert k.row_backward(x, x, stat[:11], stat, 8, w, None, 1) is None
    assert k.row_backward(x, x, stat, stat, 8, w, 1, 1) is None  # param_grads not bool
    assert k.row_backward(x[:2], x, stat, stat, 8, w, None, 1) is None
    # and through the functions: the usual errors
    with pytest.raises(ValueError, match="normalized_shape"):
        F.layer_norm(x, (7,))
    with pytest.raises(TypeError, match="normalized_shape"):
        F.rms_norm(x, 8.0)


# GroupNorm (int groups) and InstanceNorm (None) around the thresholds: segments (NCHW),
# columns (NHWC), two threads, few large groups split into parts (declined), and (N, C)
# in one group (the driver's row norm: declined).
GROUP_FRONT_SHAPES = [((2, 6, 5, 3), 3, "NCHW"), ((32, 16, 8, 8), 4, "NCHW"),
                      ((4, 5, 3, 6), 2, "NHWC"), ((8, 16, 16, 32), 8, "NHWC"),
                      ((2, 3, 200, 200), None, "NCHW"), ((1, 2, 300, 300), None, "NCHW"),
                      ((2, 40, 40, 3), None, "NHWC"), ((5, 7, 9), None, "NCHW"),
                      ((3, 8), 1, "NCHW"), ((3, 8), 2, "NHWC")]


@pytest.mark.parametrize("shape,G,layout", GROUP_FRONT_SHAPES)
def test_group_front_view_is_the_drivers(shape, G, layout):
    """The one-call GroupNorm/InstanceNorm entries (group_train/group_backward) pick the
    view, row blocks and thread count as the driver does, and decline where its one-call
    passes do not serve."""
    from fastnorm import _config, norms
    k = _cython_backend()
    x = np.zeros(shape, np.float32)
    C = norms.channels(x, layout)
    dims = norms.group_view(x, layout, C if G is None else G)[1]
    for nthreads in (1, 2, 3):
        got = k.k.group_view(x, G, layout, nthreads)
        served = (k._is_columns(dims) or k._nparts(dims) == 1) and not k._is_row_norm(dims)
        if not served:
            assert got is None
            continue
        threads = 1 if x.size < _config.PARALLEL_MIN_ELEMENTS else nthreads
        assert got == (*dims, k._nch(dims), threads)
        assert k._backward_split(dims) == (k._nch(dims), 1, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,G,layout", GROUP_FRONT_SHAPES)
def test_group_front_matches_validated_path(shape, G, layout, dtype, monkeypatch):
    """GroupNorm and InstanceNorm through the one-call entries give the bits, dtypes and
    shapes of the driver's path: with and without parameters, InstanceNorm with running
    buffers, parameter gradients or not, on 1 and 2 threads."""
    k = _cython_backend()
    C = shape[1] if layout == "NCHW" else shape[-1]
    x, dy, w, b = _front_data(7, shape, C, dtype)

    def run():
        out = []
        for wa, ba in ((w, b), (None, None), (w, None)):
            if G is None:
                rm, rv = np.zeros(C, np.float32), np.ones(C, np.float64)
                y, mean, invstd = F.instance_norm_train(x, wa, ba, layout=layout,
                                                        running_mean=rm, running_var=rv,
                                                        momentum=0.25)
                out += [y, mean, invstd, rm, rv,
                        *F.instance_norm_backward(dy, x, mean, invstd, wa, layout=layout),
                        *F.instance_norm_backward(dy, x, mean, invstd, wa, layout=layout,
                                                  param_grads=True)]
            else:
                y, mean, invstd = F.group_norm_train(x, G, wa, ba, layout=layout)
                out += [y, mean, invstd,
                        *F.group_norm_backward(dy, x, mean, invstd, G, wa, layout=layout),
                        *F.group_norm_backward(dy, x, mean, invstd, G, wa, layout=layout,
                                               param_grads=True)]
        return out

    _assert_front_is_the_driver(run, k, ("group_train", "group_backward"), monkeypatch)


def test_group_front_declines_what_it_does_not_take():
    """Arguments the one-call group entries do not take as they are give None (the
    validated path then converts or raises), and nothing is written."""
    k = _cython_backend()
    x = np.ones((4, 6, 2, 2), np.float32)
    w = np.ones(6, np.float32)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    ro = rm.copy()
    ro.flags.writeable = False
    bad = [dict(x=x.astype(np.float16)), dict(x=x[:, :, :, :1]), dict(layout="nchw"),
           dict(G=4), dict(G=0), dict(G=7), dict(G=True), dict(G=2.0), dict(G=np.int64(2)),
           dict(weight=w.astype(np.float64)), dict(weight=np.ones(4, np.float32)),
           dict(eps=0.0), dict(eps=1), dict(G=None, running_mean=rm, momentum=2.0),
           dict(G=None, running_mean=ro), dict(G=None, running_var=np.ones(4, np.float32)),
           dict(running_mean=rm),  # running buffers are InstanceNorm's only
           dict(G=None, x=np.ones((4, 6, 1, 1), np.float32)),  # one value per channel
           dict(G=None, x=np.ones((4, 6), np.float32)), dict(x=np.ones((4, 0, 2), np.float32))]
    _assert_declines(k.group_train, dict(x=x, G=2, weight=w, bias=None, eps=1e-5,
                                         layout="NCHW", running_mean=None, running_var=None,
                                         momentum=0.1), bad, (2,), kept=(rm, rv))
    stat = np.ones(8, np.float32)
    assert k.group_backward(x.astype(np.float64), x, stat, stat, 2, w, "NCHW", None, 1) is None
    assert k.group_backward(x, x, stat[:7], stat, 2, w, "NCHW", None, 1) is None
    assert k.group_backward(x, x, stat, stat, 2, w, "NCHW", 1, 1) is None
    # and through the functions: the usual errors
    with pytest.raises(ValueError, match="num_groups"):
        F.group_norm(x, 4)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        F.instance_norm(np.ones((4, 6, 1, 1), np.float32))


@pytest.mark.parametrize("backend", COMPILED)
def test_concurrent_calls_from_python_threads(backend):
    """Several Python threads calling the kernels at once (Numba's kernels release the
    GIL) get the results of sequential calls."""
    rng = np.random.default_rng(0)
    jobs = [((2, 1, 70000), "NCHW"), ((64, 8, 8, 32), "NHWC"), ((16, 6, 9, 9), "NCHW"),
            ((8, 9, 9, 6), "NHWC")] * 2
    xs = [rng.standard_normal(s).astype(np.float32) + i for i, (s, _) in enumerate(jobs)]
    with fn.use_backend(backend):
        expected = [F.batch_norm_train(x, layout=lay)[0] for x, (_, lay) in zip(xs, jobs)]
    results = [None] * len(jobs)
    errors = []

    def work(i):
        try:
            with fn.use_backend(backend):
                for _ in range(10):
                    results[i] = F.batch_norm_train(xs[i], layout=jobs[i][1])[0]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r, e in zip(results, expected):
        np.testing.assert_array_equal(r, e)


# ---------------------------------------------------------------- non-contiguous ----
def _views(x):
    """The same values as x in non-contiguous arrays: a transposed copy transposed back,
    a strided slice of a larger array, a reversed view of a reversed copy."""
    t = np.ascontiguousarray(np.swapaxes(x, 0, -1)).swapaxes(0, -1)
    big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
    big[..., ::2] = x
    s = big[..., ::2]
    r = np.ascontiguousarray(x[::-1])[::-1]
    return {"transposed": t, "sliced": s, "reversed": r}


@pytest.mark.parametrize("norm,layout", norm_layouts())
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend, norm, layout):
    case = case_for(norm, backend, layout, rank=4, affine="full", running=SPECS[norm].has_running)
    spec = case.spec
    x, p = case.inputs()
    dy = case.rng("dy").standard_normal(x.shape)
    with fn.use_backend(backend):
        y, saved = spec.train(x, p, case)
        g = spec.backward(dy, x, saved, p, case)
        p_strided = {k: (None if v is None else _views(v)["sliced"]) for k, v in p.items()}
        for kind, xv in _views(x).items():
            assert not xv.flags.c_contiguous
            yv, savedv = spec.train(xv, p_strided, case)
            gv = spec.backward(_views(dy)[kind], xv, savedv, p_strided, case)
            np.testing.assert_array_equal(yv, y, err_msg=kind)
            for name in ("input", "weight", "bias"):
                np.testing.assert_array_equal(gv[name], g[name], err_msg=f"{kind} d{name}")
        if spec.has_running:  # buffers that are strided views are updated in place
            p_contig = {k: (None if v is None else v.copy()) for k, v in p.items()}
            ya = spec.forward(x, p_contig, case, training=True, momentum=0.3)
            yb = spec.forward(_views(x)["sliced"], p_strided, case, training=True,
                              momentum=0.3)
            np.testing.assert_array_equal(ya, yb)
            for k in ("running_mean", "running_var"):
                np.testing.assert_array_equal(p_strided[k], p_contig[k], err_msg=k)


@pytest.mark.parametrize("norm,layout", norm_layouts())
@pytest.mark.parametrize("backend", BACKENDS)
def test_read_only_inputs(backend, norm, layout):
    """Read-only arrays (np.load(mmap_mode='r'), broadcast views...) are accepted wherever
    nothing is written: x, dy, parameters, saved statistics."""
    case = case_for(norm, backend, layout, rank=4, dtype=np.float32, affine="full")
    spec = case.spec
    x, p = case.inputs()
    dy = case.rng("dy").standard_normal(x.shape).astype(np.float32)
    with fn.use_backend(backend):
        y, saved = spec.train(x, p, case)
        g = spec.backward(dy, x, saved, p, case)

    def ro(a):
        if a is None:
            return None
        a = a.copy()
        a.flags.writeable = False
        return a
    p_ro = {k: ro(v) for k, v in p.items()}
    with fn.use_backend(backend):
        y2, saved2 = spec.train(ro(x), p_ro, case)
        g2 = spec.backward(ro(dy), ro(x), tuple(ro(s) for s in saved2), p_ro, case)
    np.testing.assert_array_equal(y2, y)
    for name in ("input", "weight", "bias"):
        np.testing.assert_array_equal(g2[name], g[name], err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_flush_to_zero_after_use(backend):
    """Using a backend does not switch the process to flush-to-zero (what a library built
    with -ffast-math does at load): NumPy still produces subnormals."""
    with fn.use_backend(backend):
        F.batch_norm_train(np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32))
    tiny64 = np.array([np.finfo(np.float64).tiny])
    tiny32 = np.array([np.finfo(np.float32).tiny], np.float32)
    assert (tiny64 / 4)[0] > 0
    assert (tiny32 / np.float32(4))[0] > 0


# -------------------------------------------------------------------------- out= ----
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_is_written_and_returned(backend, dtype, layout):
    case = case_for("batch_norm", backend, layout, dtype=dtype, running=True)
    x, p = case.inputs()
    w, b, rm, rv = p["weight"], p["bias"], p["running_mean"], p["running_var"]
    dy = case.rng("dy").standard_normal(x.shape).astype(dtype)
    invstd = (1 / np.sqrt(rv.astype(np.float64) + 1e-5)).astype(dtype)
    with fn.use_backend(backend):
        calls = {
            "batch_norm train": lambda out: F.batch_norm(x, rm.copy(), rv.copy(), w, b,
                                                         training=True, layout=layout, out=out),
            "batch_norm eval": lambda out: F.batch_norm(x, rm, rv, w, b, layout=layout, out=out),
            "batch_norm_train": lambda out: F.batch_norm_train(x, w, b, layout=layout,
                                                               out=out)[0],
            "batch_norm_eval": lambda out: F.batch_norm_eval(x, rm, invstd, w, b,
                                                             layout=layout, out=out),
            "batch_norm_backward": lambda out: F.batch_norm_backward(
                dy, x, *F.batch_norm_train(x, w, b, layout=layout)[1:], w, layout=layout,
                out=out)[0],
        }
        for name, call in calls.items():
            expected = call(None)
            out = np.full(x.shape, np.nan, dtype)
            for _ in range(2):  # reusing the buffer
                result = call(out)
                assert result is out, name
                np.testing.assert_array_equal(out, expected, err_msg=name)


# ----------------------------------------------------------- backend selection ----
@pytest.fixture
def restore_backend():
    from fastnorm import _backend
    saved = _backend._current
    yield
    _backend._current = saved


def test_backends_lists_numpy_and_numba():
    names = fn.backends()
    assert "numpy" in names and "numba" in names
    assert set(names) <= {"cython", "numba", "numpy"}


@pytest.mark.parametrize("name", BACKENDS)
def test_set_backend(name, restore_backend):
    fn.set_backend(name)
    assert fn.get_backend() == name
    x = np.random.default_rng(0).standard_normal((4, 3, 5))
    assert_close(F.batch_norm_train(x)[0], (x - x.mean((0, 2), keepdims=True))
                 / np.sqrt(x.var((0, 2), keepdims=True) + 1e-5), 1e-10)


def test_backend_names_are_case_insensitive_with_alias(restore_backend):
    fn.set_backend("NumPy")
    assert fn.get_backend() == "numpy"
    fn.set_backend("numba")
    fn.set_backend("reference")
    assert fn.get_backend() == "numpy"


@pytest.mark.parametrize("bad", ["bogus", "torch", ""] + (["cython"] if "cython" not in BACKENDS else []))
def test_unknown_backend_is_a_value_error_naming_the_available(bad, restore_backend):
    before = fn.get_backend()
    for call in (fn.set_backend, lambda n: fn.use_backend(n).__enter__()):
        with pytest.raises(ValueError) as info:
            call(bad)
        message = str(info.value)
        assert repr(bad) in message
        for name in fn.backends():
            assert name in message
    assert fn.get_backend() == before


def test_backend_name_must_be_a_string(restore_backend):
    with pytest.raises(TypeError, match="backend"):
        fn.set_backend(3)


def test_use_backend_is_scoped_and_restored():
    outer = fn.get_backend()
    with fn.use_backend("numpy") as name:
        assert name == "numpy" and fn.get_backend() == "numpy"
        with fn.use_backend("numba"):
            assert fn.get_backend() == "numba"
        assert fn.get_backend() == "numpy"
    assert fn.get_backend() == outer
    with pytest.raises(RuntimeError):
        with fn.use_backend("numpy"):
            raise RuntimeError("boom")
    assert fn.get_backend() == outer


def test_use_backend_is_per_thread():
    outer = fn.get_backend()
    other = "numpy" if outer != "numpy" else "numba"
    seen = []
    inside = threading.Event()
    done = threading.Event()

    def worker():
        inside.wait()
        seen.append(fn.get_backend())
        done.set()
    t = threading.Thread(target=worker)
    t.start()
    with fn.use_backend(other):
        inside.set()
        done.wait(10)
    t.join()
    assert seen == [outer]


def test_set_num_threads(restore_threads):
    fn.set_num_threads(1)
    assert fn.get_num_threads() == 1
    fn.set_num_threads(np.int64(2))
    assert fn.get_num_threads() == 2
    for bad, exc in ((0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError),
                     ("2", TypeError)):
        with pytest.raises(exc, match="n"):
            fn.set_num_threads(bad)
    assert fn.get_num_threads() == 2


def _run(code, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("FASTNORM_")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True,
                          text=True, timeout=120, cwd=os.path.dirname(__file__))


def test_env_backend_and_threads_in_subprocess():
    code = ("import fastnorm as fn, fastnorm.functional as F, numpy as np\n"
            "F.batch_norm_train(np.ones((3, 2)) * np.arange(3)[:, None])\n"
            "print(fn.get_backend(), fn.get_num_threads())")
    r = _run(code, FASTNORM_BACKEND="numpy", FASTNORM_NUM_THREADS="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["numpy", "1"]
    r = _run(code, FASTNORM_BACKEND=" Numba ", FASTNORM_NUM_THREADS="3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["numba", "3"]
    r = _run(code)
    assert r.returncode == 0, r.stderr
    default = "cython" if "cython" in BACKENDS else "numba"
    assert r.stdout.split()[0] == default


@pytest.mark.parametrize("env,needle", [
    ({"FASTNORM_BACKEND": "bogus"}, "FASTNORM_BACKEND"),
    ({"FASTNORM_NUM_THREADS": "zero"}, "FASTNORM_NUM_THREADS"),
    ({"FASTNORM_NUM_THREADS": "0"}, "FASTNORM_NUM_THREADS"),
])
def test_bad_env_is_a_value_error(env, needle):
    code = ("import fastnorm as fn\n"
            "try:\n"
            "    fn.get_backend(); fn.get_num_threads()\n"
            "except ValueError as e:\n"
            "    print('ValueError:', e)\n")
    r = _run(code, **env)
    # the error may come at import (threads) or at first use (backend): either is a
    # ValueError naming the variable
    text = r.stdout + r.stderr
    assert "ValueError" in text and needle in text, text
    if "FASTNORM_BACKEND" in env:
        for name in ("numba", "numpy"):
            assert name in text


# ------------------------------------------------------------- property tests ----
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@st.composite
def norm_problems(draw, norm):
    spec = SPECS[norm]
    layout = draw(st.sampled_from(spec.layouts))
    rank = draw(st.sampled_from(spec.ranks))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    affine = draw(st.sampled_from(spec.affines))
    dims = [draw(st.integers(1, 5)) for _ in range(rank)]
    groups = None
    if norm == "group_norm":
        groups = draw(st.integers(1, 4))
        dims[1 if layout == "NCHW" else -1] = groups * draw(st.integers(1, 3))
    if norm == "batch_norm":  # more than one value per channel
        dims[0] = max(dims[0], 2)
    if norm == "instance_norm":  # more than one spatial value
        dims[2 if layout == "NCHW" else 1] += 1
    seed = draw(st.integers(0, 2 ** 16))
    return layout, tuple(dims), dtype, affine, groups, seed


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("norm", NORMS)
@settings(max_examples=30, deadline=None, derandomize=True)
@given(data=st.data())
def test_random_shapes_match_reference(backend, norm, data):
    layout, shape, dtype, affine, groups, seed = data.draw(norm_problems(norm))
    case = case_for(norm, backend, layout, dtype=dtype, affine=affine, shape=shape,
                    groups=groups)
    spec = case.spec
    x, p = case.inputs(seed)
    dy = rng_for(seed).standard_normal(shape).astype(dtype)
    results = {}
    for b in (backend, "numpy"):
        with fn.use_backend(b):
            y, saved = spec.train(x, p, case)
            results[b] = (y, saved, spec.backward(dy, x, saved, p, case))
    (y, saved, g), (y_ref, saved_ref, g_ref) = results[backend], results["numpy"]
    # Groups of a single value (var = 0) give y = x*a + b with a = 1/sqrt(eps): ~1e-14
    # instead of 0, so errors are measured against the unit scale of normalized values.
    rtol = REF_RTOL[dtype] * (10 if dtype == np.float64 else 1)
    assert_close(y, y_ref, rtol, "y", floor=1.0)
    for s, s_ref in zip(saved, saved_ref):
        assert_close(s, s_ref, rtol, "saved")
    for name in ("input", "weight", "bias"):
        assert_close(g[name], g_ref[name], rtol, name, floor=1.0)


# ---------------------------------------------------------------- fused passes ----
FUSED_CASES = [  # (norm, layout, shape, groups): every view shape of the fused passes
    ("batch_norm", "NCHW", (5, 6, 7, 3), None), ("batch_norm", "NHWC", (5, 7, 3, 6), None),
    ("batch_norm", "NCHW", (33, 20), None), ("batch_norm", "NHWC", (4, 9, 37), None),
    ("instance_norm", "NCHW", (3, 5, 6, 7), None), ("instance_norm", "NHWC", (3, 6, 7, 5), None),
    ("group_norm", "NCHW", (3, 6, 5, 7), 3), ("group_norm", "NHWC", (3, 5, 7, 12), 4),
    ("layer_norm", "last1", (7, 37), None), ("layer_norm", "last2", (3, 5, 4, 9), None),
    ("rms_norm", "last1", (7, 37), None), ("rms_norm", "last2", (3, 5, 4, 9), None),
    # parallel, several row blocks / row chunks
    ("batch_norm", "NHWC", (8, 40, 40, 24), None), ("instance_norm", "NHWC", (4, 64, 64, 8), None),
    ("layer_norm", "last1", (600, 333), None), ("group_norm", "NCHW", (8, 32, 24, 24), 8),
    ("batch_norm", "NCHW", (3, 4, 40000), None),  # columns of runs
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", ["none", "full"])
@pytest.mark.parametrize("norm,layout,shape,groups", FUSED_CASES,
                         ids=[f"{n}-{lay}-{'x'.join(map(str, s))}"
                              for n, lay, s, _ in FUSED_CASES])
def test_fused_passes_match_general_path(norm, layout, shape, groups, affine, dtype,
                                         monkeypatch, restore_threads):
    """The Cython backend runs whole training passes in one call (forward_fused,
    backward_fused); turned off, the same input takes the kernels between NumPy steps:
    both agree, running buffers included, on 1 and 2 threads."""
    if "cython" not in COMPILED:
        pytest.skip("the Cython backend is not built")
    case = case_for(norm, "cython", layout, dtype=dtype, affine=affine, shape=shape,
                    groups=groups, running=SPECS[norm].has_running)
    spec = case.spec
    x, p = case.inputs()
    x = x * 3 + 50  # a mean far from 0: the shifted sums matter
    dy = case.rng("dy").standard_normal(shape).astype(dtype)
    backend = get_kernels("cython")
    recorder = _Recorder(backend.k)
    monkeypatch.setattr(backend, "k", recorder)
    results = []
    for fused, threads in ((True, 1), (True, 2), (False, 2)):
        monkeypatch.setattr(fn._config, "FUSED_PASSES", fused)
        fn.set_num_threads(threads)
        params = {k: (None if v is None else v.copy()) for k, v in p.items()}
        with fn.use_backend("cython"):
            y, saved = spec.train(x, params, case)
            spec.forward(x, params, case, training=True)  # updates the running buffers
            g = spec.backward(dy, x, saved, params, case)
        results.append((y, saved, g, params))
    assert recorder.called & {"seg_forward", "seg_sums", "col_sums"}, recorder.called
    tol = 1e-12 if dtype == np.float64 else 2e-6
    (y1, s1, g1, p1), (y0, s0, g0, p0), (y2, s2, g2, p2) = results
    np.testing.assert_array_equal(y1, y0)  # the thread count changes nothing
    for name in ("input", "weight", "bias"):
        np.testing.assert_array_equal(g1[name], g0[name])
    assert_close(y1, y2, tol, "y")
    for a, b in zip(s1, s2):
        assert a.dtype == b.dtype == np.dtype(dtype)
        assert_close(a, b, tol, "saved statistics")
    for name in ("input", "weight", "bias"):
        assert_close(g1[name], g2[name], tol, name)
    for name in ("running_mean", "running_var"):
        assert_close(p1[name], p2[name], tol, name)


@pytest.mark.parametrize("fused", [True, False], ids=["one-call", "general"])
@pytest.mark.parametrize("norm,layout,shape,groups", FUSED_CASES,
                         ids=[f"{n}-{lay}-{'x'.join(map(str, s))}"
                              for n, lay, s, _ in FUSED_CASES])
def test_streaming_stores_change_nothing(norm, layout, shape, groups, fused, monkeypatch,
                                         restore_threads):
    """float32 outputs of STREAM_MIN_BYTES and more are written with streaming stores
    (Cython).  With the threshold at 0 every pass streams (aligned or not): the same
    bits as plain stores."""
    if "cython" not in COMPILED:
        pytest.skip("the Cython backend is not built")
    case = case_for(norm, "cython", layout, dtype=np.float32, affine="full", shape=shape,
                    groups=groups, running=SPECS[norm].has_running)
    spec = case.spec
    x, p = case.inputs()
    x = x * 3 + 50
    dy = case.rng("dy").standard_normal(shape).astype(np.float32)
    kernels = get_kernels("cython").k
    monkeypatch.setattr(fn._config, "FUSED_PASSES", fused)
    fn.set_num_threads(2)
    results = []
    old = kernels.stream_min_bytes()
    try:
        for threshold in (1 << 62, 0):
            kernels.stream_min_bytes(threshold)
            with fn.use_backend("cython"):
                y, saved = spec.train(x, p, case)
                g = spec.backward(dy, x, saved, p, case)
                y_eval = spec.forward(x, p, case, training=False)
            results.append((y, g, y_eval))
    finally:
        kernels.stream_min_bytes(old)
    (y0, g0, e0), (y1, g1, e1) = results
    np.testing.assert_array_equal(y1, y0)
    np.testing.assert_array_equal(e1, e0)
    for name in ("input", "weight", "bias"):
        np.testing.assert_array_equal(g1[name], g0[name])


def test_outputs_are_placed_apart_from_inputs():
    """Outputs of 1 MB and more that the library allocates sit far from their pass's
    inputs modulo 4 KB (``_checks.empty_apart``: 4K aliasing), are ordinary C-contiguous
    writable 64-byte-aligned arrays, and the results are those of any other placement."""
    from fastnorm._checks import empty_apart

    def offset(a):
        return a.__array_interface__["data"][0] % 4096

    def distance(a, b):
        d = (offset(a) - offset(b)) % 4096
        return min(d, 4096 - d)

    rng = np.random.default_rng(8)
    x = rng.standard_normal((64, 16, 16, 16)).astype(np.float32)  # 1 MB
    dy = rng.standard_normal(x.shape).astype(np.float32)
    for inputs in ((x,), (dy, x), (x, x)):
        y = empty_apart(x.shape, np.float32, inputs)
        assert y.shape == x.shape and y.dtype == np.float32
        assert y.flags.c_contiguous and y.flags.writeable and offset(y) % 64 == 0
        assert min(distance(y, a) for a in inputs) >= 1024
    small = empty_apart((4, 4), np.float64, (x,))
    assert small.shape == (4, 4) and small.dtype == np.float64
    for backend in COMPILED + ["numpy"]:
        with fn.use_backend(backend):
            y, mean, invstd = F.batch_norm_train(x)
            dx, _, _ = F.batch_norm_backward(dy, x, mean, invstd)
            ly = F.layer_norm(x, (16, 16))
            assert distance(y, x) >= 1024 and distance(ly, x) >= 1024
            assert min(distance(dx, dy), distance(dx, x)) >= 1024
            np.testing.assert_array_equal(y, F.batch_norm_train(x, out=np.empty_like(x))[0])
            np.testing.assert_array_equal(
                dx, F.batch_norm_backward(dy, x, mean, invstd, out=np.empty_like(x))[0])


@pytest.mark.parametrize("K", [1024, 1027], ids=["aligned-rows", "unaligned-rows"])
def test_numba_streaming_dx_matches_reference(K, restore_threads):
    """The Numba module writes a float32 dx of STREAM_MIN_BYTES and more with streaming
    stores (an LLVM intrinsic) where a run starts 16-byte aligned, plainly elsewhere:
    LayerNorm and RMSNorm backward of such a size give the reference's values, on one
    thread and two, with the same bits on both."""
    if "numba" not in COMPILED:
        pytest.skip("numba is not installed")
    from fastnorm._config import STREAM_MIN_BYTES
    R = STREAM_MIN_BYTES // (4 * K) + 3
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((R, K)) * 3 + 50).astype(np.float32)
    dy = rng.standard_normal((R, K)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, K).astype(np.float32)
    b = rng.standard_normal(K).astype(np.float32)
    got = []
    for nt in (1, 2):
        fn.set_num_threads(nt)
        with fn.use_backend("numba"):
            _, mean, invstd = F.layer_norm_train(x, (K,), w, b)
            ln = F.layer_norm_backward(dy, x, mean, invstd, (K,), w)
            _, invrms = F.rms_norm_train(x, (K,), w)
            rms = F.rms_norm_backward(dy, x, invrms, (K,), w)
        got.append((ln[0], rms[0]))
    np.testing.assert_array_equal(got[0][0], got[1][0])
    np.testing.assert_array_equal(got[0][1], got[1][1])
    with fn.use_backend("numpy"):
        _, mean, invstd = F.layer_norm_train(x, (K,), w, b)
        ln_ref = F.layer_norm_backward(dy, x, mean, invstd, (K,), w)[0]
        _, invrms = F.rms_norm_train(x, (K,), w)
        rms_ref = F.rms_norm_backward(dy, x, invrms, (K,), w)[0]
    for ours, ref in ((got[0][0], ln_ref), (got[0][1], rms_ref)):
        scale = float(np.max(np.abs(ref)))
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("backend", ["cython", "numba"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_few_long_rows_backward_in_one_pass_changes_nothing(norm, dtype, backend,
                                                            restore_threads):
    """A few long rows (LayerNorm (4, 2**18)): the kernels compute dx and the parameter
    gradients by blocks of columns over all rows in one pass over dy and x
    (rows_apply_backward_pgrads); the same bits as dx and then the gradients in two
    passes, on one thread and two, with and without weight."""
    if backend not in COMPILED:
        pytest.skip(f"the {backend} backend is not available")
    k = get_kernels(backend).k
    fused = k.rows_apply_backward_pgrads
    R, K = 4, 1 << 18
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((R, K)) * 3 + 20).astype(dtype)
    dy = rng.standard_normal((R, K)).astype(dtype)
    w = rng.uniform(0.5, 1.5, K).astype(dtype)
    b = rng.standard_normal(K).astype(dtype)
    runs = {}
    try:
        for on in (False, True):
            if on:
                k.rows_apply_backward_pgrads = fused
            else:
                del k.rows_apply_backward_pgrads
            for nt in (1, 2):
                fn.set_num_threads(nt)
                with fn.use_backend(backend):
                    for weight in (w, None):
                        if norm == "layer_norm":
                            _, mean, invstd = F.layer_norm_train(x, (K,), weight, b)
                            g = F.layer_norm_backward(dy, x, mean, invstd, (K,), weight)
                        else:
                            _, invrms = F.rms_norm_train(x, (K,), weight)
                            g = F.rms_norm_backward(dy, x, invrms, (K,), weight)
                        runs[on, nt, weight is None] = [a for a in g if a is not None]
    finally:
        k.rows_apply_backward_pgrads = fused
    for (on, nt, no_weight), g in runs.items():
        ref = runs[False, 1, no_weight]
        assert len(g) == len(ref)
        for a, c in zip(g, ref):
            np.testing.assert_array_equal(a, c)
