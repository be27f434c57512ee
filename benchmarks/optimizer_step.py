"""Optimizer step time: lwrs LARS / CLARS against torch SGD and the LARS of timm and pytorch_optimizer.

Every method steps its own copy of the same parameters and gradients; the methods are timed
round-robin (interleaved) and each reports its median. The bandwidth bound is the bytes the
minimal passes must move (28 B/param in float32: read w, g, v and write w, v for the update, read
w and g once more for the norms) divided by the in-place bandwidth measured with ``a.add_(b)``
in the same run. Where a method's tensors land in memory moves its time by up to 40% (LARS and
CLARS on the foreach path, which do the same work, differed by 6 ms in one run), so the whole
measurement is repeated ``--runs`` times (3) with fresh tensors, the methods allocating in a
rotated order each time; the median over runs is reported and every run is kept.

The run also measures the read bandwidth (``torch.dot``, two reads): on one core a pass costs
its reads (a line written right after it is read rides along), so the 28 B/param of the bound are
worth 28 × 8/12 ≈ 18.7 B of reads, and ``fused=True``, which reads w, g and v in both passes
(24 B/param: the norms pass reads v to check the state before any update), cannot come in under
``fused_read_floor_ms`` = 24 B/param over the read bandwidth, about 1.3× the bound.

Run ``python benchmarks/optimizer_step.py`` (``--quick`` for a smoke run); it writes
``benchmarks/results/optimizer_step.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import statistics
import time
from collections.abc import Callable

import torch

import lwrs
from _harness import interleaved_medians, resnet50_shapes, write_record
from lwrs.backends.torch import CLARS, LARS
from lwrs.backends.torch.conformance import load_timm_lars

HERE = pathlib.Path(__file__).resolve().parent
PARAMETER_SETS = {
    "resnet50": resnet50_shapes,
    "1000x64x64": lambda: [(64, 64)] * 1000,
}


def methods() -> dict[str, Callable[[list[torch.Tensor]], Callable[[], None]]]:
    """name -> builder(params) -> step()."""
    settings = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    out: dict[str, Callable] = {}

    def torch_opt(cls, **kw):
        def build(params):
            opt = cls(params, **kw)
            return opt.step
        return build

    out["lwrs LARS (foreach)"] = torch_opt(LARS, eta=1e-3, **settings)

    def possible_statistics(params):
        """Statistics that can come from the gradients: mean per-sample norm twice the gradient's norm."""
        norms = torch.stack([p.grad.norm() for p in params])
        return lwrs.NormStatistics(2 * norms, 4 * norms**2, 1)

    def clars(params):
        opt = CLARS(params, eta=1e-3, **settings)
        stats = possible_statistics(params)
        return lambda: opt.step(norm_stats=stats)

    out["lwrs CLARS (foreach)"] = clars
    out["lwrs LARS (fused=True)"] = torch_opt(LARS, eta=1e-3, fused=True, **settings)

    def clars_fused(params):
        opt = CLARS(params, eta=1e-3, fused=True, **settings)
        stats = possible_statistics(params)
        return lambda: opt.step(norm_stats=stats)

    out["lwrs CLARS (fused=True)"] = clars_fused
    out["torch SGD nesterov foreach"] = torch_opt(torch.optim.SGD, nesterov=True, foreach=True, **settings)
    out["torch SGD nesterov fused (no norms)"] = torch_opt(torch.optim.SGD, nesterov=True, fused=True, **settings)
    timm_lars = load_timm_lars()
    if timm_lars is not None:
        out["timm Lars foreach"] = torch_opt(timm_lars, nesterov=True, trust_coeff=1e-3, foreach=True, **settings)
    if importlib.util.find_spec("pytorch_optimizer") is not None:
        import pytorch_optimizer

        out["pytorch_optimizer LARS"] = torch_opt(pytorch_optimizer.LARS, nesterov=True, trust_coefficient=1e-3,
                                                  **settings)
    return out


def inplace_bandwidth(numel: int, repeats: int) -> float:
    """Bytes per second of ``a.add_(b)`` (read a, read b, write a) on float32 buffers already touched."""
    a, b = torch.ones(numel), torch.ones(numel)
    for _ in range(3):
        a.add_(b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.add_(b)
        times.append(time.perf_counter() - t0)
    return 12 * numel / min(times)


def read_bandwidth(numel: int, repeats: int) -> float:
    """Bytes per second of ``torch.dot(a, b)`` (read a, read b, write nothing) on float32 buffers already touched.

    On one core the reads set the pace: ``a.add_(b)`` (two reads and the write of a line just read) takes about
    as long as this dot product of the same length, so a pass costs its reads.
    """
    a, b = torch.ones(numel), torch.ones(numel)
    for _ in range(3):
        torch.dot(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.dot(a, b)
        times.append(time.perf_counter() - t0)
    return 8 * numel / min(times)


def bench(shapes, repeats: int, rotate: int = 0) -> dict[str, float]:
    """Median ms of every method; ``rotate`` shifts the order in which the methods allocate their tensors."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    steps = {}
    builders = list(methods().items())
    builders = builders[rotate % len(builders):] + builders[:rotate % len(builders)]
    for name, build in builders:
        params = [torch.nn.Parameter(b.clone()) for b in base]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        steps[name] = build(params)
        for _ in range(3):  # warm-up: allocate state, touch memory
            steps[name]()
    medians = interleaved_medians(steps, repeats)
    del steps, base, grads  # freed before the next run allocates
    return medians


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, small bandwidth buffer (smoke run)")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "optimizer_step.json")
    parser.add_argument("--runs", type=int, default=3,
                        help="measurements with fresh tensors, the methods allocating in a rotated order (default 3); "
                             "the median over runs is reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steadier on a shared machine, and the same for every method)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 25
    bandwidth = inplace_bandwidth(2**22 if args.quick else 2**26, repeats)
    reads = read_bandwidth(2**22 if args.quick else 2**26, repeats)
    results = {}
    for set_name, make in PARAMETER_SETS.items():
        shapes = make()
        numel = sum(torch.Size(s).numel() for s in shapes)
        runs = [bench(shapes, repeats, rotate=3 * r) for r in range(1 if args.quick else args.runs)]
        medians = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        bound_ms = 1e3 * 28 * numel / bandwidth
        # fused=True reads w, g and v twice (the norms pass reads v too, to check the state before any update)
        design_floor_ms = 1e3 * 24 * numel / reads
        results[set_name] = {
            "tensors": len(shapes), "parameters": numel, "bound_ms": bound_ms, "fused_read_floor_ms": design_floor_ms,
            "median_ms": medians, "ratio_to_bound": {k: v / bound_ms for k, v in medians.items()},
            "median_ms_per_run": runs,
        }
        print(f"\n{set_name}: {len(shapes)} tensors, {numel:,} parameters, bandwidth bound {bound_ms:.1f} ms, "
              f"read floor of the fused design {design_floor_ms:.1f} ms")
        for name, ms in sorted(medians.items(), key=lambda kv: kv[1]):
            print(f"  {name:<38} {ms:8.2f} ms   {ms / bound_ms:5.2f} x bound")
    write_record(args.out, "python benchmarks/optimizer_step.py" + (" --quick" if args.quick else "")
                 + (f" --runs {args.runs}" if args.runs != 3 and not args.quick else "")
                 + (f" --threads {args.threads}" if args.threads != 1 else ""),
                 ("timm", "pytorch_optimizer"),
                 settings=f"float32; lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4, trust coefficient 1e-3; "
                          f"{args.threads} torch thread(s)",
                 inplace_bandwidth_GBps=bandwidth / 1e9, read_bandwidth_GBps=reads / 1e9, repeats=repeats,
                 results=results)
    print(f"\nin-place bandwidth {bandwidth / 1e9:.1f} GB/s, read bandwidth {reads / 1e9:.1f} GB/s; "
          f"wrote {args.out.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
