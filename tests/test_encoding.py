"""Feature encoding from federated statistics: the federated fit equals the pooled fit, and encodes as specified."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, MetricRecord
from flwr.common import serde

from shared.encoding import (
    FeatureEncoder,
    Moments,
    NotFittedError,
    SiteStatistics,
    combine,
    fit_local,
)
from shared.task import NANOPARTICLE_TASK, Outcome, TaskSpec, assign_split
from shared.validation import load_site
from tests.sitefactory import write_site, write_task_csv, write_task_toml

TASK = TaskSpec(
    outcomes=(Outcome("responded", "binary"), Outcome("grade", "multiclass"), Outcome("shrinkage", "regression")),
    numeric=("dose", "size_nm", "day"),
    categorical=("colour", "tumour"),
)
"""A generic task with every kind of column: binary, multiclass and regression outcomes, text categories."""


def site_frame(seed: int, n: int, colours: list[str]) -> pd.DataFrame:
    """Rows of one site: its own mean and spread, missing cells, and a colour vocabulary of its own."""
    rng = np.random.default_rng(seed)
    dose = rng.normal(40 + 5 * seed, 3 + seed, n)
    dose[rng.random(n) < 0.1] = np.nan
    tumour = rng.choice(["breast", "ovarian", "kaposi"], n).astype(object)
    tumour[rng.random(n) < 0.05] = np.nan
    responded = rng.integers(0, 2, n).astype(float)
    responded[rng.random(n) < 0.1] = np.nan
    shrinkage = rng.normal(10 * seed, 20, n)
    shrinkage[rng.random(n) < 0.1] = np.nan
    return pd.DataFrame({
        "dose": dose,
        "size_nm": rng.normal(100, 10, n),
        "day": 1000.0 + rng.integers(0, 5, n),  # the largest magnitude of the nanoparticle features
        "colour": rng.choice(colours, n),
        "tumour": tumour,
        "responded": responded,
        "grade": rng.choice(["1", "2", "10"], n),
        "shrinkage": shrinkage,
    })


@pytest.fixture
def sites() -> list[pd.DataFrame]:
    return [site_frame(0, 50, ["red", "blue"]), site_frame(1, 120, ["blue", "green"]),
            site_frame(2, 7, ["violet"])]


@pytest.fixture
def pooled(sites: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(sites, ignore_index=True)


def federated_encoder(sites: list[pd.DataFrame], task: TaskSpec = TASK) -> FeatureEncoder:
    return FeatureEncoder(task).fit_statistics(combine([SiteStatistics.from_frame(s, task) for s in sites]))


def assert_same_fit(a: FeatureEncoder, b: FeatureEncoder, tolerance: float = 1e-12) -> None:
    for learned in ("means_", "scales_", "target_means_", "target_scales_"):
        got, want = getattr(a, learned), getattr(b, learned)
        assert list(got) == list(want)
        for name in want:
            assert got[name] == pytest.approx(want[name], rel=tolerance, abs=tolerance), (learned, name)
    assert a.vocabularies_ == b.vocabularies_
    assert a.missing_indicator_ == b.missing_indicator_
    assert a.classes_ == b.classes_
    assert a.feature_names_out_ == b.feature_names_out_


# ---------------------------------------------------------------------------------------------------------
# Federated fit equals pooled fit


def test_encoder_fit_on_combined_site_statistics_equals_encoder_fit_on_pooled_rows(sites, pooled):
    federated, central = federated_encoder(sites), fit_local(pooled, TASK)
    assert_same_fit(federated, central)
    assert federated.means_["dose"] == pytest.approx(np.nanmean(pooled["dose"]), rel=1e-12)
    assert federated.scales_["dose"] == pytest.approx(np.nanstd(pooled["dose"]), rel=1e-12)
    assert federated.vocabularies_["colour"] == ["blue", "green", "red", "violet"]
    for site in sites:
        np.testing.assert_allclose(federated.transform(site), central.transform(site), rtol=1e-6, atol=1e-6)


def test_combined_statistics_equal_statistics_of_pooled_rows(sites, pooled):
    total = combine([SiteStatistics.from_frame(s, TASK) for s in sites])
    direct = SiteStatistics.from_frame(pooled, TASK)
    assert total.n_rows == direct.n_rows == len(pooled)
    assert total.categorical == direct.categorical
    assert total.classification == direct.classification
    for name, summary in direct.numeric.items():
        got = total.numeric[name]
        assert (got.moments.count, got.min, got.max) == (summary.moments.count, summary.min, summary.max)
        assert got.moments.sum == pytest.approx(summary.moments.sum, rel=1e-12)
        assert got.moments.m2 == pytest.approx(summary.moments.m2, rel=1e-9)


def test_spread_of_values_with_a_large_offset_survives_the_combination():
    """A raw sum of squares loses every digit of a 1e9 ± 2 column; Chan's update keeps all but ~1e-9."""
    rng = np.random.default_rng(7)
    parts = [pd.DataFrame({"day": 1e9 + rng.integers(0, 5, n).astype(float)}) for n in (50, 120, 7)]
    task = TaskSpec(outcomes=(), numeric=("day",), categorical=())
    scale = federated_encoder(parts, task).scales_["day"]
    values = pd.concat(parts)["day"].to_numpy()
    exact = np.std(values - 1e9)  # the offset removed exactly: integers below 2**53
    assert scale == pytest.approx(exact, rel=1e-8)
    naive = math.sqrt(max(np.sum(values**2) / len(values) - np.mean(values) ** 2, 0.0))
    assert naive != pytest.approx(exact, rel=0.05)


def test_moments_merge_follows_chan_and_handles_empty_parts():
    a, b = np.array([1.0, 2.0, 4.0]), np.array([10.0, np.nan, 12.0])
    merged = Moments.of(a) + Moments() + Moments.of(b)
    whole = np.array([1.0, 2.0, 4.0, 10.0, 12.0])
    assert merged.count == 5
    assert merged.mean == pytest.approx(whole.mean())
    assert merged.variance == pytest.approx(whole.var())
    assert merged.sum_of_squares == pytest.approx(np.sum(whole**2))
    assert math.isnan(Moments().mean)


def test_combine_refuses_statistics_of_different_tasks(sites):
    other = TaskSpec(outcomes=TASK.outcomes, numeric=("dose",), categorical=TASK.categorical)
    with pytest.raises(ValueError, match="numeric columns"):
        combine([SiteStatistics.from_frame(sites[0], TASK), SiteStatistics.from_frame(sites[1], other)])
    with pytest.raises(ValueError, match="at least one site"):
        combine([])


# ---------------------------------------------------------------------------------------------------------
# Features


def test_missing_numeric_becomes_the_global_mean_with_its_indicator_set(sites):
    encoder = federated_encoder(sites)
    assert encoder.missing_indicator_ == ["dose"]
    row = sites[0].iloc[[0]].copy()
    row["dose"] = np.nan
    x = encoder.transform(row)[0]
    names = encoder.feature_names_out_
    assert x[names.index("dose")] == 0.0
    assert x[names.index("dose__missing")] == 1.0
    row["dose"] = encoder.means_["dose"] + 2 * encoder.scales_["dose"]
    x = encoder.transform(row)[0]
    assert x[names.index("dose")] == pytest.approx(2.0)
    assert x[names.index("dose__missing")] == 0.0


def test_unseen_or_missing_category_gives_all_zeros_in_its_one_hot_block(sites):
    encoder = federated_encoder(sites)
    rows = sites[0].iloc[:3].copy()
    rows["colour"] = ["green", "never-seen", np.nan]
    x = encoder.transform(rows)
    block = [i for i, name in enumerate(encoder.feature_names_out_) if name.startswith("colour__")]
    np.testing.assert_array_equal(x[:, block], [[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_columns_come_in_a_fixed_order_as_float32(sites):
    encoder = federated_encoder(sites)
    assert encoder.feature_names_out_ == [
        "dose", "size_nm", "day", "dose__missing",
        "colour__blue", "colour__green", "colour__red", "colour__violet",
        "tumour__breast", "tumour__kaposi", "tumour__ovarian",
    ]
    assert encoder.n_features_out_ == 11
    shuffled = sites[1][list(reversed(sites[1].columns))]
    x = encoder.transform(sites[1])
    assert x.dtype == np.float32 and x.shape == (len(sites[1]), 11)
    np.testing.assert_array_equal(encoder.transform(shuffled), x)


def test_site_order_does_not_change_the_encoder(sites):
    assert_same_fit(federated_encoder(sites), federated_encoder(sites[::-1]))


def test_transform_names_the_absent_column(sites):
    with pytest.raises(ValueError, match="'tumour'"):
        federated_encoder(sites).transform(sites[0].drop(columns="tumour"))


def test_infinite_numeric_value_is_refused_naming_the_column(sites):
    with pytest.raises(ValueError, match="'size_nm' holds infinite values at row positions \\[2\\]"):
        SiteStatistics.from_frame(sites[0].assign(size_nm=[0.0, 1.0, np.inf] + [1.0] * 47), TASK)


def test_encoder_used_before_fitting_says_so():
    with pytest.raises(NotFittedError, match="fit_statistics"):
        FeatureEncoder(TASK).transform(pd.DataFrame())


# ---------------------------------------------------------------------------------------------------------
# Targets


def test_targets_are_binary_01_multiclass_indices_and_standardised_regression(sites, pooled):
    encoder = federated_encoder(sites)
    y = encoder.encode_targets(pooled)
    assert encoder.classes_ == {"responded": ["0", "1"], "grade": ["1", "2", "10"]}  # numeric order
    assert all(v.dtype == np.float32 for v in y.values())
    responded = pooled["responded"].to_numpy()
    np.testing.assert_array_equal(y["responded"], responded.astype(np.float32))
    np.testing.assert_array_equal(y["grade"], pooled["grade"].map({"1": 0, "2": 1, "10": 2}).to_numpy())
    shrinkage = y["shrinkage"]
    assert np.nanmean(shrinkage) == pytest.approx(0.0, abs=1e-6)
    assert np.nanstd(shrinkage) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(encoder.decode_regression("shrinkage", shrinkage), pooled["shrinkage"], rtol=1e-6)


def test_missing_outcomes_stay_nan(sites, pooled):
    y = federated_encoder(sites).encode_targets(pooled)
    np.testing.assert_array_equal(np.isnan(y["responded"]), pooled["responded"].isna())
    np.testing.assert_array_equal(np.isnan(y["shrinkage"]), pooled["shrinkage"].isna())
    assert pooled["responded"].isna().any() and pooled["shrinkage"].isna().any()


def test_binary_outcome_with_only_class_1_still_encodes_1_as_1(sites):
    only_ones = sites[0].assign(responded=1.0)
    encoder = fit_local(only_ones, TASK)
    assert encoder.classes_["responded"] == ["0", "1"]
    assert set(encoder.encode_targets(only_ones)["responded"]) == {1.0}


def test_class_label_never_seen_in_training_is_named(sites):
    rows = sites[0].iloc[:2].assign(grade=["1", "7"])
    with pytest.raises(ValueError, match=r"'grade' holds labels \['7'\]"):
        federated_encoder(sites).encode_targets(rows)


def test_binary_outcome_with_three_classes_is_refused(sites):
    with pytest.raises(ValueError, match="'responded' has 3 classes"):
        fit_local(sites[0].assign(responded=np.arange(len(sites[0])) % 3), TASK)


def test_decode_regression_of_a_classification_outcome_is_refused(sites):
    with pytest.raises(ValueError, match="'grade' is not a regression outcome"):
        federated_encoder(sites).decode_regression("grade", np.zeros(2))


# ---------------------------------------------------------------------------------------------------------
# Records and serialisation


def over_the_wire(metrics: MetricRecord, config: ConfigRecord) -> tuple[MetricRecord, ConfigRecord]:
    """What arrives at the server: the records through Flower's protobuf serialisation."""
    return (serde.metric_record_from_proto(serde.metric_record_to_proto(metrics)),
            serde.config_record_from_proto(serde.config_record_to_proto(config)))


def test_site_statistics_round_trip_through_flower_records(sites):
    for site in sites:
        stats = SiteStatistics.from_frame(site, TASK)
        metrics, config = stats.to_records()
        assert all(isinstance(name, str) for name in config["categorical.0.values"])
        assert SiteStatistics.from_records(*over_the_wire(metrics, config)) == stats


def test_encoder_fit_from_records_received_from_sites_equals_the_in_memory_fit(sites):
    received = [SiteStatistics.from_records(*over_the_wire(*SiteStatistics.from_frame(s, TASK).to_records()))
                for s in sites]
    assert_same_fit(FeatureEncoder(TASK).fit_statistics(combine(received)), federated_encoder(sites), tolerance=0)


def test_statistics_record_without_a_key_is_refused_naming_it(sites):
    metrics, config = SiteStatistics.from_frame(sites[0], TASK).to_records()
    del metrics["numeric.m2"]
    with pytest.raises(ValueError, match="'numeric.m2'"):
        SiteStatistics.from_records(metrics, config)


def test_encoder_round_trips_through_dict_json_and_config_record(sites, pooled):
    encoder = federated_encoder(sites)
    from_json = FeatureEncoder.from_dict(json.loads(json.dumps(encoder.to_dict(), allow_nan=False)))
    record = encoder.to_config_record()
    received = serde.config_record_from_proto(serde.config_record_to_proto(record))
    from_record = FeatureEncoder.from_config_record(received)
    for copy in (from_json, from_record):
        assert copy.task == encoder.task
        assert_same_fit(copy, encoder, tolerance=0)
        np.testing.assert_array_equal(copy.transform(pooled), encoder.transform(pooled))
        for name, values in copy.encode_targets(pooled).items():
            np.testing.assert_array_equal(values, encoder.encode_targets(pooled)[name])


def test_edited_encoder_dict_is_refused(sites):
    data = federated_encoder(sites).to_dict()
    data["vocabularies"]["colour"].append("zzz")
    with pytest.raises(ValueError, match="feature_names_out"):
        FeatureEncoder.from_dict(data)
    with pytest.raises(ValueError, match="version"):
        FeatureEncoder.from_dict({**data, "version": 99})


# ---------------------------------------------------------------------------------------------------------
# Real site tables


def test_nanoparticle_site_loaded_by_validation_encodes(tmp_path: Path):
    site = load_site(write_site(tmp_path))
    episodes = site.episodes
    train = episodes[assign_split(episodes, NANOPARTICLE_TASK, seed=0) == "train"]
    encoder = FeatureEncoder(NANOPARTICLE_TASK).fit_statistics(SiteStatistics.from_frame(train, NANOPARTICLE_TASK))
    x = encoder.transform(episodes)
    assert x.dtype == np.float32 and x.shape == (len(episodes), encoder.n_features_out_)
    assert np.isfinite(x).all()
    assert encoder.feature_names_out_[:len(NANOPARTICLE_TASK.numeric)] == list(NANOPARTICLE_TASK.numeric)
    assert "sex__F" in encoder.feature_names_out_
    y = encoder.encode_targets(episodes)
    assert encoder.classes_ == {"response": ["0", "1"], "toxicity_grade3": ["0", "1"]}
    np.testing.assert_array_equal(y["response"], episodes["response"].to_numpy(dtype=np.float32))
    np.testing.assert_allclose(encoder.decode_regression("efficacy_pct", y["efficacy_pct"]),
                               episodes["efficacy_pct"], rtol=1e-5)
    # the whole site: bilirubin is missing for one patient, so it gets an indicator
    assert fit_local(episodes, NANOPARTICLE_TASK).missing_indicator_ == ["bilirubin_umol_l"]


def test_generic_task_site_loaded_by_validation_encodes(tmp_path: Path):
    task = TaskSpec.from_toml(write_task_toml(tmp_path / "task.toml"))
    table = load_site(write_task_csv(tmp_path / "heart.csv"), task).episodes
    encoder = fit_local(table[table["split"] == "train"], task)
    assert encoder.vocabularies_ == {"sex": ["F", "M"], "cp": ["type0", "type1", "type2", "type3"]}
    assert encoder.missing_indicator_ == ["chol"]
    x = encoder.transform(table)
    assert x[3, encoder.feature_names_out_.index("chol")] == 0.0
    assert x[3, encoder.feature_names_out_.index("chol__missing")] == 1.0
    assert encoder.classes_ == {"target": ["0", "1"]}
    np.testing.assert_array_equal(encoder.encode_targets(table)["target"], np.arange(len(table)) % 2)


def test_small_generic_frame_with_text_category_and_multiclass_target():
    task = TaskSpec(outcomes=(Outcome("stage", "multiclass"),), numeric=("x",), categorical=("site_kind",))
    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "site_kind": ["urban", "rural", "urban", "remote"],
                          "stage": ["III", "I", "II", "I"]})
    encoder = fit_local(frame, task)
    assert encoder.classes_ == {"stage": ["I", "II", "III"]}
    np.testing.assert_array_equal(encoder.encode_targets(frame)["stage"], [2, 0, 1, 0])
    assert encoder.feature_names_out_ == ["x", "site_kind__remote", "site_kind__rural", "site_kind__urban"]
    np.testing.assert_allclose(encoder.transform(frame)[:, 0], (frame["x"] - 2.5) / np.std(frame["x"]), rtol=1e-6)
