"""Numba kernels of the two shapes every normalization reduces to (see compiled.py).

Mirrors ``fastnorm/_ext/kernels.pyx`` name for name and argument for argument; the
driver in compiled.py calls either module.  Arrays are flat C-contiguous views.  All sums
are float64 whatever the input dtype (float32 input is transformed in float32, see
_split); sums are *shifted* (by one value of the group, close to its mean) so that
E[d^2] - E[d]^2 does not cancel even when the mean is 1e4 times the standard deviation.
``nthreads`` is applied by ``prepare`` (Numba threads are set per calling thread), the
kernels accept it to keep the signatures of the Cython module.

fastmath is limited to reassociation and contraction: full fastmath assumes no NaN/Inf,
and NaN must propagate as in PyTorch.
"""
import os
import platform
import sys
import tempfile


def _writable(path):
    """True when a file can be created in ``path`` (made if missing).  A real write, not
    ``os.access``: root passes permission checks but not a read-only mount."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def _configure_cache_dir():
    """Numba caches compiled kernels in the package's ``__pycache__``; when that is not
    writable (site-packages of another user, a read-only image) use the user's cache
    directory, else the temp directory.  Returns the directory chosen, or None when the
    package's own directory (or an explicit NUMBA_CACHE_DIR) is used."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    if _writable(os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")):
        return None
    user = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for base in (user, tempfile.gettempdir()):
        path = os.path.join(base, "fastnorm", "numba")
        if _writable(path):
            os.environ["NUMBA_CACHE_DIR"] = path
            if "numba" in sys.modules:  # numba has read its configuration already
                sys.modules["numba"].config.CACHE_DIR = path
            return path
    return None  # numba's own locators decide; with none, _jit compiles without a cache


_configure_cache_dir()

import numba  # noqa: E402
import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from fastnorm import _config  # noqa: E402

_FM = {"reassoc", "contract"}
# The float32 transforms: contraction only.  Reassociation could fold (x - hi) - lo into
# x - (hi + lo) and undo the split mean (see _split); these loops have no reductions.
_FM_F32 = {"contract"}


def _jit(parallel, fastmath=_FM, inline="never"):
    """``inline="always"``: inlined into the caller in Numba's IR, where it takes the
    caller's fastmath flags.  A call per run passing arrays costs ~25 ns (measured:
    (8192,768) LayerNorm apply 1.25 -> 1.9 ms at 2 threads with the float32 loops below
    called per row, against the loops written in place)."""
    def deco(fn):
        try:
            return njit(parallel=parallel, cache=True, nogil=True, fastmath=fastmath,
                        inline=inline)(fn)
        except RuntimeError:  # no writable cache location at all: run uncached
            return njit(parallel=parallel, cache=False, nogil=True, fastmath=fastmath,
                        inline=inline)(fn)
    return deco


def prepare(nthreads):
    """Apply the thread count in the calling thread (Numba's setting is per thread)."""
    n = min(nthreads, numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


# ----------------------------------------------------------------------------------------
# Streaming (non-temporal) stores, as the Cython module's fn_st8/_streams: an output of at
# least STREAM_MIN_BYTES (float32) is written around the caches, so that writing it does
# not first read each line from memory nor evict the inputs still to be read.  Numba has
# no such store, so the float32 dx loop's step of 8 values is an intrinsic (_dx8): the
# same float32 operations (the same contractions: equal bits, tested) on <8 x float>,
# stored as two 16-byte stores with !nontemporal metadata (vmovntps); each task that
# streamed ends with _sfence.  Only for 16-byte-aligned runs (plain stores otherwise).
# A first version computing into a buffer in L1 and copying it out with streaming stores
# was slower than plain stores (its slices and allocations: (4096,1024) LayerNorm
# backward 1.09 -> 1.63 ms); this one, alone, (8192,768) dx 1.51 -> 1.11 ms, 2 threads.
# ----------------------------------------------------------------------------------------

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
# Frozen into the compiled (and cached) kernels: it depends on the machine's cache only.
_STREAM_MIN = _config.STREAM_MIN_BYTES


def _splat8(builder, v):
    r = ir.Constant(ir.VectorType(v.type, 8), ir.Undefined)
    for i in range(8):
        r = builder.insert_element(r, v, ir.Constant(ir.IntType(32), i))
    return r


def _dx8_intrinsic(with_w):
    def impl(typingctx, dys, xs, ws, dxs, j, mh, ml, v1, v2, v3):
        """dxs[j:j + 8] = dys * ws * v1 + (((xs - mh) - ml) * v2 + v3) (ws unused when
        with_w is false) in float32, stored with non-temporal stores: dxs + j 16-byte
        aligned.  Only float32 arrays reach it (see _streams); other types compile to
        nothing."""
        f32 = types.float32
        if not all(isinstance(a, types.Array) and a.dtype == f32 for a in (dys, xs, ws, dxs)):
            return types.void(dys, xs, ws, dxs, j, mh, ml, v1, v2, v3), \
                lambda context, builder, sig, args: context.get_dummy_value()

        def codegen(context, builder, sig, args):
            arr = [context.make_array(sig.args[i])(context, builder, args[i]) for i in range(4)]
            v8 = ir.VectorType(ir.FloatType(), 8)
            v4 = ir.VectorType(ir.FloatType(), 4)
            c = ("contract",)

            def load(a):
                p = builder.gep(a.data, [args[4]])
                return builder.load(builder.bitcast(p, v8.as_pointer()), align=4)

            g = load(arr[0])
            if with_w:
                g = builder.fmul(g, load(arr[2]), flags=c)
            hi, lo, k1, k2, k3 = (_splat8(builder, a) for a in args[5:10])
            xc = builder.fsub(builder.fsub(load(arr[1]), hi), lo)
            r = builder.fadd(builder.fmul(g, k1, flags=c),
                             builder.fadd(builder.fmul(xc, k2, flags=c), k3, flags=c),
                             flags=c)
            md = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
            dp = builder.gep(arr[3].data, [args[4]])
            for h in (0, 4):
                half = builder.shuffle_vector(
                    r, r, ir.Constant(ir.VectorType(ir.IntType(32), 4), [h, h + 1, h + 2, h + 3]))
                q = builder.gep(dp, [ir.Constant(ir.IntType(64), h)])
                st = builder.store(half, builder.bitcast(q, v4.as_pointer()), align=16)
                if _X86:
                    st.set_metadata("nontemporal", md)
            return context.get_dummy_value()
        return types.void(dys, xs, ws, dxs, j, mh, ml, v1, v2, v3), codegen
    impl.__name__ = "_dx8w" if with_w else "_dx8"
    return intrinsic(impl)


_dx8w = _dx8_intrinsic(True)
_dx8 = _dx8_intrinsic(False)


@intrinsic
def _sfence(typingctx):
    """Orders this thread's streaming stores before what follows (the threads' join)."""
    def codegen(context, builder, sig, args):
        if _X86:
            # (LLVM's intrinsic: Numba's JIT has no inline assembler)
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse.sfence")
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def _addr(typingctx, a):
    """The address of the array's first value."""
    def codegen(context, builder, sig, args):
        ar = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.ptrtoint(ar.data, ir.IntType(64))
    return types.int64(a), codegen


@_jit(False, _FM, "always")
def _streams(a):
    """Whether a kernel writing the float32 array a streams its stores."""
    return a.itemsize == 4 and a.size * 4 >= _STREAM_MIN and _X86


# ----------------------------------------------------------------------------------------
# Segment shape: group (p, g) is M segments of L = Kc*Ks contiguous values, segment m at
# base + m*rowstride.  An *item* is a contiguous range [f0, f1) of the group's M*L values
# (the whole group unless a few large groups are split into parts).
# ----------------------------------------------------------------------------------------

# Inner loops run over slices with ``range(n)``: Numba vectorizes those, while an index
# like ``x[off + j]`` (which might be negative, so gets a wraparound check) is not.

@_jit(False)
def _item_sums(x, base, rowstride, L, f0, f1, shift):
    """Sums of d and d*d, d = x - shift, over the item."""
    s1 = 0.0
    s2 = 0.0
    m0 = f0 // L
    m1 = (f1 - 1) // L
    for m in range(m0, m1 + 1):
        ja = f0 - m * L if m == m0 else 0
        jb = f1 - m * L if m == m1 else L
        xs = x[base + m * rowstride + ja:base + m * rowstride + jb]
        for j in range(xs.size):
            d = np.float64(xs[j]) - shift
            s1 += d
            s2 += d * d
    return s1, s2


@_jit(False)
def _affine_run(xs, ys, a, b):
    for j in range(xs.size):
        ys[j] = np.float64(xs[j]) * a + b


# Float32 input is transformed in float32 arithmetic, as the Cython module does (see
# fastnorm/_ext/_simd.h): y = (x - mean) * a + b in double costs conversions both ways
# and half the vector width.  Done naively (x * a + b with b = bias - mean * a) it would
# cancel when the mean is large against the spread, so the mean is split into float32
# parts hi + lo: x - hi is exact for values near the mean (Sterbenz), and the centered
# value carries ~1 ulp of its own size.  As in the Cython module, whole steps of 8 values
# of a run go in float32 and the last < 8 in double (a group of one value then gives
# dx = 0 exactly, as the reference).  Sums stay in float64.  The helpers are inlined into
# _item_apply / _item_apply_backward, which are compiled with _FM_F32 for that reason.

@_jit(False, _FM_F32, "always")
def _split(v):
    """The float64 v as float32 hi + lo (hi + lo = v to ~2^-48 relative)."""
    hi = np.float32(v)
    return hi, np.float32(v - np.float64(hi))


@_jit(False, _FM_F32, "always")
def _affine_run32(xs, ys, mean, a, bias):
    """ys = (xs - mean) * a + bias (float32 arrays, float64 coefficients)."""
    n8 = xs.size - xs.size % 8
    mh, ml = _split(mean)
    a32 = np.float32(a)
    b32 = np.float32(bias)
    for j in range(n8):
        ys[j] = ((xs[j] - mh) - ml) * a32 + b32
    b = bias - mean * a
    for j in range(n8, xs.size):
        ys[j] = np.float64(xs[j]) * a + b


@_jit(False, _FM_F32, "always")
def _affine_values32(xs, ys, weight, bias, o, mean, r):
    """One parameter per value (LayerNorm): ys = (xs - mean) * r * ws + bs with
    ws = weight[o:o + n], bs likewise (float32 arrays; weight/bias empty when absent).
    Here the centered, scaled value is formed in double and rounded once, the parameters
    applied in float32: with the split mean the loop ran 20-40% slower than the float64
    one on (8192,768) from memory at 2 threads (0.9 -> 1.1-1.4 ms; 2x faster in cache),
    this way 0.96 -> 0.88 ms.  Each branch slices its own parameters (a slice made
    before the branches is a reference count Numba keeps: atomics on a shared counter)."""
    n = xs.size
    n8 = n - n % 8
    if weight.size > 0 and bias.size > 0:
        ws = weight[o:o + n]
        bs = bias[o:o + n]
        for j in range(n8):
            ys[j] = np.float32((np.float64(xs[j]) - mean) * r) * ws[j] + bs[j]
        for j in range(n8, n):
            ys[j] = (np.float64(xs[j]) - mean) * r * np.float64(ws[j]) + np.float64(bs[j])
    elif weight.size > 0:
        ws = weight[o:o + n]
        for j in range(n8):
            ys[j] = np.float32((np.float64(xs[j]) - mean) * r) * ws[j]
        for j in range(n8, n):
            ys[j] = (np.float64(xs[j]) - mean) * r * np.float64(ws[j])
    elif bias.size > 0:
        bs = bias[o:o + n]
        for j in range(n8):
            ys[j] = np.float32((np.float64(xs[j]) - mean) * r) + bs[j]
        for j in range(n8, n):
            ys[j] = (np.float64(xs[j]) - mean) * r + np.float64(bs[j])
    else:
        for j in range(n):
            ys[j] = (np.float64(xs[j]) - mean) * r


@_jit(False, _FM_F32)
def _item_apply(x, y, base, rowstride, L, Ks, f0, f1, mean, invstd, weight, bias, wofs):
    """y = (x - mean) * invstd * weight[c] + bias[c] over the item, as x*a + b (float64
    input) or with the split mean (float32)."""
    has_w = weight.size > 0
    has_b = bias.size > 0
    f32 = x.itemsize == 4
    m0 = f0 // L
    m1 = (f1 - 1) // L
    for m in range(m0, m1 + 1):
        ja = f0 - m * L if m == m0 else 0
        jb = f1 - m * L if m == m1 else L
        off = base + m * rowstride
        if Ks == 1:  # one parameter per value (LayerNorm-like): vectorize over kc
            xs = x[off + ja:off + jb]
            ys = y[off + ja:off + jb]
            if f32:
                _affine_values32(xs, ys, weight, bias, wofs + ja, mean, invstd)
            elif has_w and has_b:
                ws = weight[wofs + ja:wofs + jb]
                bs = bias[wofs + ja:wofs + jb]
                for j in range(xs.size):
                    ys[j] = (np.float64(xs[j]) - mean) * invstd * np.float64(ws[j]) + np.float64(bs[j])
            elif has_w:
                ws = weight[wofs + ja:wofs + jb]
                for j in range(xs.size):
                    ys[j] = (np.float64(xs[j]) - mean) * invstd * np.float64(ws[j])
            elif has_b:
                bs = bias[wofs + ja:wofs + jb]
                for j in range(xs.size):
                    ys[j] = (np.float64(xs[j]) - mean) * invstd + np.float64(bs[j])
            else:
                _affine_run(xs, ys, invstd, -mean * invstd)
        else:
            for kc in range(ja // Ks, (jb - 1) // Ks + 1):
                a = invstd
                if has_w:
                    a = invstd * weight[wofs + kc]
                bc = 0.0
                if has_b:
                    bc = np.float64(bias[wofs + kc])
                lo = max(ja, kc * Ks)
                hi = min(jb, kc * Ks + Ks)
                if f32:
                    _affine_run32(x[off + lo:off + hi], y[off + lo:off + hi], mean, a, bc)
                else:
                    _affine_run(x[off + lo:off + hi], y[off + lo:off + hi], a, bc - mean * a)


@_jit(False)
def _item_grad_sums(dy, x, base, rowstride, L, Ks, f0, f1, mean, weight, wofs,
                    sdy, sdyxc, sofs, want):
    """A = sum(g), B = sum(g*(x-mean)) with g = dy*weight[c]; with ``want``, per-channel
    sums of dy and dy*(x-mean) are added into sdy/sdyxc at sofs + kc."""
    has_w = weight.size > 0
    A = 0.0
    B = 0.0
    m0 = f0 // L
    m1 = (f1 - 1) // L
    for m in range(m0, m1 + 1):
        ja = f0 - m * L if m == m0 else 0
        jb = f1 - m * L if m == m1 else L
        off = base + m * rowstride
        if Ks == 1:
            dys = dy[off + ja:off + jb]
            xs = x[off + ja:off + jb]
            if want:  # one loop per case, as Cython's _grad_sums_values
                s1 = sdy[sofs + ja:sofs + jb]
                s2 = sdyxc[sofs + ja:sofs + jb]
                if has_w:
                    ws = weight[wofs + ja:wofs + jb]
                    for j in range(xs.size):
                        d = np.float64(dys[j])
                        xc = np.float64(xs[j]) - mean
                        w = np.float64(ws[j])
                        A += w * d
                        B += w * d * xc
                        s1[j] += d
                        s2[j] += d * xc
                else:
                    for j in range(xs.size):
                        d = np.float64(dys[j])
                        xc = np.float64(xs[j]) - mean
                        A += d
                        B += d * xc
                        s1[j] += d
                        s2[j] += d * xc
            elif has_w:
                ws = weight[wofs + ja:wofs + jb]
                for j in range(xs.size):
                    g = np.float64(dys[j]) * np.float64(ws[j])
                    A += g
                    B += g * (np.float64(xs[j]) - mean)
            else:
                for j in range(xs.size):
                    g = np.float64(dys[j])
                    A += g
                    B += g * (np.float64(xs[j]) - mean)
        else:
            for kc in range(ja // Ks, (jb - 1) // Ks + 1):
                lo = max(ja, kc * Ks)
                hi = min(jb, kc * Ks + Ks)
                dys = dy[off + lo:off + hi]
                xs = x[off + lo:off + hi]
                t1 = 0.0
                t2 = 0.0
                for j in range(xs.size):
                    d = np.float64(dys[j])
                    t1 += d
                    t2 += d * (np.float64(xs[j]) - mean)
                w = 1.0
                if has_w:
                    w = np.float64(weight[wofs + kc])
                A += w * t1
                B += w * t2
                if want:
                    sdy[sofs + kc] += t1
                    sdyxc[sofs + kc] += t2
    return A, B


@_jit(False)
def _dx_run(dys, xs, dxs, k1, k2, k3):
    for j in range(xs.size):
        dxs[j] = np.float64(dys[j]) * k1 + np.float64(xs[j]) * k2 + k3


@_jit(False, _FM_F32, "always")
def _dx_run32(dys, xs, dxs, ws, mean, k1, k2, k3, st):
    """dxs = dys * ws * k1 + xs * k2 + k3 (ws empty: none), float32 arrays: in float32 as
    (xs - mean) * k2 + (k3 + k2 * mean), since x * k2 and k3 cancel when the mean is
    large (see _affine_run32).  With ``st`` (see _streams) and an aligned run, the float32
    part with streaming stores."""
    n8 = xs.size - xs.size % 8
    mh, ml = _split(mean)
    v1 = np.float32(k1)
    v2 = np.float32(k2)
    v3 = np.float32(k3 + k2 * mean)
    if st and _addr(dxs) % 16 == 0:
        if ws.size > 0:
            for j in range(0, n8, 8):
                _dx8w(dys, xs, ws, dxs, j, mh, ml, v1, v2, v3)
        else:
            for j in range(0, n8, 8):
                _dx8(dys, xs, ws, dxs, j, mh, ml, v1, v2, v3)
    elif ws.size > 0:
        for j in range(n8):
            dxs[j] = dys[j] * ws[j] * v1 + (((xs[j] - mh) - ml) * v2 + v3)
    else:
        for j in range(n8):
            dxs[j] = dys[j] * v1 + (((xs[j] - mh) - ml) * v2 + v3)
    for j in range(n8, xs.size):
        g = np.float64(dys[j]) * k1
        if ws.size > 0:
            g *= np.float64(ws[j])
        dxs[j] = g + np.float64(xs[j]) * k2 + k3


@_jit(False, _FM_F32)
def _item_apply_backward(dy, x, dx, base, rowstride, L, Ks, f0, f1, invstd, k2, k3, mean,
                         weight, wofs, st):
    """dx = dy * invstd * weight[c] + x * k2 + k3 over the item; float32 input as
    (x - mean) * k2 + (k3 + k2 * mean) with the split mean (x * k2 and k3 cancel when
    the mean is large; ``mean`` is the group's)."""
    has_w = weight.size > 0
    f32 = x.itemsize == 4
    m0 = f0 // L
    m1 = (f1 - 1) // L
    for m in range(m0, m1 + 1):
        ja = f0 - m * L if m == m0 else 0
        jb = f1 - m * L if m == m1 else L
        off = base + m * rowstride
        if Ks == 1 and f32:
            _dx_run32(dy[off + ja:off + jb], x[off + ja:off + jb], dx[off + ja:off + jb],
                      weight[wofs + ja:wofs + jb] if has_w else weight, mean, invstd, k2,
                      k3, st)
        elif Ks == 1 and has_w:
            dys = dy[off + ja:off + jb]
            xs = x[off + ja:off + jb]
            dxs = dx[off + ja:off + jb]
            ws = weight[wofs + ja:wofs + jb]
            for j in range(xs.size):
                dxs[j] = (np.float64(dys[j]) * invstd * np.float64(ws[j])
                          + np.float64(xs[j]) * k2 + k3)
        elif Ks == 1:
            _dx_run(dy[off + ja:off + jb], x[off + ja:off + jb], dx[off + ja:off + jb],
                    invstd, k2, k3)
        else:
            for kc in range(ja // Ks, (jb - 1) // Ks + 1):
                k1 = invstd
                if has_w:
                    k1 = invstd * weight[wofs + kc]
                lo = max(ja, kc * Ks)
                hi = min(jb, kc * Ks + Ks)
                if f32:
                    _dx_run32(dy[off + lo:off + hi], x[off + lo:off + hi],
                              dx[off + lo:off + hi], weight[:0], mean, k1, k2, k3, st)
                else:
                    _dx_run(dy[off + lo:off + hi], x[off + lo:off + hi],
                            dx[off + lo:off + hi], k1, k2, k3)


@_jit(True)
def seg_forward(x, P, M, G, Kc, Ks, weight, bias, eps, center, y, mean, var, nthreads):
    """One group per task: shifted sums, then the affine while the group is in cache."""
    L = Kc * Ks
    rowstride = G * L
    n = M * L
    for u in prange(P * G):
        p = u // G
        g = u - p * G
        base = p * M * rowstride + g * L
        shift = np.float64(x[base]) if center else 0.0
        s1, s2 = _item_sums(x, base, rowstride, L, 0, n, shift)
        if center:
            mu = s1 / n
            v = max(s2 / n - mu * mu, 0.0)
            mu += shift
        else:
            mu = 0.0
            v = s2 / n
        mean[u] = mu
        var[u] = v
        _item_apply(x, y, base, rowstride, L, Ks, 0, n, mu, 1.0 / np.sqrt(v + eps),
                    weight, bias, g * Kc)


@_jit(True)
def seg_sums(x, P, M, G, Kc, Ks, nparts, shift, s1, s2, nthreads):
    """Partial shifted sums of each group split into nparts contiguous parts."""
    L = Kc * Ks
    rowstride = G * L
    n = M * L
    for it in prange(P * G * nparts):
        u = it // nparts
        part = it - u * nparts
        p = u // G
        g = u - p * G
        base = p * M * rowstride + g * L
        f0 = n * part // nparts
        f1 = n * (part + 1) // nparts
        a, b = _item_sums(x, base, rowstride, L, f0, f1, shift[u])
        s1[it] = a
        s2[it] = b


@_jit(True)
def seg_apply(x, P, M, G, Kc, Ks, nparts, mean, invstd, weight, bias, y, nthreads):
    """y = (x - mean) * invstd * weight + bias, each group in nparts parts; groups of
    strided runs (BatchNorm NCHW, nparts 1) row by row in memory order, which the
    prefetchers follow (a group at a time strides over the whole input)."""
    L = Kc * Ks
    rowstride = G * L
    n = M * L
    if nparts == 1 and M > 1:
        for it in prange(P * M):
            p = it // M
            for g in range(G):
                _item_apply(x, y, it * rowstride + g * L, rowstride, L, Ks, 0, L,
                            mean[p * G + g], invstd[p * G + g], weight, bias, g * Kc)
        return
    for it in prange(P * G * nparts):
        u = it // nparts
        part = it - u * nparts
        p = u // G
        g = u - p * G
        base = p * M * rowstride + g * L
        f0 = n * part // nparts
        f1 = n * (part + 1) // nparts
        _item_apply(x, y, base, rowstride, L, Ks, f0, f1, mean[u], invstd[u],
                    weight, bias, g * Kc)


@_jit(True)
def seg_backward(dy, x, P, M, G, Kc, Ks, mean, invstd, weight, center, dx, sdy, sdyxc,
                 want, nthreads):
    """One group per task: gradient sums, then dx while the group is in cache.
    sdy/sdyxc (P*G*Kc) receive the per-channel sums when ``want``."""
    L = Kc * Ks
    rowstride = G * L
    n = M * L
    st = _streams(dx)
    for u in prange(P * G):
        p = u // G
        g = u - p * G
        base = p * M * rowstride + g * L
        mu = mean[u]
        r = invstd[u]
        if want:
            for kc in range(Kc):
                sdy[u * Kc + kc] = 0.0
                sdyxc[u * Kc + kc] = 0.0
        A, B = _item_grad_sums(dy, x, base, rowstride, L, Ks, 0, n, mu, weight, g * Kc,
                               sdy, sdyxc, u * Kc, want)
        if dx.size > 0:
            if not center:
                A = 0.0
            k2 = -r * r * r * B / n
            k3 = r * (mu * r * r * B / n - A / n)
            _item_apply_backward(dy, x, dx, base, rowstride, L, Ks, 0, n, r, k2, k3, mu,
                                 weight, g * Kc, st)
            if st:
                _sfence()


@_jit(True)
def seg_grad_sums(dy, x, P, M, G, Kc, Ks, nparts, mean, weight, A, B, sdy, sdyxc, want,
                  nthreads):
    """Partial gradient sums per (group, part); sdy/sdyxc are (P*G*nparts*Kc)."""
    L = Kc * Ks
    rowstride = G * L
    n = M * L
    for it in prange(P * G * nparts):
        u = it // nparts
        part = it - u * nparts
        p = u // G
        g = u - p * G
        base = p * M * rowstride + g * L
        f0 = n * part // nparts
        f1 = n * (part + 1) // nparts
        if want:
            for kc in range(Kc):
                sdy[it * Kc + kc] = 0.0
                sdyxc[it * Kc + kc] = 0.0
        a, b = _item_grad_sums(dy, x, base, rowstride, L, Ks, f0, f1, mean[u], weight,
                               g * Kc, sdy, sdyxc, it * Kc, want)
        A[it] = a
        B[it] = b


@_jit(True)
def seg_apply_backward(dy, x, P, M, G, Kc, Ks, nparts, mean, invstd, k2, k3, weight, dx,
                       nthreads):
    """dx = dy * invstd * weight + x * k2 + k3 (k2, k3 per group), in parts (``mean``,
    the groups' means, for the float32 evaluation)."""
    L = Kc * Ks
    rowstride = G * L
    n = M * L
    st = _streams(dx)
    for it in prange(P * G * nparts):
        u = it // nparts
        part = it - u * nparts
        p = u // G
        g = u - p * G
        base = p * M * rowstride + g * L
        f0 = n * part // nparts
        f1 = n * (part + 1) // nparts
        _item_apply_backward(dy, x, dx, base, rowstride, L, Ks, f0, f1, invstd[u],
                             k2[u], k3[u], mean[u], weight, g * Kc, st)
        if st:
            _sfence()


# ----------------------------------------------------------------------------------------
# Column shape: x is (P, M, W, Ks) and each of the W columns (a run of Ks values per
# row) is reduced over M rows: the channels-last layouts (Ks = 1) and large BatchNorm
# NCHW inputs, read in memory order.  An item is (p, a block of rows); it sums into its
# own row of per-item accumulators, merged afterwards in a fixed order.
# ----------------------------------------------------------------------------------------

@_jit(False, _FM, "always")
def _rows4(a, m, W):
    """Rows m to m + 3 of ``a``, a flat array of rows of W values."""
    return (a[m * W:(m + 1) * W], a[(m + 1) * W:(m + 2) * W], a[(m + 2) * W:(m + 3) * W],
            a[(m + 3) * W:(m + 4) * W])


@_jit(False)
def _col_sums_rows(x, rows, W, sh, a1, a2):
    """a1[w] += sum_m (x[m, w] - sh[w]), a2[w] likewise squared, over ``rows`` rows of W
    values (x flat).  Four rows per pass over the accumulators (up to W = 256, as the
    Cython module's register strips): one row at a time, a load and a store of two
    accumulators per value bound the loop, and for narrow rows the loop's setup per row
    (one thread: (256,28,28,32) 2.4 -> 0.9 ms, (16,28,28,256) 0.87 -> 0.61 ms).  The loop
    is not vectorized (too many arrays for LLVM's runtime alias checks) and still faster.
    Each column's order is fixed by the number of rows alone."""
    m = 0
    while m + 4 <= rows and W <= 256:
        x0, x1, x2, x3 = _rows4(x, m, W)
        for w in range(W):
            h = sh[w]
            d0 = np.float64(x0[w]) - h
            d1 = np.float64(x1[w]) - h
            d2 = np.float64(x2[w]) - h
            d3 = np.float64(x3[w]) - h
            a1[w] += (d0 + d1) + (d2 + d3)
            a2[w] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        m += 4
    while m < rows:
        xr = x[m * W:(m + 1) * W]
        for w in range(W):
            d = np.float64(xr[w]) - sh[w]
            a1[w] += d
            a2[w] += d * d
        m += 1


@_jit(True)
def col_sums(x, P, M, W, Ks, nch, shift, s1, s2, nthreads):
    """s1[item, w] = sum(x - shift[p, w]), s2 likewise squared, over the item's rows (x is
    (P, M, W, Ks): a column is a run of Ks values per row, read in memory order)."""
    for it in prange(P * nch):
        p = it // nch
        c = it - p * nch
        m0 = M * c // nch
        m1 = M * (c + 1) // nch
        a1 = s1[it * W:(it + 1) * W]
        a2 = s2[it * W:(it + 1) * W]
        sh = shift[p * W:(p + 1) * W]
        a1[:] = 0.0
        a2[:] = 0.0
        if Ks == 1:
            _col_sums_rows(x[(p * M + m0) * W:(p * M + m1) * W], m1 - m0, W, sh, a1, a2)
            continue
        for m in range(m0, m1):
            lo = (p * M + m) * W * Ks
            for w in range(W):
                xr = x[lo + w * Ks:lo + (w + 1) * Ks]  # (slices: vectorized loops)
                sw = sh[w]
                t1 = 0.0
                t2 = 0.0
                for k in range(Ks):
                    d = np.float64(xr[k]) - sw
                    t1 += d
                    t2 += d * d
                a1[w] += t1
                a2[w] += t2


@_jit(True)
def col_apply(x, P, M, W, Ks, nch, alpha, beta, y, nthreads):
    """y[p, m, w, :] = x * alpha[p, w] + beta[p, w]."""
    for it in prange(P * nch):
        p = it // nch
        c = it - p * nch
        m0 = M * c // nch
        m1 = M * (c + 1) // nch
        al = alpha[p * W:(p + 1) * W]
        be = beta[p * W:(p + 1) * W]
        for m in range(m0, m1):
            if Ks == 1:  # a row of W values (vectorized)
                xr = x[(p * M + m) * W:(p * M + m + 1) * W]
                yr = y[(p * M + m) * W:(p * M + m + 1) * W]
                for w in range(W):
                    yr[w] = np.float64(xr[w]) * al[w] + be[w]
                continue
            for w in range(W):
                lo = ((p * M + m) * W + w) * Ks
                xr = x[lo:lo + Ks]
                yr = y[lo:lo + Ks]
                a = al[w]
                b = be[w]
                for k in range(Ks):
                    yr[k] = np.float64(xr[k]) * a + b


@_jit(False)
def _col_grad_sums_rows(dy, x, rows, W, mu, a1, a2):
    """a1[w] += sum_m dy[m, w], a2[w] += sum_m dy * (x[m, w] - mu[w]) over ``rows`` rows,
    four rows per pass over the accumulators (see _col_sums_rows) when they are narrow:
    eight streams of wide rows read slower from memory than two ((16,28,28,256) 1.2 ->
    1.9 ms; (256,28,28,32) 2.5 -> 1.7 ms)."""
    m = 0
    while m + 4 <= rows and W <= 64:
        g0, g1, g2, g3 = _rows4(dy, m, W)
        x0, x1, x2, x3 = _rows4(x, m, W)
        for w in range(W):
            h = mu[w]
            e0 = np.float64(g0[w])
            e1 = np.float64(g1[w])
            e2 = np.float64(g2[w])
            e3 = np.float64(g3[w])
            a1[w] += (e0 + e1) + (e2 + e3)
            a2[w] += ((e0 * (np.float64(x0[w]) - h) + e1 * (np.float64(x1[w]) - h))
                      + (e2 * (np.float64(x2[w]) - h) + e3 * (np.float64(x3[w]) - h)))
        m += 4
    while m < rows:
        gr = dy[m * W:(m + 1) * W]
        xr = x[m * W:(m + 1) * W]
        for w in range(W):
            d = np.float64(gr[w])
            a1[w] += d
            a2[w] += d * (np.float64(xr[w]) - mu[w])
        m += 1


@_jit(True)
def col_grad_sums(dy, x, P, M, W, Ks, nch, mean, sdy, sdyxc, nthreads):
    """sdy[item, w] = sum(dy), sdyxc[item, w] = sum(dy * (x - mean[p, w]))."""
    for it in prange(P * nch):
        p = it // nch
        c = it - p * nch
        m0 = M * c // nch
        m1 = M * (c + 1) // nch
        a1 = sdy[it * W:(it + 1) * W]
        a2 = sdyxc[it * W:(it + 1) * W]
        mu = mean[p * W:(p + 1) * W]
        a1[:] = 0.0
        a2[:] = 0.0
        if Ks == 1:
            lo = (p * M + m0) * W
            hi = (p * M + m1) * W
            _col_grad_sums_rows(dy[lo:hi], x[lo:hi], m1 - m0, W, mu, a1, a2)
            continue
        for m in range(m0, m1):
            lo = (p * M + m) * W * Ks
            dyr = dy[lo:lo + W * Ks]
            xr = x[lo:lo + W * Ks]
            for w in range(W):
                dys = dyr[w * Ks:(w + 1) * Ks]
                xs = xr[w * Ks:(w + 1) * Ks]
                mw = mu[w]
                t1 = 0.0
                t2 = 0.0
                for k in range(Ks):
                    d = np.float64(dys[k])
                    t1 += d
                    t2 += d * (np.float64(xs[k]) - mw)
                a1[w] += t1
                a2[w] += t2


@_jit(True)
def col_apply_backward(dy, x, P, M, W, Ks, nch, k1, k2, k3, dx, nthreads):
    """dx[p, m, w, :] = dy * k1[p, w] + x * k2[p, w] + k3[p, w]."""
    for it in prange(P * nch):
        p = it // nch
        c = it - p * nch
        m0 = M * c // nch
        m1 = M * (c + 1) // nch
        c1 = k1[p * W:(p + 1) * W]
        c2 = k2[p * W:(p + 1) * W]
        c3 = k3[p * W:(p + 1) * W]
        for m in range(m0, m1):
            if Ks == 1:  # a row of W values (vectorized)
                lo = (p * M + m) * W
                dyr = dy[lo:lo + W]
                xr = x[lo:lo + W]
                dxr = dx[lo:lo + W]
                for w in range(W):
                    dxr[w] = np.float64(dyr[w]) * c1[w] + np.float64(xr[w]) * c2[w] + c3[w]
                continue
            for w in range(W):
                lo = ((p * M + m) * W + w) * Ks
                dyr = dy[lo:lo + Ks]
                xr = x[lo:lo + Ks]
                dxr = dx[lo:lo + Ks]
                a = c1[w]
                b = c2[w]
                e = c3[w]
                for k in range(Ks):
                    dxr[k] = np.float64(dyr[k]) * a + np.float64(xr[k]) * b + e


@_jit(False, _FM, "always")
def _row_pgrads_add(dy, x, off, k0, k1, mu, s, dw, db):
    """dw[k - k0] += dy * (x - mu) * s, db[k - k0] += dy over columns [k0, k1) of the row
    at ``off`` (one row's terms of the parameter gradients)."""
    dyr = dy[off + k0:off + k1]
    xr = x[off + k0:off + k1]
    for k in range(k1 - k0):
        d = np.float64(dyr[k])
        dw[k] += d * (np.float64(xr[k]) - mu) * s
        db[k] += d


@_jit(True)
def rows_backward(dy, x, R, K, nrch, mean, invstd, weight, center, dx, dweight, dbias,
                  nthreads):
    """Row norms (LayerNorm/RMSNorm): dx and the parameter gradients, the R rows in nrch
    chunks (chunk c sums into dweight/dbias[c*K:(c+1)*K], merged by the caller), each
    chunk in blocks of rows: a block's dx, then its parameter gradients while its dy and
    x are in cache (256 KB of each; the Cython module's ``rows_backward``)."""
    B = max(1, min(64, (262144 // x.itemsize) // K))
    st = _streams(dx)
    for c in prange(nrch):
        r0 = R * c // nrch
        r1 = R * (c + 1) // nrch
        dw = dweight[c * K:(c + 1) * K]
        db = dbias[c * K:(c + 1) * K]
        dw[:] = 0.0
        db[:] = 0.0
        a = r0
        while a < r1:
            b = min(a + B, r1)
            for r in range(a, b):  # dx of the row, as seg_backward computes it
                mu = mean[r]
                s = invstd[r]
                A, Bs = _item_grad_sums(dy, x, r * K, K, K, 1, 0, K, mu, weight, 0, dw, db,
                                        0, False)
                if not center:
                    A = 0.0
                k2 = -s * s * s * Bs / K
                k3 = s * (mu * s * s * Bs / K - A / K)
                _item_apply_backward(dy, x, dx, r * K, K, K, 1, 0, K, s, k2, k3, mu, weight,
                                     0, st)
            for r in range(a, b):  # the block's parameter gradients, rows in order
                _row_pgrads_add(dy, x, r * K, 0, K, mean[r], invstd[r], dw, db)
            a = b
        if st:
            _sfence()


@_jit(True)
def row_param_grads(dy, x, R, K, nrch, nblk, mean, invstd, dweight, dbias, nthreads):
    """Per-value parameter gradients of row norms (LayerNorm/RMSNorm):
    dweight[k] = sum_r dy * (x - mean[r]) * invstd[r], dbias[k] = sum_r dy.
    Rows are split into nrch chunks (chunk c sums into dweight/dbias[c*K:(c+1)*K], merged
    by the caller) and columns into nblk blocks; each (chunk, block) owns its outputs."""
    for it in prange(nrch * nblk):
        c = it // nblk
        b = it - c * nblk
        r0 = R * c // nrch
        r1 = R * (c + 1) // nrch
        k0 = K * b // nblk
        k1 = K * (b + 1) // nblk
        dw = dweight[c * K + k0:c * K + k1]
        db = dbias[c * K + k0:c * K + k1]
        dw[:] = 0.0
        db[:] = 0.0
        for r in range(r0, r1):
            _row_pgrads_add(dy, x, r * K, k0, k1, mean[r], invstd[r], dw, db)


@_jit(True)
def rows_apply_backward_pgrads(dy, x, R, K, nblk, mean, invstd, k2, k3, weight, dx, dweight,
                               dbias, nthreads):
    """Row norms of a few long rows: dx = dy * invstd * weight + x * k2 + k3 (k2, k3 per
    row) and the parameter gradients, by blocks of columns over all rows: block b owns
    columns [K*b/nblk, K*(b+1)/nblk) of dweight/dbias, and for each row computes its part
    of dx, then that part's gradient terms while its dy and x are in cache (one read of
    dy and x for both; the Cython module's function of the same name)."""
    st = _streams(dx)
    for b in prange(nblk):
        k0 = K * b // nblk
        k1 = K * (b + 1) // nblk
        dw = dweight[k0:k1]
        db = dbias[k0:k1]
        dw[:] = 0.0
        db[:] = 0.0
        for r in range(R):
            mu = mean[r]
            s = invstd[r]
            _item_apply_backward(dy, x, dx, r * K, K, K, 1, k0, k1, s, k2[r], k3[r], mu,
                                 weight, 0, st)
            _row_pgrads_add(dy, x, r * K, k0, k1, mu, s, dw, db)
        if st:
            _sfence()
