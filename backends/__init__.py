"""Fast paths of the lwrs core for specific array libraries, installed as ``lwrs.backends``.

The core (:mod:`lwrs`) is written once against the array API standard and is
the reference. A backend may only make it faster or wire it into a framework;
each piece here is tested against the core on the same inputs. Importing
``lwrs.backends`` imports no array library: each backend is its own submodule.
"""

__all__: list[str] = []
