"""Shared by the benchmarks: interleaved timing, and the record of where and with what they ran."""

from __future__ import annotations

import importlib.metadata as md
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable


def interleaved_medians(steps: dict[str, Callable[[], object]], repeats: int, untimed: int = 0,
                        per_sample: int = 1, slow: frozenset[str] = frozenset()) -> dict[str, float]:
    """Median milliseconds of each step, timed round-robin so that every method sees the same machine load.

    ``untimed`` steps run before each timed sample, so that a method is not timed right after
    another method has freed (and the allocator returned to the system) the memory it needs;
    each sample is the mean of ``per_sample`` consecutive steps. Methods in ``slow`` (many
    times the others' cost, where that noise does not matter) get one timed step per round.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            k = 1 if name in slow else per_sample
            for _ in range(0 if name in slow else untimed):
                step()
            t0 = time.perf_counter()
            for _ in range(k):
                step()
            times[name].append((time.perf_counter() - t0) / k)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(*dists: str) -> dict[str, str | None]:
    """Python's version and each installed distribution's (``None`` where absent)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in dists:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def write_record(path: pathlib.Path, command: str, peers: tuple[str, ...], **fields) -> None:
    """Write a benchmark's JSON record: the command, the machine, the versions, then ``fields``."""
    import json

    import torch

    import lwrs

    record = {
        "command": command,
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "system": platform.system()},
        "versions": {**versions(*peers), "torch": torch.__version__, "lwrs": lwrs.__version__},
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("MALLOC_", "OMP_", "MKL_"))},
        **fields,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The 161 parameter shapes of torchvision's ResNet-50 (25,557,032 parameters), built by hand."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = width * 4
            shapes += [(width, in_ch, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (out, width, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, in_ch, 1, 1), (out,), (out,)]
            in_ch = out
    return shapes + [(1000, 2048), (1000,)]
