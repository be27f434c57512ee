"""The fused CPU kernels of ``fused_cpu.cpp``, built on first use and cached by torch.

``LARS(..., fused=True)`` (and CLARS, TVLARS, MNAG) uses them: two passes over the
parameters per step, one for all norms and one for the update, the minimum the
algorithm allows. The first use compiles the extension (about 40 s; it needs a C++
compiler and ``ninja``); later uses load it from torch's extension cache.
"""

from __future__ import annotations

import functools
import pathlib

import torch

__all__ = ["load", "check_fusable"]


@functools.lru_cache(maxsize=1)
def load():
    """The compiled extension module (``layer_sums``: the (K, 4) sums of squares; ``mnag_update``)."""
    from torch.utils.cpp_extension import load as build

    source = pathlib.Path(__file__).with_name("fused_cpu.cpp")
    try:
        # built on the machine that runs it, so -march=native is safe and lets the loops use its vector units
        # at::parallel_for expands to an OpenMP pragma here, so the extension itself needs -fopenmp
        # -ffp-contract=off: no fused multiply-add, so the decayed direction is rounded as the core rounds it
        return build(name="lwrs_fused_cpu_v6", sources=[str(source)],
                     extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
                     extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # a missing compiler or ninja: say so plainly
        raise RuntimeError(f"fused=True needs the lwrs CPU extension, which failed to build: {err}") from err


def check_fusable(params: list[torch.Tensor], grads: list[torch.Tensor], labels: list[str] | None = None,
                  buffers: list[torch.Tensor] | None = None) -> None:
    """Raise ``ValueError`` naming the first layer the fused kernels cannot take (the kernels check the same
    things themselves, so a step calls this only to name the parameter after they refused one)."""
    bufs = buffers if buffers is not None else [None] * len(params)
    for j, (p, g, d) in enumerate(zip(params, grads, bufs)):
        k = labels[j] if labels is not None else j
        if p.device.type != "cpu":
            raise ValueError(f"fused=True is CPU-only: parameter {k} is on {p.device}; use foreach=True")
        if p.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"fused=True takes float32 or float64: parameter {k} is {p.dtype}; use foreach=True")
        if not (p.is_contiguous() and g.is_contiguous()) or g.dtype != p.dtype:
            raise ValueError(f"fused=True needs contiguous layers with gradients of their dtype: parameter {k}")
        if d is not None and not d.is_contiguous():
            raise ValueError(f"fused=True needs contiguous state: the momentum buffer of parameter {k} is not")
