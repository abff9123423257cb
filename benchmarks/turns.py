"""Processes for the benchmarks that take turns (test_bench_train.py, test_bench_floor.py):
each implementation runs in a spawned process of its own, so that nothing is inherited
from the benchmark's process and two OpenMP runtimes never share one."""
import multiprocessing


def spawn(target, args, what):
    """Start ``target(*args, conn)`` in a spawned process and wait until it sends "ready";
    returns (conn, process).  RuntimeError naming ``what`` if it does not start (its
    traceback is then on stderr)."""
    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child), daemon=True)
    proc.start()
    child.close()
    try:
        ready = conn.recv()
    except EOFError:  # it raised
        ready = None
    if ready != "ready":
        raise RuntimeError(f"the {what} process did not start (see its traceback above)")
    return conn, proc
