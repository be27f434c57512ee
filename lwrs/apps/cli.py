"""The ``lwrs`` command line.

* ``lwrs quadratic`` runs mGD, mNAG, LARS, LARS with warm-up, CLARS, TVLARS and
  LAMB on a layered quadratic whose constants are known, next to the theorems'
  own method, and prints a table, a PNG and a JSON; see :mod:`lwrs.apps.quadratic`.
* ``lwrs train`` trains a small model on MNIST-1D or digits with one optimizer
  and writes per-epoch metrics (JSON) and plots; see
  :mod:`lwrs.apps.train.loop`.
* ``lwrs reproduce`` runs the papers' experiments at small scale with several
  seeds and writes figures, tables and a verdict per claim; see
  :mod:`lwrs.apps.reproduce`.

``train`` and ``reproduce`` need torch and the ``train`` extra.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

from lwrs import theory

from .quadratic import GRID, NAMESPACES, Run, compare_optimizers, default_problem, format_table, load_namespace, theory_run

__all__ = ["main"]


def _progress(desc: str):
    """A wrapper ``wrap(items, total=None)`` that shows progress over runs (see :mod:`lwrs.apps.progress`)."""
    from .progress import progress

    return lambda items, total=None: progress(items, total, desc=desc, unit="run")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _writable_folder(command: str, out: pathlib.Path) -> str | None:
    """Make ``out`` (as ``mkdir -p``) and check that a file can be written there, before any work: the message, or
    None (a run would otherwise train fully and then fail to save)."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        return f"lwrs {command}: cannot write to --out {str(out)!r}: {e.strerror or e}"
    return None


_ALL_EXPERIMENTS = "fig1,fig2,fig3,table1"


def build_parser() -> argparse.ArgumentParser:
    from lwrs import __version__

    parser = argparse.ArgumentParser(prog="lwrs", description="Layer-wise rate scaling: LARS, CLARS, TVLARS, LAMB, mNAG.")
    parser.add_argument("--version", action="version", version=f"lwrs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quadratic", help="every optimizer and the CLARS theorems on a layered quadratic")
    q.add_argument("--backend", choices=sorted(NAMESPACES), default="numpy", help="array library (default numpy)")
    q.add_argument("--steps", type=_positive, default=300, help="steps per run, T, at least 10 (default 300)")
    q.add_argument("--batch-size", type=_positive, default=64, help="mini-batch size B (default 64)")
    q.add_argument("--seed", type=int, default=0, help="seed of the problem and the batches (default 0)")
    q.add_argument("--out", type=pathlib.Path, default=pathlib.Path("lwrs-out"),
                   help="folder for quadratic.png and quadratic.json (default ./lwrs-out)")
    _add_train_parser(sub)
    r = sub.add_parser("reproduce", help="the CLARS and TVLARS papers' experiments at small scale on MNIST-1D")
    r.add_argument("--quick", action="store_true", help="a few-minute smoke preset (2 seeds, tiny grids)")
    r.add_argument("--only", default=_ALL_EXPERIMENTS,
                   help="comma-separated experiments to run (default all: fig1,fig2,fig3,table1)")
    r.add_argument("--jobs", type=_positive, default=None, help="worker processes (default: one per CPU core)")
    r.add_argument("--out", type=pathlib.Path, default=pathlib.Path("lwrs-out/reproduce"),
                   help="folder for results.json, the figures, report.md and report.rst (default ./lwrs-out/reproduce)")
    r.add_argument("--from", dest="source", type=pathlib.Path, default=None, metavar="RESULTS_JSON",
                   help="train nothing: draw the reports and figures again from a results.json")
    return parser


def _add_train_parser(sub) -> None:
    from dataclasses import fields

    from .train import config as cfg

    t = sub.add_parser("train", help="train a small model with one optimizer; per-epoch metrics and plots")
    helps = {
        "dataset": "dataset", "model": "model", "optimizer": "optimizer (a -warmup or -freeze recipe around one)",
        "batch_size": "batch size B (accumulated over micro-batches)", "micro_batch": "largest forward/backward batch",
        "lr": "global rate (default: base-lr scaled by the rule)", "base_lr": "rate at base-batch (default 0.1; LAMB 0.002)",
        "scaling": "scaling rule of the rate", "eta": "trust coefficient (default 1e-3; CLARS 1e-2)",
        "decay": "schedule after any warm-up", "tvlars_lambda": "TVLARS decay per step",
        "tvlars_delay_epochs": "TVLARS delay d_e in epochs",
        "stats_samples": "training samples for the per-epoch gradient-variance ratio (0: off)",
    }
    choices = {"dataset": cfg.DATASETS, "model": cfg.MODELS, "optimizer": cfg.OPTIMIZERS, "decay": cfg.DECAYS,
               "scaling": cfg.SCALINGS}
    for f in fields(cfg.TrainConfig):
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], float)
        text = helps.get(f.name, f.name.replace("_", " "))
        if "(default" not in text:  # a default that depends on the optimizer is spelled out in the text
            text += f" (default {f.default})"
        # no default here: an option left out is absent, so one given that the run would ignore can be refused
        t.add_argument("--" + f.name.replace("_", "-"), type=kind, default=argparse.SUPPRESS, help=text,
                       choices=choices.get(f.name))
    t.add_argument("--out", type=pathlib.Path, default=pathlib.Path("lwrs-out/train"),
                   help="folder for train.json and train.png (default ./lwrs-out/train)")
    t.add_argument("--engine", default="auto", choices=("auto", "single", "ddp", "fsdp"),
                   help="several processes (launch with torchrun --nproc_per_node N -m lwrs train ...): "
                        "DistributedDataParallel or FSDP2; auto: ddp under torchrun, else single (default auto)")


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


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _environment(backend: str, extra: Sequence[str] = ()) -> dict[str, str]:
    """Versions and machine facts for the JSON record."""
    import importlib.metadata as md
    import os
    import platform

    from lwrs import __version__

    versions = {"lwrs": __version__, "python": platform.python_version()}
    dists = ["numpy", "array-api-compat", {"torch": "torch", "jax": "jax",
                                           "array-api-strict": "array-api-strict"}.get(backend, "numpy"), *extra]
    for dist in dict.fromkeys(dists):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"machine": f"{platform.machine()}, {platform.system()}, {_cpu_name()}, {cores} cores", **versions}


def _command_line(name: str, args: argparse.Namespace, skip: Sequence[str] = ("out", "command")) -> str:
    """The command with every option spelled out (``--out`` left out, so no local path lands in a record)."""
    parts = [f"lwrs {name}"]
    for key, value in vars(args).items():
        if key in skip or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


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


_TRAIN_DISTS = ("torch", "scipy", "mnist1d", "scikit-learn")


_INSTALL = {"torch": "torch==2.13.0 (the CPU build; pytorch.org has the others)", "mnist1d": '"lwrs[train]"',
            "sklearn": '"lwrs[train]"', "matplotlib": '"lwrs[train]"'}


def _missing(command: str, modules: Sequence[str]) -> str | None:
    """One line saying what to install, where ``lwrs train`` / ``lwrs reproduce`` cannot import ``modules``."""
    import importlib

    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if not missing:
        return None
    installs = " ".join(dict.fromkeys(_INSTALL[m] for m in missing))
    return f"lwrs {command} needs {', '.join(missing)}, not installed here: pip install {installs}"


def _ignored_options(config, given: dict) -> str | None:
    """A sentence naming the options given that ``config``'s run would ignore, or ``None``.

    Like torch.optim's and optax's constructors, which reject keywords they do not take,
    ``lwrs train`` refuses an option its optimizer or recipe has no use for rather than
    record a setting that had no effect.
    """
    ignored = [name for name in config.unused() if name in given]
    if not ignored:
        return None
    flag = {name: "--" + name.replace("_", "-") for name in ignored}
    by_lr = [flag[n] for n in ignored if n in ("base_lr", "base_batch", "scaling")]
    by_optimizer = [flag[n] for n in ignored if n not in ("base_lr", "base_batch", "scaling")]
    parts = []
    if by_optimizer:
        parts.append(f"{', '.join(by_optimizer)} {'has' if len(by_optimizer) == 1 else 'have'} no effect with "
                     f"--optimizer {config.optimizer}")
    if by_lr:
        parts.append(f"{', '.join(by_lr)} {'has' if len(by_lr) == 1 else 'have'} no effect with --lr given")
    return "; ".join(parts) + ("; leave it out" if len(ignored) == 1 else "; leave them out")


def train_command(args: argparse.Namespace) -> int:
    """Run ``lwrs train``: one run, its per-epoch table, ``train.json`` and ``train.png``.

    Exits 0 when the run finished, 1 when it diverged, 2 on bad options or a missing package.
    """
    from dataclasses import fields

    from .train.config import TrainConfig

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    try:
        config = TrainConfig(**given)
    except ValueError as e:
        print(f"lwrs train: {e}", file=sys.stderr)
        return 2
    ignored = _ignored_options(config, given)
    if ignored:
        print(f"lwrs train: {ignored}", file=sys.stderr)
        return 2
    missing = _missing("train", ["torch", {"mnist1d": "mnist1d", "digits": "sklearn"}[config.dataset], "matplotlib"])
    if missing:
        print(missing, file=sys.stderr)
        return 2
    from .train.data import load_dataset
    from .train.engine import start
    from .train.loop import train

    try:
        engine = start(args.engine)
    except ValueError as e:
        print(f"lwrs train: {e}", file=sys.stderr)
        return 2
    try:
        data = engine.first(lambda: load_dataset(config.dataset))  # rank 0 may write the dataset's cache
        record = train(config, data, progress=True, engine=engine)
    except ValueError as e:
        print(f"lwrs train: {e}", file=sys.stderr)
        return 2
    finally:
        engine.close()
    if engine.rank != 0:  # rank 0 reports and writes the record
        return 1 if record["diverged_epoch"] is not None else 0
    spelled = argparse.Namespace(**config.record(), engine=args.engine)  # every option the run uses, no other
    record = {"command": _command_line("train", spelled), "environment": _environment("torch", _TRAIN_DISTS), **record}
    print(f"{config.optimizer} on {config.model} / {data.name} (checksum {data.checksum[:12]}), B = "
          f"{config.batch_size}, peak rate {record['learning_rate']:.4g}, {record['steps_per_epoch']} steps per epoch, "
          f"{record['seconds']:.1f} s")
    print(f"{'epoch':>5} {'train loss':>10} {'test loss':>9} {'test acc':>8}")
    for e in record["epochs"]:
        cells = [f"{e[k]:.4f}" if e[k] is not None else "—" for k in ("train_loss", "test_loss", "test_accuracy")]
        print(f"{e['epoch']:>5} {cells[0]:>10} {cells[1]:>9} {cells[2]:>8}")
    args.out.mkdir(parents=True, exist_ok=True)
    from .records import write_json

    write_json(args.out / "train.json", record)
    _plot_train(args.out / "train.png", record)
    print(f"Wrote {args.out / 'train.json'} and {args.out / 'train.png'}.")
    if record["diverged_epoch"] is not None:
        print(f"lwrs train: diverged in epoch {record['diverged_epoch']}: {record['divergence']}", file=sys.stderr)
        return 1
    return 0


def train_figure(record: dict):
    """The figure of ``train.png``: losses and test accuracy, the per-layer rates, the variance ratio.

    Every axis is labelled; each legend sits below its panel, clear of the curves and of the other legends.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [e for e in record["epochs"] if e["test_accuracy"] is not None]
    xs = [e["epoch"] for e in epochs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5), layout="constrained")
    loss_ax = axes[0]
    lines = loss_ax.plot(xs[1:], [e["train_loss"] for e in epochs[1:]], label="train loss")
    lines += loss_ax.plot(xs, [e["test_loss"] for e in epochs], label="test loss")
    twin = loss_ax.twinx()
    lines += twin.plot(xs, [100 * e["test_accuracy"] for e in epochs], "k--", label="test accuracy (right axis)")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss and test accuracy")
    twin.set_ylabel("test accuracy (%)")
    twin.set_ylim(0, 100)
    loss_ax.legend(lines, [line.get_label() for line in lines], loc="upper center", bbox_to_anchor=(0.5, -0.14),
                   ncol=2, fontsize=8, frameon=False)
    panels = ((axes[1], "rate", r"per-layer rate $\gamma_k$ (epoch mean)", r"$\gamma_k$"),
              (axes[2], "variance_ratio", "gradient-variance ratio (CLARS Figure 2)",
               r"$\frac{1}{n}\sum_i\|g_{ik}\|^2/\|\bar g_k\|^2$"))
    for ax, key, title, ylabel in panels:
        for k, name in enumerate(record["layers"]):
            pts = [(e["epoch"], e["layers"][key][k]) for e in epochs if e["layers"].get(key)
                   and e["layers"][key][k] is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=name)
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        if ax.lines:
            ax.set_yscale("log")
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8, frameon=False)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def _plot_train(path: pathlib.Path, record: dict) -> None:
    import matplotlib.pyplot as plt

    fig = train_figure(record)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reproduce_command(args: argparse.Namespace) -> int:
    """Run ``lwrs reproduce``: the experiments, then ``results.json``, the reports and the figures.

    With ``--from FILE`` nothing is trained: the reports and figures are drawn
    again from a ``results.json`` written earlier.
    """
    import dataclasses
    import time

    from .reproduce import experiments, report

    missing = _missing("reproduce", ["matplotlib"] if args.source is not None else ["torch", "mnist1d", "matplotlib"])
    if missing:
        print(missing, file=sys.stderr)
        return 2
    if args.source is not None:
        given = [flag for flag, value, default in (("--quick", args.quick, False), ("--only", args.only, _ALL_EXPERIMENTS),
                                                    ("--jobs", args.jobs, None)) if value != default]
        if given:
            print(f"lwrs reproduce: {', '.join(given)} has no use with --from (nothing is trained)", file=sys.stderr)
            return 2
        try:
            record = json.loads(args.source.read_text())
            for key in ("preset", "preset_values"):
                record[key]
        except (OSError, ValueError, KeyError, TypeError) as e:
            reason = e.strerror if isinstance(e, OSError) else f"missing {e}" if isinstance(e, KeyError) else e
            print(f"lwrs reproduce: --from {str(args.source)!r} is not a results.json of lwrs reproduce: {reason}",
                  file=sys.stderr)
            return 2
    else:
        from .reproduce import running
        from .train.data import load_mnist1d

        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in experiments.EXPERIMENTS]
        if unknown or not names:
            print(f"lwrs reproduce: unknown experiments {unknown}; choose from {', '.join(experiments.EXPERIMENTS)}",
                  file=sys.stderr)
            return 2
        preset_name = "quick" if args.quick else "full"
        preset = experiments.PRESETS[preset_name]
        jobs = args.jobs or running.default_jobs()
        data = load_mnist1d()
        started = time.perf_counter()
        results = running.run_experiments(names, preset, data, jobs=jobs, progress=lambda name: _progress(f"reproduce {name}"))
        record = {"command": _command_line("reproduce", args, skip=("out", "command", "source")),
                  "preset": preset_name, "preset_values": dataclasses.asdict(preset),
                  "jobs": jobs, "seconds": round(time.perf_counter() - started, 1),
                  "environment": _environment("torch", _TRAIN_DISTS),
                  "dataset": {"name": data.name, "checksum": data.checksum, "train": len(data.y_train),
                              "test": len(data.y_test)}, **results}
    args.out.mkdir(parents=True, exist_ok=True)
    written = report.render(record, args.out)
    print((args.out / "report.md").read_text())
    print(f"Wrote {', '.join(written)} to {args.out}.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lwrs`` command."""
    args = build_parser().parse_args(argv)
    problem = _writable_folder(args.command, args.out)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    if args.command == "train":
        return train_command(args)
    if args.command == "reproduce":
        return reproduce_command(args)
    return quadratic(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
