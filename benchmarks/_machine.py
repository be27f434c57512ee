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
