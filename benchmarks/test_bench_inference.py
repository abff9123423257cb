"""Inference latency: the digits CNN on one image, one BatchNorm eval call, many threads.

Groups (pytest-benchmark), all float32 on ``--threads`` threads (default 2) for fastnorm
and PyTorch alike:

- ``cnn batch-1 NCHW`` / ``NHWC`` / ``cnn batch-32 NCHW``: the digits CNN
  (``train.build_model("cnn", "batch", layout)``: conv16-BN-ReLU-conv32-BN-ReLU-maxpool-
  linear) in eval mode with non-trivial running statistics: ``fastnorm-eval`` (the
  modules under ``fastnorm.inference_mode()``), ``fastnorm-fused`` (``fastnorm.fuse``)
  and ``fastnorm-fused-relu`` (``fuse(model, relu=True)``), and ``torch-eval`` (the same
  weights in ``torch.nn`` under ``torch.inference_mode()``; NHWC as channels_last).
- ``batchnorm eval (1,16,8,8)``: the cost of one call, which at this size is all
  overhead: ``fastnorm-module`` (``BatchNorm2d`` under ``inference_mode``),
  ``fastnorm-functional`` (``F.batch_norm(..., training=False)``), ``torch-module``,
  ``torch-functional``.
- ``threads``: one model shared by 8 threads, each running ``FASTNORM_THREAD_REQUESTS``
  (default 1,000) requests alternating batch 1 and batch 32; checked bitwise against a
  single-threaded run (the time is for the threaded run only).

Each implementation is timed in its own block (PyTorch's second OpenMP runtime makes
call-by-call interleaving ~37% slower, see PITFALLS): the parameters put the
implementation outermost.  A summary with PyTorch / fastnorm ratios is printed at the end
when timing is on.

    python3 -m pytest benchmarks/test_bench_inference.py -q                 # timings
    python3 -m pytest benchmarks/test_bench_inference.py -q --benchmark-disable  # checks
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastnorm as fn
import fastnorm.functional as F
from fastnorm import nn, train

try:
    import torch
    import torch.nn.functional as TF
except ImportError:
    torch = None

REQUESTS = int(os.environ.get("FASTNORM_THREAD_REQUESTS", "1000"))
FN_CNN = ["fastnorm-eval", "fastnorm-fused", "fastnorm-fused-relu"]
CNN_IMPLS = FN_CNN + (["torch-eval"] if torch is not None else [])
BN_IMPLS = ["fastnorm-module", "fastnorm-functional"] + (
    ["torch-module", "torch-functional"] if torch is not None else [])
CNN_CASES = [("NCHW", 1), ("NHWC", 1), ("NCHW", 32)]
_medians = {}  # group -> {impl: median seconds}, for the summary


def _model(layout):
    fn.manual_seed(0)
    model = train.build_model("cnn", "batch", layout)
    rng = np.random.default_rng(0)
    for m in model.modules():
        if isinstance(m, nn._BatchNorm):
            m.running_mean = rng.standard_normal(m.num_features).astype(np.float32) * 0.1
            m.running_var = rng.uniform(0.5, 2.0, m.num_features).astype(np.float32)
            m.weight.data[...] = rng.uniform(0.5, 1.5, m.num_features)
            m.bias.data[...] = rng.standard_normal(m.num_features) * 0.1
    return model.eval()


def _torch_model(layout):
    t = torch.nn
    tm = t.Sequential(t.Conv2d(1, 16, 3, padding=1, bias=False), t.BatchNorm2d(16), t.ReLU(),
                      t.Conv2d(16, 32, 3, padding=1, bias=False), t.BatchNorm2d(32), t.ReLU(),
                      t.MaxPool2d(2), t.Flatten(), t.Linear(32 * 4 * 4, 10))
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in _model(layout).state_dict().items()})
    tm.eval()
    return tm.to(memory_format=torch.channels_last) if layout == "NHWC" else tm


def _images(n, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, 1, 8, 8)).astype(np.float32)


def _cnn_call(impl, layout, n):
    """(the model call taking no argument, returning the logits as an ndarray; the
    no-recording context it runs in; reference logits).  The context is entered once
    around the timing, for both libraries."""
    x = _images(n)
    ref = _model("NCHW")(x).data
    if impl.startswith("fastnorm"):
        model = _model(layout)
        if impl != "fastnorm-eval":
            model = fn.fuse(model, relu=impl == "fastnorm-fused-relu")
        xl = fn.Tensor(train.to_layout(x, layout))
        return (lambda: model(xl).data), fn.inference_mode, ref
    tm = _torch_model(layout)
    xt = torch.from_numpy(x)
    if layout == "NHWC":
        xt = xt.contiguous(memory_format=torch.channels_last)
    return (lambda: tm(xt).numpy()), torch.inference_mode, ref


def _record(benchmark, group, impl):
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        _medians.setdefault(group, {})[impl] = stats.stats.median


def _time(benchmark, call, context, rounds):
    with context():
        for _ in range(min(1000, rounds // 10)):  # warm caches, BLAS, first-call paths
            call()
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=50)


@pytest.mark.parametrize("impl,layout,n", [
    pytest.param(impl, layout, n, id=f"{impl}-{layout}-batch{n}")
    for impl in CNN_IMPLS for layout, n in CNN_CASES])
def test_cnn_latency(benchmark, threads, impl, layout, n):
    group = f"cnn batch-{n} {layout}"
    benchmark.group = group
    call, context, ref = _cnn_call(impl, layout, n)
    with context():
        np.testing.assert_allclose(call(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    _time(benchmark, call, context, 3000 if n == 1 else 300)
    _record(benchmark, group, impl)


@pytest.mark.parametrize("impl", BN_IMPLS)
def test_batchnorm_eval_call(benchmark, threads, impl):
    group = "batchnorm eval (1,16,8,8)"
    benchmark.group = group
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 8, 8)).astype(np.float32)
    rm = rng.standard_normal(16).astype(np.float32) * 0.1
    rv = rng.uniform(0.5, 2.0, 16).astype(np.float32)
    w = rng.uniform(0.5, 1.5, 16).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    ref = (x - rm[:, None, None]) / np.sqrt(rv[:, None, None] + 1e-5) * w[:, None, None] \
        + b[:, None, None]
    if impl == "fastnorm-module":
        bn = nn.BatchNorm2d(16)
        bn.load_state_dict({"weight": w, "bias": b, "running_mean": rm, "running_var": rv,
                            "num_batches_tracked": np.array(1)})
        bn.eval()
        xt = fn.Tensor(x)
        call, context = (lambda: bn(xt).data), fn.inference_mode
    elif impl == "fastnorm-functional":
        call, context = (lambda: F.batch_norm(x, rm, rv, w, b, training=False)), fn.inference_mode
    else:
        tx, trm, trv, tw, tb = map(torch.from_numpy, (x, rm, rv, w, b))
        if impl == "torch-module":
            tbn = torch.nn.BatchNorm2d(16)
            tbn.load_state_dict({"weight": tw, "bias": tb, "running_mean": trm,
                                 "running_var": trv, "num_batches_tracked": torch.tensor(1)})
            tbn.eval()
            call = lambda: tbn(tx)  # noqa: E731
        else:
            call = lambda: TF.batch_norm(tx, trm, trv, tw, tb, training=False)  # noqa: E731
        context = torch.inference_mode
    with context():
        np.testing.assert_allclose(np.asarray(call()), ref, rtol=1e-5, atol=1e-5)
    _time(benchmark, call, context, 20000)
    _record(benchmark, group, impl)


@pytest.mark.parametrize("impl", ["fastnorm-fused-relu", "fastnorm-eval"])
def test_threads_bitwise(benchmark, threads, impl):
    """8 threads x REQUESTS requests (batch 1 and 32 alternating) on one shared model."""
    benchmark.group = f"threads 8x{REQUESTS}"
    model = _model("NCHW")
    if impl != "fastnorm-eval":
        model = fn.fuse(model, relu=True)
    requests = [[_images(1 if i % 2 == 0 else 32, seed=1000 * t + i) for i in range(REQUESTS)]
                for t in range(8)]

    def run(xs):
        with fn.inference_mode():
            return [model(x).data for x in xs]

    expected = [run(xs) for xs in requests]
    results = {}

    def threaded():
        barrier = threading.Barrier(8)

        def worker(xs):
            barrier.wait()
            return run(xs)
        with ThreadPoolExecutor(8) as pool:
            results["out"] = list(pool.map(worker, requests))

    benchmark.pedantic(threaded, rounds=1, iterations=1)
    for t in range(8):
        for got, want in zip(results["out"][t], expected[t]):
            np.testing.assert_array_equal(got, want)
    _record(benchmark, benchmark.group, impl)


@pytest.fixture(scope="session", autouse=True)
def _summary(request):
    yield
    if not _medians:
        return
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            _print_summary()
    else:
        _print_summary()


def _print_summary():
    write = print
    write("")
    write("inference summary (median per call; ratio = PyTorch time / fastnorm time):")
    for group, med in _medians.items():
        for impl, t in med.items():
            extra = ""
            twin = impl.replace("fastnorm-", "torch-")  # module vs module, F vs F
            torch_t = med.get(twin) or med.get("torch-eval")
            if torch_t and impl.startswith("fastnorm"):
                extra = f"  ({torch_t / t:.2f}x PyTorch)"
            if group.startswith("threads"):
                extra = f"  ({8 * REQUESTS / t:.0f} requests/s)"
            write(f"  {group:28s} {impl:22s} {t * 1e6:10.1f} us{extra}")
