"""Exact CLARS on a transformer: a training step with per-sample norms, against a plain step and peers.

The model is a small transformer classifier: a Linear embedding of 16 input features, 4
``nn.TransformerEncoderLayer`` (d = 256, 4 heads, feed-forward 1024, dropout 0.1, batch first),
mean pooling and a Linear head, on T = 128 tokens and B = 32 samples. Every method runs complete
training steps (forward, backward, whatever it needs for the per-layer per-sample norms,
optimizer step) on the same batch; the methods are timed round-robin and each reports its
median, as a multiple of the plain SGD step. The whole measurement is repeated ``--runs`` times
(3) with fresh models; the ratio reported is the median over runs, and every run's ratio is kept.
It runs with one torch thread and with two (``--threads``). The methods are:

* plain: torch.optim.SGD (momentum 0.9, Nesterov, foreach), no per-sample work;
* lwrs LARS: the same step with lwrs's LARS (no per-sample work);
* lwrs CLARS, exact (default): ``PerSampleNorms(model)``, then the ``foreach`` CLARS step. Each
  Linear on the sequence, the attention projections included, is measured by the ghost norm or
  by building its per-sample gradients inside its own backward, whichever the rule of
  ``benchmarks/sequence_linear.py`` picks (here: built, which then *is* the weight gradient);
* the same with ``PerSampleNorms(model, fused=False)``: hooks only, autograd's own gradients;
* torch.func: per-sample gradients with vmap(grad) (different dropout masks per sample), their
  norms, then CLARS;
* Opacus: the model with Opacus's ``DPMultiheadAttention`` (``ModuleValidator.fix``) under
  ``GradSampleModuleFastGradientClipping`` (ghost clipping), its norms, then CLARS. It runs
  sequence-first: Opacus 1.6 merges the heads of batch-first inputs in the wrong order.

The script also checks that Opacus's per-sample norms and lwrs's agree (the packed in-projection
against Opacus's separate q, k, v projections), so the race is fair. Run
``python benchmarks/transformer_step.py`` (``--quick`` for a smoke run on a tiny model); it writes
``benchmarks/results/transformer_step.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import pathlib
import platform
import statistics
import time
import warnings

warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus's hooks on the first layer
warnings.filterwarnings("ignore", message="There is a performance drop")  # torch.func's batching fallbacks

import torch
import torch.nn as nn

import lwrs
from _harness import cpu_name, interleaved_medians, write_record
from lwrs.backends.torch import CLARS, LARS, PerSampleNorms

HERE = pathlib.Path(__file__).resolve().parent
FEATURES, CLASSES = 16, 10


class Classifier(nn.Module):
    """Linear embedding, encoder layers, mean over the tokens, Linear head; inputs (B, T, F), or (T, B, F)."""

    def __init__(self, layers: int, dim: int, heads: int, dropout: float = 0.1, batch_first: bool = True):
        super().__init__()
        self.embed = nn.Linear(FEATURES, dim)
        self.layers = nn.Sequential(*(nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=dropout,
                                                                 batch_first=batch_first) for _ in range(layers)))
        self.head = nn.Linear(dim, CLASSES)
        self.batch_first = batch_first

    def forward(self, x):
        h = self.layers(self.embed(x))
        if self.batch_first:
            return self.head(h.mean(dim=1))
        return self.head(h.mean(dim=0, keepdim=True))[0]  # every layer's input sequence-first, the head's too


def shape(quick: bool) -> dict[str, int]:
    return (dict(layers=2, dim=32, heads=4, tokens=16, batch=8) if quick
            else dict(layers=4, dim=256, heads=4, tokens=128, batch=32))


def loss_of(out, y):
    return nn.functional.cross_entropy(out, y)


def build_methods(make, x, y):
    """name -> step() closure, each with its own copy of the model."""
    torch.manual_seed(0)
    out = {}

    def with_optimizer(model, opt, forward=None, stats=None):
        forward = forward or model

        def step():
            opt.zero_grad()
            loss_of(forward(x), y).backward()
            opt.step(**({} if stats is None else {"norm_stats": stats()}))
        return step

    def plain():
        model = make()
        return with_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                                                     foreach=True))

    def lars():
        model = make()
        return with_optimizer(model, LARS(model.parameters(), lr=1.0, eta=1e-3))

    def clars_exact(fused=True):
        model = make()
        return with_optimizer(model, CLARS(model.parameters(), lr=1.0, eta=1e-2,
                                           norm_source=PerSampleNorms(model, fused=fused)))

    def clars_torch_func():
        model = make()
        opt = CLARS(model.parameters(), lr=1.0, eta=1e-2)
        names = [n for n, _ in model.named_parameters()]

        def one(p, xi, yi):
            return loss_of(torch.func.functional_call(model, p, (xi[None],)), yi[None]) / x.shape[0]

        per_sample = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0), randomness="different")

        def step():
            opt.zero_grad()
            grads = per_sample({n: p.detach() for n, p in model.named_parameters()}, x, y)
            s1, s2 = [], []
            for n, p in zip(names, model.parameters()):
                norms = x.shape[0] * torch.linalg.vector_norm(grads[n].reshape(x.shape[0], -1), dim=1)
                s1.append(norms.sum())
                s2.append((norms * norms).sum())
                p.grad = grads[n].sum(dim=0)
            opt.step(norm_stats=lwrs.NormStatistics(torch.stack(s1), torch.stack(s2), x.shape[0]))
        return step

    def clars_opacus():
        model, wrapped = opacus_model(lambda: make(batch_first=False))
        params = list(model.parameters())
        opt = CLARS(params, lr=1.0, eta=1e-2)
        x_seq = x.transpose(0, 1).contiguous()

        def stats():  # Opacus (mean reduction) reports the norms of each sample's own loss gradient
            return lwrs.NormStatistics(torch.stack([p._norm_sample.sum() for p in params]),
                                       torch.stack([(p._norm_sample ** 2).sum() for p in params]), x.shape[0])
        return with_optimizer(model, opt, lambda _: wrapped(x_seq), stats)

    out["plain SGD step"] = plain()
    out["lwrs LARS step"] = lars()
    out["lwrs CLARS, exact (default)"] = clars_exact()
    out["lwrs CLARS, exact (hooks only, fused=False)"] = clars_exact(fused=False)
    out["torch.func per-sample grads + CLARS"] = clars_torch_func()
    if importlib.util.find_spec("opacus") is not None:
        out["Opacus ghost-clipping norms + CLARS"] = clars_opacus()
    return out


def opacus_model(make):
    """The model with DPMultiheadAttention (the same weights), and Opacus's ghost-clipping wrapper around it.

    ``make`` builds a sequence-first model: Opacus 1.6's DPMultiheadAttention merges the heads of
    batch-first inputs in the wrong order (a different function at the same cost), so Opacus runs
    sequence-first, where it computes the same function as ``nn.MultiheadAttention``.
    """
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.validators import ModuleValidator

    original = make()
    state = {}
    for key, value in original.state_dict().items():  # the packed in-projection as Opacus's q, k, v Linears
        if ".in_proj_" in key:
            prefix, kind = key.split("in_proj_")
            state.update({f"{prefix}{q}linear.{kind}": part for q, part in zip("qkv", value.chunk(3))})
        else:
            state[key] = value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ModuleValidator.fix(copy.deepcopy(original))
        model.load_state_dict(state)
        wrapped = GradSampleModuleFastGradientClipping(model, batch_first=False, loss_reduction="mean",
                                                       use_ghost_clipping=True)
    return model, wrapped


def check_opacus_agrees(make, x, y) -> float | None:
    """Largest relative difference between Opacus's and lwrs's per-layer sums of per-sample norms.

    lwrs's packed in-projection is compared with Opacus's q, k and v projections taken together,
    sample by sample; the models are sequence-first (see :func:`opacus_model`), without dropout.
    """
    if importlib.util.find_spec("opacus") is None:
        return None
    torch.manual_seed(0)
    model = make(dropout=0.0, batch_first=False)
    twin = copy.deepcopy(model)
    norms = PerSampleNorms(model, batch_dim=1)
    batch, x = x.shape[0], x.transpose(0, 1).contiguous()
    loss_of(model(x), y).backward()
    ours = {n: norms.sums([p])[p][0] * batch for n, p in model.named_parameters()}  # each sample's own loss
    theirs_model, wrapped = opacus_model(lambda: twin)
    loss_of(wrapped(x), y).backward()
    per_sample = {n: p._norm_sample for n, p in theirs_model.named_parameters()}
    worst = 0.0
    for name, value in ours.items():
        if "in_proj" in name:
            prefix, kind = name.split("in_proj_")
            theirs = torch.sqrt(sum(per_sample[f"{prefix}{q}linear.{kind}"] ** 2 for q in "qkv")).sum()
        else:
            theirs = per_sample[name].sum()
        worst = max(worst, float((theirs - value).abs() / value))
    return worst


def measure(make, x, y, repeats: int) -> dict[str, float]:
    """One run: fresh models and optimizers for every method, warmed up, then interleaved medians (ms)."""
    steps = build_methods(make, x, y)
    warm = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        step()
        warm[name] = time.perf_counter() - t0
    slow = frozenset(m for m, t in warm.items() if t > 5 * warm["plain SGD step"])  # torch.func
    return interleaved_medians(steps, repeats, untimed=0, per_sample=1, slow=slow)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, few repeats (smoke run)")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "transformer_step.json")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default 1 2)")
    parser.add_argument("--runs", type=int, default=3, help="independent runs (fresh models each)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per run")
    args = parser.parse_args(argv)
    s = shape(args.quick)
    repeats = 2 if args.quick else args.repeats
    runs = 1 if args.quick else args.runs
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s["batch"], s["tokens"], FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (s["batch"],), generator=g)

    def make(dropout=0.1, batch_first=True):
        return Classifier(s["layers"], s["dim"], s["heads"], dropout, batch_first)

    label = (f"transformer ({s['layers']} layers, d={s['dim']}, {s['heads']} heads), "
             f"T={s['tokens']}, B={s['batch']}")
    results = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        per_run = [measure(make, x, y, repeats) for _ in range(runs)]
        ratios = [{m: ms / run["plain SGD step"] for m, ms in run.items()} for run in per_run]
        medians = {m: statistics.median(run[m] for run in per_run) for m in per_run[0]}
        ratio = {m: statistics.median(r[m] for r in ratios) for m in ratios[0]}
        agreement = check_opacus_agrees(make, x, y)
        name = f"{label}, {threads} thread{'s' if threads > 1 else ''}"
        results[name] = {"median_ms": medians, "ratio_to_plain": ratio, "ratio_to_plain_per_run": ratios,
                         "opacus_vs_lwrs_max_relative_difference": agreement}
        print(f"\n{name}" + (f"  (Opacus vs lwrs norms: max rel. diff {agreement:.1e})" if agreement is not None else ""))
        for m in sorted(ratio, key=ratio.get):
            spread = ", ".join(f"{r[m]:.2f}" for r in ratios)
            print(f"  {m:<52} {medians[m]:9.1f} ms   {ratio[m]:6.2f} x plain   (runs: {spread})", flush=True)
    command = "python benchmarks/transformer_step.py" + (" --quick" if args.quick else "") + (
        f" --threads {' '.join(map(str, args.threads))}" if args.threads != [1, 2] else "")
    machine = {"cpu": cpu_name(), "threads": " and ".join(map(str, args.threads)), "system": platform.system()}
    write_record(args.out, command, ("opacus",), machine=machine, repeats=repeats, runs=runs, results=results)
    print(f"\nwrote {args.out.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
