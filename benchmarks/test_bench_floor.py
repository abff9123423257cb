"""The large BatchNorm rows against the memory-bandwidth floor, all measured in turns:
how far PyTorch and fastnorm are from the fastest any implementation could run here.

For each BatchNorm row of the norm suite over 8 MB per array (forward, eval,
forward+backward), three processes take turns, one call each per round, 50 ms apart
(as in test_bench_train.py, for the same reasons: this VM's memory bandwidth changes from
minute to minute, and two OpenMP runtimes in one process slow each other):

- ``floor``: the passes the row cannot avoid, at the bandwidth, from
  ``benchmarks/bandwidth_floor.c`` (compiled here with gcc): AVX loads and streaming
  stores on all threads. Forward: read x (the statistics), then read x and write y;
  eval: read x and write y; forward+backward: those two, then read dy and x (the
  gradient sums), then read dy and x and write dx.  No library can read or write less:
  the statistics are needed before y, the sums before dx, and at these sizes nothing
  stays in the cache from one pass to the next.
- ``fastnorm`` (the default backend, with ``out=`` buffers) and ``torch``: the norm
  suite's calls (``test_bench_norms._fastnorm_call`` / ``_torch_call``).

pytest-benchmark times fastnorm's requests from this process; the ratios use the times
each process measured around its own call (``extra_info``: ``seconds`` per
implementation, ``torch_over_floor`` = the most any library could be faster than
PyTorch on the row, ``torch_over_fastnorm``, ``floor_over_fastnorm`` = fastnorm's
fraction of the floor).  The ratios of medians are printed at the end of the run.

    python3 -m pytest benchmarks/test_bench_floor.py -q
"""
import ctypes
import importlib.util
import os
import pathlib
import shutil
import statistics
import subprocess
import time

import numpy as np
import pytest

from test_bench_norms import CASES, _data, _fastnorm_call, _torch_call
from turns import spawn

ROUNDS = 25
GAP = 0.05  # seconds before each call
ROWS = [(case, pass_) for case in CASES
        if case.op == "batch_norm" and case.size * 4 > 8 << 20 for pass_ in case.passes]
FLOOR_PASSES = {"eval": (1,), "forward": (0, 1), "fwd+bwd": (0, 1, 2, 3)}
HAVE_TORCH = importlib.util.find_spec("torch") is not None
SOURCE = pathlib.Path(__file__).with_name("bandwidth_floor.c")


def _aligned(n):
    """n float32 values at a 64-byte boundary (the floor's AVX loads and streams)."""
    raw = np.empty(n + 16, np.float32)
    k = (-raw.ctypes.data % 64) // 4
    a = raw[k:k + n]
    a[:] = 1.0
    return a


def _floor_call(lib, case, pass_, arrays):
    n = case.size // 8 * 8
    if case.size not in arrays:
        arrays.clear()
        arrays[case.size] = [_aligned(n) for _ in range(3)]
    a, b, c = (v.ctypes.data_as(ctypes.c_void_p) for v in arrays[case.size])

    def run():
        for kind in FLOOR_PASSES[pass_]:
            lib.floor_pass(kind, a, b, c, n)
    return run


def _serve(impl, threads, floor_lib, conn):
    """A process running one implementation: per request (row index), one call, timed
    here; the first request of a row also makes its data and calls once untimed."""
    if impl == "floor":
        os.environ["OMP_NUM_THREADS"] = str(threads)  # before libgomp starts
        lib = ctypes.CDLL(floor_lib)
        lib.floor_pass.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_long]
        lib.floor_pass.restype = ctypes.c_float
    from fastnorm.train import keep_freed_memory
    keep_freed_memory()  # as the norm suite: freed outputs reused, no page faults
    if impl == "torch":
        import torch
        torch.set_num_threads(threads)
    elif impl == "fastnorm":
        import fastnorm
        fastnorm.set_num_threads(threads)
    current, run, arrays = None, None, {}
    conn.send("ready")
    while True:
        i = conn.recv()
        if i is None:
            return
        if i != current:
            case, pass_ = ROWS[i]
            if impl == "floor":
                run = _floor_call(lib, case, pass_, arrays)
            else:
                d = _data(case)
                run = (_torch_call if impl == "torch" else _fastnorm_call)(case, pass_, d)
            run()
            current = i
        t0 = time.perf_counter()
        run()
        conn.send(time.perf_counter() - t0)


class _Impl:
    def __init__(self, impl, threads, floor_lib):
        self.impl = impl
        self.conn, self.proc = spawn(_serve, (impl, threads, floor_lib), impl)
        self.seconds = []

    def call(self, i):
        """One call of row i there; its time, as measured there, is kept."""
        self.conn.send(i)
        self.seconds.append(self.conn.recv())

    def close(self):
        self.conn.send(None)
        self.proc.join(30)


@pytest.fixture(scope="module")
def floor_lib(tmp_path_factory):
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        pytest.skip("needs gcc to build benchmarks/bandwidth_floor.c")
    out = tmp_path_factory.mktemp("floor") / "floor.so"
    subprocess.run([cc, "-O3", "-mavx2", "-fopenmp", "-shared", "-fPIC", "-DFLOOR_LIBRARY",
                    str(SOURCE), "-o", str(out)], check=True)
    return str(out)


@pytest.fixture(scope="module")
def impls(threads, floor_lib):
    names = ["floor", "fastnorm"] + (["torch"] if HAVE_TORCH else [])
    started = []
    try:
        for name in names:
            started.append(_Impl(name, threads, floor_lib))
        yield {p.impl: p for p in started}
    finally:
        for p in started:
            p.close()


@pytest.mark.parametrize("i", range(len(ROWS)),
                         ids=[c.label(p).replace(" ", "-") for c, p in ROWS])
def test_floor_in_turns(benchmark, threads, summary, impls, i):
    import fastnorm as fn

    case, pass_ = ROWS[i]
    benchmark.group = "floor " + case.label(pass_)
    benchmark.extra_info.update(row=case.label(pass_), impl="fastnorm", threads=threads,
                                backend=fn.get_backend())
    for p in impls.values():
        p.seconds = []
    others = [p for name, p in impls.items() if name != "fastnorm"]

    def other_turns():  # untimed by pytest-benchmark, timed in their processes
        for p in others:
            time.sleep(GAP)
            p.call(i)
        time.sleep(GAP)

    benchmark.pedantic(impls["fastnorm"].call, args=(i,), setup=other_turns,
                       rounds=ROUNDS, iterations=1)
    med = {name: statistics.median(p.seconds) for name, p in impls.items()}
    assert len(impls["fastnorm"].seconds) == ROUNDS
    extra = {"seconds": {name: p.seconds for name, p in impls.items()},
             "floor_over_fastnorm": med["floor"] / med["fastnorm"]}
    line = (f"{case.label(pass_)}: fastnorm at {extra['floor_over_fastnorm']:.2f} of the "
            f"floor")
    if "torch" in med:
        extra["torch_over_floor"] = med["torch"] / med["floor"]
        extra["torch_over_fastnorm"] = med["torch"] / med["fastnorm"]
        line += (f", PyTorch at {med['floor'] / med['torch']:.2f}; PyTorch / floor "
                 f"{extra['torch_over_floor']:.2f}, PyTorch / fastnorm "
                 f"{extra['torch_over_fastnorm']:.2f}")
    line += " (medians: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in med.items()) + ")"
    benchmark.extra_info.update(extra)
    summary(line)
