"""Run under ``mpiexec -n K``: data-parallel training (``train.fit(distributed=...)``:
SyncBatchNorm, parameter broadcast, DistributedSampler, summed gradients) for a few
epochs on part of the digits, against one process training plain BatchNorm on the same
global batches (``distributed=MPI.COMM_SELF``: one rank, the same sampler).  ARGV: the
number of training images (194 with batch 32 ends each epoch on a batch of 2, which
leaves a rank with no samples when K = 3).  Prints one summary line on rank 0."""
import sys

import numpy as np
from mpi4py import MPI

import fastnorm as fn
from fastnorm import data, distributed, train

comm = MPI.COMM_WORLD
rank, K = comm.Get_rank(), comm.Get_size()


def quiet(*args, **kwargs):
    pass


def trained(model_kind, layout, optimizer, on, n_train, sync):
    fn.manual_seed(0 if rank == 0 else 100 + rank)  # other ranks start elsewhere: broadcast
    (xtr, ytr), (xte, yte) = data.load_digits()
    xtr, ytr = train.to_layout(xtr[:n_train].astype(np.float64), layout), ytr[:n_train]
    xte = train.to_layout(xte[:64].astype(np.float64), layout)
    model = train.build_model(model_kind, "batch", layout, dtype=np.float64)
    if sync:
        model = distributed.SyncBatchNorm.convert(model, comm=on)
    history = train.fit(model, (xtr, ytr), (xte, yte[:64]), epochs=2, batch_size=32,
                        lr=0.05 if optimizer == "sgd" else 1e-3, optimizer=optimizer,
                        progress=False, log=quiet, distributed=on, seed=7)
    return model.state_dict(), history


def main():
    n_train = int(sys.argv[1])
    cases = [("mlp", "NCHW", "sgd"), ("cnn", "NCHW", "sgd"), ("cnn", "NHWC", "adam")]
    worst = 0.0
    for model_kind, layout, optimizer in cases:
        with fn.use_backend("cython" if "cython" in fn.backends() else "numpy"):
            state, history = trained(model_kind, layout, optimizer, comm, n_train, True)
            if rank == 0:
                ref, ref_history = trained(model_kind, layout, optimizer, MPI.COMM_SELF,
                                           n_train, False)
        for key, value in state.items():
            if any(not np.array_equal(value, other) for other in comm.allgather(value)):
                raise AssertionError(f"{model_kind} {layout}: {key} differs between ranks")
        if rank == 0:
            assert list(state) == list(ref), (list(state), list(ref))
            for key, value in state.items():
                err = float(np.abs(value - ref[key]).max()) if value.size else 0.0
                scale = max(1.0, float(np.abs(ref[key]).max()))
                worst = max(worst, err / scale)
                if not err <= 1e-10 * scale:
                    raise AssertionError(f"{model_kind} {layout} {optimizer}: {key}: max "
                                         f"error {err:.3g} against one process")
            for h, r in zip(history, ref_history):
                assert abs(h["train_loss"] - r["train_loss"]) < 1e-10, (h, r)
                assert h["train_acc"] == r["train_acc"] and h["test_acc"] == r["test_acc"]
        comm.Barrier()
    if rank == 0:
        steps = 2 * -(-n_train // 32)
        print(f"train: {len(cases)} models x {steps} steps on {K} ranks match one process "
              f"(max relative difference {worst:.2g})", flush=True)


main()
