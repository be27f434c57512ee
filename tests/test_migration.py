"""The migration page's equivalences (docs/migration.rst), each against the peer itself.

Every stated equivalence runs the peer and lwrs side by side for 20 steps in float32 on the
conformance kit's problems (gradients taken at each optimizer's own weights) and agrees to 1e-6
(every element of every layer at every step: |peer - lwrs| <= 1e-6 (1 + the layer's largest |lwrs|)).
Every stated mismatch is shown to exceed 1e-3.
timm's Lars is loaded from its file (timm's own import needs torchvision); apex is not installable
here, so its test skips.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lwrs
from lwrs.backends.torch import LARS, MNAG
from lwrs.backends.torch.conformance import load_apex_larc, load_timm_lars
from lwrs.testing import battery

PROBLEMS = {p.name: p for p in battery(steps=20)}
TOL = 1e-6


def torch_run(make, problem, lr_scale=1.0):
    """Weights after every step, as float64 NumPy arrays, of a torch optimizer in float32 (rates times ``lr_scale``)."""
    params = [torch.nn.Parameter(w) for w in problem.initial_params(torch, torch.float32)]
    opt = make(params, problem)
    out = []
    for t in range(problem.steps):
        with torch.no_grad():
            grads = problem.gradients(t, [p.detach() for p in params])
        for p, g in zip(params, grads):
            p.grad = g
        for group in opt.param_groups:
            group["lr"] = lr_scale * problem.learning_rates[t]
        opt.step()
        out.append([p.detach().double().numpy().copy() for p in params])
    return out


def worst_error(a, b):
    """max |a - b| / (1 + max |b|) per layer, the largest over every step and layer (a float32 ulp is ~6e-8)."""
    return max(float(np.max(np.abs(x - y)) / (1.0 + np.max(np.abs(y)))) for sa, sb in zip(a, b) for x, y in zip(sa, sb))


def lr0(problem):
    return problem.learning_rates[0]


# ---- timm ----------------------------------------------------------------------------------------

def timm(**options):
    Lars = load_timm_lars()
    return lambda params, p: Lars(params, lr=lr0(p), momentum=p.beta, weight_decay=p.weight_decay,
                                  trust_coeff=p.eta, **options)


def lwrs_for_timm(nesterov=False, trust_clip=False, eps=1e-8):
    return lambda params, p: LARS(params, lr=lr0(p), momentum=p.beta, eta=p.eta, weight_decay=p.weight_decay,
                                  eps=eps, nesterov=nesterov, larc_clip=trust_clip, exclude_1d=False)


TIMM_MATCH = ["mlp", "zero_init", "zero_gradient", "near_equilibrium", "large_lr"]


@pytest.mark.parametrize("problem", TIMM_MATCH)
@pytest.mark.parametrize("nesterov", [False, True])
def test_timm_lars_is_lwrs_lars_with_its_options(problem, nesterov):
    p = PROBLEMS[problem]
    assert worst_error(torch_run(timm(nesterov=nesterov), p), torch_run(lwrs_for_timm(nesterov), p)) <= TOL


@pytest.mark.parametrize("problem", ["mlp", "zero_gradient", "near_equilibrium"])
def test_timm_trust_clip_is_lwrs_larc_clip(problem):
    p = PROBLEMS[problem]
    assert worst_error(torch_run(timm(trust_clip=True), p), torch_run(lwrs_for_timm(trust_clip=True), p)) <= TOL


def test_timm_trust_clip_differs_at_zero_norm_layers_when_lr_exceeds_one():
    p = PROBLEMS["large_lr"]  # lr 1.5, fc1.weight starts at 0: timm's ratio is min(1 / lr, 1), lwrs's is 1
    assert worst_error(torch_run(timm(trust_clip=True), p), torch_run(lwrs_for_timm(trust_clip=True), p)) > 1e-3


def test_timm_without_weight_decay_adapts_nothing_unless_always_adapt():
    p = PROBLEMS["no_weight_decay"]
    sgd = torch_run(lambda params, q: MNAG(params, lr=lr0(q), momentum=q.beta, nesterov=False), p)
    assert worst_error(torch_run(timm(), p), sgd) <= TOL
    assert worst_error(torch_run(timm(always_adapt=True), p), torch_run(lwrs_for_timm(), p)) <= TOL
    assert worst_error(torch_run(timm(), p), torch_run(lwrs_for_timm(), p)) > 1e-3


def test_timm_cannot_be_matched_with_a_varying_lr():
    p = PROBLEMS["varying_lr"]  # timm keeps the lr outside the buffer; lwrs inside (CLARS eq. 4)
    assert worst_error(torch_run(timm(), p), torch_run(lwrs_for_timm(), p)) > 1e-3


def test_timm_dampening_cannot_be_matched_even_with_a_scaled_lr():
    p = PROBLEMS["mlp"]  # timm damps every update but the first; lwrs has no dampening
    got = torch_run(timm(dampening=0.5), p)
    for scale in (1.0, 0.5):
        assert worst_error(got, torch_run(lwrs_for_timm(), p, lr_scale=scale)) > 1e-3


# ---- pytorch_optimizer ---------------------------------------------------------------------------

def pytorch_optimizer(**options):
    from pytorch_optimizer import LARS as PeerLARS

    return lambda params, p: PeerLARS(params, lr=lr0(p), momentum=p.beta, weight_decay=p.weight_decay,
                                      trust_coefficient=p.eta, **options)


def lwrs_for_pytorch_optimizer(nesterov=False):
    return lambda params, p: LARS(params, lr=lr0(p), momentum=p.beta, eta=p.eta, weight_decay=p.weight_decay,
                                  nesterov=nesterov, exclude_1d=True, decay_1d=False)


@pytest.mark.parametrize("problem", ["mlp", "no_weight_decay", "zero_init", "near_equilibrium", "large_lr"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_pytorch_optimizer_lars_is_lwrs_lars_with_its_options(problem, nesterov):
    p = PROBLEMS[problem]
    got = torch_run(pytorch_optimizer(nesterov=nesterov), p)
    assert worst_error(got, torch_run(lwrs_for_pytorch_optimizer(nesterov), p)) <= TOL


@pytest.mark.parametrize("problem", ["zero_gradient", "varying_lr"])
def test_pytorch_optimizer_cannot_be_matched_at_zero_gradients_or_with_a_varying_lr(problem):
    p = PROBLEMS[problem]  # ratio eta/lambda at a zero gradient (lwrs: 1); lr outside the buffer
    assert worst_error(torch_run(pytorch_optimizer(), p), torch_run(lwrs_for_pytorch_optimizer(), p)) > 1e-3


@pytest.mark.parametrize("problem", ["mlp", "no_weight_decay", "zero_init"])
def test_pytorch_optimizer_dampening_is_a_scaled_lr_without_nesterov_only(problem):
    p = PROBLEMS[problem]  # pytorch_optimizer damps every update, the first too (its buffer starts at zero)
    got = torch_run(pytorch_optimizer(dampening=0.5), p)
    assert worst_error(got, torch_run(lwrs_for_pytorch_optimizer(), p)) > 1e-3
    assert worst_error(got, torch_run(lwrs_for_pytorch_optimizer(), p, lr_scale=0.5)) <= TOL
    nesterov = torch_run(pytorch_optimizer(dampening=0.5, nesterov=True), p)  # undamped look-ahead
    for scale in (1.0, 0.5):
        assert worst_error(nesterov, torch_run(lwrs_for_pytorch_optimizer(True), p, lr_scale=scale)) > 1e-3


# ---- optax ---------------------------------------------------------------------------------------

OPTAX_OPTIONS = dict(weight_decay_form="norm_of_sum", nesterov=False, adapt_mask=lambda w: True)


def jax_runs(problem, ours="core"):
    """optax.lars and lwrs in float32 with the migration page's options: the core on JAX arrays
    (``ours="core"``) or lwrs's own optax transformation (``ours="transformation"``)."""
    optax = pytest.importorskip("optax")
    jnp = pytest.importorskip("jax.numpy")
    lr = lr0(problem) if problem.constant_rate else jnp.asarray(problem.learning_rates, dtype=jnp.float32).__getitem__
    tx = optax.lars(lr, weight_decay=problem.weight_decay, trust_coefficient=problem.eta, momentum=problem.beta)
    a = b = problem.initial_params(jnp, jnp.float32)
    if ours == "core":
        opt = lwrs.lars(lr0(problem) if problem.constant_rate else problem.learning_rate, beta=problem.beta,
                        eta=problem.eta, weight_decay=problem.weight_decay, **OPTAX_OPTIONS)

        def ours_step(params, grads, state):
            return opt.step(params, grads, state)[:2]
    else:
        from lwrs.backends import jax as lwrs_jax

        opt = lwrs_jax.lars(lr, beta=problem.beta, eta=problem.eta, weight_decay=problem.weight_decay,
                            **OPTAX_OPTIONS)

        def ours_step(params, grads, state):
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state
    sa, sb = tx.init(a), opt.init(b)
    runs = ([], [])
    for t in range(problem.steps):
        updates, sa = tx.update(problem.gradients(t, a), sa, a)
        a = optax.apply_updates(a, updates)
        b, sb = ours_step(b, problem.gradients(t, b), sb)
        runs[0].append([np.asarray(w, dtype=np.float64) for w in a])
        runs[1].append([np.asarray(w, dtype=np.float64) for w in b])
    return runs


@pytest.mark.parametrize("ours", ["core", "transformation"])
@pytest.mark.parametrize("problem", ["mlp", "no_weight_decay", "varying_lr", "zero_init", "near_equilibrium",
                                     "large_lr"])
def test_optax_lars_is_lwrs_lars_with_its_options_even_with_a_varying_lr(problem, ours):
    assert worst_error(*jax_runs(PROBLEMS[problem], ours)) <= TOL


@pytest.mark.parametrize("ours", ["core", "transformation"])
def test_optax_cannot_be_matched_at_zero_gradient_layers(ours):
    assert worst_error(*jax_runs(PROBLEMS["zero_gradient"], ours)) > 1e-3  # optax: eta/lambda there, lwrs: 1


# ---- apex ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem", ["mlp", "near_equilibrium", "large_lr"])
def test_apex_larc_is_lwrs_lars_with_larc_clip(problem):  # pragma: no cover - apex is not installable here
    larc = load_apex_larc()
    if larc is None:
        pytest.skip("apex is not installed (it is not installable on the CPU CI)")
    p = PROBLEMS[problem]
    got = torch_run(lambda params, q: larc(params, lr=lr0(q), momentum=q.beta, weight_decay=q.weight_decay,
                                           trust_coefficient=q.eta, clip=True, eps=1e-8), p)
    want = torch_run(lambda params, q: LARS(params, lr=lr0(q), momentum=q.beta, eta=q.eta, weight_decay=q.weight_decay,
                                            eps=1e-8, nesterov=False, larc_clip=True, exclude_1d=False), p)
    assert worst_error(got, want) <= TOL
