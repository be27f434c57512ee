"""torch.compile of the torch optimizers' step (issue 14, item 2, the optimizer side): one graph, no break,
no recompilation over 20 scheduled steps with a tensor learning rate, a sync-free skip of non-finite steps,
and compiled equal to eager."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

import lwrs  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from lwrs.backends.torch import CLARS, LAMB, LARS, MNAG, TVLARS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # e.g. the scheduler's note that it wraps step()

MAKERS = {
    "mnag": lambda p: MNAG(p, lr=torch.tensor(0.05), on_nonfinite="skip"),
    "lars": lambda p: LARS(p, lr=torch.tensor(0.5), eta=0.02, weight_decay=1e-2, on_nonfinite="skip"),
    "lars-norm-of-sum": lambda p: LARS(p, lr=torch.tensor(0.5), eta=0.02, weight_decay=1e-2,
                                       weight_decay_form="norm_of_sum", on_nonfinite="skip"),
    "clars": lambda p: CLARS(p, lr=torch.tensor(0.5), eta=0.02, weight_decay=1e-2, on_nonfinite="skip"),
    "lamb": lambda p: LAMB(p, lr=torch.tensor(0.01), weight_decay=1e-2, on_nonfinite="skip"),
    "tvlars": lambda p: TVLARS(p, lr=torch.tensor(0.5), decay_coefficient=0.2, delay_steps=3, eta=0.02,
                               on_nonfinite="skip"),
}


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def statistics(m, name):
    if name != "clars":
        return None
    norms = torch.stack([p.grad.norm() for p in m.parameters()])
    return lwrs.NormStatistics(1.5 * norms, 3 * norms**2, 1)


def backward(m, k, nan=False):
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(k))
    m.zero_grad()
    (m(x) ** 2).mean().backward()
    if nan:
        m[0].weight.grad[0, 0] = float("nan")


@pytest.mark.parametrize("name", list(MAKERS))
def test_the_step_is_one_graph_without_a_break(name):
    m = model()
    opt = MAKERS[name](m.parameters())
    backward(m, 0)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(opt.step)(norm_stats=statistics(m, name))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def run(name, compiled, steps=20, nan_at=(), backend="aot_eager"):
    """20 steps driven by StepLR on a tensor lr; returns the model, the optimizer and the compile counter."""
    m = model()
    opt = MAKERS[name](m.parameters())
    counter = CompileCounterWithBackend(backend)
    step = torch.compile(opt.step, backend=counter) if compiled else opt.step
    sched = torch.optim.lr_scheduler.StepLR(opt, 4, gamma=0.5)
    for k in range(steps):
        backward(m, k, nan=k in nan_at)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the scheduler's note that it wraps step()
            step(norm_stats=statistics(m, name))
        sched.step()
    return m, opt, counter


@pytest.mark.parametrize("name", list(MAKERS))
def test_twenty_scheduled_steps_compile_once_and_equal_eager(name):
    torch._dynamo.reset()
    compiled, opt, counter = run(name, True)
    eager, _, _ = run(name, False)
    assert counter.frame_count == 1  # no recompilation when the scheduler changes the tensor lr
    assert float(opt.param_groups[0]["lr"]) < float(MAKERS[name]([torch.zeros(1)]).param_groups[0]["lr"])
    for a, b in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_inductor_step_equals_eager_in_float32():
    torch._dynamo.reset()
    compiled, _, counter = run("lars", True, steps=6, backend="inductor")
    eager, _, _ = run("lars", False, steps=6)
    assert counter.frame_count == 1
    for a, b in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_compiled_skip_needs_no_host_sync_and_skips_like_eager(name):
    """A NaN at steps 3 and 4: the compiled step keeps the old values with ``where`` (same graph, no
    recompilation) and leaves the step counts behind, as the eager step does."""
    torch._dynamo.reset()
    compiled, opt_c, counter = run(name, True, steps=8, nan_at=(3, 4))
    eager, opt_e, _ = run(name, False, steps=8, nan_at=(3, 4))
    assert counter.frame_count == 1
    for a, b in zip(compiled.parameters(), eager.parameters()):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for p in compiled.parameters():
        assert int(opt_c.state[p]["step"]) == 6
    assert bool(opt_c.diagnostics[0].skipped) is False


def test_raise_mode_still_raises_when_compiled():
    """on_nonfinite="raise" reads the flag on the host: a graph break, and the same error as eager."""
    m = model()
    opt = LARS(m.parameters(), lr=torch.tensor(0.5))
    backward(m, 0, nan=True)
    torch._dynamo.reset()
    with pytest.raises(lwrs.NonFiniteError, match="gradient norm is not finite"):
        torch.compile(opt.step, backend="aot_eager")()


def test_compiling_the_step_prints_no_warning(tmp_path):
    """The documented example once printed 173 lines of Dynamo warnings about array_api_compat's cached
    helpers (review-torch 6). A fresh process: Dynamo warns once per process."""
    import os
    import subprocess
    import sys

    script = tmp_path / "example.py"
    script.write_text(
        "import torch, warnings\n"
        "warnings.simplefilter('always')\n"
        "from lwrs.backends.torch import LAMB, LARS\n"
        "for make in (lambda p: LARS(p, lr=torch.tensor(1.0), on_nonfinite='skip'), lambda p: LAMB(p, lr=torch.tensor(0.1)),):\n"
        "    model = torch.nn.Linear(4, 2)\n"
        "    opt = make(model.parameters())\n"
        "    step = torch.compile(opt.step, backend='aot_eager')\n"
        "    for _ in range(2):\n"
        "        opt.zero_grad()\n"
        "        model(torch.randn(8, 4)).square().mean().backward()\n"
        "        step()\n"
        "print('done')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "done" in out.stdout, out.stderr[-3000:]
    assert "Warning" not in out.stderr and "lru_cache" not in out.stderr, out.stderr[-3000:]


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_one_cycle_without_cycled_momentum_compiles_once(name):
    """The documented setting for OneCycleLR under torch.compile (momentum and betas are Python floats, which
    Dynamo specialises on: cycle_momentum=True recompiles at each step, review-torch 4)."""
    torch._dynamo.reset()
    m = model()
    opt = MAKERS[name](m.parameters())
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt.step, backend=counter)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=30, cycle_momentum=False)
    for k in range(20):
        backward(m, k)
        step()
        sched.step()
    assert counter.frame_count == 1
    assert all(torch.isfinite(p).all() for p in m.parameters())
