"""``python -m lwrs.testing DOTTED.PATH``: print the conformance report of an optimizer.

This module is on the application floor: it may import the backends and NumPy.
The dotted path names a ``torch.optim.Optimizer`` class (``timm.optim.Lars``,
``pytorch_optimizer.LARS``, ``lwrs.backends.torch.LARS``, ``torch.optim.SGD``),
an optax factory (``optax.lars``), or a functional factory returning an object
with ``init``/``step`` (``lwrs.lars``). ``timm.optim.Lars`` is loaded from its
file (timm's own import needs torchvision); ``apex.parallel.LARC`` means
apex's ``LARC`` around ``torch.optim.SGD``.

Examples::

    python -m lwrs.testing timm.optim.Lars
    python -m lwrs.testing timm.optim.Lars --option trust_clip=True
    python -m lwrs.testing torch.optim.SGD --kind mnag
    python -m lwrs.testing --rst docs/conformance.rst      # the docs page, from every peer installed
"""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import KINDS, FunctionalDriver, Report, check


def resolve(path: str) -> Any:
    """The object a dotted path names, importing the longest module prefix (timm and apex specially)."""
    if path in ("timm.optim.Lars", "timm.optim.lars.Lars"):
        from lwrs.backends.torch.conformance import load_timm_lars

        found = load_timm_lars()
        if found is None:
            raise SystemExit("timm is not installed: pip install --no-deps timm")
        return found
    if path in ("apex.parallel.LARC", "apex.parallel.LARC.LARC"):
        from lwrs.backends.torch.conformance import load_apex_larc

        found = load_apex_larc()
        if found is None:
            raise SystemExit("apex is not installed")
        return found
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError as exc:
            raise SystemExit(f"cannot find {path}: {exc}") from None
        return obj
    raise SystemExit(f"cannot import any module of {path!r}")


def framework(obj: Any) -> str:
    """Which driver runs ``obj``: ``"torch"``, ``"jax"`` or ``"functional"``."""
    module = getattr(obj, "__module__", "") or ""
    root = module.split(".")[0]
    if isinstance(obj, type):
        for base in obj.__mro__:
            if base.__module__.startswith("torch.optim"):
                return "torch"
    if root in ("optax", "jax") or module.startswith("lwrs.backends.jax"):
        return "jax"
    if root in ("torch", "timm", "_lwrs_timm_optim", "pytorch_optimizer", "apex") or module.startswith(
            "lwrs.backends.torch"):
        return "torch"
    return "functional"


def run(obj: Any, *, kind: str, driver: str | None = None, options: dict[str, Any] | None = None,
        name: str | None = None, **fixed: Any) -> Report:
    """The report of ``obj`` with the driver of its framework."""
    driver = driver or framework(obj)
    options = options or {}
    if driver == "torch":
        from lwrs.backends.torch.conformance import check as torch_check

        return torch_check(obj, kind, options=options, name=name, **fixed)
    if driver == "jax":
        from lwrs.backends.jax.conformance import check as jax_check

        return jax_check(obj, kind, options=options, name=name, **fixed)
    import numpy as np

    return check(FunctionalDriver(obj, xp=np, kind=kind, name=name, **options), kind, **fixed)


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _pairs(items: Sequence[str], what: str) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{what} must be NAME=VALUE, got {item!r}")
        out[key] = _value(value)
    return out


def main(argv: Sequence[str] | None = None, out: Callable[[str], Any] = print) -> int:
    parser = argparse.ArgumentParser(prog="python -m lwrs.testing", description=__doc__.split("\n\n")[0])
    parser.add_argument("optimizer", nargs="?", help="dotted path, e.g. timm.optim.Lars or optax.lars")
    parser.add_argument("--kind", choices=KINDS, default="lars", help="the core optimizer to compare with")
    parser.add_argument("--driver", choices=("torch", "jax", "functional"), help="default: from the object's module")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="keyword argument for the optimizer itself, e.g. trust_clip=True")
    parser.add_argument("--fix", action="append", default=[], metavar="FACTOR=VALUE",
                        help="a convention not to search, e.g. weight_decay_form=norm_of_sum")
    parser.add_argument("--rst", metavar="FILE", help="write the docs page for every installed peer to FILE")
    args = parser.parse_args(argv)
    if args.rst:
        from .docs_page import write_page

        write_page(args.rst)
        out(f"wrote {args.rst}")
        return 0
    if not args.optimizer:
        parser.error("name an optimizer (a dotted path) or pass --rst FILE")
    obj = resolve(args.optimizer)
    report = run(obj, kind=args.kind, driver=args.driver, options=_pairs(args.option, "--option"),
                 name=args.optimizer, **_pairs(args.fix, "--fix"))
    out(report.text())
    return 0 if report.conforms else 1


if __name__ == "__main__":
    sys.exit(main())
