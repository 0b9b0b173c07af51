import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pneumoscan.core import metrics as M

Y = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
P = [0.1, 0.4, 0.6, 0.2, 0.8, 0.7, 0.3, 0.9, 0.6, 0.55]


def test_confusion_and_rates_by_hand():
    r = M.binary_metrics(Y, P, 0.5)
    # negatives: 0.1 0.4 0.6 0.2 -> TN 3, FP 1; positives: .8 .7 .3 .9 .6 .55 -> TP 5, FN 1
    assert r["confusion_matrix"] == [[3, 1], [1, 5]]
    assert r["accuracy"] == pytest.approx(0.8)
    assert r["sensitivity"] == pytest.approx(5 / 6) and r["specificity"] == pytest.approx(0.75)
    assert r["precision"] == pytest.approx(5 / 6) and r["f1"] == pytest.approx(5 / 6)
    assert r["classification_report"]["PNEUMONIA"]["recall"] == pytest.approx(5 / 6)
    assert (r["n"], r["n_normal"], r["n_pneumonia"]) == (10, 4, 6)


def test_threshold_is_inclusive():
    assert M.confusion_matrix([0, 1], [0.5, 0.5], 0.5) == [[0, 1], [0, 1]]


def test_auc_with_ties_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.random(300) * 0.5 + y * 0.3, 1)  # many ties
    assert M.roc_auc(y, p) == pytest.approx(roc_auc_score(y, p))
    assert M.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)


def test_single_class_subset_is_undefined_not_a_crash():
    r = M.full_report([1, 1, 1], [0.9, 0.8, 0.3], ["a", "b", "c"], 0.5)
    assert r["auc"] is None and r["specificity"] is None
    assert r["sensitivity"] == pytest.approx(2 / 3)
    assert r["ci95"]["auc"] is None and r["ci95"]["sensitivity"] is not None
    assert M.fit_temperature([1, 1], [2.0, 3.0]) == 1.0


def test_bootstrap_by_patient_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    groups = np.arange(400) // 2
    ci = M.bootstrap_ci(y, p, groups, 0.5, n_resamples=500, seed=7)
    assert ci == M.bootstrap_ci(y, p, groups, 0.5, n_resamples=500, seed=7)
    point = M.binary_metrics(y, p, 0.5)
    for key in ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "loss"):
        low, high = ci[key]
        assert low < point[key] < high, key
        assert high - low < 0.2
    # resampling whole patients: each image's duplicate moves with it, so intervals are wider than by image
    dup_y, dup_p = np.repeat(y, 4), np.repeat(p, 4)
    by_patient = M.bootstrap_ci(dup_y, dup_p, np.repeat(np.arange(400), 4), 0.5, 500, 0)["auc"]
    by_image = M.bootstrap_ci(dup_y, dup_p, np.arange(1600), 0.5, 500, 0)["auc"]
    assert by_patient[1] - by_patient[0] > 1.5 * (by_image[1] - by_image[0])


def test_weighted_auc_rows_equal_explicit_resamples():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 50)
    p = rng.random(50)
    w = rng.integers(0, 3, (5, 50)).astype(float)
    for row, auc in zip(w, M.weighted_auc(y, p, w)):
        idx = np.repeat(np.arange(50), row.astype(int))
        assert auc == pytest.approx(roc_auc_score(y[idx], p[idx]))


def test_ece_by_hand():
    # two bins used: scores 0.1 (2 images, 1 positive) and 0.9 (2 images, 2 positive)
    assert M.expected_calibration_error([0, 1, 1, 1], [0.1, 0.1, 0.9, 0.9]) == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    assert M.expected_calibration_error([0, 1], [0.0, 1.0]) == pytest.approx(0.0)


def test_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 3, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-z / 2.5))).astype(int)  # true temperature 2.5
    assert M.fit_temperature(y, z) == pytest.approx(2.5, rel=0.08)


def test_threshold_rules():
    y = [0, 0, 0, 1, 1, 1]
    p = [0.1, 0.2, 0.7, 0.4, 0.8, 0.9]
    assert M.choose_threshold(y, p) == pytest.approx(0.8)  # J = 2/3 at 0.8 (and at 0.4); the higher wins
    assert M.choose_threshold(y, p, target_sensitivity=1.0) == pytest.approx(0.4)
    t = M.choose_threshold(y, p, target_sensitivity=0.6)
    assert M.binary_metrics(y, p, t)["sensitivity"] >= 0.6


def test_operating_rules_name_what_they_did():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    logits = (2 * y - 1) * 1.5 + rng.normal(0, 1.5, 300) + 0.8  # shifted: Youden moves away from 0.5
    temperature, threshold, rule = M.fit_operating_point(y, logits)
    assert (threshold, rule) == (0.5, "balanced") and temperature == pytest.approx(M.fit_temperature(y, logits))
    _, youden, rule = M.fit_operating_point(y, logits, "youden")
    assert rule == "youden" and youden == pytest.approx(M.choose_threshold(y, M.sigmoid(logits, temperature)))
    assert youden != 0.5
    _, t, rule = M.fit_operating_point(y, logits, "balanced", target_sensitivity=0.99)
    assert rule == "sensitivity>=0.99" and M.binary_metrics(y, M.sigmoid(logits, temperature), t)["sensitivity"] >= 0.99
    with pytest.raises(ValueError, match="unknown operating rule"):
        M.fit_operating_point(y, logits, "median")


def test_delong():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 400)
    good = y + rng.normal(0, 0.6, 400)
    bad = y + rng.normal(0, 2.0, 400)
    same = M.delong_test(y, good, good)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    result = M.delong_test(y, good, bad)
    assert result["auc_a"] == pytest.approx(roc_auc_score(y, good))
    assert result["difference"] > 0 and result["p_value"] < 0.001
    assert result["ci95"][0] < result["difference"] < result["ci95"][1]
    assert M.delong_test([1, 1, 0], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])["p_value"] is None
    assert not math.isnan(M.delong_test(y, good, good + 1e-9 * rng.random(400))["p_value"])


def test_bootstrap_on_a_large_set_runs_in_chunks():
    """20,000 images: resamples are evaluated 200 at a time (several chunks), with all-distinct scores."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 20000)
    p = np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1)
    ci = M.bootstrap_ci(y, p, np.arange(20000) // 2, 0.5, n_resamples=500, seed=1)
    point = M.binary_metrics(y, p, 0.5)
    assert ci["auc"][0] < point["auc"] < ci["auc"][1] and ci["auc"][1] - ci["auc"][0] < 0.03
    assert M.roc_auc(y, p) == pytest.approx(roc_auc_score(y, p))


def test_sigmoid_applies_the_temperature_and_never_overflows():
    import warnings

    assert M.sigmoid(0.0) == 0.5
    assert M.sigmoid(2.0, temperature=2.0) == pytest.approx(1 / (1 + np.exp(-1.0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning at extreme logits
        p = M.sigmoid(np.array([-1000.0, 1000.0]))
    assert p[0] == pytest.approx(0.0, abs=1e-300) and p[1] == 1.0


def test_cross_fit_never_calibrates_a_fold_on_its_own_labels():
    """Flip every label of one fold: that fold's fitted temperature and threshold must not move (they come
    from the other folds), while every other fold's do (their training data changed)."""
    rng = np.random.default_rng(3)
    n = 400
    groups = [f"p{i // 2}" for i in range(n)]  # two images per patient
    y = np.repeat(rng.integers(0, 2, n // 2), 2)
    logits = (2 * y - 1) * 2.0 + rng.normal(0, 1.5, n)
    fit = M.cross_fit(y, logits, groups, k=5, rule="youden", seed=1)
    fold = fit["fold"]
    for patient in set(groups):  # patients never span folds, and every fold has both classes
        assert len({fold[i] for i, g in enumerate(groups) if g == patient}) == 1
    assert all(len(set(y[fold == f])) == 2 for f in range(5))
    flipped = y.copy()
    flipped[fold == 2] = 1 - flipped[fold == 2]
    refit = M.cross_fit(flipped, logits, groups, k=5, rule="youden", fold=fold)
    assert refit["temperatures"][2] == pytest.approx(fit["temperatures"][2])
    assert refit["thresholds"][2] == pytest.approx(fit["thresholds"][2])
    assert all(refit["temperatures"][f] != pytest.approx(fit["temperatures"][f]) for f in (0, 1, 3, 4))
    held = fold == 2
    assert np.allclose(fit["probability"][held], M.sigmoid(logits[held], fit["temperatures"][2]))


def test_metrics_at_one_threshold_per_image():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.3, 0.6, 0.55, 0.9])
    per_image = np.array([0.5, 0.7, 0.5, 0.7])
    m = M.binary_metrics(y, p, per_image)
    assert m["confusion_matrix"] == [[2, 0], [0, 2]] and m["threshold"] is None
    ci = M.bootstrap_ci(y, p, ["a", "b", "c", "d"], per_image, n_resamples=50)
    assert ci["accuracy"] == [1.0, 1.0]


def test_operating_point_on_separated_classes_keeps_the_prior_temperature():
    y = np.array([0, 0, 0, 1, 1, 1])
    z = np.array([-4.0, -2.0, -1.0, 2.0, 3.0, 40.0])
    assert M.separated(y, z) and not M.separated(y, -z)
    fitted = M.operating_point(y, z, "youden", prior_temperature=1.5, spread=4)
    assert fitted.temperature == 1.5 and "perfectly" in fitted.warnings[0]
    assert fitted.threshold == pytest.approx(float(M.sigmoid(0.5, 1.5)))  # the middle of the gap, in logits
    strict = M.operating_point(y, z, target_sensitivity=1.0, prior_temperature=0.05)  # p of logit 2 at T 0.05: ~1
    assert strict.threshold == M.THRESHOLD_BOUNDS[1] and "bounded" in strict.warnings[-1]
    assert M.fit_operating_point(y, z)[0] == 1.0  # training's default prior


def test_operating_point_bounds_the_temperature():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(20), np.ones(20)].astype(int)
    z = np.r_[rng.normal(-30, 2, 20), rng.normal(30, 2, 20)]
    z[0] = 31.0  # one overlap: the fit is defined, and wants a temperature far above 4 times the prior
    unbounded = M.fit_temperature(y, z)
    fitted = M.operating_point(y, z, "balanced", prior_temperature=1.0, spread=4)
    assert unbounded > 4 and fitted.temperature == pytest.approx(4.0, rel=1e-3)
    assert "hit its bound" in fitted.warnings[0] and fitted.threshold == 0.5
