"""One training epoch on the digits, fastnorm vs PyTorch: same model, batch size,
optimizer (Adam, lr 1e-3), data order and thread count (``--threads``; fastnorm runs each
step on those threads or on one, whichever its recent steps ran faster with, as
``fastnorm.train.fit`` does: ``train.StepThreads``).

Groups ``train epoch {mlp,cnn} {NCHW,NHWC}``.  Each library trains in a process of its
own, and the two take turns, one epoch each per round, 50 ms apart; pytest-benchmark
times fastnorm's epochs, and PyTorch's are timed the same way (from this process, around
the same request) into ``extra_info``, with their ratio: ``torch_seconds``,
``ratio`` (PyTorch's median epoch / fastnorm's), ``pair_ratios`` (per round).

Why turns: this VM's speed changes from minute to minute (fastnorm's epoch 28 ms in some
minutes and 40 ms in others, PyTorch's 74 and 94 ms, not at the same moments), so timing
all of one library's epochs and then the other's compared different minutes: one run in
fifteen gave 1.88x where the others gave 2.3-3.3x.  Why processes: in one process, once
PyTorch had run, its OpenMP threads slowed the fastnorm epochs timed after it ~2x (an
earlier MLP epoch: 21 ms alone, 38-41 ms after PyTorch's).  Why 50 ms apart: each library's OpenMP threads
keep spinning for a while after its epoch; back to back, the epoch after a turn change
took up to 45-50 ms instead of 29 (median pair ratio 1.95-2.18 instead of 2.5-2.6).

    python3 -m pytest benchmarks/test_bench_train.py --benchmark-json=/tmp/train.json -q
"""
import importlib.util
import statistics
import time

import numpy as np
import pytest

from turns import spawn

BATCH = 32
CASES = [("mlp", "NCHW"), ("cnn", "NCHW"), ("cnn", "NHWC")]
ROUNDS = 10
GAP = 0.05  # seconds before each epoch (see above)
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _digits():
    from fastnorm import data

    (xtr, ytr), _ = data.load_digits()
    order = np.random.default_rng(0).permutation(len(xtr))
    return xtr[order], ytr[order]


def _fastnorm_epoch(model_name, layout, x, y):
    import fastnorm as fn
    from fastnorm import train
    from fastnorm.ops import cross_entropy

    fn.manual_seed(0)
    model = train.build_model(model_name, "batch", layout)
    opt = fn.optim.Adam(model.parameters(), lr=1e-3)
    x = train.to_layout(x, layout)

    def epoch(threads):  # run inside train._blas_single_thread(), as fit does, and with
        for i in range(0, len(x) - 1, BATCH):  # its choice of threads per step
            threads.start()
            loss = cross_entropy(model(x[i:i + BATCH]), y[i:i + BATCH])
            opt.zero_grad()
            loss.backward()
            opt.step()
            threads.stop()
    return epoch


def torch_model(model_name, layout):
    import torch
    nn = torch.nn
    if model_name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
                             nn.Linear(128, 64), nn.BatchNorm1d(64), nn.ReLU(),
                             nn.Linear(64, 10))
    m = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                      nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 10))
    return m.to(memory_format=torch.channels_last) if layout == "NHWC" else m


def _torch_epoch(model_name, layout, x, y):
    import torch

    torch.manual_seed(0)
    model = torch_model(model_name, layout)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt = torch.from_numpy(x)
    if layout == "NHWC":
        xt = xt.contiguous(memory_format=torch.channels_last)
    yt = torch.from_numpy(y)

    def epoch():
        for i in range(0, len(xt) - 1, BATCH):
            loss = torch.nn.functional.cross_entropy(model(xt[i:i + BATCH]), yt[i:i + BATCH])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return epoch


def _serve(impl, model_name, layout, threads, conn):
    """A library's process: one warm-up epoch (first-call costs: allocation, any JIT),
    then one epoch per request, until told to stop.  Both run with the collector's older
    objects frozen and glibc's malloc thresholds fixed, as ``fit`` runs; fastnorm also
    with BLAS on one thread and its per-step thread choice, entered once for the run as
    ``fit`` enters them (threadpoolctl takes ~0.8 ms per entry; a full collection ~45 ms
    every 5-10 epochs)."""
    import contextlib

    import fastnorm as fn
    from fastnorm import train

    train.keep_freed_memory()
    x, y = _digits()
    with contextlib.ExitStack() as stack:
        if impl == "torch":
            import torch
            torch.set_num_threads(threads)
            epoch = _torch_epoch(model_name, layout, x, y)
        else:
            fn.set_num_threads(threads)
            stack.enter_context(train._blas_single_thread())
            st = stack.enter_context(train.StepThreads())
            run = _fastnorm_epoch(model_name, layout, x, y)

            def epoch():
                run(st)
        stack.enter_context(train._objects_frozen())
        epoch()
        conn.send("ready")
        while conn.recv() == "epoch":
            epoch()
            conn.send("done")


class _Library:
    """A library's process (``_serve``); ``epoch()`` runs one epoch there and waits."""

    def __init__(self, impl, model_name, layout, threads):
        self.conn, self.proc = spawn(_serve, (impl, model_name, layout, threads),
                                     f"{impl} training")

    def epoch(self):
        self.conn.send("epoch")
        self.conn.recv()

    def close(self):
        self.conn.send("stop")
        self.proc.join(30)


@pytest.mark.parametrize("model_name, layout", CASES)
def test_train_epoch(benchmark, threads, summary, model_name, layout):
    import fastnorm as fn

    benchmark.group = f"train epoch {model_name} {layout}"
    benchmark.extra_info.update(impl="fastnorm", model=model_name, layout=layout,
                                threads=threads, backend=fn.get_backend())
    fastnorm = _Library("fastnorm", model_name, layout, threads)
    torch = _Library("torch", model_name, layout, threads) if HAVE_TORCH else None
    torch_seconds = []

    def torch_turn():  # untimed by pytest-benchmark, timed here the same way
        if torch is not None:
            time.sleep(GAP)
            t0 = time.perf_counter()
            torch.epoch()
            torch_seconds.append(time.perf_counter() - t0)
        time.sleep(GAP)

    try:
        benchmark.pedantic(fastnorm.epoch, setup=torch_turn, rounds=ROUNDS, iterations=1)
    finally:
        fastnorm.close()
        if torch is not None:
            torch.close()
    if torch_seconds:
        ours = benchmark.stats.stats.data
        ratio = statistics.median(torch_seconds) / statistics.median(ours)
        pairs = [t / f for t, f in zip(torch_seconds, ours)]
        benchmark.extra_info.update(torch_seconds=torch_seconds, ratio=ratio,
                                    pair_ratios=pairs)
        summary(f"{benchmark.group}: {ratio:.2f}x (median epochs: PyTorch "
                f"{statistics.median(torch_seconds) * 1e3:.1f} ms, fastnorm "
                f"{statistics.median(ours) * 1e3:.1f} ms; rounds {min(pairs):.2f}-"
                f"{max(pairs):.2f}x)")
