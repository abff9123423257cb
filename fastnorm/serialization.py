"""Saving and loading state dicts as ``.safetensors`` or ``.npz``.

Keys are PyTorch's (``0.weight``, ``1.running_mean``, ``1.num_batches_tracked``), so a
PyTorch ``state_dict`` written with ``safetensors.torch.save_file`` loads as is, and a
file written here loads into the PyTorch model with ``safetensors.torch.load_file``.
``num_batches_tracked`` is stored as a 0-d int64 array in both formats.

Metadata is a ``str -> str`` dict (safetensors' own header metadata; in an ``.npz`` it
is a JSON string under the reserved key ``__metadata__``), read back by
``load_metadata``.  Files are written to a temporary file and renamed, so a reader (a
service reloading its weights) never sees a half-written file.
"""
import json
import os
import tempfile
from collections.abc import Mapping

import numpy as np

__all__ = ["save", "load_into", "load_state", "load_metadata"]

_FORMATS = {".safetensors": "safetensors", ".npz": "npz"}
_NPZ_METADATA = "__metadata__"


def _format(path):
    ext = os.path.splitext(path)[1].lower()
    fmt = _FORMATS.get(ext)
    if fmt is None:
        raise ValueError(f"path: expected a file name ending in .safetensors or .npz, got "
                         f"{path!r} (extension {ext!r})")
    return fmt


def _path(path):
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"path: expected a str or os.PathLike, got "
                        f"{type(path).__name__}") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    return path


def _existing(path):
    path = _path(path)
    fmt = _format(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no such file {path!r}")
    return path, fmt


def _safetensors_numpy():
    try:
        import safetensors.numpy
    except ImportError:
        raise ImportError("saving or loading .safetensors needs the 'safetensors' package "
                          "(pip install safetensors), or use a .npz file") from None
    return safetensors.numpy


def _check_metadata(metadata):
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata: expected a dict of str to str, got "
                        f"{type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata: expected a dict of str to str, got the entry "
                            f"{k!r}: {v!r} ({type(k).__name__} -> {type(v).__name__})")
    return dict(metadata)


def _state_of(obj):
    """The state dict to write: a module's ``state_dict()`` or a mapping of arrays."""
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        state = obj.state_dict()
    elif isinstance(obj, Mapping):
        state = obj
    else:
        raise TypeError(f"module: expected a fastnorm.nn.Module or a dict of arrays, got "
                        f"{type(obj).__name__}")
    out = {}
    for k, v in state.items():
        if not isinstance(k, str):
            raise TypeError(f"state dict: expected str keys, got {k!r}")
        if k == _NPZ_METADATA:
            raise ValueError(f"state dict: the key {k!r} is reserved for metadata")
        v = np.asarray(v)
        out[k] = v if v.flags.c_contiguous else v.copy(order="C")  # keeps 0-d arrays 0-d
    return out


def save(module, path, metadata=None):
    """Write ``module.state_dict()`` (or a dict of arrays) to ``path``, a ``.safetensors``
    or ``.npz`` file, with optional ``metadata`` (a ``str -> str`` dict)."""
    path = _path(path)
    fmt = _format(path)
    metadata = _check_metadata(metadata)
    state = _state_of(module)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fastnorm-", suffix=os.path.splitext(path)[1],
                               dir=directory)
    try:
        if fmt == "safetensors":
            os.close(fd)
            _safetensors_numpy().save_file(state, tmp, metadata=metadata)
        else:
            with os.fdopen(fd, "wb") as f:
                extra = {} if metadata is None else {_NPZ_METADATA: np.array(json.dumps(metadata))}
                np.savez(f, **state, **extra)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_state(path):
    """The state dict stored in ``path`` as ``dict[str, ndarray]``."""
    path, fmt = _existing(path)
    try:
        if fmt == "safetensors":
            return dict(_safetensors_numpy().load_file(path))
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files if k != _NPZ_METADATA}
    except (ImportError, FileNotFoundError):
        raise
    except Exception as e:  # safetensors, zipfile and numpy each raise their own kinds
        raise ValueError(f"path: could not read {path!r} as {fmt}: {e}") from e


def load_metadata(path):
    """The metadata dict stored with ``path`` (``{}`` when there is none)."""
    path, fmt = _existing(path)
    try:
        if fmt == "safetensors":
            from safetensors import safe_open
            _safetensors_numpy()
            with safe_open(path, framework="numpy") as f:
                return dict(f.metadata() or {})
        with np.load(path, allow_pickle=False) as f:
            if _NPZ_METADATA not in f.files:
                return {}
            return json.loads(str(f[_NPZ_METADATA]))
    except (ImportError, FileNotFoundError):
        raise
    except Exception as e:
        raise ValueError(f"path: could not read the metadata of {path!r} as {fmt}: {e}") from e


def load_into(module, path):
    """Load the state dict in ``path`` into ``module`` (strict, like
    ``module.load_state_dict``: on any missing, unexpected or mis-shaped entry nothing is
    changed); returns ``module``."""
    if not (hasattr(module, "load_state_dict") and callable(module.load_state_dict)):
        raise TypeError(f"module: expected a fastnorm.nn.Module, got {type(module).__name__}")
    module.load_state_dict(load_state(path))
    return module
