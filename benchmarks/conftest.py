"""Benchmark options: ``--threads N`` (default 2) for both fastnorm and PyTorch."""
import pytest

_SUMMARY = []  # lines for the end of the run (``summary`` fixture)


def pytest_addoption(parser):
    parser.addoption("--threads", type=int, default=2,
                     help="threads for fastnorm and PyTorch in the norm benchmarks (default 2)")
    parser.addoption("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                     help="before each benchmark, wait up to SECONDS for other processes to "
                          "leave the CPUs idle (a shared machine; default 0: do not wait)")


@pytest.fixture(scope="session", autouse=True)
def fixed_malloc_thresholds():
    """glibc serves a large allocation from fresh mmap'd pages (a page fault per 4 KB, or
    per 2 MB huge page with the zeroing) unless an earlier free raised its dynamic
    threshold, so whether a row pays page faults depended on the rows that ran before
    it: fastnorm's LayerNorm (4096,1024) forward took 26 faults per call before the
    PyTorch blocks ran and none after, PyTorch's LayerNorm (8,1048576) 7,783.  Fixed
    thresholds (``fastnorm.train.keep_freed_memory``, as ``fastnorm train`` sets them)
    let both libraries reuse freed outputs up to 64 MB in every row."""
    from fastnorm.train import keep_freed_memory
    keep_freed_memory()


@pytest.fixture(scope="session")
def threads(request):
    n = request.config.getoption("--threads")
    import fastnorm
    fastnorm.set_num_threads(n)
    try:
        import torch
        torch.set_num_threads(n)
    except ImportError:
        pass
    return n


@pytest.fixture
def quiet_wait(request):
    return request.config.getoption("--quiet-wait")


@pytest.fixture
def summary():
    """``summary(line)``: print ``line`` at the end of the run, after the tables."""
    return _SUMMARY.append


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables
def pytest_terminal_summary(terminalreporter):
    if _SUMMARY:
        terminalreporter.section("ratios measured in turns")
        for line in _SUMMARY:
            terminalreporter.write_line(line)
