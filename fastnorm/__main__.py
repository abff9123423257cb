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
        print(f"cython extension: built, OpenMP {'on' if kernels.openmp_enabled() else 'off'}")
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
            reps = 3 if name == "numpy" else 7
            t_copy = _median(lambda: np.copyto(copy, x), reps)
            t_fwd = _median(fwd, reps)
            t_fb = _median(fwdbwd, reps)
            t_ev = _median(ev, reps)
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


def _median(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def build_parser():
    p = argparse.ArgumentParser(prog="fastnorm", description=__doc__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("info", help="versions, backends, threads, CPU features")
    s.set_defaults(func=cmd_info)
    s = sub.add_parser("demo", help="BatchNorm on every backend: speed and agreement")
    s.add_argument("--threads", type=int, default=None)
    s.set_defaults(func=cmd_demo)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"fastnorm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
