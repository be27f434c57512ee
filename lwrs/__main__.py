"""``python -m lwrs``: the ``lwrs`` command (:mod:`lwrs.apps.cli`)."""

from lwrs.apps.cli import main

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
