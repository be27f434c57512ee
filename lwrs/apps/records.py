"""Records the applications write: strict JSON."""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["write_json"]


def write_json(path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as strict JSON: tuples become lists, NaN and infinities become ``null``.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "r.json"
    >>> write_json(path, {"a": (1.0, float("nan"))}); path.read_text().split()
    ['{', '"a":', '[', '1.0,', 'null', ']', '}']
    """
    path.write_text(json.dumps(_plain(payload), indent=1, allow_nan=False) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
