"""Pytrees for the JAX adapter: layers in leaf order, their names, and masks.

The core works on sequences of per-layer arrays. Here a pytree of parameters
(dicts, lists, tuples, NamedTuples, and any node registered with
:mod:`jax.tree_util`) is flattened once with :func:`jax.tree_util.tree_flatten_with_path`;
layer ``k`` of the core is leaf ``k`` in JAX's flattening order, and its name
(used in error messages) is the leaf's key path, e.g. ``['dense']['kernel']``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

__all__ = ["Layers", "flatten_params", "leaves_like", "resolve_mask", "is_traced"]


class Layers(NamedTuple):
    """Parameters flattened into layers."""

    leaves: tuple[Any, ...]
    names: tuple[str, ...]
    treedef: Any


def flatten_params(params: Any) -> Layers:
    """Flatten ``params`` into its leaves, their key-path names and the tree structure."""
    if params is None:
        raise ValueError("lwrs's transformations need params: call update(updates, state, params)")
    with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not with_path:
        raise ValueError("params has no array leaves: an optimizer needs at least one layer")
    names = tuple(jax.tree_util.keystr(path) or "<root>" for path, _ in with_path)
    leaves = tuple(leaf for _, leaf in with_path)
    for name, leaf in zip(names, leaves):
        if not hasattr(leaf, "dtype") or not jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating):
            raise TypeError(f"layer {name} of params is {type(leaf).__name__} of dtype "
                            f"{getattr(leaf, 'dtype', None)}; a real floating array is needed")
    return Layers(leaves, names, treedef)


def leaves_like(layers: Layers, tree: Any, what: str) -> tuple[Any, ...]:
    """The leaves of ``tree`` in the order of ``layers``, checking structure and shapes."""
    try:
        leaves = layers.treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{what} does not have the structure of params: {err}") from None
    for name, w, a in zip(layers.names, layers.leaves, leaves):
        if getattr(a, "shape", None) != w.shape:
            raise ValueError(f"layer {name}: {what} has shape {getattr(a, 'shape', None)} "
                             f"but params has {w.shape}")
    return tuple(leaves)


def resolve_mask(name: str, mask: Any, layers: Layers, default: Callable[[Any], bool]) -> tuple[bool, ...]:
    """A static bool per layer from ``None``, a callable on one layer, or a pytree of bools.

    A pytree mask has the structure of params (or is a flat sequence of one
    bool per layer, in leaf order, as the core accepts).
    """
    count = len(layers.leaves)
    if mask is None:
        flags = [default(w) for w in layers.leaves]
    elif callable(mask):
        flags = [mask(w) for w in layers.leaves]
    else:
        try:
            flags = layers.treedef.flatten_up_to(mask)
        except (ValueError, TypeError):
            if isinstance(mask, Sequence) and not isinstance(mask, str) and len(mask) == count:
                flags = list(mask)
            else:
                raise ValueError(f"{name} must be None, a callable on one layer, or a pytree of bools with "
                                 f"the structure of params ({count} layers), got {mask!r}") from None
    for layer, flag in zip(layers.names, flags):
        if not isinstance(flag, bool):
            hint = ""
            if callable(mask):
                hint = (f"; a function {name} is called on one layer (an array) and returns a bool, unlike "
                        "optax's mask functions of the whole params tree: pass such a function's result, "
                        f"{name}=mask_fn(params)")
            raise TypeError(f"{name} for layer {layer} must be a bool, got {flag!r}{hint}")
    return tuple(flags)


def is_traced(*values: Any) -> bool:
    """Whether any value is a JAX tracer (inside ``jit``, ``grad``, ``vmap``...)."""
    return any(isinstance(v, jax.core.Tracer) for v in values)
