"""lwrs on PyTorch: drop-in ``torch.optim`` optimizers built on the core.

Importing this module imports torch. See :mod:`lwrs.backends.torch.optim` for the
optimizers and :mod:`lwrs.backends.torch.per_sample` for the exact per-sample norms.
"""

from .optim import CLARS, LAMB, LARS, MNAG, TVLARS
from .per_sample import PerSampleNorms, UnsupportedModuleError, minibatch_norm_statistics

__all__ = [
    "MNAG", "LARS", "CLARS", "TVLARS", "LAMB", "PerSampleNorms", "UnsupportedModuleError", "minibatch_norm_statistics",
]
