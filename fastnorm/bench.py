"""``fastnorm bench``: the normalization benchmark suite against PyTorch and memory bandwidth.

Each case is timed for every compiled backend, for a plain copy of the same bytes
(``np.copyto``: the bandwidth yardstick, measured in the same run) and, when it can be
imported, for ``torch.nn.functional`` on the same number of threads.  All fastnorm
timings of a thread count run in one block and all PyTorch timings in another: calls of
the two libraries interleaved one by one cost ~37% (each brings its own OpenMP runtime).

The bound of a pass is the copy time times the passes over x it cannot avoid: one read and
one write (1 copy) for a forward, two reads and one write of x-sized arrays (1.5 copies)
for a backward, so 2.5 copies for forward+backward; "of bound" is that bound divided by
the measured time (1.0: at the bandwidth limit), as in benchmarks/report.py.
"""
import json
import math
import time
from dataclasses import dataclass

import numpy as np

COPIES = {"train": 1.0, "eval": 1.0, "fwd+bwd": 2.5}


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple
    layout: str
    passes: tuple
    arg: object = None  # num_groups / normalized_shape

    @property
    def label(self):
        return f"{self.op} {'x'.join(map(str, self.shape))} {self.layout}"


def _bn_cases():
    for shape in [(32, 16, 8, 8), (8, 256, 14, 14), (64, 64, 56, 56), (256, 32, 28, 28),
                  (128, 512)]:
        for layout in ("NCHW", "NHWC"):  # (N, C): the same array, the column kernels both
            nhwc = (shape[0], *shape[2:], shape[1])
            yield Case("batch_norm", shape if layout == "NCHW" else nhwc, layout,
                       ("train", "eval", "fwd+bwd"))


def all_cases():
    """The issue's case list, shared with benchmarks/test_bench_norms.py."""
    cases = list(_bn_cases())
    for shape in [(64, 128, 768), (4096, 1024), (8, 1048576), (32, 16)]:
        cases.append(Case("layer_norm", shape, "-", ("train", "fwd+bwd"), (shape[-1],)))
    for layout in ("NCHW", "NHWC"):
        s = (16, 256, 28, 28) if layout == "NCHW" else (16, 28, 28, 256)
        cases.append(Case("group_norm", s, layout, ("train", "fwd+bwd"), 32))
        s = (16, 64, 64, 64)
        cases.append(Case("instance_norm", s, layout, ("train", "fwd+bwd")))
    cases.append(Case("rms_norm", (64, 128, 768), "-", ("train", "fwd+bwd"), (768,)))
    return cases


QUICK = {("batch_norm", (32, 16, 8, 8)), ("batch_norm", (64, 64, 56, 56)),
         ("batch_norm", (64, 56, 56, 64)), ("batch_norm", (128, 512)),
         ("layer_norm", (64, 128, 768)), ("group_norm", (16, 256, 28, 28)),
         ("instance_norm", (16, 64, 64, 64)), ("rms_norm", (64, 128, 768))}


def _channels(case):
    if case.op in ("layer_norm", "rms_norm"):
        return case.arg
    return (case.shape[1] if case.layout == "NCHW" else case.shape[-1],)


def _median_time(fn, budget, min_reps=5, max_reps=200):
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    reps = int(min(max_reps, max(min_reps, budget / one)))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _fastnorm_fns(case, x, dy, w, b):
    """Callables per pass for the current backend, with preallocated outputs."""
    import fastnorm.functional as F

    y = np.empty_like(x)
    dx = np.empty_like(x)
    if case.op == "batch_norm":
        lay = case.layout
        _, mean, invstd = F.batch_norm_train(x, w, b, layout=lay)

        def fb():
            _, m, s = F.batch_norm_train(x, w, b, layout=lay, out=y)
            F.batch_norm_backward(dy, x, m, s, w, layout=lay, out=dx)
        return {"train": lambda: F.batch_norm_train(x, w, b, layout=lay, out=y),
                "eval": lambda: F.batch_norm_eval(x, mean, invstd, w, b, layout=lay, out=y),
                "fwd+bwd": fb}
    if case.op == "layer_norm":
        ns = case.arg

        def fb():
            _, m, s = F.layer_norm_train(x, ns, w, b)
            F.layer_norm_backward(dy, x, m, s, ns, w)
        return {"train": lambda: F.layer_norm_train(x, ns, w, b), "fwd+bwd": fb}
    if case.op == "rms_norm":
        ns = case.arg

        def fb():
            _, r = F.rms_norm_train(x, ns, w)
            F.rms_norm_backward(dy, x, r, ns, w)
        return {"train": lambda: F.rms_norm_train(x, ns, w), "fwd+bwd": fb}
    if case.op == "group_norm":
        G, lay = case.arg, case.layout

        def fb():
            _, m, s = F.group_norm_train(x, G, w, b, layout=lay)
            F.group_norm_backward(dy, x, m, s, G, w, layout=lay)
        return {"train": lambda: F.group_norm_train(x, G, w, b, layout=lay), "fwd+bwd": fb}
    lay = case.layout

    def fb():
        _, m, s = F.instance_norm_train(x, w, b, layout=lay)
        F.instance_norm_backward(dy, x, m, s, w, layout=lay)
    return {"train": lambda: F.instance_norm_train(x, w, b, layout=lay), "fwd+bwd": fb}


def _torch_fns(case, x, dy, w, b):
    import torch
    import torch.nn.functional as TF

    xt = torch.from_numpy(x)
    if case.layout == "NHWC":  # torch's channels_last memory format, same bytes
        xt = xt.permute(0, x.ndim - 1, *range(1, x.ndim - 1))
    dyt = torch.from_numpy(dy)
    if case.layout == "NHWC":
        dyt = dyt.permute(0, x.ndim - 1, *range(1, x.ndim - 1))
    wt, bt = torch.from_numpy(w), torch.from_numpy(b)
    C = w.size
    rm, rv = torch.zeros(C), torch.ones(C)

    def fwd(xin):
        if case.op == "batch_norm":
            return TF.batch_norm(xin, rm, rv, wt_g, bt_g, training=True)
        if case.op == "layer_norm":
            return TF.layer_norm(xin, case.arg, wt_g, bt_g)
        if case.op == "rms_norm":
            return TF.rms_norm(xin, case.arg, wt_g)
        if case.op == "group_norm":
            return TF.group_norm(xin, case.arg, wt_g, bt_g)
        return TF.instance_norm(xin, weight=wt_g, bias=bt_g, use_input_stats=True)

    wt_g = wt.clone().requires_grad_(True)
    bt_g = bt.clone().requires_grad_(True)
    xg = xt.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)

    def fb():
        xg.grad = None
        wt_g.grad = None
        bt_g.grad = None
        fwd(xg).backward(dyt)

    def train():
        with torch.no_grad():
            fwd(xt)

    fns = {"train": train, "fwd+bwd": fb}
    if case.op == "batch_norm":
        def ev():
            with torch.no_grad():
                TF.batch_norm(xt, rm, rv, wt, bt, training=False)
        fns["eval"] = ev
    return fns


def _inputs(case, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case.shape, dtype=np.float32)
    dy = rng.standard_normal(case.shape, dtype=np.float32)
    cshape = _channels(case)
    w = rng.uniform(0.5, 1.5, cshape).astype(np.float32)
    b = rng.standard_normal(cshape).astype(np.float32)
    return x, dy, w, b


def run(cases, backends, threads=(2,), budget=0.3, use_torch=True, log=print):
    """Time every case; returns a list of result dicts.  glibc's malloc thresholds are
    fixed first (``train.keep_freed_memory``), as the pytest suite does, so that neither
    library's fresh outputs fault in new pages on some rows and not on others
    (docs/performance.md, "Page faults on fresh large outputs")."""
    import fastnorm as fn
    from .train import keep_freed_memory

    keep_freed_memory()

    torch = None
    if use_torch:
        try:
            import torch  # noqa: F811
        except ImportError:
            torch = None
    results = []
    for nt in threads:
        fn.set_num_threads(nt)
        rows = {}
        for case in cases:  # fastnorm block
            x, dy, w, b = _inputs(case)
            copy = np.empty_like(x)
            t_copy = _median_time(lambda: np.copyto(copy, x), budget)
            for backend in backends:
                with fn.use_backend(backend):
                    fns = _fastnorm_fns(case, x, dy, w, b)
                    for p in case.passes:
                        rows[(case, p, backend)] = _median_time(fns[p], budget)
            rows[(case, "copy")] = t_copy
            log(f"  timed {case.label} ({nt} threads)")
        if torch is not None:  # PyTorch block
            torch.set_num_threads(nt)
            for case in cases:
                x, dy, w, b = _inputs(case)
                fns = _torch_fns(case, x, dy, w, b)
                for p in case.passes:
                    rows[(case, p, "torch")] = _median_time(fns[p], budget)
        for case in cases:
            t_copy = rows[(case, "copy")]
            nbytes = int(np.prod(case.shape)) * 4
            for p in case.passes:
                t_torch = rows.get((case, p, "torch"))
                for backend in backends:
                    t = rows[(case, p, backend)]
                    results.append({
                        "op": case.op, "shape": list(case.shape), "layout": case.layout,
                        "pass": p, "threads": nt, "backend": backend, "seconds": t,
                        "gbps": COPIES[p] * 2 * nbytes / t / 1e9,
                        "of_bound": COPIES[p] * t_copy / t,
                        "copy_seconds": t_copy, "torch_seconds": t_torch,
                        "speedup_vs_torch": (t_torch / t) if t_torch else None})
    return results


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def format_table(results):
    lines = ["| op | shape | layout | pass | threads | backend | time | GB/s | of bound | "
             "torch | speedup |", "|" + "---|" * 11]
    for r in results:
        t = r["seconds"]
        tt = r["torch_seconds"]
        lines.append(
            f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['layout']} | {r['pass']} | "
            f"{r['threads']} | {r['backend']} | {_fmt(t)} | {r['gbps']:.1f} | "
            f"{r['of_bound']:.2f} | {_fmt(tt) if tt else '-'} | "
            f"{(str(round(r['speedup_vs_torch'], 2)) + 'x') if tt else '-'} |")
    for backend in sorted({r["backend"] for r in results}):
        for nt in sorted({r["threads"] for r in results}):
            sel = [r for r in results if r["backend"] == backend and r["threads"] == nt]
            sp = geomean([r["speedup_vs_torch"] for r in sel])
            if sp == sp:  # not NaN: PyTorch was timed
                lines.append(f"\ngeomean speedup vs torch, {backend}, {nt} threads: "
                             f"{sp:.2f}x over {len(sel)} cases")
    return "\n".join(lines)


def _fmt(t):
    return f"{t * 1e3:.3f} ms" if t >= 1e-3 else f"{t * 1e6:.1f} us"


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'fastnorm[plot]'") from None
    sel = [r for r in results if r["speedup_vs_torch"]]
    labels = [f"{r['op']} {'x'.join(map(str, r['shape']))} {r['layout']} {r['pass']} "
              f"{r['backend']} {r['threads']}t" for r in sel]
    fig, ax = plt.subplots(figsize=(9, max(3, 0.22 * len(sel))))
    ax.barh(range(len(sel)), [r["speedup_vs_torch"] for r in sel])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(sel)), labels, fontsize=6)
    ax.set_xlabel("speedup vs PyTorch (same threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def save_json(results, path):
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
