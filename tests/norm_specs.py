"""The five norms described once for the norm test files: shapes, parameters, and how
each norm is called in fastnorm and in PyTorch.

A ``Case`` is one point of the test grid (norm, backend, layout, rank, dtype, affine,
running statistics); ``SPECS[case.norm]`` knows how to build its inputs and call the
forward (``*_train`` and the torch-like function), the backward and PyTorch.  Grads are
returned as dicts ``{"input": dx, "weight": dw, "bias": db}`` so every norm is compared
the same way.  For LayerNorm and RMSNorm the layout axis is replaced by how many
trailing dimensions are normalized (``"last1"``, ``"last2"``).
"""
import itertools
import zlib
from dataclasses import dataclass, replace

import numpy as np

import fastnorm as fn
import fastnorm.functional as F

BACKENDS = fn.backends()
COMPILED = [b for b in BACKENDS if b != "numpy"]
DTYPES = (np.float32, np.float64)
LAYOUTS = ("NCHW", "NHWC")

# Relative tolerances (scaled by the largest magnitude of the expected array).
REF_RTOL = {np.float32: 1e-5, np.float64: 1e-10}    # vs the NumPy reference backend
TORCH_RTOL = {np.float32: 1e-4, np.float64: 1e-9}   # vs PyTorch


def dtype_name(dtype):
    return np.dtype(dtype).name


def assert_close(actual, expected, rtol, what="", floor=1e-30):
    """|actual - expected| <= rtol * max(max|expected|, floor) elementwise (NaN where
    NaN); None only equals None.  ``floor`` is the natural scale of the quantity when the
    expected values may all be ~0 (a normalized output of a one-value group, say)."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: {actual!r} vs {expected!r}"
        return
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    finite = np.abs(expected[np.isfinite(expected)])
    scale = max(float(finite.max()) if finite.size else 0.0, floor)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale,
                               equal_nan=True, err_msg=what)


def rel_error(actual, expected):
    """max|actual - expected| / max|expected| in float64."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    return float(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-300))


def rng_for(*key):
    """A generator seeded from a readable key, so every test is reproducible alone."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


# ------------------------------------------------------------------------- shapes ----
SPATIAL = (5, 4, 3)  # spatial extents by rank: (N, C), (N, C, 5), (N, C, 5, 4), ...


def channel_shape(rank, layout, C, N=4, spatial=SPATIAL):
    sp = tuple(spatial[:rank - 2])
    return (N, C, *sp) if layout == "NCHW" else (N, *sp, C)


def to_torch_layout(a, layout):
    """NHWC -> NCHW (a view) for PyTorch, which wants the channel axis at 1."""
    return np.moveaxis(a, -1, 1) if layout == "NHWC" and a.ndim > 2 else a


def from_torch_layout(a, layout):
    return np.moveaxis(a, 1, -1) if layout == "NHWC" and a.ndim > 2 else a


# -------------------------------------------------------------------------- cases ----
@dataclass(frozen=True)
class Case:
    norm: str
    backend: str
    layout: str          # NCHW/NHWC, or last1/last2 for LayerNorm and RMSNorm
    rank: int
    dtype: type
    affine: str          # "none", "full" (weight and bias), "weight" (no bias)
    running: bool        # running statistics buffers given (BatchNorm, InstanceNorm)
    shape: tuple = None  # None: the grid's shape for this rank
    groups: int = None   # GroupNorm's num_groups (None: the grid's choice for this rank)

    def __str__(self):
        run = "-running" if self.running else ""
        shape = "" if self.shape is None else "-" + "x".join(map(str, self.shape))
        groups = "" if self.groups is None else f"-G{self.groups}"
        return (f"{self.norm}-{self.backend}-{self.layout}-r{self.rank}-"
                f"{dtype_name(self.dtype)}-{self.affine}{run}{shape}{groups}")

    @property
    def spec(self):
        return SPECS[self.norm]

    def x_shape(self):
        return self.shape if self.shape is not None else self.spec.shape(self)

    def rng(self, *extra):
        return rng_for(str(self), *extra)

    def inputs(self, *extra):
        """(x, params) with params a dict of weight/bias/running_mean/running_var."""
        rng = self.rng("inputs", *extra)
        shape = self.x_shape()
        # An offset per position of the last axis so that statistics differ per group.
        offset = rng.uniform(-2, 2, size=shape[-1])
        x = (rng.standard_normal(shape) * rng.uniform(0.5, 3.0) + offset).astype(self.dtype)
        return x, self.spec.params(self, rng, x)

    def with_(self, **kw):
        return replace(self, **kw)


class NormSpec:
    """How one norm is called.  Subclasses define shapes and calls."""
    name = ""
    ranks = (2, 3, 4, 5)
    layouts = LAYOUTS
    affines = ("none", "full", "weight")
    has_running = False        # has running buffers and an eval mode
    has_bias = True

    # --- shapes and parameters ---------------------------------------------------
    def shape(self, case):
        return channel_shape(case.rank, case.layout, C=6)

    def param_shape(self, case, x):
        return (x.shape[1] if case.layout == "NCHW" else x.shape[-1],)

    def params(self, case, rng, x):
        shape = self.param_shape(case, x)
        p = {"weight": None, "bias": None, "running_mean": None, "running_var": None}
        if case.affine in ("full", "weight"):
            p["weight"] = rng.uniform(0.5, 1.5, shape).astype(case.dtype)
        if case.affine == "full" and self.has_bias:
            p["bias"] = rng.standard_normal(shape).astype(case.dtype)
        if case.running:
            p["running_mean"] = rng.standard_normal(shape).astype(case.dtype)
            p["running_var"] = rng.uniform(0.5, 2.0, shape).astype(case.dtype)
        return p

    # --- fastnorm ------------------------------------------------------------------
    def forward(self, x, p, case, training=True, momentum=0.1):
        """The torch-like function (updates running buffers in place in training)."""
        raise NotImplementedError

    def train(self, x, p, case):
        """``*_train``: (y, saved statistics tuple)."""
        raise NotImplementedError

    def backward(self, dy, x, saved, p, case):
        """``*_backward``: dict of gradients."""
        raise NotImplementedError

    # --- PyTorch (arguments and result in PyTorch's layout) -------------------------
    def torch_forward(self, xt, pt, case, training=True, momentum=0.1):
        raise NotImplementedError

    def stat_shape(self, x, case):
        """Shape of each saved statistic of ``*_train`` (as documented)."""
        return (x.shape[1] if case.layout == "NCHW" else x.shape[-1],)

    def torch_x(self, a, case):
        return to_torch_layout(a, case.layout)

    def from_torch(self, a, case):
        return from_torch_layout(a, case.layout)


class BatchNormSpec(NormSpec):
    name = "batch_norm"
    has_running = True

    def forward(self, x, p, case, training=True, momentum=0.1):
        return F.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"],
                            training=training, momentum=momentum, layout=case.layout)

    def train(self, x, p, case):
        y, mean, invstd = F.batch_norm_train(x, p["weight"], p["bias"], layout=case.layout)
        return y, (mean, invstd)

    def backward(self, dy, x, saved, p, case):
        dx, dw, db = F.batch_norm_backward(dy, x, *saved, p["weight"], layout=case.layout)
        return {"input": dx, "weight": dw, "bias": db}

    def torch_forward(self, xt, pt, case, training=True, momentum=0.1):
        import torch.nn.functional as TF
        return TF.batch_norm(xt, pt["running_mean"], pt["running_var"], pt["weight"],
                             pt["bias"], training=training, momentum=momentum, eps=1e-5)


class GroupNormSpec(NormSpec):
    name = "group_norm"
    # Groups by rank cover 2 and 3 channels per group, one (InstanceNorm-like) and all
    # (LayerNorm-like): C = 6.
    GROUPS = {2: 2, 3: 3, 4: 6, 5: 1}

    def groups(self, case):
        return case.groups if case.groups is not None else self.GROUPS[case.rank]

    def stat_shape(self, x, case):
        return (x.shape[0], self.groups(case))

    def forward(self, x, p, case, training=True, momentum=0.1):
        return F.group_norm(x, self.groups(case), p["weight"], p["bias"], layout=case.layout)

    def train(self, x, p, case):
        y, mean, invstd = F.group_norm_train(x, self.groups(case), p["weight"], p["bias"],
                                             layout=case.layout)
        return y, (mean, invstd)

    def backward(self, dy, x, saved, p, case):
        dx, dw, db = F.group_norm_backward(dy, x, *saved, self.groups(case), p["weight"],
                                           layout=case.layout)
        return {"input": dx, "weight": dw, "bias": db}

    def torch_forward(self, xt, pt, case, training=True, momentum=0.1):
        import torch.nn.functional as TF
        return TF.group_norm(xt, self.groups(case), pt["weight"], pt["bias"], eps=1e-5)


class InstanceNormSpec(NormSpec):
    name = "instance_norm"
    ranks = (3, 4, 5)
    has_running = True

    def stat_shape(self, x, case):
        return (x.shape[0], x.shape[1] if case.layout == "NCHW" else x.shape[-1])

    def forward(self, x, p, case, training=True, momentum=0.1):
        return F.instance_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"],
                               use_input_stats=training, momentum=momentum,
                               layout=case.layout)

    def train(self, x, p, case):
        y, mean, invstd = F.instance_norm_train(x, p["weight"], p["bias"], layout=case.layout)
        return y, (mean, invstd)

    def backward(self, dy, x, saved, p, case):
        dx, dw, db = F.instance_norm_backward(dy, x, *saved, p["weight"], layout=case.layout)
        return {"input": dx, "weight": dw, "bias": db}

    def torch_forward(self, xt, pt, case, training=True, momentum=0.1):
        import torch.nn.functional as TF
        return TF.instance_norm(xt, pt["running_mean"], pt["running_var"], pt["weight"],
                                pt["bias"], use_input_stats=training, momentum=momentum,
                                eps=1e-5)


class RowNormSpec(NormSpec):
    """LayerNorm/RMSNorm: the layout axis is the number of normalized trailing dims."""
    layouts = ("last1", "last2")

    def shape(self, case):
        return (3, 2, 4, 5)[:case.rank - 1] + (24,)

    @staticmethod
    def normalized_shape(x, case):
        k = int(case.layout[-1])
        return tuple(x.shape[x.ndim - k:])

    def param_shape(self, case, x):
        return self.normalized_shape(x, case)

    def stat_shape(self, x, case):
        return x.shape[:x.ndim - int(case.layout[-1])]

    def torch_x(self, a, case):
        return a

    def from_torch(self, a, case):
        return a


class LayerNormSpec(RowNormSpec):
    name = "layer_norm"

    def forward(self, x, p, case, training=True, momentum=0.1):
        return F.layer_norm(x, self.normalized_shape(x, case), p["weight"], p["bias"])

    def train(self, x, p, case):
        y, mean, invstd = F.layer_norm_train(x, self.normalized_shape(x, case), p["weight"],
                                             p["bias"])
        return y, (mean, invstd)

    def backward(self, dy, x, saved, p, case):
        dx, dw, db = F.layer_norm_backward(dy, x, *saved, self.normalized_shape(x, case),
                                           p["weight"])
        return {"input": dx, "weight": dw, "bias": db}

    def torch_forward(self, xt, pt, case, training=True, momentum=0.1):
        import torch.nn.functional as TF
        return TF.layer_norm(xt, self.normalized_shape(xt, case), pt["weight"], pt["bias"],
                             eps=1e-5)


class RMSNormSpec(RowNormSpec):
    name = "rms_norm"
    affines = ("none", "weight")
    has_bias = False

    def forward(self, x, p, case, training=True, momentum=0.1):
        return F.rms_norm(x, self.normalized_shape(x, case), p["weight"])

    def train(self, x, p, case):
        y, invrms = F.rms_norm_train(x, self.normalized_shape(x, case), p["weight"])
        return y, (invrms,)

    def backward(self, dy, x, saved, p, case):
        dx, dw = F.rms_norm_backward(dy, x, *saved, self.normalized_shape(x, case),
                                     p["weight"])
        return {"input": dx, "weight": dw, "bias": None}

    def torch_forward(self, xt, pt, case, training=True, momentum=0.1):
        import torch.nn.functional as TF
        return TF.rms_norm(xt, self.normalized_shape(xt, case), pt["weight"])


SPECS = {s.name: s for s in (BatchNormSpec(), LayerNormSpec(), GroupNormSpec(),
                             InstanceNormSpec(), RMSNormSpec())}
NORMS = tuple(SPECS)


def grid(backends=BACKENDS, norms=NORMS):
    """THE test grid: norm x backend x layout x rank x dtype x affine x running."""
    cases = []
    for name in norms:
        spec = SPECS[name]
        runs = (False, True) if spec.has_running else (False,)
        for backend, layout, rank, dtype, affine, running in itertools.product(
                backends, spec.layouts, spec.ranks, DTYPES, spec.affines, runs):
            cases.append(Case(name, backend, layout, rank, dtype, affine, running))
    return cases


def case_for(norm, backend, layout=None, rank=4, dtype=np.float64, affine="full",
             running=False, shape=None, groups=None):
    """One case outside the grid (a given shape, typically)."""
    spec = SPECS[norm]
    if layout is None:
        layout = spec.layouts[0]
    return Case(norm, backend, layout, rank if shape is None else len(shape), dtype, affine,
                running, None if shape is None else tuple(shape), groups)


# ------------------------------------------------------------------------- torch ----
def torch_params(p, requires_grad=False):
    import torch
    out = {}
    for k, v in p.items():
        if v is None:
            out[k] = None
            continue
        t = torch.tensor(v)  # a copy: torch's in-place buffer updates stay in torch
        if requires_grad and k in ("weight", "bias"):
            t.requires_grad_(True)
        out[k] = t
    return out


def torch_run(case, x, p, training=True, momentum=0.1, dy=None):
    """PyTorch's result in fastnorm's layout: (y, torch params) or, with dy,
    (y, grads dict, torch params)."""
    import torch
    spec = case.spec
    xt = torch.tensor(np.ascontiguousarray(spec.torch_x(x, case)))
    pt = torch_params(p, requires_grad=dy is not None)
    if dy is not None:
        xt.requires_grad_(True)
    yt = spec.torch_forward(xt, pt, case, training=training, momentum=momentum)
    y = spec.from_torch(yt.detach().numpy(), case)
    if dy is None:
        return y, pt
    yt.backward(torch.tensor(np.ascontiguousarray(spec.torch_x(dy, case))))
    grads = {"input": spec.from_torch(xt.grad.numpy(), case),
             "weight": None if pt["weight"] is None else pt["weight"].grad.numpy(),
             "bias": None if pt["bias"] is None else pt["bias"].grad.numpy()}
    return y, grads, pt


def copy_params(p):
    return {k: (None if v is None else v.copy()) for k, v in p.items()}
