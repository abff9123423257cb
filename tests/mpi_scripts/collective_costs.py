"""Run under ``mpiexec -n K`` (not a test): what data-parallel training of the digits CNN
exchanges per step, and how long each collective takes here.  Rank 0 prints a table."""
import time

import numpy as np
from mpi4py import MPI

import fastnorm as fn
from fastnorm import distributed, train

comm = MPI.COMM_WORLD
rank, K = comm.Get_rank(), comm.Get_size()


def timed(fn_, reps=2000):
    for _ in range(50):
        fn_()
    comm.Barrier()
    t = time.perf_counter()
    for _ in range(reps):
        fn_()
    return (time.perf_counter() - t) / reps


def main():
    model = distributed.SyncBatchNorm.convert(train.build_model("cnn", "batch"))
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, distributed.SyncBatchNorm):
            C = m.num_features
            send, recv = np.zeros(2 * C + 1), np.empty(K * (2 * C + 1))
            sums, total = np.zeros(2 * C), np.empty(2 * C)
            rows.append((f"SyncBatchNorm {name} (C={C}) forward Allgather", send.nbytes,
                         timed(lambda: comm.Allgather(send, recv))))
            rows.append((f"SyncBatchNorm {name} (C={C}) backward Allreduce", sums.nbytes,
                         timed(lambda: comm.Allreduce(sums, total))))
    for p in model.parameters():
        p.grad = np.zeros_like(p.data)
    nbytes = sum(p.data.nbytes for p in model.parameters())
    rows.append((f"allreduce_gradients ({sum(p.data.size for p in model.parameters())} "
                 f"float32 parameters)", nbytes,
                 timed(lambda: distributed.allreduce_gradients(model, comm=comm), 500)))
    if rank == 0:
        print(f"{K} ranks, {MPI.Get_library_version().splitlines()[0]}")
        print(f"| exchange | bytes sent per rank | time per call |\n|---|---:|---:|")
        for what, b, t in rows:
            print(f"| {what} | {b} | {t * 1e6:.1f} µs |")
        print(f"| total per training step | {sum(b for _, b, _ in rows)} | "
              f"{sum(t for *_, t in rows) * 1e6:.0f} µs |")


main()
