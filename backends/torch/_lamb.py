r"""LAMB's kernels for the torch optimizers (reference per tensor, foreach), tested against :func:`lwrs.lamb`.

The new moments and the direction are formed out of place and committed only after the
step's checks pass, so a step that finds a non-finite value changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

import lwrs
from lwrs.diagnostics import LayerDiagnostics
from lwrs.trust_ratios import clars_denominators, clars_factors, lars_denominators, trust_ratios

from .functional import _stat_dtype, first_problem, implementation, squared_norms

__all__ = ["LambPlan", "plan_lamb", "apply_lamb", "lamb"]


class LambPlan(NamedTuple):
    """What :func:`plan_lamb` computed for one group, committed by :func:`apply_lamb`."""

    diagnostics: LayerDiagnostics
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]
    directions: list[torch.Tensor]
    finite: torch.Tensor
    checks: tuple[tuple[str, torch.Tensor], ...]


def _moments(grads, exp_avg, exp_avg_sq, b1, b2, foreach):
    if foreach:
        m = torch._foreach_mul(exp_avg, b1)
        torch._foreach_add_(m, grads, alpha=1.0 - b1)
        v = torch._foreach_mul(exp_avg_sq, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1.0 - b2)
        return m, v
    return ([b1 * mk + (1.0 - b1) * g for mk, g in zip(exp_avg, grads)],
            [b2 * vk + (1.0 - b2) * (g * g) for vk, g in zip(exp_avg_sq, grads)])


def plan_lamb(params, grads, exp_avg, exp_avg_sq, *, lr: Any, betas: tuple[float, float], eps: float,
              adapt: Sequence[bool], decays: Sequence[float], steps: Sequence[Any], mean_norms: Any = None,
              implementation: str = "foreach") -> LambPlan:
    r"""LAMB's moments, direction and per-layer rates for one group (no side effect).

    .. math::

        m &= \beta_1 m + (1-\beta_1) g, \quad v = \beta_2 v + (1-\beta_2) g^2, \quad
        u = \frac{m / (1-\beta_1^{t})}{\sqrt{v / (1-\beta_2^{t})} + \epsilon} + \lambda w, \\
        \gamma_k &= \gamma_t \frac{\|w_k\|}{\|u_k\|}

    (You et al. 2019, Algorithm 2); ``steps`` holds each layer's :math:`t - 1`.
    """
    b1, b2 = betas
    dtype = _stat_dtype(params)
    norms = squared_norms(params, grads, implementation="foreach" if implementation == "fused" else implementation)
    w_norms, g_norms = norms[0].sqrt(), norms[1].sqrt()
    m, v = _moments(grads, exp_avg, exp_avg_sq, b1, b2, implementation == "foreach")
    u = []
    for mk, vk, w, lam, t in zip(m, v, params, decays, steps):
        c1, c2 = 1.0 - b1 ** (t + 1), 1.0 - b2 ** (t + 1)
        uk = (mk / c1) / ((vk / c2).sqrt() + eps)
        u.append(uk + lam * w if lam else uk)
    state_norms = squared_norms(u, m, v, dtype=dtype).sqrt()
    u_norms = state_norms[0]
    ratios = trust_ratios(w_norms, u_norms, eta=1.0, adapt=list(adapt), grad_norms=g_norms)
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
    diag = LayerDiagnostics(w_norms, g_norms, ratios, factors, rates, lr, steps[0] if steps else 0)
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
         adapt_mask=None, decay_mask=None, foreach=None) -> LayerDiagnostics:
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
    adapt = [p.ndim > 1 for p in params] if adapt_mask is None else list(adapt_mask)
    decays = [weight_decay if (decay_mask is None or d) else 0.0 for d in (decay_mask or [True] * len(params))]
    plan = plan_lamb(params, grads, exp_avg, exp_avg_sq, lr=lr, betas=betas, eps=eps, adapt=adapt, decays=decays,
                     steps=[step] * len(params), implementation=implementation(foreach, None))
    if not bool(plan.finite):
        raise lwrs.NonFiniteError(first_problem(plan.checks, [str(k) for k in range(len(params))]))
    apply_lamb(params, exp_avg, exp_avg_sq, plan)
    return plan.diagnostics
