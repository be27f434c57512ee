"""The ``lwrs`` command line.

``lwrs demo`` runs every optimizer on a toy layered quadratic and prints a
comparison table; see :mod:`lwrs.demo`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence

from .demo import GRID, NAMESPACES, format_table, load_namespace, run_demo

__all__ = ["main"]


def _progress(desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is in the "cli" extra; without it the demo runs silently
        return iter

    def wrap(items: Iterable) -> Iterable:
        return tqdm(list(items), desc=desc, unit="run", file=sys.stderr)

    return wrap


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lwrs", description="Layer-wise rate scaling: LARS, CLARS, TVLARS, LAMB, mNAG.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run every optimizer on a toy layered quadratic and print a table")
    demo.add_argument("--backend", choices=sorted(NAMESPACES), default="numpy", help="array library (default numpy)")
    demo.add_argument("--steps", type=_positive, default=300, help="steps per run (default 300)")
    demo.add_argument("--batch-size", type=_positive, default=64, help="mini-batch size B (default 64)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the problem and the batches (default 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lwrs`` command."""
    args = build_parser().parse_args(argv)
    xp = load_namespace(args.backend)
    try:
        problem, runs = run_demo(
            xp, steps=args.steps, batch_size=args.batch_size, seed=args.seed, progress=_progress("lwrs demo")
        )
    except ValueError as err:
        print(f"lwrs demo: {err}", file=sys.stderr)
        return 2
    start = problem.loss(problem.initial_params(xp))
    print(
        f"Layered quadratic: {len(problem.curvatures)} layers, L_k = {list(problem.layer_lipschitz)}, "
        f"n = {problem.num_samples}, B = {args.batch_size}, {args.steps} steps, backend {args.backend}, "
        f"f(w0) - f* = {start:.4g}. Each optimizer: the best of {len(GRID)} learning rates (1/27 to 27 times its base rate)."
    )
    print(format_table(runs, start))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
