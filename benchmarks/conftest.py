"""Benchmark options: ``--threads N`` (default 2) for both fastnorm and PyTorch."""
import pytest


def pytest_addoption(parser):
    parser.addoption("--threads", type=int, default=2,
                     help="threads for fastnorm and PyTorch in the norm benchmarks (default 2)")
    parser.addoption("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                     help="before each benchmark, wait up to SECONDS for other processes to "
                          "leave the CPUs idle (a shared machine; default 0: do not wait)")


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
