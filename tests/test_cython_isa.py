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


@pytest.mark.parametrize("dims", [(1, 6, 5, 1, 49), (1, 300, 7, 1, 1), (9, 1, 1, 33, 1),
                                  (3, 1, 4, 2, 25), (2, 70000, 1, 1, 1), (1, 40, 37, 1, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_twin_matches_portable_fused(dims, dtype):
    """The one-call passes (float32 in float32 with split means in the twin, scalar
    loops in the portable build) agree too: training forward, backward, eval."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(int(np.prod(dims))) * 3 + 100).astype(dtype)
    dy = rng.standard_normal(x.size).astype(dtype)
    C = dims[2] * dims[3]
    P, M, G, Kc, Ks = dims
    w = rng.uniform(0.5, 2, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    outs = []
    for mod in (portable, _twin()):
        be = CompiledBackend("cython", mod)
        y, dx, ye = np.empty_like(x), np.empty_like(x), np.empty_like(x)
        mean, invstd = np.empty(P * G, dtype), np.empty(P * G, dtype)
        rm, rv = np.zeros(G, dtype), np.ones(G, dtype)
        dw, db = np.empty(C, dtype), np.empty(C, dtype)
        assert be.train_fused(x, dims, w, b, 1e-5, True, y, mean, invstd, rm, rv, 0.1)
        assert be.backward_fused(dy, x, dims, mean, invstd, w, True, dx, dw, db)
        be.apply_fused(x, dims, mean, invstd, w, b, ye)
        outs.append((y, mean, invstd, rm, rv, dx, dw, db, ye))
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for a, c in zip(*outs):
        np.testing.assert_allclose(a, c, rtol=tol, atol=tol * np.abs(c).max())


def _infer_twins():
    portable_infer = pytest.importorskip("fastnorm._ext.infer")
    _twin()  # skips without AVX2+FMA
    try:
        return portable_infer, importlib.import_module("fastnorm._ext.infer_avx2")
    except ImportError:
        pytest.skip("the AVX2 twin of infer was not built")


def test_infer_module_is_the_twin_unless_told():
    from fastnorm import _backend, ops
    _infer_twins()
    assert ops._infer.__name__ == "fastnorm._ext.infer_avx2"
    code = "import fastnorm.ops as o; print(o._infer.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "FASTNORM_CYTHON_ISA": "baseline"})
    assert out.stdout.strip() == "fastnorm._ext.infer", out.stderr
    assert _backend.infer_module() is ops._infer


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_infer_twin_gives_the_same_bits(layout, dtype):
    """The helpers add, copy and compare (no multiply an FMA could fuse): both builds
    give the same bits, on one thread and two."""
    nhwc = layout == "NHWC"
    rng = np.random.default_rng(5)
    shape = (3, 9, 10, 6) if nhwc else (3, 6, 9, 10)
    x = np.floor(rng.standard_normal(shape) * 2).astype(dtype)  # ties for pooling
    x.flat[7] = np.nan
    g = rng.standard_normal(shape).astype(dtype)
    results = []
    for mod in _infer_twins():
        r = []
        for nt in (1, 2):
            for k, st, p in [((3, 3), (1, 1), (1, 1)), ((2, 2), (2, 2), (0, 0)),
                             ((3, 2), (2, 1), (1, 0))]:
                N, C, H, W, kH, kW, sh, sw, ph, pw, Ho, Wo = mod._geometry(x, k, st, p, nhwc)
                cols = np.empty(N * C * kH * kW * Ho * Wo, dtype)
                mod.im2col(x, cols, k, st, p, nhwc, nt)
                gx = np.empty_like(x)
                mod.col2im(cols * 0.5, gx, k, st, p, nhwc, nt)
                pshape = (N, Ho, Wo, C) if nhwc else (N, C, Ho, Wo)
                out, index = np.empty(pshape, dtype), np.empty(pshape, np.int32)
                mod.max_pool_argmax(x, out, index, k, st, p, nhwc, nt)
                gp = np.full_like(x, np.nan)  # overwritten, zeros included
                mod.max_pool_backward(np.ones(pshape, dtype), index, gp, k, st, p, nhwc, nt)
                r += [cols, gx, out, index, gp]
            y, gr = np.empty_like(x), np.empty_like(x)
            mod.relu(x, y, nt)
            mod.relu_backward(g, y, gr, nt)
            r += [y, gr]
        results.append(r)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}"))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_winograd_twins_give_the_same_bits(layout, dtype):
    """Winograd's transforms add and subtract only and the products are the same BLAS
    calls: both builds give the same output, input and kernel gradients."""
    cython_blas = pytest.importorskip("scipy.linalg.cython_blas")
    from fastnorm import ops
    nhwc = layout == "NHWC"
    rng = np.random.default_rng(9)
    x = rng.standard_normal((5, 6, 4, 8) if nhwc else (5, 8, 6, 4)).astype(dtype)
    w = rng.standard_normal((3, 8, 3, 3)).astype(dtype)
    g = rng.standard_normal((5, 6, 4, 3) if nhwc else (5, 3, 6, 4)).astype(dtype)
    U = ops._wino_kernels(w)
    caps = cython_blas.__pyx_capi__
    results = []
    for mod in _infer_twins():
        mod.set_gemm(caps["sgemm"], caps["dgemm"])
        r = []
        for nt in (1, 2):
            y = np.empty(g.shape, dtype)
            V = mod.wino_forward(x, U, y, nhwc, nt)
            dx = np.empty_like(x)
            dU = np.empty((mod.wino_groups(5, 6, 4), 16, 8, 3), dtype)
            assert mod.wino_backward(g, U, V, dx, dU, nhwc, nt)
            r += [y, dx, dU]
        results.append(r)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)



# Blocks of rows (W values each) on both sides of the thresholds of _simd.h's column sums
# (FN_STRIPS, FN_SUMS_STRIPS, FN_ROWS4_MAX_W): narrow rows, W not a multiple of 4, rows
# not a multiple of 4, blocks larger than the cache chunks, rows too wide for four at a
# time.
COLUMN_BLOCKS = [(5000, 8), (3001, 17), (2049, 32), (4099, 32), (1027, 61), (1537, 64),
                 (1003, 100), (401, 256), (303, 300)]


@pytest.mark.parametrize("rows,W", COLUMN_BLOCKS)
def test_column_sums_are_the_row_ordered_float64_sums(rows, W):
    """col_sums / col_grad_sums over one block: each column summed over the rows in
    float64, in both builds: the sequential float64 sums to within the rounding of a
    float64 sum of ``rows`` terms (the build's -fassociative-math may regroup them; a
    row left out or counted twice would be ~1e8 times that)."""
    rng = np.random.default_rng(W)
    x = (rng.standard_normal(rows * W) * 3 + 50).astype(np.float32)
    dy = rng.standard_normal(rows * W).astype(np.float32)
    shift = rng.uniform(45, 55, W)
    d = x.reshape(rows, W).astype(np.float64) - shift
    g = dy.reshape(rows, W).astype(np.float64)
    want = [np.cumsum(d, 0)[-1], np.cumsum(d * d, 0)[-1],
            np.cumsum(g, 0)[-1], np.cumsum(g * d, 0)[-1]]
    scale = [np.abs(d).sum(0), (d * d).sum(0), np.abs(g).sum(0), np.abs(g * d).sum(0)]
    mods = [portable] + ([_twin()] if portable.cpu_has_avx2_fma() else [])
    for mod in mods:
        got = [np.full(W, np.nan) for _ in range(4)]
        mod.col_sums(x, 1, rows, W, 1, 1, shift, got[0], got[1], 2)
        mod.col_grad_sums(dy, x, 1, rows, W, 1, 1, shift, got[2], got[3], 2)
        for name, a, b, s in zip(("sum", "squares", "dy", "dy*xc"), got, want, scale):
            np.testing.assert_allclose(a, b, rtol=0, atol=rows * 2.3e-16 * s.max(),
                                       err_msg=f"{mod.__name__} {name}")
