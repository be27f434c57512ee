r"""``torch.optim`` optimizers built on the lwrs core: MNAG, LARS, CLARS, TVLARS and LAMB.

Each class is a drop-in :class:`torch.optim.Optimizer`. Hyperparameters live in
``param_groups`` (so :mod:`torch.optim.lr_scheduler` works), and the state is
flat and string-keyed (``"step"``, ``"momentum_buffer"``, ``"exp_avg"``,
``"exp_avg_sq"``), so ``state_dict`` / ``load_state_dict`` round-trip.

There are three implementations, and tests show they agree:

* ``foreach=False``, the reference path, calls the core's functional optimizer
  (:func:`lwrs.lars` and friends) on the group's tensors and copies the result
  back into the parameters;
* ``foreach=True`` (the default), the fast path, takes all norms with one
  ``torch._foreach_norm`` per list, turns them into rates with the core's
  :func:`lwrs.rates.layer_rates` on the device, and updates the weights and
  buffers in place with ``torch._foreach_*`` kernels. It synchronises with the
  host once per step, for the non-finite check;
* ``fused=True`` (opt-in, CPU float32/float64) does the same with two compiled
  passes (:mod:`lwrs.backends.torch.fused`): one for every norm, one for the update.

The momentum is the paper's mNAG (CLARS eq. 4): the buffer holds rate-scaled
steps, so with a varying rate it differs from ``torch.optim.SGD``, which
multiplies a buffer of raw gradients by the current rate.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

import lwrs
from lwrs.diagnostics import LayerDiagnostics
from lwrs.optimizers import LambState, MomentumState, _first_nonfinite
from lwrs.norm_statistics import NormStatistics
from lwrs.rates import TrustOptions, clars_denominators, clars_factors, lars_denominators, layer_rates, layer_trust_ratios

from . import distributed

__all__ = ["MNAG", "LARS", "CLARS", "TVLARS", "LAMB"]


class _Layerwise(torch.optim.Optimizer):
    """Shared machinery: groups, state, the two paths and the diagnostics."""

    kind = "none"  # "none" (MNAG), "lars", "clars"

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], *, foreach: bool, norm_source: Any = None,
                 grad_scaler: Any = None):
        super().__init__(params, defaults)
        self.foreach = foreach
        self.fused = False
        self.norm_source = norm_source
        self.grad_scaler = grad_scaler
        self.diagnostics: list[LayerDiagnostics] = []
        for group in self.param_groups:
            self._core(group)  # check the hyperparameters now, with the core's own messages

    # ---- hyperparameters -> the core's optimizer ---------------------------------------------

    def _masks(self, group: dict[str, Any], params: list[torch.Tensor]) -> tuple[list[bool], list[bool]]:
        adapt = [p.ndim > 1 or not group["exclude_1d"] for p in params]
        decay = [p.ndim > 1 or group["decay_1d"] for p in params]
        return adapt, decay

    def _core(self, group: dict[str, Any]) -> lwrs.Optimizer:
        raise NotImplementedError

    def _global_rate(self, group: dict[str, Any], step: int) -> float:
        return float(group["lr"])

    # ---- the step ---------------------------------------------------------------------------------

    def _group_tensors(self, group: dict[str, Any]) -> list[torch.Tensor]:
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        return params

    def _statistics(self, params: list[torch.Tensor], norm_stats: Any) -> NormStatistics | None:
        if norm_stats is None and self.norm_source is not None:
            # the statistics were recorded from scaled gradients; step() runs after GradScaler.unscale_
            scale = float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0
            norm_stats = self.norm_source.norm_statistics(params, scale=scale)
        if isinstance(norm_stats, dict):
            return NormStatistics(
                torch.stack([norm_stats[p][0] for p in params]),
                torch.stack([norm_stats[p][1] for p in params]),
                1,
            )
        return norm_stats

    @torch.no_grad()
    def step(self, closure: Any = None, *, norm_stats: Any = None) -> Any:
        """Perform one step. CLARS reads ``norm_stats`` or its ``norm_source``.

        ``norm_stats`` is a :class:`lwrs.NormStatistics` over the group's
        parameters that have gradients, in order, or a dict ``param -> (S1, S2)``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.diagnostics = []
        for group in self.param_groups:
            params = self._group_tensors(group)
            if not params:
                continue
            stats = self._statistics(params, norm_stats)
            if self.kind == "lamb" and self.foreach:
                diag = self._lamb_foreach_step(group, params, stats)
            elif (self.foreach or self.fused) and self.kind != "lamb":
                diag = self._foreach_step(group, params, stats)
            else:
                diag = self._reference_step(group, params, stats)
            self.diagnostics.append(diag)
        return loss

    def _reference_step(self, group, params, stats) -> LayerDiagnostics:
        state_before = self._core_state(params)
        opt = self._core(group)
        sharded = distributed.is_sharded(params)  # DTensors: the core runs on the gathered tensors
        if sharded:
            state_before = distributed.gather_state(state_before)
        new_params, new_state, diag = opt.step([distributed.gather(p.detach()) for p in params],
                                               [distributed.gather(p.grad) for p in params],
                                               state_before, norm_stats=stats)
        if sharded:
            new_params = [distributed.shard_like(w, p) for w, p in zip(new_params, params)]
            new_state = distributed.shard_state(new_state, params)
        if not diag.skipped:
            for p, w in zip(params, new_params):
                p.copy_(w)
            self._store_core_state(params, new_state)
        return diag

    def _step_count(self, params: list[torch.Tensor]) -> int:
        steps = {self.state[p].get("step", 0) for p in params}
        if len(steps) != 1:
            raise RuntimeError(f"parameters of one group are at different steps {sorted(steps)}; "
                               "was a parameter added to the group mid-run?")
        return steps.pop()

    def _core_state(self, params: list[torch.Tensor]) -> MomentumState:
        t = self._step_count(params)
        return MomentumState(t, tuple(self.state[p].get("momentum_buffer", torch.zeros_like(p)) for p in params))

    def _store_core_state(self, params: list[torch.Tensor], new_state: MomentumState) -> None:
        for p, d in zip(params, new_state.trace):
            self.state[p]["momentum_buffer"] = d
            self.state[p]["step"] = new_state.step

    def _foreach_step(self, group, params, stats) -> LayerDiagnostics:
        grads = [p.grad for p in params]
        t = self._step_count(params)
        stat_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        dots = None
        if self.fused and not distributed.is_sharded(params):  # DTensors take the foreach path
            from . import fused

            fused.check_fusable(params, grads)
            cross = group["weight_decay_form"] == "norm_of_sum" and group["weight_decay"] > 0
            sums = fused.load().layer_sums(params, grads, cross)  # |w|^2, |g|^2 and, if needed, <g, w>
            w_norms, g_norms = sums[:, 0].sqrt().to(stat_dtype), sums[:, 1].sqrt().to(stat_dtype)
            dots = sums[:, 2].to(stat_dtype)
        else:
            w_norms, g_norms = _layer_norms([params, grads], stat_dtype)
        lr = self._global_rate(group, t)
        if stats is None and self.kind == "clars":
            raise ValueError("CLARS needs per-sample norm statistics: pass norm_source= or step(norm_stats=...)")
        mean_norms, skipped = _finite_or_skip(group, t, lr, w_norms, g_norms, stats)
        if skipped is not None:
            return skipped

        for p in params:  # created only once the step is known to go ahead
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        adapt, decay = self._masks(group, params)
        wd = group["weight_decay"]
        decays = [wd if d else 0.0 for d in decay]
        direction_norms = None
        if group["weight_decay_form"] == "norm_of_sum" and any(decays):
            # |g + wd w|^2 = |g|^2 + 2 wd <g, w> + wd^2 |w|^2, without forming g + wd w
            if dots is None and distributed.is_sharded(params):
                dots = distributed.layer_dots(grads, params, stat_dtype)  # whole layers: a second collective
            elif dots is None:
                dots = torch.stack([torch.dot(g.reshape(-1), w.reshape(-1)).to(stat_dtype)
                                    for g, w in zip(grads, params)])
            lam = torch.tensor(decays, dtype=stat_dtype, device=w_norms.device)
            direction_norms = (g_norms**2 + 2 * lam * dots + lam**2 * w_norms**2).clamp_min(0).sqrt()
        options = TrustOptions(self.kind, group["eta"], group["eps"], group["max_ratio"], group["larc_clip"],
                               group["weight_decay_form"])
        lars_r, factors, rates = layer_rates(w_norms, g_norms, learning_rate=lr, options=options, adapt=adapt,
                                             weight_decays=decays, direction_norms=direction_norms,
                                             mean_norms=mean_norms)
        if self.fused and not distributed.is_sharded(params):
            from . import fused

            lam = torch.tensor(decays, dtype=torch.float64)
            fused.load().mnag_update(params, grads, bufs, rates, lam, float(group["momentum"]), bool(group["nesterov"]))
        else:  # elementwise: on the local shards of DTensors
            _foreach_update(*map(distributed.local, (params, grads, bufs)), rates, decays, group["momentum"],
                            group["nesterov"])
        for p in params:
            self.state[p]["step"] = t + 1
        return LayerDiagnostics(w_norms, g_norms, lars_r, factors, rates, lr, t)


def _layer_norms(tensor_lists, dtype, like=None) -> list[torch.Tensor]:
    """Per-layer norms of each list: one ``torch._foreach_norm`` per list, or, for DTensors, the norms of the
    whole layers from the local shards with one collective (:func:`lwrs.backends.torch.distributed.layer_norms`)."""
    if distributed.is_sharded(tensor_lists[0] if like is None else like):
        return distributed.layer_norms(tensor_lists, dtype, like=like)
    return [torch.stack(torch._foreach_norm(ts, dtype=dtype)) for ts in tensor_lists]


def _finite_or_skip(group, t, lr, w_norms, g_norms, stats):
    """The step's one host synchronisation: ``(mean per-sample norms or None, None)`` when every norm is
    finite; otherwise raise :class:`lwrs.NonFiniteError` or, with ``on_nonfinite="skip"``, return the
    diagnostics of a skipped step as the second item."""
    checks = [("parameter norm", w_norms), ("gradient norm", g_norms)]
    mean_norms = None
    if stats is not None:
        mean_norms = (stats.sum_norms / stats.count).to(w_norms.dtype)
        checks.append(("mean per-sample gradient norm", mean_norms))
    problem = _first_nonfinite(torch, checks)
    if problem is None:
        return mean_norms, None
    if group["on_nonfinite"] == "raise":
        raise lwrs.NonFiniteError(f"{problem} at step {t}; pass on_nonfinite='skip' to skip such steps")
    ones = torch.ones_like(w_norms)
    return mean_norms, LayerDiagnostics(w_norms, g_norms, ones, ones, torch.zeros_like(w_norms), lr, t, skipped=True)


def _foreach_update(params, grads, bufs, rates, decays, beta, nesterov) -> None:
    r"""The mNAG update of CLARS eq. (4), in place and without temporaries.

    With :math:`s_k = r_k(g_k + \lambda_k w_k)`, the core computes
    :math:`d \leftarrow \beta d - s` and :math:`w \leftarrow w - s + \beta d`;
    here the same is done as :math:`d \leftarrow \beta d - r g - r\lambda w`, then
    :math:`w \leftarrow (1 - r\lambda) w - r g + \beta d` (or :math:`w + d` for
    heavy ball), with per-layer 0-d rate tensors, so no host synchronisation.
    """
    neg_r = list((-rates).unbind(0))
    decayed = [k for k, lam in enumerate(decays) if lam]
    torch._foreach_mul_(bufs, beta)
    torch._foreach_addcmul_(bufs, grads, neg_r)
    if decayed:
        lam = torch.tensor([decays[k] for k in decayed], dtype=rates.dtype, device=rates.device)
        r_lam = rates[decayed] * lam
        torch._foreach_addcmul_([bufs[k] for k in decayed], [params[k] for k in decayed], list((-r_lam).unbind(0)))
    if not nesterov:
        torch._foreach_add_(params, bufs)
        return
    if decayed:
        torch._foreach_mul_([params[k] for k in decayed], list((1.0 - r_lam).unbind(0)))
    torch._foreach_addcmul_(params, grads, neg_r)
    torch._foreach_add_(params, bufs, alpha=beta)


def _common_defaults(lr, momentum, weight_decay, nesterov, exclude_1d, decay_1d, on_nonfinite) -> dict[str, Any]:
    return dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, exclude_1d=exclude_1d,
                decay_1d=decay_1d, on_nonfinite=on_nonfinite, eta=1.0, eps=0.0, max_ratio=None, larc_clip=False,
                weight_decay_form="sum_of_norms")


class MNAG(_Layerwise):
    r"""mNAG (CLARS eq. 2/4) as a torch optimizer: one rate for every layer, the rate inside the buffer.

    .. math:: d_t = \beta d_{t-1} - \gamma_t(\bar g_t + \lambda w_t), \quad
              w_{t+1} = w_t - \gamma_t(\bar g_t + \lambda w_t) + \beta d_t

    With a constant ``lr`` this equals ``torch.optim.SGD(momentum, nesterov=True)``.

    Examples
    --------
    >>> import torch
    >>> from lwrs.backends.torch import MNAG
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> opt = MNAG([w], lr=0.1, momentum=0.9)
    >>> w.grad = torch.ones(2); opt.step(); w.data
    tensor([0.8100, 0.8100])
    """

    kind = "none"

    def __init__(self, params, lr: float, momentum: float = 0.9, *, weight_decay: float = 0.0, nesterov: bool = True,
                 decay_1d: bool = True, on_nonfinite: str = "raise", foreach: bool = True, fused: bool = False):
        super().__init__(params, _common_defaults(lr, momentum, weight_decay, nesterov, False, decay_1d, on_nonfinite),
                         foreach=foreach)
        self.fused = bool(fused)

    def _core(self, group):
        weight_decay_mask = (lambda w: w.ndim > 1 or group["decay_1d"])
        return lwrs.mnag(group["lr"], beta=group["momentum"], nesterov=group["nesterov"],
                         weight_decay=group["weight_decay"], weight_decay_mask=weight_decay_mask, on_nonfinite=group["on_nonfinite"])


class LARS(_Layerwise):
    r"""LARS (You et al. 2017; CLARS eq. 3) on mNAG, as a torch optimizer.

    .. math:: \gamma_k = \gamma_t\,\eta\,\frac{\|w_k\|}{\|\bar g_k\| + \lambda\|w_k\| + \epsilon}

    Options as in :func:`lwrs.lars`; ``exclude_1d`` keeps 1-D tensors (biases,
    norm parameters) at ratio 1, ``decay_1d`` says whether they are decayed.

    Examples
    --------
    >>> import torch
    >>> from lwrs.backends.torch import LARS
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = LARS(model.parameters(), lr=1.0, eta=1e-3, weight_decay=5e-4)
    >>> model(torch.randn(8, 4)).sum().backward(); opt.step()
    >>> opt.diagnostics[0].trust_ratios.shape
    torch.Size([2])
    """

    kind = "lars"

    def __init__(self, params, lr: float, momentum: float = 0.9, *, eta: float = 1e-3, weight_decay: float = 0.0,
                 weight_decay_form: str = "sum_of_norms", eps: float = 0.0, max_ratio: float | None = None,
                 larc_clip: bool = False, exclude_1d: bool = True, decay_1d: bool = True, nesterov: bool = True,
                 on_nonfinite: str = "raise", foreach: bool = True, fused: bool = False, norm_source: Any = None,
                 grad_scaler: Any = None):
        defaults = _common_defaults(lr, momentum, weight_decay, nesterov, exclude_1d, decay_1d, on_nonfinite)
        defaults.update(eta=eta, eps=eps, max_ratio=max_ratio, larc_clip=larc_clip, weight_decay_form=weight_decay_form)
        super().__init__(params, defaults, foreach=foreach, norm_source=norm_source, grad_scaler=grad_scaler)
        self.fused = bool(fused)

    def _factory(self):
        return lwrs.lars

    def _core(self, group):
        return self._factory()(
            group["lr"], beta=group["momentum"], eta=group["eta"], weight_decay=group["weight_decay"],
            weight_decay_form=group["weight_decay_form"], eps=group["eps"], max_ratio=group["max_ratio"],
            larc_clip=group["larc_clip"], adapt_mask=lambda w: w.ndim > 1 or not group["exclude_1d"],
            weight_decay_mask=lambda w: w.ndim > 1 or group["decay_1d"], nesterov=group["nesterov"],
            on_nonfinite=group["on_nonfinite"],
        )


class CLARS(LARS):
    r"""CLARS (CLARS eq. 5, Algorithm 1) on mNAG, as a torch optimizer.

    .. math:: \gamma_k = \gamma_t\,\eta\,\frac{\|w_k\|}{\frac1B\sum_i\|g_{ik}\| + \lambda\|w_k\| + \epsilon}

    The per-sample term comes from ``norm_source`` (an object with
    ``norm_statistics(params)``, e.g. a per-sample-norm recorder) or from
    ``step(norm_stats=...)``: an :class:`lwrs.NormStatistics` whose
    ``mean_norms()`` is in the units of ``p.grad``, or a dict
    ``param -> (S1, S2)`` of sums of per-sample contributions to ``p.grad``.
    ``eta`` defaults to Algorithm 1's 0.01. With mixed precision, pass the
    ``grad_scaler``: the statistics are unscaled by its current scale, as the
    gradients are by ``GradScaler.unscale_``.

    Examples
    --------
    >>> import torch, lwrs
    >>> from lwrs.backends.torch import CLARS
    >>> w = torch.nn.Parameter(torch.ones(2, 2))
    >>> opt = CLARS([w], lr=1.0, eta=0.01)
    >>> w.grad = torch.full((2, 2), 0.5)
    >>> stats = lwrs.NormStatistics(torch.tensor([2.0]), torch.tensor([4.0]), 1)   # mean |g_i| = 2
    >>> opt.step(norm_stats=stats); opt.diagnostics[0].clars_factors
    tensor([0.5000])
    """

    kind = "clars"

    def __init__(self, params, lr: float, momentum: float = 0.9, *, eta: float = 1e-2, **kwargs: Any):
        super().__init__(params, lr, momentum, eta=eta, **kwargs)

    def _factory(self):
        return lwrs.clars

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and, like them, the per-sample statistics of ``norm_source``."""
        super().zero_grad(set_to_none=set_to_none)
        if self.norm_source is not None and hasattr(self.norm_source, "reset"):
            self.norm_source.reset()


class TVLARS(LARS):
    r"""TVLARS (TVLARS Algorithm 1) on mNAG: LARS with :math:`\gamma_t = \gamma_{target}\,\phi_t`.

    .. math:: \phi_t = \frac{1}{\alpha + e^{\lambda(t - d_e)}} + \gamma_{\min}

    ``lr`` is :math:`\gamma_{target}` (a scheduler may still change it);
    ``decay_coefficient`` is :math:`\lambda`, ``delay_steps`` :math:`d_e`.

    Examples
    --------
    >>> import torch
    >>> from lwrs.backends.torch import TVLARS
    >>> w = torch.nn.Parameter(torch.ones(2, 2))
    >>> opt = TVLARS([w], lr=1.0, decay_coefficient=0.01, delay_steps=0)
    >>> w.grad = torch.ones(2, 2); opt.step(); opt.diagnostics[0].learning_rate
    0.5
    """

    kind = "lars"

    def __init__(self, params, lr: float, momentum: float = 0.9, *, decay_coefficient: float, delay_steps: float,
                 alpha: float = 1.0, gamma_min: float = 0.0, **kwargs: Any):
        self._phi_args = dict(decay_coefficient=decay_coefficient, delay_steps=delay_steps, alpha=alpha, gamma_min=gamma_min)
        self._phi = lwrs.schedules.tvlars_factor(**self._phi_args)
        super().__init__(params, lr, momentum, **kwargs)

    def _core(self, group):
        g = group
        return lwrs.tvlars(
            g["lr"], **self._phi_args, beta=g["momentum"], eta=g["eta"], weight_decay=g["weight_decay"],
            weight_decay_form=g["weight_decay_form"], eps=g["eps"],
            adapt_mask=lambda w: w.ndim > 1 or not g["exclude_1d"], weight_decay_mask=lambda w: w.ndim > 1 or g["decay_1d"],
            nesterov=g["nesterov"], on_nonfinite=g["on_nonfinite"],
        )

    def _global_rate(self, group, step):
        return float(group["lr"]) * self._phi(step)


class LAMB(_Layerwise):
    r"""LAMB (You et al. 2019) as a torch optimizer (``foreach`` fast path or the core as reference).

    .. math:: u = \frac{\hat m}{\sqrt{\hat v} + \epsilon} + \lambda w, \quad
              w \leftarrow w - \gamma_t \frac{\|w\|}{\|u\|} u

    Examples
    --------
    >>> import torch
    >>> from lwrs.backends.torch import LAMB
    >>> w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    >>> opt = LAMB([w], lr=0.1)
    >>> w.grad = torch.tensor([[1.0, -1.0]]); opt.step(); opt.state[w]["step"]
    1
    """

    kind = "lamb"

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), *, eps: float = 1e-6,
                 weight_decay: float = 0.0, exclude_1d: bool = True, decay_1d: bool = True,
                 on_nonfinite: str = "raise", foreach: bool = True):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, exclude_1d=exclude_1d,
                        decay_1d=decay_1d, on_nonfinite=on_nonfinite)
        super().__init__(params, defaults, foreach=foreach)

    def _core(self, group):
        b1, b2 = group["betas"]
        return lwrs.lamb(group["lr"], beta1=b1, beta2=b2, eps=group["eps"], weight_decay=group["weight_decay"],
                         adapt_mask=lambda w: w.ndim > 1 or not group["exclude_1d"],
                         weight_decay_mask=lambda w: w.ndim > 1 or group["decay_1d"], on_nonfinite=group["on_nonfinite"])

    def _core_state(self, params):
        t = self._step_count(params)
        zeros = [torch.zeros_like(p) for p in params]
        return LambState(t, tuple(self.state[p].get("exp_avg", z) for p, z in zip(params, zeros)),
                         tuple(self.state[p].get("exp_avg_sq", z) for p, z in zip(params, zeros)))

    def _lamb_foreach_step(self, group, params, stats) -> LayerDiagnostics:
        """LAMB with multi-tensor kernels; the ratio comes from the core's ``layer_trust_ratios``."""
        grads = [p.grad for p in params]
        t = self._step_count(params)
        stat_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        w_norms, g_norms = _layer_norms([params, grads], stat_dtype)
        lr = float(group["lr"])
        mean_norms, skipped = _finite_or_skip(group, t, lr, w_norms, g_norms, stats)
        if skipped is not None:
            return skipped
        for p in params:
            if "exp_avg" not in self.state[p]:
                self.state[p]["exp_avg"] = torch.zeros_like(p)
                self.state[p]["exp_avg_sq"] = torch.zeros_like(p)
        m = distributed.local([self.state[p]["exp_avg"] for p in params])  # local shards of DTensors
        v = distributed.local([self.state[p]["exp_avg_sq"] for p in params])
        weights, grads = distributed.local(params), distributed.local(grads)
        b1, b2 = group["betas"]
        adapt, decay = self._masks(group, params)
        decays = [group["weight_decay"] if d else 0.0 for d in decay]
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, grads, alpha=1.0 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1.0 - b2)
        c1, c2 = 1.0 - b1 ** (t + 1), 1.0 - b2 ** (t + 1)
        denom = torch._foreach_div(v, c2)  # as the core: (m / c1) / (sqrt(v / c2) + eps) + wd w
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        u = torch._foreach_div(m, c1)
        torch._foreach_div_(u, denom)
        decayed = [k for k, lam in enumerate(decays) if lam]
        if decayed:
            torch._foreach_add_([u[k] for k in decayed], [weights[k] for k in decayed], alpha=group["weight_decay"])
        (u_norms,) = _layer_norms([u], stat_dtype, like=params)
        ratios = layer_trust_ratios(w_norms, u_norms, eta=1.0, adapt=adapt, grad_norms=g_norms)
        rates = lr * ratios
        factors = torch.ones_like(w_norms)
        if mean_norms is not None:  # reported, not used: LAMB has no per-sample term
            factors = clars_factors(lars_denominators(w_norms, g_norms, weight_decay=decays),
                                    clars_denominators(w_norms, mean_norms, weight_decay=decays))
        torch._foreach_mul_(u, list(rates.unbind(0)))
        torch._foreach_sub_(weights, u)
        for p in params:
            self.state[p]["step"] = t + 1
        return LayerDiagnostics(w_norms, g_norms, ratios, factors, rates, lr, t)

    def _store_core_state(self, params, new_state):
        for k, p in enumerate(params):
            self.state[p]["exp_avg"] = new_state.first_moment[k]
            self.state[p]["exp_avg_sq"] = new_state.second_moment[k]
            self.state[p]["step"] = new_state.step
