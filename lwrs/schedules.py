r"""Learning-rate rules and schedules, as pure functions of the step.

A *schedule* is any callable ``step -> rate`` with ``step = 0, 1, 2, ...``
the number of updates made so far. Every optimizer in :mod:`lwrs.optimizers`
accepts a schedule wherever it accepts a learning rate. Given a Python int, a
schedule is plain Python (host) arithmetic and returns a float: no device work,
no synchronisation. Given a 0-d array (e.g. a traced step count under
``jax.jit`` or ``torch.compile``), the same schedule is array arithmetic in
that array's library (``where``, never a Python branch on its value) and
returns a 0-d floating array; an integer step is first converted to the
library's default floating dtype.

Batch-size scaling rules (:func:`linear_scaling`, :func:`sqrt_scaling`) return
a number, the peak rate, to be fed to a schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from array_api_compat import array_namespace, is_array_api_obj

from ._validation import check_hyperparameter, is_traced

__all__ = [
    "Schedule",
    "linear_scaling",
    "sqrt_scaling",
    "constant",
    "linear_warmup",
    "polynomial_decay",
    "cosine_decay",
    "step_decay",
    "join_schedules",
    "warmup_cosine",
    "warmup_polynomial",
    "tvlars_factor",
    "tvlars_factor_bounds",
    "tvlars_schedule",
    "as_schedule",
]

Schedule = Callable[[Any], Any]
"""A learning-rate schedule: a function from the step count (an int or a 0-d array) to a rate."""


def _steps(name: str, value: int, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_step(step: Any) -> Any:
    """An int step is checked; an array step becomes a 0-d floating array (its value is not read)."""
    if is_array_api_obj(step):
        xp = array_namespace(step)
        if step.ndim != 0:
            raise ValueError(f"a schedule's step must be an int or a 0-d array, got shape {tuple(step.shape)}")
        if xp.isdtype(step.dtype, "real floating"):
            return step
        return xp.astype(step, xp.asarray(0.0).dtype)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"a schedule's step must be an int >= 0, got {step!r}")
    return step


def _where(cond: Any, a: Any, b: Any, like: Any) -> Any:
    """``where(cond, a, b)`` for a 0-d array ``like``; Python numbers become arrays of its dtype."""
    xp = array_namespace(like)

    def arr(v: Any) -> Any:
        return v if is_array_api_obj(v) else xp.full_like(like, v)

    a, b = arr(a), arr(b)
    if a.dtype != like.dtype:
        a = xp.astype(a, like.dtype)
    if b.dtype != like.dtype:
        b = xp.astype(b, like.dtype)
    return xp.where(cond, a, b)


def _min(step: Any, bound: float) -> Any:
    """``min(step, bound)`` for an int or a 0-d array."""
    if is_array_api_obj(step):
        return _where(step < bound, step, float(bound), step)
    return min(step, bound)


def _batch_ratio(base_lr: float, batch_size: int, base_batch_size: int) -> tuple[float, float]:
    """Checked ``(base_lr, B / B_base)`` for the batch-size scaling rules."""
    base_lr = check_hyperparameter("base_lr", base_lr, low=0.0)
    _steps("batch_size", batch_size, minimum=1)
    _steps("base_batch_size", base_batch_size, minimum=1)
    return base_lr, batch_size / base_batch_size


def linear_scaling(base_lr: float, batch_size: int, base_batch_size: int) -> float:
    r"""The linear scaling rule: :math:`\gamma_{scale} = \gamma_{base} \cdot B / B_{base}`.

    References: Goyal et al. (2017); CLARS eq. (3), e.g. :math:`\gamma_{base} = 0.1`,
    :math:`B_{base} = 128` for ResNet on CIFAR-10.

    Examples
    --------
    >>> linear_scaling(0.1, 8192, 128)
    6.4
    """
    base_lr, ratio = _batch_ratio(base_lr, batch_size, base_batch_size)
    return base_lr * ratio


def sqrt_scaling(base_lr: float, batch_size: int, base_batch_size: int) -> float:
    r"""The square-root scaling rule: :math:`\gamma = \gamma_0 \sqrt{B / B_0}`.

    References: the TVLARS paper (2023), experimental setup; Krizhevsky (2014).

    Examples
    --------
    >>> sqrt_scaling(1.0, 1024, 256)
    2.0
    """
    base_lr, ratio = _batch_ratio(base_lr, batch_size, base_batch_size)
    return base_lr * math.sqrt(ratio)


def constant(value: float) -> Schedule:
    r"""The schedule :math:`\gamma_t = \gamma`.

    Examples
    --------
    >>> constant(0.5)(1000)
    0.5
    """
    value = check_hyperparameter("value", value, low=0.0)

    def schedule(step: Any) -> float:
        _check_step(step)
        return value

    return schedule


def linear_warmup(peak: float, warmup_steps: int, *, start: float = 0.0) -> Schedule:
    r"""Linear warm-up from ``start`` to ``peak`` over ``warmup_steps``, then ``peak``.

    .. math:: \gamma_t = \gamma_0 + (\gamma_{peak} - \gamma_0)\,\min(t / W, 1)

    References: Goyal et al. (2017), gradual warm-up.

    Examples
    --------
    >>> s = linear_warmup(1.0, 4)
    >>> [s(t) for t in range(6)]
    [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    peak = check_hyperparameter("peak", peak, low=0.0)
    start = check_hyperparameter("start", start, low=0.0)
    _steps("warmup_steps", warmup_steps)

    def schedule(step: Any) -> Any:
        step = _check_step(step)
        if warmup_steps == 0:
            return peak
        if is_array_api_obj(step):
            return _where(step >= warmup_steps, peak, start + (peak - start) * step / warmup_steps, step)
        if step >= warmup_steps:
            return peak
        return start + (peak - start) * step / warmup_steps

    return schedule


def polynomial_decay(init: float, total_steps: int, *, end: float = 0.0, power: float = 2.0) -> Schedule:
    r"""Polynomial decay from ``init`` to ``end`` over ``total_steps``, then ``end``.

    .. math:: \gamma_t = (\gamma_0 - \gamma_{end})\,(1 - \min(t, T)/T)^{p} + \gamma_{end}

    References: You, Gitman & Ginsburg (2017), LARS with polynomial decay
    (power 2); the TVLARS paper's no-warm-up LARS baseline.

    Examples
    --------
    >>> s = polynomial_decay(1.0, 10, power=1.0)
    >>> s(0), s(5), s(20)
    (1.0, 0.5, 0.0)
    """
    init = check_hyperparameter("init", init, low=0.0)
    end = check_hyperparameter("end", end, low=0.0)
    power = check_hyperparameter("power", power, low=0.0, low_open=True)
    _steps("total_steps", total_steps, minimum=1)

    def schedule(step: Any) -> Any:
        step = _check_step(step)
        frac = 1.0 - _min(step, total_steps) / total_steps
        return (init - end) * frac**power + end

    return schedule


def cosine_decay(init: float, total_steps: int, *, final: float = 0.0) -> Schedule:
    r"""Cosine decay from ``init`` to ``final`` over ``total_steps``, then ``final``.

    .. math:: \gamma_t = \gamma_{final} + (\gamma_0 - \gamma_{final})\,
              \tfrac12\big(1 + \cos(\pi \min(t, T) / T)\big)

    References: Loshchilov & Hutter (2017), SGDR.

    Examples
    --------
    >>> s = cosine_decay(1.0, 10)
    >>> s(0), round(s(5), 12), s(10)
    (1.0, 0.5, 0.0)
    """
    init = check_hyperparameter("init", init, low=0.0)
    final = check_hyperparameter("final", final, low=0.0)
    _steps("total_steps", total_steps, minimum=1)

    def schedule(step: Any) -> Any:
        step = _check_step(step)
        x = math.pi * _min(step, total_steps) / total_steps
        cos = array_namespace(step).cos(x) if is_array_api_obj(step) else math.cos(x)
        q = 0.5 * (1.0 + cos)
        return final + (init - final) * q

    return schedule


def step_decay(init: float, boundaries: Sequence[int], *, factor: float = 0.1) -> Schedule:
    r"""Multiply the rate by ``factor`` at each boundary step.

    .. math:: \gamma_t = \gamma_0 \cdot \phi^{\#\{b \in \text{boundaries} : b \le t\}}

    References: CLARS Figure 3 (rate 1.0, times 0.1 at epochs 60, 120 and 150).

    Examples
    --------
    >>> s = step_decay(1.0, [2, 4], factor=0.5)
    >>> [s(t) for t in range(5)]
    [1.0, 1.0, 0.5, 0.5, 0.25]
    """
    init = check_hyperparameter("init", init, low=0.0)
    factor = check_hyperparameter("factor", factor, low=0.0)
    bounds = sorted(_steps("boundary", b) for b in boundaries)

    def schedule(step: Any) -> Any:
        step = _check_step(step)
        if is_array_api_obj(step):
            count = 0.0
            for b in bounds:
                count = count + _where(step >= b, 1.0, 0.0, step)
            return init * factor**count
        return init * factor ** sum(1 for b in bounds if b <= step)

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    r"""Run ``schedules[i]`` from ``boundaries[i-1]`` on, restarting its step count at 0.

    .. math:: \gamma_t = s_i(t - b_{i-1}) \quad \text{for } b_{i-1} \le t < b_i,\ b_{-1} = 0

    Examples
    --------
    >>> s = join_schedules([constant(1.0), constant(2.0)], [3])
    >>> [s(t) for t in range(5)]
    [1.0, 1.0, 1.0, 2.0, 2.0]
    """
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(
            f"join_schedules needs one boundary fewer than schedules, got {len(schedules)} "
            f"schedules and {len(boundaries)} boundaries"
        )
    bounds = [_steps("boundary", b) for b in boundaries]
    if bounds != sorted(bounds):
        raise ValueError(f"boundaries must be increasing, got {bounds}")

    def schedule(step: Any) -> Any:
        step = _check_step(step)
        if is_array_api_obj(step):  # every piece on its own clock, the right one selected by where
            starts = [0, *bounds]
            value = schedules[-1](step - starts[-1])
            for s, start, b in reversed(list(zip(schedules, starts, bounds))):
                value = _where(step < b, s(step - start), value, step)
            return value
        start = 0
        for s, b in zip(schedules, bounds):
            if step < b:
                return s(step - start)
            start = b
        return schedules[-1](step - start)

    return schedule


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, *, final_fraction: float = 0.001) -> Schedule:
    r"""Linear warm-up from 0 to ``peak``, then cosine decay to ``final_fraction * peak``.

    .. math::

        \gamma_t = \begin{cases}
            \gamma_{peak}\, t / W & t < W \\
            \gamma_{peak}\big(f + (1 - f)\,\tfrac12(1 + \cos(\pi \tfrac{t - W}{T - W}))\big) & t \ge W
        \end{cases}

    The warm-up baseline of the TVLARS paper (taken from Barlow Twins, with
    :math:`f = 0.001`).

    Examples
    --------
    >>> s = warmup_cosine(1.0, 2, 4)
    >>> s(1), s(2), s(4)
    (0.5, 1.0, 0.001)
    """
    _steps("total_steps", total_steps, minimum=1)
    _steps("warmup_steps", warmup_steps)
    if warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be less than total_steps ({total_steps})")
    final_fraction = check_hyperparameter("final_fraction", final_fraction, low=0.0, high=1.0)
    decay = cosine_decay(peak, total_steps - warmup_steps, final=peak * final_fraction)
    return join_schedules([linear_warmup(peak, warmup_steps), decay], [warmup_steps])


def warmup_polynomial(
    peak: float, warmup_steps: int, total_steps: int, *, end: float = 0.0, power: float = 2.0
) -> Schedule:
    r"""Linear warm-up from 0 to ``peak``, then polynomial decay to ``end``.

    .. math::

        \gamma_t = \begin{cases}
            \gamma_{peak}\, t / W & t < W \\
            (\gamma_{peak} - \gamma_{end})(1 - \tfrac{t - W}{T - W})^p + \gamma_{end} & t \ge W
        \end{cases}

    The LARS recipe of the CLARS ImageNet runs (5 epochs of warm-up, then
    polynomial decay), after the MLPerf reference.

    Examples
    --------
    >>> s = warmup_polynomial(1.0, 2, 4, power=1.0)
    >>> [s(t) for t in range(5)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    _steps("total_steps", total_steps, minimum=1)
    _steps("warmup_steps", warmup_steps)
    if warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be less than total_steps ({total_steps})")
    decay = polynomial_decay(peak, total_steps - warmup_steps, end=end, power=power)
    return join_schedules([linear_warmup(peak, warmup_steps), decay], [warmup_steps])


def _tvlars_checked(decay_coefficient: float, delay_steps: float, alpha: float, gamma_min: float) -> tuple[float, ...]:
    return (
        check_hyperparameter("decay_coefficient", decay_coefficient, low=0.0),
        check_hyperparameter("delay_steps", delay_steps),
        check_hyperparameter("alpha", alpha, low=0.0, low_open=True),
        check_hyperparameter("gamma_min", gamma_min, low=0.0),
    )


def tvlars_factor(*, decay_coefficient: float, delay_steps: float, alpha: float = 1.0, gamma_min: float = 0.0) -> Schedule:
    r"""The TVLARS time-varying factor :math:`\phi_t`.

    .. math:: \phi_t = \frac{1}{\alpha + e^{\lambda (t - d_e)}} + \gamma_{\min}

    :math:`\lambda` (``decay_coefficient``) is the decay coefficient or soft temperature,
    :math:`d_e` (``delay_steps``) the delay, :math:`\alpha` sets the initial
    level, :math:`\gamma_{\min}` the floor. :math:`\phi_t` is non-increasing
    in :math:`t` and lies in the interval given by :func:`tvlars_factor_bounds`.
    The TVLARS rate of layer :math:`k` is
    :math:`\gamma_{target}\,\phi_t\,\eta\|w_k\| / (\|\bar g_k\| + \lambda_{wd}\|w_k\|)`.

    The paper sets :math:`\alpha = 1`. The official code's special case,
    :math:`1 / (0.1 + e^{\lambda (t + 1)})`, is ``alpha=0.1, gamma_min=0.0,
    delay_steps=-1``.

    References: TVLARS (2023), Algorithm 1 and eq. (8)-(9).

    Examples
    --------
    >>> phi = tvlars_factor(decay_coefficient=0.01, delay_steps=100)
    >>> round(phi(100), 6)     # half-way point when alpha = 1
    0.5
    """
    decay, delay_steps, alpha, gamma_min = _tvlars_checked(decay_coefficient, delay_steps, alpha, gamma_min)

    def schedule(step: Any) -> Any:
        step = _check_step(step)
        x = decay * (step - delay_steps)
        if is_array_api_obj(x):  # e = e^{-|x|} <= 1: neither branch can overflow
            xp = array_namespace(x)
            e = xp.exp(-xp.abs(x))
            return _where(x > 0, e / (alpha * e + 1.0), 1.0 / (alpha + e), x) + gamma_min
        if x > 0:  # 1 / (alpha + e^x) written so that e^x cannot overflow
            e = math.exp(-x)
            return e / (alpha * e + 1.0) + gamma_min
        return 1.0 / (alpha + math.exp(x)) + gamma_min

    return schedule


def tvlars_schedule(
    target: float | Schedule,
    *,
    decay_coefficient: float,
    delay_steps: float,
    alpha: float = 1.0,
    gamma_min: float = 0.0,
) -> Schedule:
    r"""The TVLARS global rate :math:`\gamma_t = \gamma_{target}(t)\,\phi_t`, with :math:`\phi_t` applied once.

    .. math:: \gamma_t = \gamma_{target}(t) \left(\frac{1}{\alpha + e^{\lambda (t - d_e)}} + \gamma_{\min}\right)

    ``target`` is a number or a schedule (checked like any learning rate).
    :func:`lwrs.tvlars` uses this schedule; the torch ``TVLARS`` class calls
    it with its group's ``lr``, so :math:`\phi_t` is multiplied in exactly once
    on every path.

    References: TVLARS (2023), Algorithm 1 and eq. (8)-(9).

    Examples
    --------
    >>> s = tvlars_schedule(2.0, decay_coefficient=0.01, delay_steps=0)
    >>> s(0)        # 2 * 1 / (1 + e^0)
    1.0
    """
    phi = tvlars_factor(decay_coefficient=decay_coefficient, delay_steps=delay_steps, alpha=alpha, gamma_min=gamma_min)
    rate = as_schedule("learning_rate", target)

    def schedule(step: Any) -> Any:
        return rate(step) * phi(step)

    return schedule


def tvlars_factor_bounds(
    *, decay_coefficient: float, delay_steps: float, alpha: float = 1.0, gamma_min: float = 0.0
) -> tuple[float, float]:
    r"""Lower and upper bounds of :math:`\phi_t` over :math:`t \ge 0`.

    .. math::

        \gamma_{\min} < \phi_t \le \phi_0 = \frac{1}{\alpha + e^{-\lambda d_e}} + \gamma_{\min}
        < \frac{1}{\alpha} + \gamma_{\min}

    (for :math:`\lambda = 0` the factor is constant and equals the upper bound).

    References: TVLARS (2023), eq. (9) and (12)-(14).

    Examples
    --------
    >>> tvlars_factor_bounds(decay_coefficient=0.01, delay_steps=0)
    (0.0, 0.5)
    """
    decay, delay_steps, alpha, gamma_min = _tvlars_checked(decay_coefficient, delay_steps, alpha, gamma_min)
    upper = tvlars_factor(decay_coefficient=decay, delay_steps=delay_steps, alpha=alpha, gamma_min=gamma_min)(0)
    return gamma_min, upper


def as_schedule(name: str, value: float | Schedule) -> Schedule:
    r"""A number becomes :func:`constant`; a callable is wrapped to check its output.

    The wrapped schedule raises ``ValueError`` naming ``name``, the step and
    the value when the schedule returns a negative or non-finite rate. For an
    array step (tracing), an array rate is returned unchecked: checking it would
    need its value on the host.

    .. math:: \gamma_t \in [0, \infty) \ \text{checked at every step } t

    Examples
    --------
    >>> as_schedule("learning_rate", 0.1)(7)
    0.1
    >>> as_schedule("learning_rate", lambda t: 1.0 - t)(3)
    Traceback (most recent call last):
    ...
    ValueError: learning_rate schedule returned -2.0 at step 3; rates must be finite and >= 0
    """
    if not callable(value):
        check_hyperparameter(name, value, low=0.0)
        return constant(value)

    def checked(step: Any) -> Any:
        rate = value(step)
        if is_array_api_obj(rate) and (is_array_api_obj(step) or is_traced(rate)):
            return rate  # an array step (tracing): array arithmetic, no host read
        try:
            rate = float(rate)
        except (TypeError, ValueError):
            raise TypeError(f"{name} schedule returned {rate!r} at step {step}; a number is needed") from None
        if not math.isfinite(rate) or rate < 0:
            raise ValueError(f"{name} schedule returned {rate!r} at step {step}; rates must be finite and >= 0")
        return rate

    return checked
