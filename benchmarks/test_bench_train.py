"""One training epoch on the digits, fastnorm vs PyTorch: same model, batch size,
optimizer (Adam, lr 1e-3), data order and thread count (``--threads``; fastnorm runs each
step on those threads or on one, whichever its recent steps ran faster with, as
``fastnorm.train.fit`` does: ``train.StepThreads``).

Groups ``train epoch {mlp,cnn} {NCHW,NHWC}``; each implementation runs in its own block
after one warm-up epoch, all fastnorm epochs before any PyTorch one: once PyTorch has run,
its OpenMP threads spin on the same two cores and slowed the fastnorm epochs timed after
them ~2x (MLP: 21 ms alone, 38-41 ms after PyTorch's), as in the norm benchmarks.

    python3 -m pytest benchmarks/test_bench_train.py --benchmark-json=/tmp/train.json -q
"""
import numpy as np
import pytest

import fastnorm as fn
from fastnorm import data, train

try:
    import torch
except ImportError:
    torch = None

BATCH = 32
CASES = [("mlp", "NCHW"), ("cnn", "NCHW"), ("cnn", "NHWC")]


@pytest.fixture(scope="module")
def digits():
    (xtr, ytr), _ = data.load_digits()
    order = np.random.default_rng(0).permutation(len(xtr))
    return xtr[order], ytr[order]


def _fastnorm_epoch(model_name, layout, x, y):
    from fastnorm.ops import cross_entropy

    fn.manual_seed(0)
    model = train.build_model(model_name, "batch", layout)
    opt = fn.optim.Adam(model.parameters(), lr=1e-3)
    x = train.to_layout(x, layout)
    train.keep_freed_memory()  # as fastnorm.train.fit runs it

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


@pytest.mark.parametrize("model_name, layout", CASES)
@pytest.mark.parametrize("impl", ["fastnorm", "torch"])  # outermost: all fastnorm first
def test_train_epoch(benchmark, threads, digits, impl, model_name, layout):
    benchmark.group = f"train epoch {model_name} {layout}"
    benchmark.extra_info.update(impl=impl, model=model_name, layout=layout, threads=threads,
                                backend=fn.get_backend() if impl == "fastnorm" else "torch")
    x, y = digits
    if impl == "torch":
        if torch is None:
            pytest.skip("torch not installed")
        epoch = _torch_epoch(model_name, layout, x, y)
        with train._objects_frozen():  # the same collector as fastnorm's below
            epoch()  # warm-up: first-call costs (allocation, any JIT) are not timed
            benchmark.pedantic(epoch, rounds=5, iterations=1)
        return
    epoch = _fastnorm_epoch(model_name, layout, x, y)
    # BLAS on one thread, the older objects frozen for the collector and the steps'
    # thread count chosen by their speed (train.StepThreads: at most --threads), entered
    # once for the whole run as fit enters them (threadpoolctl takes ~0.8 ms per entry:
    # 2% of an epoch if entered per epoch; a full collection ~45 ms every 5-10 epochs)
    with train._blas_single_thread(), train._objects_frozen(), train.StepThreads() as st:
        epoch(st)
        benchmark.pedantic(epoch, args=(st,), rounds=5, iterations=1)
        benchmark.extra_info["step_seconds"] = {str(c): st.estimate(c) for c in st.counts}
