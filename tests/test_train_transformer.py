"""``lwrs train --model transformer``: MNIST-1D as a sequence of patches through ``nn.TransformerEncoderLayer``.

Every optimizer runs on it (CLARS with exact per-sample norms of the attention blocks), and mNAG, LARS and
CLARS learn it in a scaled-down run (a subset of MNIST-1D, 60 steps), far above chance (10%).
"""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mnist1d")
pytest.importorskip("matplotlib")

from lwrs.apps import cli  # noqa: E402
from lwrs.apps.train.config import OPTIMIZERS, TrainConfig  # noqa: E402
from lwrs.apps.train.data import Dataset, load_mnist1d  # noqa: E402
from lwrs.apps.train.loop import train  # noqa: E402
from lwrs.apps.train.models import build_model, layer_names  # noqa: E402


@pytest.fixture(scope="module")
def mnist1d(mnist1d_dir):
    return load_mnist1d(directory=mnist1d_dir)


def _subset(data: Dataset, train: int, test: int) -> Dataset:
    return Dataset(data.name, data.x_train[:train], data.y_train[:train], data.x_test[:test], data.y_test[:test],
                   data.classes, data.checksum)


def test_the_transformer_reads_the_signal_as_ordered_patches():
    model = build_model("transformer", 40, 10, seed=0)
    assert [n for n in layer_names(model) if "self_attn" in n] == [
        "body.1.self_attn.in_proj_weight", "body.1.self_attn.out_proj.weight",
        "body.2.self_attn.in_proj_weight", "body.2.self_attn.out_proj.weight"]
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    patches_swapped = torch.cat([x[:, 4:8], x[:, :4], x[:, 8:]], dim=1)
    with torch.no_grad():
        assert not torch.allclose(model(x), model(patches_swapped))  # the position code tells the patches apart
    with pytest.raises(ValueError, match="multiple of patch=4"):
        build_model("transformer", 42, 10, seed=0)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_trains_the_transformer(mnist1d, optimizer):
    config = TrainConfig(model="transformer", optimizer=optimizer, batch_size=128, micro_batch=64, epochs=2,
                         warmup_epochs=1, freeze_epochs=1, lr=0.02 if optimizer.startswith("mnag") else None,
                         stats_samples=128)
    record = train(config, _subset(mnist1d, 512, 256))
    assert record["diverged_epoch"] is None
    last = record["epochs"][-1]
    assert all(math.isfinite(e["train_loss"]) for e in record["epochs"][1:]) and last["test_loss"] < 2.4
    assert len(last["layers"]["variance_ratio"]) == len(record["layers"]) == 10
    assert all(r >= 1 for r in last["layers"]["variance_ratio"])


@pytest.mark.parametrize("optimizer, options", [("mnag", ["--lr", "0.05"]), ("lars", []), ("clars", ["--eta", "0.1"])])
def test_the_transformer_learns(mnist1d, mnist1d_dir, monkeypatch, tmp_path, optimizer, options):
    """A scaled-down `lwrs train --model transformer`: 6000 samples, B = 256, 5 epochs (115 steps)."""
    import lwrs.apps.train.data as data_module

    monkeypatch.setattr(data_module, "load_mnist1d", lambda: _subset(mnist1d, 6000, 2000))
    argv = ["train", "--dataset", "mnist1d", "--model", "transformer", "--optimizer", optimizer, "--batch-size", "256",
            "--epochs", "5", "--stats-samples", "0", "--out", str(tmp_path), *options]
    assert cli.main(argv) == 0
    record = json.loads((tmp_path / "train.json").read_text())
    assert record["config"]["model"] == "transformer" and record["steps_per_epoch"] == 23
    accuracy = record["epochs"][-1]["test_accuracy"]
    assert accuracy > 0.3, [e["test_accuracy"] for e in record["epochs"]]


def test_gradient_statistics_with_the_training_recorder_equal_its_own(mnist1d):
    """CLARS's recorder, reused for the per-epoch statistics, gives the same numbers and keeps recording."""
    from lwrs.apps.train.loop import gradient_statistics
    from lwrs.backends.torch import PerSampleNorms

    model = build_model("transformer", 40, 10, seed=1).double()
    x = torch.from_numpy(mnist1d.x_train[:48]).double()
    y = torch.from_numpy(mnist1d.y_train[:48])
    alone = gradient_statistics(model, x, y, chunk=20)
    recorder = PerSampleNorms(model)
    shared = gradient_statistics(model, x, y, chunk=20, recorder=recorder)
    for key in alone:
        assert shared[key] == pytest.approx(alone[key], rel=1e-9), key
    torch.nn.functional.cross_entropy(model(x), y).backward()  # the recorder still sees every layer
    assert len(recorder.sums([p for p in model.parameters() if p.ndim > 1])) == 10
