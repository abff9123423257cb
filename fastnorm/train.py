"""Training small nets on real data: the models, the loop, evaluation, checkpoints.

The models are built from ``fastnorm.nn`` alone; ``build_model`` takes the same
configuration that a checkpoint records in its metadata, so ``predict`` needs nothing else.
"""
import contextlib
import gc
import json
import math
import time

import numpy as np

from . import _config
from . import data as _data

NORMS = ("batch", "group", "layer", "instance", "rms", "none")
MODELS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "adam", "adamw")


class ConfigError(ValueError):
    """An option value the training command cannot use."""


def _norm_layer(nn, norm, channels, spatial, layout, dtype, model):
    """The normalization layer after a layer with ``channels`` outputs.

    In the CNN, ``layer`` is GroupNorm with one group (LayerNorm over C, H, W with
    per-channel affine, layout-independent weights) and ``rms`` is RMSNorm over the
    values of each sample; in the MLP, ``group`` uses 8 groups.
    """
    if norm == "none":
        return None
    if norm == "batch":
        cls = nn.BatchNorm2d if model == "cnn" else nn.BatchNorm1d
        return cls(channels, layout=layout, dtype=dtype)
    if norm == "group":
        return nn.GroupNorm(4 if model == "cnn" else 8, channels, layout=layout, dtype=dtype)
    if norm == "layer":
        if model == "cnn":
            return nn.GroupNorm(1, channels, layout=layout, dtype=dtype)
        return nn.LayerNorm(channels, dtype=dtype)
    if norm == "instance":
        if model != "cnn":
            raise ConfigError("--norm instance: InstanceNorm needs spatial axes; use --model cnn")
        return nn.InstanceNorm2d(channels, affine=True, layout=layout, dtype=dtype)
    if norm == "rms":
        if model == "cnn":
            shape = (channels, *spatial) if layout == "NCHW" else (*spatial, channels)
            return nn.RMSNorm(shape, dtype=dtype)
        return nn.RMSNorm(channels, dtype=dtype)
    raise ConfigError(f"--norm: expected one of {', '.join(NORMS)}, got {norm!r}")


def build_model(model="cnn", norm="batch", layout="NCHW", in_shape=(1, 8, 8), classes=10,
                hidden=128, dtype=np.float32):
    """MLP: in-hidden-Norm-ReLU-64-Norm-ReLU-classes.  CNN: conv16-Norm-ReLU-conv32-Norm-
    ReLU-maxpool2-Linear (3x3 convolutions, padding 1).  ``in_shape`` is (C, H, W)."""
    from . import nn

    if model not in MODELS:
        raise ConfigError(f"--model: expected one of {', '.join(MODELS)}, got {model!r}")
    if norm not in NORMS:
        raise ConfigError(f"--norm: expected one of {', '.join(NORMS)}, got {norm!r}")
    C, H, W = in_shape
    layers = []

    def add(*mods):
        layers.extend(m for m in mods if m is not None)

    if model == "mlp":
        add(nn.Flatten(), nn.Linear(C * H * W, hidden, dtype=dtype),
            _norm_layer(nn, norm, hidden, (), layout, dtype, model), nn.ReLU(),
            nn.Linear(hidden, 64, dtype=dtype),
            _norm_layer(nn, norm, 64, (), layout, dtype, model), nn.ReLU(),
            nn.Linear(64, classes, dtype=dtype))
    else:
        bias = norm == "none"  # a norm right after a conv makes its bias redundant
        add(nn.Conv2d(C, 16, 3, padding=1, bias=bias, layout=layout, dtype=dtype),
            _norm_layer(nn, norm, 16, (H, W), layout, dtype, model), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=bias, layout=layout, dtype=dtype),
            _norm_layer(nn, norm, 32, (H, W), layout, dtype, model), nn.ReLU(),
            nn.MaxPool2d(2, layout=layout), nn.Flatten(layout=layout),
            nn.Linear(32 * (H // 2) * (W // 2), classes, dtype=dtype))
    return nn.Sequential(*layers)


def to_layout(x, layout):
    """Images are stored (N, C, H, W); the NHWC model takes (N, H, W, C)."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" else x


def make_optimizer(name, params, lr):
    from . import optim

    if name == "sgd":
        return optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return optim.Adam(params, lr=lr)
    if name == "adamw":
        return optim.AdamW(params, lr=lr)
    raise ConfigError(f"--optimizer: expected one of {', '.join(OPTIMIZERS)}, got {name!r}")


def evaluate(model, x, y, batch_size=256):
    """(mean loss, accuracy) in eval mode without recording a tape."""
    from . import autograd
    from .ops import cross_entropy

    was_training = model.training
    model.eval()
    loss = 0.0
    correct = 0
    with autograd.no_grad():
        for i in range(0, len(x), batch_size):
            logits = model(x[i:i + batch_size])
            loss += float(cross_entropy(logits, y[i:i + batch_size], reduction="sum").data)
            correct += int((logits.data.argmax(1) == y[i:i + batch_size]).sum())
    model.train(was_training)
    return loss / len(x), correct / len(x)


def fit(model, train, test, epochs=20, batch_size=32, lr=1e-3, optimizer="adam",
        progress=True, log=print, distributed=False, seed=0, schedule="constant"):
    """Train ``model``; returns a list of per-epoch metrics dicts.

    ``schedule``: ``"constant"`` learning rate, or ``"cosine"`` (decayed from ``lr``
    towards 0 epoch by epoch; what ``fastnorm train`` uses: the last epochs then settle
    instead of wandering, e.g. the digits CNN ends at 98.0-98.3% over seeds 0-3 instead of
    97.5-98.6%).

    ``distributed``: True (``MPI.COMM_WORLD``, run under ``mpiexec``) or an mpi4py
    communicator: data-parallel training over its ranks.  Rank 0's parameters are
    broadcast, each global batch of ``batch_size`` is split over the ranks by a
    ``DistributedSampler`` (shuffled from ``seed``), each rank's loss is its sum over its
    samples divided by the global batch size and the gradients are summed, so a step is
    the step one process takes on the global batch.  Convert BatchNorm to SyncBatchNorm
    first for global batch statistics.  Metrics cover all ranks.
    """
    from .ops import cross_entropy

    (xtr, ytr), (xte, yte) = train, test
    if distributed:
        from . import distributed as dist

        comm = None if distributed is True else distributed
        dist.broadcast_parameters(model, comm=comm)
        sampler = dist.DistributedSampler(len(xtr), seed=seed, comm=comm)
    if schedule not in ("constant", "cosine"):
        raise ConfigError(f"--schedule: expected 'constant' or 'cosine', got {schedule!r}")
    opt = make_optimizer(optimizer, model.parameters(), lr)
    history = []
    keep_freed_memory()
    with _blas_single_thread(), _objects_frozen(), StepThreads() as threads:
        for epoch in range(1, epochs + 1):
            if schedule == "cosine":  # from lr towards 0 over the run, set per epoch
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))
            model.train()
            t0 = time.perf_counter()
            seen = 0
            total = 0.0
            correct = 0
            if distributed:
                sampler.set_epoch(epoch)
                batches = ((xtr[i], ytr[i], n) for i, n in sampler.batches(batch_size))
            else:
                batches = ((xb, yb, len(xb)) for xb, yb in _data.batches(xtr, ytr, batch_size))
            steps = _progress(batches, len(xtr), batch_size, f"epoch {epoch}/{epochs}", progress)
            for xb, yb, n in steps:
                if n < 2:  # a batch of one has no batch statistics
                    continue
                threads.start()
                logits = model(xb)
                if distributed:
                    loss = cross_entropy(logits, yb, reduction="sum") * (1.0 / n)
                else:
                    loss = cross_entropy(logits, yb)
                opt.zero_grad()
                loss.backward()
                if distributed:
                    dist.allreduce_gradients(model, comm=comm, average=False)
                opt.step()
                threads.stop()
                total += float(loss.data) * n
                correct += int((logits.data.argmax(1) == yb).sum())
                seen += len(xb)
            elapsed = time.perf_counter() - t0
            if distributed:
                total, correct, seen = dist.sum_over_ranks([total, correct, seen], comm=comm)
                correct, seen = int(correct), int(seen)
            test_loss, test_acc = evaluate(model, xte, yte)
            m = {"epoch": epoch, "train_loss": total / seen, "train_acc": correct / seen,
                 "test_loss": test_loss, "test_acc": test_acc, "seconds": elapsed,
                 "samples_per_s": seen / elapsed}
            history.append(m)
            log(f"epoch {epoch:3d}  loss {m['train_loss']:.4f}  train acc {m['train_acc']:.4f}  "
                f"test acc {test_acc:.4f}  {m['samples_per_s']:8.0f} samples/s")
    return history


class StepThreads:
    """Runs each training step on the kernels' threads or on one, whichever the recent
    steps ran faster with (a context manager; ``start()``/``stop()`` around each step).

    Results do not depend on the thread count (work is split by problem size only, see
    ``fastnorm._config``), so the choice changes speed only.  Why: on the shared 2-core
    VM this project is measured on, a digits CNN epoch took 27.5 ms on two threads in
    some minutes and 43-48 ms in others, against 38-39 ms on one thread in either: a step
    makes ~20 short parallel passes, and in the slow minutes the second core joined each
    one late (a tight loop of one pass kept its 1.5-1.7x from the second thread).

    Each count's step time is the median of its last 3 timed steps; the faster count
    runs, and every ``probe`` steps two steps run with the other count, the second timed
    (the first after a switch pays for it: a woken thread, activations in the other
    core's cache; timing it kept the choice where it was).  The thread count set before
    (``fastnorm.set_num_threads``) is restored on exit.  The setting is process-wide:
    kernels called from other Python threads meanwhile get the same count."""

    def __init__(self, probe=48, clock=time.perf_counter):
        self.probe = probe
        self.clock = clock
        self.threads = _config.get_num_threads()
        self.counts = (self.threads, 1) if self.threads > 1 else (self.threads,)
        self.times = {c: [] for c in self.counts}
        self.steps = 0
        self.current = self.threads
        self._timed = False
        self._t0 = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _config.set_num_threads(self.threads)
        return False

    def estimate(self, count):
        """The median of the last 3 step times with ``count`` threads (None: none yet)."""
        t = sorted(self.times[count])
        return t[len(t) // 2] if t else None

    def choice(self):
        """(thread count for the next step, whether to time it)."""
        if len(self.counts) == 1:
            return self.threads, False
        phase = self.steps % self.probe
        untried = [c for c in self.counts if not self.times[c]]
        if untried:  # the first steps: two with each count
            return untried[0], phase % 2 == 1
        best = min(self.counts, key=self.estimate)
        other = self.counts[1] if best == self.counts[0] else self.counts[0]
        if phase >= self.probe - 2:
            return other, phase == self.probe - 1
        return best, True

    def start(self):
        self.current, self._timed = self.choice()
        _config.set_num_threads(self.current)
        self._t0 = self.clock()

    def stop(self):
        if self._timed:
            times = self.times[self.current]
            times.append(self.clock() - self._t0)
            del times[:-3]
        self.steps += 1


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory(limit=1 << 26):
    """Let glibc's malloc keep freed arrays of up to ``limit`` bytes for reuse instead of
    returning them to the OS (its default above ~128 KB-32 MB): a training step allocates
    the same activation and gradient arrays every step, and a fresh mmap'd array pays a
    page fault per 4 KB on first touch.  Measured on the digits CNN: 0.141 -> 0.088 s per
    epoch.  Process-wide and harmless elsewhere; a no-op off glibc."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, int(limit))
        libc.mallopt(_M_TRIM_THRESHOLD, int(2 * limit))
    except (OSError, AttributeError):
        pass


def _blas_single_thread():
    """BLAS on one thread while training: the matrices of these nets are small, and BLAS
    threads spinning next to the kernels' OpenMP threads on the same cores made a step
    slower than one thread (measured: 3,400-6,600 vs 9,700 samples/s, digits CNN)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


@contextlib.contextmanager
def _objects_frozen():
    """Python's collector skips the objects that exist before training (``gc.freeze``)
    until it ends.  A full collection walks every object of NumPy, SciPy, Numba and the
    rest: ~40 ms each, one every 5-10 epochs of the digits CNN, when the steps' own
    objects, freed as they go, leave nothing for it to find."""
    frozen = gc.isenabled()
    if frozen:
        gc.freeze()
    try:
        yield
    finally:
        if frozen:
            gc.unfreeze()


def _progress(it, n, batch_size, desc, enabled):
    if not enabled:
        return it
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, total=-(-n // batch_size), desc=desc, unit="batch", leave=False)


def config_metadata(config):
    """Checkpoint metadata (safetensors takes str -> str)."""
    return {"fastnorm_config": json.dumps(config, sort_keys=True)}


def model_from_metadata(metadata):
    try:
        config = json.loads(metadata["fastnorm_config"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError("the checkpoint has no fastnorm model configuration in its "
                          "metadata (was it saved by 'fastnorm train --save'?)") from None
    kwargs = {k: config[k] for k in ("model", "norm", "layout", "classes", "hidden") if k in config}
    kwargs["in_shape"] = tuple(config["in_shape"])
    return build_model(**kwargs), config
