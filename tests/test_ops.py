"""Every differentiable op: numerical gradient checks in float64, and values and gradients
against PyTorch in float32."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastnorm as fn  # noqa: E402
import fastnorm.functional as F  # noqa: E402
from fastnorm import ops  # noqa: E402
from fastnorm.autograd import Tensor  # noqa: E402
from fastnorm.testing import gradcheck  # noqa: E402

torch.set_num_threads(1)
TF = torch.nn.functional


def rand(*shape, dtype=np.float64, seed=0, scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + shift).astype(dtype)


def leaf(*shape, seed=0, **kw):
    return Tensor(rand(*shape, seed=seed, **kw), requires_grad=True)


def positive(*shape, seed=0):
    return Tensor(np.abs(rand(*shape, seed=seed)) + 0.5, requires_grad=True)


def nhwc(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


# --------------------------------------------------------------------- gradcheck ----
C3 = rand(3, dtype=np.float64, seed=9)  # a constant operand

GRADCHECK = {
    "add_broadcast": (lambda a, b: a + b, lambda: [leaf(3, 1, 4), leaf(5, 4, seed=1)]),
    "add_scalar_and_array": (lambda a: 2.0 + a + C3, lambda: [leaf(2, 3)]),
    "sub": (lambda a, b: a - b, lambda: [leaf(2, 3), leaf(3, seed=1)]),
    "rsub": (lambda a: 1.0 - a, lambda: [leaf(4)]),
    "mul": (lambda a, b: a * b, lambda: [leaf(2, 3), leaf(2, 1, seed=1)]),
    "div": (lambda a, b: a / b, lambda: [leaf(2, 3), positive(3, seed=1)]),
    "rdiv": (lambda a: 2.0 / a, lambda: [positive(5)]),
    "neg": (lambda a: -a, lambda: [leaf(4)]),
    "pow3": (lambda a: a ** 3, lambda: [leaf(4)]),
    "pow_half": (lambda a: a ** 0.5, lambda: [positive(4)]),
    "pow_zero": (lambda a: a ** 0, lambda: [leaf(4)]),
    "pow_tensor": (lambda a, b: a ** b, lambda: [positive(4), leaf(4, seed=1)]),
    "rpow": (lambda a: 2.0 ** a, lambda: [leaf(4)]),
    "matmul_2d": (lambda a, b: a @ b, lambda: [leaf(3, 4), leaf(4, 5, seed=1)]),
    "matmul_vec_mat": (lambda a, b: a @ b, lambda: [leaf(4), leaf(4, 5, seed=1)]),
    "matmul_mat_vec": (lambda a, b: a @ b, lambda: [leaf(3, 4), leaf(4, seed=1)]),
    "matmul_vec_vec": (lambda a, b: a @ b, lambda: [leaf(4), leaf(4, seed=1)]),
    "matmul_batched": (lambda a, b: a @ b, lambda: [leaf(2, 3, 4), leaf(4, 5, seed=1)]),
    "matmul_broadcast": (lambda a, b: a @ b, lambda: [leaf(2, 1, 3, 4), leaf(5, 4, 2, seed=1)]),
    "matmul_vec_batched": (lambda a, b: a @ b, lambda: [leaf(4), leaf(2, 4, 3, seed=1)]),
    "sum_all": (lambda a: a.sum(), lambda: [leaf(2, 3)]),
    "sum_axis": (lambda a: a.sum(axis=1), lambda: [leaf(2, 3, 4)]),
    "sum_axes_keepdims": (lambda a: a.sum(axis=(0, -1), keepdims=True), lambda: [leaf(2, 3, 4)]),
    "mean_all": (lambda a: a.mean(), lambda: [leaf(2, 3)]),
    "mean_axis": (lambda a: a.mean(axis=-1, keepdims=True), lambda: [leaf(2, 3, 4)]),
    "reshape": (lambda a: a.reshape(4, -1) * C3[:1], lambda: [leaf(2, 3, 2)]),
    "reshape_tuple": (lambda a: ops.reshape(a, (6,)), lambda: [leaf(2, 3)]),
    "transpose": (lambda a: a.transpose(2, 0, 1), lambda: [leaf(2, 3, 4)]),
    "transpose_reverse": (lambda a: a.transpose(), lambda: [leaf(2, 3, 4)]),
    "permute": (lambda a: a.permute((1, 0, 2)), lambda: [leaf(2, 3, 4)]),
    "T": (lambda a: a.T @ a, lambda: [leaf(3, 2)]),
    "getitem": (lambda a: a[1:, ::2, None], lambda: [leaf(3, 4)]),
    "getitem_fancy": (lambda a: a[np.array([2, 0, 2])], lambda: [leaf(3, 4)]),
    "concatenate": (lambda a, b: F.concatenate([a, b, C3[None]], axis=0),
                    lambda: [leaf(2, 3), leaf(1, 3, seed=1)]),
    "concatenate_axis1": (lambda a, b: F.concatenate([a, b], axis=-1),
                          lambda: [leaf(2, 3), leaf(2, 2, seed=1)]),
    "exp": (lambda a: a.exp(), lambda: [leaf(5)]),
    "log": (lambda a: a.log(), lambda: [positive(5)]),
    "relu": (lambda a: a.relu(), lambda: [leaf(10)]),
    "sigmoid": (lambda a: a.sigmoid(), lambda: [leaf(10, scale=5)]),
    "tanh": (lambda a: a.tanh(), lambda: [leaf(10)]),
    "gelu": (lambda a: F.gelu(a), lambda: [leaf(20, scale=3)]),
    "gelu_tanh": (lambda a: F.gelu(a, approximate="tanh"), lambda: [leaf(20, scale=3)]),
    "softmax": (lambda a: F.softmax(a, axis=1), lambda: [leaf(3, 4, 2)]),
    "log_softmax": (lambda a: F.log_softmax(a), lambda: [leaf(3, 4)]),
    "log_softmax_axis0": (lambda a: F.log_softmax(a, dim=0), lambda: [leaf(3, 4)]),
    "linear": (F.linear, lambda: [leaf(5, 3), leaf(4, 3, seed=1), leaf(4, seed=2)]),
    "linear_3d_no_bias": (F.linear, lambda: [leaf(2, 5, 3), leaf(4, 3, seed=1)]),
    "conv2d_nchw": (lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1),
                    lambda: [leaf(2, 3, 6, 5), leaf(4, 3, 3, 3, seed=1), leaf(4, seed=2)]),
    "conv2d_nhwc": (lambda x, w, b: F.conv2d(x, w, b, stride=(1, 2), padding=(2, 1),
                                             layout="NHWC"),
                    lambda: [leaf(2, 6, 5, 3), leaf(4, 3, 3, 2, seed=1), leaf(4, seed=2)]),
    "conv2d_1x1_nchw": (F.conv2d, lambda: [leaf(2, 3, 4, 4), leaf(5, 3, 1, 1, seed=1)]),
    "conv2d_1x1_nhwc": (lambda x, w: F.conv2d(x, w, layout="NHWC"),
                        lambda: [leaf(2, 4, 4, 3), leaf(5, 3, 1, 1, seed=1)]),
    "max_pool2d_nchw": (lambda x: F.max_pool2d(x, 3, stride=2, padding=1),
                        lambda: [leaf(2, 3, 7, 6)]),
    "max_pool2d_nhwc": (lambda x: F.max_pool2d(x, 2, layout="NHWC"), lambda: [leaf(2, 6, 4, 3)]),
    "avg_pool2d_nchw": (lambda x: F.avg_pool2d(x, 3, stride=2, padding=1),
                        lambda: [leaf(2, 3, 7, 6)]),
    "avg_pool2d_nhwc_exclude_pad": (
        lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, layout="NHWC",
                               count_include_pad=False), lambda: [leaf(2, 5, 4, 3)]),
    "flatten": (lambda x: F.flatten(x, 1), lambda: [leaf(2, 3, 4)]),
    "flatten_nhwc": (lambda x: F.flatten(x, 1, layout="NHWC") * np.arange(24.0),
                     lambda: [leaf(2, 3, 4, 2)]),  # one op: flatten_channels_first
    "flatten_nhwc_5d": (lambda x: F.flatten(x, 1, layout="NHWC") * np.arange(30.0),
                        lambda: [leaf(2, 3, 1, 5, 2)]),
    "flatten_nhwc_partial": (lambda x: F.flatten(x, 1, 2, layout="NHWC") * np.arange(2.0),
                             lambda: [leaf(2, 3, 2, 2)]),  # a transpose and a reshape
    "dropout": (lambda x: (fn.manual_seed(3), F.dropout(x, 0.4))[1], lambda: [leaf(50)]),
    "cross_entropy": (lambda x: F.cross_entropy(x, np.array([0, 2, 1, 2])), lambda: [leaf(4, 3)]),
    "cross_entropy_sum_smooth": (
        lambda x: F.cross_entropy(x, np.array([0, 2, 1, 2]), reduction="sum",
                                  label_smoothing=0.2), lambda: [leaf(4, 3)]),
    "cross_entropy_none_3d": (
        lambda x: F.cross_entropy(x, np.array([[0, 2], [1, 1]]), reduction="none"),
        lambda: [leaf(2, 3, 2)]),
    "cross_entropy_1d": (lambda x: F.cross_entropy(x, np.array(1)), lambda: [leaf(3)]),
    "mse_loss": (F.mse_loss, lambda: [leaf(3, 4), leaf(3, 4, seed=1)]),
    "mse_loss_sum": (lambda a, b: F.mse_loss(a, b, reduction="sum"),
                     lambda: [leaf(3, 4), leaf(3, 4, seed=1)]),
    "mse_loss_none": (lambda a: F.mse_loss(a, C3, reduction="none"), lambda: [leaf(3)]),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK))
def test_gradcheck(name):
    f, make = GRADCHECK[name]
    assert gradcheck(f, make())


LAYOUTS = ["NCHW", "NHWC"]


def _affine(C, affine, seed=5):
    if not affine:
        return None, None
    return (Tensor(rand(C, seed=seed) * 0.5 + 1.0, requires_grad=True),
            leaf(C, seed=seed + 1))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_batch_norm(layout, affine, training):
    shape = (4, 3, 3, 2) if layout == "NCHW" else (4, 3, 2, 3)
    x = leaf(*shape, scale=2.0, shift=1.0)
    w, b = _affine(3, affine)
    rm, rv = np.zeros(3), np.ones(3) * 1.5

    def f(x, w, b):
        return ops.batch_norm(x, rm, rv, w, b, training=training, momentum=0.1, eps=1e-3,
                              layout=layout)

    assert gradcheck(f, [x, w, b])


@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_layer_norm(affine):
    w, b = (leaf(3, 4, seed=5), leaf(3, 4, seed=6)) if affine else (None, None)
    assert gradcheck(lambda x, w, b: ops.layer_norm(x, (3, 4), w, b, eps=1e-3),
                     [leaf(2, 3, 4, scale=2.0), w, b])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_group_norm(layout, affine):
    shape = (2, 4, 3, 2) if layout == "NCHW" else (2, 3, 2, 4)
    w, b = _affine(4, affine)
    assert gradcheck(lambda x, w, b: ops.group_norm(x, 2, w, b, eps=1e-3, layout=layout),
                     [leaf(*shape, scale=2.0), w, b])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("use_input_stats", [True, False])
def test_gradcheck_instance_norm(layout, affine, use_input_stats):
    shape = (2, 3, 4, 2) if layout == "NCHW" else (2, 4, 2, 3)
    w, b = _affine(3, affine)
    rm, rv = np.zeros(3), np.ones(3) * 1.5

    def f(x, w, b):
        return ops.instance_norm(x, rm, rv, w, b, use_input_stats=use_input_stats,
                                 eps=1e-3, layout=layout)

    assert gradcheck(f, [leaf(*shape, scale=2.0), w, b])


@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_rms_norm(affine):
    w = leaf(4, seed=5) if affine else None
    assert gradcheck(lambda x, w: ops.rms_norm(x, 4, w, eps=1e-3), [leaf(3, 4, scale=2.0), w])


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_gradcheck_norms_on_each_backend(backend):
    if backend not in fn.backends():
        pytest.skip(f"backend {backend} unavailable")
    w, b = _affine(4, True)
    with fn.use_backend(backend):
        assert gradcheck(lambda x, w, b: ops.batch_norm(x, None, None, w, b, training=True,
                                                        layout="NHWC"),
                         [leaf(3, 2, 2, 4), w, b])
        assert gradcheck(lambda x, w, b: ops.group_norm(x, 2, w, b), [leaf(3, 4, 5), w, b])
        assert gradcheck(lambda x, w: ops.rms_norm(x, 4, w), [leaf(3, 4), w])


def test_norm_param_grads_alone_and_bias_without_weight():
    x = Tensor(rand(4, 3, 5))  # input without grad: only the parameters learn
    w, b = leaf(3, seed=1), leaf(3, seed=2)
    assert gradcheck(lambda w, b: ops.batch_norm(Tensor(x.data), None, None, w, b,
                                                 training=True), [w, b])
    assert gradcheck(lambda x, b: ops.batch_norm(x, None, None, None, b, training=True),
                     [leaf(4, 3, 5), leaf(3, seed=2)])
    assert gradcheck(lambda x, b: ops.group_norm(x, 3, None, b), [leaf(4, 3, 5), leaf(3)])
    assert gradcheck(lambda x, b: ops.layer_norm(x, 5, None, b), [leaf(4, 3, 5), leaf(5)])


def test_frozen_parameters_get_no_grad():
    x = leaf(4, 3, 5)
    w, b = Tensor(rand(3, seed=1)), Tensor(rand(3, seed=2))
    ops.batch_norm(x, None, None, w, b, training=True).sum().backward()
    assert w.grad is None and b.grad is None and x.grad.shape == x.shape


# --------------------------------------------------------- comparisons with torch ----
def run_ours(f, arrays, grad_out_seed=7):
    ts = [Tensor(a, requires_grad=True) if a.dtype.kind == "f" else a for a in arrays]
    y = f(*ts)
    g = rand(*y.shape, dtype=y.dtype, seed=grad_out_seed)
    y.backward(g)
    return y.data, [t.grad for t in ts if isinstance(t, Tensor)], g


def run_torch(f, arrays, g):
    ts = [torch.tensor(a, requires_grad=a.dtype.kind == "f") for a in arrays]
    y = f(*ts)
    y.backward(torch.tensor(g))
    return y.detach().numpy(), [t.grad.numpy() for t in ts if t.requires_grad]


def assert_close(ours, ref, tol=1e-4):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, \
        (ours.shape, ref.shape, ours.dtype, ref.dtype)
    scale = max(float(np.abs(ref).max()), 1e-30)
    np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol * scale)


def compare(f_ours, f_torch, arrays, tol=1e-4):
    y, grads, g = run_ours(f_ours, arrays)
    y_ref, grads_ref = run_torch(f_torch, arrays, g)
    assert_close(y, y_ref, tol)
    assert len(grads) == len(grads_ref)
    for a, b in zip(grads, grads_ref):
        assert_close(a, b, tol)


def f32(*shape, seed=0, **kw):
    return rand(*shape, dtype=np.float32, seed=seed, **kw)


CONV_CASES = [  # x shape (NCHW), out channels, kernel, stride, padding
    ((2, 3, 8, 7), 4, 3, 1, 1),
    ((2, 3, 8, 7), 5, (3, 2), 2, (1, 0)),
    ((1, 2, 9, 9), 3, 5, (2, 3), 2),
    ((3, 4, 5, 5), 6, 1, 1, 0),
    ((5, 8, 6, 4), 3, 3, 1, 1),  # Winograd F(2x2, 3x3) (ops._winograd)
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_matches_torch(layout, case, bias):
    shape, O, k, s, p = CONV_CASES[case]
    kh, kw = (k, k) if isinstance(k, int) else k
    x, w, b = f32(*shape), f32(O, shape[1], kh, kw, seed=1), f32(O, seed=2)
    arrays = [x, w, b] if bias else [x, w]
    y_ref, grads_ref = run_torch(lambda *t: TF.conv2d(*t, stride=s, padding=p), arrays,
                                 g := rand(*TF.conv2d(torch.tensor(x), torch.tensor(w),
                                                      stride=s, padding=p).shape,
                                           dtype=np.float32, seed=7))
    if layout == "NHWC":
        arrays = [nhwc(x)] + arrays[1:]
        g, y_ref = nhwc(g), nhwc(y_ref)
        grads_ref = [nhwc(grads_ref[0])] + grads_ref[1:]
    ts = [Tensor(a, requires_grad=True) for a in arrays]
    y = F.conv2d(*ts, stride=s, padding=p, layout=layout)
    y.backward(g)
    assert_close(y.data, y_ref)
    for t, ref in zip(ts, grads_ref):
        assert_close(t.grad, ref)


POOL_CASES = [(2, None, 0), (3, 2, 1), ((3, 2), (1, 2), (1, 0)), (2, 1, 1)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("kind", ["max", "avg", "avg_exclude_pad"])
def test_pools_match_torch(layout, case, kind):
    k, s, p = case
    x = f32(2, 3, 7, 8)
    if kind == "max":
        ours = lambda t: F.max_pool2d(t, k, s, p, layout=layout)  # noqa: E731
        ref = lambda t: TF.max_pool2d(t, k, s, p)  # noqa: E731
    else:
        include = kind == "avg"
        ours = lambda t: F.avg_pool2d(t, k, s, p, layout=layout,  # noqa: E731
                                      count_include_pad=include)
        ref = lambda t: TF.avg_pool2d(t, k, s, p, count_include_pad=include)  # noqa: E731
    y, gx, y_ref, gx_ref = _pool_pair(x, ours, ref, layout, seed=7)
    assert_close(y, y_ref)
    assert_close(gx, gx_ref)


def _pool_pair(x, ours, ref, layout, seed):
    """(y, dx) of ``ours`` and of PyTorch's ``ref`` for an NCHW input x and a random
    output gradient, all in ``layout``."""
    tx = torch.tensor(x, requires_grad=True)
    y_ref = ref(tx)
    g = rand(*y_ref.shape, dtype=np.float32, seed=seed)
    y_ref.backward(torch.tensor(g))
    y_ref, gx_ref = y_ref.detach().numpy(), tx.grad.numpy()
    if layout == "NHWC":
        x, g, y_ref, gx_ref = nhwc(x), nhwc(g), nhwc(y_ref), nhwc(gx_ref)
    t = Tensor(x, requires_grad=True)
    y = ours(t)
    y.backward(g)
    return y.data, t.grad, y_ref, gx_ref


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("helper", ["cython", "threads", "numpy"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", POOL_CASES)
def test_max_pool_ties_and_nans_route_like_torch(layout, case, helper, dtype, monkeypatch):
    """Ties go to the window's first maximum and a NaN wins (PyTorch's CPU kernel keeps the
    last of several), so the gradient lands where PyTorch puts it: with the Cython helper
    (on one thread, and its samples on the threads: every pass parallel here) and with
    the NumPy code that serves without it."""
    if helper == "numpy":
        monkeypatch.setattr(ops, "_infer", None)
    if helper == "threads":
        monkeypatch.setattr(fn._config, "PARALLEL_MIN_ELEMENTS", 1)
    k, s, p = case
    x = np.floor(rand(2, 3, 9, 10, dtype=dtype) * 1.5)  # few distinct values: many ties
    x[0, 1, 2, 3] = np.nan
    x[1, 2, 5, 5] = x[1, 2, 5, 6] = x[1, 2, 6, 5] = np.nan
    y, gx, y_ref, gx_ref = _pool_pair(x, lambda t: F.max_pool2d(t, k, s, p, layout=layout),
                                      lambda t: TF.max_pool2d(t, k, s, p), layout, seed=3)
    np.testing.assert_array_equal(y, y_ref)  # NaN where PyTorch has NaN
    # (overlapping windows add into one input in another order: rounding only)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_max_pool_of_a_strided_view_equals_its_copy(layout):
    """The helper reads a view in place (row and column strides of any size)."""
    big = np.floor(f32(2, 3, 10, 16) * 1.5)
    x = big[:, :, 1:, ::2] if layout == "NCHW" else nhwc(big)[:, 1:, ::2]
    outs = []
    for a in (x, np.ascontiguousarray(x)):
        t = Tensor(a, requires_grad=True)
        y = F.max_pool2d(t, 2, layout=layout)
        y.backward(np.arange(y.data.size, dtype=np.float32).reshape(y.shape))
        outs.append((y.data, t.grad))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def test_max_pool_nan_propagates_like_torch():
    x = f32(1, 1, 4, 4)
    x[0, 0, 1, 1] = np.nan
    y = F.max_pool2d(Tensor(x), 2)
    np.testing.assert_array_equal(np.isnan(y.data),
                                  np.isnan(TF.max_pool2d(torch.tensor(x), 2).numpy()))


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_log_softmax_match_torch(axis):
    x = f32(3, 5, 4, scale=10.0)
    compare(lambda t: F.softmax(t, axis=axis), lambda t: torch.softmax(t, dim=axis), [x])
    compare(lambda t: F.log_softmax(t, axis=axis), lambda t: torch.log_softmax(t, dim=axis),
            [x])


def test_softmax_is_stable():
    x = np.array([[1000.0, 0.0, -1000.0]], dtype=np.float32)
    assert np.isfinite(F.softmax(Tensor(x)).data).all()
    np.testing.assert_allclose(F.log_softmax(Tensor(x)).data, [[0.0, -1000.0, -2000.0]])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(6, 5), (5,), (3, 5, 4)])
def test_cross_entropy_matches_torch(reduction, label_smoothing, shape):
    x = f32(*shape, scale=3.0)
    tshape = shape[:1] + shape[2:] if len(shape) >= 2 else ()
    target = np.random.default_rng(1).integers(0, 5, size=tshape)
    compare(lambda t: F.cross_entropy(t, target, reduction=reduction,
                                      label_smoothing=label_smoothing),
            lambda t: TF.cross_entropy(t, torch.tensor(target), reduction=reduction,
                                       label_smoothing=label_smoothing), [x])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_helper_matches_the_numpy_path(dtype, reduction, monkeypatch):
    """(N, C) logits go through the Cython helper's one pass (C's exp and log) forward
    and backward; the NumPy path gives the same values to an ulp or two, NaN and inf
    rows included (NaN where the NumPy path has NaN)."""
    if ops._infer is None:
        pytest.skip("the Cython helpers are not built")
    x = rand(9, 7, dtype=dtype, scale=30.0)
    x[2, 3] = np.nan
    x[4, 1] = np.inf
    x[5, :] = 1e4
    target = np.arange(9) % 7
    g = np.asarray(dtype(0.75))
    runs = []
    for helpers in (True, False):
        if not helpers:
            monkeypatch.setattr(ops, "_infer", None)
        t = Tensor(x, requires_grad=True)
        with np.errstate(invalid="ignore", over="ignore"):
            loss = F.cross_entropy(t, target, reduction=reduction)
            loss.backward(g)
        runs.append((loss.data, t.grad))
    tol = 1e-6 if dtype == np.float32 else 1e-14
    for a, b in zip(*runs):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        ok = ~np.isnan(b)
        np.testing.assert_allclose(a[ok], b[ok], rtol=tol, atol=tol)


def test_cross_entropy_helpers_refuse_a_class_out_of_range():
    """The helpers index rows with the targets: they check them themselves (the op
    called directly, without cross_entropy's check, gets an error, not a stray read)."""
    if ops._infer is None:
        pytest.skip("the Cython helpers are not built")
    x = f32(3, 4)
    logp, loss, d = np.empty_like(x), np.empty(3, np.float32), np.empty_like(x)
    for bad in (np.array([0, 4, 1]), np.array([0, -1, 1])):
        with pytest.raises(ValueError, match=r"target: expected class indices in \[0, 4\)"):
            ops._infer.log_softmax_nll(x, bad.astype(np.intp), logp, loss)
        with pytest.raises(ValueError, match="target"):
            ops._infer.softmax_nll_backward(x, bad.astype(np.intp), 1.0, d)


def test_cross_entropy_accepts_an_integer_tensor_target():
    x = Tensor(f32(4, 3), requires_grad=True)
    target = fn.tensor(np.array([0, 1, 2, 1], dtype=np.int32))
    loss = F.cross_entropy(x, target)
    ref = TF.cross_entropy(torch.tensor(x.data), torch.tensor(target.data).long())
    np.testing.assert_allclose(loss.item(), ref.item(), rtol=1e-6)
    loss.backward()
    assert x.grad.dtype == np.float32


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss_matches_torch(reduction):
    compare(lambda a, b: F.mse_loss(a, b, reduction=reduction),
            lambda a, b: TF.mse_loss(a, b, reduction=reduction), [f32(4, 3), f32(4, 3, seed=1)])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_torch(approximate):
    x = f32(1000, scale=4.0)
    compare(lambda t: F.gelu(t, approximate=approximate),
            lambda t: TF.gelu(t, approximate=approximate), [x], tol=2e-6)
    x64 = rand(1000, scale=6.0)
    compare(lambda t: F.gelu(t, approximate=approximate),
            lambda t: TF.gelu(t, approximate=approximate), [x64], tol=1e-14)


def test_activations_and_linear_match_torch():
    x = f32(4, 6, scale=3.0)
    compare(F.relu, torch.relu, [x])
    compare(F.sigmoid, torch.sigmoid, [x])
    compare(F.tanh, torch.tanh, [x])
    compare(F.linear, TF.linear, [f32(2, 5, 3), f32(4, 3, seed=1), f32(4, seed=2)])
    compare(lambda a, b: a @ b, lambda a, b: a @ b, [f32(2, 1, 3, 4), f32(5, 4, 2, seed=1)])


RELU_SPECIAL = [np.nan, -0.0, 0.0, -1.0, 2.0, np.inf, -np.inf, 1e-45, -1e-45]
RELU_GRAD = [1.0, np.inf, np.nan, 2.0, -3.0, np.inf, 1.0, np.nan, 5.0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", ["special", "threads", "strided"])
def test_relu_bits_match_torch(dtype, case):
    """Both paths (the Cython helper for C-contiguous arrays, split over the threads from
    PARALLEL_MIN_ELEMENTS values, and NumPy for the rest) give torch.relu's bits: -0.0
    and NaN stay, and the gradient passes at a NaN output but not at a zero one, even an
    inf or NaN gradient."""
    n = 40_000 if case == "threads" else len(RELU_SPECIAL)
    rng = np.random.default_rng(3)
    x = np.resize(np.array(RELU_SPECIAL, dtype), n)
    g = np.resize(np.array(RELU_GRAD, dtype), n)
    if case == "threads":
        x[len(RELU_SPECIAL):] = rng.standard_normal(n - len(RELU_SPECIAL))
        g[len(RELU_SPECIAL):] = rng.standard_normal(n - len(RELU_SPECIAL))
    if case == "strided":  # a view: the NumPy path
        x = np.repeat(x, 2)[::2]
    t = Tensor(x, requires_grad=True)
    y = F.relu(t)
    with np.errstate(invalid="ignore"):
        y.backward(g)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.relu(tx)
    ty.backward(torch.tensor(g))
    for ours, ref in ((y.data, ty.detach().numpy()), (t.grad, tx.grad.numpy())):
        assert ours.dtype == dtype
        np.testing.assert_array_equal(ours.view(f"u{ours.itemsize}"),
                                      ref.view(f"u{ref.itemsize}"))


def test_sigmoid_tails_do_not_overflow():
    with np.errstate(over="raise", invalid="raise"):
        y = F.sigmoid(Tensor(np.array([-1000.0, 0.0, 1000.0], np.float32))).data
    np.testing.assert_array_equal(y, [0.0, 0.5, 1.0])


def test_dropout():
    x = Tensor(np.ones((200, 100), np.float32), requires_grad=True)
    fn.manual_seed(0)
    y = F.dropout(x, 0.3)
    assert y.dtype == np.float32
    kept = y.data != 0
    assert abs(kept.mean() - 0.7) < 0.01
    np.testing.assert_allclose(y.data[kept], 1 / 0.7, rtol=1e-6)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, y.data)
    fn.manual_seed(0)
    np.testing.assert_array_equal(F.dropout(x, 0.3).data, y.data)  # reproducible
    assert F.dropout(x, 0.3, training=False) is x
    assert F.dropout(x, 0.0) is x
    assert not F.dropout(x, 1.0).data.any()
    with pytest.raises(ValueError, match="p must be"):
        F.dropout(x, 1.5)


# -------------------------------------------------------- normalizations vs torch ----
def _torch_params(C, affine):
    if not affine:
        return []
    return [f32(C, seed=5) * 0.5 + 1.0, f32(C, seed=6)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_norm_matches_torch(layout, affine, training, dtype):
    x = rand(8, 3, 5, 4, dtype=dtype, scale=2.0, shift=3.0)
    params = [p.astype(dtype) for p in _torch_params(3, affine)]
    rm0 = rand(3, dtype=dtype, seed=3)
    rv0 = (np.abs(rand(3, seed=4)) + 0.5).astype(dtype)
    rm, rv = rm0.copy(), rv0.copy()
    rm_t, rv_t = torch.tensor(rm0), torch.tensor(rv0)

    def ours(x, *p):
        w, b = p if p else (None, None)
        return ops.batch_norm(x, rm, rv, w, b, training=training, momentum=0.2, eps=1e-4,
                              layout=layout)

    def ref(x, *p):
        w, b = p if p else (None, None)
        if layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        y = TF.batch_norm(x, rm_t, rv_t, w, b, training=training, momentum=0.2, eps=1e-4)
        return y.permute(0, 2, 3, 1) if layout == "NHWC" else y

    xin = nhwc(x) if layout == "NHWC" else x
    tol = 1e-4 if dtype == np.float32 else 1e-10
    compare(ours, ref, [xin, *params], tol=tol)
    # the running buffers moved as PyTorch's did (only once: compare ran each side once)
    np.testing.assert_allclose(rm, rm_t.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(rv, rv_t.numpy(), rtol=tol, atol=tol)
    assert rm.dtype == dtype
    if not training:
        np.testing.assert_array_equal(rm, rm0)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_torch(affine):
    x = f32(4, 6, 5, scale=2.0, shift=1.0)
    params = [f32(6, 5, seed=5), f32(6, 5, seed=6)] if affine else []
    compare(lambda x, *p: ops.layer_norm(x, (6, 5), *p),
            lambda x, *p: TF.layer_norm(x, (6, 5), *p), [x, *params])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_matches_torch(layout, affine):
    x = f32(3, 6, 4, 5, scale=2.0, shift=1.0)
    params = _torch_params(6, affine)

    def ref(x, *p):
        if layout == "NHWC":
            return TF.group_norm(x.permute(0, 3, 1, 2), 3, *p).permute(0, 2, 3, 1)
        return TF.group_norm(x, 3, *p)

    compare(lambda x, *p: ops.group_norm(x, 3, *p, layout=layout), ref,
            [nhwc(x) if layout == "NHWC" else x, *params])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("use_input_stats", [True, False])
def test_instance_norm_matches_torch(layout, affine, use_input_stats):
    x = f32(3, 4, 5, 6, scale=2.0, shift=1.0)
    params = _torch_params(4, affine)
    rm, rv = f32(4, seed=3), np.abs(f32(4, seed=4)) + 0.5
    rm_t, rv_t = torch.tensor(rm), torch.tensor(rv)

    def ours(x, *p):
        w, b = p if p else (None, None)
        return ops.instance_norm(x, rm, rv, w, b, use_input_stats=use_input_stats,
                                 momentum=0.3, layout=layout)

    def ref(x, *p):
        w, b = p if p else (None, None)
        if layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        y = TF.instance_norm(x, rm_t, rv_t, w, b, use_input_stats=use_input_stats,
                             momentum=0.3)
        return y.permute(0, 2, 3, 1) if layout == "NHWC" else y

    compare(ours, ref, [nhwc(x) if layout == "NHWC" else x, *params])
    np.testing.assert_allclose(rm, rm_t.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rv, rv_t.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-3])
def test_rms_norm_matches_torch(affine, eps):
    x = f32(4, 3, 8, scale=2.0)
    params = [f32(8, seed=5)] if affine else []
    compare(lambda x, *p: ops.rms_norm(x, 8, *p, eps=eps),
            lambda x, *p: TF.rms_norm(x, (8,), *p, eps=eps), [x, *params])


# ----------------------------------------------------------------------- errors ----
def test_shape_errors_name_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 5\)"):
        leaf(2, 3) @ leaf(4, 5)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(5, 4, 2\)"):
        leaf(2, 3, 4) @ leaf(5, 4, 2)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        Tensor(np.float64(2.0)) @ leaf(3)
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(4, 2\)"):
        F.linear(leaf(5, 3), leaf(4, 2))
    with pytest.raises(ValueError, match=r"bias.*\(4,\).*\(3,\)"):
        F.linear(leaf(5, 3), leaf(4, 3), leaf(3))
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\).*\(4, 2, 3, 3\)"):
        F.conv2d(leaf(2, 3, 8, 8), leaf(4, 2, 3, 3))
    with pytest.raises(ValueError, match=r"\(2, 8, 8, 3\).*\(4, 2, 3, 3\)"):
        F.conv2d(leaf(2, 8, 8, 3), leaf(4, 2, 3, 3), layout="NHWC")
    with pytest.raises(ValueError, match="4-D input"):
        F.conv2d(leaf(3, 8, 8), leaf(4, 3, 3, 3))
    with pytest.raises(ValueError, match="does not fit"):
        F.conv2d(leaf(1, 1, 2, 2), leaf(1, 1, 3, 3))
    with pytest.raises(ValueError, match="at most half"):
        F.max_pool2d(leaf(1, 1, 4, 4), 2, padding=2)
    with pytest.raises(ValueError, match="layout"):
        F.max_pool2d(leaf(1, 1, 4, 4), 2, layout="NCWH")
    with pytest.raises(ValueError, match=r"pred shape \(3,\).*\(4,\)"):
        F.mse_loss(leaf(3), np.zeros(4))
    with pytest.raises(ValueError, match="reshape"):
        leaf(2, 3).reshape(4, 2)


def test_cross_entropy_input_errors():
    x = leaf(4, 3)
    with pytest.raises(TypeError, match="integer"):
        F.cross_entropy(x, np.zeros(4))
    with pytest.raises(ValueError, match=r"target shape \(3,\).*\(4, 3\)"):
        F.cross_entropy(x, np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match=r"class index 3.*\[0, 3\)"):
        F.cross_entropy(x, np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="reduction"):
        F.cross_entropy(x, np.array([0, 1, 2, 2]), reduction="avg")


def test_norm_errors_leave_running_buffers_unchanged():
    rm, rv = np.zeros(3), np.ones(3)
    x = leaf(4, 3, 5)
    with pytest.raises(ValueError, match="running_mean"):
        ops.batch_norm(x, np.zeros(4), rv, training=True)
    with pytest.raises(ValueError, match="momentum"):
        ops.batch_norm(x, rm, rv, training=True, momentum=1.5)
    with pytest.raises(ValueError, match="weight"):
        ops.batch_norm(x, rm, rv, leaf(4), training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ops.batch_norm(leaf(1, 3), rm, rv, training=True)
    with pytest.raises(ValueError, match="both running buffers"):
        ops.batch_norm(x, None, None, training=False)
    np.testing.assert_array_equal(rm, np.zeros(3))
    np.testing.assert_array_equal(rv, np.ones(3))
    with pytest.raises(ValueError, match="num_groups"):
        ops.group_norm(leaf(2, 4, 3), 3)
    with pytest.raises(ValueError, match="normalized_shape"):
        ops.layer_norm(leaf(2, 4), (5,))


def test_functional_exports():
    import fastnorm.norms as norms
    assert F.batch_norm is norms.batch_norm and F.layer_norm is norms.layer_norm
    for name in ("relu", "sigmoid", "tanh", "gelu", "softmax", "log_softmax", "dropout",
                 "linear", "conv2d", "max_pool2d", "avg_pool2d", "flatten", "concatenate",
                 "cross_entropy", "mse_loss"):
        assert getattr(F, name) is getattr(ops, name)
        assert name in F.__all__
