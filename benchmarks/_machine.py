"""What every benchmark records about where it ran: the CPU and the versions of the libraries."""

from __future__ import annotations

import importlib.metadata as md
import pathlib
import platform


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
        **fields,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
