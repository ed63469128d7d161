"""The feasibility check of a site's evaluation summaries (``shared.metrics_bounds``): honest summaries pass; a site
that swaps its positives and negatives (``--attack SITE:lie``) or inflates its error sums is left out of the
overall metrics and named."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import MetricRecord

from server.run_record import final_metrics
from shared import metrics
from shared.metrics_bounds import check_evaluation
from shared.sum_bounds import InfeasibleSum
from shared.task import NANOPARTICLE_TASK as TASK
from simulation.attacks import swap_binary_labels


def site_record(rng: np.random.Generator, n: int, n_bins: int = metrics.DEFAULT_N_BINS) -> dict:
    """A site's evaluation record as ``client.evaluation`` makes it: every outcome's summary of a model that is
    better than chance (binary scores drawn towards the label), efficacy in its declared range."""
    record = MetricRecord()
    for outcome in ("response", "toxicity_grade3"):
        y = (rng.random(n) < 0.4).astype(float)
        y[rng.random(n) < 0.1] = np.nan  # not recorded
        p = 1 / (1 + np.exp(-(np.nan_to_num(y) * 2 - 1) * rng.gamma(2, 1, n)))
        p[rng.random(n) < 0.02] = 1.0  # a saturated score
        record.update(metrics.to_metric_record(metrics.summarise_binary(y, p, n_bins), prefix=outcome))
    y = rng.uniform(-300, 100, n)
    record.update(metrics.to_metric_record(metrics.summarise_regression(y, y + rng.normal(0, 30, n)),
                                           prefix="efficacy_pct"))
    return dict(record)


@pytest.mark.parametrize("n_bins", [metrics.DEFAULT_N_BINS, metrics.COARSE_N_BINS])
def test_honest_summaries_pass(n_bins):
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(0, 300))
        check_evaluation("evaluation", TASK, site_record(rng, n, n_bins), float(n + rng.integers(0, 10)))


def test_a_multiclass_summary_passes_and_a_confusion_off_by_one_row_does_not():
    from shared.metrics_bounds import multiclass_bounds
    from shared.sum_bounds import Contributors, check_bounds

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    proba = rng.dirichlet(np.ones(3), 200)
    summary = metrics.summarise_multiclass(y, proba)
    check_bounds("evaluation", multiclass_bounds("grade", summary, 200.0), Contributors(1, 200.0))
    bad = {**summary, "confusion": [summary["confusion"][0] + 1, *summary["confusion"][1:]]}
    with pytest.raises(InfeasibleSum, match="confusion"):
        check_bounds("evaluation", multiclass_bounds("grade", bad, 200.0), Contributors(1, 200.0))


def test_a_site_lying_about_its_labels_is_caught_by_its_own_error_sums():
    record = site_record(np.random.default_rng(2), 200)
    lied = MetricRecord(record)
    swap_binary_labels(lied)  # what --attack SITE:lie does to its evaluation replies
    with pytest.raises(InfeasibleSum, match=r"evaluation: the summed 'response' sum of \|error\| is infeasible"):
        check_evaluation("evaluation", TASK, dict(lied), 200.0)


@pytest.mark.parametrize("factor", [1.02, 1.1, 2.0, 10.0])
def test_inflated_error_sums_or_rows_beyond_the_declared_count_are_caught(factor):
    record = site_record(np.random.default_rng(3), 200)
    inflated = {**record, "response/sum_abs_err": record["response/sum_abs_err"] * factor}
    with pytest.raises(InfeasibleSum, match="sum of \\|error\\|"):
        check_evaluation("evaluation", TASK, inflated, 200.0)
    with pytest.raises(InfeasibleSum, match="row count") as caught:
        check_evaluation("evaluation", TASK, record, record["response/n"] / factor - 1)
    assert str(record["response/n"]) not in str(caught.value)  # never a value


def test_a_dp_site_declaring_no_rows_is_not_checked():
    record = site_record(np.random.default_rng(4), 100)
    check_evaluation("evaluation", TASK, {**record, "response/n": 10 ** 6}, None)


def test_final_metrics_leave_the_lying_site_out_of_the_overall_metrics_and_name_it():
    rng = np.random.default_rng(5)
    records = {1: site_record(rng, 150), 2: site_record(rng, 150), 3: site_record(rng, 150)}
    lied = MetricRecord(records[3])
    swap_binary_labels(lied)
    names = {1: "alpha", 2: "beta", 3: "gamma"}
    declared = {1: 160.0, 2: 160.0, 3: 160.0}
    honest = final_metrics(TASK, names, {1: records[1], 2: records[2]})
    attacked = final_metrics(TASK, names, {**records, 3: dict(lied)}, declared)
    assert attacked["overall"] == honest["overall"] and set(attacked["per_site"]) == {"alpha", "beta", "gamma"}
    assert list(attacked["infeasible"]) == ["gamma"]
    assert attacked["infeasible"]["gamma"].startswith("left out of the overall metrics: evaluation: the summed")
    clean = final_metrics(TASK, names, records, declared)
    assert "infeasible" not in clean and clean["overall"] == final_metrics(TASK, names, records)["overall"]
