"""Inference for CPU-only services: PyTorch weights, fused models, threads, cold start,
and the HTTP example (examples/serve.py).

- PyTorch interop: the digits MLP and CNN (``train.build_model``) are trained a few steps
  in PyTorch, exported with ``safetensors.torch.save_file(model.state_dict(), path)``
  (or ``np.savez``), loaded with ``fastnorm.load_into`` and compared in eval mode (1e-5),
  unfused and fused, NCHW and NHWC.
- Fused models: the ReLU fusion, the execution plan (no tape, the modules' errors for
  input it does not take, the NumPy fallback without the Cython helpers).
- Threads: one model shared by 8 threads, each running batch-1 and batch-32 requests,
  gives bitwise the single-threaded results and leaves the model untouched.
  ``FASTNORM_THREAD_REQUESTS`` sets the requests per thread (default 60, a few seconds;
  the issue's 1,000 is ``FASTNORM_THREAD_REQUESTS=1000``, also run by
  benchmarks/test_bench_inference.py).  The kernels release the GIL.
- Cold start: ``import fastnorm`` + loading a checkpoint + the first batch-1 prediction
  in a fresh process, with the Cython backend and without importing numba (the bound
  asserted is a generous 2 s for noisy CI machines; docs/inference.md has the figures).
"""
import copy
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import fastnorm as fn
from fastnorm import data, nn, train

from model_pairs import assert_close

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = int(os.environ.get("FASTNORM_THREAD_REQUESTS", "60"))


def _cython_available():
    return "cython" in fn.backends()


def _digits():
    pytest.importorskip("sklearn")
    return data.load_digits()


def _randomize_stats(model, seed=0):
    """Non-trivial running statistics and affine parameters, as after training."""
    rng = np.random.default_rng(seed)
    for m in model.modules():
        if isinstance(m, nn._BatchNorm):
            m.running_mean = rng.standard_normal(m.num_features).astype(m.dtype)
            m.running_var = rng.uniform(0.5, 2.0, m.num_features).astype(m.dtype)
            m.weight.data[...] = rng.uniform(0.5, 2.0, m.num_features)
            m.bias.data[...] = rng.standard_normal(m.num_features)
    return model


def _digits_model(kind="cnn", layout="NCHW", seed=0):
    fn.manual_seed(seed)
    return _randomize_stats(train.build_model(kind, "batch", layout), seed).eval()


def _images(n, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, 1, 8, 8)).astype(np.float32)


# ------------------------------------------------------------------ PyTorch weights ----
def _torch_digits(torch, kind):
    """The PyTorch twin of ``train.build_model(kind, "batch")`` (same state-dict keys)."""
    t = torch.nn
    if kind == "mlp":
        return t.Sequential(t.Flatten(), t.Linear(64, 128), t.BatchNorm1d(128), t.ReLU(),
                            t.Linear(128, 64), t.BatchNorm1d(64), t.ReLU(), t.Linear(64, 10))
    return t.Sequential(t.Conv2d(1, 16, 3, padding=1, bias=False), t.BatchNorm2d(16), t.ReLU(),
                        t.Conv2d(16, 32, 3, padding=1, bias=False), t.BatchNorm2d(32), t.ReLU(),
                        t.MaxPool2d(2), t.Flatten(), t.Linear(32 * 4 * 4, 10))


@pytest.fixture(scope="module")
def torch_trained(tmp_path_factory):
    """{kind: (eval torch model, safetensors path, npz path)}: each trained 20 SGD steps
    on the digits in PyTorch, then exported the two ways the docs show."""
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    (xtr, ytr), _ = _digits()
    out = {}
    d = tmp_path_factory.mktemp("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a thread team only costs (a lot, on a busy machine)
    for kind in ("mlp", "cnn"):
        torch.manual_seed(0)
        model = _torch_digits(torch, kind)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        rng = np.random.default_rng(1)
        for _ in range(20):
            idx = rng.choice(len(xtr), 32, replace=False)
            loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(xtr[idx])),
                                                     torch.from_numpy(ytr[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        # the two lines on the PyTorch side (docs/inference.md)
        st.save_file(model.state_dict(), str(d / f"{kind}.safetensors"))
        np.savez(d / f"{kind}.npz", **{k: v.numpy() for k, v in model.state_dict().items()})
        out[kind] = (model, d / f"{kind}.safetensors", d / f"{kind}.npz")
    torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("ext", ["safetensors", "npz"])
@pytest.mark.parametrize("kind,layout", [("mlp", "NCHW"), ("cnn", "NCHW"), ("cnn", "NHWC")])
def test_pytorch_trained_weights_load_and_match(torch_trained, kind, layout, ext):
    import torch
    tmodel, st_path, npz_path = torch_trained[kind]
    path = st_path if ext == "safetensors" else npz_path
    model = fn.load_into(train.build_model(kind, "batch", layout), path).eval()
    # every entry arrived exactly, num_batches_tracked included
    tstate = tmodel.state_dict()
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, tstate[k].numpy(), err_msg=k)
    assert int(model.state_dict()["1.num_batches_tracked" if kind == "cnn"
                                   else "2.num_batches_tracked"]) == 20
    _, (xte, _) = _digits()
    for x in (xte[:64], xte[:1]):
        with torch.no_grad():
            ref = tmodel(torch.from_numpy(x)).numpy()
        xl = train.to_layout(x, layout)
        with fn.inference_mode():
            assert_close(model(xl).data, ref, 1e-5, f"{kind} {layout} eval")
            for relu in (False, True):
                assert_close(fn.fuse(model, relu=relu)(xl).data, ref, 1e-5,
                             f"{kind} {layout} fused relu={relu}")
        assert_close(model(xl).data, ref, 1e-5, f"{kind} {layout} eval, grad mode")
        assert (model(xl).data.argmax(1) == ref.argmax(1)).all()


def test_torch_state_dict_tensors_load_directly(torch_trained):
    """load_state_dict also takes the PyTorch state dict itself (CPU tensors)."""
    import torch
    tmodel, _, _ = torch_trained["cnn"]
    model = train.build_model("cnn", "batch")
    model.load_state_dict(tmodel.state_dict())
    x = _images(4)
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(x)).numpy()
    assert_close(model.eval()(x).data, ref, 1e-5)


# ------------------------------------------------------------------------- fusing ----
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_fuse_relu_structure_and_equality(layout):
    model = _digits_model("cnn", layout)
    fused = fn.fuse(model, relu=True)
    kinds = [type(m).__name__ for m in fused.children()]
    assert kinds == ["Conv2dReLU", "Identity", "Identity", "Conv2dReLU", "Identity",
                     "Identity", "MaxPool2d", "Flatten", "Linear"]
    assert type(fused).__name__ == "FusedSequential"
    assert [type(m).__name__ for m in fn.fuse(model).children()][:3] == \
        ["Conv2d", "Identity", "ReLU"]
    x = train.to_layout(_images(16), layout)
    ref = model(x).data
    for relu in (False, True):
        f = fn.fuse(model, relu=relu)
        with fn.inference_mode():
            assert_close(f(x).data, ref, 1e-5)
        assert_close(f(x).data, ref, 1e-5)  # grad mode: the plan too (nothing requires grad)
    mlp = _digits_model("mlp")
    fm = fn.fuse(mlp, relu=True)
    assert [type(m).__name__ for m in fm.children()] == [
        "Flatten", "LinearReLU", "Identity", "Identity", "LinearReLU", "Identity", "Identity",
        "Linear"]
    assert_close(fm(_images(8)).data, mlp(_images(8)).data, 1e-5)
    with pytest.raises(TypeError, match="relu"):
        fn.fuse(model, relu="yes")


def test_relu_not_fused_across_other_layers_or_shared_modules():
    lin = nn.Linear(4, 4)
    m = nn.Sequential(lin, nn.Tanh(), nn.ReLU(), nn.Linear(4, 4), nn.Dropout(0.2), nn.ReLU(),
                      lin, nn.ReLU()).eval()
    fused = fn.fuse(m, relu=True)
    kinds = [type(c).__name__ for c in fused._modules.values()]
    # ReLU after Tanh and after Dropout stay; lin is used twice, so it is not changed
    assert kinds == ["Linear", "Tanh", "ReLU", "Linear", "Dropout", "ReLU", "Linear", "ReLU"]
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    assert_close(fused(x).data, m(x).data, 1e-6)


def test_fused_model_keeps_no_tape_and_no_saved_values():
    model = _digits_model("cnn")
    fused = fn.fuse(model, relu=True)
    x = _images(32)
    y = fused(x)  # grad mode on: the fused parameters do not require grad
    assert not y.requires_grad and y._record is None
    with fn.inference_mode():
        y = model(x)
    assert not y.requires_grad and y._record is None
    # nothing is retained after a request: memory returns to where it was, and the peak
    # stays below that of a recorded forward (which keeps every layer's saved values)
    def traced(f):
        f()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        out = f()
        del out
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return current - base, peak - base

    x = _images(256)
    kept_fused, peak_fused = traced(lambda: fused(x))
    with fn.inference_mode():
        kept_eval, peak_eval = traced(lambda: model(x))
    kept_tape, peak_tape = traced(lambda: model(x))  # grad mode: a tape
    acts = 256 * 16 * 64 * 4  # one conv output, bytes
    assert kept_fused < 64 << 10 and kept_eval < 64 << 10
    assert peak_eval < peak_tape and peak_fused < peak_tape
    assert peak_fused < 20 * acts


def test_fused_plan_gives_the_modules_errors():
    model = _digits_model("cnn")
    fused = fn.fuse(model, relu=True)
    with pytest.raises(ValueError, match=r"Conv2d: input: expected a 4-D NCHW .* C = 1"):
        fused(np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="4-D"):
        fused(np.zeros((8, 8), np.float32))
    with pytest.raises(TypeError, match="float64 does not match"):
        fused(np.zeros((1, 1, 8, 8), np.float64))
    with pytest.raises(ValueError, match="in_features"):  # the plan reaches the Linear
        fused(np.zeros((1, 1, 10, 10), np.float32))
    with fn.inference_mode():
        with pytest.raises(ValueError, match="BatchNorm2d: input: expected 16 channels"):
            model[1](np.zeros((1, 3, 4, 4), np.float32))
    # an input that requires grad is recorded through the modules: same gradient
    x = _images(3)
    xf, xm = fn.Tensor(x, requires_grad=True), fn.Tensor(x, requires_grad=True)
    fused(xf).sum().backward()
    model(xm).sum().backward()
    assert_close(xf.grad, xm.grad, 1e-5)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_fused_plan_geometries_and_numpy_fallback(layout, monkeypatch):
    """Strides, paddings, 1x1 and non-square kernels, a standalone BatchNorm (ChannelAffine),
    max pooling with padding, nested Sequentials; with and without the Cython helpers."""
    fn.manual_seed(3)
    L = dict(layout=layout)
    model = nn.Sequential(
        nn.BatchNorm2d(3, **L),
        nn.Conv2d(3, 8, (3, 2), stride=(2, 1), padding=(1, 0), **L), nn.BatchNorm2d(8, **L),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 1, **L), nn.ReLU()),
        nn.MaxPool2d(3, stride=2, padding=1, **L),
        nn.Conv2d(8, 4, 3, padding=2, bias=False, **L), nn.AvgPool2d(2, **L),
        nn.Flatten(layout=layout), nn.Linear(4 * 3 * 2, 5), nn.ReLU())
    _randomize_stats(model).eval()
    x = train.to_layout(np.random.default_rng(0).standard_normal((4, 3, 11, 9))
                        .astype(np.float32), layout)
    ref = model(x).data
    fused = fn.fuse(model, relu=True)
    assert type(fused[4]).__name__ == "FusedSequential"
    assert type(fused[0]).__name__ == "ChannelAffine"
    with fn.inference_mode():
        assert_close(fused(x).data, ref, 1e-5)
        assert_close(fused(x[:1]).data, ref[:1], 1e-5)
    monkeypatch.setattr(sys.modules["fastnorm.fuse"], "_infer", None)
    monkeypatch.setattr(sys.modules["fastnorm.ops"], "_infer", None)
    with fn.inference_mode():
        assert_close(fused(x).data, ref, 1e-5)
    assert_close(model(x).data, ref, 1e-6)  # ops' NumPy im2col and max pooling


def test_batched_matmul_matches_numpy():
    """``infer.batched_matmul`` (BLAS from SciPy's capsules, a call per sample on the
    kernels' threads) gives np.matmul's products for every transpose and shared-operand
    combination, the same values on any thread count, and refuses what it cannot do."""
    pytest.importorskip("fastnorm._ext.infer")
    pytest.importorskip("scipy")
    from fastnorm import ops
    assert ops._gemm_ready()
    infer = ops._infer  # the build in use (AVX2 twin or portable), BLAS set on it
    rng = np.random.default_rng(4)
    for dt, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        for N, M, K, Nc in [(3, 4, 5, 6), (2, 1, 7, 1), (4, 6, 1, 3), (5, 9, 16, 7)]:
            for ta in (False, True):
                for tb in (False, True):
                    for a_shared in (False, True):
                        ashape = (K, M) if ta else (M, K)
                        a = rng.standard_normal(ashape if a_shared else (N,) + ashape)
                        b = rng.standard_normal((N, Nc, K) if tb else (N, K, Nc))
                        a, b = a.astype(dt), b.astype(dt)
                        want = np.matmul(np.swapaxes(a, -1, -2) if ta else a,
                                         np.swapaxes(b, -1, -2) if tb else b)
                        outs = []
                        for nt in (1, 2, 3):
                            out = np.empty((N, M, Nc), dt)
                            infer.batched_matmul(a, b, out, ta, tb, nt)
                            outs.append(out)
                        np.testing.assert_allclose(outs[0], want, rtol=tol, atol=tol * K)
                        np.testing.assert_array_equal(outs[1], outs[0])
                        np.testing.assert_array_equal(outs[2], outs[0])
                        got = ops._bmm(a, b, ta, tb)  # the op's entry
                        np.testing.assert_array_equal(got, outs[0])
                        for G in (1, 2, N - 1):  # partial sums over runs of samples
                            if not 0 < G < N:
                                continue
                            sums = []
                            for nt in (1, 2, 3):
                                out = np.full((G, M, Nc), np.nan, dt)
                                infer.batched_matmul(a, b, out, ta, tb, nt, N)
                                sums.append(out)
                            groups = np.arange(N) * G // N
                            for g in range(G):
                                np.testing.assert_allclose(
                                    sums[0][g], want[groups == g].sum(axis=0), rtol=tol,
                                    atol=tol * K * N)
                            np.testing.assert_array_equal(sums[1], sums[0])
                            np.testing.assert_array_equal(sums[2], sums[0])
                        summed = ops._bmm(a, b, ta, tb, summed=True).sum(axis=0)
                        np.testing.assert_allclose(summed, want.sum(axis=0), rtol=tol,
                                                   atol=tol * K * N)
    z = np.empty((2, 3, 4), np.float32)
    infer.batched_matmul(np.ones((3, 0), np.float32), np.ones((2, 0, 4), np.float32), z,
                         False, False, 2)
    np.testing.assert_array_equal(z, 0)  # K = 0: zeros
    with pytest.raises(ValueError, match="shapes"):
        infer.batched_matmul(np.ones((3, 5), np.float32), np.ones((2, 4, 4), np.float32), z,
                             False, False, 1)
    with pytest.raises(ValueError, match="operands"):
        infer.batched_matmul(np.ones((3, 4)), np.ones((2, 4, 4), np.float32), z, False,
                             False, 1)
    with pytest.raises(ValueError, match="operands"):
        infer.batched_matmul(np.ones((3, 3, 4), np.float32), np.ones((2, 4, 4), np.float32),
                             z, False, False, 1)


def test_batched_products_keep_blas_on_one_thread_inside_ours(monkeypatch):
    """When the products run on the kernels' threads, SciPy's BLAS is set to one thread
    for the call (two threads per core otherwise) and set back after it; on one thread
    of ours BLAS keeps its own setting."""
    pytest.importorskip("fastnorm._ext.infer")
    pytest.importorskip("scipy")
    pytest.importorskip("threadpoolctl")
    from fastnorm import ops
    assert ops._gemm_ready()
    ctl = ops._gemm_threads
    if ctl is None:
        pytest.skip("SciPy's BLAS is not one threadpoolctl can tell apart")
    seen = []
    real = ops._infer

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def batched_matmul(self, *args, **kwargs):
            seen.append(ctl.get_num_threads())
            return real.batched_matmul(*args, **kwargs)

    monkeypatch.setattr(ops, "_infer", Spy())
    before = ctl.get_num_threads()
    ctl.set_num_threads(2)
    try:
        a = np.ones((40, 64, 64), np.float32)
        monkeypatch.setattr(fn._config, "PARALLEL_MIN_ELEMENTS", 1)
        ops._bmm(a, a)
        assert seen == [1] and ctl.get_num_threads() == 2
        monkeypatch.setattr(fn._config, "PARALLEL_MIN_ELEMENTS", 1 << 30)  # one thread
        ops._bmm(a, a)
        assert seen == [1, 2] and ctl.get_num_threads() == 2
    finally:
        ctl.set_num_threads(before)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_conv2d_products_on_threads_match_numpy(layout, monkeypatch):
    """Conv2d forward and backward with the batched products on the kernels' threads
    equal those with NumPy's matmul (float64: to rounding); every helper pass on the
    threads here (im2col, col2im, the products)."""
    pytest.importorskip("fastnorm._ext.infer")
    pytest.importorskip("scipy")
    from fastnorm import ops
    assert ops._gemm_ready()  # sets BLAS for batched_matmul
    monkeypatch.setattr(fn._config, "PARALLEL_MIN_ELEMENTS", 1)
    rng = np.random.default_rng(6)
    xs = (4, 3, 7, 6) if layout == "NCHW" else (4, 7, 6, 3)
    x0 = rng.standard_normal(xs)
    w0 = rng.standard_normal((5, 3, 3, 2))
    dy = rng.standard_normal((4, 5, 4, 7) if layout == "NCHW" else (4, 4, 7, 5))
    runs = []
    for gemm in (True, False):
        monkeypatch.setattr(ops, "_gemm", gemm)
        x, w = fn.Tensor(x0, requires_grad=True), fn.Tensor(w0, requires_grad=True)
        y = ops.conv2d(x, w, stride=(2, 1), padding=(1, 1), layout=layout)
        y.backward(dy)
        runs.append((y.data, x.grad, w.grad))
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("threads", [1, 2])
def test_conv2d_one_pass_helpers_equal_separate_passes(layout, threads, monkeypatch):
    """conv_forward/conv_backward (columns and products sample by sample in one parallel
    region) give the bits of im2col, the batched products and col2im run one after
    another, on any number of threads; with and without a weight gradient or bias."""
    pytest.importorskip("fastnorm._ext.infer")
    pytest.importorskip("scipy")
    from fastnorm import ops
    assert ops._gemm_ready()
    monkeypatch.setattr(fn._config, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(fn._config, "_num_threads", threads)
    rng = np.random.default_rng(8)
    xs = (9, 3, 7, 6) if layout == "NCHW" else (9, 7, 6, 3)
    x0 = rng.standard_normal(xs).astype(np.float32)
    w0 = rng.standard_normal((5, 3, 3, 2)).astype(np.float32)
    b0 = rng.standard_normal(5).astype(np.float32)
    dy = rng.standard_normal((9, 5, 4, 7) if layout == "NCHW" else (9, 4, 7, 5))
    dy = dy.astype(np.float32)
    for wgrad, bias in [(True, True), (False, False)]:
        runs = []
        for helpers in (True, False):
            monkeypatch.setattr(ops, "_conv_helpers", lambda x, w, h=helpers: h)
            x = fn.Tensor(x0, requires_grad=True)
            w = fn.Tensor(w0, requires_grad=wgrad)
            b = fn.Tensor(b0, requires_grad=True) if bias else None
            y = ops.conv2d(x, w, b, stride=(2, 1), padding=(1, 1), layout=layout)
            y.backward(dy)
            runs.append((y.data, x.grad, w.grad, None if b is None else b.grad))
        for a, b_ in zip(*runs):
            if a is None:
                assert b_ is None
            else:
                np.testing.assert_array_equal(a, b_)


WINO_CASES = [  # x shape (NCHW), out channels: every layer ops._winograd takes
    ((32, 16, 8, 8), 32),  # the digits CNN's second layer: 4 samples a group
    ((3, 8, 6, 4), 5),     # a last group of fewer samples
    ((2, 9, 2, 2), 3),     # one tile per sample
    ((1, 8, 16, 14), 4),   # more tiles than a group's 64: one sample a group
]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(WINO_CASES)))
def test_conv2d_winograd_matches_im2col(layout, dtype, case, monkeypatch):
    """Winograd F(2x2, 3x3) gives the output and the three gradients of the im2col
    products to rounding (float32: 2e-6 of the largest value, float64: 1e-13), and the
    same bits on one thread and two; with the input and weight gradients asked for
    alone, and an input strided along the samples and the columns."""
    pytest.importorskip("fastnorm._ext.infer")
    pytest.importorskip("scipy")
    from fastnorm import ops
    assert ops._gemm_ready()
    monkeypatch.setattr(fn._config, "PARALLEL_MIN_ELEMENTS", 1)
    shape, O = WINO_CASES[case]
    assert ops._winograd((O, shape[1], 3, 3), (1, 1), (1, 1), shape[2:], True)
    rng = np.random.default_rng(case)
    x0 = rng.standard_normal(shape).astype(dtype)
    if layout == "NHWC":
        x0 = np.ascontiguousarray(x0.transpose(0, 2, 3, 1))
    w0 = rng.standard_normal((O, shape[1], 3, 3)).astype(dtype)
    b0 = rng.standard_normal(O).astype(dtype)
    gshape = (shape[0], O, *shape[2:]) if layout == "NCHW" else (shape[0], *shape[2:], O)
    dy = rng.standard_normal(gshape).astype(dtype)
    tol = 2e-6 if dtype == np.float32 else 1e-13

    def run(wino, threads, nx=True, nw=True, strided=False):
        monkeypatch.setattr(ops, "_WINOGRAD", wino)
        monkeypatch.setattr(fn._config, "_num_threads", threads)
        waxis = 3 if layout == "NCHW" else 2  # samples and columns strided
        xa = np.repeat(np.repeat(x0, 2, axis=0), 2, axis=waxis)[::2] if strided else x0
        if strided:
            xa = xa[:, :, :, ::2] if layout == "NCHW" else xa[:, :, ::2]
        x, w = fn.Tensor(xa, requires_grad=nx), fn.Tensor(w0, requires_grad=nw)
        b = fn.Tensor(b0, requires_grad=True)
        y = ops.conv2d(x, w, b, padding=1, layout=layout)
        y.backward(dy)
        return y.data, x.grad, w.grad, b.grad

    ref = run(False, 2)
    one, two = run(True, 1), run(True, 2)
    for a, b_ in zip(one, two):
        np.testing.assert_array_equal(a, b_)
    for got, exp in zip(two, ref):
        assert np.abs(got - exp).max() <= tol * np.abs(exp).max()
    for nx, nw, strided in [(True, False, False), (False, True, False), (True, True, True)]:
        got = run(True, 2, nx, nw, strided)
        exp = run(False, 2, nx, nw, strided)
        for g_, e_ in zip(got, exp):
            if e_ is None:
                assert g_ is None
            else:
                assert np.abs(g_ - e_).max() <= tol * np.abs(e_).max()


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_conv2d_winograd_empty_batch(layout):
    """An empty batch (a rank of a data-parallel step can get no samples): empty output
    and input gradient, a zero weight gradient."""
    pytest.importorskip("fastnorm._ext.infer")
    from fastnorm import ops
    for dtype in (np.float32, np.float64):
        x = fn.Tensor(np.zeros((0, 8, 4, 6) if layout == "NCHW" else (0, 4, 6, 8), dtype),
                      requires_grad=True)
        w = fn.Tensor(np.ones((3, 8, 3, 3), dtype), requires_grad=True)
        assert ops._winograd(w.shape, (1, 1), (1, 1), (4, 6), True)
        y = ops.conv2d(x, w, padding=1, layout=layout)
        y.backward(np.zeros(y.shape, dtype))
        assert y.shape == ((0, 3, 4, 6) if layout == "NCHW" else (0, 4, 6, 3))
        assert x.grad.shape == x.shape
        np.testing.assert_array_equal(w.grad, np.zeros((3, 8, 3, 3), dtype))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("where", ["input", "gradient"])
def test_conv2d_winograd_leaves_non_finite_values_to_im2col(layout, where, monkeypatch):
    """The transforms would turn an inf into NaNs where the direct sum gives inf: a
    convolution whose input holds an inf or a NaN is computed by im2col, as is the
    backward of an output gradient that holds one, and gives its bits."""
    pytest.importorskip("fastnorm._ext.infer")
    pytest.importorskip("scipy")
    from fastnorm import ops
    assert ops._gemm_ready()
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal((3, 8, 6, 4)).astype(np.float32)
    w0 = np.abs(rng.standard_normal((5, 8, 3, 3))).astype(np.float32)
    dy = rng.standard_normal((3, 5, 6, 4)).astype(np.float32)
    if where == "input":
        x0[1, 2, 3, 1] = np.inf
        x0[2, 0, 0, 0] = np.nan
    else:
        dy[0, 1, 2, 2] = -np.inf
    if layout == "NHWC":
        x0 = np.ascontiguousarray(x0.transpose(0, 2, 3, 1))
        dy = np.ascontiguousarray(dy.transpose(0, 2, 3, 1))
    runs = []
    for wino in (True, False):
        monkeypatch.setattr(ops, "_WINOGRAD", wino)
        x, w = fn.Tensor(x0, requires_grad=True), fn.Tensor(w0, requires_grad=True)
        y = ops.conv2d(x, w, padding=1, layout=layout)
        y.backward(dy)
        runs.append((y.data, x.grad, w.grad))
    (y, gx, gw), (y_ref, gx_ref, gw_ref) = runs
    if where == "input":
        np.testing.assert_array_equal(y, y_ref)
        assert np.isinf(y).any()
    else:  # a finite input: Winograd's forward, to rounding
        assert np.abs(y - y_ref).max() <= 2e-6 * np.abs(y_ref).max()
        assert np.isinf(gx).any()
    np.testing.assert_array_equal(gx, gx_ref)
    np.testing.assert_array_equal(gw, gw_ref)


def test_conv_helpers_reject_mismatched_arrays():
    pytest.importorskip("fastnorm._ext.infer")
    pytest.importorskip("scipy")
    from fastnorm import ops
    assert ops._gemm_ready()
    infer = ops._infer  # the build BLAS was given to
    x = np.zeros((2, 3, 5, 5), np.float32)
    w = np.zeros((4, 27), np.float32)
    cols = np.zeros((2, 27, 25), np.float32)
    out = np.zeros((2, 4, 5, 5), np.float32)
    geo = ((3, 3), (1, 1), (1, 1), False)
    infer.conv_forward(x, w, cols, out, *geo)  # the right arrays pass
    with pytest.raises(ValueError, match="w: expected"):
        infer.conv_forward(x, w[:, :26].copy(), cols, out, *geo)
    with pytest.raises(ValueError, match="out: expected"):
        infer.conv_forward(x, w, cols, out[:1].copy(), *geo)
    with pytest.raises(TypeError, match="cols: expected dtype float32"):
        infer.conv_forward(x, w, cols.astype(np.float64), out, *geo)
    g = np.zeros((2, 4, 25), np.float32)
    with pytest.raises(ValueError, match="gw: expected a \\(G, 27, 4\\)"):
        infer.conv_backward(g, cols, w, np.zeros((3, 27, 4), np.float32), x, *geo)
    with pytest.raises(ValueError, match="g: expected"):
        infer.conv_backward(g[:, :3].copy(), cols, w, None, x, *geo)


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_sample_transpose_and_nhwc_flatten(dt):
    pytest.importorskip("fastnorm._ext.infer")
    from fastnorm import ops
    infer = ops._infer
    rng = np.random.default_rng(0)
    for shape in [(3, 4, 4, 32), (2, 3, 5, 7), (1, 1, 1, 9), (0, 2, 2, 3), (2, 5, 3, 17),
                  (2, 0, 4, 3), (2, 3, 4, 0)]:
        x = rng.standard_normal(shape).astype(dt)
        N, R, K = shape[0], shape[1] * shape[2], shape[3]
        out = np.empty((N, K * R), dt)
        infer.sample_transpose(x, out, R, K)
        ref = x.reshape(N, R, K).transpose(0, 2, 1).reshape(N, K * R)
        np.testing.assert_array_equal(out, ref)
        # the op, its gradient, and the NumPy path for a strided input: the same values
        for xin in (x, x[:, ::-1]):
            t = fn.Tensor(xin, requires_grad=True)
            y = fn.functional.flatten(t, 1, layout="NHWC")
            np.testing.assert_array_equal(y.data, np.moveaxis(xin, 3, 1).reshape(N, K * R))
            g = rng.standard_normal(y.shape).astype(dt)
            (y * g).sum().backward()
            np.testing.assert_array_equal(t.grad, np.moveaxis(
                g.reshape(N, K, shape[1], shape[2]), 1, 3))
    x = np.zeros((2, 3, 4), dt)
    with pytest.raises(ValueError, match="R, K: expected sizes whose product divides"):
        infer.sample_transpose(x, np.empty_like(x), 5, 3)
    with pytest.raises(ValueError, match="out: expected"):
        infer.sample_transpose(x, np.empty(23, dt), 3, 4)
    ro = np.empty_like(x)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="out: expected a writable"):
        infer.sample_transpose(x, ro, 3, 4)


def test_infer_helpers_match_numpy():
    infer = pytest.importorskip("fastnorm._ext.infer")
    from fastnorm import ops
    from fastnorm.autograd import Context
    rng = np.random.default_rng(0)
    for dt in (np.float32, np.float64):
        for layout in ("NCHW", "NHWC"):
            for k, s, p in [((3, 3), (1, 1), (1, 1)), ((2, 3), (2, 1), (1, 1)),
                            ((1, 1), (1, 1), (0, 0)), ((2, 2), (2, 2), (0, 0)),
                            ((3, 2), (1, 2), (0, 0))]:
                x = rng.standard_normal((2, 5, 7, 4)).astype(dt)[:, ::1, 1:, :]  # a view
                if layout == "NCHW":
                    x = x.transpose(0, 3, 1, 2)
                x[0, 0, 0, 0] = np.nan
                # columns: as ops.conv2d builds them
                xp = ops._pad(np.ascontiguousarray(x), p, layout)
                win = ops._windows(xp, k, s, layout)
                if layout == "NCHW":
                    ref = win.transpose(0, 1, 4, 5, 2, 3).reshape(2, x.shape[1] * k[0] * k[1], -1)
                else:
                    ref = win.transpose(0, 1, 2, 4, 5, 3).reshape(-1, k[0] * k[1] * x.shape[3])
                cols = np.empty(ref.shape, dt)
                infer.im2col(x, cols, k, s, p, layout == "NHWC")
                np.testing.assert_array_equal(cols, ref)
                if layout == "NHWC":  # channels strided: an NCHW array viewed as NHWC
                    xs = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 3, 1)), 1, 3)
                    cols_s = np.empty(ref.shape, dt)
                    infer.im2col(xs, cols_s, k, s, p, True)
                    np.testing.assert_array_equal(cols_s, ref)
                # the samples on several threads: the same values (im2col and col2im)
                gx = [np.empty(x.shape, dt) for _ in range(3)]
                for i, nt in enumerate((1, 2, 3)):
                    cols_nt = np.empty(ref.shape, dt)
                    infer.im2col(x, cols_nt, k, s, p, layout == "NHWC", nt)
                    np.testing.assert_array_equal(cols_nt, ref)
                    infer.col2im(cols, gx[i], k, s, p, layout == "NHWC", nt)
                np.testing.assert_array_equal(gx[1], gx[0])
                np.testing.assert_array_equal(gx[2], gx[0])
                if 2 * p[0] <= k[0] and 2 * p[1] <= k[1]:
                    mref = ops.MaxPool2d.forward(Context((True,)), x, k, s, p, layout)
                    out = np.empty(mref.shape, dt)
                    infer.max_pool(x, out, k, s, p, layout == "NHWC")
                    np.testing.assert_array_equal(out, mref)
        y = rng.standard_normal((3, 4, 5)).astype(dt)
        y[1, 2, 3] = np.nan
        b = rng.standard_normal(4).astype(dt)
        for relu in (False, True):
            got = y.copy()
            infer.bias_relu(got, b, 5, relu)
            want = y + b[:, None]
            np.testing.assert_array_equal(got, np.maximum(want, 0) if relu else want)
    with pytest.raises(TypeError, match="dtype"):
        infer.bias_relu(np.zeros(4, np.float32), np.zeros(4), 1, True)
    with pytest.raises(ValueError, match="values"):
        infer.im2col(np.zeros((1, 1, 4, 4), np.float32), np.zeros(5, np.float32), (3, 3),
                     (1, 1), (1, 1), False)
    with pytest.raises(ValueError, match="writable"):
        infer.max_pool(np.zeros((1, 1, 4, 4)), np.zeros(4)[::-1], (2, 2), (2, 2), (0, 0), False)


def test_max_pool_without_argmax_equals_the_recorded_path():
    """ops.max_pool2d with nothing to record takes the running maximum: same values."""
    from fastnorm import ops
    rng = np.random.default_rng(0)
    for layout in ("NCHW", "NHWC"):
        for k, s, p in [(2, 2, 0), (3, 2, 1), (3, 1, 1), ((2, 3), (1, 2), (1, 1))]:
            x = rng.standard_normal((2, 3, 9, 7)).astype(np.float32)
            x[0, 1, 2, 3] = np.nan
            x[1, 0, :2, :2] = 0.5
            x = train.to_layout(x, layout)
            a = ops.max_pool2d(fn.Tensor(x, requires_grad=True), k, s, p, layout).data
            with fn.no_grad():
                b = ops.max_pool2d(fn.Tensor(x), k, s, p, layout).data
            assert b.flags.c_contiguous
            np.testing.assert_array_equal(a, b)


def test_batchnorm_eval_fast_path_matches_the_op():
    """The eval path without op machinery gives the op's results bitwise, and falls back
    (to the validated path) for parameters the kernels do not take as is."""
    import fastnorm.functional as F
    rng = np.random.default_rng(0)
    for layout, shape in (("NCHW", (1, 16, 8, 8)), ("NHWC", (2, 5, 5, 16)), ("NCHW", (3, 16))):
        bn = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(16, layout=layout)
        _randomize_stats(bn).eval()
        x = rng.standard_normal(shape).astype(np.float32)
        want = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight.data, bn.bias.data,
                            layout=layout)
        with fn.inference_mode():
            np.testing.assert_array_equal(bn(x).data, want)
            xs = np.asfortranarray(x)  # not contiguous: copied once
            np.testing.assert_array_equal(bn(xs).data, want)
            bn.weight = nn.Parameter(bn.weight.data.astype(np.float64))  # cast by the op
            assert_close(bn(x).data, want, 1e-6)
        y = bn(fn.Tensor(x, requires_grad=True))  # recorded: the op
        assert y.requires_grad


def test_fuse_is_callable_after_importing_the_submodule():
    import fastnorm.fuse as fuse_module
    from fastnorm.fuse import fuse
    model = _digits_model("mlp")
    assert type(fn.fuse(model)).__name__ == "FusedSequential"
    assert type(fuse_module(model)).__name__ == "FusedSequential"
    assert type(fuse(model, relu=True)).__name__ == "FusedSequential"


def test_fused_model_is_read_only_and_reloadable():
    model = _digits_model("cnn")
    fused = fn.fuse(model, relu=True)
    with pytest.raises(ValueError, match="read-only"):
        fused[0].weight.data[...] = 0
    x = _images(2)
    before = fused(x).data
    state = {k: v * 2 for k, v in fused.state_dict().items()}
    fused.load_state_dict(state)  # replaces the arrays: the plan follows
    assert not np.allclose(fused(x).data, before)
    assert_close(fused(x).data, nn.Sequential.forward(fused, fn.Tensor(x)).data, 1e-6)
    fused.append(nn.ReLU())  # a changed structure is re-planned
    assert (fused(x).data >= 0).all()


# ------------------------------------------------------------------------ threads ----
def _module_state(model):
    """Everything a forward could write: each module's attributes (by identity) and a
    copy of the state dict."""
    return ([(m, dict(m.__dict__)) for m in model.modules()],
            {k: v.copy() for k, v in model.state_dict().items()})


def _assert_untouched(model, snapshot):
    attrs, state = snapshot
    for m, d in attrs:
        now = m.__dict__
        assert now.keys() == d.keys(), type(m).__name__
        for k in d:
            assert now[k] is d[k], f"{type(m).__name__}.{k} was replaced"
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)


@pytest.mark.parametrize("variant", ["fused", "eval-inference", "eval-grad"])
def test_one_model_shared_by_8_threads_is_bitwise_single_threaded(variant):
    backend = "cython" if _cython_available() else fn.get_backend()
    model = _digits_model("cnn")
    if variant == "fused":
        model = fn.fuse(model, relu=True)
    requests = []
    for t in range(8):
        rng = np.random.default_rng(100 + t)
        requests.append([rng.uniform(0, 1, (1 if i % 2 == 0 else 32, 1, 8, 8)).astype(np.float32)
                         for i in range(REQUESTS)])

    def run(xs):
        out = []
        with fn.use_backend(backend):
            if variant == "eval-grad":
                for x in xs:
                    out.append(model(x).data)
            else:
                with fn.inference_mode():
                    for x in xs:
                        out.append(model(x).data)
        return out

    expected = [run(xs) for xs in requests]  # single-threaded
    snapshot = _module_state(model)
    barrier = threading.Barrier(8)

    def worker(xs):
        barrier.wait()
        return run(xs)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, requests))
    for t in range(8):
        for i, (got, want) in enumerate(zip(results[t], expected[t])):
            assert got.shape == want.shape
            np.testing.assert_array_equal(got, want, err_msg=f"thread {t} request {i}")
    _assert_untouched(model, snapshot)


def _python_runs_inside(call, repeats):
    """How often another Python thread ran while ``call()`` was in its C code: the
    timestamps it took between 25% and 50% of each call.  A call that holds the GIL
    leaves none there: the other thread gets the GIL only around the call (a switch
    interval, set to 0.5 ms here, before it starts and before the caller can take its
    end time)."""
    stamps = []
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            stamps.append(time.perf_counter())
            for _ in range(50):
                pass

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    t = threading.Thread(target=spin)
    t.start()
    try:
        time.sleep(0.02)
        windows = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            t1 = time.perf_counter()
            windows.append((t0 + 0.25 * (t1 - t0), t0 + 0.5 * (t1 - t0)))
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(interval)
    return sum(a <= s <= b for a, b in windows for s in stamps)


@pytest.mark.skipif(not _cython_available(), reason="the Cython extension is not built")
def test_kernels_release_the_gil():
    from fastnorm._backend import get_kernels
    infer = pytest.importorskip("fastnorm._ext.infer")
    k = get_kernels("cython").k
    x = np.random.default_rng(0).standard_normal(1 << 23).astype(np.float32)
    y = np.empty_like(x)
    mean, invstd, w = np.zeros(4), np.ones(4), np.ones(4, np.float32)
    xi = np.random.default_rng(0).standard_normal((4, 64, 64, 64)).astype(np.float32)
    cols = np.empty(4 * 64 * 9 * 64 * 64, np.float32)
    calls = {
        "apply_fused": lambda: k.apply_fused(x, 1, 1, 4, 1, x.size // 4, 1, mean, invstd,
                                             None, 0.0, w, w, y, 1),
        "im2col": lambda: infer.im2col(xi, cols, (3, 3), (1, 1), (1, 1), False),
        "max_pool": lambda: infer.max_pool(xi, cols[:xi.size].reshape(xi.shape), (3, 3),
                                           (1, 1), (1, 1), False),
    }
    import math
    # the control: a ~30 ms C call that holds the GIL
    assert _python_runs_inside(lambda: math.factorial(45000), 5) == 0
    for name, call in calls.items():
        repeats = 5 if name == "max_pool" else 20  # ~25 ms, ~2 ms, ~2 ms per call
        assert _python_runs_inside(call, repeats) > 0, f"{name} holds the GIL"


# --------------------------------------------------------------------- cold start ----
COLD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import fastnorm as fn
from fastnorm import train
path = sys.argv[1]
model, _ = train.model_from_metadata(fn.load_metadata(path))
fn.load_into(model, path).eval()
if sys.argv[2] == "fused":
    model = fn.fuse(model, relu=True)
with fn.inference_mode():
    y = model(np.zeros((1, 1, 8, 8), np.float32)).data
print(json.dumps({"seconds": time.perf_counter() - t0, "backend": fn.get_backend(),
                  "numba": "numba" in sys.modules, "torch": "torch" in sys.modules,
                  "shape": list(y.shape)}))
"""


@pytest.mark.skipif(not _cython_available(), reason="the Cython extension is not built")
@pytest.mark.parametrize("variant", ["eval", "fused"])
def test_cold_start_without_numba(tmp_path, variant):
    model = _digits_model("cnn")
    path = tmp_path / "digits.safetensors"
    pytest.importorskip("safetensors")
    fn.save(model, path, metadata=train.config_metadata(
        {"model": "cnn", "norm": "batch", "layout": "NCHW", "in_shape": [1, 8, 8],
         "classes": 10, "hidden": 128}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTNORM_")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", COLD, str(path), variant], env=env,
                          capture_output=True, text=True, timeout=60)
    whole = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["backend"] == "cython" and info["shape"] == [1, 10]
    assert not info["numba"], "numba was imported on the Cython inference path"
    assert not info["torch"]
    print(f"cold start ({variant}): {info['seconds']:.3f} s in process, {whole:.3f} s whole "
          f"process")
    assert whole < 2.0


# ------------------------------------------------------------------- HTTP example ----
def _load_serve():
    spec = importlib.util.spec_from_file_location("fastnorm_example_serve",
                                                  ROOT / "examples" / "serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("safetensors")
    path = tmp_path_factory.mktemp("serve") / "digits.safetensors"
    config = {"model": "cnn", "norm": "batch", "layout": "NHWC", "in_shape": [1, 8, 8],
              "classes": 10, "hidden": 128}
    fn.save(_digits_model("cnn", "NHWC"), path, metadata=train.config_metadata(config))
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    serve = _load_serve()
    srv = serve.make_server(checkpoint, "127.0.0.1", 0, max_batch=64, max_bytes=1 << 20)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _post(url, body, path="/predict", headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_concurrent_predictions(server, checkpoint):
    srv, url = server
    model = fn.load_into(train.build_model("cnn", "batch", "NHWC"), checkpoint).eval()
    xs = [_images(1 if i % 3 else 5, seed=i) for i in range(48)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda x: _post(url, {"inputs": x.tolist()}), xs))
    for x, (status, answer) in zip(xs, answers):
        assert status == 200, answer
        logits = model(train.to_layout(x, "NHWC")).data
        assert answer["predictions"] == logits.argmax(1).tolist()
        p = np.exp(logits - logits.max(1, keepdims=True))
        np.testing.assert_allclose(answer["probabilities"], p / p.sum(1, keepdims=True),
                                   rtol=1e-4, atol=1e-6)
    # one image without the batch axis is a batch of one
    status, answer = _post(url, {"inputs": xs[1][0].tolist()})
    assert status == 200 and len(answer["predictions"]) == 1
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["model"]["layout"] == "NHWC"


@pytest.mark.parametrize("body,status,message", [
    (b'{"inputs": [1, 2', 400, "malformed JSON"),
    (b"\xff\xfe", 400, "malformed JSON"),
    (b"[1, 2, 3]", 400, 'JSON object with an "inputs" array'),
    ({"input": [1]}, 400, 'JSON object with an "inputs" array'),
    ({"inputs": "abc"}, 400, "got str"),
    ({"inputs": [[1, 2], [3]]}, 400, "rectangular"),
    ({"inputs": [[["a"] * 8] * 8]}, 400, "rectangular"),
    ({"inputs": np.zeros((8, 8)).tolist()}, 400, r"expected shape \(1, 8, 8\).* got \(8, 8\)"),
    ({"inputs": np.zeros((2, 3, 8, 8)).tolist()}, 400, r"got \(2, 3, 8, 8\)"),
    ({"inputs": np.zeros((65, 1, 8, 8)).tolist()}, 400, "1 to 64 images, got 65"),
    ({"inputs": []}, 400, "expected shape"),
    (b'{"inputs": [[[NaN, 0, 0, 0, 0, 0, 0, 0]]]}', 400, "expected shape"),
    (b'{"inputs": ' + json.dumps(np.zeros((1, 1, 8, 8)).tolist()).replace("0.0", "NaN", 1)
     .encode() + b"}", 400, "finite"),
    (b"[" * 100000 + b"]" * 100000, 400, "malformed JSON"),
])
def test_http_bad_requests_are_400_with_a_message(server, body, status, message):
    import re
    srv, url = server
    got, answer = _post(url, body)
    assert got == status
    assert re.search(message, answer["error"]), answer["error"]


def test_http_other_errors(server):
    srv, url = server
    assert _post(url, {"inputs": 1}, path="/nope")[0] == 404
    try:
        urllib.request.urlopen(url + "/predict", timeout=30)
    except urllib.error.HTTPError as e:
        assert e.code == 405
    else:
        raise AssertionError("GET /predict answered 200")
    import http.client
    host, port = srv.server_address[:2]
    for length, status, message in ((str(1 << 30), 413, "at most"), (None, 411, "Content-Length")):
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.putrequest("POST", "/predict")  # headers only: the body is never read
        if length is not None:
            conn.putheader("Content-Length", length)
        conn.endheaders()
        r = conn.getresponse()
        assert r.status == status and message in json.loads(r.read())["error"]
        conn.close()
    # the server still answers after all that
    assert _post(url, {"inputs": _images(1).tolist()})[0] == 200


@pytest.mark.skipif(not _cython_available(), reason="the Cython extension is not built")
def test_serve_command_line(checkpoint):
    """``python3 examples/serve.py MODEL --port 0`` starts, answers, stops on SIGINT."""
    import signal
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "serve.py"),
                             str(checkpoint), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving" in line, line + proc.stderr.read()
        url = line.split(" on ")[1].split()[0]
        status, answer = _post(url, {"inputs": _images(2).tolist()})
        assert status == 200 and len(answer["predictions"]) == 2
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    assert proc.returncode == 0
    bad = subprocess.run([sys.executable, str(ROOT / "examples" / "serve.py"), "missing.npz"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no such file" in bad.stderr
