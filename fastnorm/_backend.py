"""Backend selection: the one place that maps a name to a kernel module.

``cython`` is the ahead-of-time compiled extension (no JIT on any path), ``numba`` the
JIT kernels (imported only when first used: ``import numba`` alone costs ~0.4 s), and
``numpy`` the readable reference the others are tested against.
"""
import contextlib
import importlib
import importlib.util
import os
import threading

_NAMES = ("cython", "numba", "numpy")
_ALIASES = {"reference": "numpy"}
_loaded = {}
_errors = {}


class _Local(threading.local):
    backend = None  # this thread's use_backend override (a class default: a missing
    # attribute of a threading.local costs an AttributeError on every get_backend call)


_local = _Local()
_lock = threading.Lock()


def _load(name):
    if name == "numpy":
        from .kernels import reference
        return reference
    from .kernels.compiled import CompiledBackend
    if name == "cython":
        return CompiledBackend("cython", _cython_kernels())
    return CompiledBackend("numba", importlib.import_module("fastnorm.kernels.numba_kernels"))


def _available(name):
    if name in _loaded:
        return True
    if name in _errors:
        return False
    if name == "numba":  # do not pay for importing numba just to list it
        return importlib.util.find_spec("numba") is not None
    try:
        get_kernels(name)
        return True
    except ImportError:
        return False


def _isa_twin(name):
    """``fastnorm._ext.<name>``, or its AVX2+FMA twin ``<name>_avx2`` when the CPU has
    both and the twin was built (``FASTNORM_CYTHON_ISA=baseline`` keeps the portable one).
    ImportError when the portable module was not built."""
    portable = importlib.import_module(f"fastnorm._ext.{name}")
    if os.environ.get("FASTNORM_CYTHON_ISA", "").strip().lower() in ("baseline", "portable"):
        return portable
    try:
        if importlib.import_module("fastnorm._ext.kernels").cpu_has_avx2_fma():
            return importlib.import_module(f"fastnorm._ext.{name}_avx2")
    except ImportError:
        pass
    return portable


def _cython_kernels():
    """The Cython kernels module (``_isa_twin``)."""
    return _isa_twin("kernels")


def infer_module():
    """``fastnorm._ext.infer`` (the helpers of the convolutions, pooling, ReLU and the
    fused inference plans), or its AVX2+FMA twin on the same terms as the kernels."""
    return _isa_twin("infer")


def get_kernels(name=None):
    """The kernel object of a backend (the current one by default)."""
    if name is None:
        name = get_backend()
    k = _loaded.get(name)
    if k is not None:
        return k
    with _lock:
        if name not in _loaded:
            try:
                _loaded[name] = _load(name)
            except ImportError as e:
                _errors[name] = e
                raise
    return _loaded[name]


def backends():
    """Names of the backends that can be used on this machine."""
    return [n for n in _NAMES if _available(n)]


def _resolve(name, where):
    if not isinstance(name, str):
        raise TypeError(f"{where}: backend name must be a str, got {type(name).__name__}")
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in _NAMES or not _available(key):
        reason = f" ({_errors[key]})" if key in _errors else ""
        raise ValueError(f"{where}: unknown or unavailable backend {name!r}{reason}; "
                         f"available: {backends()}")
    return key


def _default():
    env = os.environ.get("FASTNORM_BACKEND", "").strip()
    if env:
        return _resolve(env, "FASTNORM_BACKEND")
    return "cython" if _available("cython") else "numba" if _available("numba") else "numpy"


_current = None


def get_backend():
    """Name of the backend in use in this thread."""
    override = _local.backend
    if override is not None:
        return override
    global _current
    if _current is None:
        _current = _default()
    return _current


def set_backend(name):
    """Select the backend for all threads (``use_backend`` for a scoped change)."""
    global _current
    key = _resolve(name, "set_backend")
    get_kernels(key)
    _current = key


@contextlib.contextmanager
def use_backend(name):
    """Use a backend inside a ``with`` block (this thread only)."""
    key = _resolve(name, "use_backend")
    get_kernels(key)
    previous = getattr(_local, "backend", None)
    _local.backend = key
    try:
        yield key
    finally:
        _local.backend = previous
