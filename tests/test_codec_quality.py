"""Quality of the default (mse) mode against the reference rule, at the same bits; determinism."""
import numpy as np
import pytest

from codec import quantize_matrix, relative_mse
from helpers import minilm_matrices


def _outlier_gaussian(seed=0, shape=(512, 1024)):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    mask = rng.random(shape) < 0.001
    w[mask] *= 20
    return w


def _ratio(mats, depth):
    err = {}
    for mode in ("reference", "mse"):
        num = den = 0.0
        for w in mats:
            energy = float(np.sum(w.astype(np.float64) ** 2))
            num += relative_mse(w, quantize_matrix(w, depth, mode).dequantize()) * energy
            den += float(np.sum(w.astype(np.float64) ** 2))
        err[mode] = num / den
    return err["mse"] / err["reference"]


def test_mse_mode_beats_reference_on_outlier_gaussian():
    assert _ratio([_outlier_gaussian()], 3) <= 0.95


def test_mse_mode_beats_reference_on_trained_minilm_weights():
    assert _ratio(minilm_matrices(), 3) <= 0.95


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_mse_mode_never_worse_at_other_depths(depth):
    assert _ratio([_outlier_gaussian(1, (128, 512))], depth) <= 1.0


@pytest.mark.parametrize("mode", ["mse", "reference"])
def test_quantize_is_deterministic(mode):
    w = _outlier_gaussian(2, (300, 2048))  # > one chunk of groups, so threads are involved
    a, b = quantize_matrix(w, 3, mode), quantize_matrix(w.copy(), 3, mode, workers=1)
    for x, y in ((a.codes, b.codes), (a.scale_idx, b.scale_idx), (a.codebook, b.codebook)):
        assert x.tobytes() == y.tobytes()


def test_reference_mode_follows_the_published_rule_on_one_group():
    """A group's step is the MSE-best of 4 order statistics / qmax, then snapped to a 27-entry codebook."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    qm = quantize_matrix(w, 3, "reference")
    assert len(qm.codebook) == 27
    ratios = qm.codebook[1:] / qm.codebook[:-1]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-5)  # log-spaced
    assert np.abs(qm.codes).max() == 13
