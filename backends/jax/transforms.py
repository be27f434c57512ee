r"""lwrs's optimizers as optax gradient transformations.

Each factory takes the options of the core factory of the same name
(:func:`lwrs.lars` and so on, same names and defaults) and returns an
:class:`optax.GradientTransformationExtraArgs`::

    opt = lwrs.backends.jax.lars(learning_rate=schedule, eta=1e-3, weight_decay=5e-4)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)          # CLARS: norm_stats=...
    params = optax.apply_updates(params, updates)

``params + updates`` is the core's step: the per-layer rates come from
:func:`lwrs.rates.layer_rates`, the mNAG increment from
:func:`lwrs.momentum.mnag_increments` (eq. 4), so every formula is the core's.
Layer :math:`k` is leaf :math:`k` of the params pytree in JAX's flattening
order. The update is traceable: ``jax.jit``, ``optax.chain``,
``optax.MultiSteps``, ``optax.masked`` and ``optax.inject_hyperparams`` work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import lwrs
from lwrs._validation import NonFiniteError
from lwrs.diagnostics import LayerDiagnostics
from lwrs.masks import adapt_default, weight_decay_default
from lwrs.moments import lamb_directions, lamb_moments, warn_float16
from lwrs.norm_statistics import mean_norms_checked
from lwrs.momentum import mnag_increments
from lwrs.nonfinite import all_finite, select, step_after, where_skipped_diagnostics
from lwrs.rates import TrustOptions, clars_denominators, clars_factors, lars_denominators, layer_norms
from lwrs.rates import layer_rates, layer_trust_ratios, statistics_dtype
from lwrs.schedules import tvlars_factor

from ._tree import Layers, flatten_params, is_traced, leaves_like, resolve_mask

__all__ = ["MomentumState", "LambState", "mnag", "lars", "clars", "tvlars", "lamb"]


class MomentumState(NamedTuple):
    r"""State of :func:`mnag`, :func:`lars`, :func:`clars` and :func:`tvlars`.

    Attributes
    ----------
    count : int32 array
        Number of updates made so far, :math:`t` (skipped steps do not count).
    trace : pytree
        :math:`d_{t-1}`, the trace of rate-scaled steps (see :mod:`lwrs.momentum`),
        with the structure of params.
    diagnostics : LayerDiagnostics
        Of the last update, as arrays: one entry per layer in leaf order.
    skipped_steps : int32 array
        Number of steps skipped so far by ``on_nonfinite="skip"`` (like
        ``optax.apply_if_finite``'s ``total_notfinite``); 0 under ``"raise"``.
        A count that keeps growing means training has stopped: see the
        ``optax.MultiSteps`` note in the JAX page of the docs.
    """

    count: Any
    trace: Any
    diagnostics: LayerDiagnostics
    skipped_steps: Any


class LambState(NamedTuple):
    """State of :func:`lamb`: the count, Adam's two moments (pytrees), the diagnostics and the skipped steps.

    The fields are those of :class:`MomentumState`, with the moments in place of the trace.
    """

    count: Any
    first_moment: Any
    second_moment: Any
    diagnostics: LayerDiagnostics
    skipped_steps: Any


def _schedule(value: Any) -> Callable[[Any], Any]:
    """A learning rate as a function of the step count: an optax schedule, or a constant."""
    if callable(value):
        return value
    if not is_traced(value):
        value = float(value)  # checked by the core factory (no str, no bool); a Python float keeps branches static
    return lambda count: value


@dataclass(frozen=True)
class _Config:
    name: str
    learning_rate: Any
    beta: Any = 0.0
    nesterov: bool = True
    weight_decay: Any = 0.0
    adapt_mask: Any = None
    weight_decay_mask: Any = None
    on_nonfinite: str = "raise"
    trust: TrustOptions = TrustOptions("none")
    tvlars: Callable[[Any], Any] | None = None


def _layer_setup(cfg: _Config, params: Any, updates: Any, norm_stats: Any):
    layers = flatten_params(params)
    grads = leaves_like(layers, updates, "updates")
    adapt = resolve_mask("adapt_mask", cfg.adapt_mask, layers, adapt_default)
    decay = resolve_mask("weight_decay_mask", cfg.weight_decay_mask, layers, weight_decay_default)
    if norm_stats is not None:
        count = len(layers.leaves)
        for field in ("sum_norms", "sum_squared_norms"):
            shape = tuple(getattr(norm_stats, field).shape)
            if shape != (count,):
                raise ValueError(f"norm_stats.{field} has shape {shape}, but params has {count} layers "
                                 "(one entry per leaf, in JAX's flattening order)")
    return layers, grads, adapt, decay


def _rate(cfg: _Config, count: Any, dtype: Any) -> Any:
    lr = cfg.learning_rate(count)
    if cfg.tvlars is not None:  # TVLARS: gamma_target(t) * phi_t, with the core's phi_t
        lr = lr * jnp.asarray(cfg.tvlars(count), dtype)
    return lr


# (name, lowest value, whether the lowest is excluded, upper bound excluded or None): the core's ranges,
# checked in the step when inject_hyperparams makes the value a traced array
_RANGES = {"learning_rate": (0.0, False, None), "beta": (0.0, False, 1.0), "eta": (0.0, True, None),
           "eps": (0.0, False, None), "weight_decay": (0.0, False, None), "beta1": (0.0, False, 1.0),
           "beta2": (0.0, False, 1.0)}


def _in_range(name: str, value: Any) -> Any:
    low, low_open, high = _RANGES[name]
    value = jnp.asarray(value)
    ok = jnp.isfinite(value) & ((value > low) if low_open else (value >= low))
    return ok if high is None else ok & (value < high)


def _nonfinite(cfg: _Config, layers: Layers, count: Any, checks: list[tuple[str, Any]],
               rates: list[tuple[str, Any]]) -> Any:
    """The step's finiteness flag; with ``"raise"``, raise (eagerly, or from the compiled step) naming the layer.

    ``rates`` are the step's learning rate (from the schedule) and the hyperparameters that are arrays
    (``optax.inject_hyperparams``): a step whose value is out of the core's range (non-finite, or a
    negative rate) is refused as the core refuses it ("raise") or skipped ("skip").
    """
    rates = [(name, v) for name, v in rates if name == "learning_rate" or hasattr(v, "dtype")]
    ok = all_finite([v for _, v in checks], xp=jnp)
    for name, value in rates:
        ok = ok & _in_range(name, value)
    if cfg.on_nonfinite == "skip":
        return ok

    def report(ok, step, *values):
        if bool(ok):
            return
        for (name, _), v in zip(rates, values[len(checks):]):
            if not bool(_in_range(name, v)):
                v = float(v)
                if name == "learning_rate":
                    raise ValueError(f"learning_rate schedule returned {v!r} at step {int(step)}; "
                                     "rates must be finite and >= 0")
                raise ValueError(f"{name} is {v!r} at step {int(step)}, out of its range")
        for (what, _), vals in zip(checks, values):
            for name, v in zip(layers.names, vals.tolist()):
                if v != v or v in (float("inf"), float("-inf")):
                    raise NonFiniteError(f"layer {name}: {what} is not finite (value {v!r}) at step {int(step)}; "
                                         "pass on_nonfinite='skip' to skip such steps")
        raise NonFiniteError(f"a value is not finite at step {int(step)}")  # pragma: no cover

    values = [v for _, v in checks] + [jnp.asarray(v) for _, v in rates]
    if is_traced(ok, count):
        jax.debug.callback(report, ok, count, *values)
    else:
        report(ok, count, *[jax.device_get(v) for v in values])
    return None


def _skip(ok: Any, new: Any, old: Any) -> list[Any]:
    """The skip policy's selection (the core's), or ``new`` when there is no skip flag."""
    return list(new) if ok is None else list(select(ok, new, old, xp=jnp))


def _count_after(ok: Any, count: Any) -> Any:
    return count + 1 if ok is None else step_after(ok, count, xp=jnp)


def _skipped_after(ok: Any, skipped: Any) -> Any:
    return skipped if ok is None else skipped + jnp.where(ok, 0, 1).astype(skipped.dtype)


def _diagnostics(ok, w_norms, g_norms, ratios, factors, rates, lr, count) -> LayerDiagnostics:
    diag = LayerDiagnostics(w_norms, g_norms, ratios, factors, rates, jnp.asarray(lr, w_norms.dtype),
                            jnp.asarray(count, jnp.int32), jnp.asarray(False))
    return diag if ok is None else where_skipped_diagnostics(ok, diag)


def _initial_diagnostics(params: Any) -> LayerDiagnostics:
    layers = flatten_params(params)
    dtype = statistics_dtype(jnp, [w.dtype for w in layers.leaves])
    zeros = jnp.zeros((len(layers.leaves),), dtype)
    return LayerDiagnostics(zeros, zeros, zeros + 1, zeros + 1, zeros, jnp.zeros((), dtype),
                            jnp.zeros((), jnp.int32), jnp.asarray(False))


def _is_zero(value: Any) -> bool:
    return not is_traced(value) and float(value) == 0.0


def _momentum_transform(cfg: _Config) -> optax.GradientTransformationExtraArgs:
    def init(params: Any) -> MomentumState:
        trace = jax.tree.map(jnp.zeros_like, params)
        return MomentumState(jnp.zeros([], jnp.int32), trace, _initial_diagnostics(params), jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, norm_stats=None, **extra_args):
        del extra_args
        layers, grads, adapt, decay = _layer_setup(cfg, params, updates, norm_stats)
        if cfg.trust.kind == "clars" and norm_stats is None:
            raise ValueError("clars needs norm_stats=, the per-sample gradient-norm statistics of this batch "
                             "(see lwrs.backends.jax.grad_and_norm_statistics)")
        trace = leaves_like(layers, state.trace, "state.trace")
        params_ = layers.leaves
        w_norms, g_norms = layer_norms(params_, xp=jnp), layer_norms(grads, xp=jnp)
        checks = [("parameter norm", w_norms), ("gradient norm", g_norms)]
        mean_norms = None
        if norm_stats is not None:
            mean_norms = mean_norms_checked(jnp, norm_stats, w_norms.dtype, layers.names)
            checks.append(("mean per-sample gradient norm", mean_norms))
        lr = _rate(cfg, state.count, w_norms.dtype)
        hypers = [("learning_rate", lr), ("beta", cfg.beta), ("eta", cfg.trust.eta), ("eps", cfg.trust.eps),
                  ("weight_decay", cfg.weight_decay)]
        ok = _nonfinite(cfg, layers, state.count, checks, hypers)

        wd = cfg.weight_decay
        decay = tuple(d and not _is_zero(wd) for d in decay)
        decays = tuple(wd if d else 0.0 for d in decay)
        # g + lambda w on the decayed layers (the direction of CLARS eq. 2 with L2 weight decay)
        directions = tuple(g + wd * w if d else g for w, g, d in zip(params_, grads, decay))
        direction_norms = None
        if cfg.trust.weight_decay_form == "norm_of_sum" and any(decay):
            direction_norms = layer_norms(directions, xp=jnp)
        ratios, factors, rates = layer_rates(w_norms, g_norms, learning_rate=lr, options=cfg.trust, adapt=adapt,
                                             weight_decays=decays, direction_norms=direction_norms,
                                             mean_norms=mean_norms)
        increments, new_trace = mnag_increments(directions, trace, rates, beta=cfg.beta, nesterov=cfg.nesterov, xp=jnp)
        increments = _skip(ok, increments, [0.0] * len(increments))
        new_state = MomentumState(
            _count_after(ok, state.count),
            layers.treedef.unflatten(_skip(ok, new_trace, trace)),
            _diagnostics(ok, w_norms, g_norms, ratios, factors, rates, lr, state.count),
            _skipped_after(ok, state.skipped_steps),
        )
        return layers.treedef.unflatten(increments), new_state

    return optax.GradientTransformationExtraArgs(init, update)


def _validated(core_factory: Callable, learning_rate: Any, **options: Any) -> None:
    """Check the options with the core factory (same errors), unless some are traced."""
    numbers = [v for v in options.values() if not isinstance(v, (str, bool)) and v is not None and not callable(v)]
    if is_traced(learning_rate, *numbers):
        return
    core_factory(learning_rate, **{k: (float(v) if hasattr(v, "dtype") else v) for k, v in options.items()})


def mnag(learning_rate, *, beta=0.9, nesterov=True, weight_decay=0.0, weight_decay_mask=None, on_nonfinite="raise"):
    r"""mNAG (CLARS eq. 2/4) as an optax transformation: one rate for every layer.

    .. math:: d_t = \beta d_{t-1} - \gamma_t (\bar g_t + \lambda w_t), \qquad
              \Delta w = -\gamma_t (\bar g_t + \lambda w_t) + \beta d_t

    Options as in :func:`lwrs.mnag`; ``learning_rate`` may be an :class:`optax.Schedule`.

    References: Huo, Gu & Huang (2021), AAAI, eq. (2) and Theorem 2.

    Examples
    --------
    >>> import jax.numpy as jnp, optax
    >>> from lwrs.backends import jax as lj
    >>> opt = lj.mnag(0.1, beta=0.9)
    >>> params = {"w": jnp.array([1.0])}
    >>> updates, state = opt.update({"w": jnp.array([1.0])}, opt.init(params), params)
    >>> print(updates["w"])          # the first step moves (1 + beta) * lr * g
    [-0.19]
    """
    options = dict(beta=beta, nesterov=nesterov, weight_decay=weight_decay, on_nonfinite=on_nonfinite)
    _validated(lwrs.mnag, learning_rate, **options)
    return _momentum_transform(_Config("mnag", _schedule(learning_rate), beta, nesterov, weight_decay, None,
                                       weight_decay_mask, on_nonfinite))


def _trust_options(kind, eta, eps, max_ratio, larc_clip, weight_decay_form) -> TrustOptions:
    return TrustOptions(kind, eta, eps, max_ratio, bool(larc_clip), weight_decay_form)


def lars(learning_rate, *, beta=0.9, eta=0.001, weight_decay=0.0, weight_decay_form="sum_of_norms", eps=0.0,
         max_ratio=None, larc_clip=False, adapt_mask=None, weight_decay_mask=None, nesterov=True, on_nonfinite="raise"):
    r"""LARS on mNAG as an optax transformation.

    .. math:: \gamma_k = \gamma_t\,\eta\,\frac{\|w_k\|}{D_k + \epsilon}, \qquad
              D_k = \|\bar g_k\| + \lambda\|w_k\| \ \text{or}\ \|\bar g_k + \lambda w_k\|

    then the mNAG increment of :func:`mnag` with rate :math:`\gamma_k`. Options
    as in :func:`lwrs.lars` (same names and defaults); masks may also be
    pytrees of bools with the structure of params. ``optax.lars`` is
    ``weight_decay_form="norm_of_sum"``, ``adapt_mask=lambda w: True`` and
    ``nesterov=False`` (its default) with ``momentum`` as ``beta`` and
    ``trust_coefficient`` as ``eta``; the two differ only on layers whose raw
    gradient is exactly zero.

    References: You, Gitman & Ginsburg (2017); Huo, Gu & Huang (2021), AAAI, eq. (3).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from lwrs.backends import jax as lj
    >>> opt = lj.lars(1.0, eta=0.5, beta=0.0)
    >>> params = {"w": jnp.array([[3.0, 4.0]])}
    >>> updates, state = opt.update({"w": jnp.array([[0.0, 10.0]])}, opt.init(params), params)
    >>> print(state.diagnostics.rates)          # 1.0 * 0.5 * 5 / 10
    [0.25]
    """
    options = dict(beta=beta, eta=eta, weight_decay=weight_decay, weight_decay_form=weight_decay_form, eps=eps,
                   max_ratio=max_ratio, larc_clip=larc_clip, nesterov=nesterov, on_nonfinite=on_nonfinite)
    _validated(lwrs.lars, learning_rate, **options)
    trust = _trust_options("lars", eta, eps, max_ratio, larc_clip, weight_decay_form)
    return _momentum_transform(_Config("lars", _schedule(learning_rate), beta, nesterov, weight_decay, adapt_mask,
                                       weight_decay_mask, on_nonfinite, trust))


def clars(learning_rate, *, beta=0.9, eta=0.01, weight_decay=0.0, weight_decay_form="sum_of_norms", eps=0.0,
          max_ratio=None, larc_clip=False, adapt_mask=None, weight_decay_mask=None, nesterov=True,
          on_nonfinite="raise"):
    r"""CLARS on mNAG as an optax transformation; ``update`` needs ``norm_stats=``.

    .. math:: \gamma_k = \gamma_t\,\eta\,\frac{\|w_k\|}{\frac1B\sum_i\|g_{ik}\| + \lambda\|w_k\| + \epsilon}

    then the mNAG increment. Options as in :func:`lwrs.clars`. Pass the batch's
    :class:`lwrs.NormStatistics` (one entry per leaf of params, in JAX's
    flattening order) as ``update(grads, state, params, norm_stats=stats)``,
    e.g. from :func:`~lwrs.backends.jax.grad_and_norm_statistics`; through
    ``optax.chain`` the keyword reaches this transformation. Clipping the
    gradient before CLARS (``optax.clip_by_global_norm``) changes
    :math:`\bar g_k` but not the statistics.

    References: Huo, Gu & Huang (2021), AAAI, eq. (5) and Algorithm 1.

    Examples
    --------
    >>> import jax.numpy as jnp, lwrs
    >>> from lwrs.backends import jax as lj
    >>> opt = lj.clars(1.0, eta=1.0)
    >>> params = {"w": jnp.array([[1.0, 0.0]])}
    >>> stats = lwrs.NormStatistics(jnp.array([5.0]), jnp.array([25.0]), 2)   # |g_1| = 5, |g_2| = 0
    >>> _, state = opt.update({"w": jnp.array([[1.5, 2.0]])}, opt.init(params), params, norm_stats=stats)
    >>> print(state.diagnostics.clars_factors, state.diagnostics.rates)   # |mean g| = 2.5, mean |g_i| = 2.5
    [1.] [0.4]
    """
    options = dict(beta=beta, eta=eta, weight_decay=weight_decay, weight_decay_form=weight_decay_form, eps=eps,
                   max_ratio=max_ratio, larc_clip=larc_clip, nesterov=nesterov, on_nonfinite=on_nonfinite)
    _validated(lwrs.clars, learning_rate, **options)
    trust = _trust_options("clars", eta, eps, max_ratio, larc_clip, weight_decay_form)
    return _momentum_transform(_Config("clars", _schedule(learning_rate), beta, nesterov, weight_decay, adapt_mask,
                                       weight_decay_mask, on_nonfinite, trust))


def tvlars(learning_rate, *, decay_coefficient, delay_steps, alpha=1.0, gamma_min=0.0, beta=0.9, eta=0.001,
           weight_decay=0.0, weight_decay_form="sum_of_norms", eps=0.0, adapt_mask=None, weight_decay_mask=None,
           nesterov=True, on_nonfinite="raise"):
    r"""TVLARS as an optax transformation: LARS with the global rate :math:`\gamma_{target}\,\phi_t`.

    .. math:: \phi_t = \frac{1}{\alpha + e^{\lambda (t - d_e)}} + \gamma_{\min}, \qquad
              \gamma_k = \gamma_{target}\,\phi_t\,\eta\,\frac{\|w_k\|}{\|\bar g_k\| + \lambda_{wd}\|w_k\|}

    Options as in :func:`lwrs.tvlars` (``decay_coefficient`` is :math:`\lambda`,
    ``delay_steps`` is :math:`d_e`); :math:`\phi_t` is :func:`lwrs.schedules.tvlars_factor`.

    References: TVLARS (2023), Algorithm 1 and eq. (8)-(9).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from lwrs.backends import jax as lj
    >>> opt = lj.tvlars(1.0, decay_coefficient=0.01, delay_steps=0, eta=1.0, beta=0.0)
    >>> params = {"w": jnp.array([[1.0]])}
    >>> _, state = opt.update({"w": jnp.array([[1.0]])}, opt.init(params), params)
    >>> print(state.diagnostics.learning_rate)       # phi_0 = 1 / (1 + e^0)
    0.5
    """
    if is_traced(decay_coefficient, delay_steps, alpha, gamma_min):
        raise TypeError("tvlars's decay_coefficient, delay_steps, alpha and gamma_min fix the shape of its schedule "
                        "and must be numbers, not traced arrays; with optax.inject_hyperparams, pass "
                        "static_args=('decay_coefficient', 'delay_steps', 'alpha', 'gamma_min')")
    options = dict(decay_coefficient=decay_coefficient, delay_steps=delay_steps, alpha=alpha, gamma_min=gamma_min,
                   beta=beta, eta=eta, weight_decay=weight_decay, weight_decay_form=weight_decay_form, eps=eps,
                   nesterov=nesterov, on_nonfinite=on_nonfinite)
    _validated(lwrs.tvlars, learning_rate, **options)
    trust = _trust_options("lars", eta, eps, None, False, weight_decay_form)
    phi = tvlars_factor(decay_coefficient=decay_coefficient, delay_steps=delay_steps, alpha=alpha, gamma_min=gamma_min)
    return _momentum_transform(_Config("tvlars", _schedule(learning_rate), beta, nesterov, weight_decay, adapt_mask,
                                       weight_decay_mask, on_nonfinite, trust, phi))


def lamb(learning_rate, *, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0, adapt_mask=None, weight_decay_mask=None,
         on_nonfinite="raise"):
    r"""LAMB as an optax transformation.

    .. math::

        m_t = \beta_1 m_{t-1} + (1-\beta_1)\bar g_t, \quad v_t = \beta_2 v_{t-1} + (1-\beta_2)\bar g_t^2, \quad
        u_t = \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon} + \lambda w_t, \quad
        \Delta w = -\gamma_t \frac{\|w_k\|}{\|u_k\|} u_t

    Options as in :func:`lwrs.lamb`; the ratio is :func:`lwrs.rates.layer_trust_ratios`
    with :math:`\eta = 1`.

    References: You et al. (2019), *Large Batch Optimization for Deep Learning:
    Training BERT in 76 minutes*, Algorithm 2.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from lwrs.backends import jax as lj
    >>> opt = lj.lamb(0.1)
    >>> params = {"w": jnp.array([[3.0, 4.0]])}
    >>> _, state = opt.update({"w": jnp.array([[1.0, -1.0]])}, opt.init(params), params)
    >>> round(float(state.diagnostics.trust_ratios[0]), 2)       # |w| / |u| with u ~ sign(g)
    3.54
    """
    options = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, on_nonfinite=on_nonfinite)
    _validated(lwrs.lamb, learning_rate, **options)
    cfg = _Config("lamb", _schedule(learning_rate), 0.0, True, weight_decay, adapt_mask, weight_decay_mask,
                  on_nonfinite)

    def init(params: Any) -> LambState:
        warn_float16([x.dtype for x in jax.tree.leaves(params)])
        zeros = jax.tree.map(jnp.zeros_like, params)
        return LambState(jnp.zeros([], jnp.int32), zeros, zeros, _initial_diagnostics(params), jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, norm_stats=None, **extra_args):
        del extra_args
        layers, grads, adapt, decay = _layer_setup(cfg, params, updates, norm_stats)
        m_old = leaves_like(layers, state.first_moment, "state.first_moment")
        v_old = leaves_like(layers, state.second_moment, "state.second_moment")
        params_ = layers.leaves
        w_norms, g_norms = layer_norms(params_, xp=jnp), layer_norms(grads, xp=jnp)
        checks = [("parameter norm", w_norms), ("gradient norm", g_norms)]
        factors = jnp.ones_like(w_norms)
        decays = [weight_decay if d else 0.0 for d in decay]
        if norm_stats is not None:  # reported, not used: LAMB has no per-sample term
            mean_norms = mean_norms_checked(jnp, norm_stats, w_norms.dtype, layers.names)
            checks.append(("mean per-sample gradient norm", mean_norms))
            factors = clars_factors(lars_denominators(w_norms, g_norms, weight_decay=decays),
                                    clars_denominators(w_norms, mean_norms, weight_decay=decays))
        lr = cfg.learning_rate(state.count)
        hypers = [("learning_rate", lr), ("beta1", beta1), ("beta2", beta2), ("eps", eps),
                  ("weight_decay", weight_decay)]
        ok = _nonfinite(cfg, layers, state.count, checks, hypers)
        m, v = lamb_moments(grads, m_old, v_old, beta1=beta1, beta2=beta2, xp=jnp)
        u = lamb_directions(m, v, params_, step=(state.count + 1).astype(w_norms.dtype), beta1=beta1, beta2=beta2,
                            eps=eps, weight_decays=decays, xp=jnp)
        ratios = layer_trust_ratios(w_norms, layer_norms(u, xp=jnp), eta=1.0, adapt=adapt, grad_norms=g_norms)
        rates = lr * ratios
        increments = [-rates[k].astype(w.dtype) * uk for k, (w, uk) in enumerate(zip(params_, u))]
        increments = _skip(ok, increments, [0.0] * len(increments))
        new_state = LambState(
            _count_after(ok, state.count),
            layers.treedef.unflatten(_skip(ok, m, m_old)),
            layers.treedef.unflatten(_skip(ok, v, v_old)),
            _diagnostics(ok, w_norms, g_norms, ratios, factors, rates, lr, state.count),
            _skipped_after(ok, state.skipped_steps),
        )
        return layers.treedef.unflatten(increments), new_state

    return optax.GradientTransformationExtraArgs(init, update)
