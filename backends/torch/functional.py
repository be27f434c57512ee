r"""The functional layer of the torch optimizers: lists of tensors in, an in-place update out.

Like ``torch.optim``'s ``sgd``/``adam`` functions, each algorithm has one function
(:func:`mnag`, :func:`lars`, :func:`clars`, :func:`tvlars`, :func:`lamb`) that
takes the parameters, gradients and state tensors of one group and updates them
in place. It picks one of three implementations of the same kernels:

* ``"reference"`` (``foreach=False``): the core's own functions on the tensors
  (:func:`lwrs.layer_norms`, :func:`lwrs.rates.layer_rates`,
  :func:`lwrs.momentum_step`), results copied back;
* ``"foreach"`` (the default): the same formulas, in place, with one fused
  squared-norm pass per list and, on the CPU, BLAS ``axpby`` updates;
* ``"fused"`` (CPU float32/float64): the two compiled passes of
  :mod:`lwrs.backends.torch.fused`.

The per-layer rates are always computed by the core's
:func:`lwrs.rates.layer_rates` from the norms; the kernels here only take
norms and apply CLARS eq. (4). The tests check each kernel against the core.

A step has three phases, which the optimizer classes run for every parameter
group before they update any (so that a step is all-or-nothing): :func:`plan_momentum`
(norms and rates, no side effect), a check of the plan (:func:`first_problem`),
then :func:`apply_momentum`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

import lwrs
from lwrs.diagnostics import LayerDiagnostics
from lwrs.rates import (
    TrustOptions,
    clars_denominators,
    clars_factors,
    lars_denominators,
    layer_rates,
    layer_trust_ratios,
)

from .norms import _SQ_BLOCK, squared_norms
from .norms import stat_dtype as _stat_dtype

__all__ = [
    "MomentumPlan",
    "plan_momentum",
    "apply_momentum",
    "first_problem",
    "mnag",
    "lars",
    "clars",
    "tvlars",
    "lamb",
    "LambPlan",
    "plan_lamb",
    "apply_lamb",
]



def _compiling() -> bool:
    return torch.compiler.is_compiling()


def implementation(foreach: bool | None, fused: bool | None) -> str:
    """``"fused"``, ``"foreach"`` (the default) or ``"reference"``, from torch.optim's two flags."""
    if fused:
        return "fused"
    return "reference" if foreach is False else "foreach"


class MomentumPlan(NamedTuple):
    """What :func:`plan_momentum` found for one group: its rates, and what to check before updating."""

    diagnostics: LayerDiagnostics
    decays: tuple[float, ...]
    direction_norms: torch.Tensor  # |g + lambda w| per layer (|g| where lambda is 0)
    finite: torch.Tensor  # 0-d bool: every norm, statistic, rate and the update's bound is finite
    checks: tuple[tuple[str, torch.Tensor], ...]  # (what, per-layer values) for the error message


def _bound_ok(w_norms, rates, direction_bound, buf_norms, beta, nesterov, dtypes) -> torch.Tensor:
    r"""Per layer: the step cannot overflow the parameter's dtype.

    By the triangle inequality every element of the new trace and weights is below
    :math:`\beta\|d\| + \gamma_k(\|g\| + \lambda\|w\|)` and
    :math:`\|w\| + (1+\beta)\gamma_k(\|g\| + \lambda\|w\|) + \beta^2\|d\|` (Nesterov).
    """
    s = rates * direction_bound
    d_new = beta * buf_norms + s
    w_new = w_norms + s + beta * d_new if nesterov else w_norms + d_new
    largest = {dt: torch.finfo(dt).max for dt in set(dtypes)}  # each dtype looked up once
    limit = torch.tensor([largest[dt] for dt in dtypes], dtype=w_norms.dtype, device=w_norms.device)
    return torch.isfinite(w_new) & (w_new <= limit)


def _float16_maxima(params, grads, buffers, w_norms, g_norms, b_norms):
    """For float16 layers, the largest magnitudes instead of the norms in the overflow bound.

    A norm bounds every element too, but a float16 layer of many moderate values can have a norm
    above float16's largest number (65504) and still step safely; its maxima give the bound.
    """
    half = [k for k, p in enumerate(params) if p.dtype == torch.float16]
    if not half:
        return w_norms, g_norms, b_norms

    def maxima(tensors, norms):
        return torch.stack([tensors[k].abs().amax().to(norms.dtype) if k in half and tensors[k] is not None
                            else norms[k] for k in range(norms.shape[0])])

    bufs = buffers if buffers is not None else [None] * len(params)
    return maxima(params, w_norms), maxima(grads, g_norms), maxima(bufs, b_norms)


def plan_momentum(params, grads, buffers, *, lr: Any, momentum: float, nesterov: bool, options: TrustOptions,
                  adapt: Sequence[bool], decays: Sequence[float], mean_norms: Any = None, norms: Any = None,
                  step: Any = 0, implementation: str = "foreach", layouts: Any = None) -> MomentumPlan:
    r"""Norms and per-layer rates of one mNAG-family step (no side effect).

    .. math:: \gamma_k = \gamma_t\, r_k \qquad\text{(CLARS eq. 3 and 5, via :func:`lwrs.rates.layer_rates`)}

    ``lr`` is :math:`\gamma_t` (a number, a 0-d tensor, or a 1-D tensor with one entry
    per layer); ``norms`` is the result of :func:`squared_norms` when the caller took it;
    ``layouts``: the ``DTensor`` s whose local shards the lists hold (see :func:`squared_norms`).
    """
    if norms is None:
        norms = squared_norms(params, grads, buffers, decays if options.weight_decay_form == "norm_of_sum" else None,
                              implementation=implementation, layouts=layouts)
    w_norms, g_norms, b_norms, dir_norms = norms.sqrt().unbind(0)
    has = torch.tensor([bool(x) for x in decays], device=w_norms.device)
    all_directions = torch.where(has, dir_norms, g_norms)  # layers without decay: the direction is the gradient
    direction_norms = all_directions if options.weight_decay_form == "norm_of_sum" and any(decays) else None
    per_layer_lr = isinstance(lr, torch.Tensor) and lr.ndim == 1
    scalar_lr = lr if not (options.larc_clip and isinstance(lr, torch.Tensor)) else float(lr)
    lars_r, factors, rates = layer_rates(w_norms, g_norms, learning_rate=1.0 if per_layer_lr else scalar_lr,
                                         options=options, adapt=adapt, weight_decays=decays,
                                         direction_norms=direction_norms, mean_norms=mean_norms)
    if per_layer_lr:
        rates = lr.to(rates.dtype) * rates
    if isinstance(rates, torch.Tensor) and rates.dtype != w_norms.dtype:
        rates = rates.to(w_norms.dtype)
    lam = torch.tensor([float(x) for x in decays], dtype=w_norms.dtype, device=w_norms.device)
    wb, gb, bb = _float16_maxima(params, grads, buffers, w_norms, g_norms, b_norms)
    bound = _bound_ok(wb, rates, gb + lam * wb, bb, momentum, nesterov, [p.dtype for p in params])
    checks = [("parameter norm", w_norms), ("gradient norm", g_norms), ("momentum buffer norm", b_norms)]
    if mean_norms is not None:
        checks.append(("mean per-sample gradient norm", mean_norms))
    checks.append(("step size (the update would overflow)", torch.where(bound, rates, torch.full_like(rates, torch.inf))))
    finite = torch.stack([torch.isfinite(v).all() for _, v in checks]).all()
    diag = LayerDiagnostics(w_norms, g_norms, lars_r, factors, rates, _frozen(lr), step)
    return MomentumPlan(diag, tuple(decays), all_directions, finite, tuple(checks))


def _frozen(lr: Any) -> Any:
    """The rate of this step for the diagnostics: a tensor rate copied (a scheduler fills the group's in place)."""
    return lr.detach().clone() if isinstance(lr, torch.Tensor) else lr


def first_problem(checks: Sequence[tuple[str, torch.Tensor]], names: Sequence[str]) -> str | None:
    """The first non-finite value, named by layer, or ``None`` (reads the values on the host)."""
    for what, values in checks:
        bad = (~torch.isfinite(values)).nonzero()
        if bad.numel():
            k = int(bad[0, 0])
            return f"parameter {names[k]}: {what} is not finite (value {float(values[k])!r})"
    return None


def _update_reference(params, grads, buffers, rates, decays, beta, nesterov) -> None:
    directions = [g + lam * w if lam else g for w, g, lam in zip(params, grads, decays)]
    new_w, new_d = lwrs.momentum_step([p.detach() for p in params], directions, list(buffers), rates, beta=beta,
                                      nesterov=nesterov)
    for p, b, w, d in zip(params, buffers, new_w, new_d):
        p.copy_(w)
        b.copy_(d)


def _update_foreach(params, grads, buffers, rates, decays, beta, nesterov, ok=None) -> None:
    r"""CLARS eq. (4) in place, in five passes (Nesterov) over each layer.

    With :math:`s = r(g + \lambda w)`, :math:`d' = \beta d - s` and :math:`w' = w - s + \beta d'
    = (w - \beta d) + (1 + \beta) d'`, so: :math:`w \leftarrow w - \beta d`; then
    :math:`d \leftarrow \beta(1 - r\lambda) d - r g - r\lambda w` (which equals :math:`d'`,
    as the new :math:`w` holds :math:`w - \beta d`); then :math:`w \leftarrow w + (1 + \beta) d`.
    Heavy ball: :math:`d \leftarrow \beta d - r g - r \lambda w`, :math:`w \leftarrow w + d`.

    On the CPU the rates are read to the host (a CPU tensor: no device synchronisation) and each
    pass is an in-place op with Python scalars, which allocates nothing; many small layers go
    through ``torch._foreach_*`` calls instead. Elsewhere, or compiled, 0-d tensor rates (no host
    synchronisation) and, with ``ok``, ``where`` to skip a non-finite step.
    """
    if all(p.device.type == "cpu" for p in params) and not _compiling() and ok is None:
        small = [k for k, p in enumerate(params) if p.numel() < _SQ_BLOCK]
        if len(small) > 1:  # many small layers: one multi-tensor call per pass, not one Python call per layer
            small_set = set(small)
            pick = lambda xs: [xs[k] for k in small]  # noqa: E731
            _update_multi(pick(params), pick(grads), pick(buffers), rates[small], pick(decays), beta, nesterov)
            big = [k for k in range(len(params)) if k not in small_set]
            params, grads, buffers = [params[k] for k in big], [grads[k] for k in big], [buffers[k] for k in big]
            rates, decays = rates[big], [decays[k] for k in big]
        for p, g, d, r, lam in zip(params, grads, buffers, rates.tolist(), decays):
            if nesterov:
                p.add_(d, alpha=-beta)
                d.mul_(beta * (1.0 - r * lam)).add_(g, alpha=-r)
                if lam:
                    d.add_(p, alpha=-r * lam)
                p.add_(d, alpha=1.0 + beta)
            else:
                d.mul_(beta).add_(g, alpha=-r)
                if lam:
                    d.add_(p, alpha=-r * lam)
                p.add_(d)
        return
    for k, (p, g, d, lam) in enumerate(zip(params, grads, buffers, decays)):
        _update_tensor(p, g, d, rates[k], lam, beta, nesterov, ok)


def _update_multi(params, grads, buffers, rates: torch.Tensor, decays, beta, nesterov) -> None:
    """The passes of :func:`_update_foreach` as ``torch._foreach_*`` calls (per-layer rates as 0-d views)."""
    lam = torch.tensor([float(x) for x in decays], dtype=rates.dtype)
    # the 0-d factors in the parameters' dtype (the product is formed in it anyway): no conversion per layer
    dtype = params[0].dtype if len({p.dtype for p in params}) == 1 else rates.dtype
    neg_r = list((-rates).to(dtype).unbind(0))
    decayed = [k for k, x in enumerate(decays) if x]
    if nesterov:
        torch._foreach_add_(params, buffers, alpha=-beta)
        # 0-d factors, not Python floats: on the CPU a list of floats costs a conversion per layer
        torch._foreach_mul_(buffers, list((beta * (1.0 - rates * lam)).to(dtype).unbind(0)))
    else:
        torch._foreach_mul_(buffers, beta)
    torch._foreach_addcmul_(buffers, grads, neg_r)
    if decayed:
        neg_r_lam = list((-(rates * lam)[decayed]).to(dtype).unbind(0))
        torch._foreach_addcmul_([buffers[k] for k in decayed], [params[k] for k in decayed], neg_r_lam)
    torch._foreach_add_(params, buffers, alpha=1.0 + beta if nesterov else 1.0)


def _update_tensor(p, g, d, r, lam, beta, nesterov, ok=None) -> None:
    r = r.to(p.dtype)
    s = r * (g + lam * p) if lam else r * g
    d_new = beta * d - s
    w_new = p - s + beta * d_new if nesterov else p + d_new
    if ok is not None:
        d_new, w_new = torch.where(ok, d_new, d), torch.where(ok, w_new, p)
    d.copy_(d_new)
    p.copy_(w_new)


def apply_momentum(params, grads, buffers, rates, decays, *, momentum: float, nesterov: bool,
                   implementation: str = "foreach", ok: torch.Tensor | None = None) -> None:
    r"""The mNAG update of CLARS eq. (4) with per-layer rates, in place.

    .. math:: d_k \leftarrow \beta d_k - \gamma_k(\bar g_k + \lambda_k w_k), \qquad
              w_k \leftarrow w_k - \gamma_k(\bar g_k + \lambda_k w_k) + \beta d_k

    (heavy ball: :math:`w_k \leftarrow w_k + d_k`). ``ok``, a 0-d bool tensor, keeps the
    old values where it is false (the sync-free skip).
    """
    if not params:
        return
    if implementation == "reference" and ok is None:
        _update_reference(params, grads, buffers, rates, decays, momentum, nesterov)
    elif implementation == "fused" and ok is None and not _compiling():
        from . import fused

        lam = torch.tensor([float(x) for x in decays], dtype=torch.float64)
        fused.load().mnag_update(list(params), list(grads), list(buffers), rates, lam, float(momentum), bool(nesterov))
    else:
        _update_foreach(params, grads, buffers, rates, decays, momentum, nesterov, ok)


def _one_step(params, grads, buffers, *, lr, momentum, nesterov, options, adapt, decays, mean_norms=None,
              foreach=None, fused=None) -> LayerDiagnostics:
    impl = implementation(foreach, fused)
    plan = plan_momentum(params, grads, buffers, lr=lr, momentum=momentum, nesterov=nesterov, options=options,
                         adapt=adapt, decays=decays, mean_norms=mean_norms, implementation=impl)
    if not bool(plan.finite):
        problem = first_problem(plan.checks, [str(k) for k in range(len(params))])
        raise lwrs.NonFiniteError(problem)
    apply_momentum(params, grads, buffers, plan.diagnostics.rates, decays, momentum=momentum, nesterov=nesterov,
                   implementation=impl)
    return plan.diagnostics


def _masks(params, adapt, decays, weight_decay):
    adapt = [p.ndim > 1 for p in params] if adapt is None else list(adapt)
    decays = [weight_decay] * len(params) if decays is None else [weight_decay if d else 0.0 for d in decays]
    return adapt, decays


def mnag(params, grads, momentum_buffers, *, lr, momentum=0.9, weight_decay=0.0, nesterov=True,
         weight_decay_mask=None, foreach=None, fused=None) -> LayerDiagnostics:
    r"""mNAG (CLARS eq. 2/4) on lists of tensors, in place: one rate :math:`\gamma_t` = ``lr`` for every layer.

    Raises :class:`lwrs.NonFiniteError` (and changes nothing) when a norm or the step is not finite.

    Examples
    --------
    >>> import torch
    >>> w, g, d = torch.ones(2), torch.ones(2), torch.zeros(2)
    >>> _ = mnag([w], [g], [d], lr=0.1, momentum=0.9); w
    tensor([0.8100, 0.8100])
    """
    _, decays = _masks(params, None, weight_decay_mask, weight_decay)
    return _one_step(params, grads, momentum_buffers, lr=lr, momentum=momentum, nesterov=nesterov,
                     options=TrustOptions("none"), adapt=[False] * len(params), decays=decays, foreach=foreach,
                     fused=fused)


def lars(params, grads, momentum_buffers, *, lr, momentum=0.9, eta=1e-3, weight_decay=0.0,
         weight_decay_form="sum_of_norms", eps=0.0, max_ratio=None, larc_clip=False, nesterov=True,
         adapt_mask=None, weight_decay_mask=None, foreach=None, fused=None) -> LayerDiagnostics:
    r"""LARS (CLARS eq. 3) on lists of tensors, in place.

    .. math:: \gamma_k = \gamma_t\,\eta\,\frac{\|w_k\|}{\|\bar g_k\| + \lambda\|w_k\| + \epsilon}

    ``adapt_mask``/``weight_decay_mask`` are lists of bools (default: adapt layers with ``ndim > 1``,
    decay all).

    Examples
    --------
    >>> import torch
    >>> w, g, d = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 10.0]]), torch.zeros(1, 2)
    >>> lars([w], [g], [d], lr=1.0, momentum=0.0, eta=0.5).rates
    tensor([0.2500])
    """
    adapt, decays = _masks(params, adapt_mask, weight_decay_mask, weight_decay)
    options = TrustOptions("lars", eta, eps, max_ratio, larc_clip, weight_decay_form)
    return _one_step(params, grads, momentum_buffers, lr=lr, momentum=momentum, nesterov=nesterov, options=options,
                     adapt=adapt, decays=decays, foreach=foreach, fused=fused)


def clars(params, grads, momentum_buffers, *, norm_stats, lr, momentum=0.9, eta=1e-2, weight_decay=0.0,
          weight_decay_form="sum_of_norms", eps=0.0, max_ratio=None, larc_clip=False, nesterov=True,
          adapt_mask=None, weight_decay_mask=None, foreach=None, fused=None) -> LayerDiagnostics:
    r"""CLARS (CLARS eq. 5) on lists of tensors, in place; ``norm_stats`` is a :class:`lwrs.NormStatistics`.

    .. math:: \gamma_k = \gamma_t\,\eta\,\frac{\|w_k\|}{\frac1B\sum_i\|g_{ik}\| + \lambda\|w_k\| + \epsilon}

    Examples
    --------
    >>> import torch, lwrs
    >>> w, g, d = torch.ones(2, 2), torch.full((2, 2), 0.5), torch.zeros(2, 2)
    >>> stats = lwrs.NormStatistics(torch.tensor([2.0]), torch.tensor([4.0]), 1)
    >>> clars([w], [g], [d], norm_stats=stats, lr=1.0).clars_factors
    tensor([0.5000])
    """
    adapt, decays = _masks(params, adapt_mask, weight_decay_mask, weight_decay)
    options = TrustOptions("clars", eta, eps, max_ratio, larc_clip, weight_decay_form)
    mean = (norm_stats.sum_norms / norm_stats.count).to(_stat_dtype(params))
    return _one_step(params, grads, momentum_buffers, lr=lr, momentum=momentum, nesterov=nesterov, options=options,
                     adapt=adapt, decays=decays, mean_norms=mean, foreach=foreach, fused=fused)


def tvlars(params, grads, momentum_buffers, *, step, lr, decay_coefficient, delay_steps, alpha=1.0, gamma_min=0.0,
           momentum=0.9, eta=1e-3, weight_decay=0.0, weight_decay_form="sum_of_norms", eps=0.0, nesterov=True,
           adapt_mask=None, weight_decay_mask=None, foreach=None, fused=None) -> LayerDiagnostics:
    r"""TVLARS (TVLARS Algorithm 1) on lists of tensors, in place: LARS at :math:`\gamma_t = \gamma_{target}\phi_t`.

    .. math:: \phi_t = \frac{1}{\alpha + e^{\lambda(t - d_e)}} + \gamma_{\min}

    :math:`\phi_t` is the core's :func:`lwrs.schedules.tvlars_factor` at ``step``.

    Examples
    --------
    >>> import torch
    >>> w, g, d = torch.ones(2, 2), torch.ones(2, 2), torch.zeros(2, 2)
    >>> tvlars([w], [g], [d], step=0, lr=1.0, decay_coefficient=0.01, delay_steps=0).learning_rate
    0.5
    """
    phi = lwrs.schedules.tvlars_factor(decay_coefficient=decay_coefficient, delay_steps=delay_steps, alpha=alpha,
                                       gamma_min=gamma_min)
    return lars(params, grads, momentum_buffers, lr=lr * phi(step), momentum=momentum, eta=eta,
                weight_decay=weight_decay, weight_decay_form=weight_decay_form, eps=eps, nesterov=nesterov,
                adapt_mask=adapt_mask, weight_decay_mask=weight_decay_mask, foreach=foreach, fused=fused)


# ---- LAMB: the new moments and direction are formed out of place and committed only after the checks ----


class LambPlan(NamedTuple):
    """What :func:`plan_lamb` computed for one group, committed by :func:`apply_lamb`."""

    diagnostics: LayerDiagnostics
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]
    directions: list[torch.Tensor]
    finite: torch.Tensor
    checks: tuple[tuple[str, torch.Tensor], ...]


def _moments(grads, exp_avg, exp_avg_sq, b1, b2, foreach):
    """LAMB's new moments: the core's :func:`lwrs.moments.lamb_moments` (reference), or the same with
    multi-tensor kernels (tested against it)."""
    if foreach and not _compiling():  # compiled: the core's, as foreach's alpha= would specialise a dynamic beta
        m = torch._foreach_mul(exp_avg, b1)
        torch._foreach_add_(m, grads, alpha=1.0 - b1)
        v = torch._foreach_mul(exp_avg_sq, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1.0 - b2)
        return m, v
    m, v = lwrs.moments.lamb_moments(list(grads), list(exp_avg), list(exp_avg_sq), beta1=b1, beta2=b2)
    return list(m), list(v)


def _directions(m, v, params, steps, b1, b2, eps, decays) -> list[torch.Tensor]:
    """LAMB's directions by the core's :func:`lwrs.moments.lamb_directions` (per layer where step counts differ)."""
    same = _compiling() or len({int(t) for t in steps}) <= 1
    if same and params:
        return list(lwrs.moments.lamb_directions(list(m), list(v), list(params), step=steps[0] + 1, beta1=b1,
                                                 beta2=b2, eps=eps, weight_decays=list(decays)))
    return [lwrs.moments.lamb_directions([mk], [vk], [w], step=t + 1, beta1=b1, beta2=b2, eps=eps,
                                         weight_decays=[lam])[0]
            for mk, vk, w, t, lam in zip(m, v, params, steps, decays)]


def plan_lamb(params, grads, exp_avg, exp_avg_sq, *, lr: Any, betas: tuple[float, float], eps: float,
              adapt: Sequence[bool], decays: Sequence[float], steps: Sequence[Any], mean_norms: Any = None,
              implementation: str = "foreach", layouts: Any = None) -> LambPlan:
    r"""LAMB's moments, direction and per-layer rates for one group (no side effect).

    .. math::

        m &= \beta_1 m + (1-\beta_1) g, \quad v = \beta_2 v + (1-\beta_2) g^2, \quad
        u = \frac{m / (1-\beta_1^{t})}{\sqrt{v / (1-\beta_2^{t})} + \epsilon} + \lambda w, \\
        \gamma_k &= \gamma_t \frac{\|w_k\|}{\|u_k\|}

    (You et al. 2019, Algorithm 2); ``steps`` holds each layer's :math:`t - 1`; ``layouts`` as in
    :func:`squared_norms` (two collectives: the norms before the moments, then the direction's).
    """
    dtype = _stat_dtype(params)
    b1, b2 = (torch.ones((), dtype=torch.float64) * b for b in betas) if _compiling() else betas  # traced betas
    norms = squared_norms(params, grads, implementation="foreach" if implementation == "fused" else implementation,
                          layouts=layouts)
    w_norms, g_norms = norms[0].sqrt(), norms[1].sqrt()
    m, v = _moments(grads, exp_avg, exp_avg_sq, b1, b2, implementation == "foreach")
    u = _directions(m, v, params, steps, b1, b2, eps, decays)
    state_norms = squared_norms(u, m, v, dtype=dtype, layouts=layouts).sqrt()
    u_norms = state_norms[0]
    ratios = layer_trust_ratios(w_norms, u_norms, eta=1.0, adapt=list(adapt), grad_norms=g_norms)
    rates = lr * ratios
    factors = torch.ones_like(w_norms)
    checks = [("parameter norm", w_norms), ("gradient norm", g_norms), ("first moment norm", state_norms[1]),
              ("second moment norm", state_norms[2]), ("direction norm", u_norms)]
    if mean_norms is not None:  # reported, not used: LAMB has no per-sample term
        factors = clars_factors(lars_denominators(w_norms, g_norms, weight_decay=list(decays)),
                                clars_denominators(w_norms, mean_norms, weight_decay=list(decays)))
        checks.append(("mean per-sample gradient norm", mean_norms))
    limit = torch.tensor([torch.finfo(p.dtype).max for p in params], dtype=dtype, device=w_norms.device)
    new_bound = w_norms + rates * u_norms
    checks.append(("step size (the update would overflow)",
                   torch.where(torch.isfinite(new_bound) & (new_bound <= limit), rates, torch.full_like(rates, torch.inf))))
    finite = torch.stack([torch.isfinite(c).all() for _, c in checks]).all()
    diag = LayerDiagnostics(w_norms, g_norms, ratios, factors, rates, _frozen(lr), steps[0] if steps else 0)
    return LambPlan(diag, m, v, u, finite, tuple(checks))


def apply_lamb(params, exp_avg, exp_avg_sq, plan: LambPlan, ok: torch.Tensor | None = None) -> None:
    r"""Commit a :class:`LambPlan`: :math:`w_k \leftarrow w_k - \gamma_k u_k` and the new moments, in place.

    With ``ok`` (a 0-d bool tensor), the old values are kept where it is false (the sync-free skip).
    """
    rates = plan.diagnostics.rates
    for k, (p, m, v) in enumerate(zip(params, exp_avg, exp_avg_sq)):
        new_w = p - rates[k].to(p.dtype) * plan.directions[k]
        new_m, new_v = plan.exp_avg[k], plan.exp_avg_sq[k]
        if ok is not None:
            new_w, new_m, new_v = torch.where(ok, new_w, p), torch.where(ok, new_m, m), torch.where(ok, new_v, v)
        p.copy_(new_w)
        m.copy_(new_m)
        v.copy_(new_v)


def lamb(params, grads, exp_avg, exp_avg_sq, *, step, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
         adapt_mask=None, weight_decay_mask=None, foreach=None) -> LayerDiagnostics:
    r"""LAMB (You et al. 2019) on lists of tensors, in place; ``step`` is the number of steps already made.

    .. math:: w \leftarrow w - \gamma_t \frac{\|w\|}{\|u\|} u, \qquad
              u = \frac{\hat m}{\sqrt{\hat v} + \epsilon} + \lambda w

    Examples
    --------
    >>> import torch
    >>> w, g = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, -1.0]])
    >>> m, v = torch.zeros(1, 2), torch.zeros(1, 2)
    >>> round(float(lamb([w], [g], [m], [v], step=0, lr=0.1).trust_ratios[0]), 4)
    3.5355
    """
    adapt, decays = _masks(params, adapt_mask, weight_decay_mask, weight_decay)
    plan = plan_lamb(params, grads, exp_avg, exp_avg_sq, lr=lr, betas=betas, eps=eps, adapt=adapt, decays=decays,
                     steps=[step] * len(params), implementation=implementation(foreach, None))
    if not bool(plan.finite):
        raise lwrs.NonFiniteError(first_problem(plan.checks, [str(k) for k in range(len(params))]))
    apply_lamb(params, exp_avg, exp_avg_sq, plan)
    return plan.diagnostics
