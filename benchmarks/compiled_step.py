"""Compiled optimizer step: ``torch.compile(opt.step)`` against the eager foreach and fused steps of lwrs LARS.

Every method steps its own copy of the same parameters and gradients (ResNet-50's 161 shapes,
float32); the methods are timed round-robin and each reports its median. The compiled step
uses a tensor learning rate and ``on_nonfinite="skip"`` (the sync-free mode, one graph); its
first call, the compilation, is timed apart and not in the median. torch SGD (foreach) is
there as the plain reference. On CUDA the compiled step is the fast path (inductor generates
the kernels); this run is on the CPU.

Run ``python benchmarks/compiled_step.py`` (``--quick`` for a smoke run on 8 small tensors);
it writes ``benchmarks/results/compiled_step.json``.
"""

from __future__ import annotations

import argparse
import pathlib
import time
import warnings

import torch

from _harness import interleaved_medians, resnet50_shapes, write_record
from lwrs.backends.torch import LARS

HERE = pathlib.Path(__file__).resolve().parent
SETTINGS = dict(momentum=0.9, nesterov=True, weight_decay=5e-4)


def methods() -> dict:
    """name -> builder(params) returning a zero-argument step."""

    def lars(**kwargs):
        return lambda params: LARS(params, lr=0.1, eta=1e-3, **SETTINGS, **kwargs).step

    def compiled(params):
        opt = LARS(params, lr=torch.tensor(0.1), eta=1e-3, on_nonfinite="skip", **SETTINGS)
        return torch.compile(opt.step)

    def sgd(params):
        return torch.optim.SGD(params, lr=0.1, foreach=True, **SETTINGS).step

    return {"lwrs LARS (foreach)": lars(), "lwrs LARS (fused=True)": lars(fused=True),
            "lwrs LARS (torch.compile)": compiled, "torch SGD nesterov foreach (no norms)": sgd}


def bench(shapes, repeats: int) -> tuple[dict[str, float], float]:
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    steps, compile_s = {}, 0.0
    for name, build in methods().items():
        params = [torch.nn.Parameter(b.clone()) for b in base]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        steps[name] = build(params)
        t0 = time.perf_counter()
        steps[name]()  # the compiled step compiles here
        if "compile" in name:
            compile_s = time.perf_counter() - t0
        for _ in range(2):  # warm-up: state allocated, memory touched
            steps[name]()
    return interleaved_medians(steps, repeats), compile_s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 tensors of 64 x 64, few repeats (smoke run)")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "compiled_step.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)  # dynamo's notes on array_api_compat's caches
    torch.set_num_threads(1)
    repeats = 3 if args.quick else 25
    sets = {"8x64x64": [(64, 64)] * 8} if args.quick else {"resnet50": resnet50_shapes()}
    results = {}
    for set_name, shapes in sets.items():
        medians, compile_s = bench(shapes, repeats)
        ref = medians["lwrs LARS (foreach)"]
        results[set_name] = {
            "tensors": len(shapes), "parameters": sum(torch.Size(s).numel() for s in shapes),
            "median_ms": medians, "ratio_to_foreach": {k: v / ref for k, v in medians.items()},
            "compile_seconds": compile_s,
        }
        print(f"\n{set_name}: {len(shapes)} tensors; compilation {compile_s:.0f} s")
        for name, ms in sorted(medians.items(), key=lambda kv: kv[1]):
            print(f"  {name:<38} {ms:8.2f} ms   {ms / ref:5.2f} x foreach")
    write_record(args.out, "python benchmarks/compiled_step.py" + (" --quick" if args.quick else ""), (),
                 settings="float32; lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4, trust coefficient 1e-3; "
                          "one torch thread; torch.compile default backend (inductor, CPU)",
                 repeats=repeats, results=results)
    print(f"\nwrote {args.out.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
