"""Per-sample norm statistics, the estimators, and the Figure 2 ratio against closed forms."""

from __future__ import annotations

import numpy as np
import pytest

import lwrs
from array_backends import assert_array


def test_per_sample_statistics_match_loops(backend):
    rng = np.random.default_rng(0)
    samples = [rng.normal(size=(7, 3, 2)), rng.normal(size=(7, 4))]
    stats = lwrs.per_sample_norm_statistics(backend.layers(samples))
    s1 = [sum(np.linalg.norm(s[i]) for i in range(7)) for s in samples]
    s2 = [sum(np.linalg.norm(s[i]) ** 2 for i in range(7)) for s in samples]
    assert_array(stats.sum_norms, s1, backend, "float64", what="S1")
    assert_array(stats.sum_squared_norms, s2, backend, "float64", what="S2")
    assert stats.count == 7
    assert_array(stats.mean_norms(), np.array(s1) / 7, backend, "float64", what="mean norms")


def test_float16_statistics_accumulate_in_float32():
    x = np.full((4, 300), 30.0, dtype=np.float16)  # each squared norm (270000) overflows float16
    stats = lwrs.per_sample_norm_statistics([x])
    assert stats.sum_norms.dtype == np.float32
    np.testing.assert_allclose(stats.sum_squared_norms, [4 * 300 * 900.0], rtol=1e-6)


def test_merging_micro_batches_equals_the_whole_batch():
    rng = np.random.default_rng(1)
    samples = [rng.normal(size=(12, 5)), rng.normal(size=(12, 2, 2))]
    whole = lwrs.per_sample_norm_statistics(samples)
    parts = [lwrs.per_sample_norm_statistics([s[i:i + 4] for s in samples]) for i in (0, 4, 8)]
    merged = lwrs.merge_statistics(*parts)
    np.testing.assert_allclose(merged.sum_norms, whole.sum_norms, rtol=1e-14)
    np.testing.assert_allclose(merged.sum_squared_norms, whole.sum_squared_norms, rtol=1e-14)
    assert merged.count == 12


def test_subsample_estimator_uses_only_the_subsample():
    samples = [np.array([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]])]
    stats = lwrs.subsample_norm_statistics(samples, [0, 2])
    np.testing.assert_allclose(stats.mean_norms(), [7.5])
    assert stats.count == 2
    with pytest.raises(ValueError, match=r"indices \[3\] are outside the batch of 3 samples"):
        lwrs.subsample_norm_statistics(samples, [0, 3])


def test_official_code_estimator_is_mean_minibatch_norm():
    """The CLARS code's denominator: mean over mini-batches of 8 of the mini-batch gradient's norm."""
    rng = np.random.default_rng(2)
    samples = [rng.normal(size=(64, 3))]
    mb = lwrs.minibatch_gradients(samples, 8)
    stats = lwrs.per_sample_norm_statistics(mb)
    expected = np.mean([np.linalg.norm(samples[0][8 * m:8 * m + 8].mean(axis=0)) for m in range(8)])
    np.testing.assert_allclose(stats.mean_norms(), [expected], rtol=1e-14)
    with pytest.raises(ValueError, match="64 samples do not split into mini-batches of 7"):
        lwrs.minibatch_gradients(samples, 7)


def test_gradient_variance_ratio_recovers_one_plus_mk_plus_m_over_grad_squared():
    """Per-sample gradients g_i = s_i a + xi_i with mean(s) = 1, var(s) = M_k, mean(xi) = 0,
    mean|xi|^2 = M and sum (s_i - 1) xi_i = 0 (so Assumption 2 holds with equality):
    the ratio is 1 + M_k + M / |a|^2 exactly."""
    n = 4
    s = np.array([1.0 + 1.5, 1.0 - 1.5, 1.0 + 1.5, 1.0 - 1.5])  # mean 1, variance M_k = 2.25
    xi_dir = np.array([1.0, 1.0, -1.0, -1.0])  # mean 0, orthogonal to s - 1
    a = np.array([2.0, -1.0, 0.0])
    e = np.array([0.0, 0.0, 3.0])  # noise direction
    g = s[:, None] * a + xi_dir[:, None] * e
    m_k, m = 2.25, float(np.mean(np.sum((xi_dir[:, None] * e) ** 2, axis=1)))
    expected = 1 + m_k + m / float(a @ a)
    assert np.allclose(g.mean(axis=0), a)
    np.testing.assert_allclose(lwrs.gradient_variance_ratio([g]), [expected], rtol=1e-14)
    assert n == g.shape[0]


def test_gradient_variance_ratio_edge_cases():
    opposed = np.array([[1.0, 0.0], [-1.0, 0.0]])
    zeros = np.zeros((2, 2))
    assert lwrs.gradient_variance_ratio([opposed, zeros]).tolist() == [float("inf"), 1.0]


def test_merging_statistics_of_two_array_libraries_names_the_mix():
    torch = pytest.importorskip("torch")
    a = lwrs.NormStatistics(np.array([1.0]), np.array([1.0]), 1)
    b = lwrs.NormStatistics(torch.tensor([1.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64), 1)
    with pytest.raises(TypeError, match=r"cannot mix array libraries \(part 0: numpy, part 1: torch\)"):
        lwrs.merge_statistics(a, b)
    with pytest.raises(TypeError, match="part 1 is a tuple, not a lwrs.NormStatistics"):
        lwrs.merge_statistics(a, (1, 2, 3))
