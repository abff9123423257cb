"""Optimizers with PyTorch's update rules, acting on ``p.data`` in place from ``p.grad``.

The updates are written the way ``torch.optim`` writes its single-tensor (``foreach=False``)
path, operation for operation, so that five steps here and in PyTorch agree to rounding.
State (momentum buffers, moments) is kept in each parameter's dtype, as PyTorch does.
"""
import math
import numbers

import numpy as np

try:  # one-pass updates (Cython); the NumPy code below without them
    from ._ext import optim as _kernels
except ImportError:
    _kernels = None

__all__ = ["Optimizer", "SGD", "Adam", "AdamW"]


def _number(value, name, low=0.0, low_open=False, high=None, high_open=False):
    """A finite real number in the given range, or a ValueError naming it."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
          and math.isfinite(value))
    if ok:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = f"{'(' if low_open else '['}{low}"
        hi = f"{high if high is not None else 'inf'}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name}: expected a finite number in {lo}, {hi}, got {value!r}")
    return float(value)


class Optimizer:
    """Base class: holds ``param_groups`` (a list of dicts with ``"params"`` and the
    hyperparameters) and per-parameter ``state``.

    ``params`` is an iterable of parameters (``Tensor``s with ``.data`` and ``.grad``) or
    of dicts ``{"params": [...], "lr": ...}`` that override the defaults for their group,
    as in PyTorch.
    """

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        self.param_groups = []
        self.state = {}  # id(param) -> dict; the groups keep the params alive
        if _is_tensor(params):
            raise TypeError("params: expected an iterable of parameters or of dicts, got a "
                            "single Tensor (pass [tensor] or model.parameters())")
        try:
            groups = list(params)
        except TypeError:
            raise TypeError(f"params: expected an iterable of parameters or of dicts, got "
                            f"{type(params).__name__}") from None
        if not groups:
            raise ValueError("params: optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group):
        if not isinstance(group, dict):
            raise TypeError(f"param group: expected a dict, got {type(group).__name__}")
        params = group.get("params")
        if params is None:
            raise ValueError("param group: expected a 'params' entry")
        params = [params] if _is_tensor(params) else list(params)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for i, p in enumerate(params):
            if not _is_tensor(p):
                raise TypeError(f"params[{i}]: expected a Tensor with a float ndarray .data, "
                                f"got {type(p).__name__}")
            if id(p) in seen:
                raise ValueError(f"params[{i}]: a parameter appears more than once "
                                 f"(shape {p.data.shape})")
            seen.add(id(p))
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise ValueError(f"param group: unknown hyperparameters {sorted(unknown)}, "
                             f"expected some of {sorted(self.defaults)}")
        full = dict(self.defaults)
        full.update(group)
        full["params"] = params
        self._check_group(full)
        self.param_groups.append(full)

    def _check_group(self, group):
        raise NotImplementedError

    def zero_grad(self, set_to_none=True):
        """Clear the gradients: ``None`` by default (PyTorch's default), zeros otherwise."""
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none or p.grad is None:
                    p.grad = None
                else:
                    p.grad = np.zeros_like(p.data)

    def step(self):
        """One update of every parameter that has a gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = _grad(p)
                self._update(p.data, grad, self.state.setdefault(id(p), {}), group)

    def _update(self, param, grad, state, group):
        raise NotImplementedError

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for k in sorted(group):
                if k != "params":
                    lines.append(f"    {k}: {group[k]}")
        return "\n".join(lines + [")"])


def _is_tensor(p):
    data = getattr(p, "data", None)
    return (isinstance(data, np.ndarray) and hasattr(p, "grad")
            and data.dtype in (np.float32, np.float64))


def _grad(p):
    g = p.grad
    if not isinstance(g, np.ndarray):
        g = getattr(g, "data", g)  # tolerate a Tensor gradient
    if not isinstance(g, np.ndarray) or g.shape != p.data.shape:
        raise ValueError(f"grad: expected an ndarray of the parameter's shape "
                         f"{p.data.shape}, got {getattr(g, 'shape', type(g).__name__)}")
    return g if g.dtype == p.data.dtype else g.astype(p.data.dtype)


class SGD(Optimizer):
    """Stochastic gradient descent, with PyTorch's momentum (the first step's buffer is
    the gradient itself), dampening, weight decay (L2, added to the gradient) and
    Nesterov momentum::

        g = grad + weight_decay * p
        buf = g                                   (first step)
        buf = momentum * buf + (1 - dampening) * g (later steps)
        g = g + momentum * buf if nesterov else buf
        p = p - lr * g
    """

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def _check_group(self, group):
        group["lr"] = _number(group["lr"], "lr")
        group["momentum"] = _number(group["momentum"], "momentum")
        group["dampening"] = _number(group["dampening"], "dampening")
        group["weight_decay"] = _number(group["weight_decay"], "weight_decay")
        if not isinstance(group["nesterov"], bool):
            raise TypeError(f"nesterov: expected a bool, got {group['nesterov']!r}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"nesterov: requires momentum > 0 and dampening = 0, got "
                             f"momentum={group['momentum']}, dampening={group['dampening']}")

    def _update(self, param, grad, state, group):
        wd, momentum = group["weight_decay"], group["momentum"]
        if wd != 0:
            grad = grad + param * param.dtype.type(wd)
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.copy()
            else:
                buf *= param.dtype.type(momentum)
                buf += grad * param.dtype.type(1.0 - group["dampening"])
            grad = grad + buf * param.dtype.type(momentum) if group["nesterov"] else buf
        param -= grad * param.dtype.type(group["lr"])


class Adam(Optimizer):
    """Adam (Kingma & Ba) with PyTorch's bias correction; ``weight_decay`` is L2 added to
    the gradient (for decoupled weight decay use ``AdamW``)::

        m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g * g
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """

    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _check_group(self, group):
        group["lr"] = _number(group["lr"], "lr")
        group["eps"] = _number(group["eps"], "eps")
        group["weight_decay"] = _number(group["weight_decay"], "weight_decay")
        betas = group["betas"]
        try:
            b1, b2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}") from None
        group["betas"] = (_number(b1, "betas[0]", high=1.0, high_open=True),
                          _number(b2, "betas[1]", high=1.0, high_open=True))

    def _update(self, param, grad, state, group):
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        t = param.dtype.type
        if not state:
            state["step"] = 0
            state["exp_avg"] = np.zeros_like(param)
            state["exp_avg_sq"] = np.zeros_like(param)
        state["step"] += 1
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if _kernels is not None and grad.dtype == param.dtype and grad.flags.c_contiguous \
                and param.flags.c_contiguous and exp_avg.dtype == param.dtype:
            _kernels.adam(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, wd, step,
                          self._decoupled)  # one pass instead of ~10 NumPy operations
            return
        if wd != 0:
            if self._decoupled:
                param *= t(1.0 - lr * wd)
            else:
                grad = grad + param * t(wd)
        exp_avg += (grad - exp_avg) * t(1.0 - beta1)  # torch: exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq *= t(beta2)
        exp_avg_sq += grad * grad * t(1.0 - beta2)
        step_size = lr / (1.0 - beta1 ** step)
        denom = np.sqrt(exp_avg_sq) / t(math.sqrt(1.0 - beta2 ** step))
        denom += t(eps)
        param -= exp_avg / denom * t(step_size)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as ``torch.optim.AdamW``:
    ``p = p * (1 - lr * weight_decay)`` before the Adam step."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
