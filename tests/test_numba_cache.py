"""Numba's kernel cache when the package directory cannot be written."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba")

SCRIPT = textwrap.dedent("""
    import os, sys, tempfile
    import fastnorm
    pkg = os.path.join(os.path.dirname(fastnorm.__file__), "kernels", "__pycache__")
    real = tempfile.TemporaryFile
    def read_only(*a, dir=None, **k):   # the package's cache directory refuses writes
        if dir is not None and os.path.abspath(dir) == os.path.abspath(pkg):
            raise PermissionError(13, "read-only file system", dir)
        return real(*a, dir=dir, **k)
    tempfile.TemporaryFile = read_only
    import numpy as np, fastnorm.functional as F
    with fastnorm.use_backend("numba"):
        y, _, _ = F.batch_norm_train(np.arange(12, dtype=np.float32).reshape(4, 3))
    print(os.environ.get("NUMBA_CACHE_DIR"))
    print(float(np.abs(y.mean(0)).max()))
""")


def test_read_only_package_dir_caches_in_user_dir(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    cache_dir, err = r.stdout.split()
    assert cache_dir == str(tmp_path / "fastnorm" / "numba")
    assert float(err) < 1e-6
    cached = [f for _, _, files in os.walk(cache_dir) for f in files]
    assert any(f.endswith(".nbi") for f in cached), cached  # the kernels were cached there


def test_no_cache_location_still_compiles(monkeypatch):
    from fastnorm.kernels import numba_kernels as nk

    calls = []

    def njit(**kw):
        calls.append(kw["cache"])
        if kw["cache"]:
            raise RuntimeError("cannot cache function: no locator available")
        return lambda fn: fn

    monkeypatch.setattr(nk, "njit", njit)
    f = nk._jit(False)(lambda a: a + 1)
    assert f(1) == 2 and calls == [True, False]
