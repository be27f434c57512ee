"""docs/conformance.rst is what the conformance kit reports now.

Regenerate it with ``python -m lwrs.testing --rst docs/conformance.rst``.

How strictly the committed page is compared, and why: lwrs's own rows (``lwrs.*``) and the
page's text are compared byte for byte, because they change only when lwrs changes, and then
the page must be regenerated in the same commit. The peers' rows (timm, pytorch_optimizer,
optax, torch.optim.SGD) are compared by their *verdict* only: how many problems match, the
closest convention of the core, and on which problems the trajectory diverges. CI installs the
newest release of each peer; a release that only moves a divergence's printed values or
rewords nothing of substance leaves the verdict alone and must not break lwrs's CI, while a
release that changes a peer's convention (what the page tells users) fails this test with the
regeneration command, so a maintainer reviews the new verdict instead of finding a stale page.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest

from lwrs.testing.__main__ import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
REGENERATE = "python -m lwrs.testing --rst docs/conformance.rst"
_ROW = re.compile(r"   \* - ``(?P<label>[^`]+)``")
_BULLET = re.compile(r"\* ``(?P<label>[^`]+)``: ")


def _is_peer(label: str) -> bool:
    return not label.startswith("lwrs.")


def split_page(text: str) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """The lines compared exactly, and each peer row's verdict (matches, convention, problems it diverges on)."""
    lines, exact, verdicts = text.splitlines(), [], {}
    i = 0
    while i < len(lines):
        row, bullet = _ROW.match(lines[i]), _BULLET.match(lines[i])
        if row and _is_peer(row["label"]):
            cells = [line.split("- ", 1)[1] for line in lines[i:i + 5]]
            problems = tuple(re.findall(r"``(\w+)`` \(step", cells[3]))
            verdicts[cells[0]] = (cells[1], cells[2], *problems)
            i += 5
        elif bullet and _is_peer(bullet["label"]):  # a peer's first divergence: its values may move
            i += 1
        else:
            exact.append(lines[i])
            i += 1
    return exact, verdicts


def test_the_conformance_page_is_generated_by_the_kit(tmp_path):
    if importlib.util.find_spec("apex") is not None:  # pragma: no cover - not installable on the CPU CI
        pytest.skip("apex is installed here; the committed page was generated where it is not")
    target = tmp_path / "conformance.rst"
    assert main(["--rst", str(target)], out=lambda line: None) == 0
    committed = (ROOT / "docs" / "conformance.rst").read_text(encoding="utf-8")
    now_exact, now_verdicts = split_page(target.read_text(encoding="utf-8"))
    old_exact, old_verdicts = split_page(committed)
    stale = [f"  - {line}" for line in old_exact if line not in now_exact][:5]
    stale += [f"  + {line}" for line in now_exact if line not in old_exact][:5]
    assert now_exact == old_exact, (
        "docs/conformance.rst is stale (lwrs's rows or the page's text changed): run " + REGENERATE + "\n"
        + "\n".join(stale))
    changed = {label: (old_verdicts.get(label), verdict) for label, verdict in now_verdicts.items()
               if old_verdicts.get(label) != verdict}
    changed.update({label: (verdict, None) for label, verdict in old_verdicts.items() if label not in now_verdicts})
    assert not changed, (
        "a peer's verdict changed with the installed release (page, then now): review it and run " + REGENERATE
        + "\n" + "\n".join(f"  {label}: {old} -> {new}" for label, (old, new) in changed.items()))
    for peer in ("timm.optim.Lars", "pytorch_optimizer.LARS", "optax.lars", "lwrs.backends.torch.LARS",
                 "lwrs.backends.jax.lars", "lwrs.backends.torch.CLARS", "lwrs.backends.jax.clars",
                 "lwrs.backends.torch.TVLARS", "lwrs.backends.jax.tvlars"):
        assert f"``{peer}" in committed


def test_peer_rows_are_compared_by_verdict_and_lwrs_rows_exactly():
    committed = (ROOT / "docs" / "conformance.rst").read_text(encoding="utf-8")
    exact, verdicts = split_page(committed)
    moved = re.sub(r"(``optax\.lars``: problem 'zero_gradient', step 0, layer 2 'frozen.weight': relative error )"
                   r"[^;]+", r"\g<1>9.99", committed)
    assert moved != committed and split_page(moved) == (exact, verdicts)  # a peer's values moved: same verdict
    assert verdicts["``optax.lars`` (lars)"] == (
        "6/7", "weight_decay_form='norm_of_sum'; nesterov=False; adapt='all'; decay='all'; eps=0.0; larc_clip=False",
        "zero_gradient")
    renamed = committed.replace("     - 6/7", "     - 5/7", 1)
    assert split_page(renamed)[1] != verdicts  # a peer's verdict changed: the test fails
    lwrs_row = committed.replace("``lwrs.backends.torch.CLARS`` (clars)\n     - 7/7",
                                 "``lwrs.backends.torch.CLARS`` (clars)\n     - 6/7")
    assert lwrs_row != committed and split_page(lwrs_row)[0] != exact  # lwrs's own rows: byte for byte


def test_the_page_states_what_the_kit_found_for_each_peer():
    committed = (ROOT / "docs" / "conformance.rst").read_text(encoding="utf-8")
    assert "implied trust ratio 2.5 (= eta/lambda)" in committed  # pytorch_optimizer and optax, zero gradient
    assert "implied trust ratio 0.666667 (= 1/lr)" in committed  # timm's trust_clip, zero-norm layer, lr 1.5
    assert "outside the momentum buffer" in committed  # timm, pytorch_optimizer, torch.optim.SGD
    assert "norm_stats=" in committed and "official code" in committed  # the CLARS and TVLARS kinds
