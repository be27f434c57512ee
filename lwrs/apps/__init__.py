"""The applications of lwrs: the ``lwrs`` command and what it runs.

The top floor of three (applications → :mod:`lwrs.backends` → the core
:mod:`lwrs`); imports point down only, and nothing below imports from here.

* :mod:`lwrs.apps.cli`: the ``lwrs`` command (also ``python -m lwrs``);
* :mod:`lwrs.apps.quadratic`: ``lwrs quadratic``, every optimizer and the CLARS
  theorems on a layered quadratic (any array library);
* :mod:`lwrs.apps.train`: ``lwrs train``, datasets, models and the training loop (torch);
* :mod:`lwrs.apps.reproduce`: ``lwrs reproduce``, the papers' experiments at small scale (torch).

Importing ``lwrs.apps`` imports no array library.
"""

__all__: list[str] = []
