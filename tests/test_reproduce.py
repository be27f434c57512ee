"""The tuned protocol of ``lwrs reproduce``: its verdict rules on synthetic results, its grids, its selection,
and the FC-freezing recipe behind the Figure 3 analogue."""

from __future__ import annotations

import pytest

pytest.importorskip("scipy")

from lwrs.apps.reproduce import rules  # noqa: E402
from lwrs.apps.reproduce.experiments import PRESETS  # noqa: E402
from lwrs.apps.reproduce.protocol import grids, plan, select, validation_split  # noqa: E402
from lwrs.apps.train.config import TrainConfig  # noqa: E402

NOISE = [0.03, -0.02, 0.01, -0.04, 0.02]  # seed-to-seed noise, shared by the methods of one seed


def _seeds(mean: float, jitter: float = 0.0) -> list[float]:
    return [mean + n + jitter * (-1) ** i for i, n in enumerate(NOISE)]


def _fig1(small: tuple[float, float], large: tuple[float, float], jitter: float) -> dict:
    out = {}
    for b, (lars, mnag) in ((128, small), (8192, large)):
        out[f"epochs/lars/B{b}"] = {"by_seed": _seeds(lars, jitter if b == 8192 else 0.0)}
        out[f"epochs/mnag/B{b}"] = {"by_seed": _seeds(mnag)}
    return out


@pytest.mark.parametrize("small, large, jitter, verdict", [
    ((0.90, 0.90), (0.60, 0.20), 0.005, "reproduced"),        # a clear paired effect, and the gap grows
    ((0.90, 0.90), (0.62, 0.60), 0.040, "not reproduced"),    # a 2-point effect within a 4-point paired spread
    ((0.70, 0.90), (0.70, 0.72), 0.005, "partly reproduced"),  # the gap grows, LARS still behind at B = 8192
])
def test_fig1_rule_needs_a_paired_effect_beyond_the_spread(small, large, jitter, verdict):
    v = rules.fig1_verdicts(_fig1(small, large, jitter), (128, 8192), ("epochs",))
    assert [x["verdict"] for x in v] == [verdict]
    assert "p = " in v[0]["evidence"] and "B=8192" in v[0]["evidence"]


def test_paired_rule_sees_through_seed_noise_but_not_through_paired_spread():
    # the seeds spread by 8 points, but seed by seed the effect is 3 points: it holds
    assert rules.paired(_seeds(0.73, 0.002), _seeds(0.70))["holds"]
    # the same means, with paired differences of ±5 points: it does not
    assert not rules.paired(_seeds(0.73, 0.05), _seeds(0.70))["holds"]
    # a significant but negligible effect (below one point) does not count
    assert not rules.paired(_seeds(0.705), _seeds(0.70))["holds"]
    with pytest.raises(ValueError, match="at least 2 seeds"):
        rules.paired([0.5], [0.4])


def test_fig3_rule_skips_a_model_that_did_not_learn_and_needs_every_rival():
    rivals = ("mnag-warmup", "mnag-freeze", "lars-warmup")
    s = {}
    for method, early in (("clars", 0.60), ("mnag-warmup", 0.40), ("mnag-freeze", 0.30), ("lars-warmup", 0.45)):
        s[f"mlp/{method}"] = {"early_by_seed": _seeds(early, 0.003), "by_seed": _seeds(0.9)}
        s[f"cnn/{method}"] = {"early_by_seed": _seeds(0.1), "by_seed": [0.1] * 5}  # chance: not judged
    v = rules.fig3_verdict(s, ("mlp", "cnn"), rivals)
    assert v["verdict"] == "reproduced" and "cnn: no method learned" in v["evidence"]
    s["mlp/lars-warmup"]["early_by_seed"] = _seeds(0.60, 0.04)  # as good as CLARS, within the spread
    assert rules.fig3_verdict(s, ("mlp", "cnn"), rivals)["verdict"] == "partly reproduced"
    few = {k.replace("mlp/", "tfm/"): {**v, "early_by_seed": v["early_by_seed"][:2], "by_seed": v["by_seed"][:2]}
           for k, v in s.items() if k.startswith("mlp/")}
    v = rules.fig3_verdict({**s, **few}, ("mlp", "tfm"), rivals)  # two seeds: reported, not judged
    assert v["verdict"] == "partly reproduced" and "tfm: 2 seeds, reported but not judged" in v["evidence"]
    only_chance = {k: v for k, v in s.items() if k.startswith("cnn/")}
    assert rules.fig3_verdict(only_chance, ("cnn",), rivals)["verdict"] == "not reproduced"


def test_table1_rule_compares_tvlars_with_the_better_rival_per_cell():
    s = {}
    for b, tv in ((512, 0.80), (1024, 0.80), (2048, 0.71)):
        s[f"epochs/mlp/lars-warmup/B{b}"] = {"by_seed": _seeds(0.70)}
        s[f"epochs/mlp/lamb-warmup/B{b}"] = {"by_seed": _seeds(0.50)}
        s[f"epochs/mlp/tvlars/B{b}"] = {"by_seed": _seeds(tv, 0.02)}
    v = rules.table1_verdicts(s, (512, 1024, 2048), ("epochs",))[0]
    assert v["verdict"] == "reproduced" and "2 of 3" in v["evidence"]  # B = 2048: +1 point within a 2-point spread
    for b in (512, 1024):
        s[f"epochs/mlp/tvlars/B{b}"] = {"by_seed": _seeds(0.70, 0.02)}
    assert rules.table1_verdicts(s, (512, 1024, 2048), ("epochs",))[0]["verdict"] == "not reproduced"


def test_the_full_protocol_tunes_every_method_with_both_budgets_and_a_transformer_row():
    p = PRESETS["full"]
    assert p.protocol == 2 and p.seeds == 5 and p.validation > 0 and set(p.budgets) == {"epochs", "steps"}
    fig1 = dict(grids("fig1", p, 50_000))
    assert len(fig1["epochs/lars/B128"]) >= 3 and len(fig1["epochs/mnag/B8192"]) >= 3
    assert fig1["steps/lars/B8192"][0].epochs * (50_000 // 8192) >= p.steps > fig1["epochs/lars/B8192"][0].epochs * 6
    fig3 = dict(grids("fig3", p, 60_000))
    assert {label.split("/")[0] for label in fig3} == {"mlp", "cnn-relu", "transformer"}
    clars = fig3["cnn-relu/clars"]
    assert len(clars) == 3 and clars[0].learning_rate() == pytest.approx(6.4)  # the paper's 0.1 * 8192 / 128 first
    assert clars[0].warmup_epochs == pytest.approx(0.1 * clars[0].epochs)  # the paper's 20 of 200 epochs
    table1 = dict(grids("table1", p, 60_000))
    assert [label for label in table1 if label.startswith("epochs/transformer/tvlars/")] == [
        "epochs/transformer/tvlars/B4096"]
    assert len(table1["epochs/mlp/tvlars/B1024"]) == 9  # three target rates times three lambdas


def test_the_quick_preset_stays_small():
    work = plan(["fig1", "fig2", "fig3", "table1"], PRESETS["quick"])
    assert sum(v["select_epochs"] + v["final_epochs"] for v in work.values()) <= 110
    assert work["fig1"]["select_runs"] > 0  # the quick run still goes through the selection


def test_selection_uses_a_validation_split_of_the_training_set_only():
    from lwrs.apps.train.data import load_digits

    data = load_digits()
    val = validation_split(data, 300)
    train_rows = {r.tobytes() for r in data.x_train}
    assert all(r.tobytes() in train_rows for r in val.x_test)  # held out of the training set
    assert not {r.tobytes() for r in val.x_test} & {r.tobytes() for r in val.x_train}
    assert len(val.y_test) == 300 and val.checksum != data.checksum
    with pytest.raises(ValueError, match="validation size"):
        validation_split(data, len(data.y_train))
    rec = lambda acc, diverged=None: {"diverged_epoch": diverged, "epochs": [{"test_accuracy": acc}]}  # noqa: E731
    cands = [TrainConfig(lr=3.0), TrainConfig(lr=1.0), TrainConfig(lr=0.3)]
    assert select(cands, [rec(None, 2), rec(0.7), rec(0.6)]) == 1  # a diverged run is never chosen


def test_fc_freezing_holds_the_head_then_steps_it_like_sgd_from_zero_momentum():
    """The mnag-freeze collapse at release (issue 17) is not a bug of the freezing: the frozen head does not move,
    its momentum starts at zero when released, and from then on it follows torch.optim.SGD (Nesterov) exactly."""
    torch = pytest.importorskip("torch")
    from lwrs.backends.torch import MNAG

    torch.manual_seed(0)
    body, head = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(2, 5))
    ref = head.detach().clone().requires_grad_()
    opt = MNAG([{"params": [body]}, {"params": [head]}], lr=1.0, momentum=0.9, weight_decay=5e-4)
    sgd = torch.optim.SGD([ref], lr=1.0, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for _ in range(4):  # frozen: the training loop drops the head's gradient
        body.grad, head.grad = torch.randn(5, 3), None
        opt.step()
    assert torch.equal(head.detach(), ref.detach())
    for _ in range(5):
        g = torch.randn(2, 5)
        body.grad, head.grad, ref.grad = torch.randn(5, 3), g.clone(), g.clone()
        opt.step()
        sgd.step()
    torch.testing.assert_close(head.detach(), ref.detach(), rtol=1e-5, atol=1e-5)


def test_the_training_loop_freezes_the_head_for_freeze_epochs_only():
    pytest.importorskip("torch")
    from lwrs.apps.train.data import load_digits
    from lwrs.apps.train.loop import train

    rec = train(TrainConfig(dataset="digits", optimizer="mnag-freeze", lr=0.1, batch_size=256, epochs=2,
                            freeze_epochs=1, stats_samples=0), load_digits())
    head_norm = [e["layers"]["weight_norm"][-1] for e in rec["epochs"]]
    assert head_norm[1] == head_norm[0] != head_norm[2]
