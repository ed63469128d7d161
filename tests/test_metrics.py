"""Metrics from site summaries: agreement with scikit-learn, additivity across sites, NaN handling, records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import MetricRecord
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)

from shared.metrics import (
    binary_metrics,
    combine,
    from_metric_record,
    json_safe,
    metrics,
    multiclass_metrics,
    regression_metrics,
    roc_curve_points,
    summarise,
    summarise_binary,
    summarise_multiclass,
    summarise_regression,
    to_metric_record,
)

SEEDS = range(5)


def binary_data(seed: int, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores spread wide on the logit scale, so many sit near 0 and 1, plus the extremes exactly."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(float)
    logit = 1.2 * y + rng.normal(0.0, 4.0, n)
    p = 1.0 / (1.0 + np.exp(-logit))
    p[:6] = [0.0, 1.0, 1e-9, 1.0 - 1e-9, 0.5, 1e-4]
    return y, p


def multiclass_data(seed: int, n: int = 3000, n_classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = 1.0 * np.eye(n_classes)[y] + rng.normal(0.0, 1.5, (n, n_classes))
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, proba


def regression_data(seed: int, n: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.normal(50.0, 12.0, n)
    return y, 0.8 * y + 10.0 + rng.normal(0.0, 6.0, n)


def three_random_splits(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + 100)
    cuts = np.sort(rng.choice(np.arange(1, n), size=2, replace=False))
    return np.split(rng.permutation(n), cuts)


# --- agreement with scikit-learn --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_auc_from_histograms_matches_sklearn_within_1e3(seed):
    y, p = binary_data(seed)
    result = binary_metrics(summarise_binary(y, p))
    assert result["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-3)


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_accuracy_and_balanced_accuracy_equal_sklearn_at_threshold_one_half(seed):
    y, p = binary_data(seed)
    result = binary_metrics(summarise_binary(y, p))
    called = (p >= 0.5).astype(float)
    assert result["accuracy"] == accuracy_score(y, called)
    assert result["balanced_accuracy"] == balanced_accuracy_score(y, called)
    assert result["n"] == len(y)
    assert result["prevalence"] == pytest.approx(y.mean(), rel=1e-15)


def test_binary_auc_is_exact_when_no_bin_holds_both_classes():
    y = np.array([0, 0, 1, 0, 1, 1])
    p = np.array([0.10, 0.30, 0.35, 0.60, 0.70, 0.95])
    auc = binary_metrics(summarise_binary(y, p))["auc"]
    assert auc == 8 / 9
    assert auc == pytest.approx(roc_auc_score(y, p), rel=1e-15)


def test_binary_scores_in_one_bin_count_one_half():
    assert binary_metrics(summarise_binary([0, 1], [0.5, 0.5]))["auc"] == 0.5


@pytest.mark.parametrize("seed", SEEDS)
def test_multiclass_macro_ovr_auc_and_balanced_accuracy_match_sklearn(seed):
    y, proba = multiclass_data(seed)
    result = multiclass_metrics(summarise_multiclass(y, proba))
    expected_auc = roc_auc_score(y, proba, multi_class="ovr", average="macro")
    assert result["auc"] == pytest.approx(expected_auc, abs=2e-3)
    predicted = proba.argmax(axis=1)
    assert result["balanced_accuracy"] == balanced_accuracy_score(y, predicted)
    assert result["accuracy"] == accuracy_score(y, predicted)
    assert result["n"] == len(y)


def test_regression_metrics_match_sklearn():
    y, pred = regression_data(0)
    result = regression_metrics(summarise_regression(y, pred))
    assert result["mae"] == pytest.approx(mean_absolute_error(y, pred), rel=1e-12)
    assert result["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, pred)), rel=1e-12)
    assert result["r2"] == pytest.approx(r2_score(y, pred), rel=1e-9)


# --- combining sites --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_combined_binary_summaries_of_three_splits_give_the_whole_set_metrics(seed):
    y, p = binary_data(seed)
    sites = [summarise_binary(y[rows], p[rows]) for rows in three_random_splits(len(y), seed)]
    whole = summarise_binary(y, p)
    combined = combine(sites)
    counts = [k for k in whole if not k.startswith("sum_")]
    assert {k: combined[k] for k in counts} == {k: whole[k] for k in counts}  # counts add up exactly
    for key in ("sum_abs_err", "sum_sq_err"):  # float sums, to rounding
        assert combined[key] == pytest.approx(whole[key], rel=1e-12)
    combined_metrics, whole_metrics = binary_metrics(combined), binary_metrics(whole)
    assert combined_metrics["auc"] == pytest.approx(whole_metrics["auc"], abs=1e-12)
    assert combined_metrics == pytest.approx(whole_metrics, rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_combined_multiclass_summaries_of_three_splits_give_the_whole_set_metrics(seed):
    y, proba = multiclass_data(seed)
    sites = [summarise_multiclass(y[rows], proba[rows]) for rows in three_random_splits(len(y), seed)]
    combined = multiclass_metrics(combine(sites))
    whole = multiclass_metrics(summarise_multiclass(y, proba))
    assert combined["auc"] == pytest.approx(whole["auc"], abs=1e-12)
    assert combined == whole


@pytest.mark.parametrize("seed", SEEDS)
def test_combined_regression_summaries_of_three_splits_match_sklearn_on_the_union(seed):
    y, pred = regression_data(seed)
    sites = [summarise_regression(y[rows], pred[rows]) for rows in three_random_splits(len(y), seed)]
    result = regression_metrics(combine(sites))
    assert result["n"] == len(y)
    assert result["mae"] == pytest.approx(mean_absolute_error(y, pred), rel=1e-9)
    assert result["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, pred)), rel=1e-9)
    assert result["r2"] == pytest.approx(r2_score(y, pred), rel=1e-9)


def test_combining_summaries_with_different_bin_counts_is_rejected():
    y, p = binary_data(0, n=50)
    with pytest.raises(ValueError, match="hist_pos"):
        combine([summarise_binary(y, p, n_bins=100), summarise_binary(y, p, n_bins=200)])


def test_combining_summaries_of_different_kinds_is_rejected():
    y, pred = regression_data(0, n=20)
    with pytest.raises(ValueError, match="keys"):
        combine([summarise_regression(y, pred), summarise_binary(y > 50, np.full(20, 0.5))])


# --- NaN: skipped targets, undefined metrics --------------------------------------------------------------


def test_rows_with_nan_targets_are_skipped():
    y, p = binary_data(1, n=200)
    y_gappy = y.copy()
    y_gappy[::7] = np.nan
    known = ~np.isnan(y_gappy)
    assert summarise_binary(y_gappy, p) == summarise_binary(y[known], p[known])

    labels, proba = multiclass_data(1, n=200)
    labels_gappy = labels.astype(float)
    labels_gappy[::5] = np.nan
    known = ~np.isnan(labels_gappy)
    assert summarise_multiclass(labels_gappy, proba) == summarise_multiclass(labels[known], proba[known])

    target, pred = regression_data(1, n=200)
    target_gappy = target.copy()
    target_gappy[::3] = np.nan
    known = ~np.isnan(target_gappy)
    assert summarise_regression(target_gappy, pred) == summarise_regression(target[known], pred[known])


def test_nan_prediction_for_a_known_target_is_rejected_naming_the_parameter():
    with pytest.raises(ValueError, match="p_positive"):
        summarise_binary([0, 1], [0.2, np.nan])
    with pytest.raises(ValueError, match="y_pred"):
        summarise_regression([1.0, 2.0], [1.0, np.nan])


def test_single_class_test_set_has_nan_auc_and_json_safe_turns_it_to_none():
    result = binary_metrics(summarise_binary([1, 1, 1], [0.2, 0.7, 0.9]))
    assert np.isnan(result["auc"])
    assert result["accuracy"] == pytest.approx(2 / 3)
    safe = json_safe({"site-1": result})
    assert safe["site-1"]["auc"] is None
    assert json.loads(json.dumps(safe, allow_nan=False))["site-1"]["auc"] is None


def test_empty_test_set_has_nan_metrics():
    assert all(np.isnan(value) for key, value in metrics("binary", summarise("binary", [], [])).items() if key != "n")
    assert np.isnan(regression_metrics(summarise_regression([np.nan], [1.0]))["r2"])


def test_constant_target_has_nan_r2():
    assert np.isnan(regression_metrics(summarise_regression([0.1] * 30, np.linspace(0, 1, 30)))["r2"])


def test_multiclass_auc_of_a_site_lacking_a_class_averages_over_the_classes_present():
    y, proba = multiclass_data(2, n=600)
    present = y != 3
    result = multiclass_metrics(summarise_multiclass(y[present], proba[present]))
    per_class = [roc_auc_score(y[present] == c, proba[present, c]) for c in range(3)]
    assert result["auc"] == pytest.approx(np.mean(per_class), abs=2e-3)


# --- Flower records and dispatch --------------------------------------------------------------------------


def test_metric_record_round_trip_preserves_summaries_under_their_prefixes():
    y, p = binary_data(3, n=300)
    target, pred = regression_data(3, n=300)
    labels, proba = multiclass_data(3, n=300)
    summaries = {
        "response": summarise_binary(y, p),
        "exposure": summarise_regression(target, pred),
        "grade": summarise_multiclass(labels, proba),
    }
    record = MetricRecord({"num-examples": 300})
    for outcome, summary in summaries.items():
        record.update(to_metric_record(summary, prefix=outcome))
    assert isinstance(record, MetricRecord)
    assert "response/hist_pos" in record
    for outcome, summary in summaries.items():
        assert from_metric_record(record, prefix=outcome) == summary
    assert from_metric_record(to_metric_record(summaries["response"])) == summaries["response"]


def test_from_metric_record_without_the_prefix_names_it():
    with pytest.raises(KeyError, match="toxicity"):
        from_metric_record(MetricRecord({"num-examples": 3}), prefix="toxicity")


@pytest.mark.parametrize(
    ("kind", "data"),
    [("binary", binary_data), ("multiclass", multiclass_data), ("regression", regression_data)],
)
def test_summarise_and_metrics_dispatch_on_kind(kind, data):
    y_true, prediction = data(4)
    direct = {"binary": binary_metrics, "multiclass": multiclass_metrics, "regression": regression_metrics}[kind]
    summary = summarise(kind, y_true, prediction)
    assert metrics(kind, summary) == direct(summary)


def test_unknown_kind_is_rejected_naming_the_kinds():
    with pytest.raises(ValueError, match="binary, multiclass, regression"):
        summarise("ordinal", [1], [1])


# --- ROC curve points -------------------------------------------------------------------------------------


def test_roc_curve_runs_from_origin_to_one_and_its_area_is_the_histogram_auc():
    y, p = binary_data(0)
    summary = summarise_binary(y, p)
    fpr, tpr = roc_curve_points(summary)
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert fpr[-1] == pytest.approx(1.0) and tpr[-1] == pytest.approx(1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(binary_metrics(summary)["auc"], abs=1e-12)


def test_multiclass_roc_curve_is_one_vs_rest_for_the_chosen_class():
    y, proba = multiclass_data(0)
    summary = summarise_multiclass(y, proba)
    fpr, tpr = roc_curve_points(summary, cls=2)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y == 2, proba[:, 2]), abs=2e-3)
    with pytest.raises(ValueError, match="cls"):
        roc_curve_points(summary)


def test_binary_mae_and_rmse_of_the_probability_match_sklearn():
    from sklearn.metrics import brier_score_loss, mean_absolute_error

    y, p = binary_data(0)
    m = binary_metrics(summarise_binary(y, p))
    assert m["mae"] == pytest.approx(mean_absolute_error(y, p), rel=1e-12)
    assert m["rmse"] == pytest.approx(np.sqrt(brier_score_loss(y, p)), rel=1e-12)
