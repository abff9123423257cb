"""The portable Cython build and its AVX2+FMA twin compute the same thing."""
import importlib
import subprocess
import sys

import numpy as np
import pytest

from fastnorm.kernels.compiled import CompiledBackend

portable = pytest.importorskip("fastnorm._ext.kernels")


def _twin():
    if not portable.cpu_has_avx2_fma():
        pytest.skip("this CPU has no AVX2+FMA")
    try:
        return importlib.import_module("fastnorm._ext.kernels_avx2")
    except ImportError:
        pytest.skip("the AVX2 twin was not built")


def test_isa_names():
    assert portable.isa() == "baseline"
    assert _twin().isa() == "avx2"


@pytest.mark.parametrize("dims", [(1, 6, 5, 1, 49), (1, 300, 7, 1, 1), (9, 1, 1, 33, 1),
                                  (3, 1, 4, 2, 25), (2, 70000, 1, 1, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_twin_matches_portable(dims, dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(int(np.prod(dims))) * 3 + 100).astype(dtype)
    dy = rng.standard_normal(x.size).astype(dtype)
    C = dims[2] * dims[3]
    w = rng.uniform(0.5, 2, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    outs = []
    for mod in (portable, _twin()):
        be = CompiledBackend("cython", mod)
        y = np.empty_like(x)
        dx = np.empty_like(x)
        mean, var = be.forward(x, dims, w, b, 1e-5, True, y)
        dw, db = be.backward(dy, x, dims, mean, 1 / np.sqrt(var + 1e-5), w, True, dx, True)
        outs.append((y, mean, var, dx, dw, db))
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for a, c in zip(*outs):
        np.testing.assert_allclose(a, c, rtol=tol, atol=tol * np.abs(c).max())


def test_env_selects_portable():
    code = ("import fastnorm._backend as b; print(b.get_kernels('cython').k.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "FASTNORM_CYTHON_ISA": "baseline"})
    assert out.stdout.strip() == "fastnorm._ext.kernels", out.stderr
