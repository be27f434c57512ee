"""lwrs: layer-wise rate scaling.

LARS, CLARS, TVLARS, LAMB and the mNAG update they share, written once against
the array API standard. Every optimizer is a pair of pure functions::

    import lwrs
    opt = lwrs.clars(learning_rate=1.0)
    state = opt.init(params)
    params, state, diagnostics = opt.step(params, grads, state, norm_stats=stats)

The core imports no array library; it is tested on NumPy, PyTorch, JAX and
array-api-strict arrays (CuPy only where a GPU is present). Fast backends live in
:mod:`lwrs.backends`.
"""

from . import masks, moments, momentum, nonfinite, norm_statistics, pytree, rates, schedules, table
from ._validation import NonFiniteError
from .diagnostics import LayerDiagnostics
from .momentum import block_microstep, mnag_increments, momentum_step, velocity_from_trace, zeros_like_layers
from .base import LambState, MomentumState, Optimizer, StepResult
from .optimizers import clars, lamb, lars, mgd, mnag, tvlars
from .norm_statistics import (
    NormStatistics,
    gradient_variance_ratio,
    merge_statistics,
    minibatch_gradients,
    per_sample_norm_statistics,
    subsample_norm_statistics,
)
from .rates import clars_denominators, clars_factors, lars_denominators, layer_norms, layer_rates, layer_trust_ratios

__version__ = "0.1.0"

__all__ = [
    "NonFiniteError",
    "LayerDiagnostics",
    "LambState",
    "MomentumState",
    "NormStatistics",
    "Optimizer",
    "StepResult",
    "block_microstep",
    "clars",
    "clars_denominators",
    "clars_factors",
    "gradient_variance_ratio",
    "lamb",
    "lars",
    "lars_denominators",
    "layer_norms",
    "layer_rates",
    "layer_trust_ratios",
    "masks",
    "merge_statistics",
    "mgd",
    "minibatch_gradients",
    "mnag",
    "mnag_increments",
    "moments",
    "momentum",
    "momentum_step",
    "nonfinite",
    "norm_statistics",
    "per_sample_norm_statistics",
    "pytree",
    "rates",
    "schedules",
    "subsample_norm_statistics",
    "table",
    "tvlars",
    "velocity_from_trace",
    "zeros_like_layers",
]
