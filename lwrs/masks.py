r"""Layer masks: which layers get a trust ratio, and which get weight decay.

A mask is one bool per layer. Every optimizer takes two:

.. math::

    r_k = \begin{cases} \text{trust ratio} & k \in \text{adapt} \\ 1 & \text{otherwise} \end{cases},
    \qquad
    \lambda_k = \begin{cases} \lambda & k \in \text{weight decay} \\ 0 & \text{otherwise} \end{cases}

The defaults follow You et al. (2017) and the CLARS and TVLARS code: biases and
normalisation parameters (1-D tensors) get no trust ratio; every layer gets
weight decay. The torch classes express the same choice with two bools,
``exclude_1d`` and ``decay_1d`` (:func:`one_d_masks`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .pytree import flatten

__all__ = ["adapt_default", "weight_decay_default", "resolve_mask", "one_d_masks"]


def adapt_default(w: Any) -> bool:
    """The default adapt mask: a layer gets a trust ratio when it has more than one axis.

    Examples
    --------
    >>> import numpy as np
    >>> adapt_default(np.ones((2, 3))), adapt_default(np.ones(3))
    (True, False)
    """
    return w.ndim > 1


def weight_decay_default(w: Any) -> bool:
    """The default weight-decay mask: every layer is decayed.

    Examples
    --------
    >>> import numpy as np
    >>> weight_decay_default(np.ones(3))
    True
    """
    return True


def one_d_masks(params: Sequence[Any], *, exclude_1d: bool, decay_1d: bool) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
    """The adapt and weight-decay masks of the torch classes' ``exclude_1d`` and ``decay_1d``.

    A layer with ``ndim > 1`` is always adapted and decayed; a layer with
    ``ndim <= 1`` is adapted unless ``exclude_1d`` and decayed if ``decay_1d``.

    Examples
    --------
    >>> import numpy as np
    >>> one_d_masks([np.ones((2, 2)), np.ones(2)], exclude_1d=True, decay_1d=False)
    ((True, False), (True, False))
    """
    adapt = tuple(w.ndim > 1 or not exclude_1d for w in params)
    decay = tuple(w.ndim > 1 or bool(decay_1d) for w in params)
    return adapt, decay


def resolve_mask(name: str, mask: Any, params: Sequence[Any], default: Callable[[Any], bool]) -> tuple[bool, ...]:
    """Turn a per-layer mask option into a tuple of bools, one per layer.

    ``mask`` is ``None`` (use ``default(array)``), a callable ``array -> bool``,
    or a pytree of bools with the structure of params (a list of bools for a
    list of layers, a dict of bools for a dict, ...): one bool per layer, in
    leaf order.

    Examples
    --------
    >>> import numpy as np
    >>> resolve_mask("adapt_mask", None, [np.ones((2, 2)), np.ones(2)], adapt_default)
    (True, False)
    """
    if mask is None:
        return tuple(bool(default(w)) for w in params)
    if callable(mask):
        return tuple(bool(mask(w)) for w in params)
    if isinstance(mask, (Sequence, dict)) and not isinstance(mask, (str, bytes)):
        entries, _ = flatten(mask)
        if len(entries) != len(params):
            raise ValueError(f"{name} has {len(entries)} entries but params has {len(params)} layers")
        for k, m in enumerate(entries):
            if not isinstance(m, bool):
                raise TypeError(f"{name}[{k}] must be a bool, got {m!r}")
        return tuple(entries)
    raise TypeError(f"{name} must be None, a callable or a pytree of bools matching params, got {mask!r}")
