"""Bad input to every norm function: a ValueError/TypeError whose message names the
argument, and running buffers, parameters and every other array argument left bitwise
unchanged.

Each function has a valid call (``VALID``); each error case is one mutation of its
keyword arguments.  PyTorch's names are used in messages (``input`` for ``x``,
``grad_output`` for ``dy``), so the expected name is a regular expression.
"""
import re

import numpy as np
import pytest

import fastnorm as fn
import fastnorm.functional as F

C = 6
ONE_VALUE = "Expected more than 1 value per channel when training"
ONE_SPATIAL = "Expected more than 1 spatial element when training"


def _arrays(layout="NCHW"):
    rng = np.random.default_rng(0)
    shape = (4, C, 5, 3) if layout == "NCHW" else (4, 5, 3, C)
    x = rng.standard_normal(shape)
    return dict(x=x, dy=rng.standard_normal(shape), weight=rng.uniform(0.5, 1.5, C),
                bias=rng.standard_normal(C), running_mean=rng.standard_normal(C),
                running_var=rng.uniform(0.5, 2, C))


def _bn(kind, layout="NCHW"):
    a = _arrays(layout)
    x, w, b = a["x"], a["weight"], a["bias"]
    if kind in ("train", "eval"):
        return F.batch_norm, dict(x=x, running_mean=a["running_mean"],
                                  running_var=a["running_var"], weight=w, bias=b,
                                  training=kind == "train", momentum=0.1, eps=1e-5,
                                  layout=layout, out=None)
    if kind == "_train":
        return F.batch_norm_train, dict(x=x, weight=w, bias=b, eps=1e-5, layout=layout,
                                        out=None)
    _, mean, invstd = F.batch_norm_train(x, w, b, layout=layout)
    if kind == "_eval":
        return F.batch_norm_eval, dict(x=x, mean=mean, invstd=invstd, weight=w, bias=b,
                                       layout=layout, out=None)
    return F.batch_norm_backward, dict(dy=a["dy"], x=x, mean=mean, invstd=invstd, weight=w,
                                       layout=layout, out=None)


def _ln(kind):
    a = _arrays()
    x, ns = a["x"], (5, 3)
    rng = np.random.default_rng(1)
    w, b = rng.uniform(0.5, 1.5, ns), rng.standard_normal(ns)
    if kind == "":
        return F.layer_norm, dict(x=x, normalized_shape=ns, weight=w, bias=b, eps=1e-5)
    if kind == "_train":
        return F.layer_norm_train, dict(x=x, normalized_shape=ns, weight=w, bias=b, eps=1e-5)
    _, mean, invstd = F.layer_norm_train(x, ns, w, b)
    return F.layer_norm_backward, dict(dy=a["dy"], x=x, mean=mean, invstd=invstd,
                                       normalized_shape=ns, weight=w)


def _rms(kind):
    a = _arrays()
    x, ns = a["x"], (5, 3)
    w = np.random.default_rng(1).uniform(0.5, 1.5, ns)
    if kind == "":
        return F.rms_norm, dict(x=x, normalized_shape=ns, weight=w, eps=1e-6)
    if kind == "_train":
        return F.rms_norm_train, dict(x=x, normalized_shape=ns, weight=w, eps=1e-6)
    _, invrms = F.rms_norm_train(x, ns, w)
    return F.rms_norm_backward, dict(dy=a["dy"], x=x, invrms=invrms, normalized_shape=ns,
                                     weight=w)


def _gn(kind, layout="NCHW"):
    a = _arrays(layout)
    x, w, b = a["x"], a["weight"], a["bias"]
    if kind == "":
        return F.group_norm, dict(x=x, num_groups=3, weight=w, bias=b, eps=1e-5, layout=layout)
    if kind == "_train":
        return F.group_norm_train, dict(x=x, num_groups=3, weight=w, bias=b, eps=1e-5,
                                        layout=layout)
    _, mean, invstd = F.group_norm_train(x, 3, w, b, layout=layout)
    return F.group_norm_backward, dict(dy=a["dy"], x=x, mean=mean, invstd=invstd,
                                       num_groups=3, weight=w, layout=layout)


def _in(kind, layout="NCHW"):
    a = _arrays(layout)
    x, w, b = a["x"], a["weight"], a["bias"]
    if kind in ("train", "eval"):
        return F.instance_norm, dict(x=x, running_mean=a["running_mean"],
                                     running_var=a["running_var"], weight=w, bias=b,
                                     use_input_stats=kind == "train", momentum=0.1, eps=1e-5,
                                     layout=layout)
    if kind == "_train":
        return F.instance_norm_train, dict(x=x, weight=w, bias=b, eps=1e-5, layout=layout)
    _, mean, invstd = F.instance_norm_train(x, w, b, layout=layout)
    return F.instance_norm_backward, dict(dy=a["dy"], x=x, mean=mean, invstd=invstd,
                                          weight=w, layout=layout)


VALID = {
    "batch_norm[train]": lambda: _bn("train"),
    "batch_norm[eval]": lambda: _bn("eval"),
    "batch_norm[train,NHWC]": lambda: _bn("train", "NHWC"),
    "batch_norm_train": lambda: _bn("_train"),
    "batch_norm_eval": lambda: _bn("_eval"),
    "batch_norm_backward": lambda: _bn("_backward"),
    "batch_norm_backward[NHWC]": lambda: _bn("_backward", "NHWC"),
    "layer_norm": lambda: _ln(""),
    "layer_norm_train": lambda: _ln("_train"),
    "layer_norm_backward": lambda: _ln("_backward"),
    "rms_norm": lambda: _rms(""),
    "rms_norm_train": lambda: _rms("_train"),
    "rms_norm_backward": lambda: _rms("_backward"),
    "group_norm": lambda: _gn(""),
    "group_norm[NHWC]": lambda: _gn("", "NHWC"),
    "group_norm_train": lambda: _gn("_train"),
    "group_norm_backward": lambda: _gn("_backward"),
    "instance_norm[train]": lambda: _in("train"),
    "instance_norm[eval]": lambda: _in("eval"),
    "instance_norm[train,NHWC]": lambda: _in("train", "NHWC"),
    "instance_norm_train": lambda: _in("_train"),
    "instance_norm_backward": lambda: _in("_backward"),
}


def _is_row(name):
    return name.startswith(("layer_norm", "rms_norm"))


def _min_rank(name):
    return 1 if _is_row(name) else 3 if name.startswith("instance_norm") else 2


def _channel_axis(kw):
    return 1 if kw.get("layout", "NCHW") == "NCHW" else -1


# ------------------------------------------------------------------ error cases ----
def _set(**changes):
    return lambda kw: {**kw, **changes}


def _x_shape(shape_of):
    """Replace x by random data of the shape ``shape_of(x.shape, kwargs)``."""
    def mutate(kw):
        shape = shape_of(kw["x"].shape, kw)
        return dict(kw, x=np.asarray(np.random.default_rng(2).standard_normal(shape)))
    return mutate


def _x_dtype(dtype):
    def mutate(kw):
        x = kw["x"]
        if np.dtype(dtype).kind == "b":
            return dict(kw, x=x > 0)
        return dict(kw, x=(x * 10).astype(dtype))
    return mutate


def _param(name, mutate_array):
    return lambda kw: dict(kw, **{name: mutate_array(kw[name])})


def _cases():
    """(function id, case id, mutation, exception, regex the message must match)."""
    out = []
    for fid, build in VALID.items():
        _, kw = build()
        training = kw.get("training", kw.get("use_input_stats", True))

        def add(case, mutate, exc, pattern):
            out.append((fid, case, mutate, exc, pattern))

        # rank below the minimum
        r = _min_rank(fid)
        add(f"rank{r - 1}", _x_shape(lambda s, kw, r=r: s[:r - 1]), ValueError, r"\binput\b")
        # dtypes
        for dt in (np.int32, np.int64, np.bool_, np.complex64, np.complex128, np.float16):
            add(f"dtype-{np.dtype(dt).name}", _x_dtype(dt), TypeError, r"\binput\b")
        add("x-list", lambda kw: dict(kw, x=kw["x"].tolist()), TypeError, r"\binput\b")
        # empty batch and empty spatial axis
        add("empty-batch", _x_shape(lambda s, kw: (0,) + s[1:]), ValueError, r"\binput\b")
        if not _is_row(fid):
            add("empty-spatial",
                _x_shape(lambda s, kw: s[:2] + (0,) + s[3:] if kw.get("layout") == "NCHW"
                         else s[:1] + (0,) + s[2:]), ValueError, r"\binput\b")
        # parameters of the wrong size, dtype or type
        for p in ("weight", "bias", "running_mean", "running_var"):
            if kw.get(p) is None:
                continue
            add(f"{p}-size", _param(p, lambda a: np.concatenate([a.reshape(-1), [1.0]])),
                ValueError, rf"\b{p}\b")
            add(f"{p}-int", _param(p, lambda a: a.astype(np.int64)), TypeError, rf"\b{p}\b")
            add(f"{p}-list", _param(p, lambda a: a.tolist()), TypeError, rf"\b{p}\b")
        if not _is_row(fid):
            # the channel count of x not matching the parameters
            add("channels",
                _x_shape(lambda s, kw: tuple(d + 1 if i == _channel_axis(kw) % len(s) else d
                                             for i, d in enumerate(s))),
                ValueError, r"\b(weight|bias|running_mean|running_var|num_groups|mean)\b")
        # saved statistics of the wrong size
        for p in ("mean", "invstd", "invrms"):
            if p in kw:
                add(f"{p}-size", _param(p, lambda a: a.reshape(-1)[:-1]), ValueError,
                    rf"\b{p}\b")
                add(f"{p}-list", _param(p, lambda a: a.tolist()), TypeError, rf"\b{p}\b")
        # layouts
        if "layout" in kw:
            for bad in ("NCWH", "NHW", ""):
                add(f"layout-{bad!r}", _set(layout=bad), ValueError, r"\blayout\b")
            for bad in (None, 1):
                add(f"layout-{bad!r}", _set(layout=bad), (ValueError, TypeError),
                    r"\blayout\b")
        # eps and momentum
        if "eps" in kw:
            for bad in (0.0, -1e-5, float("nan"), float("inf")):
                add(f"eps-{bad!r}", _set(eps=bad), ValueError, r"\beps\b")
            for bad in ("1e-5", True, [1e-5]):
                add(f"eps-{bad!r}", _set(eps=bad), (ValueError, TypeError), r"\beps\b")
        if "momentum" in kw and training:
            for bad in (-0.1, 1.5, float("nan"), float("inf")):
                add(f"momentum-{bad!r}", _set(momentum=bad), ValueError, r"\bmomentum\b")
            for bad in ("0.1", None, True):
                add(f"momentum-{bad!r}", _set(momentum=bad), (ValueError, TypeError),
                    r"\bmomentum\b")
        # running buffers required in eval
        if "running_mean" in kw and not training:
            for missing in (("running_mean",), ("running_var",), ("running_mean", "running_var")):
                add("eval-without-" + "+".join(missing), _set(**{m: None for m in missing}),
                    ValueError, r"\brunning_mean\b.*\brunning_var\b")
        if "running_mean" in kw and training:
            def readonly(kw):
                rv = kw["running_var"].copy()
                rv.flags.writeable = False
                return dict(kw, running_var=rv)
            add("running_var-readonly", readonly, ValueError, r"\brunning_var\b")
        # one value per channel / spatial element in training
        if fid.startswith("batch_norm") and training and "dy" not in kw and "mean" not in kw:
            add("one-value-N1-2d", _x_shape(lambda s, kw: (1, C)), ValueError, ONE_VALUE)
            add("one-value-N1-4d",
                _x_shape(lambda s, kw: (1, C, 1, 1) if kw["layout"] == "NCHW" else (1, 1, 1, C)),
                ValueError, ONE_VALUE)
        if fid.startswith("instance_norm") and training and "dy" not in kw:
            add("one-spatial",
                _x_shape(lambda s, kw: (4, C, 1, 1) if kw["layout"] == "NCHW" else (4, 1, 1, C)),
                ValueError, ONE_SPATIAL)
        # the gradient of the wrong shape / dtype
        if "dy" in kw:
            add("dy-shape", _param("dy", lambda a: a[..., :-1]), ValueError,
                r"\b(dy|grad_output)\b")
            add("dy-transposed-shape", _param("dy", lambda a: np.swapaxes(a, 0, 1)), ValueError,
                r"\b(dy|grad_output)\b")
            add("dy-int", _param("dy", lambda a: a.astype(np.int32)), TypeError,
                r"\b(dy|grad_output)\b")
            add("dy-float16", _param("dy", lambda a: a.astype(np.float16)), TypeError,
                r"\b(dy|grad_output)\b")
        # normalized_shape
        if "normalized_shape" in kw:
            for bad in ((4,), (3, 5), (5,), (4, 5, 3, 1), (6, 4, 5, 3), (), (0,), (-3,), 7):
                add(f"normalized_shape-{bad!r}", _set(normalized_shape=bad), ValueError,
                    r"\bnormalized_shape\b")
            for bad in ("abc", (5.0, 3.0), 3.0, None, (5, "3")):
                add(f"normalized_shape-{bad!r}", _set(normalized_shape=bad), TypeError,
                    r"\bnormalized_shape\b")
        # num_groups
        if "num_groups" in kw:
            for bad in (4, 5, 0, -3):
                add(f"num_groups-{bad!r}", _set(num_groups=bad), ValueError, r"\bnum_groups\b")
            for bad in (3.0, True, None, "3"):
                add(f"num_groups-{bad!r}", _set(num_groups=bad), (ValueError, TypeError),
                    r"\bnum_groups\b")
        # out=
        if "out" in kw:
            x = kw["x"]
            for case, bad, exc in (
                    ("out-shape", np.empty(x.shape[:-1] + (x.shape[-1] + 1,)), ValueError),
                    ("out-transposed-shape", np.empty(x.shape[::-1]), ValueError),
                    ("out-dtype", np.empty(x.shape, np.float32), TypeError),
                    ("out-noncontiguous", np.empty(x.shape[:-1] + (2 * x.shape[-1],))[..., ::2],
                     ValueError),
                    ("out-fortran", np.asfortranarray(np.empty(x.shape)), ValueError),
                    ("out-list", [0.0], TypeError)):
                add(case, _set(out=bad), exc, r"\bout\b")
            ro = np.empty(x.shape)
            ro.flags.writeable = False
            add("out-readonly", _set(out=ro), ValueError, r"\bout\b")
    return out


CASES = _cases()


def _snapshot(kw):
    return {k: (v.tobytes(), v.shape, v.dtype) for k, v in kw.items() if isinstance(v, np.ndarray)}


@pytest.mark.parametrize("backend", fn.backends())
@pytest.mark.parametrize("fid,case,mutate,exc,pattern", CASES,
                         ids=[f"{fid}-{case}" for fid, case, *_ in CASES])
def test_bad_input_raises_and_changes_nothing(backend, fid, case, mutate, exc, pattern):
    func, kw = VALID[fid]()
    kw = mutate(kw)
    before = _snapshot(kw)
    with fn.use_backend(backend):
        with pytest.raises(exc) as info:
            func(**kw)
    message = str(info.value)
    assert re.search(pattern, message), f"{type(info.value).__name__}: {message}"
    after = _snapshot(kw)
    for k in before:
        assert after[k] == before[k], f"{k} was modified by a rejected call"


@pytest.mark.parametrize("backend", fn.backends())
@pytest.mark.parametrize("fid", list(VALID))
def test_valid_calls_succeed(backend, fid):
    """The unmutated calls the error cases start from are valid."""
    func, kw = VALID[fid]()
    with fn.use_backend(backend):
        func(**kw)


def test_one_value_per_channel_message_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.ones((1, C))
    with pytest.raises(ValueError) as ours:
        F.batch_norm(x, training=True)
    with pytest.raises(ValueError) as theirs:
        torch.nn.functional.batch_norm(torch.tensor(x), None, None, training=True)
    # the same words; the shape is printed as a tuple instead of torch.Size([...])
    prefix = "Expected more than 1 value per channel when training, got input size "
    assert str(ours.value).startswith(prefix) and str(theirs.value).startswith(prefix)
    assert "(1, 6)" in str(ours.value)


def test_one_value_per_channel_is_fine_in_eval():
    rm, rv = np.zeros(C), np.ones(C)
    x = np.arange(C, dtype=np.float64).reshape(1, C)
    np.testing.assert_allclose(F.batch_norm(x, rm, rv, training=False, eps=1e-12), x)


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_bounds_are_allowed(momentum):
    x = np.random.default_rng(0).standard_normal((4, C))
    rm, rv = np.zeros(C), np.ones(C)
    F.batch_norm(x, rm, rv, training=True, momentum=momentum)
    if momentum == 0.0:
        np.testing.assert_array_equal(rm, 0.0)
    else:
        np.testing.assert_allclose(rm, x.mean(0))


@pytest.mark.parametrize("layout", ["nchw", "NHWC", "channels_first", "Channels_Last"])
def test_layout_names_are_case_insensitive(layout):
    x = np.random.default_rng(0).standard_normal((4, C, 5))
    lay = "NCHW" if layout.lower() in ("nchw", "channels_first") else "NHWC"
    np.testing.assert_array_equal(F.batch_norm_train(x, layout=layout)[0],
                                  F.batch_norm_train(x, layout=lay)[0])
