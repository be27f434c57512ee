"""``lwrs reproduce``: the CLARS and TVLARS papers' experiments at small scale, on MNIST-1D.

See :mod:`lwrs.apps.reproduce.running`.
"""

__all__: list[str] = []
