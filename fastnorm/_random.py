"""The one random generator behind initialisation, dropout and shuffling."""
import numpy as np

_rng = np.random.default_rng()


def manual_seed(seed):
    """Seed fastnorm's generator: initialisation, dropout and data shuffling become
    reproducible (like ``torch.manual_seed``)."""
    global _rng
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"manual_seed: seed must be an int, got {type(seed).__name__}")
    _rng = np.random.default_rng(int(seed))
    return _rng


def generator():
    """The current ``numpy.random.Generator``."""
    return _rng
