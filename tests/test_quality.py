"""NQM, Spearman and failure detection on hand-made arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mednca_jax.evaluate.quality import choose_nqm_threshold, failure_detection_summary, nqm, spearman, std_map


def test_identical_runs_give_zero():
    p = np.random.default_rng(0).uniform(size=(3, 4, 8, 8))
    assert nqm(np.stack([p[0]] * 5)) == 0.0
    assert nqm(np.zeros((4, 2, 2))) == 0.0


def test_known_value():
    # two runs, two voxels: values (0, 1) and (1, 1) -> std (ddof 1) = (√0.5, 0), mean = (0.5, 1)
    runs = np.array([[0.0, 1.0], [1.0, 1.0]])
    assert nqm(runs) == pytest.approx(math.sqrt(0.5) / 1.5)
    assert nqm(runs, ddof=0) == pytest.approx(0.5 / 1.5)
    np.testing.assert_allclose(std_map(runs), [math.sqrt(0.5), 0.0])


def test_nqm_is_scale_free_and_grows_with_disagreement():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.2, 0.8, size=(1, 16, 16))
    noise = rng.standard_normal((10, 16, 16))
    low, high = nqm(base + 0.01 * noise), nqm(base + 0.05 * noise)
    assert 0 < low < high
    assert nqm(2 * (base + 0.01 * noise)) == pytest.approx(low)  # ratio of sums


def test_fewer_than_two_runs_raises():
    with pytest.raises(ValueError, match="at least 2 stochastic runs"):
        nqm(np.ones((1, 4, 4)))
    with pytest.raises(ValueError, match="--runs"):
        std_map(np.ones((1, 4)))


def test_spearman_known_and_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties: ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4]
    expected = np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1]
    assert spearman([1, 2, 2, 3], [5, 6, 7, 8]) == pytest.approx(expected)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="equally long"):
        spearman([1, 2], [1, 2, 3])


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    for _ in range(5):
        a = rng.integers(0, 6, size=30).astype(float)  # many ties
        b = a + rng.normal(size=30)
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_threshold_separates_failures():
    q = [0.01, 0.02, 0.03, 0.10, 0.12, 0.20]
    d = [0.90, 0.85, 0.88, 0.60, 0.40, 0.10]  # the three high-NQM cases failed (dice < 0.7)
    t = choose_nqm_threshold(q, d, dice_threshold=0.7)
    assert 0.03 < t < 0.10
    s = failure_detection_summary(q, d, t, 0.7)
    assert (s["TP"], s["FP"], s["TN"], s["FN"]) == (3, 0, 3, 0)
    assert s["sensitivity"] == s["specificity"] == 1.0 and s["n_failures"] == 3


def test_threshold_with_overlap_maximises_youden():
    q = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    d = [0.9, 0.5, 0.9, 0.9, 0.5, 0.5]  # failures at 0.2, 0.5, 0.6
    t = choose_nqm_threshold(q, d, dice_threshold=0.7)
    # flagging > 0.45 gives sens 2/3, spec 1 (J = 2/3), the best possible here
    assert 0.4 < t < 0.5
    s = failure_detection_summary(q, d, t, 0.7)
    assert (s["TP"], s["FP"], s["TN"], s["FN"]) == (2, 0, 3, 1)
    assert s["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)


def test_threshold_single_class():
    q = [0.1, 0.3, 0.2]
    t = choose_nqm_threshold(q, [0.9, 0.9, 0.95], dice_threshold=0.7)  # no failures: flag nothing
    assert failure_detection_summary(q, [0.9] * 3, t, 0.7)["FP"] == 0
    t = choose_nqm_threshold(q, [0.1, 0.2, 0.3], dice_threshold=0.7)  # all failed: flag all
    s = failure_detection_summary(q, [0.1] * 3, t, 0.7)
    assert s["TP"] == 3 and s["specificity"] is None
    with pytest.raises(ValueError, match="one NQM per Dice"):
        failure_detection_summary([0.1], [0.2, 0.3], 0.1, 0.5)


def test_evaluate_cases_reports_dice_of_mean_and_mean_of_single_run_dice():
    """With runs >= 2: ``dice`` scores the mean prediction, ``dice_run_mean`` averages the
    single runs' Dice (the original's figure); hand-made predictions per run."""
    import jax

    from mednca_jax.config import Config
    from mednca_jax.data import SliceSet
    from mednca_jax.evaluate.evaluation import evaluate_cases

    labels = np.zeros((4, 4, 4, 1), np.float32)
    labels[:, :2, :2] = 1.0
    # run r predicts the label square plus r extra false-positive pixels, on every slice
    per_run = []
    for r in range(3):
        p = labels.copy()
        p[:, 3, :r] = 1.0
        per_run.append(p)
    calls = {"n": 0}

    def predict(params, images, key, fire_rate):
        out = per_run[calls["n"]]
        calls["n"] += 1
        return out[: images.shape[0]]

    slices = SliceSet(np.zeros((4, 4, 4, 1), np.float32), labels, np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]),
                      ("a", "b"), ((4, 4, 2), (4, 4, 2)), np.stack([np.eye(4)] * 2), (None, None), (None, None))
    m = evaluate_cases(None, Config(name="t"), slices, [], jax.random.PRNGKey(0), fire_rate=0.5, runs=3, batch_size=4, native=False,
                       predict=predict)
    single = [2 * 4 / (2 * 4 + r) for r in range(3)]  # Dice of 4 true pixels with r false positives
    mean_pred = np.mean(per_run, axis=0)
    fp = (mean_pred[0, 3] > 0.5).sum()  # pixels above 0.5 in the mean prediction
    for name in ("a", "b"):
        assert m["cases"][name]["dice_run_mean"] == pytest.approx(np.mean(single))
        assert m["cases"][name]["dice"] == pytest.approx(8 / (8 + fp))
    assert m["cases"]["a"]["nqm"] > 0


def test_quality_summary_of_a_deterministic_model_says_why_there_is_no_ranking():
    # identical runs (a UNet) give NQM 0 everywhere: no Spearman, no threshold, a note instead
    from mednca_jax.evaluate.robustness import quality_summary

    q = quality_summary([0.0] * 4, [0.9, 0.7, 0.85, 0.6], [0.0] * 3, [0.8, 0.9, 0.7], 0.8)
    assert q["spearman_nqm_dice"] is None and "nqm_threshold" not in q and "deterministic" in q["note"]
    varied = quality_summary([0.1, 0.3, 0.15, 0.4], [0.9, 0.7, 0.85, 0.6], [0.1, 0.2, 0.3], [0.9, 0.8, 0.7], 0.8)
    assert varied["spearman_nqm_dice"] == -1.0 and "nqm_threshold" in varied
