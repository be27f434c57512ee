"""The torch optimizers in real training loops (issue 13, items 1-7): frozen parameters, all-or-nothing
steps over groups, hyperparameters checked at every step, foreign states refused, the norm of the
decayed gradient without cancellation, impossible CLARS statistics, non-finite results and states."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lwrs  # noqa: E402
from lwrs.backends.torch import CLARS, LAMB, LARS, MNAG, TVLARS  # noqa: E402

IMPLS = {"reference": dict(foreach=False), "foreach": dict(), "fused": dict(fused=True)}
FACTORIES = {
    "lars": lambda p, **kw: LARS(p, lr=0.5, eta=0.02, weight_decay=1e-2, **kw),
    "mnag": lambda p, **kw: MNAG(p, lr=0.05, **kw),
    "tvlars": lambda p, **kw: TVLARS(p, lr=0.5, decay_coefficient=0.1, delay_steps=1, eta=0.02, **kw),
    "lamb": lambda p, **kw: LAMB(p, lr=0.01, weight_decay=1e-2, **{k: v for k, v in kw.items() if k != "fused"}),
}
CASES = [(name, impl) for name in FACTORIES for impl in IMPLS if not (name == "lamb" and impl == "fused")]


def model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)


def backward(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 6, generator=g, dtype=next(m.parameters()).dtype)
    m.zero_grad(set_to_none=True)
    (m(x) ** 2).mean().backward()


def snapshot(opt, m):
    params = [p.detach().clone() for p in m.parameters()]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in m.parameters()}
    return params, state


def assert_unchanged(opt, m, snap):
    params, state = snap
    for p, q in zip(m.parameters(), params):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0, equal_nan=True)
    for p in m.parameters():
        assert set(opt.state[p]) == set(state[id(p)])
        for k, v in state[id(p)].items():
            torch.testing.assert_close(opt.state[p][k], v, rtol=0, atol=0, equal_nan=True)


# ---- 1. parameters without a gradient ----------------------------------------------------------------------


@pytest.mark.parametrize("name, impl", CASES)
def test_a_frozen_parameter_is_skipped_and_its_state_untouched(name, impl):
    m = model()
    opt = FACTORIES[name](m.parameters(), **IMPLS[name == "lamb" and impl == "fused" or impl])
    backward(m, 0)
    opt.step()
    m[0].weight.requires_grad_(False)
    backward(m, 1)
    assert m[0].weight.grad is None
    frozen = {k: v.clone() for k, v in opt.state[m[0].weight].items()}
    w0 = m[0].weight.detach().clone()
    opt.step()
    assert torch.equal(m[0].weight, w0)
    assert all(torch.equal(opt.state[m[0].weight][k], v) for k, v in frozen.items())
    m[0].weight.requires_grad_(True)
    backward(m, 2)
    opt.step()  # was: "parameters of one group are at different steps [1, 2]"
    assert int(opt.state[m[0].weight]["step"]) == 2 and int(opt.state[m[2].weight]["step"]) == 3


@pytest.mark.parametrize("impl", list(IMPLS))
def test_a_parameter_unfrozen_later_follows_torch_sgd(impl):
    """MNAG at a constant rate is torch's SGD(nesterov): the same freeze schedule gives the same weights."""
    ours, theirs = model(), model()
    opt = MNAG(ours.parameters(), lr=0.05, momentum=0.9, **IMPLS[impl])
    sgd = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    for step in range(5):
        for m in (ours, theirs):
            m[2].bias.requires_grad_(step not in (1, 2))
            backward(m, step)
        opt.step()
        sgd.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


# ---- 2. all-or-nothing over groups ---------------------------------------------------------------------------


def two_groups(m, factory, **kw):
    named = list(m.named_parameters())
    return factory([{"params": named[:2]}, {"params": named[2:], "lr": 0.1}], **kw)


@pytest.mark.parametrize("name, impl", CASES)
def test_a_nan_in_the_second_group_updates_no_group(name, impl):
    m = model()
    opt = two_groups(m, FACTORIES[name], **IMPLS[impl])
    backward(m, 0)
    opt.step()
    backward(m, 1)
    m[2].weight.grad[1, 1] = float("nan")
    snap = snapshot(opt, m)
    with pytest.raises(lwrs.NonFiniteError, match=r"parameter '2.weight' \(group 1\): gradient norm is not finite"):
        opt.step()
    assert_unchanged(opt, m, snap)
    for group in opt.param_groups:
        group["on_nonfinite"] = "skip"
    opt.step()
    assert_unchanged(opt, m, snap)
    assert [bool(d.skipped) for d in opt.diagnostics] == [True, True]


def test_a_sparse_gradient_in_the_second_group_updates_no_group():
    m = model()
    opt = two_groups(m, FACTORIES["lars"])
    backward(m, 0)
    m[2].bias.grad = m[2].bias.grad.to_sparse()
    snap = snapshot(opt, m)
    with pytest.raises(RuntimeError, match=r"sparse gradients: parameter '2.bias' \(group 1\)"):
        opt.step()
    assert_unchanged(opt, m, snap)


# ---- 3. hyperparameters checked at every step, on every path -------------------------------------------------

BAD = [
    ("lr", float("nan"), r"group 1: lr must be finite, got nan"),
    ("lr", -0.1, r"group 1: lr must lie in \[0.0, inf\], got -0.1"),
    ("lr", torch.tensor(float("nan")), r"group 1: lr must be finite"),
    ("momentum", 1.0, r"group 1: momentum must lie in \[0.0, 1.0\), got 1.0"),
    ("weight_decay", -1.0, r"group 1: weight_decay must lie"),
    ("eta", 0.0, r"group 1: eta must lie in \(0.0, inf\]"),
    ("nesterov", "yes", r"group 1: nesterov must be a bool"),
]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("key, value, message", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_hyperparameters_set_after_construction_are_checked_at_step(impl, key, value, message):
    m = model()
    opt = two_groups(m, FACTORIES["lars"], **IMPLS[impl])
    backward(m, 0)
    opt.param_groups[1][key] = value
    snap = snapshot(opt, m)
    with pytest.raises((ValueError, TypeError), match=message):
        opt.step()
    assert_unchanged(opt, m, snap)


@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_lamb_beta1_of_one_is_refused_at_step(impl):
    m = model()
    opt = LAMB(m.parameters(), lr=0.01, **IMPLS[impl])
    backward(m, 0)
    opt.param_groups[0]["betas"] = (1.0, 0.999)
    with pytest.raises(ValueError, match=r"group 0: betas\[0\] must lie in \[0.0, 1.0\), got 1.0"):
        opt.step()


def test_add_param_group_and_load_state_dict_are_checked():
    m = model()
    opt = LARS(list(m.parameters())[:2], lr=0.1)
    with pytest.raises(ValueError, match=r"group 1: lr must be finite, got nan"):
        opt.add_param_group({"params": list(m.parameters())[2:], "lr": float("nan")})
    state = LARS(m.parameters(), lr=0.1).state_dict()
    state["param_groups"][0]["momentum"] = 1.0
    with pytest.raises(ValueError, match=r"group 0: momentum must lie"):
        LARS(m.parameters(), lr=0.1).load_state_dict(state)


# ---- 4. load_state_dict refuses another optimizer's state ------------------------------------------------------


def stepped(make, m):
    opt = make(m.parameters())
    backward(m, 0)
    opt.step()
    return opt


@pytest.mark.parametrize("other", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=0.1),
    lambda p: LAMB(p, lr=0.1),
], ids=["sgd", "adam", "lamb"])
def test_another_optimizers_state_is_refused(other):
    m = model()
    state = stepped(other, m).state_dict()
    opt = LARS(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict(state)


def test_a_state_with_a_parameter_missing_is_refused():
    m = model()
    state = stepped(lambda p: LARS(p, lr=0.1), m).state_dict()
    del state["state"][1]
    with pytest.raises(ValueError, match=r"no entry for parameter 1 of group 0"):
        LARS(m.parameters(), lr=0.1).load_state_dict(state)


def test_lars_state_into_tvlars_is_refused_and_a_lars_state_loads():
    m = model()
    state = stepped(lambda p: LARS(p, lr=0.1), m).state_dict()
    with pytest.raises(ValueError, match=r"state of a LARS optimizer, not of a TVLARS"):
        TVLARS(m.parameters(), lr=0.1, decay_coefficient=0.1, delay_steps=0).load_state_dict(state)
    del state["param_groups"][0]["optimizer"]  # an older state: refused by its hyperparameters' names
    with pytest.raises(ValueError, match=r"unexpected hyperparameters \[\], missing \['alpha'"):
        TVLARS(m.parameters(), lr=0.1, decay_coefficient=0.1, delay_steps=0).load_state_dict(state)
    opt = LARS(m.parameters(), lr=0.1)
    opt.load_state_dict(state)
    assert int(opt.state[m[0].weight]["step"]) == 1


# ---- 5. the norm of the decayed gradient, near the weight-decay equilibrium ------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("ratio", [1e-1, 1e-2, 1e-4, 1e-6])
def test_norm_of_sum_agrees_with_the_core_near_equilibrium(dtype, impl, ratio):
    """g = -lambda w + delta with |delta| / |lambda w| = ratio: the expanded form lost all digits at 1e-4.

    Oracles: the core in the same dtype, and the core's rate from the norm of the core's own rounded
    direction fl(g + fl(lambda w)) summed in float64."""
    gen = torch.Generator().manual_seed(3)
    lam = 5e-4
    w = torch.randn(512, 512, generator=gen, dtype=torch.float64)
    delta = torch.randn(512, 512, generator=gen, dtype=torch.float64)
    delta *= ratio * torch.linalg.vector_norm(lam * w) / torch.linalg.vector_norm(delta)
    w, g = w.to(dtype), (-lam * w + delta).to(dtype)
    core = lwrs.lars(1.0, eta=1e-3, weight_decay=lam, weight_decay_form="norm_of_sum")
    _, _, expected = core.step([w], [g], core.init([w]))
    p = torch.nn.Parameter(w.clone())
    p.grad = g.clone()
    opt = LARS([p], lr=1.0, eta=1e-3, weight_decay=lam, weight_decay_form="norm_of_sum", **IMPLS[impl])
    opt.step()
    rates = opt.diagnostics[0].rates
    torch.testing.assert_close(rates, expected.rates, rtol=1e-5, atol=0)
    direction = (g + lam * w).double()  # the core's rounding of the direction, then exact sums
    exact = 1e-3 * torch.linalg.vector_norm(w.double()) / torch.linalg.vector_norm(direction)
    torch.testing.assert_close(rates.double(), exact.reshape(1), rtol=1e-5, atol=0)


# ---- 6. CLARS statistics: shapes on every path, impossible values refused -------------------------------------


def clars_case(impl, **kw):
    m = model()
    opt = CLARS(m.parameters(), lr=0.5, **IMPLS[impl], **kw)
    backward(m, 0)
    norms = torch.stack([p.grad.norm() for p in m.parameters()])
    return m, opt, norms


@pytest.mark.parametrize("impl", list(IMPLS))
def test_clars_statistics_of_the_wrong_length_are_refused(impl):
    m, opt, norms = clars_case(impl)
    snap = snapshot(opt, m)
    for k in (2, 6):
        stats = lwrs.NormStatistics(torch.ones(k, dtype=torch.float64) * 9, torch.ones(k, dtype=torch.float64), 1)
        with pytest.raises(ValueError, match=rf"norm_stats.sum_norms has shape \({k},\), expected \(4,\)"):
            opt.step(norm_stats=stats)
    assert_unchanged(opt, m, snap)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", ["zero", "below", "negative", "count-inf", "count-zero"])
def test_impossible_clars_statistics_are_refused(impl, case):
    m, opt, norms = clars_case(impl)
    s1, s2, count = 2 * norms, 4 * norms**2, 1
    if case == "zero":
        s1, s2 = torch.zeros_like(s1), torch.zeros_like(s2)
    elif case == "below":
        s1 = s1.clone()
        s1[2] = 0.5 * norms[2]
    elif case == "negative":
        s1 = -s1
    elif case == "count-inf":
        count = float("inf")
    else:
        count = 0
    snap = snapshot(opt, m)
    message = "count must be a positive finite number" if case.startswith("count") else "cannot come from its gradient"
    with pytest.raises(ValueError, match=message):
        opt.step(norm_stats=lwrs.NormStatistics(s1, s2, count))
    assert_unchanged(opt, m, snap)
    opt.step(norm_stats=lwrs.NormStatistics(2 * norms, 4 * norms**2, 1))  # possible statistics are taken
    assert (opt.diagnostics[0].clars_factors <= 1).all()


# ---- 7. non-finite results and states -------------------------------------------------------------------------


@pytest.mark.parametrize("name, impl", [c for c in CASES if c[0] != "tvlars"])
def test_a_step_that_would_overflow_is_refused_then_skipped(name, impl):
    m = model()
    opt = FACTORIES[name](m.parameters(), **IMPLS[impl])
    backward(m, 0)
    opt.step()
    for group in opt.param_groups:
        group["lr"] = 1e308
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(100)
    backward(m, 1)
    for p in m.parameters():
        p.grad *= 1e3
    snap = snapshot(opt, m)
    with pytest.raises(lwrs.NonFiniteError, match="would overflow"):
        opt.step()
    assert_unchanged(opt, m, snap)
    for group in opt.param_groups:
        group["on_nonfinite"] = "skip"
    opt.step()
    assert opt.diagnostics[0].skipped
    assert_unchanged(opt, m, snap)
    for group in opt.param_groups:  # a sane rate: the next step goes ahead, the count moves on
        group["lr"] = 0.01
    opt.step()
    assert not opt.diagnostics[0].skipped
    assert int(opt.state[m[0].weight]["step"]) == 2


def test_float16_overflow_is_detected():
    m = model(dtype=torch.float32).half()
    opt = LARS(m.parameters(), lr=1e4, eta=1.0, exclude_1d=False)
    backward(m, 0)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(6e4)
    with pytest.raises(lwrs.NonFiniteError, match="would overflow"):
        opt.step()
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_a_large_float16_layer_of_moderate_values_is_not_refused():
    """Its norm (81920) is above float16's largest number, but no element comes near it."""
    p = torch.nn.Parameter(torch.full((2048, 2048), 40.0, dtype=torch.float16))
    p.grad = torch.full_like(p, 0.5)
    opt = LARS([p], lr=0.1, eta=0.1)
    opt.step()
    assert torch.isfinite(p).all() and (p < 40).all()


@pytest.mark.parametrize("name, impl", CASES)
def test_a_nan_in_the_state_is_detected(name, impl):
    m = model()
    opt = FACTORIES[name](m.parameters(), **IMPLS[impl])
    backward(m, 0)
    opt.step()
    key = "exp_avg" if name == "lamb" else "momentum_buffer"
    opt.state[m[2].weight][key][0, 0] = float("nan")  # a corrupted checkpoint
    backward(m, 1)
    snap = snapshot(opt, m)
    with pytest.raises(lwrs.NonFiniteError, match=r"parameter 2 of group 0: (momentum buffer|first moment) norm"):
        opt.step()
    assert_unchanged(opt, m, snap)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("corrupt", [
    lambda opt, p: opt.state[p]["momentum_buffer"].fill_(float("inf")),
    lambda opt, p: opt.state[p]["momentum_buffer"].mul_(1e308),  # finite, but the step would overflow
    lambda opt, p: opt.state[p].update(momentum_buffer=torch.full_like(p, float("nan"))),  # a new tensor
    # writes that torch's version counter does not see (as a collective's, e.g. a broadcast of the state)
    lambda opt, p: opt.state[p]["momentum_buffer"].data.fill_(float("nan")),
    lambda opt, p: opt.state[p]["momentum_buffer"].numpy().fill(float("nan")),
], ids=["fill_", "mul_", "replaced", "data", "numpy"])
def test_a_bad_buffer_stops_the_step_however_it_was_written(impl, corrupt):
    """The buffers are read for the checks at every step: a bound carried over from the last update and trusted
    while the version counter is unchanged missed writes such as ``.data``, NumPy views and collectives."""
    m = model()
    opt = LARS(m.parameters(), lr=0.1, weight_decay=1e-4, **IMPLS[impl])
    for seed in range(2):
        backward(m, seed)
        opt.step()
    corrupt(opt, m[2].weight)
    backward(m, 2)
    snap = snapshot(opt, m)
    with pytest.raises(lwrs.NonFiniteError, match=r"parameter 2 of group 0: (momentum buffer norm|step size)"):
        opt.step()
    assert_unchanged(opt, m, snap)


@pytest.mark.parametrize("name, impl", CASES)
def test_a_model_converted_after_its_optimizer_is_refused_before_any_update(name, impl):
    """``model[2].float()`` after two steps leaves the float64 state: refused up front, naming the parameter (the
    reference path used to update group 0 and then fail in group 1)."""
    m = model()
    opt = FACTORIES[name]([{"params": m[0].parameters()}, {"params": m[2].parameters()}], **IMPLS[impl])
    for seed in range(2):
        backward(m, seed)
        opt.step()
    m[2].float()
    m.zero_grad(set_to_none=True)
    (m[2](m[1](m[0](torch.randn(8, 6, dtype=torch.float64))).float()) ** 2).mean().backward()
    snap = snapshot(opt, m)
    with pytest.raises(ValueError, match=r"parameter 0 of group 1: its state '\w+' is torch.float64 \(3, 5\)"):
        opt.step()
    assert_unchanged(opt, m, snap)


def test_named_parameters_name_the_parameter_in_every_message():
    m = model()
    opt = LARS(m.named_parameters(), lr=0.1)
    backward(m, 0)
    m[0].bias.grad[0] = float("inf")
    with pytest.raises(lwrs.NonFiniteError, match=r"parameter '0.bias' \(group 0\)"):
        opt.step()
    assert np.isfinite(m[0].bias.detach().numpy()).all()


@pytest.mark.parametrize("saved, loader", [
    (lambda p: MNAG(p, lr=0.1), lambda p: LARS(p, lr=0.1, weight_decay=1e-3)),
    (lambda p: LARS(p, lr=0.1), lambda p: MNAG(p, lr=0.1)),
    (lambda p: CLARS(p, lr=0.1), lambda p: LARS(p, lr=0.1)),
    (lambda p: LARS(p, lr=0.1), lambda p: CLARS(p, lr=0.1)),
], ids=["mnag-into-lars", "lars-into-mnag", "clars-into-lars", "lars-into-clars"])
def test_a_state_of_another_lwrs_optimizer_with_the_same_hyperparameter_names_is_refused(saved, loader):
    """MNAG, LARS and CLARS share their groups' keys: an MNAG state once made a LARS with eta=1 (review-torch 3)."""
    m = model()
    source = saved(m.parameters())
    state = source.state_dict()
    opt = loader(m.parameters())
    before = dict(opt.param_groups[0])
    with pytest.raises(ValueError, match=rf"state of a {type(source).__name__} optimizer, not of a "
                                         rf"{type(opt).__name__}"):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["eta"] == before["eta"] and opt.param_groups[0]["optimizer"] == type(opt).__name__


def test_a_state_saved_before_the_optimizer_was_recorded_still_loads():
    m = model()
    state = stepped(lambda p: LARS(p, lr=0.1, eta=0.02), m).state_dict()
    for group in state["param_groups"]:
        del group["optimizer"]  # as saved by lwrs 0.1
    opt = LARS(m.parameters(), lr=0.5)
    opt.load_state_dict(state)
    assert opt.param_groups[0]["eta"] == 0.02 and opt.param_groups[0]["optimizer"] == "LARS"
    assert int(opt.state[m[0].weight]["step"]) == 1
    backward(m, 1)
    opt.step()
    assert opt.state_dict()["param_groups"][0]["optimizer"] == "LARS"


@pytest.mark.parametrize("name", ["lars", "mnag", "tvlars", "lamb"])
@pytest.mark.parametrize("order", ["scheduler after load", "scheduler before load"])
def test_a_state_with_a_schedulers_keys_loads_as_in_torch_optim(name, order):
    """Schedulers add keys to the groups (``initial_lr``; OneCycleLR's ``max_lr``, ``min_lr``, momenta): a state
    saved with them loads into an optimizer made without a scheduler (then one is made with ``last_epoch``), and
    a state saved without them into one that has a scheduler, as with torch.optim.SGD; both were refused as
    "another optimizer" (review-torch-3, 3)."""
    make = FACTORIES[name]
    m = model()
    opt = make(m.parameters())
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=10,
                                                cycle_momentum=name in ("lars", "mnag", "tvlars"))
    for seed in range(3):
        backward(m, seed)
        opt.step()
        sched.step()
    saved, saved_sched = opt.state_dict(), sched.state_dict()
    bare = make(model().parameters()).state_dict()
    m2 = model()
    opt2 = make(m2.parameters())
    if order == "scheduler after load":
        opt2.load_state_dict(saved)
        sched2 = torch.optim.lr_scheduler.OneCycleLR(opt2, max_lr=0.5, total_steps=10, last_epoch=2,
                                                     cycle_momentum=name in ("lars", "mnag", "tvlars"))
        sched2.load_state_dict(saved_sched)
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        assert int(opt2.state[m2[0].weight]["step"]) == 3
    else:
        torch.optim.lr_scheduler.StepLR(opt2, step_size=2)
        opt2.load_state_dict(bare)
        assert opt2.param_groups[0]["optimizer"] == type(opt2).__name__
    # another optimizer's state is still refused
    with pytest.raises(ValueError, match="another optimizer"):
        opt2.load_state_dict(stepped(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), model()).state_dict())


def test_the_diagnostics_keep_the_rate_of_their_step_when_a_scheduler_changes_a_tensor_rate():
    """With ``lr`` a tensor, ``diagnostics.learning_rate`` was the group's own tensor, which the scheduler then
    fills in place: logged after ``sched.step()`` it showed the next step's rate (review-torch-3, 6)."""
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    opt = LARS([w], lr=torch.tensor(2.0), eta=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    w.grad = torch.randn(4, 3, dtype=torch.float64)
    opt.step()
    d = opt.diagnostics[0]
    sched.step()
    assert float(opt.param_groups[0]["lr"]) == 1.0
    assert float(d.learning_rate) == 2.0


# ---- CLARS stepped by a GradScaler (review-torch 5) -------------------------------------------------------------


def clars_run(scaler=None, pass_scaler=False, unscale_first=False, inf_at=()):
    from lwrs.backends.torch import PerSampleNorms

    m = model(dtype=torch.float32)
    opt = CLARS(m.parameters(), lr=0.1, norm_source=PerSampleNorms(m), grad_scaler=scaler if pass_scaler else None)
    factors = []
    for k in range(3):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(k))
        opt.zero_grad()
        loss = (m(x) ** 2).mean()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            if k in inf_at:
                m[0].weight.grad[0, 0] = float("inf")
            if unscale_first:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        factors.append(opt.diagnostics[0].clars_factors.clone())
    return m, opt, torch.stack(factors)


@pytest.mark.parametrize("pass_scaler", [False, True], ids=["scaler-not-given", "grad_scaler="])
def test_clars_stepped_by_a_grad_scaler_unscales_its_statistics(pass_scaler):
    """``scaler.step(opt)`` without ``grad_scaler=`` once gave CLARS factors 1024 times too small."""
    plain, _, expected = clars_run()
    scaled, opt, factors = clars_run(torch.amp.GradScaler("cpu", init_scale=1024.0), pass_scaler)
    torch.testing.assert_close(factors, expected, rtol=1e-5, atol=0)
    for a, b in zip(scaled.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


def test_clars_after_unscale_without_grad_scaler_is_refused_and_with_it_matches():
    with pytest.raises(ValueError, match=r"after GradScaler.unscale_.*pass grad_scaler=scaler"):
        clars_run(torch.amp.GradScaler("cpu", init_scale=1024.0), unscale_first=True)
    _, _, expected = clars_run()
    _, _, factors = clars_run(torch.amp.GradScaler("cpu", init_scale=1024.0), True, unscale_first=True)
    torch.testing.assert_close(factors, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("unscale_first", [False, True])
def test_clars_skips_a_step_the_grad_scaler_found_infinite(unscale_first):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _, opt, _ = clars_run(scaler, True, unscale_first=unscale_first, inf_at=(1,))
    assert scaler.get_scale() == 512.0  # the scaler backed off
    assert all(int(opt.state[p]["step"]) == 2 for p in opt.param_groups[0]["params"])


@pytest.mark.parametrize("name, impl", CASES)
def test_a_step_between_forward_and_backward_is_refused_by_autograd_as_after_torch_sgd(name, impl):
    """Every path tells autograd it changed the weights in place (their version counters), so a backward through
    a graph that saved the old weights fails as it does after torch.optim.SGD, rather than using the new ones.
    (The compiled kernels wrote through raw pointers without the version bump: the backward passed silently.)"""
    m = model()
    backward(m)
    opt = FACTORIES[name](m.parameters(), **IMPLS[impl])
    x = torch.randn(4, 6, dtype=torch.float64)
    loss = (m(x) ** 2).mean()  # the graph saves the weights
    versions = [p._version for p in m.parameters()] + [t._version for st in opt.state.values() for t in st.values()]
    opt.step()
    after = [p._version for p in m.parameters()] + [t._version for st in opt.state.values() for t in st.values()]
    assert all(a > b for a, b in zip(after, versions))  # weights, buffers and step counts
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_step_refused_under_grad_scaler_leaves_the_gradients_scaled_and_a_retry_is_exact():
    """GradScaler.step hands CLARS the loss scale; the gradients were unscaled before the checks, so a refused step
    left them divided by the scale (and the scaler's attributes on the optimizer), and the retry divided again."""
    from lwrs.backends.torch import PerSampleNorms

    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), torch.randn(16, 2)

    def setup():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
        opt = CLARS(m.parameters(), lr=1.0, eta=0.01, norm_source=PerSampleNorms(m))
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
        return m, opt, scaler

    m, opt, scaler = setup()
    scaler.step(opt)
    expected = [p.detach().clone() for p in m.parameters()]
    m, opt, scaler = setup()
    grads = [p.grad.clone() for p in m.parameters()]
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr must lie"):
        scaler.step(opt)
    assert all(torch.equal(p.grad, g) for p, g in zip(m.parameters(), grads))
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
    opt.param_groups[0]["lr"] = 1.0
    scaler.step(opt)
    assert all(torch.equal(p, e) for p, e in zip(m.parameters(), expected))


@pytest.mark.parametrize("name, impl", CASES)
def test_a_refused_state_dict_leaves_the_optimizer_as_it_was(name, impl):
    """The hyperparameters were checked after torch's load had replaced groups and state: the refused state stayed
    loaded and every later step failed."""
    import copy

    m = model()
    opt = FACTORIES[name](m.parameters(), **IMPLS[impl])
    backward(m, 0)
    opt.step()
    bad = copy.deepcopy(opt.state_dict())
    key = "betas" if name == "lamb" else "momentum"
    bad["param_groups"][0][key] = (1.5, 0.999) if name == "lamb" else 1.5
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][k][s], v) for k, st in before["state"].items() for s, v in st.items())
    backward(m, 1)
    opt.step()  # still steps


def test_a_refused_param_group_is_not_added():
    m = model()
    opt = LARS(m[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match="group 1: momentum"):
        opt.add_param_group({"params": m[2].parameters(), "momentum": 1.5})
    assert len(opt.param_groups) == 1
    backward(m, 0)
    opt.step()


@pytest.mark.parametrize("name, impl", CASES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_steps_like_the_original(name, impl, how):
    """torch.optim pickles only defaults, state and param_groups: the copy lost foreach/fused and could not step."""
    import copy
    import pickle

    m = model()
    opt = FACTORIES[name](m.parameters(), **IMPLS[impl])
    backward(m, 0)
    opt.step()
    m2, opt2 = copy.deepcopy((m, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((m, opt)))
    assert opt2.implementation == opt.implementation
    for mm, oo in ((m, opt), (m2, opt2)):
        backward(mm, 1)
        oo.step()
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    assert len(opt2.diagnostics) == 1


def test_duplicate_complex_and_integer_parameters_and_both_flags_are_refused_by_name():
    m = model()
    named = list(m.named_parameters())
    with pytest.raises(ValueError, match="parameter 'again' \\(group 0\\) appears twice"):
        LARS(named + [("again", m[0].weight)], lr=0.1)
    with pytest.raises(ValueError, match="parameter 1 of group 0 appears twice"):
        LARS([m[0].weight, m[0].weight], lr=0.1)
    with pytest.raises(TypeError, match="parameter 0 of group 0 is torch.complex64: LARS takes real floating-point"):
        LARS([torch.zeros(2, dtype=torch.complex64, requires_grad=True)], lr=0.1)
    with pytest.raises(TypeError, match="is torch.int64"):
        MNAG([torch.zeros(2, dtype=torch.long)], lr=0.1)
    with pytest.raises(ValueError, match="fused=True and foreach=True cannot be combined"):
        LARS(m.parameters(), lr=0.1, foreach=True, fused=True)
