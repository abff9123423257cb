"""Markdown table of a norm benchmark run.

    python3 -m pytest benchmarks --benchmark-json=/tmp/bench.json -q
    python3 benchmarks/report.py /tmp/bench.json

One row per (op, shape, layout, pass): the median time of each fastnorm backend, of
PyTorch and of the copy of x; fastnorm's speedup over PyTorch (torch time / fastnorm
time, > 1 is faster) and its fraction of the bandwidth bound (bound / time, 1 = as fast
as the memory traffic the pass cannot avoid).  The bound is the copy time times the
copies a pass needs: a forward reads and writes x once (1 copy), so does eval (1 copy);
forward+backward is 5 passes over x-sized arrays (forward read + write, backward reads x
and dy and writes dx) = 2.5 copies.  Geometric means close the table.
"""
import argparse
import json
import math
import sys
from collections import defaultdict

COPIES = {"forward": 1.0, "eval": 1.0, "fwd+bwd": 2.5}
PASS_ORDER = {"forward": 0, "eval": 1, "fwd+bwd": 2}
BACKEND_ORDER = ["cython", "numba", "numpy"]


def _fmt_time(seconds):
    if seconds is None:
        return "–"
    if seconds < 1e-5:
        return f"{seconds * 1e6:.2g} µs"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1e3:.3g} ms"


def _fmt_ratio(r):
    return "–" if r is None else f"{r:.2f}"


def _geomean(values):
    values = [v for v in values if v is not None and v > 0]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def load(paths, stat="median"):
    """Timings of one or more runs.  With several files, each (row, implementation) takes
    the timing measured while other processes used the least CPU, and of runs equally
    quiet (within 0.05 cores) the fastest: on a shared machine, re-run and pass all the
    files (noise from outside the machine, such as a busy host, only ever slows a run)."""
    if isinstance(paths, str):
        paths = [paths]
    first = None
    rows = defaultdict(dict)   # (op, shape, layout, pass) -> impl -> seconds
    loads = defaultdict(dict)  # same key -> impl -> cores used by other processes
    threads = set()
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        first = first or data
        for b in data["benchmarks"]:
            info = b.get("extra_info", {})
            if "op" not in info:
                continue
            key = (info["op"], tuple(info["shape"]), info["layout"], info["pass_"])
            impl = info["impl"]
            other = info.get("other_cpu")
            other = float("inf") if other is None else other
            if (impl not in rows[key] or other < loads[key][impl] - 0.05
                    or (other <= loads[key][impl] + 0.05
                        and b["stats"][stat] < rows[key][impl])):
                rows[key][impl] = b["stats"][stat]
                loads[key][impl] = other
            threads.add(info.get("threads"))
    first["_loads"] = {k: {i: v for i, v in r.items() if v != float("inf")}
                       for k, r in loads.items()}
    first["_files"] = list(paths)
    return first, rows, threads


def table(rows, loads=None):
    """Markdown lines of the table (rows sorted by op, shape, layout, pass); a time
    measured while other processes used more than BUSY cores is marked *."""
    loads = loads or {}
    impls = {i for r in rows.values() for i in r}
    backends = [b for b in BACKEND_ORDER if b in impls]
    compiled = [b for b in backends if b != "numpy"]
    head = (["op", "shape", "layout", "pass"] + [f"{b}" for b in backends]
            + ["torch", "copy"] + [f"×torch {b}" for b in compiled]
            + [f"of bound {b}" for b in compiled] + ["of bound torch"])
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|"]
    speedups = defaultdict(list)   # (backend, pass) -> values
    bounds = defaultdict(list)
    order = sorted(rows, key=lambda k: (k[0], k[1], k[2], PASS_ORDER.get(k[3], 9)))
    for key in order:
        op, shape, layout, pass_ = key
        r = rows[key]
        torch_t, copy_t = r.get("torch"), r.get("copy")
        bound = None if copy_t is None else copy_t * COPIES.get(pass_, 1.0)
        cells = [op, "×".join(map(str, shape)), layout, pass_]
        busy = loads.get(key, {})

        def cell(impl):
            mark = "*" if (busy.get(impl) or 0) > BUSY else ""
            return _fmt_time(r.get(impl)) + mark
        cells += [cell(b) for b in backends]
        cells += [cell("torch"), cell("copy")]
        for b in compiled:
            s = None if torch_t is None or r.get(b) is None else torch_t / r[b]
            speedups[(b, pass_)].append(s)
            cells.append(_fmt_ratio(s))
        for b in compiled + ["torch"]:
            t = r.get(b)
            f = None if bound is None or t is None else bound / t
            bounds[(b, pass_)].append(f)
            cells.append(_fmt_ratio(f))
        lines.append("| " + " | ".join(cells) + " |")
    passes = sorted({k[3] for k in rows}, key=lambda p: PASS_ORDER.get(p, 9))
    for label, selected in [(f"geomean {p}", [p]) for p in passes] + [("geomean all", passes)]:
        cells = [f"**{label}**", "", "", ""] + [""] * (len(backends) + 2)
        for b in compiled:
            cells.append("**" + _fmt_ratio(_geomean(
                [v for p in selected for v in speedups[(b, p)]])) + "**")
        for b in compiled + ["torch"]:
            cells.append("**" + _fmt_ratio(_geomean(
                [v for p in selected for v in bounds[(b, p)]])) + "**")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def header(data, threads, stat="median"):
    m = data.get("machine_info", {})
    c = data.get("commit_info", {})
    cpu = m.get("cpu", {})
    cpu_name = cpu.get("brand_raw") or m.get("processor") or "?"
    when = data.get("datetime", "?")
    commit = c.get("id", "?")[:10] + (" (dirty)" if c.get("dirty") else "")
    th = ", ".join(str(t) for t in sorted(t for t in threads if t is not None)) or "?"
    return [
        f"Norm benchmarks, float32, {th} thread(s) for fastnorm and PyTorch "
        f"(`fastnorm.set_num_threads`, `torch.set_num_threads`).",
        f"Run {when} on {cpu_name} ({cpu.get('count', '?')} CPUs), Python "
        f"{m.get('python_version', '?')}, commit {commit}.",
        "",
        "How it was run: `python3 -m pytest benchmarks --benchmark-json=FILE` "
        f"(pytest-benchmark, {stat} of the rounds, at most 0.5 s per implementation).  Each "
        "implementation is timed in its own block, one test per implementation, and the "
        "tests run implementation by implementation (all fastnorm backends, then numpy and "
        "copy, then all PyTorch), so fastnorm and PyTorch calls are never interleaved (two "
        "OpenMP runtimes: ~37% lost when they are); each is called once before timing.  "
        "fastnorm BatchNorm uses preallocated `out=` buffers; PyTorch NHWC is a "
        "channels-last view of the same bytes; PyTorch forward+backward is the forward with "
        "`requires_grad` then `.backward(dy)` (grads set to None between rounds).",
        "",
        *_load_note(data, threads),
        f"Columns: {stat} times; ×torch = torch time / fastnorm time (> 1: fastnorm faster); "
        "of bound = (copy time × copies of the pass) / time, with 1 copy for forward and "
        "eval and 2.5 copies for forward+backward.  The copy is `np.copyto`, one thread: "
        "kernels on more threads can beat it on large arrays (of bound > 1).",
        "",
    ]


BUSY = 0.25  # cores used by other processes above which a timing is flagged


def _load_note(data, threads):
    """How busy the machine was with other processes during the run."""
    loads = [v for r in (data.get("_loads") or {}).values() for v in r.values()]
    if not loads:
        return []
    busy = sum(v > BUSY for v in loads)
    note = (f"Other processes used {min(loads):.2f} to {max(loads):.2f} cores (median "
            f"{sorted(loads)[len(loads) // 2]:.2f}) during the timings; {busy} of "
            f"{len(loads)} timings ran with more than {BUSY} core busy elsewhere and are "
            f"marked *: with as many threads as cores each parallel region then waits for a "
            f"descheduled thread (multiples of the ~4 ms scheduler tick), so those times "
            f"are inflated.")
    files = data.get("_files") or []
    if len(files) > 1:
        note += (f"  Timings merged from {len(files)} runs, each from the run with the least "
                 f"other load, the fastest of equally quiet runs (each implementation's best "
                 f"of {len(files)}).")
    return [note, ""]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+",
                        help="file(s) written by pytest --benchmark-json; with several, each "
                             "timing is taken from the run where the machine was least busy, "
                             "the fastest of equally quiet runs")
    parser.add_argument("--stat", default="median", choices=["median", "min", "mean"],
                        help="which statistic of the rounds (default: median; min is the "
                             "most robust on a busy machine)")
    args = parser.parse_args(argv)
    data, rows, threads = load(args.json, args.stat)
    if not rows:
        print(f"{' '.join(args.json)}: no norm benchmarks found", file=sys.stderr)
        return 1
    print("\n".join(header(data, threads, args.stat) + table(rows, data["_loads"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
