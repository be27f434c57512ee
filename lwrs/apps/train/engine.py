r"""``lwrs train`` on several processes: DistributedDataParallel or FSDP2 (``fully_shard``), CPU and gloo.

Launch with ``torchrun --nproc_per_node N -m lwrs train ... [--engine ddp|fsdp]``. Each
of the :math:`W` processes takes a contiguous :math:`B/W` of every global batch of
:math:`B` samples (the same batches, in the same order, as one process), takes the mean
loss over its part, and the engine averages the gradients, so every step is the
one-process step on the global batch, up to the order of floating-point sums. lwrs adds
per step: the trust-ratio norms (under FSDP2, one all-reduce of every layer's partial
sums of squares; under DDP none, the gradients are already whole), CLARS's per-sample
statistics (one all-reduce), and one all-reduce of the loss for the record. Rank 0
prints and writes the record.

Examples
--------
One process is the ``single`` engine, which changes nothing:

>>> engine = start("auto")
>>> engine.kind, engine.rank, engine.world
('single', 0, 1)
"""

from __future__ import annotations

import dataclasses
import os

import torch

__all__ = ["ENGINES", "Engine", "start"]

ENGINES = ("auto", "single", "ddp", "fsdp")


@dataclasses.dataclass
class Engine:
    """How a run is spread: ``kind`` (``"single"``, ``"ddp"`` or ``"fsdp"``), this process's ``rank``, ``world``."""

    kind: str = "single"
    rank: int = 0
    world: int = 1
    owns_group: bool = False  # the process group was started here (and is destroyed by close)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """What the training step calls: DDP's wrapper, or the model sharded in place by FSDP2 (every layer that
        holds parameters, then the whole model), or the model itself."""
        if self.kind == "ddp":
            return torch.nn.parallel.DistributedDataParallel(model)
        if self.kind == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (self.world,))
            for module in list(model.modules())[1:]:
                if any(True for _ in module.parameters(recurse=False)):
                    fully_shard(module, mesh=mesh)
            fully_shard(model, mesh=mesh)
        return model

    def local(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global batch of sample indices."""
        if len(batch) % self.world:
            raise ValueError(f"batch size {len(batch)} is not divisible by the {self.world} processes")
        part = len(batch) // self.world
        return batch[self.rank * part:(self.rank + 1) * part]

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks (one all-reduce; ``value`` itself on one process)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t) / self.world

    def first(self, fn):
        """``fn()`` on rank 0, then on the other ranks (so that what rank 0 writes, e.g. a cache, they read)."""
        if self.world == 1:
            return fn()
        out = fn() if self.rank == 0 else None
        torch.distributed.barrier()
        return out if self.rank == 0 else fn()

    def close(self) -> None:
        """Destroy the process group if :func:`start` made it."""
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owns_group = False


def start(kind: str = "auto") -> Engine:
    """The engine of this process: ``"auto"`` is ``"ddp"`` when launched by torchrun with more than one process
    (``WORLD_SIZE`` > 1), else ``"single"``. Starts the gloo process group from torchrun's environment if none is
    running."""
    if kind not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {kind!r}")
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if initialised else int(os.environ.get("WORLD_SIZE", "1"))
    if kind == "auto":
        kind = "ddp" if world > 1 else "single"
    if kind == "single":
        if world > 1:
            raise ValueError(f"engine 'single' in one of {world} processes: pass --engine ddp or fsdp")
        return Engine()
    owns = False
    if not initialised:
        if "RANK" not in os.environ:
            raise ValueError(f"engine {kind!r} needs several processes: launch with torchrun --nproc_per_node N")
        torch.distributed.init_process_group("gloo")
        owns = True
    return Engine(kind, torch.distributed.get_rank(), torch.distributed.get_world_size(), owns)
