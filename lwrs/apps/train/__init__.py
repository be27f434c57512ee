"""``lwrs train``: datasets (:mod:`~lwrs.apps.train.data`), models (:mod:`~lwrs.apps.train.models`),
the run's configuration (:mod:`~lwrs.apps.train.config`) and the training loop (:mod:`~lwrs.apps.train.loop`).

Importing this package imports no array library; ``data``, ``models`` and
``loop`` need NumPy and torch.
"""

__all__: list[str] = []
