"""Norm benchmarks: fastnorm backends vs PyTorch vs a memory copy of the same bytes.

One pytest-benchmark group per (op, shape, layout, pass); in each group the
implementations are every compiled fastnorm backend, ``numpy`` (the reference, small
shapes only), ``torch`` (``torch.nn.functional``; NHWC as a channels-last view of the
same bytes) and ``copy`` (``np.copyto(out, x)``, the bandwidth yardstick).  Everything is
float32 on ``--threads`` threads (default 2) for fastnorm and PyTorch alike.

Passes: ``forward`` (training forward: batch statistics, running buffers updated for
BatchNorm), ``eval`` (BatchNorm with running statistics), ``fwd+bwd`` (the training
forward then the backward of a given dy: dx, dweight, dbias; PyTorch through autograd
with ``.backward(dy)``).  fastnorm's BatchNorm writes into preallocated ``out=`` buffers;
the other norms' functional API has no ``out=`` and allocates, as PyTorch does.

Calls of fastnorm and PyTorch interleaved one by one cost ~37% (two OpenMP runtimes,
see PITFALLS), so the tests are ordered implementation by implementation: all fastnorm
blocks, then numpy and copy, then all PyTorch blocks; each is called once before timing.

    python3 -m pytest benchmarks --benchmark-disable -q     # correctness smoke run
    python3 -m pytest benchmarks --benchmark-json=/tmp/bench.json -q
    python3 benchmarks/report.py /tmp/bench.json

Options: ``--threads N``; ``--quiet-wait S`` waits up to S seconds before each benchmark
for other processes to leave the CPUs idle.  Each timing records how many cores other
processes used meanwhile (``extra_info["other_cpu"]``); report.py marks busy timings and,
given several JSON files, keeps for each timing the run with the least other load.
"""
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import pytest

import fastnorm as fn
import fastnorm.functional as F

try:
    import torch
    import torch.nn.functional as TF
except ImportError:  # the fastnorm and copy benchmarks still run
    torch = None


@dataclass(frozen=True)
class Bench:
    op: str
    shape: tuple
    layout: str      # NCHW / NHWC, "-" for LayerNorm and RMSNorm
    passes: tuple
    arg: object = None   # num_groups, or the normalized last dimension

    @property
    def size(self):
        return math.prod(self.shape)

    def label(self, pass_):
        return f"{self.op} {'x'.join(map(str, self.shape))} {self.layout} {pass_}"


def _cases():
    """``fastnorm bench``'s case list (fastnorm.bench.all_cases), its "train" pass named
    "forward" here."""
    from fastnorm.bench import all_cases
    out = []
    for c in all_cases():
        passes = tuple("forward" if p == "train" else p for p in c.passes)
        arg = c.arg[-1] if isinstance(c.arg, tuple) else c.arg  # the last dimension
        out.append(Bench(c.op, c.shape, c.layout, passes, arg))
    return out


CASES = _cases()
NUMPY_MAX_SIZE = 1 << 17   # the reference backend runs on small shapes only
COMPILED = [b for b in fn.backends() if b != "numpy"]
IMPLS = COMPILED + ["numpy", "copy"] + (["torch"] if torch is not None else [])


def _params():
    out = []
    for impl in IMPLS:  # implementation outermost: each library timed in its own blocks
        for case in CASES:
            if impl == "numpy" and case.size > NUMPY_MAX_SIZE:
                continue
            for pass_ in case.passes:
                out.append(pytest.param(impl, case, pass_,
                                        id=f"{impl}-{case.label(pass_).replace(' ', '-')}"))
    return out


# ------------------------------------------------------------------------- data ----
def _channels(case):
    if case.layout == "-":
        return case.arg
    return case.shape[1] if case.layout == "NCHW" else case.shape[-1]


def _data(case):
    rng = np.random.default_rng(0)
    C = _channels(case)
    x = rng.standard_normal(case.shape, dtype=np.float32) * 2 + 0.5
    d = {"x": x, "dy": rng.standard_normal(case.shape, dtype=np.float32),
         "y": np.empty_like(x), "dx": np.empty_like(x),
         "weight": rng.uniform(0.5, 1.5, C).astype(np.float32),
         "bias": rng.standard_normal(C).astype(np.float32),
         "running_mean": np.zeros(C, np.float32), "running_var": np.ones(C, np.float32)}
    if case.op == "instance_norm":  # InstanceNorm2d's defaults: no affine, no buffers
        d["weight"] = d["bias"] = None
    if case.op == "rms_norm":
        d["bias"] = None
    return d


# -------------------------------------------------------------------- fastnorm ----
def _fastnorm_call(case, pass_, d):
    """A zero-argument callable running the pass, returning (y,) or (y, dx, dw, db)."""
    x, dy, w, b, L = d["x"], d["dy"], d["weight"], d["bias"], case.layout
    op = case.op
    if op == "batch_norm":
        rm, rv = d["running_mean"], d["running_var"]
        if pass_ == "forward":
            return lambda: (F.batch_norm(x, rm, rv, w, b, training=True, layout=L, out=d["y"]),)
        if pass_ == "eval":
            return lambda: (F.batch_norm(x, rm, rv, w, b, training=False, layout=L,
                                         out=d["y"]),)

        def fwd_bwd():
            y, mean, invstd = F.batch_norm_train(x, w, b, layout=L, out=d["y"])
            return (y, *F.batch_norm_backward(dy, x, mean, invstd, w, layout=L, out=d["dx"]))
        return fwd_bwd
    if op == "layer_norm":
        ns = (case.arg,)
        if pass_ == "forward":
            return lambda: (F.layer_norm(x, ns, w, b),)

        def fwd_bwd():
            y, mean, invstd = F.layer_norm_train(x, ns, w, b)
            return (y, *F.layer_norm_backward(dy, x, mean, invstd, ns, w))
        return fwd_bwd
    if op == "group_norm":
        G = case.arg
        if pass_ == "forward":
            return lambda: (F.group_norm(x, G, w, b, layout=L),)

        def fwd_bwd():
            y, mean, invstd = F.group_norm_train(x, G, w, b, layout=L)
            return (y, *F.group_norm_backward(dy, x, mean, invstd, G, w, layout=L))
        return fwd_bwd
    if op == "instance_norm":
        if pass_ == "forward":
            return lambda: (F.instance_norm(x, weight=w, bias=b, layout=L),)

        def fwd_bwd():
            y, mean, invstd = F.instance_norm_train(x, w, b, layout=L)
            return (y, *F.instance_norm_backward(dy, x, mean, invstd, w, layout=L))
        return fwd_bwd
    if op == "rms_norm":
        ns = (case.arg,)
        if pass_ == "forward":
            return lambda: (F.rms_norm(x, ns, w),)

        def fwd_bwd():
            y, invrms = F.rms_norm_train(x, ns, w)
            dx, dw = F.rms_norm_backward(dy, x, invrms, ns, w)
            return (y, dx, dw, None)
        return fwd_bwd
    raise ValueError(op)


# ----------------------------------------------------------------------- torch ----
def _to_torch(a, case):
    t = torch.from_numpy(a)
    return t.movedim(-1, 1) if case.layout == "NHWC" else t  # a channels-last view


def _from_torch(t, case):
    t = t.detach()
    return (t.movedim(1, -1) if case.layout == "NHWC" else t).numpy()


def _torch_call(case, pass_, d):
    train = pass_ != "eval"
    grad = pass_ == "fwd+bwd"
    xt = _to_torch(d["x"], case)
    dyt = _to_torch(d["dy"], case)
    params = {k: (None if d[k] is None else torch.from_numpy(d[k].copy()))
              for k in ("weight", "bias", "running_mean", "running_var")}
    wt, bt = params["weight"], params["bias"]
    if grad:
        xt = xt.detach().requires_grad_(True)
        for t in (wt, bt):
            if t is not None:
                t.requires_grad_(True)
    op = case.op

    def forward():
        if op == "batch_norm":
            return TF.batch_norm(xt, params["running_mean"], params["running_var"], wt, bt,
                                 training=train)
        if op == "layer_norm":
            return TF.layer_norm(xt, (case.arg,), wt, bt)
        if op == "group_norm":
            return TF.group_norm(xt, case.arg, wt, bt)
        if op == "instance_norm":
            return TF.instance_norm(xt, weight=wt, bias=bt)
        return TF.rms_norm(xt, (case.arg,), wt)

    if not grad:
        return lambda: (forward(),)

    def fwd_bwd():
        for t in (xt, wt, bt):
            if t is not None:
                t.grad = None  # like zero_grad(set_to_none=True): no accumulation pass
        y = forward()
        y.backward(dyt)
        return (y, xt.grad, None if wt is None else wt.grad, None if bt is None else bt.grad)
    return fwd_bwd


# ----------------------------------------------------------------------- check ----
def _reference(case, pass_, d):
    """The NumPy reference backend's result on fresh copies of the data."""
    ref = {k: (None if v is None else v.copy()) for k, v in d.items()}
    ref["running_mean"][:] = 0
    ref["running_var"][:] = 1
    with fn.use_backend("numpy"):
        return _fastnorm_call(case, pass_, ref)()


def _check(case, pass_, result, d):
    expected = _reference(case, pass_, d)
    for name, got, exp in zip(("y", "dx", "dweight", "dbias"), result, expected):
        if exp is None:
            continue
        got = np.asarray(got)
        scale = float(np.max(np.abs(exp)))
        np.testing.assert_allclose(got, exp, rtol=1e-3, atol=1e-3 * scale,
                                   err_msg=f"{case.label(pass_)}: {name}")


# ----------------------------------------------------------------------- bench ----
class _OtherCPU:
    """CPU used by *other* processes while a benchmark runs, in cores: the machine's busy
    time (/proc/stat) minus this process's CPU time.  With as many threads as cores, any
    other load makes each parallel region wait for a descheduled thread (times then come
    in multiples of the ~4 ms scheduler tick), so report.py flags such rows."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz  # all but idle and iowait
        t = os.times()
        return time.monotonic(), busy, t.user + t.system

    def cores(self):
        end = self._sample()
        if self.start is None or end is None or end[0] - self.start[0] < 0.05:
            return None
        wall = end[0] - self.start[0]
        other = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return round(max(other, 0.0) / wall, 2)



def _wait_until_quiet(timeout, threshold=0.1):
    """Wait (up to ``timeout`` s) for a 0.3 s window where other processes use less than
    ``threshold`` cores."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = _OtherCPU()
        time.sleep(0.3)
        other = probe.cores()
        if other is None or other < threshold:
            return


@pytest.mark.benchmark(max_time=0.5, min_rounds=5)
@pytest.mark.parametrize("impl,case,pass_", _params())
def test_norm(benchmark, threads, quiet_wait, impl, case, pass_):
    benchmark.group = case.label(pass_)
    benchmark.extra_info.update(op=case.op, shape=list(case.shape), layout=case.layout,
                                pass_=pass_, impl=impl, threads=threads, dtype="float32",
                                bytes=case.size * 4)
    busy = _OtherCPU()
    d = _data(case)
    _wait_until_quiet(quiet_wait)
    if impl == "copy":
        out = np.empty_like(d["x"])
        run = lambda: np.copyto(out, d["x"])  # noqa: E731
        run()
        benchmark(run)
        benchmark.extra_info["other_cpu"] = busy.cores()
        np.testing.assert_array_equal(out, d["x"])
        return
    if impl == "torch":
        run = _torch_call(case, pass_, d)
        result = [_from_torch(t, case) if t is not None and t.dim() == len(case.shape)
                  else (None if t is None else t.detach().numpy()) for t in run()]
        benchmark(run)
    else:
        with fn.use_backend(impl):
            run = _fastnorm_call(case, pass_, d)
            result = [None if r is None else np.array(r) for r in run()]
            benchmark(run)
    benchmark.extra_info["other_cpu"] = busy.cores()
    if not benchmark.enabled:  # --benchmark-disable: a correctness smoke run
        _check(case, pass_, result, d)
