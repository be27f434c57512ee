"""lwrs on PyTorch: drop-in ``torch.optim`` optimizers built on the core.

Importing this module imports torch. See :mod:`lwrs.backends.torch.optim`.
"""

from .optim import CLARS, LAMB, LARS, MNAG, TVLARS

__all__ = ["MNAG", "LARS", "CLARS", "TVLARS", "LAMB"]
