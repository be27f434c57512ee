r"""The optimizer table: one spec per optimizer, read by the core, the backends, the CLI and the tests.

Like torch's ``optim_db``, every optimizer of lwrs is described once, here:
its core factory, its hyperparameters with the paper's symbol, the core's
name, the torch class's name and the default, its layer masks, the
implementations the torch backend offers, and whether it uses CLARS's
per-sample statistics. The vocabulary page of the docs is generated from it
(:func:`vocabulary_rst`), and the tests check every factory's and every torch
class's signature against it, so a name cannot drift in one place only.

.. math::

    \text{spec} = (\text{name},\ \text{factory},\ \{(\text{paper},\ \text{core},\
    \text{torch},\ \text{default})\},\ \text{masks},\ \text{implementations})

Examples
--------
>>> import lwrs
>>> spec = lwrs.table.spec("lamb")
>>> [(h.core_name, h.torch_name) for h in spec.hyperparameters[1:3]]
[('beta1', 'betas[0]'), ('beta2', 'betas[1]')]
>>> [s.name for s in lwrs.table.OPTIMIZERS]
['mgd', 'mnag', 'lars', 'clars', 'tvlars', 'lamb']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import optimizers as _opt
from .masks import adapt_default, weight_decay_default

__all__ = [
    "REQUIRED",
    "SAME",
    "Hyperparameter",
    "OptimizerSpec",
    "OPTIMIZERS",
    "spec",
    "names",
    "vocabulary_rst",
]


class _Marker:
    """A named sentinel (``REQUIRED``, ``SAME``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


REQUIRED = _Marker("REQUIRED")
"""Default of a hyperparameter that has none: it must be given."""

SAME = _Marker("SAME")
"""``torch_default`` of a hyperparameter whose torch default is the core default."""


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter of one optimizer, under each of its names.

    Attributes
    ----------
    core_name : str
        The keyword of the core factory (the papers' vocabulary).
    paper_symbol : str
        The symbol in the paper, as LaTeX math (empty for options the papers do not have).
    torch_name : str or None
        The keyword of the torch class (torch.optim's vocabulary); ``"betas[0]"``
        names an entry of a tuple; ``None`` where the torch class has no such option.
    default : object
        The core factory's default, or :data:`REQUIRED`.
    doc : str
        One line saying what it is.
    torch_default : object
        The torch class's default where it differs in form (a mask becomes a
        bool); :data:`SAME` otherwise.
    """

    core_name: str
    paper_symbol: str
    torch_name: str | None
    default: Any
    doc: str
    torch_default: Any = SAME


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything lwrs knows about one optimizer.

    Attributes
    ----------
    name : str
        The short name (``lwrs.<name>`` is the factory; the CLI uses it too).
    factory : callable
        The core factory, e.g. :func:`lwrs.lars`.
    summary : str
        One line: what the update is.
    reference : str
        The paper and equation.
    hyperparameters : tuple of Hyperparameter
        In the order of the factory's signature.
    adapt_default : callable or None
        ``array -> bool``: which layers get a trust ratio by default; ``None``
        where the optimizer has no trust ratio.
    weight_decay_default : callable
        ``array -> bool``: which layers get weight decay by default.
    implementations : tuple of str
        What the torch backend offers: ``"reference"`` (the core itself),
        ``"foreach"`` (multi-tensor kernels), ``"fused"`` (compiled CPU kernels).
    uses_norm_stats : bool
        Whether the update uses CLARS's per-sample statistics (``norm_stats``);
        every optimizer accepts them and reports the CLARS factor.
    torch_class : str or None
        The class in :mod:`lwrs.backends.torch`, or ``None``.
    """

    name: str
    factory: Callable[..., Any]
    summary: str
    reference: str
    hyperparameters: tuple[Hyperparameter, ...]
    adapt_default: Callable[[Any], bool] | None
    weight_decay_default: Callable[[Any], bool]
    implementations: tuple[str, ...]
    uses_norm_stats: bool
    torch_class: str | None

    def hyperparameter(self, core_name: str) -> Hyperparameter:
        """The hyperparameter whose core name is ``core_name``.

        Examples
        --------
        >>> import lwrs
        >>> lwrs.table.spec("lars").hyperparameter("beta").torch_name
        'momentum'
        """
        for h in self.hyperparameters:
            if h.core_name == core_name:
                return h
        raise KeyError(f"{self.name} has no hyperparameter {core_name!r}")

    def defaults(self) -> dict[str, Any]:
        """The core defaults, by core name, without the required ones.

        Examples
        --------
        >>> import lwrs
        >>> lwrs.table.spec("clars").defaults()["eta"]
        0.01
        """
        return {h.core_name: h.default for h in self.hyperparameters if h.default is not REQUIRED}


def _lr(symbol: str = r"\gamma_t") -> Hyperparameter:
    return Hyperparameter("learning_rate", symbol, "lr", REQUIRED, "global rate: a number or a schedule of the step")


_WD = Hyperparameter("weight_decay", r"\lambda", "weight_decay", 0.0, "L2 weight decay, added to the gradient")
_WD_TV = Hyperparameter("weight_decay", r"\lambda_{wd}", "weight_decay", 0.0, "L2 weight decay, added to the gradient")
_WD_MASK = Hyperparameter("weight_decay_mask", "", "decay_1d", None,
                          "layers that get weight decay (default all; torch: whether 1-D tensors do)", True)
_ADAPT = Hyperparameter("adapt_mask", "", "exclude_1d", None,
                        "layers that get a trust ratio (default ndim > 1; torch: exclude 1-D tensors)", True)
_NONFINITE = Hyperparameter("on_nonfinite", "", "on_nonfinite", "raise",
                            'what a non-finite input does: "raise" or "skip" the step')
_BETA = Hyperparameter("beta", r"\beta", "momentum", 0.9, "momentum of mNAG, in [0, 1)")
_NESTEROV = Hyperparameter("nesterov", "", "nesterov", True, "Nesterov (mNAG) or heavy-ball momentum")
_FORM = Hyperparameter("weight_decay_form", "", "weight_decay_form", "sum_of_norms",
                       "where weight decay enters the trust-ratio denominator: sum of norms or norm of sum")
_EPS = Hyperparameter("eps", r"\epsilon", "eps", 0.0, "added to the trust-ratio denominator")
_MAX_RATIO = Hyperparameter("max_ratio", r"r_{\max}", "max_ratio", None, "upper clip of the trust ratio")
_LARC = Hyperparameter("larc_clip", "", "larc_clip", False, "apex LARC clipping: rate = min(trust rate, lr)")


def _eta(default: float) -> Hyperparameter:
    return Hyperparameter("eta", r"\eta", "eta", default, "trust coefficient")


_TORCH_IMPLEMENTATIONS = ("reference", "foreach", "fused")

OPTIMIZERS: tuple[OptimizerSpec, ...] = (
    OptimizerSpec(
        "mgd", _opt.mgd, "mini-batch gradient descent", "CLARS eq. (2) with beta = 0; Theorem 1",
        (_lr(), _WD, _WD_MASK, _NONFINITE),
        None, weight_decay_default, ("reference",), False, None,
    ),
    OptimizerSpec(
        "mnag", _opt.mnag, "mini-batch Nesterov momentum, one rate for all layers", "CLARS eq. (2) and (4)",
        (_lr(), _BETA, _NESTEROV, _WD, _WD_MASK, _NONFINITE),
        None, weight_decay_default, _TORCH_IMPLEMENTATIONS, False, "MNAG",
    ),
    OptimizerSpec(
        "lars", _opt.lars, "mNAG with the LARS trust ratio per layer", "CLARS eq. (3); You et al. 2017",
        (_lr(), _BETA, _eta(0.001), _WD, _FORM, _EPS, _MAX_RATIO, _LARC, _ADAPT, _WD_MASK, _NESTEROV, _NONFINITE),
        adapt_default, weight_decay_default, _TORCH_IMPLEMENTATIONS, False, "LARS",
    ),
    OptimizerSpec(
        "clars", _opt.clars, "mNAG with the CLARS ratio (mean per-sample gradient norm)",
        "CLARS eq. (5) and Algorithm 1",
        (_lr(), _BETA, _eta(0.01), _WD, _FORM, _EPS, _MAX_RATIO, _LARC, _ADAPT, _WD_MASK, _NESTEROV, _NONFINITE),
        adapt_default, weight_decay_default, _TORCH_IMPLEMENTATIONS, True, "CLARS",
    ),
    OptimizerSpec(
        "tvlars", _opt.tvlars, "LARS with the time-varying global rate phi_t, no warm-up",
        "TVLARS Algorithm 1, eq. (8)-(9)",
        (
            _lr(r"\gamma_{target}"),
            Hyperparameter("decay_coefficient", r"\lambda", "decay_coefficient", REQUIRED,
                           "decay coefficient (soft temperature) of phi_t"),
            Hyperparameter("delay_steps", "d_e", "delay_steps", REQUIRED, "delay of phi_t, in steps"),
            Hyperparameter("alpha", r"\alpha", "alpha", 1.0, "sets the initial level of phi_t"),
            Hyperparameter("gamma_min", r"\gamma_{\min}", "gamma_min", 0.0, "floor of phi_t"),
            _BETA, _eta(0.001), _WD_TV, _FORM, _EPS, _ADAPT, _WD_MASK, _NESTEROV, _NONFINITE,
        ),
        adapt_default, weight_decay_default, _TORCH_IMPLEMENTATIONS, False, "TVLARS",
    ),
    OptimizerSpec(
        "lamb", _opt.lamb, "Adam directions with a layer-wise trust ratio", "You et al. 2019, Algorithm 2",
        (
            _lr(),
            Hyperparameter("beta1", r"\beta_1", "betas[0]", 0.9, "decay of Adam's first moment"),
            Hyperparameter("beta2", r"\beta_2", "betas[1]", 0.999, "decay of Adam's second moment"),
            Hyperparameter("eps", r"\epsilon", "eps", 1e-6, "Adam's epsilon"),
            _WD, _ADAPT, _WD_MASK, _NONFINITE,
        ),
        adapt_default, weight_decay_default, ("reference", "foreach"), False, "LAMB",
    ),
)

_BY_NAME = {s.name: s for s in OPTIMIZERS}


def names() -> tuple[str, ...]:
    """The optimizers' names, in table order.

    Examples
    --------
    >>> names()[:2]
    ('mgd', 'mnag')
    """
    return tuple(_BY_NAME)


def spec(name: str) -> OptimizerSpec:
    """The spec of the optimizer called ``name``.

    Examples
    --------
    >>> spec("tvlars").hyperparameter("decay_coefficient").paper_symbol
    '\\\\lambda'
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no optimizer {name!r}; the table has {', '.join(_BY_NAME)}") from None


def _default_text(value: Any) -> str:
    if value is REQUIRED:
        return "required"
    if value is None:
        return "``None``"
    return f"``{value!r}``"


def vocabulary_rst() -> str:
    """The vocabulary page of the docs (``docs/vocabulary.rst``), generated from :data:`OPTIMIZERS`.

    One table per optimizer: paper symbol, core name, torch name, defaults.
    A test checks that the committed page equals this text.

    Examples
    --------
    >>> vocabulary_rst().splitlines()[0]
    'Vocabulary: paper, core and torch names'
    """
    title = "Vocabulary: paper, core and torch names"
    lines = [
        title,
        "=" * len(title),
        "",
        ".. This page is generated by lwrs.table.vocabulary_rst(); a test keeps it in sync.",
        "",
        "The core (``lwrs.lars`` and the other factories) uses the papers' names; the torch",
        "classes (``lwrs.backends.torch.LARS`` ...) use ``torch.optim``'s names. Both read the",
        "one table in :mod:`lwrs.table`, from which this page is generated.",
        "",
    ]
    for s in OPTIMIZERS:
        head = f"``{s.name}``: {s.summary}"
        torch_class = f"``lwrs.backends.torch.{s.torch_class}``" if s.torch_class else "none (core only)"
        lines += [
            head,
            "-" * len(head),
            "",
            f"Reference: {s.reference}. Core factory: :func:`lwrs.{s.name}`. Torch class: {torch_class}.",
            f"Implementations: {', '.join(s.implementations)}. "
            f"Uses per-sample statistics: {'yes' if s.uses_norm_stats else 'no (reported only)'}.",
            "",
            ".. list-table::",
            "   :header-rows: 1",
            "",
            "   * - paper",
            "     - core",
            "     - torch",
            "     - core default",
            "     - torch default",
            "     - meaning",
        ]
        for h in s.hyperparameters:
            symbol = f":math:`{h.paper_symbol}`" if h.paper_symbol else ""
            torch_name = f"``{h.torch_name}``" if h.torch_name else ""
            torch_default = "" if s.torch_class is None else _default_text(
                h.default if h.torch_default is SAME else h.torch_default)
            lines += [
                f"   * - {symbol}",
                f"     - ``{h.core_name}``",
                f"     - {torch_name}",
                f"     - {_default_text(h.default)}",
                f"     - {torch_default}",
                f"     - {h.doc}",
            ]
        lines.append("")
    return "\n".join(lines)
