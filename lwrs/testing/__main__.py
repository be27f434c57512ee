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
    python -m lwrs.testing lwrs.backends.torch.CLARS        # kind clars: step(norm_stats=...) every step
    python -m lwrs.testing lwrs.backends.jax.tvlars
    python -m lwrs.testing --rst docs/conformance.rst      # the docs page, from every peer installed
"""

from __future__ import annotations

import argparse
import ast
import functools
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


def guess_kind(path: str) -> str:
    """The kind a dotted path's last name suggests: ``lamb``, ``clars``, ``tvlars``, ``mnag`` (SGD, mNAG) or ``lars``.

    Examples
    --------
    >>> guess_kind("optax.lamb"), guess_kind("torch.optim.SGD"), guess_kind("timm.optim.Lars")
    ('lamb', 'mnag', 'lars')
    >>> guess_kind("lwrs.backends.torch.CLARS"), guess_kind("lwrs.backends.jax.tvlars")
    ('clars', 'tvlars')
    """
    last = path.rsplit(".", 1)[-1].lower()
    for kind in ("lamb", "clars", "tvlars"):
        if kind in last:
            return kind
    if last in ("sgd", "mnag", "mgd", "nesterov"):
        return "mnag"
    return "lars"


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


def subjects() -> list[tuple[str, str, Any, dict[str, Any]]]:
    """``(label, kind, object, options)`` for every implementation on the docs page that is installed."""
    import importlib.util

    from lwrs.backends.torch.conformance import peers

    found = peers()
    rows = [("lwrs.backends.torch.LARS", "lars", found["lwrs.backends.torch.LARS"], {})]
    if importlib.util.find_spec("optax") is not None:
        from lwrs.backends import jax as lwrs_jax

        rows.append(("lwrs.backends.jax.lars", "lars", lwrs_jax.lars, {}))
    if "timm.optim.Lars" in found:
        rows.append(("timm.optim.Lars", "lars", found["timm.optim.Lars"], {}))
        rows.append(("timm.optim.Lars", "lars", found["timm.optim.Lars"], {"trust_clip": True}))
    if "pytorch_optimizer.LARS" in found:
        rows.append(("pytorch_optimizer.LARS", "lars", found["pytorch_optimizer.LARS"], {}))
    if importlib.util.find_spec("optax") is not None:
        import optax

        rows.append(("optax.lars", "lars", optax.lars, {}))
    if "apex.parallel.LARC" in found:  # pragma: no cover - apex is not installable on the CPU CI
        rows.append(("apex.parallel.LARC", "lars", found["apex.parallel.LARC"], {}))
    from lwrs.backends.torch import CLARS, LAMB, TVLARS

    rows.append(("lwrs.backends.torch.CLARS", "clars", CLARS, {}))
    if importlib.util.find_spec("optax") is not None:
        rows.append(("lwrs.backends.jax.clars", "clars", lwrs_jax.clars, {}))
    rows.append(("lwrs.backends.torch.TVLARS", "tvlars", TVLARS, {}))
    if importlib.util.find_spec("optax") is not None:
        rows.append(("lwrs.backends.jax.tvlars", "tvlars", lwrs_jax.tvlars, {}))
    rows.append(("lwrs.backends.torch.LAMB", "lamb", LAMB, {}))
    if importlib.util.find_spec("optax") is not None:
        rows.append(("lwrs.backends.jax.lamb", "lamb", lwrs_jax.lamb, {}))
        rows.append(("optax.lamb", "lamb", optax.lamb, {}))
    if "pytorch_optimizer.LARS" in found:
        from pytorch_optimizer import Lamb

        rows.append(("pytorch_optimizer.Lamb", "lamb", Lamb, {}))
    import torch

    rows.append(("torch.optim.SGD", "mnag", torch.optim.SGD, {}))
    rows.append(("torch.optim.SGD", "mnag", torch.optim.SGD, {"nesterov": True}))
    return rows


_PAGE_HEAD = """\
..
   Generated by ``python -m lwrs.testing --rst docs/conformance.rst``; do not edit by hand.
   tests/test_conformance_page.py checks that it is what the kit reports now.

Conformance of LARS, CLARS, TVLARS and LAMB implementations
===========================================================

The conformance kit (:mod:`lwrs.testing`) runs an implementation through a fixed battery of
small seeded float64 problems, runs the core on the same problems under every convention
the core can express (:mod:`lwrs.testing.conventions`), and reports which conventions match
(relative error at most {tolerance:g} per layer and step) and where the closest one
diverges. LAMB runs at the learning rate times :math:`\\eta` of each problem (LAMB's step
is :math:`\\gamma_t\\|w_k\\|` long), and :func:`lwrs.mnag` is the reference for
``torch.optim.SGD``. CLARS implementations receive, at every step, the exact statistics
(``norm_stats=``: :math:`S^{{(1)}}_k = \\sum_i\\|g_{{ik}}\\|`, :math:`S^{{(2)}}_k`, :math:`N`) of
{samples} per-sample gradients that average to the mini-batch gradient, and are compared with
:func:`lwrs.clars`; TVLARS implementations get :math:`\\lambda, d_e, \\alpha, \\gamma_{{\\min}}`
= {tvlars} and are compared with :func:`lwrs.tvlars`, with these or with the official code's
:math:`\\alpha = 0.1, \\gamma_{{\\min}} = 0, d_e = -1` (the ``phi`` convention). Conventions the core cannot express are never imitated: the kit names them from
the way the trajectory diverges (the *diagnosis* column). The problems
(:func:`lwrs.testing.battery.battery`, {steps} steps each): {problems}.

Check your own optimizer the same way, from the shell (``python -m lwrs.testing
timm.optim.Lars``) or in a test suite
(:func:`lwrs.backends.torch.conformance.assert_implements`). The :doc:`migration` page turns
these findings into the options with which lwrs reproduces each peer.
{missing}
"""


def _short(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


@functools.lru_cache(maxsize=None)
def page_report(label: str, kind: str, **options: Any) -> Report:
    """The report of one row of the docs page (computed once per process; the tests reuse it)."""
    obj = next(o for row_label, row_kind, o, row_options in subjects()
               if (row_label, row_kind, row_options) == (label, kind, options))
    return run(obj, kind=kind, options=options, name=label)


def page() -> str:
    """The docs page: one row per installed implementation, then each closest convention's divergence."""
    from lwrs.testing import battery

    rows = subjects()
    reports = [(label, options, page_report(label, kind, **options)) for label, kind, obj, options in rows]
    problems = battery()
    labels = {label for label, *_ in rows}
    missing = [name for name in ("timm.optim.Lars", "pytorch_optimizer.LARS", "optax.lars", "apex.parallel.LARC")
               if name not in labels]
    note = f"\nNot installed where this page was generated: {', '.join(missing)}.\n" if missing else ""
    from lwrs.testing.battery import SAMPLES
    from lwrs.testing.conventions import TVLARS_HYPERPARAMETERS

    text = _PAGE_HEAD.format(tolerance=reports[0][2].tolerance, steps=problems[0].steps, missing=note,
                             samples=SAMPLES, tvlars=", ".join(f"{v:g}" for v in TVLARS_HYPERPARAMETERS.values()),
                             problems=", ".join(f"``{p.name}`` ({p.description})" for p in problems))
    table = [".. list-table::", "   :header-rows: 1", "   :widths: 20 8 30 22 30", "",
             "   * - implementation", "     - matches", "     - closest convention of the core",
             "     - diverges on", "     - diagnosis"]
    for label, options, report in reports:
        best = report.best
        extra = ", ".join(f"{k}={_short(v)}" for k, v in options.items())
        name = f"``{label}({extra})``" if extra else f"``{label}``"
        diverges = [f"``{r.problem}`` (step {r.divergence.step}" + (f", ``{r.divergence.layer_name}``)"
                    if r.divergence.layer >= 0 else ", raises)") for r in best.problems if not r.matched]
        convention = "; ".join(f"{k}={_short(v)}" for k, v in best.convention.items())
        table += [f"   * - {name} ({report.kind})", f"     - {best.matched}/{len(report.problems)}",
                  f"     - {convention}", f"     - {', '.join(diverges) or 'nothing'}",
                  f"     - {' '.join(report.diagnoses) or 'conforms'}"]
    details = ["", "First divergences", "-----------------", ""]
    for label, options, report in reports:
        div = report.best.first_divergence
        if div is not None:
            extra = ", ".join(f"{k}={_short(v)}" for k, v in options.items())
            details += [f"* ``{label}{f'({extra})' if extra else ''}``: {div.describe()}.", ""]
    return text + "\n".join(table) + "\n" + "\n".join(details)


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
    parser.add_argument("--kind", choices=KINDS, help="the core optimizer to compare with (default: from the name: "
                        "lamb for a LAMB, mnag for SGD, else lars)")
    parser.add_argument("--driver", choices=("torch", "jax", "functional"), help="default: from the object's module")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="keyword argument for the optimizer itself, e.g. trust_clip=True")
    parser.add_argument("--fix", action="append", default=[], metavar="FACTOR=VALUE",
                        help="a convention not to search, e.g. weight_decay_form=norm_of_sum")
    parser.add_argument("--rst", metavar="FILE", help="write the docs page for every installed peer to FILE")
    args = parser.parse_args(argv)
    if args.rst:
        if args.optimizer or args.kind or args.driver or args.option or args.fix:
            parser.exit(2, f"{parser.prog}: error: --rst writes the page of every installed implementation: it takes "
                           "no optimizer, --kind, --driver, --option or --fix\n")
        text = page()  # the whole page first: a failure leaves an existing file as it was
        try:
            with open(args.rst, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            parser.exit(2, f"{parser.prog}: error: cannot write {args.rst}: {exc.strerror or exc}\n")
        out(f"wrote {args.rst}")
        return 0
    if not args.optimizer:
        parser.error("name an optimizer (a dotted path) or pass --rst FILE")
    # a usage error (bad path, option or convention) exits 2 in one line; 1 means "does not conform"
    try:
        obj = resolve(args.optimizer)
        options, fixed = _pairs(args.option, "--option"), _pairs(args.fix, "--fix")
    except SystemExit as exc:
        parser.exit(2, f"{parser.prog}: error: {exc.code}\n")
    try:
        report = run(obj, kind=args.kind or guess_kind(args.optimizer), driver=args.driver, options=options,
                     name=args.optimizer, **fixed)
    except (TypeError, ValueError, AttributeError) as exc:  # building the optimizer or reading --fix, before any step
        message = " ".join(str(exc).split())  # one line, whatever the exception's text
        parser.exit(2, f"{parser.prog}: error: {args.optimizer}: {type(exc).__name__}: {message}\n")
    first = [r.divergence for r in report.best.problems]
    if all(d is not None and d.step == 0 and d.layer < 0 for d in first):  # it raised before any step, everywhere
        message = " ".join(first[0].note.split())
        parser.exit(2, f"{parser.prog}: error: {args.optimizer} could not take a first step on any problem "
                       f"({message}); is --driver right? (it looks like a {framework(obj)} optimizer)\n")
    out(report.text())
    return 0 if report.conforms else 1


if __name__ == "__main__":
    sys.exit(main())
