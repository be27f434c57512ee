r"""Nested parameters (pytrees), flattened in plain Python.

Params and grads may be any nesting of ``dict``, ``list``, ``tuple`` and
``NamedTuple`` with arrays at the leaves. The optimizers flatten them to a list
of layers (one layer per leaf), work on that list, and rebuild the caller's
structure for the result:

.. math::

    \text{tree} \xrightarrow{\text{flatten}} (w_1, \dots, w_K),\ \text{structure}
    \xrightarrow{\text{unflatten}} \text{tree}

The order of the leaves is the order of ``jax.tree_util.tree_leaves`` for these
containers: dict keys sorted, sequences in order, ``None`` an empty subtree.
No array library is imported; JAX's registered custom nodes are the JAX
adapter's business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Structure", "flatten", "unflatten", "is_leaf_structure", "leaf_names"]


@dataclass(frozen=True)
class Structure:
    """The shape of a pytree without its leaves (what :func:`flatten` returns next to the leaves).

    Attributes
    ----------
    kind : str
        ``"leaf"``, ``"none"``, ``"dict"``, ``"list"``, ``"tuple"`` or ``"namedtuple"``.
    node : object
        The dict's sorted keys, or the NamedTuple's class; ``None`` otherwise.
    children : tuple of Structure
        One per child, in leaf order.
    """

    kind: str
    node: Any = None
    children: tuple[Structure, ...] = ()

    @property
    def num_leaves(self) -> int:
        """How many leaves the tree has.

        Examples
        --------
        >>> flatten({"b": [1, 2], "a": 3})[1].num_leaves
        3
        """
        if self.kind == "leaf":
            return 1
        return sum(c.num_leaves for c in self.children)


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def flatten(tree: Any) -> tuple[list[Any], Structure]:
    """The leaves of ``tree`` in order, and its structure.

    .. math:: \\text{flatten}(\\text{tree}) = ([w_1, \\dots, w_K], \\text{structure})

    Examples
    --------
    >>> leaves, structure = flatten({"w": [10, 20], "b": 30})
    >>> leaves
    [30, 10, 20]
    >>> unflatten(structure, [3, 1, 2])
    {'b': 3, 'w': [1, 2]}
    """
    leaves: list[Any] = []
    return leaves, _flatten(tree, leaves)


def _flatten(tree: Any, leaves: list[Any]) -> Structure:
    if tree is None:
        return Structure("none")
    if isinstance(tree, dict):
        try:
            keys = tuple(sorted(tree))
        except TypeError:
            raise TypeError(f"a dict of params needs sortable keys, got {list(tree)!r}") from None
        return Structure("dict", keys, tuple(_flatten(tree[k], leaves) for k in keys))
    if _is_namedtuple(tree):
        return Structure("namedtuple", type(tree), tuple(_flatten(c, leaves) for c in tree))
    if isinstance(tree, (list, tuple)):
        kind = "list" if isinstance(tree, list) else "tuple"
        return Structure(kind, None, tuple(_flatten(c, leaves) for c in tree))
    leaves.append(tree)
    return Structure("leaf")


def unflatten(structure: Structure, leaves: Sequence[Any]) -> Any:
    """Rebuild a tree of ``structure`` from ``leaves`` (the inverse of :func:`flatten`).

    Examples
    --------
    >>> unflatten(flatten((1, [2, None]))[1], ["a", "b"])
    ('a', ['b', None])
    """
    leaves = list(leaves)
    if len(leaves) != structure.num_leaves:
        raise ValueError(f"the structure has {structure.num_leaves} leaves, got {len(leaves)}")
    it = iter(leaves)
    return _unflatten(structure, it)


def _unflatten(s: Structure, it: Any) -> Any:
    if s.kind == "leaf":
        return next(it)
    if s.kind == "none":
        return None
    children = [_unflatten(c, it) for c in s.children]
    if s.kind == "dict":
        return dict(zip(s.node, children))
    if s.kind == "namedtuple":
        return s.node(*children)
    return children if s.kind == "list" else tuple(children)


def is_leaf_structure(structure: Structure) -> bool:
    """Whether the tree was a single array (not a container).

    Examples
    --------
    >>> is_leaf_structure(flatten(1.0)[1]), is_leaf_structure(flatten([1.0])[1])
    (True, False)
    """
    return structure.kind == "leaf"


def leaf_names(structure: Structure) -> list[str] | None:
    """A readable path for every leaf (``"a.weight"``, ``"b[0]"``), or ``None`` for a flat list or tuple of layers.

    Error messages name a layer by its path when params are nested.

    Examples
    --------
    >>> leaf_names(flatten({"b": [1.0], "a": {"w": 2.0}})[1])
    ['a.w', 'b[0]']
    >>> leaf_names(flatten([1.0, 2.0])[1]) is None
    True
    """
    if structure.kind in ("list", "tuple") and all(c.kind == "leaf" for c in structure.children):
        return None
    names: list[str] = []
    _names(structure, "", names)
    return names


def _names(s: Structure, prefix: str, out: list[str]) -> None:
    if s.kind == "leaf":
        out.append(prefix or "<root>")
    elif s.kind == "dict":
        for key, child in zip(s.node, s.children):
            _names(child, f"{prefix}.{key}" if prefix else str(key), out)
    elif s.kind == "namedtuple":
        for field, child in zip(s.node._fields, s.children):
            _names(child, f"{prefix}.{field}" if prefix else field, out)
    elif s.kind in ("list", "tuple"):
        for i, child in enumerate(s.children):
            _names(child, f"{prefix}[{i}]", out)


def map_structure(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Apply ``fn`` leaf-wise to trees of one structure (private helper)."""
    leaves, s = flatten(tree)
    others = [flatten(r)[0] for r in rest]
    return unflatten(s, [fn(*xs) for xs in zip(leaves, *others)])
