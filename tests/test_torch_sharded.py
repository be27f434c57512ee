"""Sharded parameters against one process: FSDP2, tensor parallelism (Shard(0) and Shard(1)) and ZeRO-1.

Two processes, gloo on loopback, CPU. One spawn for the whole module runs every case; each case
trains a few steps and the tests compare the gathered parameters with one process training on the
global batch (float64 to 1e-12, float32 to 1e-6), and count the collectives of ``opt.step()``.
"""

from __future__ import annotations

import gc
import pickle

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import lwrs  # noqa: E402
from lwrs.backends.torch import CLARS, LAMB, LARS, MNAG, TVLARS, PerSampleNorms  # noqa: E402

WORLD, BATCH, STEPS = 2, 8, 3
F64, F32 = torch.float64, torch.float32
LARS_KW = dict(lr=1.0, eta=0.02, weight_decay=1e-3)

# name -> (engine, optimizer, keyword arguments, dtype, per-sample statistics: None, "recorder" or "given")
CASES = {
    "fsdp-lars": ("fsdp", LARS, LARS_KW, F64, None),
    "fsdp-lars-reference": ("fsdp", LARS, dict(LARS_KW, foreach=False), F64, None),
    "fsdp-lars-fused": ("fsdp", LARS, dict(LARS_KW, fused=True), F64, None),
    "fsdp-lars-norm_of_sum": ("fsdp", LARS, dict(LARS_KW, weight_decay_form="norm_of_sum"), F64, None),
    "fsdp-mnag": ("fsdp", MNAG, dict(lr=0.1, weight_decay=1e-3), F64, None),
    "fsdp-clars": ("fsdp", CLARS, LARS_KW, F64, "recorder"),
    "fsdp-clars-hooks": ("fsdp", CLARS, LARS_KW, F64, "recorder-hooks"),
    "fsdp-clars-reference": ("fsdp", CLARS, dict(LARS_KW, foreach=False), F64, "recorder"),
    # clip_grad_norm_ between backward and step: the statistics follow the clipped sharded gradients (review-diff, 3)
    "fsdp-clars-clip": ("fsdp", CLARS, LARS_KW, F64, "recorder"),
    # a one-row layer: rank 1's shards of its weight and bias are empty, and take the others' ratio (review-follow, 3)
    "fsdp-narrow-clars-clip": ("fsdp-narrow", CLARS, LARS_KW, F64, "recorder"),
    "fsdp-tvlars": ("fsdp", TVLARS, dict(LARS_KW, decay_coefficient=0.1, delay_steps=1), F64, None),
    "fsdp-lamb": ("fsdp", LAMB, dict(lr=0.01, weight_decay=1e-2), F64, None),
    "fsdp-lamb-reference": ("fsdp", LAMB, dict(lr=0.01, weight_decay=1e-2, foreach=False), F64, None),
    "fsdp-lars-f32": ("fsdp", LARS, LARS_KW, F32, None),
    "fsdp-clars-f32": ("fsdp", CLARS, LARS_KW, F32, "recorder"),
    "fsdp-tvlars-f32": ("fsdp", TVLARS, dict(LARS_KW, decay_coefficient=0.1, delay_steps=1), F32, None),
    "fsdp-lamb-f32": ("fsdp", LAMB, dict(lr=0.01, weight_decay=1e-2), F32, None),
    "tp-lars": ("tp", LARS, LARS_KW, F64, None),
    "tp-lars-reference": ("tp", LARS, dict(LARS_KW, foreach=False), F64, None),
    "tp-lars-fused": ("tp", LARS, dict(LARS_KW, fused=True), F64, None),
    "tp-clars": ("tp", CLARS, LARS_KW, F64, "given"),
    "tp-tvlars": ("tp", TVLARS, dict(LARS_KW, decay_coefficient=0.1, delay_steps=1), F64, None),
    "tp-lamb": ("tp", LAMB, dict(lr=0.01, weight_decay=1e-2), F64, None),
    "tp-lars-f32": ("tp", LARS, LARS_KW, F32, None),
    "tp-clars-f32": ("tp", CLARS, LARS_KW, F32, "given"),
    "tp-tvlars-f32": ("tp", TVLARS, dict(LARS_KW, decay_coefficient=0.1, delay_steps=1), F32, None),
    "tp-lamb-f32": ("tp", LAMB, dict(lr=0.01, weight_decay=1e-2), F32, None),
    "zero1-lars": ("zero1", LARS, LARS_KW, F64, None),
    "zero1-clars": ("zero1", CLARS, LARS_KW, F64, "recorder"),
    "fsdp-bf16-lars": ("fsdp-bf16", LARS, LARS_KW, F32, None),
    "fsdp-bf16-clars": ("fsdp-bf16", CLARS, LARS_KW, F32, "recorder"),
}


def make_model(engine: str, dtype: torch.dtype) -> torch.nn.Module:
    """Uneven shards for FSDP2 (5 and 3 rows over 2 ranks), a LayerNorm, and for TP a column-parallel,
    a row-parallel and a plain (replicated, not DTensor) Linear."""
    torch.manual_seed(0)
    nn = torch.nn
    if engine == "tp":
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
    if engine == "fsdp-narrow":
        return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 1), nn.Linear(1, 3)).to(dtype)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def batches(dtype):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 6, generator=g, dtype=torch.float64).to(dtype),
             torch.randn(BATCH, 3, generator=g, dtype=torch.float64).to(dtype)) for _ in range(STEPS)]


def given_statistics(model, x, y):
    """Per-sample statistics of the full batch from a one-process copy (the same on every rank)."""
    copy = make_model("tp", next(model.parameters()).dtype)
    copy.load_state_dict({k: lwrs.backends.torch.distributed.gather(v) for k, v in model.state_dict().items()})
    norms = PerSampleNorms(copy, all_reduce=False)
    torch.nn.functional.mse_loss(copy(x), y).backward()
    return norms.norm_statistics(list(copy.parameters()))


def train(name, model, forward=None, rank=0, world=1, count=False):
    """``STEPS`` steps of case ``name``; returns the gathered parameters and each step's collective counts."""
    engine, cls, kwargs, dtype, stats = CASES[name]
    forward = forward or model
    kwargs = dict(kwargs)
    if stats and stats.startswith("recorder"):
        kwargs["norm_source"] = PerSampleNorms(model, fused=stats == "recorder")
    if engine == "zero1" and world > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **kwargs)
    else:
        opt = cls(model.parameters(), **kwargs)
    data_parallel = engine != "tp"
    local = BATCH // world if data_parallel else BATCH
    counts = []
    for x, y in batches(dtype):
        if data_parallel:
            x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
        step_kwargs = {"norm_stats": given_statistics(model, x, y)} if stats == "given" else {}
        opt.zero_grad()
        if engine == "zero1" and "norm_source" in kwargs:
            kwargs["norm_source"].reset()  # ZeRO's zero_grad is torch's, not CLARS.zero_grad (which resets them)
        torch.nn.functional.mse_loss(forward(x), y).backward()
        if name.endswith("-clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        if count:
            from torch.distributed.tensor.debug import CommDebugMode

            mode = CommDebugMode()
            with mode:
                opt.step(**step_kwargs)
            counts.append(mode.get_total_counts())
        else:
            opt.step(**step_kwargs)
    gather = lwrs.backends.torch.distributed.gather
    return [gather(p.detach()).to(torch.float64) for p in model.parameters()], counts


def shard(engine, model, mesh):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if engine == "tp":
        parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})  # Shard(0), Shard(1)
        return model
    if engine == "zero1":
        return torch.nn.parallel.DistributedDataParallel(model)
    policy = MixedPrecisionPolicy()
    if engine == "fsdp-bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in (model[0], model[3], *model[4:]):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def run_cases(rank, out_dir):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}
    for name, (engine, *_rest) in CASES.items():
        model = make_model(engine, CASES[name][3])
        forward = shard(engine, model, mesh)
        results[name] = train(name, model, forward, rank, WORLD, count=True)
    with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
        pickle.dump(results, f)


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        run_cases(rank, out_dir)  # its models are garbage once it returns ...
    finally:
        gc.collect()  # ... and their reference cycles are freed while the group is alive (see docs/distributed.rst)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    mp.spawn(worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]


def single_process(name):
    engine, _, _, dtype, _ = CASES[name]
    model = make_model(engine if engine in ("tp", "fsdp-narrow") else "fsdp", dtype)
    return train(name, model)[0]


@pytest.mark.parametrize("name", [n for n in CASES if "bf16" not in n])
def test_sharded_training_equals_one_process(ranks, name):
    dtype = CASES[name][3]
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    expected = single_process(name)
    for rank in ranks:
        got = rank[name][0]
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, **tol)
    for a, b in zip(ranks[0][name][0], ranks[1][name][0]):
        assert torch.equal(a, b)  # every rank holds the same model


@pytest.mark.parametrize("name", ["fsdp-bf16-lars", "fsdp-bf16-clars"])
def test_fsdp_mixed_precision_bf16_parameters_fp32_reduce(ranks, name):
    """bf16 compute, fp32 gradients and master weights: the update differs from the fp32 run's by bf16's
    resolution (a few percent of the update), and the weights stay fp32."""
    expected = single_process(name)
    for a, b, w0 in zip(ranks[0][name][0], expected, make_model("fsdp", torch.float64).parameters()):
        assert torch.isfinite(a).all()
        moved = torch.linalg.vector_norm(b - w0)
        assert moved > 1e-3  # the steps did move the weights
        assert torch.linalg.vector_norm(a - b) <= 0.05 * moved


@pytest.mark.parametrize("name, expected", [
    ("fsdp-lars", 1), ("fsdp-tvlars", 1), ("fsdp-mnag", 1), ("tp-lars", 1), ("tp-clars", 1),
    ("fsdp-clars", 2),  # the per-sample statistics' all_reduce over the data-parallel ranks, then the norms'
    ("fsdp-lamb", 2), ("tp-lamb", 2),  # ||w||, ||g|| before the moments; the direction's ||u|| after them
    ("fsdp-lars-norm_of_sum", 1),  # |g + wd w| summed over shards with the others
])
def test_one_collective_per_step_for_all_layers(ranks, name, expected):
    """The layers' norms are reduced together: the count does not grow with the number of layers (4 to 6 here)."""
    assert len(list(make_model("tp" if name.startswith("tp") else "fsdp", F64).parameters())) >= 4
    for rank in ranks:
        assert rank[name][1] == [expected] * STEPS


def test_per_sample_norms_refuse_tensor_parallel_layers():
    """A tensor-parallel layer's per-sample norms would be a shard's: a clear error instead (no process group
    needed: a one-rank mesh)."""
    pytest.importorskip("torch.distributed.tensor")
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.device_mesh import DeviceMesh

    if dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        model = torch.nn.Linear(3, 2)
        model.weight = torch.nn.Parameter(DTensor.from_local(model.weight.detach(), mesh, [Replicate()]))
        model.bias = torch.nn.Parameter(DTensor.from_local(model.bias.detach(), mesh, [Replicate()]))
        PerSampleNorms(model, fused=False)
        with pytest.raises(NotImplementedError, match="tensor-parallel"):
            model(DTensor.from_local(torch.randn(4, 3), mesh, [Replicate()]))
    finally:
        gc.collect()  # FSDP2's reference cycles, freed while the group is alive (see docs/distributed.rst)
        dist.destroy_process_group()
