"""The cost of exact CLARS: a full training step with per-sample norms, against a plain step and peers.

For each model, every method runs complete training steps (forward, backward, whatever it needs
for the per-layer per-sample norms, optimizer step) on the same batch; the methods are timed
round-robin (each sample the mean of 3 consecutive steps, after one untimed step of the same
method), and each reports its median, as a multiple of the plain SGD step. The whole measurement
is repeated ``--runs`` times (3) with fresh models; the ratio reported is the median over runs,
and every run's ratio is kept. The methods are:

* plain: torch.optim.SGD (momentum 0.9, Nesterov, foreach), no per-sample work;
* lwrs LARS: the same step with lwrs's LARS (no per-sample work);
* lwrs CLARS, exact: ``PerSampleNorms(model)`` (the default: the per-sample gradients of
  convolutions and long-sequence Linears are built once and summed into the weight gradient,
  the other layers are measured by hooks), then the ``foreach`` CLARS step; the same with the
  compiled ``fused=True`` CLARS step;
* the same with ``PerSampleNorms(model, fused=False)``: hooks only, autograd's own gradients;
* torch.func: per-sample gradients with vmap(grad), their norms, then CLARS;
* Opacus: GradSampleModuleFastGradientClipping (ghost clipping) norms, then CLARS;
* official estimator: 64 extra mini-batches of 8 through the model, then CLARS.

The script also checks that Opacus's per-sample norms and lwrs's agree, so the race is fair.
Run ``python benchmarks/clars_step.py`` (``--quick`` for a smoke run); it writes
``benchmarks/results/clars_step.json``. It runs torch on one thread (``--threads``), as the
anchors the targets were set against were measured; on a shared 2-core machine a second thread
also makes the timings far noisier. On this kind of machine glibc's malloc hands large
blocks back to the system and faults them in again at the next step, at a cost that depends on
each method's sequence of allocations and moves the ratios by 10-20% between runs. The steady
figures come from the same script with the allocator told to keep its memory::

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=17179869184 \
        python benchmarks/clars_step.py --out benchmarks/results/clars_step_steady_malloc.json
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import statistics
import time
import warnings

warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus's hooks on the first layer

import torch
import torch.nn as nn

import lwrs
from _harness import interleaved_medians, write_record
from lwrs.backends.torch import CLARS, LARS, PerSampleNorms, minibatch_norm_statistics

HERE = pathlib.Path(__file__).resolve().parent


class TokenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 10)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))).mean(dim=1))


def models(quick: bool):
    batch = 64 if quick else 512
    g = torch.Generator().manual_seed(0)
    mlp = lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),  # noqa: E731
                                nn.Linear(1024, 10))
    cnn = lambda: nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # noqa: E731
                                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                nn.Linear(32 * 7 * 7, 10))
    tokens = 16 if quick else 128
    return {
        f"MLP 784-1024-1024-10, B={batch}": (mlp, torch.randn(batch, 784, generator=g)),
        f"small CNN (2 conv + linear, 28x28), B={batch}": (cnn, torch.randn(batch, 1, 28, 28, generator=g)),
        f"token MLP, input [{tokens}, 64, 256]": (TokenMLP, torch.randn(tokens, 64, 256, generator=g)),
    }


def loss_of(out, y):
    return nn.functional.cross_entropy(out, y)


def build_methods(make, x, y):
    """name -> step() closure, each with its own copy of the model."""
    torch.manual_seed(0)
    out = {}

    def plain():
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, foreach=True)

        def step():
            opt.zero_grad()
            loss_of(model(x), y).backward()
            opt.step()
        return step

    def lars():
        model = make()
        opt = LARS(model.parameters(), lr=1.0, eta=1e-3)

        def step():
            opt.zero_grad()
            loss_of(model(x), y).backward()
            opt.step()
        return step

    def clars_exact(fused_norms=True, fused_step=False):
        model = make()
        opt = CLARS(model.parameters(), lr=1.0, eta=1e-2, norm_source=PerSampleNorms(model, fused=fused_norms),
                    fused=fused_step)

        def step():
            opt.zero_grad()
            loss_of(model(x), y).backward()
            opt.step()
        return step

    def clars_torch_func():
        model = make()
        opt = CLARS(model.parameters(), lr=1.0, eta=1e-2)
        names = [n for n, _ in model.named_parameters()]

        def one(p, xi, yi):
            return loss_of(torch.func.functional_call(model, p, (xi[None],)), yi[None]) / x.shape[0]

        per_sample = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))

        def step():
            opt.zero_grad()
            params = {n: p.detach() for n, p in model.named_parameters()}
            grads = per_sample(params, x, y)
            s1, s2 = [], []
            for n, p in zip(names, model.parameters()):
                # grads[n][i] is sample i's share of the mean loss's gradient, g_i / B
                norms = x.shape[0] * torch.linalg.vector_norm(grads[n].reshape(x.shape[0], -1), dim=1)
                s1.append(norms.sum())
                s2.append((norms * norms).sum())
                p.grad = grads[n].sum(dim=0)
            opt.step(norm_stats=lwrs.NormStatistics(torch.stack(s1), torch.stack(s2), x.shape[0]))
        return step

    def clars_opacus():
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        model = make()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = GradSampleModuleFastGradientClipping(model, loss_reduction="mean", use_ghost_clipping=True)
        params = [p for p in model.parameters()]
        opt = CLARS(params, lr=1.0, eta=1e-2)

        def step():
            opt.zero_grad()
            loss_of(wrapped(x), y).backward()
            # Opacus (mean reduction) reports the norms of each sample's own loss gradient, |g_i|
            s1 = torch.stack([p._norm_sample.sum() for p in params])
            s2 = torch.stack([(p._norm_sample ** 2).sum() for p in params])
            opt.step(norm_stats=lwrs.NormStatistics(s1, s2, x.shape[0]))
        return step

    def clars_official():
        model = make()
        opt = CLARS(model.parameters(), lr=1.0, eta=1e-2, max_ratio=0.1, eps=1e-6)
        minibatches = [(x[(8 * m) % x.shape[0]:(8 * m) % x.shape[0] + 8], y[(8 * m) % x.shape[0]:(8 * m) % x.shape[0] + 8])
                       for m in range(64)]

        def step():
            opt.zero_grad()
            loss_of(model(x), y).backward()
            opt.step(norm_stats=minibatch_norm_statistics(model, loss_of, minibatches))
        return step

    out["plain SGD step"] = plain()
    out["lwrs LARS step"] = lars()
    out["lwrs CLARS, exact (default)"] = clars_exact()
    out["lwrs CLARS, exact (default, fused=True step)"] = clars_exact(fused_step=True)
    out["lwrs CLARS, exact (hooks only, fused=False)"] = clars_exact(fused_norms=False)
    out["torch.func per-sample grads + CLARS"] = clars_torch_func()
    if importlib.util.find_spec("opacus") is not None:
        out["Opacus ghost-clipping norms + CLARS"] = clars_opacus()
    out["official estimator (64 x 8 extra) + CLARS"] = clars_official()
    return out


def check_opacus_agrees(make, x, y) -> float | None:
    """Largest relative difference between Opacus's and lwrs's per-layer sums of per-sample norms."""
    if importlib.util.find_spec("opacus") is None:
        return None
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    torch.manual_seed(0)
    model = make()
    norms = PerSampleNorms(model)
    loss_of(model(x), y).backward()
    ours = norms.sums(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = GradSampleModuleFastGradientClipping(model, loss_reduction="mean", use_ghost_clipping=True)
    model.zero_grad()
    loss_of(wrapped(x), y).backward()
    batch = x.shape[0]  # Opacus reports norms of per-sample loss gradients, B times lwrs's contributions
    return max(float((p._norm_sample.sum() / batch - ours[p][0]).abs() / ours[p][0]) for p in model.parameters())


def measure(make, x, y, repeats: int, quick: bool) -> dict[str, float]:
    """One run: fresh models and optimizers for every method, warmed up, then interleaved medians (ms)."""
    steps = build_methods(make, x, y)
    warm = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        step()
        warm[name] = time.perf_counter() - t0
    slow = frozenset(m for m, t in warm.items() if t > 5 * warm["plain SGD step"])  # torch.func, official estimator
    return interleaved_medians(steps, repeats, untimed=1, per_sample=1 if quick else 3, slow=slow)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches, few repeats (smoke run)")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "clars_step.json")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1, as the anchors in the issue were measured)")
    parser.add_argument("--runs", type=int, default=3,
                        help="independent runs (fresh models each), whose per-run ratios are reported and whose "
                             "median is the result")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else 11
    runs = 1 if args.quick else args.runs
    results = {}
    for name, (make, x) in models(args.quick).items():
        y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(1))
        per_run = [measure(make, x, y, repeats, quick=args.quick) for _ in range(runs)]
        ratios = [{m: ms / run["plain SGD step"] for m, ms in run.items()} for run in per_run]
        medians = {m: statistics.median(run[m] for run in per_run) for m in per_run[0]}
        ratio = {m: statistics.median(r[m] for r in ratios) for m in ratios[0]}
        agreement = check_opacus_agrees(make, x, y)
        results[name] = {"median_ms": medians, "ratio_to_plain": ratio,
                         "ratio_to_plain_per_run": ratios,
                         "opacus_vs_lwrs_max_relative_difference": agreement}
        print(f"\n{name}" + (f"  (Opacus vs lwrs norms: max rel. diff {agreement:.1e})" if agreement is not None else ""))
        for m in sorted(ratio, key=ratio.get):
            spread = ", ".join(f"{r[m]:.2f}" for r in ratios)
            print(f"  {m:<52} {medians[m]:9.1f} ms   {ratio[m]:6.2f} x plain   (runs: {spread})")
    command = "python benchmarks/clars_step.py" + (" --quick" if args.quick else "") + (
        f" --threads {args.threads}" if args.threads != 1 else "")
    write_record(args.out, command, ("opacus",), repeats=repeats, runs=runs, results=results)
    print(f"\nwrote {args.out.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
