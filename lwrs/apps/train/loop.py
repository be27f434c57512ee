r"""``lwrs train``: one training run of a small model with an lwrs optimizer, and its metrics.

:func:`train` runs a :class:`TrainConfig` on a :class:`~lwrs.apps.train.data.Dataset`
and returns a JSON-ready record: per epoch the train loss, the test loss and
accuracy, and per layer the rate :math:`\gamma_k`, :math:`\|w_k\|`,
:math:`\|\bar g_k\|`, the trust ratio, the CLARS factor and the gradient-variance
ratio of CLARS Figure 2.

The optimizers (``TrainConfig.optimizer``):

* ``mnag``: one rate for all layers (CLARS eq. 4);
* ``mnag-freeze``: mNAG with the head (the last, fully-connected layer) frozen
  for ``freeze_epochs`` (Gotmare et al. 2019, CLARS Figure 3);
* ``lars``, ``lars-warmup``: LARS, without or with ``warmup_epochs`` of linear warm-up;
* ``clars``: CLARS with exact per-sample norms (:class:`~lwrs.backends.torch.PerSampleNorms`);
* ``tvlars``: TVLARS, :math:`\gamma_t = \gamma_{target}\phi_t`, no other schedule;
* ``lamb``, ``lamb-warmup``: LAMB, without or with warm-up.

The rate is :math:`\gamma = \gamma_{base} \cdot s(B / B_{base})` with
:math:`s` the linear or square-root scaling rule (or a given ``lr``), then shaped
by the warm-up and the ``decay`` schedule. Batches larger than ``micro_batch``
are accumulated; CLARS's statistics sum over the micro-batches like the
gradients. A batch of :math:`B` samples is drawn without replacement from a
fresh permutation each epoch; the last incomplete batch is dropped, so every
step sees exactly :math:`B` samples.

A run that produces a non-finite loss or gradient *diverges*: it stops there,
``diverged_epoch`` says when, and the remaining epochs are recorded as ``null``.
"""

from __future__ import annotations

import gc
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

import lwrs
import lwrs.backends.torch
from lwrs.backends.torch import PerSampleNorms
from lwrs.backends.torch.distributed import gather

from ..progress import progress_bar
from .config import OPTIMIZERS, TrainConfig, factor_schedule, freeze_steps
from .data import Dataset
from .engine import Engine
from .models import build_model, layer_names

__all__ = ["TrainConfig", "OPTIMIZERS", "train", "gradient_statistics", "evaluate"]

def _optimizer(config: TrainConfig, model: torch.nn.Module, steps_per_epoch: int):
    """The torch optimizer of ``config.family``, read from :mod:`lwrs.table` (class and keyword names)."""
    spec = lwrs.table.spec(config.family)
    values = {"learning_rate": config.learning_rate(), "beta": config.momentum, "eta": config.eta,
              "weight_decay": config.weight_decay, "decay_coefficient": config.tvlars_lambda,
              "delay_steps": config.tvlars_delay_epochs * steps_per_epoch}
    kwargs = {h.torch_name: values[h.core_name] for h in spec.hyperparameters
              if h.torch_name and values.get(h.core_name) is not None}  # eta None: the table's default
    recorder = None
    if spec.uses_norm_stats:
        recorder = kwargs["norm_source"] = PerSampleNorms(model)
    # two groups, so that the head can be frozen (its group then skips the step) while the body moves
    head = {id(p) for p in model.head.parameters()}
    params = [{"params": [p for p in model.parameters() if id(p) not in head]},
              {"params": list(model.head.parameters())}]
    return getattr(lwrs.backends.torch, spec.torch_class)(params, **kwargs), recorder


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, chunk: int = 8192) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(2, 2)
    >>> loss, acc = evaluate(model, torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))
    >>> 0.0 <= acc <= 1.0
    True
    """
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), chunk):
        logits = model(x[i:i + chunk])
        loss += float(F.cross_entropy(logits, y[i:i + chunk], reduction="sum"))
        correct += int((logits.argmax(1) == y[i:i + chunk]).sum())
    model.train(was_training)
    return loss / len(y), correct / len(y)


def gradient_statistics(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, chunk: int = 4096,
                        recorder: PerSampleNorms | None = None) -> dict[str, list[float]]:
    r"""CLARS Figure 2's gradient-variance ratio and the CLARS factor, per weight tensor, on ``(x, y)``.

    With :math:`g_{ik}` the gradient of sample :math:`i`'s loss at layer :math:`k`
    and :math:`n` samples,

    .. math:: \rho_k = \frac{\frac1n\sum_i \|g_{ik}\|^2}{\|\frac1n\sum_i g_{ik}\|^2}
              \;(\ge 1), \qquad
              c_k = \frac{\|\frac1n\sum_i g_{ik}\|}{\frac1n\sum_i\|g_{ik}\|} \;(\le 1).

    :math:`\rho_k - 1` is the observed :math:`M_k` of CLARS Assumption 2
    (with :math:`M = 0`); :math:`c_k` is the CLARS factor at batch :math:`n`.
    Computed exactly with :class:`~lwrs.backends.torch.PerSampleNorms` in one
    backward pass; ``p.grad`` is left as it was. ``recorder``: a recorder already
    on ``model`` (e.g. CLARS's) to use, reset before and after, instead of a
    recorder of its own. Reference: CLARS, Figure 2.

    Examples
    --------
    >>> import torch
    >>> from lwrs.apps.train.models import mlp
    >>> _ = torch.manual_seed(0); net = mlp(4, 3, width=8)
    >>> s = gradient_statistics(net, torch.randn(64, 4), torch.randint(0, 3, (64,)))
    >>> all(r >= 1 for r in s["variance_ratio"]), all(0 < c <= 1 for c in s["clars_factor"])
    (True, True)
    """
    params = [p for p in model.parameters() if p.ndim > 1]
    saved = [p.grad for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    own = recorder is None
    if own:
        recorder = PerSampleNorms(model, fused=False)  # hooks only: the model's forward stays untouched
    else:
        recorder.reset()
    try:
        n = len(y)
        for i in range(0, n, chunk):
            logits = model(x[i:i + chunk])
            (F.cross_entropy(logits, y[i:i + chunk], reduction="sum") / n).backward()
        sums = recorder.sums(params)
        ratio, factor = [], []
        for p in params:
            s1, s2 = (float(v) for v in sums[p])
            g2 = float(torch.linalg.vector_norm(gather(p.grad).double())) ** 2
            ratio.append(n * s2 / g2 if g2 > 0 else math.inf)
            factor.append(math.sqrt(g2) / s1 if s1 > 0 else 1.0)
    finally:
        if own:
            recorder.remove()
        else:
            recorder.reset()
        for p, g in zip(model.parameters(), saved):
            p.grad = g
    return {"variance_ratio": ratio, "clars_factor": factor}


def _none_if_nonfinite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _diagnostics_by_layer(opt, model, names: list[str]) -> dict[str, list[float]] | None:
    """The last step's per-layer diagnostics, for the weight tensors, in ``names`` order."""
    fields = {"rate": "rates", "weight_norm": "weight_norms", "grad_norm": "grad_norms",
              "trust_ratio": "trust_ratios", "clars_factor": "clars_factors"}
    seen: dict[int, dict[str, float]] = {}
    stepped_groups = [g for g in opt.param_groups if any(p.grad is not None for p in g["params"])]
    for group, diag in zip(stepped_groups, opt.diagnostics):  # step() reports the groups that had gradients
        stepped = [p for p in group["params"] if p.grad is not None]
        for i, p in enumerate(stepped):
            seen[id(p)] = {key: float(getattr(diag, attr)[i]) for key, attr in fields.items()}
    named = dict(model.named_parameters())
    nothing = dict.fromkeys(fields, math.nan)  # a frozen layer this step
    return {key: [seen.get(id(named[n]), nothing)[key] for n in names] for key in fields}


def train(config: TrainConfig, data: Dataset, *, progress: bool = False, engine: Engine | None = None) -> dict[str, Any]:
    r"""Train ``config.model`` on ``data`` with ``config.optimizer``; return the per-epoch record.

    The record holds ``config`` (the fields this run uses, :meth:`TrainConfig.record`), ``dataset`` (name and checksum), ``layers``
    (weight-tensor names, input side first), ``learning_rate`` (the peak
    :math:`\gamma`), ``steps_per_epoch``, ``epochs`` (a list, entry 0 being
    the untrained model) and ``diverged_epoch`` (or ``None``). Each epoch entry
    has ``train_loss`` (mean over its steps), ``test_loss``, ``test_accuracy``,
    ``learning_rate`` (the last step's :math:`\gamma_t`) and ``layers``: per
    weight tensor, the epoch means over steps of ``rate``, ``grad_norm``,
    ``trust_ratio`` and ``clars_factor``, the end-of-epoch ``weight_norm``, and
    (if ``stats_samples``) ``variance_ratio`` and ``batch_clars_factor`` from
    :func:`gradient_statistics`. References: CLARS Algorithm 1 and Figure 2;
    TVLARS Algorithm 1.

    ``engine`` (:mod:`lwrs.apps.train.engine`) spreads each batch over DDP or FSDP2
    processes; the record then says so under ``distributed``.

    Examples
    --------
    >>> from lwrs.apps.train.data import load_digits
    >>> cfg = TrainConfig(dataset="digits", model="mlp", optimizer="clars", batch_size=256, epochs=2,
    ...                   stats_samples=256)
    >>> rec = train(cfg, load_digits())
    >>> len(rec["epochs"]), rec["diverged_epoch"], rec["epochs"][2]["test_accuracy"] > 0.1
    (3, None, True)
    """
    engine = engine or Engine()
    try:
        return _train(config, data, progress, engine)
    finally:
        if engine.world > 1:
            # FSDP2's modules and hooks form reference cycles that hold the process group's last work; freed
            # by a later garbage collection during interpreter shutdown, gloo's worker threads abort the
            # process (SIGABRT). Collected here, while the group is alive, they are freed normally.
            gc.collect()


def _train(config: TrainConfig, data: Dataset, progress: bool, engine: Engine) -> dict[str, Any]:
    n_train = len(data.y_train)
    if config.batch_size > n_train:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {n_train} training samples of {data.name}")
    steps_per_epoch = n_train // config.batch_size
    total = steps_per_epoch * config.epochs
    model = build_model(config.model, data.length, data.classes, seed=config.seed)
    names = layer_names(model)
    forward = engine.wrap(model)  # DDP's wrapper, or the model sharded in place by FSDP2
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    gen = torch.Generator().manual_seed(config.seed)
    stats_idx = torch.randperm(n_train, generator=torch.Generator().manual_seed(10_000 + config.seed))
    stats_idx = stats_idx[:config.stats_samples]
    opt, recorder = _optimizer(config, model, steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor_schedule(config, total, steps_per_epoch))
    frozen_steps = freeze_steps(config, total, steps_per_epoch)
    head = list(model.head.parameters())

    def epoch_record(epoch: int, train_loss: float, per_step: list[dict[str, list[float]]]) -> dict[str, Any]:
        test_loss, test_acc = evaluate(model, x_test, y_test)
        layers: dict[str, list[float | None]] = {}
        for key in per_step[0] if per_step else ():
            cols = zip(*(s[key] for s in per_step))
            layers[key] = [_none_if_nonfinite(_nanmean(c)) for c in cols]
        named = dict(model.named_parameters())
        layers["weight_norm"] = [float(torch.linalg.vector_norm(gather(named[n].detach()).double())) for n in names]
        if config.stats_samples:
            # CLARS's recorder serves here too: a second recorder on the model would be one more set of hooks
            s = gradient_statistics(model, x_train[stats_idx], y_train[stats_idx], recorder=recorder)
            layers["variance_ratio"] = [_none_if_nonfinite(v) for v in s["variance_ratio"]]
            layers["batch_clars_factor"] = s["clars_factor"]
        return {"epoch": epoch, "train_loss": _none_if_nonfinite(train_loss), "test_loss": test_loss,
                "test_accuracy": test_acc, "learning_rate": opt.param_groups[0]["lr"], "layers": layers}

    started = time.perf_counter()
    record: dict[str, Any] = {
        "config": config.record(), "dataset": {"name": data.name, "checksum": data.checksum},
        "layers": names, "learning_rate": config.learning_rate(), "steps_per_epoch": steps_per_epoch,
        "epochs": [epoch_record(0, math.nan, [])], "diverged_epoch": None,
    }
    if engine.world > 1:
        record["distributed"] = {"engine": engine.kind, "processes": engine.world}
    bar = progress_bar(config.epochs, f"{config.optimizer} B={config.batch_size}", "epoch",
                       enabled=progress and engine.rank == 0)
    step = 0
    model.train()
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(n_train, generator=gen)
        losses, per_step = [], []
        try:
            for b in range(steps_per_epoch):
                idx = engine.local(order[b * config.batch_size:(b + 1) * config.batch_size])  # this rank's part
                opt.zero_grad()
                loss = 0.0
                for m in range(0, len(idx), config.micro_batch):
                    part = idx[m:m + config.micro_batch]
                    micro = F.cross_entropy(forward(x_train[part]), y_train[part]) * (len(part) / len(idx))
                    micro.backward()
                    loss += float(micro.detach())
                loss = engine.mean(loss)  # the global batch's loss (the engine averages the gradients alike)
                if not math.isfinite(loss):
                    raise lwrs.NonFiniteError(f"the training loss is not finite ({loss}) at step {step}")
                if step < frozen_steps:
                    for p in head:
                        p.grad = None  # frozen: no update, no momentum, no weight decay
                opt.step()
                scheduler.step()
                per_step.append(_diagnostics_by_layer(opt, model, names))
                losses.append(loss)
                step += 1
        except lwrs.NonFiniteError as e:
            record["diverged_epoch"] = epoch
            record["divergence"] = str(e)
            for later in range(epoch, config.epochs + 1):
                record["epochs"].append({"epoch": later, "train_loss": None, "test_loss": None,
                                         "test_accuracy": None, "learning_rate": None, "layers": {}})
            break
        finally:
            if recorder is not None:
                recorder.reset()
        record["epochs"].append(epoch_record(epoch, sum(losses) / len(losses), per_step))
        bar.set_postfix(loss=f"{record['epochs'][-1]['train_loss']:.3g}",
                        acc=f"{record['epochs'][-1]['test_accuracy']:.3f}")
        bar.update(1)
    bar.close()
    if recorder is not None:
        recorder.remove()
    record["seconds"] = time.perf_counter() - started
    return record


def _nanmean(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
