"""Run under ``mpiexec -n K``: SyncBatchNorm on K ranks against BatchNorm on the
concatenated batch in one process, over a grid of dtypes, layouts, ranks of input, flags
and shards (ARGV: shard sizes per rank, e.g. ``5,3`` or ``4,0,7``; several lists may be
given).  Every rank builds the whole batch from one seed, runs its shard through
SyncBatchNorm and the whole batch through BatchNorm.  Prints one summary line on rank 0;
any mismatch raises (``python -m mpi4py`` then aborts every rank)."""
import itertools
import sys

import numpy as np
from mpi4py import MPI

import fastnorm as fn
from fastnorm import distributed, nn

comm = MPI.COMM_WORLD
rank, K = comm.Get_rank(), comm.Get_size()
TOL = {np.float64: 1e-10, np.float32: 1e-5}
SHAPES = {2: (6,), 3: (6, 5), 4: (6, 3, 4)}  # per sample, channels first; C = 6


def close(a, b, tol, what, scale=1.0):
    """|a - b| <= tol * max(scale, 1, |b|) elementwise."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(scale, 1.0, float(np.abs(b).max()) if b.size else 1.0)
    err = float(np.abs(a - b).max()) if a.size else 0.0
    if not err <= tol * scale:
        raise AssertionError(f"rank {rank}: {what}: max error {err:.3g} > {tol * scale:.3g}")


def channels_last(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)) if a.ndim > 2 else a


def gather_rows(a):
    """The ranks' arrays concatenated along axis 0 (on every rank)."""
    return np.concatenate(comm.allgather(a), axis=0)


def check(shards, dtype, layout, ndim, momentum, affine, track, steps=3):
    bounds = np.cumsum([0] + shards)
    N = bounds[-1]
    rng = np.random.default_rng(1234)
    kw = dict(eps=1e-5, momentum=momentum, affine=affine, track_running_stats=track,
              layout=layout, dtype=dtype)
    ref = nn.BatchNorm1d(6, **kw) if ndim < 4 else nn.BatchNorm2d(6, **kw)
    sync = distributed.SyncBatchNorm(6, **kw, comm=comm)
    if affine:
        for m in (ref, sync):
            m.weight.data[:] = np.linspace(0.5, 2.0, 6)
            m.bias.data[:] = np.linspace(-1.0, 1.0, 6)
    tol = TOL[dtype]
    for step in range(steps):
        x = (rng.standard_normal((N, *SHAPES[ndim])) * 2 + 5 * step + 1).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        if layout == "NHWC":
            x, dy = channels_last(x), channels_last(dy)
        xr = fn.Tensor(x, requires_grad=True)
        yr = ref(xr)
        yr.backward(dy)
        lo, hi = bounds[rank], bounds[rank + 1]
        xs = fn.Tensor(x[lo:hi], requires_grad=True)
        ys = sync(xs)
        ys.backward(dy[lo:hi])
        what = f"{shards} {np.dtype(dtype).name} {layout} {ndim}D momentum={momentum} " \
               f"affine={affine} track={track} step {step}"
        close(gather_rows(ys.data), yr.data, tol, f"output ({what})")
        # dx = invstd * (g - mean(g) - xhat * mean(g * xhat)) cancels to ~0 for tiny
        # batches: measure its error against the size of the terms, not of the result.
        x64 = x.astype(np.float64)
        axes = tuple(i for i in range(x.ndim) if i != (1 if layout == "NCHW" else x.ndim - 1))
        invstd = 1.0 / np.sqrt(x64.var(axis=axes) + 1e-5)
        terms = float(np.abs(dy).max() * invstd.max() * (2.0 if affine else 1.0))
        close(gather_rows(xs.grad), xr.grad, tol, f"input grad ({what})", terms)
        if affine:
            for name in ("weight", "bias"):
                local = getattr(sync, name).grad.astype(np.float64)
                total = np.empty_like(local)
                comm.Allreduce(local, total)
                close(total, getattr(ref, name).grad, tol, f"{name} grad ({what})")
        if track:
            for name in ("running_mean", "running_var"):
                mine = getattr(sync, name)
                close(mine, getattr(ref, name), tol, f"{name} ({what})")
                if any(not np.array_equal(mine, other) for other in comm.allgather(mine)):
                    raise AssertionError(f"{name} differs between ranks ({what})")
            assert int(sync.num_batches_tracked) == step + 1
    if track:  # eval: the running statistics, no communication
        ref.eval()
        sync.eval()
        close(sync(x[:3]).data, ref(x[:3]).data, tol, "eval output")
    return steps


def rejected_input_raises_everywhere():
    """The last rank passes 5 channels instead of 6: it raises its ValueError, the others a
    RuntimeError naming it, nothing changes anywhere, and the next step works."""
    sync = distributed.SyncBatchNorm(6, comm=comm)
    bad = rank == K - 1
    x = np.ones((4, 5 if bad else 6), np.float32)
    try:
        sync(x)
    except ValueError as e:
        assert bad and "channels" in str(e), e
    except RuntimeError as e:
        assert not bad and f"[{K - 1}]" in str(e), e
    else:
        raise AssertionError("a rejected input did not raise")
    assert int(sync.num_batches_tracked) == 0
    assert np.all(sync.running_mean == 0) and np.all(sync.running_var == 1)
    y = sync(np.arange(24, dtype=np.float32).reshape(4, 6) + rank)
    assert int(sync.num_batches_tracked) == 1 and y.shape == (4, 6)


def main():
    shard_lists = [[int(s) for s in arg.split(",")] for arg in sys.argv[1:]]
    backends = [b for b in ("numpy", "cython") if b in fn.backends()]
    checks = 0
    for shards in shard_lists:
        assert len(shards) == K, f"{shards}: expected {K} shard sizes"
        grid = itertools.product(backends, (np.float64, np.float32), ("NCHW", "NHWC"),
                                 (2, 3, 4), (0.1, None), (True, False), (True, False))
        for backend, dtype, layout, ndim, momentum, affine, track in grid:
            if (momentum is None or not affine) and (ndim == 3 or layout == "NHWC"):
                continue  # the flags' effect does not depend on shape: keep the grid small
            with fn.use_backend(backend):
                checks += check(shards, dtype, layout, ndim, momentum, affine, track)
    rejected_input_raises_everywhere()
    if rank == 0:
        print(f"sync_bn: {checks} steps matched BatchNorm on {K} ranks, shards "
              f"{' '.join(map(str, shard_lists))}, backends {backends}", flush=True)


main()
