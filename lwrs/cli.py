"""The ``lwrs`` command line.

``lwrs quadratic`` runs mGD, mNAG, LARS, LARS with warm-up, CLARS, TVLARS and
LAMB on a layered quadratic whose constants are known, next to the theorems'
own method, and prints a table, a PNG and a JSON; see :mod:`lwrs.quadratic`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Iterable, Sequence

from . import theory
from .quadratic import GRID, NAMESPACES, Run, compare_optimizers, default_problem, format_table, load_namespace, theory_run

__all__ = ["main"]


def _progress(desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is in the "cli" extra; without it the runs are silent
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
    q = sub.add_parser("quadratic", help="every optimizer and the CLARS theorems on a layered quadratic")
    q.add_argument("--backend", choices=sorted(NAMESPACES), default="numpy", help="array library (default numpy)")
    q.add_argument("--steps", type=_positive, default=300, help="steps per run, T (default 300)")
    q.add_argument("--batch-size", type=_positive, default=64, help="mini-batch size B (default 64)")
    q.add_argument("--seed", type=int, default=0, help="seed of the problem and the batches (default 0)")
    q.add_argument("--out", type=pathlib.Path, default=pathlib.Path("lwrs-out"),
                   help="folder for quadratic.png and quadratic.json (default ./lwrs-out)")
    return parser


def _plot(path: pathlib.Path, runs: list[Run], theory_criteria: list[float], bound: float, limits: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        left.plot(r.criteria, label=f"{r.name} (lr {r.learning_rate:.3g})")
    left.plot(theory_criteria, "k--", label="mNAG, theorem's largest gamma")
    left.axhline(bound, color="k", linestyle=":", label="Theorem 2 bound on the mean")
    left.set(yscale="log", xlabel="step t", ylabel=r"$\sum_k q_k \|\nabla_k f(w_t)\|^2$",
             title="Convergence criterion")
    left.legend(fontsize=7)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    by_name = {r.name: r for r in runs}
    for k, limit in enumerate(limits):
        colour = colours[k % len(colours)]
        for name, style in (("clars", "-"), ("lars", "--")):
            if name in by_name and by_name[name].rates:
                right.plot([rates[k] for rates in by_name[name].rates], style, color=colour,
                           label=f"{name}, layer {k}")
        right.axhline(limit, color=colour, linestyle=":", linewidth=1)
    right.set(yscale="log", xlabel="step t", ylabel=r"$\gamma_k$",
              title="Per-layer rates (dotted: Theorem 2's per-layer limit)")
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _environment(backend: str) -> dict[str, str]:
    """Versions and machine facts for the JSON record."""
    import importlib.metadata as md
    import platform

    from . import __version__

    versions = {"lwrs": __version__, "python": platform.python_version()}
    for dist in ("numpy", "array-api-compat", {"torch": "torch", "jax": "jax",
                                               "array-api-strict": "array-api-strict"}.get(backend, "numpy")):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return {"machine": f"{platform.machine()}, {platform.system()}, {platform.processor() or 'cpu'}", **versions}


def quadratic(args: argparse.Namespace) -> int:
    """Run ``lwrs quadratic``: the table, the figure and the JSON."""
    xp = load_namespace(args.backend)
    problem = default_problem(args.seed)
    if args.batch_size > problem.num_samples:
        print(f"lwrs quadratic: batch_size must lie in [1, {problem.num_samples}], got {args.batch_size}", file=sys.stderr)
        return 2
    if args.steps < 10:
        print(f"lwrs quadratic: steps must be at least 10, got {args.steps}", file=sys.stderr)
        return 2
    start = problem.loss(problem.initial_params(xp))
    beta = 0.9
    c = problem.constants(batch_size=args.batch_size, beta=beta, steps=args.steps, initial_gap=start)
    limits = theory.theorem2_step_limits(c)
    bound = theory.theorem2_bound(c, limits.largest)
    runs = compare_optimizers(problem, xp, batch_size=args.batch_size, steps=args.steps, seed=args.seed,
                              progress=_progress("lwrs quadratic"))
    theory_criteria = theory_run(problem, xp, gamma=limits.largest, beta=beta, batch_size=args.batch_size,
                                 steps=args.steps, seed=args.seed)
    theory_mean = sum(theory_criteria) / len(theory_criteria)
    per_layer_limits = [min((1 - beta) / (8 * lk), (1 - beta) * args.batch_size / (8 * lk * mk))
                        for lk, mk in zip(c.lipschitz, c.variance_factors)]
    target = 1e-3 * runs[0].criteria[0]

    print(f"Layered quadratic: L_k = {list(c.lipschitz)}, L_g = {c.global_lipschitz:g}, "
          f"M_k = {[round(m, 2) for m in c.variance_factors]}, M = {c.variance_floor:.3g}, n = {problem.num_samples}, "
          f"f(w0) - f* = {start:.4g}; B = {args.batch_size}, T = {args.steps}, backend {args.backend}.")
    print(f"Each optimizer: the best of {len(GRID)} learning rates (1/27 to 27 times its base rate), same batches. "
          f"Target: criterion <= {target:.3g} (1e-3 of its start). "
          "'Thm 2 ok': share of steps whose gamma_k meet Theorem 2 (with beta = 0 for mgd).")
    print(format_table(runs, target))
    print(f"Theorem 2 (beta = {beta}): largest gamma = {limits.largest:.4g} (gamma_k = gamma / L_k), binding "
          f"condition '{limits.binding}'; bound on the mean criterion = {bound.total:.4g} "
          f"({bound.optimization:.4g} + {bound.noise:.4g}); mNAG at that gamma: {theory_mean:.4g} "
          f"({theory_mean / bound.total:.2f} of the bound).")

    args.out.mkdir(parents=True, exist_ok=True)
    _plot(args.out / "quadratic.png", runs, theory_criteria, bound.total, per_layer_limits)
    record = {
        # the options that shape the result; --out is left out, so no local path lands in the record
        "command": (f"lwrs quadratic --backend {args.backend} --steps {args.steps} "
                    f"--batch-size {args.batch_size} --seed {args.seed}"),
        "environment": _environment(args.backend),
        "backend": args.backend, "batch_size": args.batch_size, "steps": args.steps, "seed": args.seed,
        "constants": {"lipschitz": c.lipschitz, "global_lipschitz": c.global_lipschitz,
                      "variance_factors": c.variance_factors, "variance_floor": c.variance_floor,
                      "initial_gap": start},
        "theorem2": {"largest_gamma": limits.largest, "binding": limits.binding, "bound": bound.total,
                     "mean_criterion": theory_mean},
        "runs": [{"name": r.name, "learning_rate": r.learning_rate, "mean_criterion": r.mean_criterion,
                  "final_loss": r.final_loss, "steps_to_target": r.steps_to(target),
                  "admissible_fraction": r.admissible_fraction, "diverged": r.diverged} for r in runs],
    }
    (args.out / "quadratic.json").write_text(json.dumps(record, indent=2))
    print(f"Wrote {args.out / 'quadratic.png'} and {args.out / 'quadratic.json'}.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lwrs`` command."""
    args = build_parser().parse_args(argv)
    return quadratic(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
