"""Input checks shared by the core (private).

Every check runs before any array is computed, so an error never leaves a
half-updated state behind, and every message names the layer and the value.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

from array_api_compat import array_namespace, device, is_array_api_obj, is_lazy_array

from .pytree import Structure, flatten

__all__ = [
    "NonFiniteError",
    "check_layers",
    "check_hyperparameter",
    "check_bool",
    "library_name",
    "is_traced",
    "flatten_layers",
    "check_step",
]


class NonFiniteError(FloatingPointError):
    """A gradient or statistic holds ``inf`` or ``nan``; the message names the layer."""


def library_name(x: Any) -> str:
    """The top-level module of an array's type, e.g. ``"numpy"`` or ``"torch"``."""
    return type(x).__module__.split(".")[0]


def is_traced(x: Any) -> bool:
    """Whether ``x`` is an array without concrete values: a JAX tracer, a torch FakeTensor, or any
    array while ``torch.compile`` traces. Reading its values (``bool``, ``float``) is impossible or a graph break.
    """
    lib = library_name(x)
    if lib in ("jax", "jaxlib"):  # concrete jax arrays count as lazy for array_api_compat; only tracers are traced
        return any(k.__name__ == "Tracer" for k in type(x).__mro__)
    if lib != "numpy" and is_lazy_array(x):
        return True
    if type(x).__name__ in ("FakeTensor", "FunctionalTensor") or getattr(x, "is_meta", False):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and lib == "torch":
        compiler = getattr(torch, "compiler", None)
        return bool(compiler is not None and compiler.is_compiling())
    return False


def check_step(step: Any, where: str = "state.step") -> Any:
    """Check a step count: an int >= 0, or a 0-d integer or floating array (its value is not read)."""
    if is_array_api_obj(step):
        xp = array_namespace(step)
        if step.ndim != 0 or not xp.isdtype(step.dtype, ("integral", "real floating")):
            raise ValueError(f"{where} must be an int >= 0 or a 0-d integer array, got shape "
                             f"{tuple(step.shape)} and dtype {step.dtype}")
        return step
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{where} must be an int >= 0, got {step!r}")
    return step


def flatten_layers(name: str, tree: Any) -> tuple[list[Any], Structure]:
    """The leaves (layers) of a params-like pytree, and its structure; a bare array is refused."""
    if is_array_api_obj(tree) or not isinstance(tree, (Sequence, dict)) or isinstance(tree, (str, bytes)):
        raise TypeError(
            f"{name} must be a list, tuple, dict or NamedTuple of per-layer arrays, "
            f"got {type(tree).__name__}"
        )
    return flatten(tree)


def _shape_of(structure: Structure) -> Any:
    """What must agree between params and grads: dict keys and NamedTuple classes, lengths, leaves and Nones
    (a list and a tuple of the same layers agree)."""
    kind = "sequence" if structure.kind in ("list", "tuple") else structure.kind
    return (kind, structure.node, tuple(_shape_of(c) for c in structure.children))


def _describe(structure: Structure) -> str:
    if structure.kind == "dict":
        return f"a dict with keys {list(structure.node)}"
    if structure.kind == "namedtuple":
        return f"a {structure.node.__name__}"
    if structure.kind in ("list", "tuple"):
        return f"a {structure.kind} of {len(structure.children)}"
    return "a leaf" if structure.kind == "leaf" else "None"


def check_same_structure(name: str, structure: Structure, other: Structure, path: str = "") -> None:
    """Refuse ``other`` (the structure of ``name``) unless it is ``structure`` (that of params), naming where they
    differ: leaves are paired by position, so another structure would pair layers silently in another order.

    Examples
    --------
    >>> from lwrs.pytree import flatten
    >>> check_same_structure("grads", flatten({"a": 1, "b": 2})[1], flatten([1, 2])[1])
    Traceback (most recent call last):
    ...
    ValueError: grads must have the structure of params: params is a dict with keys ['a', 'b'], grads a list of 2
    """
    if _shape_of(structure) == _shape_of(other):
        return
    same_kind = _shape_of(structure)[:2] == _shape_of(other)[:2] and len(structure.children) == len(other.children)
    if same_kind:
        keys = structure.node if structure.kind == "dict" else range(len(structure.children))
        for key, a, b in zip(keys, structure.children, other.children):
            check_same_structure(name, a, b, f"{path}[{key!r}]")
    where = f" at {path}" if path else ""
    raise ValueError(f"{name} must have the structure of params: params{where} is {_describe(structure)}, "
                     f"{name}{where} {_describe(other)}")


def _as_layer_sequence(name: str, layers: Any) -> Sequence[Any]:
    if is_array_api_obj(layers) or not isinstance(layers, Sequence):
        raise TypeError(
            f"{name} must be a list, tuple, dict or NamedTuple of per-layer arrays, "
            f"got {type(layers).__name__}"
        )
    return layers


def same_device(a: Any, b: Any) -> bool:
    """Devices compare equal, or one of them is unknown (``None``: a tracer)."""
    return a is None or b is None or a == b


def layer_label(k: int, names: Sequence[str] | None) -> str:
    """``"layer k"``, with the layer's pytree path when params are nested: ``"layer 1 (a.bias)"``."""
    return f"layer {k}" if names is None else f"layer {k} ({names[k]})"


def check_layers(params: Any, _names: Sequence[str] | None = None, **others: Any) -> tuple[Any, Any]:
    """Check that ``params`` and every other per-layer sequence agree.

    Checks, for every layer and every sequence: it is an array, it comes from
    the same array library and device as ``params[0]``, it has the shape and
    floating dtype of the matching parameter. Returns ``(xp, device)``.

    Raises
    ------
    TypeError
        A sequence is not a list or tuple of arrays, or layers come from
        different array libraries.
    ValueError
        Layer counts, shapes, dtypes or devices differ.
    """
    params = _as_layer_sequence("params", params)
    if len(params) == 0:
        raise ValueError("params is empty: an optimizer needs at least one layer")
    first = params[0]
    if not is_array_api_obj(first):
        raise TypeError(f"layer 0 of params is a {type(first).__name__}, not an array")
    xp = array_namespace(first)
    dev = device(first)
    lib = library_name(first)
    for k, w in enumerate(params):
        _check_one("params", k, w, None, xp, lib, dev, _names)
        if not xp.isdtype(w.dtype, "real floating"):
            raise TypeError(f"{layer_label(k, _names)} of params has dtype {w.dtype}; a real floating dtype is needed")
    for name, layers in others.items():
        layers = _as_layer_sequence(name, layers)
        if len(layers) != len(params):
            raise ValueError(f"{name} has {len(layers)} layers but params has {len(params)}")
        for k, (a, w) in enumerate(zip(layers, params)):
            _check_one(name, k, a, w, xp, lib, dev, _names)
    return xp, dev


def _check_one(name: str, k: int, a: Any, w: Any, xp: Any, lib: str, dev: Any, names: Any = None) -> None:
    label = layer_label(k, names)
    if not is_array_api_obj(a):
        raise TypeError(f"{label} of {name} is a {type(a).__name__}, not an array")
    if array_namespace(a) is not xp:
        raise TypeError(
            f"{label} of {name} is a {library_name(a)} array but layer 0 of params "
            f"is a {lib} array; mixed array libraries are not supported"
        )
    if not same_device(device(a), dev):
        raise ValueError(
            f"{label} of {name} is on device {device(a)!r} but layer 0 of params "
            f"is on {dev!r}; move every array to one device"
        )
    if w is None:
        return
    if tuple(a.shape) != tuple(w.shape):
        raise ValueError(
            f"{label}: {name} has shape {tuple(a.shape)} but params has shape {tuple(w.shape)}"
        )
    if a.dtype != w.dtype:
        raise ValueError(f"{label}: {name} has dtype {a.dtype} but params has dtype {w.dtype}")


def is_bool(value: Any) -> bool:
    """A Python or NumPy bool (not an int, not a string)."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool; anything else (``"false"``, ``0``, ``None``) is a ``TypeError``."""
    if not is_bool(value):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")
    return bool(value)


def check_hyperparameter(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``float(value)`` after checking it is a finite number inside the interval.

    The interval is ``[low, high]``; ``low_open``/``high_open`` exclude an end.
    Bools and strings are refused (``lars(True)``, ``lars("0.5")``): a number must be a number.
    """
    if is_bool(value) or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a real number, got {value!r}") from None
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    too_low = low is not None and (value < low or (low_open and value == low))
    too_high = high is not None and (value > high or (high_open and value == high))
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else repr(low)
        hi = "inf" if high is None else repr(high)
        raise ValueError(f"{name} must lie in {left}{lo}, {hi}{right}, got {value!r}")
    return value
