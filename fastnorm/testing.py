"""Testing helpers: a numerical gradient check for the autograd."""
import numpy as np

from .autograd import Tensor, no_grad

__all__ = ["gradcheck"]


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, n_directions=3, seed=0):
    """Check the gradients of ``fn(*inputs)`` against finite differences, in float64.

    Like HIPS autograd's ``check_grads``: the output is projected on a random cotangent
    ``v`` (so every output counts), and for each input that requires grad the directional
    derivative along ``n_directions`` random unit directions ``d`` is compared:
    ``<grad, d>`` from ``backward(v)`` against the central difference
    ``(f(x + eps d) - f(x - eps d)) / (2 eps)`` with ``f = sum(v * fn(...))``.  One
    backward and ``2 * n_directions`` forwards per input, instead of two forwards per
    element.

    Floating inputs are copied to float64 Tensors (keeping ``requires_grad``); other
    inputs are passed as they are.  ``fn`` must be deterministic (seed dropout inside it).
    Returns True, or raises AssertionError naming the input and the two derivatives.
    """
    if not isinstance(inputs, (list, tuple)):
        inputs = [inputs]
    args = [Tensor(a.data.astype(np.float64), requires_grad=a.requires_grad)
            if isinstance(a, Tensor) and a.dtype.kind == "f" else a for a in inputs]
    checked = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input requires grad; pass Tensors with "
                         "requires_grad=True")
    rng = np.random.default_rng(seed)

    out = fn(*args)
    if not isinstance(out, Tensor):
        raise TypeError(f"gradcheck: fn must return a Tensor, got {type(out).__name__}")
    v = rng.standard_normal(out.shape)
    if out.requires_grad:
        out.backward(v.astype(out.dtype))

    def f(i, x):
        call = [a.detach() if isinstance(a, Tensor) else a for a in args]
        call[i] = Tensor(x)
        with no_grad():
            return float(np.sum(v * fn(*call).data.astype(np.float64)))

    for i in checked:
        x = args[i].data
        grad = args[i].grad if args[i].grad is not None else np.zeros_like(x)
        for k in range(n_directions):
            d = rng.standard_normal(x.shape)
            norm = np.linalg.norm(d)
            d = d / norm if norm > 0 else d
            numeric = (f(i, x + eps * d) - f(i, x - eps * d)) / (2 * eps)
            analytic = float(np.sum(grad * d))
            if not abs(numeric - analytic) <= atol + rtol * abs(numeric):
                raise AssertionError(
                    f"gradcheck: input {i} (shape {x.shape}), direction {k}: analytic "
                    f"directional derivative {analytic:.10g} != numerical {numeric:.10g} "
                    f"(difference {abs(numeric - analytic):.3g}, allowed "
                    f"{atol + rtol * abs(numeric):.3g})")
    return True
