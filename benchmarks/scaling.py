"""Markdown table of thread scaling, 1 -> 2 threads, from ``fastnorm bench`` runs.

    fastnorm bench --threads 1,2 --json /tmp/scaling.json      # repeat to merge runs
    python3 benchmarks/scaling.py /tmp/scaling.json [/tmp/scaling2.json ...]

One row per (op, shape, layout, pass, backend): the time on 1 and on 2 threads (each the
fastest of the runs given), the speedup (1-thread time / 2-thread time) and PyTorch's on
the same case.
"""
import json
import math
import sys

from fastnorm.bench import geomean


def _fmt(seconds):
    return f"{seconds * 1e6:.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.3f} ms"


def load(paths):
    best = {}   # (op, shape, layout, pass, backend, threads) -> seconds
    torch = {}  # (op, shape, layout, pass, threads) -> seconds
    order = []
    for path in paths:
        with open(path) as f:
            for r in json.load(f):
                case = (r["op"], tuple(r["shape"]), r["layout"], r["pass"])
                key = case + (r["backend"], r["threads"])
                if case + (r["backend"],) not in order:
                    order.append(case + (r["backend"],))
                best[key] = min(best.get(key, math.inf), r["seconds"])
                if r.get("torch_seconds"):
                    tk = case + (r["threads"],)
                    torch[tk] = min(torch.get(tk, math.inf), r["torch_seconds"])
    return best, torch, order


def table(best, torch, order):
    lines = ["| op | shape | layout | pass | backend | 1 thread | 2 threads | speedup | "
             "torch 1 → 2 |", "|---|---|---|---|---|---:|---:|---:|---:|"]
    speedups = {}
    for row in order:
        *case, backend = row
        t1, t2 = best.get(row + (1,)), best.get(row + (2,))
        if t1 is None or t2 is None:
            continue
        tt1, tt2 = torch.get(tuple(case) + (1,)), torch.get(tuple(case) + (2,))
        ts = f"{tt1 / tt2:.2f}x" if tt1 and tt2 else "–"
        speedups.setdefault(backend, []).append(t1 / t2)
        op, shape, layout, pass_ = case
        lines.append(f"| {op} | {'x'.join(map(str, shape))} | {layout} | {pass_} | {backend} "
                     f"| {_fmt(t1)} | {_fmt(t2)} | {t1 / t2:.2f}x | {ts} |")
    lines.append("")
    for backend, s in speedups.items():
        lines.append(f"Geomean speedup 1 → 2 threads, {backend}: {geomean(s):.2f}x over "
                     f"{len(s)} rows.")
    return "\n".join(lines)


def main(argv=None):
    paths = (argv if argv is not None else sys.argv[1:])
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    print(table(*load(paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
