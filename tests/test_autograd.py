"""The autograd engine: Tensor, tape, grad modes, freeing, errors, gradcheck itself."""
import gc
import math
import threading
import time
import weakref

import numpy as np
import pytest

import fastnorm as fn
from fastnorm import ops
from fastnorm.autograd import Tensor, unbroadcast
from fastnorm.testing import gradcheck


def rand(*shape, dtype=np.float64, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def leaf(*shape, dtype=np.float64, seed=0):
    return Tensor(rand(*shape, dtype=dtype, seed=seed), requires_grad=True)


# ----------------------------------------------------------------- Tensor basics ----
def test_tensor_attributes_and_helpers():
    a = rand(2, 3)
    t = fn.tensor(a, requires_grad=True)
    assert isinstance(t, fn.Tensor)
    assert t.data is a  # wraps without copying
    assert t.shape == (2, 3) and t.dtype == np.float64 and t.ndim == 2 and len(t) == 2
    assert t.grad is None and t.requires_grad and t.is_leaf and t.grad_fn is None
    assert t.numpy() is a
    d = t.detach()
    assert d.data is a and not d.requires_grad
    assert Tensor(3.5).item() == 3.5
    with pytest.raises(ValueError, match=r"one element.*\(2, 3\)"):
        t.item()
    u = Tensor(np.ones(3)).requires_grad_()
    assert u.requires_grad
    with pytest.raises(TypeError, match="floating point"):
        Tensor(np.arange(3), requires_grad=True)
    y = t * 2
    assert not y.is_leaf and y.grad_fn == "mul" and "grad_fn=mul" in repr(y)
    with pytest.raises(RuntimeError, match="non-leaf"):
        y.requires_grad_(False)


def test_conversions_and_comparisons():
    t = fn.tensor(np.arange(3.0), requires_grad=True)
    np.testing.assert_array_equal(np.asarray(t), [0.0, 1.0, 2.0])
    np.testing.assert_array_equal((t > 0.5).data, [False, True, True])
    eq = t == 1.0
    assert isinstance(eq, Tensor) and not eq.requires_grad
    assert bool(t[1] == 1.0) and float(t.sum()) == 3.0 and int(t[2]) == 2
    with pytest.raises(ValueError, match="ambiguous"):
        bool(t)
    assert {t: 1}[t] == 1  # hashable by identity
    assert t.flatten().shape == (3,) and leaf(2, 3).swapaxes(0, 1).shape == (3, 2)


def test_dtype_is_kept_with_python_and_numpy_scalars():
    x = leaf(3, dtype=np.float32)
    for y in (x + 1.5, 2.0 * x, x - 1, 1 - x, x / 3.0, 3.0 / x, x ** 2, x.exp() ** 0.5, -x,
              x * np.float64(2.0), x.exp(), x.sigmoid(), x.mean(), x.sum(), ops.gelu(x)):
        assert y.dtype == np.float32, y
    (x * 2.0 + x ** 2).sum().backward()
    assert x.grad.dtype == np.float32


def test_ndarray_on_the_left_defers_to_tensor():
    x = leaf(3)
    a = np.arange(3.0)
    for y in (a + x, a - x, a * x, a / (x.exp()), a @ x):
        assert isinstance(y, Tensor) and y.requires_grad
    (a * x).sum().backward()
    np.testing.assert_allclose(x.grad, a)


def test_mixed_dtypes_give_each_leaf_a_grad_of_its_dtype():
    a = leaf(3, dtype=np.float32)
    b = leaf(3, dtype=np.float64, seed=1)
    y = (a * b).sum()
    assert y.dtype == np.float64
    y.backward()
    assert a.grad.dtype == np.float32 and b.grad.dtype == np.float64
    np.testing.assert_allclose(a.grad, b.data, rtol=1e-6)


def test_unbroadcast():
    g = np.ones((4, 3, 5))
    assert unbroadcast(g, (3, 5)).shape == (3, 5)
    assert unbroadcast(g, (3, 1)).shape == (3, 1)
    assert unbroadcast(g, (1, 1, 5)).shape == (1, 1, 5)
    assert unbroadcast(g, ()).shape == () and unbroadcast(g, ()) == 60


# ------------------------------------------------------------------------- tape ----
def test_value_used_twice_gets_both_contributions():
    x = leaf(4)
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data)

    x = leaf(4)
    a = x * 3
    y = (a * a + a).sum()  # diamond: a feeds two ops
    y.backward()
    np.testing.assert_allclose(x.grad, 3 * (2 * a.data + 1))


def test_grads_accumulate_over_backward_calls_and_only_leaves_keep_them():
    x = leaf(3)
    h = x.exp()
    (h * 2).sum().backward()
    (x * 5).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * np.exp(x.data) + 5)
    assert h.grad is None


def test_long_chain_has_no_recursion_limit():
    x = leaf(8)
    y = x
    t0 = time.perf_counter()
    for _ in range(10_000):
        y = y * 1.0001
    y.sum().backward()
    elapsed = time.perf_counter() - t0
    np.testing.assert_allclose(x.grad, np.full(8, 1.0001 ** 10_000), rtol=1e-10)
    assert elapsed < 5.0


def test_backward_twice_raises_unless_graph_retained():
    x = leaf(3)
    y = (x.exp() * 2).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="second time.*retain_graph=True"):
        y.backward()

    x = leaf(3)
    y = (x.exp() * 2).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad, 4 * np.exp(x.data))
    with pytest.raises(RuntimeError, match="second time"):
        y.backward()


def test_second_branch_through_a_freed_subgraph_raises():
    x = leaf(3)
    h = x.exp()
    a, b = (h * 2).sum(), (h * 3).sum()
    a.backward()
    with pytest.raises(RuntimeError, match="second time"):
        b.backward()


def test_saved_values_are_released_after_backward():
    x = leaf(1000)
    h = x.exp()
    ref = weakref.ref(h.data)
    y = (h * x).sum()  # mul saves h's data
    del h
    gc.collect()
    assert ref() is not None
    y.backward()
    gc.collect()
    assert ref() is None
    assert y._record.ctx is None


def test_graph_without_backward_is_freed_with_its_tensors():
    x = leaf(10)
    y = (x.exp() * 2).sum()
    ref = weakref.ref(y._record)
    del y
    gc.collect()
    assert ref() is None


def test_backward_seeds_and_errors():
    x = leaf(2, 3)
    y = x * 2
    with pytest.raises(RuntimeError, match=r"scalar outputs.*\(2, 3\)"):
        y.backward()
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        y.backward(np.ones((3, 2)))
    with pytest.raises(TypeError, match="floating point"):
        y.backward(np.ones((2, 3), dtype=np.int64))
    y.backward(np.full((2, 3), 0.5))
    np.testing.assert_allclose(x.grad, np.ones((2, 3)))
    with pytest.raises(RuntimeError, match="does not require grad"):
        Tensor(np.ones(3)).sum().backward()
    z = leaf(1, 1)
    (z * 3).backward()  # one element: implicit grad of 1
    assert z.grad.shape == (1, 1) and z.grad[0, 0] == 3


def test_backward_on_a_leaf():
    x = leaf(3)
    x.backward(np.ones(3))
    np.testing.assert_array_equal(x.grad, np.ones(3))


def test_gradient_shape_is_asserted():
    class BadGrad(ops.Function):
        name = "bad_grad"

        @staticmethod
        def forward(ctx, a):
            return a * 2

        @staticmethod
        def backward(ctx, grad):
            return grad[:1],

    x = leaf(3)
    with pytest.raises(RuntimeError, match=r"bad_grad.*\(1,\).*\(3,\)"):
        BadGrad.apply(x).sum().backward()


def test_missing_backward_names_the_op():
    class NoGrad(ops.Function):
        name = "no_backward_op"

        @staticmethod
        def forward(ctx, a):
            return a + 1

    with pytest.raises(NotImplementedError, match="no_backward_op"):
        NoGrad.apply(leaf(2)).sum().backward()


def test_registry_holds_every_op_once():
    for name in ("add", "mul", "matmul", "sum", "getitem", "conv2d", "max_pool2d",
                 "cross_entropy", "batch_norm_train", "batch_norm_eval", "layer_norm",
                 "group_norm", "instance_norm_train", "rms_norm", "gelu"):
        assert issubclass(ops.REGISTRY[name], ops.Function)
        assert ops.REGISTRY[name].name == name
    with pytest.raises(ValueError, match="exists"):
        ops.register("add")(type("Again", (ops.Function,), {}))


# -------------------------------------------------------------------- grad modes ----
def test_no_grad_enable_grad_inference_mode():
    x = leaf(3)
    assert fn.is_grad_enabled()
    with fn.no_grad():
        assert not fn.is_grad_enabled()
        y = x * 2
        assert not y.requires_grad and y.is_leaf
        with fn.enable_grad():
            z = x * 2
            assert z.requires_grad
        assert not fn.is_grad_enabled()
    assert fn.is_grad_enabled()
    with fn.inference_mode():
        assert not (x.exp()).requires_grad
    with fn.inference_mode(False):
        assert (x.exp()).requires_grad

    @fn.no_grad()
    def f(t):
        return t * 2, fn.is_grad_enabled()

    out, enabled = f(x)
    assert not out.requires_grad and not enabled and fn.is_grad_enabled()


def test_grad_mode_decorators_without_parentheses_and_shared_instances():
    @fn.no_grad
    def f():
        return fn.is_grad_enabled()

    @fn.inference_mode
    def g():
        return fn.is_grad_enabled()

    assert f() is False and g() is False and fn.is_grad_enabled()
    shared = fn.no_grad()
    with shared:
        with shared:
            with fn.enable_grad():
                assert fn.is_grad_enabled()
            assert not fn.is_grad_enabled()
        assert not fn.is_grad_enabled()
    assert fn.is_grad_enabled()
    with fn.autograd.set_grad_enabled(False):
        assert not fn.is_grad_enabled()
    assert fn.is_grad_enabled()


def test_grad_mode_is_restored_after_an_exception():
    with pytest.raises(KeyError):
        with fn.no_grad():
            raise KeyError
    assert fn.is_grad_enabled()


def test_grad_mode_is_thread_local():
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def worker():
        with fn.no_grad():
            seen["worker_inside"] = fn.is_grad_enabled()
            entered.set()
            release.wait(5)
        seen["worker_after"] = fn.is_grad_enabled()

    t = threading.Thread(target=worker)
    t.start()
    assert entered.wait(5)
    try:
        assert fn.is_grad_enabled()  # the other thread's no_grad does not leak here
        x = leaf(3)
        assert (x * 2).requires_grad
    finally:
        release.set()
        t.join()
    assert seen == {"worker_inside": False, "worker_after": True}

    with fn.no_grad():
        box = []
        t = threading.Thread(target=lambda: box.append(fn.is_grad_enabled()))
        t.start()
        t.join()
        assert box == [True]  # a new thread starts with grad enabled


def test_threads_train_independently():
    def work(seed, out):
        x = leaf(5, seed=seed)
        for _ in range(200):
            y = (x * x).sum()
        y.backward()
        out[seed] = np.allclose(x.grad, 2 * x.data)

    out = {}
    threads = [threading.Thread(target=work, args=(s, out)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == {0: True, 1: True, 2: True, 3: True}


# --------------------------------------------------------------------- indexing ----
@pytest.mark.parametrize("index", [
    1, -1, slice(1, 3), (slice(None), 2), (Ellipsis, 1), (None, 0),
    (1, None, slice(None, None, -1)), (slice(None), None, Ellipsis)])
def test_basic_indexing(index):
    x = leaf(3, 4)
    y = x[index]
    np.testing.assert_array_equal(y.data, x.data[index])
    assert gradcheck(lambda t: t[index], [x])


def test_advanced_indexing_scatters_with_repeats():
    x = leaf(5)
    y = x[np.array([0, 0, 3])]
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [2, 0, 0, 1, 0])
    x = leaf(4)
    x[x.data > 0].sum().backward()
    np.testing.assert_array_equal(x.grad, (x.data > 0).astype(float))


# -------------------------------------------------------------------- gradcheck ----
def test_gradcheck_catches_a_wrong_gradient():
    class WrongExp(ops.Function):
        name = "wrong_exp"

        @staticmethod
        def forward(ctx, a):
            ctx.save_for_backward(a)
            return np.exp(a)

        @staticmethod
        def backward(ctx, grad):
            a, = ctx.saved
            return grad * np.exp(a) * 1.01,

    with pytest.raises(AssertionError, match=r"input 1 \(shape \(4,\)\)"):
        gradcheck(lambda c, t: WrongExp.apply(t) * c, [np.ones(4), leaf(4)])
    assert gradcheck(lambda t: t.exp(), [leaf(4)])


def test_gradcheck_uses_float64_and_requires_a_grad_input():
    x32 = leaf(3, dtype=np.float32)
    seen = []

    def f(t):
        seen.append(t.dtype)
        return t * 2

    assert gradcheck(f, [x32])
    assert set(seen) == {np.dtype(np.float64)}
    with pytest.raises(ValueError, match="requires grad"):
        gradcheck(f, [Tensor(np.ones(3))])


# ---------------------------------------------------------------------------- erf ----
def test_erf_erfc_normal_cdf_match_math_to_float64_accuracy():
    z = np.concatenate([np.linspace(-8, 8, 20001), np.linspace(-27, 27, 541),
                        [0.0, 1.0, 3.0, -1.0, -3.0, 1e-300, 0.99999999, 2.9999999]])
    erf = ops.erf(z)
    erfc = ops.erfc(z)
    ref_erf = np.array([math.erf(v) for v in z])
    ref_erfc = np.array([math.erfc(v) for v in z])
    np.testing.assert_allclose(erf, ref_erf, rtol=2e-15, atol=1e-300)
    tiny = ref_erfc > 1e-300
    np.testing.assert_allclose(erfc[tiny], ref_erfc[tiny], rtol=4e-15)
    cdf = ops.normal_cdf(z)
    # the same rounded argument |x| * sqrt(1/2) as the implementation (erfc amplifies its
    # rounding by 2 z^2, so a different rounding of x / sqrt 2 alone differs by 1e-13)
    ref_cdf = [0.5 * math.erfc(math.copysign(abs(v) * math.sqrt(0.5), -v)) for v in z]
    np.testing.assert_allclose(cdf, ref_cdf, rtol=4e-15, atol=1e-300)
    assert np.isnan(ops.erf(np.nan)) and ops.erfc(np.inf) == 0 and ops.erfc(-np.inf) == 2
    big = np.random.default_rng(0).standard_normal((3, 70_000)) * 3  # blockwise path
    flat = big.reshape(-1)
    pieces = [ops.normal_cdf(flat[i:i + 1000]) for i in range(0, flat.size, 1000)]
    np.testing.assert_array_equal(ops.normal_cdf(big), np.concatenate(pieces).reshape(3, -1))
