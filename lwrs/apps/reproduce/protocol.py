r"""The tuned protocol of ``lwrs reproduce`` (``protocol`` 2), fixed in code before its run.

For every compared method, model and batch size (one *label*), a grid of
settings is trained once (seed 0) on the training set minus a held-out
validation split of ``Preset.validation`` samples and scored by its final
*validation* accuracy (a diverged run scores 0); the best setting (ties: the
smaller rate) is then trained for every seed on the whole training set and
reported on the test set, which the selection never sees. The grids:

* Figure 1 (MLP, :math:`\gamma = \gamma_{base} B/128`): mNAG over
  ``fig1_mnag_base_lrs``; LARS over ``fig1_lars_base_lrs`` × ``lars_etas``.
  LARS's rate is :math:`\gamma_{base} B/128 \cdot \eta \cdot \|w_k\|/\|\bar g_k\|`,
  so :math:`\gamma_{base}` and :math:`\eta` act only through their product; one
  axis of the grid covers both.
* Figure 3 (:math:`B = 8192`): mNAG, mNAG with warm-up and mNAG with FC freezing
  over ``fig3_mnag_lrs`` (the paper: 1.0); LARS, LARS with warm-up and CLARS over
  ``fig3_lars_base_lrs`` (the paper: 0.1; :math:`\eta = 10^{-3}`, CLARS
  :math:`10^{-2}`). Warm-up and freezing last 10% of the run, the paper's 20 of
  200 epochs.
* Table 1: the TVLARS paper's three target rates per batch size for LARS and
  TVLARS (LAMB: times :math:`10^{-3}`), TVLARS's :math:`\lambda` over
  ``table1_lambdas``; warm-up then cosine decay for LARS and LAMB.

Models in ``costly_models`` (the transformer) run only the papers' setting,
with ``costly_seeds`` seeds, and in Table 1 only at ``costly_batches``. Budgets: ``"epochs"`` is the papers' fixed number
of epochs (a large batch gets few steps: the papers' own comparison);
``"steps"`` gives every batch size ``Preset.steps`` optimizer steps (whole
epochs, rounded up), so that a large batch is not starved of steps. Figure 3 uses
``fig3_steps`` steps at :math:`B = 8192`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..train.config import TrainConfig
from .experiments import FIG3_METHODS, TABLE1_LRS, Preset

__all__ = ["grids", "epochs_for", "window_epochs", "validation_split", "select", "plan"]

FIG3_BATCH = 8192


def epochs_for(steps: int, batch: int, train_samples: int) -> int:
    """Whole epochs that give at least ``steps`` optimizer steps of ``batch`` samples (the last batch dropped).

    Examples
    --------
    >>> epochs_for(500, 8192, 60_000), epochs_for(500, 128, 60_000)
    (72, 2)
    """
    return max(1, math.ceil(steps / max(1, train_samples // batch)))


def window_epochs(epochs: int) -> int:
    """The warm-up / FC-freeze window of Figure 3: 10% of the run (the paper: 20 of 200 epochs), at least one epoch.

    Examples
    --------
    >>> window_epochs(72), window_epochs(3)
    (7, 1)
    """
    return max(1, round(0.1 * epochs))


def _budget_epochs(preset: Preset, budget: str, batch: int, n: int, epochs: int) -> int:
    return epochs if budget == "epochs" else epochs_for(preset.steps, batch, n)


def grids(name: str, preset: Preset, train_samples: int) -> list[tuple[str, list[TrainConfig]]]:
    """``(label, candidate settings)`` of experiment ``name`` under the tuned protocol, for a training set of
    ``train_samples`` (the epochs of a step budget depend on it); seeds are set later.

    Examples
    --------
    >>> from lwrs.apps.reproduce.experiments import PRESETS
    >>> g = dict(grids("fig1", PRESETS["quick"], 55_000))
    >>> [c.learning_rate() for c in g["epochs/mnag/B512"]], g["steps/lars/B4096"][0].epochs
    ([0.4, 0.04], 3)
    """
    p, n, out = preset, train_samples, []
    if name == "fig1":
        for budget in p.budgets:
            for b in p.fig1_batches:
                common = dict(model="mlp", batch_size=b, epochs=_budget_epochs(p, budget, b, n, p.fig1_epochs),
                              base_batch=128, scaling="linear", stats_samples=0)
                out.append((f"{budget}/mnag/B{b}", [TrainConfig(optimizer="mnag", base_lr=lr, **common)
                                                    for lr in p.fig1_mnag_base_lrs]))
                out.append((f"{budget}/lars/B{b}", [TrainConfig(optimizer="lars", base_lr=lr, eta=eta, **common)
                                                    for lr in p.fig1_lars_base_lrs for eta in p.lars_etas]))
    elif name == "fig2":  # the paper's measurement: no tuning, the rates of Figure 2
        out = [(f"{model}/lr{lr:g}", [TrainConfig(model=model, optimizer="mnag", batch_size=128, lr=lr,
                                                  epochs=p.fig2_epochs, weight_decay=0.0, stats_samples=60_000)])
               for model in ("fcn", "cnn") for lr in p.fig2_lrs]
    elif name == "fig3":
        epochs = epochs_for(p.fig3_steps, FIG3_BATCH, n) if p.fig3_steps else p.fig3_epochs
        for model in p.fig3_models:
            costly = model in p.costly_models
            e = p.fig3_epochs if costly else epochs
            common = dict(model=model, batch_size=FIG3_BATCH, epochs=e, warmup_epochs=0.1 * e, freeze_epochs=0.1 * e,
                          stats_samples=0)
            for method in FIG3_METHODS:
                if method.startswith("mnag"):  # the paper's gamma = 1.0 first
                    cands = [TrainConfig(optimizer=method, lr=lr, **common) for lr in p.fig3_mnag_lrs]
                else:  # gamma_base * B / 128, the paper's gamma_base = 0.1 first
                    cands = [TrainConfig(optimizer=method, base_lr=lr, **common) for lr in p.fig3_lars_base_lrs]
                out.append((f"{model}/{method}", cands[:1] if costly else cands))
    elif name == "table1":
        for model in p.table1_models:
            costly = model in p.costly_models
            for b in (p.costly_batches or p.table1_batches) if costly else p.table1_batches:
                common = dict(model=model, batch_size=b, epochs=p.table1_epochs, stats_samples=0)
                picks = (1,) if costly else p.table1_lr_picks
                lams = p.table1_lambdas[:1] if costly else p.table1_lambdas
                lrs = [float(TABLE1_LRS[b][i]) for i in picks]
                warm = dict(warmup_epochs=p.table1_warmup, decay="cosine")
                out.append((f"epochs/{model}/lars-warmup/B{b}",
                            [TrainConfig(optimizer="lars-warmup", lr=lr, **warm, **common) for lr in lrs]))
                out.append((f"epochs/{model}/lamb-warmup/B{b}",
                            [TrainConfig(optimizer="lamb-warmup", lr=lr * 1e-3, **warm, **common) for lr in lrs]))
                out.append((f"epochs/{model}/tvlars/B{b}",
                            [TrainConfig(optimizer="tvlars", lr=lr, tvlars_lambda=lam,
                                         tvlars_delay_epochs=p.table1_warmup, **common) for lr in lrs for lam in lams]))
    else:
        raise ValueError(f"unknown experiment {name!r}")
    return out


def validation_split(data, size: int, *, seed: int = 2026):
    """``data`` with ``size`` training samples held out as its "test" arrays, for the selection only.

    The held-out samples are a fixed random subset of the training set; the
    real test set is not used.

    Examples
    --------
    >>> from lwrs.apps.train.data import load_digits
    >>> d = load_digits(); v = validation_split(d, 100)
    >>> len(v.y_train) + len(v.y_test) == len(d.y_train), v.name
    (True, 'digits-validation')
    """
    import numpy as np

    if not 0 < size < len(data.y_train):
        raise ValueError(f"validation size must be in (0, {len(data.y_train)}), got {size}")
    order = np.random.default_rng(seed).permutation(len(data.y_train))
    held, kept = order[:size], order[size:]
    return data._replace(name=f"{data.name}-validation", x_train=data.x_train[kept], y_train=data.y_train[kept],
                         x_test=data.x_train[held], y_test=data.y_train[held],
                         checksum=f"{data.checksum}+validation{size}")


def _score(record: dict[str, Any]) -> float:
    return 0.0 if record["diverged_epoch"] is not None else record["epochs"][-1]["test_accuracy"]


def select(candidates: Sequence[TrainConfig], records: Sequence[dict[str, Any]]) -> int:
    """The index of the best candidate by final validation accuracy (diverged: 0); ties go to the smaller rate.

    Examples
    --------
    >>> c = [TrainConfig(lr=1.0), TrainConfig(lr=0.1), TrainConfig(lr=0.5)]
    >>> rec = lambda a: {"diverged_epoch": None, "epochs": [{"test_accuracy": a}]}
    >>> select(c, [rec(0.8), rec(0.8), rec(0.7)])
    1
    """
    return max(range(len(candidates)), key=lambda i: (_score(records[i]), -candidates[i].learning_rate()))


def _setting(cfg: TrainConfig) -> dict[str, Any]:
    return {"learning_rate": cfg.learning_rate(), "eta": cfg.eta, "tvlars_lambda": cfg.tvlars_lambda,
            "epochs": cfg.epochs}


def plan(names: Sequence[str], preset: Preset, train_samples: int = 60_000) -> dict[str, dict[str, int]]:
    """Per experiment: runs and epochs (passes over the training set) of the selection and of the final seeds.

    Examples
    --------
    >>> from lwrs.apps.reproduce.experiments import PRESETS
    >>> plan(["fig2"], PRESETS["quick"])["fig2"]
    {'select_runs': 0, 'select_epochs': 0, 'final_runs': 4, 'final_epochs': 4}
    """
    out = {}
    for name in names:
        tune = grids(name, preset, train_samples - preset.validation)
        final = grids(name, preset, train_samples)
        tuned = [c for _, cs in tune if len(cs) > 1 for c in cs]
        seeds = [preset.costly_seeds if cs[0].model in preset.costly_models else preset.seeds for _, cs in final]
        out[name] = {"select_runs": len(tuned), "select_epochs": sum(c.epochs for c in tuned),
                     "final_runs": sum(seeds), "final_epochs": sum(s * max(c.epochs for c in cs)
                                                                   for s, (_, cs) in zip(seeds, final))}
    return out


def run_tuned(name: str, preset: Preset, data, run: Callable[..., list[dict[str, Any]]],
              progress: Callable[[Iterable, int], Iterable] | None = None
              ) -> tuple[list[str], list[dict[str, Any]], dict[str, Any]]:
    """Select each label's setting on the validation split, then run it for every seed on the full data.

    ``run(configs, data, progress=...)`` trains a list of configs (see
    :func:`~lwrs.apps.reproduce.running.run_configs`). Returns the labels and
    records of the final runs (seed order within a label) and the selection
    (every candidate's validation accuracy and the chosen setting per label).
    """
    tune = grids(name, preset, len(data.y_train) - preset.validation)
    final = grids(name, preset, len(data.y_train))
    to_tune = [(label, cs) for label, cs in tune if len(cs) > 1]
    chosen = {label: 0 for label, _ in tune}
    selection: dict[str, Any] = {}
    if to_tune:
        val = validation_split(data, preset.validation)
        configs = [c for _, cs in to_tune for c in cs]
        records = run(configs, val, progress=progress)
        i = 0
        for label, cs in to_tune:
            recs = records[i:i + len(cs)]
            i += len(cs)
            chosen[label] = select(cs, recs)
            selection[label] = {"candidates": [{**_setting(c), "validation_accuracy": round(_score(r), 5)}
                                               for c, r in zip(cs, recs)], "chosen": chosen[label]}
    labels, configs = [], []
    for label, cs in final:
        cfg = cs[chosen[label]]
        seeds = preset.costly_seeds if cfg.model in preset.costly_models else preset.seeds
        for seed in range(seeds):
            labels.append(label)
            configs.append(dataclasses.replace(cfg, seed=seed))
    return labels, run(configs, data, progress=progress), selection
