"""Progress of the ``lwrs`` commands on standard error: readable on a terminal and in a log.

Where standard error is a terminal, a tqdm bar; where it is not (a pipe, a log
file, CI), a plain line now and then (about ten per bar, each a complete line),
instead of the carriage-return updates a bar would write there.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

__all__ = ["progress_bar", "progress"]


class _Lines:
    """A bar that prints ``desc: n/total units, key=value`` every ``ceil(total / 10)`` updates and at the end."""

    def __init__(self, total: int | None, desc: str, unit: str, stream: TextIO, enabled: bool):
        self.total, self.desc, self.unit, self.stream, self.enabled = total, desc, unit, stream, enabled
        self.every = max(1, math.ceil(total / 10)) if total else 1
        self.n = 0
        self.postfix = ""

    def set_postfix(self, **values: Any) -> None:
        self.postfix = "".join(f", {k} {v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.enabled and (self.n % self.every == 0 or (self.total is not None and self.n >= self.total)):
            of = f"/{self.total}" if self.total is not None else ""
            print(f"{self.desc}: {self.n}{of} {self.unit}s{self.postfix}", file=self.stream, flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int | None, desc: str, unit: str, *, enabled: bool = True, stream: TextIO | None = None):
    """A progress bar with tqdm's ``update(n)``, ``set_postfix(**values)`` and ``close()``.

    A tqdm bar where ``stream`` (default standard error) is a terminal and tqdm
    is installed; otherwise plain lines, about ten per bar. ``enabled=False``
    prints nothing.

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> bar = progress_bar(20, "train", "epoch", stream=out)
    >>> for _ in range(20):
    ...     bar.set_postfix(loss="0.5")
    ...     bar.update(1)
    >>> bar.close()
    >>> lines = out.getvalue().splitlines()
    >>> len(lines), lines[-1], "\\r" in out.getvalue()
    (10, 'train: 20/20 epochs, loss 0.5', False)
    """
    stream = stream if stream is not None else sys.stderr
    if enabled and getattr(stream, "isatty", lambda: False)():
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm is in the "cli" and "train" extras
            pass
        else:
            return tqdm(total=total, desc=desc, unit=unit, file=stream, leave=False)
    return _Lines(total, desc, unit, stream, enabled)


def progress(items: Iterable, total: int | None = None, *, desc: str, unit: str = "run",
             stream: TextIO | None = None) -> Iterator:
    """``items``, one at a time, with a :func:`progress_bar` over them.

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> list(progress(range(3), 3, desc="runs", stream=out)), out.getvalue()
    ([0, 1, 2], 'runs: 1/3 runs\\nruns: 2/3 runs\\nruns: 3/3 runs\\n')
    """
    bar = progress_bar(total, desc, unit, stream=stream)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
