"""Where building a Linear layer's per-sample gradients beats the ghost norm, on sequences.

For a Linear layer (p inputs, d outputs) applied to T tokens per sample, ``PerSampleNorms``
can measure the per-sample gradient norms in two ways:

* hooks, beside autograd's weight gradient: the ghost norm, two T x T Gram matrices per sample,
  T^2 (p + d) multiply-adds (or, when 2 T^2 > p d, a second build of the per-sample gradients);
* built and fused (``per_sample_fused``): every sample's d x p gradient is built once, a chunk
  of samples at a time, and their sum *is* the weight gradient: no extra multiply-adds, but a
  d x p matrix per sample is written and read twice.

The default mode builds when T^2 (p + d) >= 16 p d. This script times a forward and backward
pass of one layer (input gradient included) for several shapes, plain and with each method,
and says whether the rule picked the faster one. Run ``python benchmarks/sequence_linear.py``
(``--quick`` for a smoke run); it writes ``benchmarks/results/sequence_linear.json``.
"""

from __future__ import annotations

import argparse
import pathlib

import torch

from _harness import interleaved_medians, write_record
from lwrs.backends.torch import PerSampleNorms, per_sample_fused

HERE = pathlib.Path(__file__).resolve().parent

# (batch, tokens T, inputs p, outputs d)
SHAPES = [(128, 64, 256, 256), (64, 128, 512, 512), (128, 16, 256, 256), (128, 8, 768, 768),
          (32, 64, 1024, 1024), (256, 32, 128, 512), (64, 256, 256, 256)]
QUICK_SHAPES = [(16, 32, 64, 64), (16, 4, 128, 128)]


def step_for(layer: torch.nn.Linear, x: torch.Tensor):
    def step():
        layer.zero_grad()
        x.grad = None
        layer(x).square().sum().backward()
    return step


def time_shape(batch: int, tokens: int, p: int, d: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, tokens, p, requires_grad=True)
    layers = {name: torch.nn.Linear(p, d) for name in ("plain", "hooks", "built, fused")}
    saved = per_sample_fused._GHOST_FACTOR
    per_sample_fused._GHOST_FACTOR = 0  # build whatever the shape
    try:
        recorders = {"hooks": PerSampleNorms(layers["hooks"], fused=False),
                     "built, fused": PerSampleNorms(layers["built, fused"], fused=True)}
        steps = {name: step_for(layer, x) for name, layer in layers.items()}

        def reset_then(step):
            def run():
                for r in recorders.values():
                    r.reset()
                step()
            return run

        steps = {name: reset_then(step) for name, step in steps.items()}
        for step in steps.values():
            step()
        medians = interleaved_medians(steps, repeats, untimed=1)
    finally:
        per_sample_fused._GHOST_FACTOR = saved
    base = medians["plain"]
    hooks, built = medians["hooks"], medians["built, fused"]
    rule_builds = tokens * tokens * (p + d) >= saved * p * d
    return {"shape": {"batch": batch, "tokens": tokens, "p": p, "d": d},
            "median_ms": medians, "ratio_to_plain": {k: v / base for k, v in medians.items()},
            "rule_builds": rule_builds, "faster": "built, fused" if built < hooks else "hooks",
            "rule_picks_faster": rule_builds == (built < hooks)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (smoke run)")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "sequence_linear.json")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as clars_step.py)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else 15
    rows = []
    print(f"{'B, T, p, d':<22} {'hooks':>7} {'built':>7}  (x plain)  rule     faster")
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        row = time_shape(*shape, repeats)
        r = row["ratio_to_plain"]
        print(f"{str(shape):<22} {r['hooks']:7.2f} {r['built, fused']:7.2f}             "
              f"{'build' if row['rule_builds'] else 'hooks':<8} {row['faster']}"
              + ("" if row["rule_picks_faster"] else "   <- rule picks the slower"))
        rows.append(row)
    command = "python benchmarks/sequence_linear.py" + (" --quick" if args.quick else "") + (
        f" --threads {args.threads}" if args.threads != 1 else "")
    write_record(args.out, command, (),
                 repeats=repeats, rule="build when T^2 (p + d) >= 16 p d", results=rows)
    print(f"\nwrote {args.out.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
