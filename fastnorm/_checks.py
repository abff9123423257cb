"""Input validation shared by the functional API and the modules.

Every message names the argument, what was expected and what came.  Checks run before
anything is written, so a rejected call leaves buffers and parameters as they were.
"""
import math
import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_LAYOUTS = {"nchw": "NCHW", "channels_first": "NCHW", "ncl": "NCHW", "ncdhw": "NCHW",
            "nc": "NCHW", "nhwc": "NHWC", "channels_last": "NHWC", "nlc": "NHWC",
            "ndhwc": "NHWC"}


def layout(value, name="layout"):
    """'NCHW' or 'NHWC' from any accepted spelling (case-insensitive)."""
    if type(value) is str and (value == "NCHW" or value == "NHWC"):  # the common case
        return value
    if isinstance(value, str):
        key = _LAYOUTS.get(value.strip().lower())
        if key is not None:
            return key
    raise ValueError(f"{name}: expected 'NCHW' (alias 'channels_first') or 'NHWC' "
                     f"(alias 'channels_last'), got {value!r}")


def array(x, name="input", min_ndim=2):
    """A float32/float64 ndarray of at least ``min_ndim`` dims, with no zero-size axis;
    returned C-contiguous (copied once if it was not)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimensions, got shape "
                         f"{x.shape} ({x.ndim} dimensions)")
    if x.size == 0:
        raise ValueError(f"{name}: expected a non-empty array, got shape {x.shape}")
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def param(p, name, shape, dtype):
    """None, or a float ndarray of exactly ``shape``, returned contiguous in ``dtype``."""
    if p is None:
        return None
    if type(p) is np.ndarray and p.dtype == dtype and p.shape == shape \
            and p.flags.c_contiguous:  # the common case, quickly
        return p
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray or None, got {type(p).__name__}")
    if p.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {p.dtype}")
    if p.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {p.shape}")
    return np.ascontiguousarray(p, dtype=dtype)


def buffer(b, name, shape):
    """A running-statistics buffer: updated in place, so it must be a writable float
    ndarray of ``shape``; it is returned as is."""
    if not isinstance(b, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(b).__name__}")
    if b.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {b.dtype}")
    if b.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {b.shape}")
    if not b.flags.writeable:
        raise ValueError(f"{name}: expected a writable array (it is updated in place)")
    return b


def same_shape(a, name, x, x_name="input"):
    if a.shape != x.shape:
        raise ValueError(f"{name}: expected shape {x.shape} (the shape of {x_name}), "
                         f"got {a.shape}")


# Outputs of at least this many bytes that the library allocates are placed apart from
# the inputs of their pass (``empty_apart``).  Not smaller ones: for the digits CNN's
# 128-256 KB activations the placement's ~3 us per call cost more than it saved (epoch
# 49-56 against 52-58 ms with a 64 KB threshold).
APART_MIN_BYTES = 1 << 20


def empty_apart(shape, dtype, inputs):
    """``np.empty(shape, dtype)``, placed (from 1 MB) so that its offset in a 4 KB page is
    far from the offsets of ``inputs``, 64-byte aligned.

    A pass that reads x[j] and writes y[j] stalls when y lies just after x modulo 4 KB:
    the CPU takes a load for dependent on an earlier store with the same low 12 address
    bits ("4K aliasing").  A LayerNorm (4096,1024) forward took 0.8-1.45 ms with y - x
    within 0-128 bytes modulo 4096 and 0.55 ms from 256 bytes (copy: 0.65 ms); two NumPy
    arrays of the same large size allocated one after the other land 16-48 bytes apart
    in this sense.  The result is a view of a buffer 4 KB larger."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < APART_MIN_BYTES:
        return np.empty(shape, dtype)
    offs = sorted(a.__array_interface__["data"][0] % 4096 for a in inputs)
    if not offs:
        return np.empty(shape, dtype)
    # the middle of the largest gap between the inputs' offsets on the 4 KB circle
    gaps = [((offs[(i + 1) % len(offs)] - o) % 4096 or 4096, o) for i, o in enumerate(offs)]
    gap, start = max(gaps)
    target = (start + gap // 2) // 64 * 64 % 4096
    buf = np.empty(nbytes + 4096, np.uint8)
    skip = (target - buf.__array_interface__["data"][0]) % 4096
    return buf[skip:skip + nbytes].view(dtype).reshape(shape)


def out(o, shape, dtype, name="out", apart=()):
    """A preallocated result: C-contiguous, writable, of the result's shape and dtype.
    None: a new array, placed apart from the arrays in ``apart`` (``empty_apart``)."""
    if o is None:
        return empty_apart(shape, dtype, apart) if apart else np.empty(shape, dtype)
    if not isinstance(o, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray or None, got {type(o).__name__}")
    if o.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {o.dtype}")
    if o.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {o.shape}")
    if not o.flags.c_contiguous or not o.flags.writeable:
        raise ValueError(f"{name}: expected a writable C-contiguous array")
    return o


def eps(value, name="eps"):
    if type(value) is float and 0.0 < value < math.inf:  # the common case, quickly
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)


def momentum(value, name="momentum"):
    if type(value) is float and 0.0 <= value <= 1.0:  # the common case, quickly
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return float(value)


def positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def normalized_shape(shape, x, name="normalized_shape"):
    """The trailing shape a LayerNorm/RMSNorm normalizes over, checked against x."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (int(shape),)
    # Only integers: int() would silently accept 5.0 -> 5, "5" -> 5 ("abc" -> ValueError
    # that does not name the argument).
    try:
        items = tuple(shape) if not isinstance(shape, (str, bytes)) else None
    except TypeError:
        items = None
    if items is None or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool)
                                for s in items):
        raise TypeError(f"{name}: expected an int or a tuple of ints, got {shape!r}")
    shape = tuple(int(s) for s in items)
    if len(shape) == 0 or any(s <= 0 for s in shape):
        raise ValueError(f"{name}: expected a non-empty tuple of positive ints, got {shape}")
    if x.ndim < len(shape) or x.shape[x.ndim - len(shape):] != shape:
        raise ValueError(f"{name}: expected the trailing dimensions of input, "
                         f"got {shape} for an input of shape {x.shape}")
    return shape
