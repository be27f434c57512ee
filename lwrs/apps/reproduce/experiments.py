r"""``lwrs reproduce``: the CLARS and TVLARS papers' experiments at small scale, on MNIST-1D.

Four experiments, each a list of :class:`~lwrs.apps.train.config.TrainConfig`
run for several seeds and reported as mean ± standard deviation:

``fig1``
    CLARS Figure 1: LARS against mNAG as the batch grows (MLP, linear scaling
    :math:`\gamma = 0.1\,B/128`, :math:`\eta = 10^{-3}`, as in the paper).
``fig2``
    CLARS Figure 2: the gradient-variance ratio per layer over the first epochs,
    for the 5-layer sigmoid FCN and CNN (mNAG, :math:`B = 128`), on all
    training samples after every epoch.
``fig3``
    CLARS Figure 3: warm-up, FC-layer freezing and CLARS in early training at
    :math:`B = 8192` (mNAG with :math:`\beta = 0.9`, :math:`\gamma = 1`; LARS
    and CLARS with :math:`\gamma = 0.1\,B/128`).
``table1``
    TVLARS Table 1: LARS and LAMB with warm-up (then cosine decay) against
    TVLARS, :math:`B \in \{512, \dots, 16384\}`, the paper's three learning
    rates per batch size, and TVLARS's :math:`\lambda` swept.

:func:`~lwrs.apps.reproduce.verdicts.verdicts` turns the results into one verdict per paper claim:
*reproduced*, *partly reproduced* or *not reproduced* at this scale, with the
numbers behind it. The rules are fixed in code, before the runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..train.config import TrainConfig

__all__ = ["Preset", "PRESETS", "EXPERIMENTS", "TABLE1_LRS", "FIG3_METHODS", "experiment_configs", "preset_of"]

EXPERIMENTS = ("fig1", "fig2", "fig3", "table1")

#: The TVLARS paper's target learning rates per batch size (section 6.1), used for LARS and TVLARS.
#: LAMB, whose step is not multiplied by eta = 1e-3, gets the same numbers times 1e-3.
TABLE1_LRS = {512: (1, 2, 3), 1024: (2, 3, 4), 2048: (5, 6, 7), 4096: (8, 9, 10), 8192: (10, 12, 15),
              16384: (15, 17, 19)}


@dataclasses.dataclass(frozen=True)
class Preset:
    """The sizes of a reproduction: seeds, epochs and the grids of each experiment."""

    seeds: int
    fig1_batches: tuple[int, ...]
    fig1_epochs: int
    fig2_epochs: int
    fig2_lrs: tuple[float, ...]
    fig3_models: tuple[str, ...]
    fig3_epochs: int
    fig3_window: int  # epochs of warm-up / FC freezing
    table1_batches: tuple[int, ...]
    table1_epochs: int
    table1_warmup: int
    table1_lambdas: tuple[float, ...]
    table1_lr_picks: tuple[int, ...]  # which of the paper's three learning rates to run
    # ---- protocol 2 (tuned on a validation split; see lwrs.apps.reproduce.protocol); protocol 1 is the untuned one
    protocol: int = 1
    validation: int = 0  # training samples held out for the selection (never the test set)
    budgets: tuple[str, ...] = ("epochs",)  # "epochs": the papers' fixed-epoch budget; "steps": fixed steps
    steps: int = 0  # the fixed-step budget (optimizer steps per run, every batch size)
    fig1_mnag_base_lrs: tuple[float, ...] = ()  # mNAG's grid of gamma_base (linear scaling from B = 128)
    fig1_lars_base_lrs: tuple[float, ...] = ()  # LARS's grid of gamma_base
    lars_etas: tuple[float, ...] = ()  # LARS's grid of eta (CLARS: the paper's 1e-2)
    fig3_mnag_lrs: tuple[float, ...] = ()  # mNAG's grid of gamma (the paper: 1.0)
    fig3_lars_base_lrs: tuple[float, ...] = ()  # LARS/CLARS grid of gamma_base (the paper: 0.1)
    fig3_steps: int = 0  # Figure 3's budget in steps at B = 8192; the warm-up / freeze window is 10% of it
    table1_models: tuple[str, ...] = ("mlp",)
    costly_models: tuple[str, ...] = ()  # run at the paper's setting only (no grid), with costly_seeds seeds
    costly_seeds: int = 0
    costly_batches: tuple[int, ...] = ()  # Table 1's batch sizes for the costly models


PRESETS = {
    # protocol 2, fixed before its run: every rate tuned on a validation split, two budgets, 5 seeds
    "full": Preset(seeds=5, fig1_batches=(128, 512, 2048, 8192), fig1_epochs=20,
                   fig2_epochs=10, fig2_lrs=(0.001, 0.3), fig3_models=("mlp", "cnn-relu", "transformer"),
                   fig3_epochs=8, fig3_window=0, table1_batches=(1024, 4096, 16384), table1_epochs=12,
                   table1_warmup=2, table1_lambdas=(0.1, 0.01, 0.001), table1_lr_picks=(0, 1, 2),
                   protocol=2, validation=10_000, budgets=("epochs", "steps"), steps=300,
                   fig1_mnag_base_lrs=(0.1, 0.03, 0.01, 0.003), fig1_lars_base_lrs=(0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
                   lars_etas=(1e-3,), fig3_mnag_lrs=(1.0, 0.3, 0.1), fig3_lars_base_lrs=(0.1, 0.03, 0.3),
                   fig3_steps=200, table1_models=("mlp", "transformer"), costly_models=("transformer",),
                   costly_seeds=2, costly_batches=(4096,)),
    "quick": Preset(seeds=2, fig1_batches=(512, 4096), fig1_epochs=1, fig2_epochs=1, fig2_lrs=(0.3,),
                    fig3_models=("mlp",), fig3_epochs=2, fig3_window=0, table1_batches=(1024, 8192),
                    table1_epochs=2, table1_warmup=1, table1_lambdas=(0.01,), table1_lr_picks=(1,),
                    protocol=2, validation=5_000, budgets=("epochs", "steps"), steps=28,
                    fig1_mnag_base_lrs=(0.1, 0.01), fig1_lars_base_lrs=(1.0,), lars_etas=(1e-3,),
                    fig3_mnag_lrs=(1.0,), fig3_lars_base_lrs=(0.1,), fig3_steps=21),
    "full-untuned": Preset(seeds=3, fig1_batches=(128, 256, 512, 1024, 2048, 4096, 8192), fig1_epochs=20,
                   fig2_epochs=10, fig2_lrs=(0.001, 0.3), fig3_models=("mlp", "cnn"), fig3_epochs=20,
                   fig3_window=4, table1_batches=tuple(TABLE1_LRS), table1_epochs=12, table1_warmup=2,
                   table1_lambdas=(0.1, 0.01, 0.001), table1_lr_picks=(0, 1, 2)),
    "quick-untuned": Preset(seeds=2, fig1_batches=(128, 2048), fig1_epochs=3, fig2_epochs=2, fig2_lrs=(0.3,),
                    fig3_models=("mlp",), fig3_epochs=4, fig3_window=1, table1_batches=(1024, 8192),
                    table1_epochs=4, table1_warmup=1, table1_lambdas=(0.01,), table1_lr_picks=(1,)),
}

FIG3_METHODS = ("mnag", "mnag-warmup", "mnag-freeze", "lars", "lars-warmup", "clars")


def _fig1(p: Preset) -> list[tuple[str, TrainConfig]]:
    return [(f"{opt}/B{b}", TrainConfig(model="mlp", optimizer=opt, batch_size=b, epochs=p.fig1_epochs,
                                        base_lr=0.1, base_batch=128, scaling="linear", stats_samples=0))
            for b in p.fig1_batches for opt in ("mnag", "lars")]


def _fig2(p: Preset) -> list[tuple[str, TrainConfig]]:
    return [(f"{model}/lr{lr:g}", TrainConfig(model=model, optimizer="mnag", batch_size=128, lr=lr,
                                               epochs=p.fig2_epochs, weight_decay=0.0, stats_samples=60_000))
            for model in ("fcn", "cnn") for lr in p.fig2_lrs]


def _fig3(p: Preset) -> list[tuple[str, TrainConfig]]:
    out = []
    for model in p.fig3_models:
        for method in FIG3_METHODS:
            lr = 1.0 if method.startswith("mnag") else None  # mNAG: the paper's 1.0; LARS/CLARS: 0.1 * B/128
            out.append((f"{model}/{method}", TrainConfig(
                model=model, optimizer=method, batch_size=8192, epochs=p.fig3_epochs, lr=lr, base_lr=0.1,
                warmup_epochs=p.fig3_window, freeze_epochs=p.fig3_window, stats_samples=0)))
    return out


def _table1(p: Preset) -> list[tuple[str, TrainConfig]]:
    out = []
    for b in p.table1_batches:
        common = dict(model="mlp", batch_size=b, epochs=p.table1_epochs, stats_samples=0)
        for i in p.table1_lr_picks:
            lr = float(TABLE1_LRS[b][i])
            out.append((f"lars-warmup/B{b}/lr{lr:g}", TrainConfig(
                optimizer="lars-warmup", lr=lr, warmup_epochs=p.table1_warmup, decay="cosine", **common)))
            out.append((f"lamb-warmup/B{b}/lr{lr:g}", TrainConfig(
                optimizer="lamb-warmup", lr=lr * 1e-3, warmup_epochs=p.table1_warmup, decay="cosine", **common)))
            for lam in p.table1_lambdas:
                out.append((f"tvlars/B{b}/lr{lr:g}/lambda{lam:g}", TrainConfig(
                    optimizer="tvlars", lr=lr, tvlars_lambda=lam, tvlars_delay_epochs=p.table1_warmup, **common)))
    return out


_BUILDERS: dict[str, Callable[[Preset], list[tuple[str, TrainConfig]]]] = {
    "fig1": _fig1, "fig2": _fig2, "fig3": _fig3, "table1": _table1}


def experiment_configs(name: str, preset: Preset) -> list[tuple[str, TrainConfig]]:
    """``(label, config)`` for every seed of experiment ``name``; the label has no seed in it.

    Examples
    --------
    >>> runs = experiment_configs("fig1", PRESETS["quick-untuned"])
    >>> len(runs), runs[0][0], runs[0][1].optimizer, runs[0][1].learning_rate()
    (8, 'mnag/B128', 'mnag', 0.1)
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    return [(label, dataclasses.replace(cfg, seed=seed))
            for label, cfg in _BUILDERS[name](preset) for seed in range(preset.seeds)]


def preset_of(record: dict[str, Any]) -> Preset:
    """The :class:`Preset` stored in a ``results.json`` record.

    Examples
    --------
    >>> import dataclasses
    >>> preset_of({"preset_values": dataclasses.asdict(PRESETS["quick"])}) == PRESETS["quick"]
    True
    >>> preset_of({"preset_values": {**dataclasses.asdict(PRESETS["full-untuned"]), "protocol": None}}).protocol
    1
    """
    values = {k: v for k, v in record["preset_values"].items() if v is not None}  # absent: protocol 1's defaults
    return Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
