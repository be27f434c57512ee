r"""The configuration of one ``lwrs train`` run, and its learning-rate schedule.

This module imports no array library: the command line reads :class:`TrainConfig`'s
fields to build its options without importing torch. The training loop itself is
:func:`lwrs.apps.train.loop.train`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from lwrs import schedules, table

__all__ = ["TrainConfig", "OPTIMIZERS", "RECIPES", "DATASETS", "MODELS", "DECAYS", "SCALINGS", "factor_schedule",
           "freeze_steps"]

DATASETS = ("mnist1d", "digits")
MODELS = ("fcn", "cnn", "cnn-relu", "mlp", "transformer")

#: The recipes of ``lwrs train`` around an optimizer of the table: ``-warmup`` (linear warm-up,
#: Goyal et al. 2017) and ``-freeze`` (the head frozen early, Gotmare et al. 2019; CLARS Figure 3).
RECIPES = {"mnag": ("mnag-warmup", "mnag-freeze"), "lars": ("lars-warmup",), "lamb": ("lamb-warmup",)}

#: Every optimizer of :mod:`lwrs.table` that has a torch class, each followed by its recipes.
OPTIMIZERS = tuple(name for s in table.OPTIMIZERS if s.torch_class is not None
                   for name in (s.name, *RECIPES.get(s.name, ())))
DEFAULT_BASE_LR = {"mnag": 0.1, "lars": 0.1, "clars": 0.1, "tvlars": 0.1, "lamb": 0.002}
DECAYS = ("constant", "cosine", "poly")
SCALINGS = ("linear", "sqrt", "none")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    r"""Everything that defines one run of :func:`lwrs.apps.train.loop.train`.

    The peak global rate follows the scaling rule (Goyal et al. 2017 for linear;
    the TVLARS paper uses square root):

    .. math:: \gamma = \gamma_{base}\,\frac{B}{B_{base}} \quad\text{or}\quad
              \gamma_{base}\sqrt{B / B_{base}}

    Examples
    --------
    >>> cfg = TrainConfig(optimizer="lars", batch_size=8192, base_lr=0.1, base_batch=128)
    >>> cfg.learning_rate(), cfg.family
    (6.4, 'lars')
    >>> TrainConfig(optimizer="adam")
    Traceback (most recent call last):
    ...
    ValueError: optimizer must be one of mnag, mnag-warmup, mnag-freeze, lars, lars-warmup, clars, tvlars, lamb, lamb-warmup, got 'adam'

    Attributes
    ----------
    dataset, model, optimizer : str
        ``"mnist1d"`` or ``"digits"``; ``"fcn"``, ``"cnn"``, ``"cnn-relu"``, ``"mlp"`` or ``"transformer"``; one of :data:`OPTIMIZERS`.
    batch_size, micro_batch : int
        :math:`B`, and the largest batch run in one forward/backward pass.
    epochs : int
    lr : float or None
        The global rate :math:`\gamma`; ``None`` derives it from ``base_lr``.
    base_lr, base_batch, scaling : float or None, int, str
        :math:`\gamma = \gamma_{base}\,B/B_{base}` (``"linear"``),
        :math:`\gamma_{base}\sqrt{B/B_{base}}` (``"sqrt"``) or :math:`\gamma_{base}` (``"none"``).
        ``base_lr=None`` takes 0.1 for mNAG/LARS/CLARS/TVLARS (CLARS's
        :math:`\gamma_{base}`) and 0.002 for LAMB.
    momentum, eta, weight_decay : float, float or None, float
        :math:`\beta`; the trust coefficient :math:`\eta` (``None``: the
        table's default, 1e-3, and 1e-2 for CLARS as in its Algorithm 1); :math:`\lambda`.
    warmup_epochs, freeze_epochs : float
        Length of the warm-up (``*-warmup``) and of the head freeze (``mnag-freeze``).
    decay : str
        Schedule after any warm-up: ``"constant"``, ``"cosine"`` (to 0.001 of the
        peak, the TVLARS paper's warm-up baseline) or ``"poly"`` (power 2, to 0).
    tvlars_lambda, tvlars_delay_epochs : float
        TVLARS's decay :math:`\lambda` (per step) and delay :math:`d_e` (in epochs).
    seed : int
        Seeds the weights and the batch order.
    stats_samples : int
        Training samples (a fixed subset) on which the per-epoch gradient
        statistics are computed; 0 turns them off.
    """

    dataset: str = "mnist1d"
    model: str = "mlp"
    optimizer: str = "lars"
    batch_size: int = 512
    micro_batch: int = 4096
    epochs: int = 10
    lr: float | None = None
    base_lr: float | None = None
    base_batch: int = 128
    scaling: str = "linear"
    momentum: float = 0.9
    eta: float | None = None
    weight_decay: float = 5e-4
    warmup_epochs: float = 5.0
    freeze_epochs: float = 5.0
    decay: str = "constant"
    tvlars_lambda: float = 1e-3
    tvlars_delay_epochs: float = 0.0
    seed: int = 0
    stats_samples: int = 4096

    def __post_init__(self) -> None:
        choices = {"dataset": DATASETS, "model": MODELS, "optimizer": OPTIMIZERS, "decay": DECAYS,
                   "scaling": SCALINGS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("batch_size", "micro_batch", "epochs", "base_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("warmup_epochs", "freeze_epochs", "tvlars_delay_epochs", "weight_decay", "tvlars_lambda"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.momentum, (int, float)) and not isinstance(self.momentum, bool)
                and 0 <= self.momentum < 1):
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        if self.stats_samples < 0:
            raise ValueError(f"stats_samples must be >= 0, got {self.stats_samples}")
        for name in ("lr", "base_lr", "eta"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0 (or None), got {value!r}")

    @property
    def family(self) -> str:
        """The optimizer without its ``-warmup`` / ``-freeze`` suffix."""
        return self.optimizer.split("-")[0]

    def unused(self) -> tuple[str, ...]:
        r"""The fields this run ignores: those its optimizer or recipe has no use for, and the scaling rule's with ``lr`` given.

        ``momentum``, ``eta``, ``weight_decay``, ``tvlars_lambda`` and ``tvlars_delay_epochs`` count
        where the optimizer's entry in :mod:`lwrs.table` takes them (LAMB's :math:`\beta_1` is not
        ``momentum``); ``warmup_epochs`` only with a ``-warmup`` recipe, ``freeze_epochs`` only with
        ``mnag-freeze``, ``decay`` not for TVLARS (its :math:`\phi_t` is its schedule).

        Examples
        --------
        >>> TrainConfig(optimizer="mnag").unused()
        ('eta', 'tvlars_lambda', 'tvlars_delay_epochs', 'warmup_epochs', 'freeze_epochs')
        >>> TrainConfig(optimizer="lamb-warmup", lr=0.01).unused()
        ('momentum', 'eta', 'tvlars_lambda', 'tvlars_delay_epochs', 'freeze_epochs', 'base_lr', 'base_batch', 'scaling')
        """
        takes = {h.core_name for h in table.spec(self.family).hyperparameters}
        used = {"momentum": "beta" in takes, "eta": "eta" in takes, "weight_decay": "weight_decay" in takes,
                "tvlars_lambda": "decay_coefficient" in takes, "tvlars_delay_epochs": "delay_steps" in takes,
                "warmup_epochs": self.optimizer.endswith("-warmup"), "freeze_epochs": self.optimizer == "mnag-freeze",
                "decay": self.family != "tvlars",
                "base_lr": self.lr is None, "base_batch": self.lr is None, "scaling": self.lr is None}
        return tuple(name for name, use in used.items() if not use)

    def record(self) -> dict:
        """The fields this run uses, for its JSON record (:meth:`unused` left out).

        Examples
        --------
        >>> sorted(set(dataclasses.asdict(TrainConfig(optimizer="tvlars"))) - set(TrainConfig(optimizer="tvlars").record()))
        ['decay', 'freeze_epochs', 'warmup_epochs']
        """
        unused = self.unused()
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in unused}

    def learning_rate(self) -> float:
        r"""The peak global rate :math:`\gamma` after the scaling rule."""
        if self.lr is not None:
            return float(self.lr)
        base = self.base_lr if self.base_lr is not None else DEFAULT_BASE_LR[self.family]
        if self.scaling == "linear":
            return schedules.linear_scaling(base, self.batch_size, self.base_batch)
        if self.scaling == "sqrt":
            return schedules.sqrt_scaling(base, self.batch_size, self.base_batch)
        return float(base)


def factor_schedule(config: TrainConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    r"""The multiplier :math:`s_t` of the peak rate at step :math:`t`: warm-up, then ``decay``.

    With :math:`W` warm-up steps (``*-warmup`` optimizers) and :math:`T` steps in all,

    .. math:: s_t = \begin{cases} \frac1W + (1 - \frac1W)\frac{t}{W} & t < W \\
                                  d(t - W) & t \ge W \end{cases}

    where :math:`d` is 1 (``constant``), a cosine from 1 to 0.001 (``cosine``,
    the TVLARS paper's warm-up baseline) or :math:`(1 - u/(T-W))^2`
    (``poly``). The first warm-up step gets :math:`1/W` of the peak, not 0
    (Goyal et al. 2017). TVLARS gets :math:`s_t = 1`: its :math:`\phi_t` is in
    the optimizer (TVLARS, section 6.1: no other scheduler).

    Examples
    --------
    >>> s = factor_schedule(TrainConfig(optimizer="lars-warmup", warmup_epochs=1), total_steps=8, steps_per_epoch=4)
    >>> [round(s(t), 3) for t in range(6)]
    [0.25, 0.438, 0.625, 0.812, 1.0, 1.0]
    """
    if config.family == "tvlars":
        return schedules.constant(1.0)  # phi_t lives inside the optimizer; no other schedule (TVLARS paper)
    warmup = round(config.warmup_epochs * steps_per_epoch) if config.optimizer.endswith("-warmup") else 0
    if warmup >= total_steps:
        raise ValueError(f"the warm-up (warmup_epochs={config.warmup_epochs:g}: {warmup} steps) must be shorter than "
                         f"the run (epochs={config.epochs}: {total_steps} steps); lower warmup_epochs or raise epochs")
    after = total_steps - warmup
    if config.decay == "constant":
        decay = schedules.constant(1.0)
    elif config.decay == "cosine":
        decay = schedules.cosine_decay(1.0, after, final=0.001)
    else:
        decay = schedules.polynomial_decay(1.0, after, power=2.0)
    if warmup == 0:
        return decay
    # the first step gets 1/W of the peak rather than 0 (Goyal et al.'s gradual warm-up)
    return schedules.join_schedules([schedules.linear_warmup(1.0, warmup, start=1.0 / warmup), decay], [warmup])


def freeze_steps(config: TrainConfig, total_steps: int, steps_per_epoch: int) -> int:
    r"""The number of first steps during which ``mnag-freeze`` holds the head still (0 for the other optimizers).

    Gotmare et al. (2019), CLARS Figure 3: the head (last, fully-connected layer) is frozen
    for ``freeze_epochs``, then trained. A freeze as long as the run would never train the
    head, so it is refused like a warm-up as long as the run.

    Examples
    --------
    >>> freeze_steps(TrainConfig(optimizer="mnag-freeze", freeze_epochs=1), total_steps=8, steps_per_epoch=4)
    4
    >>> freeze_steps(TrainConfig(optimizer="mnag-freeze", freeze_epochs=2, epochs=2), total_steps=8, steps_per_epoch=4)
    Traceback (most recent call last):
    ...
    ValueError: the head freeze (freeze_epochs=2: 8 steps) must be shorter than the run (epochs=2: 8 steps); lower freeze_epochs or raise epochs
    """
    if config.optimizer != "mnag-freeze":
        return 0
    frozen = round(config.freeze_epochs * steps_per_epoch)
    if frozen >= total_steps:
        raise ValueError(f"the head freeze (freeze_epochs={config.freeze_epochs:g}: {frozen} steps) must be shorter "
                         f"than the run (epochs={config.epochs}: {total_steps} steps); lower freeze_epochs or raise epochs")
    return frozen
