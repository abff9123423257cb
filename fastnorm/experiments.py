"""Testing the reference notes' claims about BatchNorm on scikit-learn's 8x8 digits.

``fastnorm experiments`` (or ``run_all``) runs one experiment per claim and writes
``experiments.md`` with tables and ``experiments_*.png`` plots (matplotlib, the ``plot``
extra):

1. ``claim1_convergence``: BatchNorm speeds up convergence.
2. ``claim2_lr_init``: BatchNorm tolerates much higher learning rates and poorer
   initialisation.
3. ``claim3_batch_size``: BatchNorm degrades below a batch of 16, markedly below 8, while
   GroupNorm and LayerNorm do not.
4. ``claim4_inference``: inference needs running statistics, because a single sample has
   no batch.

Every training run is ``train.build_model`` + ``train.fit`` from ``fastnorm.manual_seed``
with one thread, so a run is a deterministic function of its settings: its first k
epochs are those of the same run trained for longer, which lets experiments share runs
(``_Runner`` caches them) and lets runs go to worker processes (``jobs``) without
changing a number.  Each claim function returns a dict of plain data (``rows``,
``curves``, ``table`` in Markdown, ``verdict``, ``findings``); verdicts come from fixed
rules on the numbers, stated in the text, so a quick run may reach other verdicts.
"""
import copy
import math
import os
import time

import numpy as np

DEFAULT_SEEDS = (0, 1, 2)
TARGET = 0.95  # test accuracy that counts as "converged"
FAIL_ACC = 0.2  # a final test accuracy at or below this (chance is 0.1) counts as failed
NORM_LABEL = {"batch": "BatchNorm", "none": "no norm", "group": "GroupNorm",
              "layer": "LayerNorm"}
PLOTS = {1: ("experiments_convergence.png",), 2: ("experiments_lr.png", "experiments_init.png"),
         3: ("experiments_batch_size.png",), 4: ("experiments_inference.png",)}

FULL = {
    1: {"models": ("cnn", "mlp"), "optimizers": (("sgd", 0.01), ("adam", 1e-3)),
        "epochs": 15, "batch_size": 32},
    2: {"models": ("cnn", "mlp"), "lrs": (0.01, 0.03, 0.1, 0.3, 0.5, 1.0, 2.0), "epochs": 8,
        "scales": (0.1, 1.0, 10.0), "init_optimizers": (("sgd", 0.01), ("adam", 1e-3)),
        "batch_size": 32},
    3: {"models": ("cnn", "mlp"), "norms": ("batch", "group", "layer"),
        "batch_sizes": (2, 4, 8, 16, 32, 64), "epochs": 5, "optimizer": ("adam", 1e-3)},
    4: {"models": ("cnn", "mlp"), "epochs": 10, "batch_size": 32, "optimizer": ("adam", 1e-3),
        "test_batches": (1, 2, 4, 8, 32, 359), "companions": (2, 8, 32), "probes": 50,
        "sets": 10, "other_classes": 3},
}
QUICK = {
    1: {"epochs": 3},
    2: {"lrs": (0.01, 0.1, 1.0), "epochs": 3, "scales": (0.1, 1.0, 10.0),
        "init_optimizers": (("sgd", 0.01),)},
    3: {"batch_sizes": (2, 8, 32), "epochs": 2},
    4: {"epochs": 3, "test_batches": (1, 2, 8, 359), "companions": (2, 8), "probes": 20,
        "sets": 5, "other_classes": 2},
}


class ExperimentError(ValueError):
    """Settings the experiments cannot use."""


def settings(claim, quick=False, **overrides):
    """The settings of one claim's experiment: the full ones, the quick ones, then
    ``overrides`` (e.g. ``models=("mlp",), epochs=1`` for a test)."""
    s = dict(FULL[claim])
    if quick:
        s.update(QUICK[claim])
    bad = set(overrides) - set(s)
    if bad:
        raise ExperimentError(f"claim {claim}: unknown settings {sorted(bad)}; "
                              f"expected some of {sorted(s)}")
    s.update(overrides)
    return s


# ----------------------------------------------------------------------- running ----
_DATA = None


def _digits():
    global _DATA
    if _DATA is None:
        from . import data
        _DATA = data.load_digits()
    return _DATA


def _silent(*args, **kwargs):
    pass


def _init_worker():
    import fastnorm as fn
    fn.set_num_threads(1)
    np.seterr(all="ignore")


def _spec(model, norm, optimizer, lr, seed, epochs, batch_size=32, init_scale=1.0):
    return {"model": model, "norm": norm, "optimizer": optimizer, "lr": float(lr),
            "seed": int(seed), "epochs": int(epochs), "batch_size": int(batch_size),
            "init_scale": float(init_scale)}


def _key(spec):
    return tuple(sorted((k, v) for k, v in spec.items() if k != "epochs"))


def _cost(spec):
    per_epoch = (0.15 + 1.7 / spec["batch_size"]) if spec["model"] == "cnn" else \
        (0.03 + 0.5 / spec["batch_size"])
    return spec["epochs"] * per_epoch


def rescale_weights(model, scale):
    """Multiply the weight of every Linear and Conv2d by ``scale`` in place (biases and
    norm parameters untouched): a poorer initialisation than the default."""
    import fastnorm as fn
    from . import nn

    with fn.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.data *= np.asarray(scale, m.weight.data.dtype)
    return model


def train_run(spec):
    """Train one model from ``spec`` (see ``_spec``); returns ``{"spec", "history",
    "error", "seconds"}`` where ``history`` has one dict per epoch (train_loss, train_acc,
    test_loss, test_acc).  A run that raises keeps the message in ``error``."""
    import fastnorm as fn
    from . import train

    (xtr, ytr), (xte, yte) = _digits()
    fn.manual_seed(spec["seed"])
    model = train.build_model(spec["model"], spec["norm"])
    if spec["init_scale"] != 1.0:
        rescale_weights(model, spec["init_scale"])
    t0 = time.perf_counter()
    error = None
    history = []
    with np.errstate(all="ignore"):
        try:
            history = train.fit(model, (xtr, ytr), (xte, yte), epochs=spec["epochs"],
                                batch_size=spec["batch_size"], lr=spec["lr"],
                                optimizer=spec["optimizer"], progress=False, log=_silent)
        except (ValueError, ArithmeticError, RuntimeError) as e:
            error = f"{type(e).__name__}: {e}"
    keep = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc")
    return {"spec": dict(spec), "history": [{k: h[k] for k in keep} for h in history],
            "error": error, "seconds": time.perf_counter() - t0}


class _Runner:
    """Runs training specs once each (serially or in ``jobs`` spawned processes), caches
    them by everything but ``epochs`` and serves shorter requests from longer runs."""

    def __init__(self, jobs=1, log=print):
        self.jobs = max(1, int(jobs))
        self.log = log
        self.cache = {}
        self.pool = None
        self.trained = 0
        self._threads = None

    def __enter__(self):
        import fastnorm as fn
        self._threads = fn.get_num_threads()
        fn.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        import fastnorm as fn
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        if self._threads is not None:
            fn.set_num_threads(self._threads)

    def _map(self, fn, items, describe, label):
        """``[fn(item) for item in items]`` in order, in the pool if there is one."""
        if not items:
            return []
        out = [None] * len(items)
        order = sorted(range(len(items)), key=lambda i: -items[i][1])
        if self.jobs == 1 or len(items) == 1:
            with np.errstate(all="ignore"):
                for n, i in enumerate(order, 1):
                    out[i] = fn(items[i][0])
                    self.log(f"  [{label} {n}/{len(items)}] {describe(items[i][0], out[i])}")
            return out
        if self.pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor
            self.pool = ProcessPoolExecutor(self.jobs, mp_context=mp.get_context("spawn"),
                                            initializer=_init_worker)
        from concurrent.futures import as_completed
        futures = {self.pool.submit(fn, items[i][0]): i for i in order}
        for n, f in enumerate(as_completed(futures), 1):
            i = futures[f]
            out[i] = f.result()
            self.log(f"  [{label} {n}/{len(items)}] {describe(items[i][0], out[i])}")
        return out

    def train(self, specs, label):
        need = {}
        for s in specs:
            k = _key(s)
            have = self.cache.get(k)
            if have is not None and (have["error"] or len(have["history"]) >= s["epochs"]):
                continue
            if k not in need or need[k]["epochs"] < s["epochs"]:
                need[k] = s
        todo = list(need.values())
        done = self._map(train_run, [(s, _cost(s)) for s in todo], _describe_run, label)
        self.trained += len(done)
        for s, r in zip(todo, done):
            self.cache[_key(s)] = r
        out = []
        for s in specs:
            r = self.cache[_key(s)]
            out.append({**r, "spec": dict(s), "history": r["history"][:s["epochs"]]})
        return out

    def map(self, fn, args, label, describe, cost=1.0):
        return self._map(fn, [(a, cost) for a in args], describe, label)


def _describe_run(spec, r):
    s = spec
    what = (f"{s['model']} {s['norm']:>5} {s['optimizer']} lr {s['lr']:g} batch "
            f"{s['batch_size']} seed {s['seed']}"
            + (f" init x{s['init_scale']:g}" if s["init_scale"] != 1.0 else ""))
    if r["error"]:
        return f"{what}: {r['error']} ({r['seconds']:.1f} s)"
    h = r["history"][-1]
    return (f"{what}: {len(r['history'])} epochs, test acc {h['test_acc']:.3f}, "
            f"train loss {h['train_loss']:.3g} ({r['seconds']:.1f} s)")


# ------------------------------------------------------------------------- stats ----
def final_acc(r):
    return r["history"][-1]["test_acc"] if r["history"] and not r["error"] else float("nan")


def failed(r):
    """Failed: an exception, a non-finite training loss, or a final test accuracy at or
    below FAIL_ACC (the network collapsed to about chance)."""
    if r["error"] or not r["history"]:
        return True
    if any(not math.isfinite(h["train_loss"]) for h in r["history"]):
        return True
    return final_acc(r) <= FAIL_ACC


def nonfinite(r):
    return bool(r["error"]) or any(not math.isfinite(h["train_loss"]) for h in r["history"])


def epochs_to(r, target=TARGET):
    """The first epoch whose test accuracy reaches ``target``, or None."""
    for h in r["history"]:
        if h["test_acc"] >= target:
            return h["epoch"]
    return None


def _mean_std(values):
    v = np.array([x for x in values if x is not None and np.isfinite(x)], float)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def _pct(values, digits=1):
    """'97.5 ± 0.4' (percent, mean ± sample std over seeds)."""
    m, s, n = _mean_std(values)
    if n == 0:
        return "—"
    if len(values) == 1:
        return f"{100 * m:.{digits}f}"
    return f"{100 * m:.{digits}f} ± {100 * s:.{digits}f}"


def _num(values, digits=2):
    m, s, n = _mean_std(values)
    if n == 0:
        return "—"
    if len(values) == 1:
        return f"{m:.{digits}g}"
    return f"{m:.{digits}g} ± {s:.{digits - 1 if digits > 1 else 1}g}"


def _e95(records, epochs):
    """'3.3 ± 0.6' over the seeds that reached TARGET, with '(k/n)' when some did not."""
    got = [epochs_to(r) for r in records]
    reached = [e for e in got if e is not None]
    if not reached:
        return f"not in {epochs}"
    m, s, _ = _mean_std(reached)
    text = f"{m:.1f}" if len(reached) == 1 else f"{m:.1f} ± {s:.1f}"
    if len(reached) < len(records):
        text += f" ({len(reached)}/{len(records)})"
    return text


def _e95_penalised(records, epochs):
    """Mean epochs to TARGET, counting a seed that never got there as ``epochs + 1``."""
    return float(np.mean([epochs_to(r) or epochs + 1 for r in records]))


def _signed(fraction):
    """A difference of fractions in points: '+1.5', '-0.7', '0.0'."""
    v = round(100 * fraction, 1)
    return "0.0" if v == 0 else f"{v:+.1f}"


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _group(records, *fields):
    out = {}
    for r in records:
        out.setdefault(tuple(r["spec"][f] for f in fields), []).append(r)
    return out


def _curves(records, field):
    return [[h[field] for h in r["history"]] for r in records]


# ------------------------------------------------------------------- claim 1 ----
def claim1_convergence(seeds=DEFAULT_SEEDS, quick=False, runner=None, log=print, **overrides):
    """The same CNN and MLP with BatchNorm and without, from the same seeds, with SGD
    (momentum 0.9) and Adam at their usual learning rates: test accuracy and training
    loss per epoch, epochs to 95% test accuracy."""
    s = settings(1, quick, **overrides)
    t0 = time.perf_counter()
    runner = runner or _Runner(log=log)
    E = s["epochs"]
    specs = [_spec(m, norm, opt, lr, seed, E, s["batch_size"])
             for m in s["models"] for opt, lr in s["optimizers"]
             for norm in ("batch", "none") for seed in seeds]
    groups = _group(runner.train(specs, "claim 1"), "model", "optimizer", "lr", "norm")
    rows, curves, compare = [], {}, []
    mid = min(3, E)
    for m in s["models"]:
        for opt, lr in s["optimizers"]:
            per = {}
            for norm in ("none", "batch"):
                g = groups[(m, opt, float(lr), norm)]
                per[norm] = g
                rows.append({
                    "model": m, "optimizer": opt, "lr": lr, "norm": norm,
                    "epochs_to_95": [epochs_to(r) for r in g],
                    "acc_epoch1": [r["history"][0]["test_acc"] for r in g],
                    f"acc_epoch{mid}": [r["history"][mid - 1]["test_acc"] for r in g],
                    "final_acc": [final_acc(r) for r in g],
                    f"loss_epoch{mid}": [r["history"][mid - 1]["train_loss"] for r in g],
                    "final_loss": [r["history"][-1]["train_loss"] for r in g],
                    "e95_text": _e95(g, E)})
                curves[f"{m}/{opt}/{norm}"] = {"train_loss": _curves(g, "train_loss"),
                                               "test_acc": _curves(g, "test_acc")}
            e_bn, e_no = _e95_penalised(per["batch"], E), _e95_penalised(per["none"], E)
            l_bn = np.mean([r["history"][mid - 1]["train_loss"] for r in per["batch"]])
            l_no = np.mean([r["history"][mid - 1]["train_loss"] for r in per["none"]])
            compare.append({"model": m, "optimizer": opt, "lr": lr, "e95_bn": e_bn,
                            "e95_none": e_no, "loss_bn": float(l_bn), "loss_none": float(l_no),
                            "faster": e_bn < e_no and l_bn < l_no})
    table = _table(
        ["model", "optimizer (lr)", "norm", "epochs to 95% test acc", "test acc epoch 1 (%)",
         f"test acc epoch {mid} (%)", f"test acc epoch {E} (%)", f"train loss epoch {mid}",
         f"train loss epoch {E}"],
        [[r["model"].upper(), f"{r['optimizer']} ({r['lr']:g})", NORM_LABEL[r["norm"]],
          r["e95_text"], _pct(r["acc_epoch1"]), _pct(r[f"acc_epoch{mid}"]),
          _pct(r["final_acc"]), _num(r[f"loss_epoch{mid}"]), _num(r["final_loss"])]
         for r in rows])
    nf = sum(c["faster"] for c in compare)
    verdict = ("supported" if nf == len(compare) else "partly supported" if nf else
               "not reproduced here")
    findings = [
        f"{c['model'].upper()} + {c['optimizer']} (lr {c['lr']:g}): epochs to "
        f"{TARGET:.0%} with BN {c['e95_bn']:.1f} vs {c['e95_none']:.1f} without, train loss "
        f"at epoch {mid} {c['loss_bn']:.3g} vs {c['loss_none']:.3g} "
        f"({'BN faster' if c['faster'] else 'BN not faster on both counts'})"
        for c in compare]
    return {"claim": 1, "title": "BatchNorm speeds up convergence", "settings": s,
            "seeds": list(seeds), "rows": rows, "curves": curves, "compare": compare,
            "table": table, "verdict": verdict, "findings": findings,
            "disagreements": [f"{c['model'].upper()} + {c['optimizer']} (lr {c['lr']:g}): BN "
                              f"is not faster on both counts" for c in compare if not c["faster"]],
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------- claim 2 ----
def claim2_lr_init(seeds=DEFAULT_SEEDS, quick=False, runner=None, log=print, **overrides):
    """(a) SGD (momentum 0.9) learning-rate sweep with and without BatchNorm; (b) every
    Linear/Conv weight rescaled by 0.1 or 10 after construction, with and without BN."""
    s = settings(2, quick, **overrides)
    t0 = time.perf_counter()
    runner = runner or _Runner(log=log)
    E, bs = s["epochs"], s["batch_size"]
    norms = ("none", "batch")
    specs = [_spec(m, norm, "sgd", lr, seed, E, bs) for m in s["models"] for lr in s["lrs"]
             for norm in norms for seed in seeds]
    lr_groups = _group(runner.train(specs, "claim 2 lr"), "model", "lr", "norm")
    specs = [_spec(m, norm, opt, lr, seed, E, bs, scale) for m in s["models"]
             for opt, lr in s["init_optimizers"] for scale in s["scales"] for norm in norms
             for seed in seeds]
    init_groups = _group(runner.train(specs, "claim 2 init"), "model", "optimizer",
                         "init_scale", "norm")
    lr_rows, lr_curves = [], {}
    for m in s["models"]:
        for lr in s["lrs"]:
            row = {"model": m, "lr": lr}
            for norm in norms:
                g = lr_groups[(m, float(lr), norm)]
                row[norm] = {"final_acc": [final_acc(r) for r in g],
                             "failed": sum(failed(r) for r in g),
                             "nonfinite": sum(nonfinite(r) for r in g),
                             "n": len(g), "e95_text": _e95(g, E),
                             "e95": _e95_penalised(g, E)}
                lr_curves[f"{m}/{lr:g}/{norm}"] = _curves(g, "test_acc")
            lr_rows.append(row)
    # the largest lr at which every seed trains to >= 90% (stable), and the best lr
    summary = []
    for m in s["models"]:
        for norm in norms:
            rows = [r for r in lr_rows if r["model"] == m]
            ok = [r["lr"] for r in rows if r[norm]["failed"] == 0
                  and min(r[norm]["final_acc"]) >= 0.9]
            best = max(rows, key=lambda r: (np.nanmean(r[norm]["final_acc"]), -r[norm]["e95"]))
            fails = [r["lr"] for r in rows if r[norm]["failed"]]
            summary.append({"model": m, "norm": norm, "max_stable_lr": max(ok) if ok else None,
                            "first_failing_lr": min(fails) if fails else None,
                            "best_lr": best["lr"], "best_acc": best[norm]["final_acc"],
                            "best_e95_text": best[norm]["e95_text"],
                            "best_e95": best[norm]["e95"]})
    lr_table = _table(
        ["model", "SGD lr", "no norm: final test acc (%)", "no norm: failed",
         "BatchNorm: final test acc (%)", "BatchNorm: failed"],
        [[r["model"].upper(), f"{r['lr']:g}", _pct(r["none"]["final_acc"]),
          f"{r['none']['failed']}/{r['none']['n']}", _pct(r["batch"]["final_acc"]),
          f"{r['batch']['failed']}/{r['batch']['n']}"] for r in lr_rows])
    best_table = _table(
        ["model", "norm", "largest lr with every seed ≥ 90%", "smallest lr with a failure",
         "best lr", "final acc at best lr (%)", "epochs to 95% at best lr"],
        [[x["model"].upper(), NORM_LABEL[x["norm"]],
          "none" if x["max_stable_lr"] is None else f"{x['max_stable_lr']:g}",
          "none" if x["first_failing_lr"] is None else f"{x['first_failing_lr']:g}",
          f"{x['best_lr']:g}", _pct(x["best_acc"]), x["best_e95_text"]] for x in summary])
    init_rows, init_curves = [], {}
    for m in s["models"]:
        for opt, lr in s["init_optimizers"]:
            for scale in s["scales"]:
                row = {"model": m, "optimizer": opt, "lr": lr, "scale": scale}
                for norm in norms:
                    g = init_groups[(m, opt, float(scale), norm)]
                    row[norm] = {"acc_epoch1": [r["history"][0]["test_acc"] if r["history"]
                                                else float("nan") for r in g],
                                 "final_acc": [final_acc(r) for r in g],
                                 "failed": sum(failed(r) for r in g), "n": len(g),
                                 "e95_text": _e95(g, E)}
                    init_curves[f"{m}/{opt}/{scale:g}/{norm}"] = _curves(g, "test_acc")
                init_rows.append(row)
    init_table = _table(
        ["model", "optimizer (lr)", "weight scale", "no norm: acc epoch 1 (%)",
         f"no norm: acc epoch {E} (%)", "no norm: epochs to 95%", "BN: acc epoch 1 (%)",
         f"BN: acc epoch {E} (%)", "BN: epochs to 95%"],
        [[r["model"].upper(), f"{r['optimizer']} ({r['lr']:g})", f"×{r['scale']:g}",
          _pct(r["none"]["acc_epoch1"]), _pct(r["none"]["final_acc"]), r["none"]["e95_text"],
          _pct(r["batch"]["acc_epoch1"]), _pct(r["batch"]["final_acc"]),
          r["batch"]["e95_text"]] for r in init_rows])
    # verdict (a): BN's largest stable lr is higher than without it, per model
    findings, lr_wins = [], 0
    for m in s["models"]:
        bn = next(x for x in summary if x["model"] == m and x["norm"] == "batch")
        no = next(x for x in summary if x["model"] == m and x["norm"] == "none")
        lo = lambda x: -1.0 if x is None else x  # noqa: E731
        win = lo(bn["max_stable_lr"]) > lo(no["max_stable_lr"])
        lr_wins += win
        f = lambda v: "no lr" if v is None else f"lr {v:g}"  # noqa: E731
        findings.append(
            f"{m.upper()}, SGD: every seed ≥ 90% up to {f(bn['max_stable_lr'])} with BN vs "
            f"{f(no['max_stable_lr'])} without; first failure at {f(bn['first_failing_lr'])} "
            f"with BN vs {f(no['first_failing_lr'])} without. At each arm's best lr, "
            f"{_pct(bn['best_acc'])}% (BN, lr {bn['best_lr']:g}, {bn['best_e95_text']} epochs "
            f"to 95%) vs {_pct(no['best_acc'])}% (none, lr {no['best_lr']:g}, "
            f"{no['best_e95_text']} epochs)")
    # verdict (b): at a bad scale, BN's final accuracy beats no-norm's by > 2 points
    init_wins, init_total = 0, 0
    for r in init_rows:
        if r["scale"] == 1.0:
            continue
        init_total += 1
        a_bn, a_no = np.nanmean(r["batch"]["final_acc"]), np.nanmean(r["none"]["final_acc"])
        win = a_bn > a_no + 0.02
        init_wins += win
        base = next((b for b in init_rows if b["scale"] == 1.0 and b["model"] == r["model"]
                     and b["optimizer"] == r["optimizer"]), None)
        drop = ""
        if base is not None:
            d_bn = a_bn - np.nanmean(base["batch"]["final_acc"])
            d_no = a_no - np.nanmean(base["none"]["final_acc"])
            drop = (f"; change from ×1: {100 * d_bn:+.1f} points with BN, {100 * d_no:+.1f} "
                    f"without")
        findings.append(f"{r['model'].upper()} + {r['optimizer']}, weights ×{r['scale']:g}: "
                        f"final acc {100 * a_bn:.1f}% with BN vs {100 * a_no:.1f}% without"
                        f"{drop} ("
                        + ("BN better by > 2 points" if win else "no clear BN advantage") + ")")
    nf = sum(r[n]["nonfinite"] for r in lr_rows for n in norms)
    nruns = sum(r[n]["n"] for r in lr_rows for n in norms)
    nfail = sum(r[n]["failed"] for r in lr_rows for n in norms)
    findings.insert(len(s["models"]), f"Learning-rate sweep: {nfail} of {nruns} runs failed, "
                    f"{nf} of them with a non-finite (NaN/inf) training loss; the others "
                    f"collapsed to chance accuracy with a finite loss")
    disagree = []
    f = lambda v: "none" if v is None else f"{v:g}"  # noqa: E731
    for m in s["models"]:
        bn = next(x for x in summary if x["model"] == m and x["norm"] == "batch")
        no = next(x for x in summary if x["model"] == m and x["norm"] == "none")
        lo = lambda x: -1.0 if x is None else x  # noqa: E731
        if lo(bn["max_stable_lr"]) <= lo(no["max_stable_lr"]):
            disagree.append(f"{m.upper()}: BN does not widen the range of SGD learning rates at "
                            f"which every seed reaches 90% (up to {f(bn['max_stable_lr'])} with "
                            f"BN, {f(no['max_stable_lr'])} without)")
        a, b = bn["first_failing_lr"], no["first_failing_lr"]
        if a is not None and b is not None and a <= b:
            disagree.append(f"{m.upper()}: runs with BN fail from lr {a:g} on, like (or before) "
                            f"those without (lr {b:g})")
        elif a is not None and b is not None and a / b < 3:
            disagree.append(f"{m.upper()}: the first failing learning rate moves only from "
                            f"{b:g} to {a:g} with BN (×{a / b:.2g}), not to a much higher one")
    for r in init_rows:
        if r["scale"] == 1.0:
            continue
        base = next((b for b in init_rows if b["scale"] == 1.0 and b["model"] == r["model"]
                     and b["optimizer"] == r["optimizer"]), None)
        a_bn, a_no = np.nanmean(r["batch"]["final_acc"]), np.nanmean(r["none"]["final_acc"])
        what = f"{r['model'].upper()} + {r['optimizer']}, weights ×{r['scale']:g}"
        if a_bn <= a_no + 0.02:
            disagree.append(f"{what}: BN ends no better than no norm ({100 * a_bn:.1f}% vs "
                            f"{100 * a_no:.1f}%)")
        if base is None:
            continue
        e1, e1_base = np.nanmean(r["batch"]["acc_epoch1"]), np.nanmean(base["batch"]["acc_epoch1"])
        d_bn = a_bn - np.nanmean(base["batch"]["final_acc"])
        d_no = a_no - np.nanmean(base["none"]["final_acc"])
        if e1 < e1_base - 0.05:
            disagree.append(f"{what}: with BN training starts slower than at ×1 (epoch-1 "
                            f"accuracy {100 * e1:.1f}% vs {100 * e1_base:.1f}%; final accuracy "
                            f"{_signed(d_bn)} points from ×1"
                            + (f"; without BN: {_signed(d_no)})" if d_bn < d_no else ")"))
    lr_verdict = ("supported" if lr_wins == len(s["models"]) else
                  "partly supported" if lr_wins else "not reproduced here")
    init_verdict = ("supported" if init_wins == init_total else
                    "partly supported" if init_wins else "not reproduced here")
    verdict = (lr_verdict if lr_verdict == init_verdict else "partly supported")
    return {"claim": 2, "title": "BatchNorm tolerates higher learning rates and poorer "
            "initialisation", "settings": s, "seeds": list(seeds), "lr_rows": lr_rows,
            "lr_summary": summary, "init_rows": init_rows,
            "curves": {"lr": lr_curves, "init": init_curves},
            "table": lr_table + "\n\n" + best_table + "\n\n" + init_table,
            "tables": {"lr": lr_table, "lr_best": best_table, "init": init_table},
            "verdict": verdict, "verdicts": {"lr": lr_verdict, "init": init_verdict},
            "findings": findings, "disagreements": disagree,
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------- claim 3 ----
def claim3_batch_size(seeds=DEFAULT_SEEDS, quick=False, runner=None, log=print, **overrides):
    """Batch sizes for BatchNorm, GroupNorm and LayerNorm with a fixed number of epochs
    (so every run sees the same samples; small batches take more, noisier steps) and the
    same Adam learning rate: final test accuracy (running statistics for BN)."""
    s = settings(3, quick, **overrides)
    t0 = time.perf_counter()
    runner = runner or _Runner(log=log)
    E = s["epochs"]
    opt, lr = s["optimizer"]
    specs = [_spec(m, norm, opt, lr, seed, E, b) for m in s["models"]
             for b in s["batch_sizes"] for norm in s["norms"] for seed in seeds]
    groups = _group(runner.train(specs, "claim 3"), "model", "batch_size", "norm")
    ntrain = len(_digits()[0][1])
    rows, controls = [], [n for n in s["norms"] if n != "batch"]
    for m in s["models"]:
        for b in s["batch_sizes"]:
            row = {"model": m, "batch_size": b, "steps_per_epoch": -(-ntrain // b)}
            for norm in s["norms"]:
                g = groups[(m, b, norm)]
                row[norm] = {"final_acc": [final_acc(r) for r in g],
                             "train_acc": [r["history"][-1]["train_acc"] if r["history"]
                                           else float("nan") for r in g],
                             "failed": sum(failed(r) for r in g)}
            if "batch" in s["norms"] and controls:
                row["bn_deficit"] = float(
                    np.nanmean([np.nanmean(row[c]["final_acc"]) for c in controls])
                    - np.nanmean(row["batch"]["final_acc"]))
            rows.append(row)
    header = ["model", "batch", "steps/epoch"] + [
        f"{NORM_LABEL[n]} test acc (%)" for n in s["norms"]]
    if "batch" in s["norms"]:
        header.append("BN train acc, last epoch, batch stats (%)")
    if "batch" in s["norms"] and controls:
        header.append("BN deficit (points)")
    table_rows = []
    for r in rows:
        cells = [r["model"].upper(), r["batch_size"], r["steps_per_epoch"]]
        cells += [_pct(r[n]["final_acc"]) for n in s["norms"]]
        if "batch" in s["norms"]:
            cells.append(_pct(r["batch"]["train_acc"]))
        if "bn_deficit" in r:
            cells.append(_signed(r["bn_deficit"]))
        table_rows.append(cells)
    table = _table(header, table_rows)
    # verdict: "marked" = BN more than 2 points below the mean of GroupNorm and LayerNorm
    findings, marked_small, marked_any = [], 0, 0
    for m in s["models"]:
        mr = [r for r in rows if r["model"] == m and "bn_deficit" in r]
        if not mr:
            continue
        bad = [r["batch_size"] for r in mr if r["bn_deficit"] > 0.02]
        small = [r for r in mr if r["batch_size"] < 8]
        marked_small += bool(small) and all(r["bn_deficit"] > 0.02 for r in small)
        marked_any += bool(bad)
        findings.append(
            f"{m.upper()}: BN deficit vs mean(" + ", ".join(NORM_LABEL[c] for c in controls)
            + ") by batch: " + ", ".join(f"{r['batch_size']}: {_signed(r['bn_deficit'])}"
                                         for r in mr)
            + f" points; more than 2 points at batch {', '.join(map(str, bad)) or 'none'}")
    nmod = len(s["models"])
    disagree = []
    for m in s["models"]:
        mr = [r for r in rows if r["model"] == m and "bn_deficit" in r]
        calm = [r["batch_size"] for r in mr if r["batch_size"] < 16 and r["bn_deficit"] <= 0.02]
        if calm:
            disagree.append(f"{m.upper()}: no marked BN degradation (deficit ≤ 2 points) at "
                            f"batch {', '.join(map(str, calm))}, below the claim's thresholds "
                            f"of 16 / 8")
        for c in controls:
            accs = [np.nanmean(r[c]["final_acc"]) for r in rows if r["model"] == m]
            if accs and max(accs) - min(accs) > 0.02:
                disagree.append(f"{m.upper()}: {NORM_LABEL[c]} also varies with the batch size "
                                f"({100 * min(accs):.1f}–{100 * max(accs):.1f}%)")
    verdict = ("supported" if marked_small == nmod else
               "partly supported" if marked_any else "not reproduced here")
    return {"claim": 3, "title": "BatchNorm degrades with small batches; GroupNorm and "
            "LayerNorm do not", "settings": s, "seeds": list(seeds), "rows": rows,
            "table": table, "verdict": verdict, "findings": findings,
            "disagreements": disagree, "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------- claim 4 ----
def _splits(n, b):
    """Batch bounds of size ``b`` over ``n`` items; a last batch of one joins the one
    before (a batch of one has no batch statistics in BatchNorm1d)."""
    bounds = [(i, min(i + b, n)) for i in range(0, n, b)]
    if b > 1 and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def _logits(model, x, batch_size, training):
    """Logits of ``x`` in batches; ``training=True`` uses the batch statistics, on a copy
    of ``model`` so its running statistics are not touched."""
    import fastnorm as fn

    m = copy.deepcopy(model) if training else model
    m.train(training)
    with fn.no_grad():
        return np.concatenate([m(x[a:b]).data for a, b in _splits(len(x), batch_size)])


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def inference_run(args):
    """Claim 4 for one (model, seed, settings): train a BN model (Adam), then evaluate it
    with running statistics, with batch statistics at several test batch sizes, with
    running statistics never updated (momentum 0) and recalibrated, and measure how the
    prediction of one sample depends on its batch mates."""
    import fastnorm as fn
    from . import nn, train

    model_name, seed, s = args
    t0 = time.perf_counter()
    (xtr, ytr), (xte, yte) = _digits()
    opt, lr = s["optimizer"]

    def fitted(momentum):
        fn.manual_seed(seed)
        m = train.build_model(model_name, "batch")
        for bn in m.modules():
            if isinstance(bn, nn._BatchNorm):
                bn.momentum = momentum
        with np.errstate(all="ignore"):
            train.fit(m, (xtr, ytr), (xte, yte), epochs=s["epochs"], batch_size=s["batch_size"],
                      lr=lr, optimizer=opt, progress=False, log=_silent)
        m.eval()
        return m

    model = fitted(0.1)
    out = {"model": model_name, "seed": seed}
    acc = lambda z, y=yte: float((z.argmax(1) == y).mean())  # noqa: E731
    z1 = _logits(model, xte, 1, False)
    zall = _logits(model, xte, len(xte), False)
    out["eval_b1"] = acc(z1)
    out["eval_full"] = acc(zall)
    out["eval_b1_vs_full_max_abs_logit_diff"] = float(np.abs(z1 - zall).max())
    eval_pred = z1.argmax(1)
    # batch statistics at test time, batch mates drawn at random (a fixed shuffle)
    order = np.random.default_rng(seed).permutation(len(xte))
    xs, ys = xte[order], yte[order]
    out["train_mode"], out["train_mode_error"] = {}, {}
    for b in s["test_batches"]:
        try:
            z = _logits(model, xs, b, True)
        except (ValueError, RuntimeError) as e:
            out["train_mode"][b] = float("nan")
            out["train_mode_error"][b] = f"{type(e).__name__}: {e}"
        else:
            out["train_mode"][b] = acc(z, ys)
    by_label = np.argsort(yte, kind="stable")
    out["train_mode_sorted_32"] = acc(_logits(model, xte[by_label], 32, True), yte[by_label])
    # running statistics never updated (momentum 0): same weights, stats at init 0 / 1
    frozen = fitted(0.0)
    out["momentum0_weight_max_abs_diff"] = float(max(
        np.abs(p.data - q.data).max() for p, q in zip(model.parameters(), frozen.parameters())))
    bns = [m for m in frozen.modules() if isinstance(m, nn._BatchNorm)]
    out["momentum0_running_mean_abs_max"] = float(max(np.abs(b.running_mean).max()
                                                      for b in bns))
    out["momentum0_eval"] = acc(_logits(frozen, xte, len(xte), False))
    out["momentum0_train_mode_full"] = acc(_logits(frozen, xte, len(xte), True))
    # recalibrate: one pass over the training set in train mode, cumulative average
    for b in bns:
        b.reset_running_stats()
        b.momentum = None
    frozen.train()
    with fn.no_grad():
        for a, c in _splits(len(xtr), 32):
            frozen(xtr[a:c])
    frozen.eval()
    out["recalibrated_eval"] = acc(_logits(frozen, xte, len(xte), False))
    # one sample's prediction against its batch mates (train mode = batch statistics)
    rng = np.random.default_rng(1000 + seed)
    probes = rng.choice(len(xte), s["probes"], replace=False)
    live = copy.deepcopy(model)
    live.train()
    dep, strip = {}, {}
    with fn.no_grad():
        for k in s["companions"]:
            changed, off_eval, ranges = 0, 0, []
            for p in probes:
                others = np.delete(np.arange(len(xte)), p)
                preds, probs = [], []
                for _ in range(s["sets"]):
                    mates = rng.choice(others, k - 1, replace=False)
                    z = live(xte[np.concatenate([[p], mates])]).data[0]
                    preds.append(int(z.argmax()))
                    probs.append(float(_softmax(z)[yte[p]]))
                changed += len(set(preds)) > 1
                off_eval += any(q != eval_pred[p] for q in preds)
                ranges.append(max(probs) - min(probs))
                strip.setdefault(int(p), {})[k] = probs
            dep[k] = {"prediction_varies": changed / len(probes),
                      "differs_from_eval": off_eval / len(probes),
                      "mean_prob_range": float(np.mean(ranges))}
        # batch mates all of one other class
        k = max(s["companions"])
        flipped, to_mates = 0, 0
        trials = 0
        for p in probes:
            for c in rng.choice([c for c in range(10) if c != yte[p]], s["other_classes"],
                                replace=False):
                pool = np.flatnonzero(yte == c)
                mates = rng.choice(pool, min(k - 1, len(pool)), replace=False)
                q = int(live(xte[np.concatenate([[p], mates])]).data[0].argmax())
                flipped += q != eval_pred[p]
                to_mates += q == c
                trials += 1
        out["one_class_mates"] = {"k": k, "differs_from_eval": flipped / trials,
                                  "predicts_mates_class": to_mates / trials}
    out["dependence"] = dep
    # the probe whose P(true class) moves most with its batch mates, for the plot
    k = min(s["companions"])
    p = max(strip, key=lambda q: max(strip[q][k]) - min(strip[q][k]))
    out["probe_most_sensitive"] = {
        "index": p, "label": int(yte[p]), "eval_prob": float(_softmax(z1[p])[yte[p]]),
        "eval_pred": int(eval_pred[p]), "train_mode_probs": strip[p]}
    out["seconds"] = time.perf_counter() - t0
    return out


def _describe_inference(args, r):
    return (f"{args[0]} seed {args[1]}: eval acc {r['eval_b1']:.3f}, momentum 0 "
            f"{r['momentum0_eval']:.3f}, recalibrated {r['recalibrated_eval']:.3f} "
            f"({r['seconds']:.1f} s)")


def claim4_inference(seeds=DEFAULT_SEEDS, quick=False, runner=None, log=print, **overrides):
    """Inference with running statistics against batch statistics (see ``inference_run``)."""
    s = settings(4, quick, **overrides)
    t0 = time.perf_counter()
    runner = runner or _Runner(log=log)
    args = [(m, seed, s) for m in s["models"] for seed in seeds]
    runs = runner.map(inference_run, args, "claim 4", _describe_inference,
                      cost=s["epochs"] * 0.5)
    per = {m: [r for r in runs if r["model"] == m] for m in s["models"]}
    rows = []
    for m, rs in per.items():
        def add(what, values, note=""):
            rows.append({"model": m, "what": what, "acc": values, "note": note})
        add("eval mode (running statistics), batch 1", [r["eval_b1"] for r in rs],
            f"max |logit difference| vs one batch of {len(_digits()[1][1])}: "
            f"{max(r['eval_b1_vs_full_max_abs_logit_diff'] for r in rs):.1e}")
        for b in s["test_batches"]:
            errs = {r["train_mode_error"].get(b) for r in rs} - {None}
            add(f"train mode (batch statistics), batch {b}", [r["train_mode"][b] for r in rs],
                "error: " + "; ".join(sorted(errs)) if errs else
                ("each sample normalised over its own 8×8 positions" if b == 1 else ""))
        add("train mode, batch 32, test set sorted by label",
            [r["train_mode_sorted_32"] for r in rs], "batch mates mostly of the same class")
        add("momentum 0 (running stats stay 0 / 1), eval mode", [r["momentum0_eval"] for r in rs],
            f"weights identical to the momentum-0.1 model (max |Δw| = "
            f"{max(r['momentum0_weight_max_abs_diff'] for r in rs):.1g})")
        add("momentum 0, train mode, batch 359", [r["momentum0_train_mode_full"] for r in rs])
        add("momentum 0, recalibrated by one pass over the training set, eval mode",
            [r["recalibrated_eval"] for r in rs], "cumulative average (momentum=None)")
    table = _table(["model", "how the test set is evaluated", "test acc (%)", "note"],
                   [[r["model"].upper(), r["what"], _pct(r["acc"]), r["note"]] for r in rows])
    dep_rows = []
    for m, rs in per.items():
        for k in s["companions"]:
            d = [r["dependence"][k] for r in rs]
            dep_rows.append({"model": m, "k": k,
                             "varies": [x["prediction_varies"] for x in d],
                             "differs": [x["differs_from_eval"] for x in d],
                             "range": [x["mean_prob_range"] for x in d]})
        oc = [r["one_class_mates"] for r in rs]
        dep_rows.append({"model": m, "k": f"{oc[0]['k']}, mates of one other class",
                         "varies": None, "differs": [x["differs_from_eval"] for x in oc],
                         "range": None, "to_mates": [x["predicts_mates_class"] for x in oc]})
    dep_table = _table(
        ["model", "batch (probe + mates)", f"probes whose prediction varies over "
         f"{s['sets']} sets of mates (%)", "probes predicted differently from eval mode at "
         "least once (%)", "mean range of P(true class) over the sets"],
        [[r["model"].upper(), r["k"], "—" if r["varies"] is None else _pct(r["varies"]),
          _pct(r["differs"]) + (f" (predicted as the mates' class: {_pct(r['to_mates'])})"
                                if r.get("to_mates") else ""),
          "—" if r["range"] is None else _num(r["range"])] for r in dep_rows])
    # verdict: (i) a single sample: is batch 1 in train mode an error / worse; (ii) do
    # un-updated running stats hurt; (iii) do batch mates change predictions
    findings = []
    for m, rs in per.items():
        ev = np.mean([r["eval_b1"] for r in rs])
        b1 = [r["train_mode"].get(1) for r in rs] if 1 in s["test_batches"] else []
        errs = sorted({r["train_mode_error"].get(1) for r in rs} - {None})
        if errs:
            findings.append(f"{m.upper()}: batch 1 in train mode is an error ({errs[0]}); "
                            f"eval mode with running statistics gives {100 * ev:.1f}% at batch 1")
        elif b1:
            findings.append(f"{m.upper()}: batch 1 in train mode works (BatchNorm2d averages "
                            f"over the 8×8 positions of the one image) and gives "
                            f"{_pct(b1)}% against {100 * ev:.1f}% in eval mode")
        big = max(s["test_batches"])
        small = min([b for b in s["test_batches"] if b > 1], default=None)
        if small is not None:
            a_big = [r["train_mode"][big] for r in rs]
            a_small = [r["train_mode"][small] for r in rs]
            a_sort = [r["train_mode_sorted_32"] for r in rs]
            worse = []
            if np.nanmean(a_small) < ev - 0.02:
                worse.append(f"batch {small}: {_pct(a_small)}%")
            if np.mean(a_sort) < ev - 0.02:
                worse.append(f"batches of 32 sorted by label: {_pct(a_sort)}%")
            findings.append(
                f"{m.upper()}: with batch statistics, one test batch of {big} gives "
                f"{_pct(a_big)}% (running statistics: {100 * ev:.1f}%); "
                + (f"more than 2 points worse: {'; '.join(worse)}" if worse else
                   f"batch {small} ({_pct(a_small)}%) and batches of 32 sorted by label "
                   f"({_pct(a_sort)}%) are within 2 points too"))
        m0 = np.mean([r["momentum0_eval"] for r in rs])
        rc = np.mean([r["recalibrated_eval"] for r in rs])
        findings.append(f"{m.upper()}: with running statistics never updated, eval accuracy "
                        f"{100 * m0:.1f}% (vs {100 * ev:.1f}%); one pass over the training data "
                        f"restores {100 * rc:.1f}%")
        k = min(s["companions"])
        v = np.mean([r["dependence"][k]["prediction_varies"] for r in rs])
        oc = np.mean([r["one_class_mates"]["differs_from_eval"] for r in rs])
        findings.append(f"{m.upper()}: with batch statistics, {100 * v:.0f}% of probes change "
                        f"prediction over {s['sets']} sets of {k - 1} random batch mate"
                        f"{'s' if k > 2 else ''} (batch {k}); with "
                        f"{max(s['companions']) - 1} mates of one other class, "
                        f"{100 * oc:.0f}% differ from eval mode")
    disagree = []
    for m, rs in per.items():
        ev = np.mean([r["eval_b1"] for r in rs])
        if 1 in s["test_batches"] and not any(r["train_mode_error"].get(1) for r in rs):
            disagree.append(f"{m.upper()}: a single sample can be normalised with its own "
                            f"statistics (BatchNorm2d, over its 8×8 positions): "
                            f"{_pct([r['train_mode'][1] for r in rs])}% in train mode at batch "
                            f"1 vs {100 * ev:.1f}% with running statistics")
        k = min(s["companions"])
        v = np.mean([r["dependence"][k]["prediction_varies"] for r in rs])
        if v < 0.05:
            disagree.append(f"{m.upper()}: batch statistics barely depend on the batch mates "
                            f"here: {100 * v:.0f}% of probes change prediction at batch {k}")
        big = max(s["test_batches"])
        if big > 1 and np.nanmean([r["train_mode"][big] for r in rs]) >= ev - 0.005:
            disagree.append(f"{m.upper()}: running statistics are not needed for accuracy when "
                            f"the test set comes in one large mixed batch (batch {big}: "
                            f"{_pct([r['train_mode'][big] for r in rs])}% vs "
                            f"{100 * ev:.1f}%); they are needed for single samples, small or "
                            f"unrepresentative batches and batch-independent outputs")
    need_stats = all(np.mean([r["momentum0_eval"] for r in rs])
                     < np.mean([r["eval_b1"] for r in rs]) - 0.1 for rs in per.values())
    depends = any(np.mean([r["dependence"][min(s["companions"])]["prediction_varies"]
                           for r in rs]) > 0 for rs in per.values())
    all_error = all(any(r["train_mode_error"].get(1) for r in rs) for rs in per.values()) \
        if 1 in s["test_batches"] else False
    verdict = ("supported" if need_stats and depends and all_error else
               "partly supported" if need_stats or depends else "not reproduced here")
    return {"claim": 4, "title": "Inference needs running statistics: a single sample has "
            "no batch", "settings": s, "seeds": list(seeds), "runs": runs, "rows": rows,
            "dependence_rows": dep_rows, "table": table + "\n\n" + dep_table,
            "tables": {"modes": table, "dependence": dep_table}, "verdict": verdict,
            "findings": findings, "disagreements": disagree,
            "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------- plots ----
def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _band(ax, curves, label, **kw):
    n = min(len(c) for c in curves)
    a = np.array([c[:n] for c in curves], float)
    x = np.arange(1, n + 1)
    line, = ax.plot(x, np.nanmean(a, 0), label=label, **kw)
    if len(a) > 1:
        ax.fill_between(x, np.nanmin(a, 0), np.nanmax(a, 0), color=line.get_color(), alpha=0.2)
    return line


def plot_claim1(res, path):
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    s = res["settings"]
    fig, axes = plt.subplots(len(s["models"]), 2 * len(s["optimizers"]),
                             figsize=(4 * len(s["optimizers"]) * 2, 3.2 * len(s["models"])),
                             squeeze=False)
    for i, m in enumerate(s["models"]):
        for j, (opt, lr) in enumerate(s["optimizers"]):
            al, aa = axes[i, 2 * j], axes[i, 2 * j + 1]
            for norm, color in (("batch", "C0"), ("none", "C3")):
                c = res["curves"][f"{m}/{opt}/{norm}"]
                _band(al, c["train_loss"], NORM_LABEL[norm], color=color)
                _band(aa, c["test_acc"], NORM_LABEL[norm], color=color)
            al.set_yscale("log")
            al.set_title(f"{m.upper()}, {opt} lr {lr:g}: train loss")
            aa.set_title(f"{m.upper()}, {opt} lr {lr:g}: test accuracy")
            aa.axhline(TARGET, color="grey", lw=0.8, ls=":")
            aa.set_ylim(max(0.0, min(aa.get_ylim()[0], 0.8)), 1.0)
            for a in (al, aa):
                a.set_xlabel("epoch")
                a.xaxis.set_major_locator(MaxNLocator(integer=True))
                a.legend(fontsize=8)
    fig.suptitle(f"Claim 1: mean over seeds {res['seeds']}, band = min..max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_claim2(res, lr_path, init_path):
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    s = res["settings"]
    fig, axes = plt.subplots(1, len(s["models"]), figsize=(5.5 * len(s["models"]), 3.8),
                             squeeze=False)
    for ax, m in zip(axes[0], s["models"]):
        rows = [r for r in res["lr_rows"] if r["model"] == m]
        lrs = [r["lr"] for r in rows]
        for norm, color in (("batch", "C0"), ("none", "C3")):
            accs = [np.array(r[norm]["final_acc"], float) for r in rows]
            mean = [np.nanmean(a) for a in accs]
            err = [np.nanstd(a, ddof=1) if len(a) > 1 else 0 for a in accs]
            ax.errorbar(lrs, mean, yerr=err, marker="o", capsize=3, color=color,
                        label=NORM_LABEL[norm])
            dead = [(r["lr"], mu) for r, mu in zip(rows, mean)
                    if r[norm]["failed"] == r[norm]["n"]]
            if dead:
                ax.scatter(*zip(*dead), marker="x", s=90, color=color, zorder=3,
                           label=f"{NORM_LABEL[norm]}: every seed failed")
            for r, mu in zip(rows, mean):
                if 0 < r[norm]["failed"] < r[norm]["n"]:
                    ax.annotate(f"{r[norm]['failed']}/{r[norm]['n']} failed", (r["lr"], mu),
                                textcoords="offset points", xytext=(0, 8 if norm == "batch"
                                                                    else -14),
                                fontsize=7, color=color, ha="center")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.05)
        ax.axhline(0.1, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("SGD learning rate (momentum 0.9)")
        ax.set_ylabel(f"test accuracy after {s['epochs']} epochs")
        ax.set_title(f"Claim 2a: {m.upper()}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(lr_path, dpi=90)
    plt.close(fig)
    opts = s["init_optimizers"]
    fig, axes = plt.subplots(len(s["models"]), len(opts),
                             figsize=(5 * len(opts), 3.3 * len(s["models"])), squeeze=False)
    colors = {sc: f"C{i}" for i, sc in enumerate(s["scales"])}
    for i, m in enumerate(s["models"]):
        for j, (opt, lr) in enumerate(opts):
            ax = axes[i, j]
            for sc in s["scales"]:
                for norm, ls in (("batch", "-"), ("none", "--")):
                    _band(ax, res["curves"]["init"][f"{m}/{opt}/{sc:g}/{norm}"],
                          f"{NORM_LABEL[norm]}, weights ×{sc:g}", color=colors[sc], ls=ls)
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("test accuracy")
            ax.set_title(f"Claim 2b: {m.upper()}, {opt} lr {lr:g}")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(s["scales"]), fontsize=8)
    fig.tight_layout(rect=(0, 0.12 if len(s["models"]) == 1 else 0.07, 1, 1))
    fig.savefig(init_path, dpi=90)
    plt.close(fig)


def plot_claim3(res, path):
    plt = _pyplot()
    s = res["settings"]
    fig, axes = plt.subplots(1, len(s["models"]), figsize=(5.5 * len(s["models"]), 3.8),
                             squeeze=False)
    for ax, m in zip(axes[0], s["models"]):
        rows = [r for r in res["rows"] if r["model"] == m]
        bs = [r["batch_size"] for r in rows]
        for k, norm in enumerate(s["norms"]):
            accs = [np.array(r[norm]["final_acc"], float) for r in rows]
            ax.errorbar(bs, [np.nanmean(a) for a in accs], marker="os^v"[k % 4], capsize=3,
                        yerr=[np.nanstd(a, ddof=1) if len(a) > 1 else 0 for a in accs],
                        label=NORM_LABEL[norm])
        ax.set_xscale("log", base=2)
        ax.set_xticks(bs)
        ax.set_xticklabels([str(b) for b in bs])
        ax.set_ylim(min(ax.get_ylim()[0], 0.9), 1.0)
        ax.set_xlabel(f"batch size ({s['epochs']} epochs each)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"Claim 3: {m.upper()}, {s['optimizer'][0]} lr {s['optimizer'][1]:g}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_claim4(res, path):
    plt = _pyplot()
    s = res["settings"]
    models = s["models"]
    fig, axes = plt.subplots(1, 1 + len(models), figsize=(5.2 * (1 + len(models)), 3.9),
                             squeeze=False)
    a = axes[0, 0]
    bs = list(s["test_batches"])
    for k, m in enumerate(models):
        rs = [r for r in res["runs"] if r["model"] == m]
        acc = np.array([[r["train_mode"][x] for x in bs] for r in rs], float)
        color = f"C{k}"
        with np.errstate(all="ignore"):
            mean = np.array([np.nanmean(col) if np.isfinite(col).any() else np.nan
                             for col in acc.T])
        a.plot(bs, mean, marker="o", color=color, label=f"{m.upper()}: batch statistics")
        for x, v in zip(bs, mean):
            if not np.isfinite(v):
                a.annotate("error", (x, 0.03 + 0.06 * k), color=color, fontsize=8, ha="center")
        a.axhline(np.mean([r["eval_b1"] for r in rs]), color=color, ls="--",
                  label=f"{m.upper()}: running statistics (any batch)")
        a.axhline(np.mean([r["momentum0_eval"] for r in rs]), color=color, ls=":",
                  label=f"{m.upper()}: running stats never updated")
    a.set_xscale("log")
    a.set_xticks(bs)
    a.set_xticklabels([str(x) for x in bs])
    a.set_ylim(0, 1.02)
    a.set_xlabel("test batch size (train mode = batch statistics)")
    a.set_ylabel("test accuracy")
    a.set_title(f"Claim 4: test accuracy (mean of {len(res['seeds'])} seed(s))", fontsize=10)
    a.legend(fontsize=7, loc="lower right")
    for k, m in enumerate(models):
        b = axes[0, 1 + k]
        r0 = [r for r in res["runs"] if r["model"] == m][0]
        p = r0["probe_most_sensitive"]
        ks = sorted(p["train_mode_probs"])
        for i, kk in enumerate(ks):
            v = p["train_mode_probs"][kk]
            b.scatter(np.full(len(v), i) + np.linspace(-0.15, 0.15, len(v)), v, s=18,
                      color=f"C{k}")
        b.axhline(p["eval_prob"], color="k", ls="--", label="eval mode (running statistics)")
        b.set_xticks(range(len(ks)))
        b.set_xticklabels([str(x) for x in ks])
        b.set_xlim(-0.5, len(ks) - 0.5)
        b.set_ylim(-0.02, 1.02)
        b.set_xlabel("train-mode batch: the sample + random batch mates")
        b.set_ylabel("P(true class)")
        b.set_title(f"{m.upper()} seed {r0['seed']}: test image {p['index']} (a {p['label']}),\n"
                    f"the most batch-dependent of {s['probes']} probes; one dot per set of "
                    f"mates", fontsize=9)
        b.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------ document ----
CLAIMS = {
    1: {
        "quote": [("000", "缓解梯度消失，加速网络收敛。"),
                  ("003", "收敛快 … dramatically accelerates the training of deep neural nets"),
                  ("001", "加速训练：通过减少内部协变量偏移 …")],
        "paraphrase": "BatchNorm makes training converge faster (fewer epochs to a given "
                      "loss or accuracy) than the same network without it.",
    },
    2: {
        "quote": [("000", "简化调参，网络更稳定。在调参时，学习率调得过大容易出现震荡与不收敛，"
                          "BN层则抑制了参数微小变化随网络加深而被放大的问题"),
                  ("001", "使模型能在更高的学习率下进行训练 … 减少对初始值的敏感性"),
                  ("002", "它允许更高的学习率，并降低对网络初始化的敏感性"),
                  ("003", "不用小心翼翼的调整学习率; 不用小心翼翼的初始化网络参数（权重）")],
        "paraphrase": "With BatchNorm one can train with much higher learning rates without "
                      "divergence, and the network is much less sensitive to the initial "
                      "weights.",
    },
    3: {
        "quote": [("000", "当 batch 较小时，求出来的均值和方差就会有较大的随机性，从而导致效果下降，"
                          "具体来说，当 batch 的大小低于 16 时，就不建议使用 BN，当 batch 低于 8 "
                          "时，网络的性能就会有非常明显的下降。"),
                  ("002", "GN不依赖于批大小，因此适用于小批大小的任务 … LN … 不依赖于批大小")],
        "paraphrase": "With small batches BatchNorm's statistics are noisy and results get "
                      "worse: below a batch of 16 BN is not recommended, below 8 performance "
                      "drops markedly. GroupNorm and LayerNorm do not depend on the batch size.",
    },
    4: {
        "quote": [("000", "在预测阶段，输入数据可能只有1条，就并没有batch的概念，因此，这个时候用的 "
                          "是全量训练数据的均值和方差，这个可以通过移动平均法求得。"),
                  ("003", "在预测一个实体的时候, 是没有mean和variance的。"),
                  ("004", "所以当batch_size 为1 的时候，无法做归一化")],
        "paraphrase": "At inference there may be a single sample, which has no batch (with "
                      "a batch of one, normalisation is impossible), so BatchNorm must use "
                      "the mean and variance of the whole training set, estimated by a moving "
                      "average during training.",
    },
}


def _setup_text(res):
    s, seeds = res["settings"], res["seeds"]
    seeds_t = f"seeds {', '.join(map(str, seeds))}"
    if res["claim"] == 1:
        opts = " and ".join(f"{o} (lr {lr:g}{', momentum 0.9' if o == 'sgd' else ''})"
                            for o, lr in s["optimizers"])
        return (f"The `fastnorm train` models ({', '.join(m.upper() for m in s['models'])}; "
                f"CNN = conv16-norm-ReLU-conv32-norm-ReLU-maxpool-linear, MLP = "
                f"64·128-norm-ReLU-64-norm-ReLU-10) with `norm=\"batch\"` and `norm=\"none\"`, "
                f"trained {s['epochs']} epochs at batch {s['batch_size']} with {opts}, the "
                f"usual default learning rate of each, the same for both arms; {seeds_t} (the "
                f"seed fixes initialisation and shuffling). \"Epochs to 95%\" is the first "
                f"epoch whose test accuracy (eval mode, running statistics) reaches 95%, mean "
                f"± std over the seeds that got there. The verdict rule: BN counts as faster "
                f"in a setting when it both reaches 95% in fewer epochs on average (a seed that "
                f"never does counts as {s['epochs'] + 1}) and has the lower training loss at "
                f"epoch {min(3, s['epochs'])}; supported if BN is faster in every setting, "
                f"partly if in some. Without BN the CNN's convolutions have biases; with BN "
                f"they do not (the norm's shift replaces them).")
    if res["claim"] == 2:
        return (f"(a) SGD with momentum 0.9, batch {s['batch_size']}, {s['epochs']} epochs, "
                f"learning rate ∈ {{{', '.join(f'{x:g}' for x in s['lrs'])}}}, with and "
                f"without BN, {seeds_t}. A run *fails* when its training loss becomes "
                f"non-finite (NaN/inf) or its final test accuracy is ≤ {FAIL_ACC:.0%} (chance "
                f"is 10%), i.e. it diverged or collapsed (dead ReLUs, constant prediction); "
                f"the findings say how many failures were NaN. "
                f"(b) Poor initialisation: right after construction, every Linear and Conv2d "
                f"weight (not biases, not norm parameters) is multiplied by "
                f"{' or '.join(f'{x:g}' for x in s['scales'] if x != 1)} in place under "
                f"`fastnorm.no_grad()` (`rescale_weights`); trained {s['epochs']} epochs with "
                + " and ".join(f"{o} (lr {lr:g})" for o, lr in s["init_optimizers"])
                + f". Verdict rules: (a) BN's largest learning rate at which every seed "
                f"reaches ≥ 90% must be higher than without BN for each model; (b) at each "
                f"bad scale (each model and optimizer) BN's mean final accuracy must beat "
                f"no-norm's by more than 2 points; supported if every case passes, partly if "
                f"some do.")
    if res["claim"] == 3:
        opt, lr = s["optimizer"]
        return (f"The {' and '.join(m.upper() for m in s['models'])} with "
                f"{', '.join(NORM_LABEL[n] for n in s['norms'])} (CNN: GroupNorm with 4 groups; "
                f"\"LayerNorm\" is GroupNorm with 1 group, i.e. LayerNorm over C,H,W with "
                f"per-channel affine; MLP: GroupNorm with 8 groups, LayerNorm over the "
                f"features), batch ∈ {{{', '.join(map(str, s['batch_sizes']))}}}, {opt} lr "
                f"{lr:g}, {seeds_t}. **A fixed number of epochs ({s['epochs']})**, i.e. a "
                f"fixed number of samples seen: every run uses the same data and the same "
                f"compute per sample, and small batches take many more (noisier) steps. A fixed "
                f"number of steps would instead give the small batches a fraction of an epoch "
                f"and confound \"small batch\" with \"less data\". The learning rate is not "
                f"retuned per batch size, so accuracy also moves with the batch size for every "
                f"norm; the claim is about BN relative to GroupNorm/LayerNorm, so the table "
                f"shows the *BN deficit*: the mean of GroupNorm's and LayerNorm's accuracy "
                f"minus BN's, in points. Verdict rule: a deficit above 2 points counts as a "
                f"marked degradation; supported if BN is marked worse at every batch below 8 "
                f"for every model, partly if it is at some batch size.")
    opt, lr = s["optimizer"]
    return (f"For each of the {' and '.join(m.upper() for m in s['models'])} with BatchNorm "
            f"and {seeds_t}: train {s['epochs']} epochs ({opt} lr {lr:g}, batch "
            f"{s['batch_size']}, BN momentum 0.1), then evaluate the 359 test images (a) in "
            f"eval mode with the running statistics, one image at a time; (b) in train mode, "
            f"i.e. with the statistics of the test batch (on a copy of the model so its running "
            f"statistics stay untouched, no gradients), with the test set shuffled and cut into "
            f"batches of {', '.join(map(str, s['test_batches']))} (a last batch of one joins "
            f"the batch before), and in batches of 32 with the test set sorted by label; (c) "
            f"the same network trained with BN momentum 0, whose running statistics never "
            f"leave their initial mean 0 / variance 1 (its weights are identical: running "
            f"statistics do not influence training), in eval mode, and after recalibrating "
            f"them with one pass over the training set in train mode (momentum=None, a "
            f"cumulative average). Dependence on batch mates: {s['probes']} random test "
            f"images (\"probes\"), each put in a train-mode batch with k−1 random other test "
            f"images, {s['sets']} different sets of mates for each k ∈ "
            f"{{{', '.join(map(str, s['companions']))}}}, and with {max(s['companions']) - 1} "
            f"mates all of one other class ({s['other_classes']} classes per probe).")


DISCUSSION = {
    1: "Reasons and caveats. Both arms use the same learning rate, the usual default of "
       "each optimizer. BN also changes the effective step size of the weights before it, "
       "so part of a speed-up at a fixed learning rate can be a better-suited step size; "
       "claim 2's sweep gives each arm its own best SGD learning rate (the comparison at "
       "the best rates is listed above when claim 2 ran). Adam already rescales every "
       "parameter's step, one of the things BN does for SGD. Digits is small and easy, "
       "and these networks have two or three layers: the notes argue from deep networks "
       "(vanishing gradients, internal covariate shift), which this does not test. "
       "Epochs are a coarse unit: differences under one epoch are not resolved.",
    2: "Reasons and caveats. The last Linear layer (the classifier) is not followed by a "
       "norm, so BN cannot protect it: at large SGD steps the logits blow up and the ReLUs "
       "die, with or without BN, which limits how far BN can move the failure point. "
       "A weight that feeds a BN layer is scale-invariant: multiplying it by "
       "10 leaves the forward pass unchanged but divides its gradient by 10 and the relative "
       "size of an SGD step by 100 (by 10 for Adam, whose steps do not scale with the "
       "gradient), so with BN a ×10 initialisation becomes a smaller effective learning "
       "rate — slower training — rather than a broken forward pass. Without BN a ×0.1 "
       "scale shrinks the signal by 10 per layer (10³ over three layers) and the gradients "
       "vanish; a ×10 scale makes the initial logits and loss huge. The CNN's BN layers "
       "are followed by max-pooling and one Linear, the MLP's by one Linear each.",
    3: "Reasons and caveats. BatchNorm2d in the CNN computes each channel's statistics over "
       "the batch *and* the 8×8 positions: a batch of 2 already gives 128 values per "
       "channel, so its statistics are much less noisy than the per-sample intuition of "
       "the claim suggests (real CNNs have larger feature maps still, though their deep "
       "layers have small ones). BatchNorm1d in the MLP has only the batch: with 2 samples "
       "every feature is normalised to ±1 exactly, which discards most of the information, "
       "and the batch statistics seen in training differ badly from the running statistics "
       "used at test time (compare the BN train accuracy, measured with batch statistics, "
       "with its test accuracy). Thresholds like 16 and 8 come from large networks on "
       "large images (e.g. the GroupNorm paper's ImageNet ResNet-50); digits is small and "
       "easy. A fixed number of epochs gives small batches more steps and no learning rate "
       "is retuned; both apply to every norm alike, which is why BN is compared with the "
       "other norms at the same batch size.",
    4: "Reasons and caveats. The literal statement \"with a batch of one, normalisation is "
       "impossible\" holds for fully connected BatchNorm (BatchNorm1d on (N, C)): one "
       "sample has one value per feature and no variance, and fastnorm raises an error, "
       "as PyTorch does. In a CNN, BatchNorm2d's statistics also run over the spatial "
       "positions, so a batch of one *can* be normalised in train mode; it then acts like "
       "instance normalisation, which the network was not trained for. The substance of the "
       "claim holds: with batch statistics a sample's output depends on which other samples "
       "share its batch (little for this CNN, a lot for the MLP), while eval mode with "
       "running statistics is a fixed per-sample function (batch 1 and batch 359 give the "
       "same logits up to floating-point rounding). The running statistics must actually be "
       "estimated: left at their initial values the networks are far less accurate, and "
       "one pass over the training data repairs them, which is how the original paper "
       "computes the population statistics (Algorithm 2, quoted in note 003). Running "
       "statistics are not the only way to get batch-independent inference, but they are "
       "the one that works for a single sample.",
}


def _tuned_lr_finding(res2):
    """Claim 1's comparison at each arm's best SGD learning rate, from claim 2's sweep."""
    parts = []
    for m in res2["settings"]["models"]:
        x = {r["norm"]: r for r in res2["lr_summary"] if r["model"] == m}
        parts.append(f"{m.upper()}: BN {x['batch']['best_e95_text']} epochs to 95% at lr "
                     f"{x['batch']['best_lr']:g} vs no norm {x['none']['best_e95_text']} at lr "
                     f"{x['none']['best_lr']:g}")
    return ("At each arm's best SGD learning rate (claim 2's sweep, "
            f"{res2['settings']['epochs']} epochs): " + "; ".join(parts))


def _section(res, plots, results=None):
    c = res["claim"]
    info = CLAIMS[c]
    out = [f"## Claim {c}: {res['title']}", ""]
    out.append("**The claim.** " + info["paraphrase"])
    out.append("")
    out += [f"> {q} — note {n}" for n, q in info["quote"]]
    out.append("")
    out.append("**Setup.** " + _setup_text(res))
    out.append("")
    if c == 2:
        t = res["tables"]
        out += ["**(a) Learning rate.** Final test accuracy, mean ± std over seeds, and failed "
                "runs:", "", t["lr"], "", "Per model and norm:", "", t["lr_best"], "",
                "**(b) Initialisation.**", "", t["init"], ""]
    elif c == 4:
        t = res["tables"]
        out += ["**Test accuracy by evaluation mode** (mean ± std over seeds):", "",
                t["modes"], "", "**One sample against its batch mates** (train mode, batch "
                "statistics; eval mode gives 0% by construction):", "", t["dependence"], ""]
        errs = {e for r in res["runs"] for e in r["train_mode_error"].values()}
        if errs:
            out += ["The error for a batch of one in train mode:", "", "```"] + sorted(errs) \
                + ["```", ""]
    else:
        out += ["Mean ± std over seeds:", "", res["table"], ""]
    for p in plots:
        out += [f"![claim {c}]({p})", ""]
    out.append(f"**Verdict: {res['verdict']}.**" + (
        f" (a) learning rate: {res['verdicts']['lr']}; (b) initialisation: "
        f"{res['verdicts']['init']}." if c == 2 else ""))
    out.append("")
    out += [f"- {f}" for f in res["findings"]]
    disagree = list(res["disagreements"])
    if c == 1 and results and 2 in results:
        out.append(f"- {_tuned_lr_finding(results[2])}")
        for x in results[2]["lr_summary"]:
            if x["norm"] != "batch":
                continue
            no = next(y for y in results[2]["lr_summary"]
                      if y["model"] == x["model"] and y["norm"] == "none")
            if x["best_e95"] >= no["best_e95"]:
                disagree.append(f"{x['model'].upper()}: at each arm's best SGD learning rate "
                                f"BN is not faster to 95%")
    out += ["", "**Where the measurement disagrees with the claim.**"
            + ("" if disagree else " Nowhere in these settings."), ""]
    if disagree:
        out += [f"- {d}" for d in disagree] + [""]
    out += [DISCUSSION[c], ""]
    return "\n".join(out)


def write_markdown(results, path, header):
    parts = [header] + [results[c]["section"] for c in sorted(results)]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts).rstrip() + "\n")


# ------------------------------------------------------------------ run_all ----
_CLAIM_FUNCS = {1: claim1_convergence, 2: claim2_lr_init, 3: claim3_batch_size,
                4: claim4_inference}


def run_all(out_dir="docs", seeds=DEFAULT_SEEDS, quick=False, only=(1, 2, 3, 4), jobs=1,
            log=print, plots=True, overrides=None):
    """Run the experiments for the claims in ``only``, print their tables, write
    ``out_dir/experiments.md`` and (with matplotlib) ``out_dir/experiments_*.png``
    (``out_dir=None``: write nothing).  ``quick`` keeps the first seed only and uses the
    quick settings; ``overrides``: {claim: {setting: value}} on top of those.
    Returns {claim: result dict}; ``results["meta"]`` holds the run's description.
    ``jobs > 1`` spawns worker processes, which re-import the calling script's
    ``__main__``: call it from under ``if __name__ == "__main__":`` (the CLI does)."""
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ExperimentError("seeds: expected at least one seed")
    if quick:
        seeds = seeds[:1]
    only = tuple(sorted(set(int(c) for c in only)))
    bad = [c for c in only if c not in _CLAIM_FUNCS]
    if bad or not only:
        raise ExperimentError(f"only: expected claims among 1, 2, 3, 4, got {list(only)}")
    overrides = overrides or {}
    if plots and out_dir and _pyplot() is None:
        log("matplotlib is not installed, so no plots: pip install matplotlib (or "
            "pip install 'fastnorm[plot]'); writing the tables only")
    t0 = time.perf_counter()
    results = {}
    with _Runner(jobs=jobs, log=log) as runner:
        _digits()
        for c in only:
            log(f"claim {c}: {CLAIMS[c]['paraphrase'].split('.')[0]}")
            res = _CLAIM_FUNCS[c](seeds=seeds, quick=quick, runner=runner, log=log,
                                  **overrides.get(c, {}))
            results[c] = res
            log("")
            log(res["table"])
            log(f"verdict: {res['verdict']}  ({res['seconds']:.0f} s)")
            for f in res["findings"]:
                log(f"  - {f}")
            log("")
        trained = runner.trained
    results["meta"] = {"seeds": seeds, "quick": quick, "only": only, "jobs": jobs,
                       "seconds": time.perf_counter() - t0, "trained": trained}
    if out_dir:
        write_report(results, out_dir, plots=plots, log=log)
    return results


def write_report(results, out_dir, plots=True, log=print):
    """Write ``experiments.md`` and the plots of ``results`` (from ``run_all``)."""
    import fastnorm as fn

    meta = results["meta"]
    seeds, only, jobs, total = meta["seeds"], meta["only"], meta["jobs"], meta["seconds"]
    os.makedirs(out_dir, exist_ok=True)
    plt = _pyplot() if plots else None
    plotters = {1: plot_claim1, 2: plot_claim2, 3: plot_claim3, 4: plot_claim4}
    nplots = 0
    for c in only:
        res = results[c]
        names = list(PLOTS[c]) if plt is not None else []
        if names:
            plotters[c](res, *[os.path.join(out_dir, n) for n in names])
            nplots += len(names)
        res["plots"] = names
        res["section"] = _section(res, names, results)
    cmd = "fastnorm experiments" + (" --quick" if meta["quick"] else "") + \
        (f" --seeds {','.join(map(str, seeds))}" if seeds != DEFAULT_SEEDS else "") + \
        (f" --only {','.join(map(str, only))}" if only != (1, 2, 3, 4) else "")
    header = "\n".join([
        "# Reproducing the BatchNorm claims of the reference notes",
        "",
        f"Generated by `{cmd}` (`fastnorm/experiments.py`) in {total:.0f} s "
        f"({meta['trained']} training runs plus the claim-4 models; {jobs} worker "
        f"process{'es' if jobs > 1 else ''} of one thread on a shared {os.cpu_count()}-core "
        f"machine; fastnorm {fn.__version__}, backend {fn.get_backend()}). The accuracies "
        f"do not depend on timing or on the number of workers: every run is seeded and "
        f"single-threaded. Data: scikit-learn's 8×8 digits, the fixed stratified split of "
        f"`fastnorm.data.load_digits()` (1,438 training / 359 test images). Seeds: "
        f"{', '.join(map(str, seeds))}; ± is the sample standard deviation over seeds. "
        f"Accuracies are test accuracies in eval mode (BatchNorm with its running "
        f"statistics) unless stated."
        + (" **Quick run: one seed, fewer epochs and grid points than the full run; "
           "verdicts from these numbers are not reliable.**" if meta["quick"] else ""),
        "",
        "The claims come from the reference notes (five Chinese blog posts on BatchNorm, "
        "numbered 000–004 by their file names in the seeds directory); each is quoted and "
        "paraphrased. Each verdict follows a rule stated in its setup and is *supported*, "
        "*partly supported* or *not reproduced here*.",
        "",
        "| claim | verdict |",
        "|---|---|",
        *[f"| {c}. {results[c]['title']} | {results[c]['verdict']} |" for c in only],
        "",
    ])
    path = os.path.join(out_dir, "experiments.md")
    write_markdown({c: results[c] for c in only}, path, header)
    log(f"wrote {path}" + (f" and {nplots} plots" if nplots else " (no plots)")
        + f"; {total:.0f} s")
    return path


def parse_list(text, name):
    """'0,1,2' -> (0, 1, 2)."""
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ExperimentError(f"{name}: expected comma-separated integers, got {text!r}") \
            from None
    if not out:
        raise ExperimentError(f"{name}: expected at least one value, got {text!r}")
    return out
