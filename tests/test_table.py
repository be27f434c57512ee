"""The optimizer table is the one list: every factory, torch class and doc page agrees with it."""

from __future__ import annotations

import inspect
import pathlib

import numpy as np
import pytest

import lwrs
from lwrs.table import OPTIMIZERS, REQUIRED, SAME

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=lambda s: s.name)
def test_core_factory_signature_is_the_table(spec):
    assert spec.factory is getattr(lwrs, spec.name)
    sig = inspect.signature(spec.factory)
    assert [h.core_name for h in spec.hyperparameters] == list(sig.parameters)
    for h in spec.hyperparameters:
        default = sig.parameters[h.core_name].default
        expected = inspect.Parameter.empty if h.default is REQUIRED else h.default
        assert default == expected, f"{spec.name}.{h.core_name}: factory default {default!r}, table {h.default!r}"


@pytest.mark.parametrize("spec", [s for s in OPTIMIZERS if s.torch_class], ids=lambda s: s.name)
def test_torch_class_signature_is_the_table(spec):
    torch_backend = pytest.importorskip("lwrs.backends.torch")
    cls = getattr(torch_backend, spec.torch_class)
    parameters = {}  # a class that passes **kwargs on to its base takes the base's keywords
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass) and klass.__module__.startswith("lwrs"):
            parameters.update(inspect.signature(klass.__init__).parameters)
    for h in spec.hyperparameters:
        if h.torch_name is None:
            continue
        name, _, index = h.torch_name.partition("[")
        assert name in parameters, f"{spec.torch_class} has no {name!r} (table: core {h.core_name!r})"
        default = parameters[name].default
        if index:
            default = default[int(index.rstrip("]"))]
        expected = h.default if h.torch_default is SAME else h.torch_default
        expected = inspect.Parameter.empty if expected is REQUIRED else expected
        assert default == expected, f"{spec.torch_class}.{h.torch_name}: default {default!r}, table {expected!r}"


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=lambda s: s.name)
def test_defaults_build_an_optimizer_that_steps(spec):
    required = {h.core_name: 0.1 for h in spec.hyperparameters if h.default is REQUIRED}
    opt = spec.factory(**required)
    assert opt.name == spec.name
    params = [np.ones((2, 2)), np.ones(2)]
    state = opt.init(params)
    stats = lwrs.per_sample_norm_statistics([np.ones((3, 2, 2)), np.ones((3, 2))])
    _, _, diag = opt.step(params, [np.ones((2, 2)), np.ones(2)], state,
                          norm_stats=stats if spec.uses_norm_stats else None)
    adapt = [spec.adapt_default(w) for w in params] if spec.adapt_default else [False, False]
    # a non-adapted layer has ratio 1; masks from the table decide which layers are adapted
    assert [r != 1.0 for r in diag.trust_ratios.tolist()] == adapt


def test_lookup_names_the_table_on_a_typo():
    with pytest.raises(KeyError, match="no optimizer 'larz'; the table has mgd, mnag, lars"):
        lwrs.table.spec("larz")
    assert lwrs.table.spec("lars").hyperparameter("beta").torch_name == "momentum"
    with pytest.raises(KeyError, match="lars has no hyperparameter 'momentum'"):
        lwrs.table.spec("lars").hyperparameter("momentum")


def test_the_vocabulary_page_is_generated_from_the_table():
    page = (DOCS / "vocabulary.rst").read_text()
    assert page == lwrs.table.vocabulary_rst() + "\n", (
        "docs/vocabulary.rst is out of date: regenerate it with "
        "python -c 'import lwrs; print(lwrs.table.vocabulary_rst())' > docs/vocabulary.rst"
    )
    assert "vocabulary" in (DOCS / "index.rst").read_text()
