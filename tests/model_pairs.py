"""The same small MLP and CNN in PyTorch and in fastnorm, with identical weights.

Used by test_nn, test_optim, test_serialization and test_fuse.  torch is imported by the
callers (``pytest.importorskip``), never by fastnorm.
"""
import numpy as np

from fastnorm import nn

MLP_IN, MLP_HIDDEN, CLASSES = 6, 16, 4
CNN_SHAPE = (3, 8, 8)  # (C, H, W)


def torch_mlp(torch, momentum=0.1):
    t = torch.nn
    return t.Sequential(t.Linear(MLP_IN, MLP_HIDDEN), t.BatchNorm1d(MLP_HIDDEN, momentum=momentum),
                        t.ReLU(), t.Linear(MLP_HIDDEN, CLASSES))


def fn_mlp(layout="NCHW", momentum=0.1, dtype=np.float32):
    return nn.Sequential(nn.Linear(MLP_IN, MLP_HIDDEN, dtype=dtype),
                         nn.BatchNorm1d(MLP_HIDDEN, momentum=momentum, layout=layout, dtype=dtype),
                         nn.ReLU(), nn.Linear(MLP_HIDDEN, CLASSES, dtype=dtype))


def torch_cnn(torch, momentum=0.1):
    t = torch.nn
    C, H, W = CNN_SHAPE
    return t.Sequential(t.Conv2d(C, 8, 3, padding=1), t.BatchNorm2d(8, momentum=momentum), t.ReLU(),
                        t.MaxPool2d(2), t.Conv2d(8, 6, 3, padding=1),
                        t.BatchNorm2d(6, momentum=momentum), t.ReLU(), t.Flatten(),
                        t.Linear(6 * (H // 2) * (W // 2), CLASSES))


def fn_cnn(layout="NCHW", momentum=0.1, dtype=np.float32):
    C, H, W = CNN_SHAPE
    return nn.Sequential(
        nn.Conv2d(C, 8, 3, padding=1, layout=layout, dtype=dtype),
        nn.BatchNorm2d(8, momentum=momentum, layout=layout, dtype=dtype), nn.ReLU(),
        nn.MaxPool2d(2, layout=layout),
        nn.Conv2d(8, 6, 3, padding=1, layout=layout, dtype=dtype),
        nn.BatchNorm2d(6, momentum=momentum, layout=layout, dtype=dtype), nn.ReLU(),
        nn.Flatten(layout=layout), nn.Linear(6 * (H // 2) * (W // 2), CLASSES, dtype=dtype))


def pair(torch, kind, layout="NCHW", momentum=0.1, seed=0):
    """(torch model, fastnorm model) with the torch weights loaded into fastnorm."""
    torch.manual_seed(seed)
    tm = (torch_mlp if kind == "mlp" else torch_cnn)(torch, momentum)
    fm = (fn_mlp if kind == "mlp" else fn_cnn)(layout, momentum)
    fm.load_state_dict(torch_state(tm))
    return tm, fm


def torch_state(tm):
    return {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}


def batch(kind, n=8, seed=0):
    """(x in NCHW, integer targets)."""
    rng = np.random.default_rng(seed)
    shape = (n, MLP_IN) if kind == "mlp" else (n, *CNN_SHAPE)
    x = rng.standard_normal(shape).astype(np.float32)
    return x, rng.integers(0, CLASSES, n)


def to_layout(x, layout):
    """An NCHW batch in ``layout`` (channels last for 4-D input)."""
    if layout == "NHWC" and x.ndim == 4:
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    return x


def assert_close(actual, expected, rtol=1e-4, what="", scale=None):
    """max |actual - expected| <= rtol * max |expected| (relative to the array's scale,
    so that entries near zero do not make float32 rounding look like an error).  ``scale``
    replaces max |expected|, for arrays that are zero up to rounding (the gradient of a
    bias before a training-mode BatchNorm), compared at the scale of the other gradients."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if scale is None:
        scale = max(float(np.abs(expected).max()), 1e-12) if expected.size else 1.0
    err = float(np.abs(actual.astype(np.float64) - expected).max()) if expected.size else 0.0
    assert err <= rtol * scale, f"{what}: max abs error {err:.3g} > {rtol} * {scale:.3g}"
