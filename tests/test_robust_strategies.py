"""Robust aggregation: Flower's own Krum, MultiKrum, Bulyan, FedMedian and FedTrimmedAvg by name, with parameters
derived from the number of sites, impossible federations refused; update-norm clipping clips."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum

from strategies.choice import make_strategy
from strategies.robust import (
    ImpossibleAggregation,
    RobustParameters,
    check_robust,
    default_malicious_sites,
    default_trim_fraction,
)
from strategies.summation import sum_metricrecords
from strategies.update_clipping import MedianNormClipping, UpdateNormClipping, clip_update, update_norm


def test_defaults_assume_one_malicious_site_in_ten_and_trim_that_many_at_each_end():
    assert [default_malicious_sites(n) for n in (3, 10, 19, 20, 35)] == [1, 1, 1, 2, 3]
    assert default_trim_fraction(10, 1) == 0.15
    for n in range(3, 60):
        f = default_malicious_sites(n)
        beta = default_trim_fraction(n, f)
        if beta < 0.5:  # trims f at each end, and still f with one site missing
            assert int(beta * n) == f and int(beta * (n - 1)) == f, n
    assert RobustParameters.of(10) == RobustParameters(1, 0.15)
    assert RobustParameters.of(10, malicious_sites=2) == RobustParameters(2, 0.25)
    assert RobustParameters.of(10, malicious_sites=0, trim_fraction=0.3) == RobustParameters(0, 0.3)


@pytest.mark.parametrize(("name", "cls"), [("krum", Krum), ("multikrum", MultiKrum), ("bulyan", Bulyan),
                                           ("fedmedian", FedMedian), ("fedtrimmedavg", FedTrimmedAvg)])
def test_each_robust_name_builds_flowers_own_class_on_every_site(name, cls):
    strategy = make_strategy(name, n_sites=10)
    assert type(strategy) is cls
    assert strategy.fraction_train == strategy.fraction_evaluate == 1.0
    assert strategy.min_train_nodes == strategy.min_available_nodes == strategy.min_evaluate_nodes == 1
    assert strategy.evaluate_metrics_aggr_fn is sum_metricrecords


def test_robust_strategies_get_the_computed_parameters():
    assert make_strategy("krum", n_sites=10).num_malicious_nodes == 1
    assert make_strategy("krum", n_sites=10).num_nodes_to_select == 1
    multikrum = make_strategy("multikrum", n_sites=10, robust=RobustParameters(3, 0.35))
    assert (multikrum.num_malicious_nodes, multikrum.num_nodes_to_select) == (3, 7)  # averages the n − f best
    assert make_strategy("bulyan", n_sites=11, robust=RobustParameters(2, 0.25)).num_malicious_nodes == 2
    assert make_strategy("fedtrimmedavg", n_sites=10).beta == 0.15
    assert make_strategy("fedtrimmedavg", n_sites=20, robust=RobustParameters.of(20)).beta == 0.125


@pytest.mark.parametrize(("name", "n_sites", "f", "needs"), [
    ("krum", 4, 1, "n ≥ 2f \\+ 3, at least 5"), ("multikrum", 6, 2, "n ≥ 2f \\+ 3, at least 7"),
    ("bulyan", 10, 2, "n ≥ 4f \\+ 3, at least 11"), ("bulyan", 5, 1, "at least 7"),
    ("fedmedian", 4, 2, "n ≥ 2f \\+ 1, at least 5")])
def test_a_federation_too_small_for_the_assumed_attackers_is_refused_saying_what_it_needs(name, n_sites, f, needs):
    with pytest.raises(ImpossibleAggregation, match=f"{name} tolerating {f} malicious site.*{needs}.*has {n_sites}"):
        make_strategy(name, n_sites=n_sites, robust=RobustParameters(f, 0.1))
    check_robust(name, n_sites + 10, RobustParameters(f, 0.1))  # enough sites: accepted


def test_trimmed_mean_that_trims_fewer_than_the_attackers_or_half_is_refused():
    with pytest.raises(ImpossibleAggregation, match="drops 0 of 10 sites at each end, fewer than the 1"):
        make_strategy("fedtrimmedavg", n_sites=10, robust=RobustParameters(1, 0.05))
    with pytest.raises(ImpossibleAggregation, match=r"must be in \[0, 0.5\)"):
        make_strategy("fedtrimmedavg", n_sites=10, robust=RobustParameters(1, 0.5))
    with pytest.raises(ImpossibleAggregation, match="drops 2 of 5 sites at each end, fewer than the 3"):
        make_strategy("fedtrimmedavg", n_sites=5, robust=RobustParameters(3, 0.45))
    with pytest.raises(ImpossibleAggregation, match=r"must be in \[0, 0.5\); got 0.7"):
        make_strategy("fedtrimmedavg", n_sites=5, robust=RobustParameters.of(5, 3))  # derived (3 + ½)/5
    with pytest.raises(ImpossibleAggregation, match="cannot be negative"):
        check_robust("krum", 10, RobustParameters(-1, 0.1))


def test_clip_update_scales_a_long_update_to_the_bound_and_keeps_a_short_one():
    global_ = {"w": np.array([1.0, 1.0]), "b": np.array([0.0])}
    long = {"w": np.array([4.0, 5.0]), "b": np.array([12.0])}  # update (3, 4, 12): norm 13
    assert update_norm(global_, long) == pytest.approx(13.0)
    clipped = clip_update(global_, long, max_norm=2.6)  # scaled by 0.2
    np.testing.assert_allclose(clipped["w"], [1.6, 1.8])
    np.testing.assert_allclose(clipped["b"], [2.4])
    assert update_norm(global_, clipped) == pytest.approx(2.6)
    short = {"w": np.array([1.3, 1.4]), "b": np.array([1.2])}  # norm 1.3
    for key, value in clip_update(global_, short, max_norm=2.6).items():
        np.testing.assert_allclose(value, short[key])
    float32 = {"w": np.array([4.0, 5.0], dtype=np.float32), "b": np.array([12.0], dtype=np.float32)}
    assert clip_update(global_, float32, 2.6)["w"].dtype == np.float32


def _reply(arrays: dict[str, np.ndarray], n: int, node: int = 0) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n})})
    message = Message(content, dst_node_id=0, message_type="train")
    message.metadata.__dict__["_src_node_id"] = node  # as if node ``node`` had sent it (no setter in Flower)
    return message


    def __init__(self, strategy: UpdateNormClipping, global_arrays: dict[str, np.ndarray]) -> None:
        strategy._global = {k: v.astype(np.float64) for k, v in global_arrays.items()}


def test_clipping_wrapper_bounds_a_scaled_update_before_fedavg_averages(monkeypatch, task_identity):
    global_ = {"w": np.zeros(2)}
    honest = [{"w": np.array([0.1, 0.0])}, {"w": np.array([0.0, 0.1])}, {"w": np.array([0.1, 0.1])}]
    attacker = {"w": np.array([30.0, 40.0])}  # norm 50
    inner = FedAvg()
    monkeypatch.setattr(inner, "configure_train", lambda *args: [])
    strategy = UpdateNormClipping(inner, max_norm=0.5)
    strategy.configure_train(1, ArrayRecord({"w": Array(global_["w"])}), None, None)
    replies = [_reply(a, 10, node) for node, a in enumerate([*honest, attacker], start=1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    # the attacker's update shrinks to (0.3, 0.4): the mean is (0.1+0+0.1+0.3, 0+0.1+0.1+0.4) / 4
    np.testing.assert_allclose(arrays["w"].numpy(), [0.125, 0.15])
    assert strategy.norms[1] == pytest.approx({1: 0.1, 2: 0.1, 3: np.sqrt(0.02), 4: 50.0})
    assert strategy.bounds == {1: 0.5}
    unclipped, _ = FedAvg().aggregate_train(1, [_reply(a, 10) for a in [*honest, attacker]])
    np.testing.assert_allclose(unclipped["w"].numpy(), [7.55, 10.05])


def test_clipping_wraps_any_named_strategy_and_refuses_a_non_positive_bound():
    wrapped = make_strategy("krum", n_sites=10, clip_norm=1.5)
    assert isinstance(wrapped, UpdateNormClipping) and type(wrapped.strategy) is Krum
    assert wrapped.max_norm == 1.5
    assert type(make_strategy("fedavg", n_sites=3, clip_norm=0.0)) is FedAvg
    with pytest.raises(ValueError, match="max_norm"):
        UpdateNormClipping(FedAvg(), max_norm=-1.0)


def test_median_clipping_bounds_each_update_by_a_multiple_of_the_rounds_median_norm(monkeypatch, task_identity):
    global_ = {"w": np.zeros(2)}
    sites = [({"w": np.array([0.3, 0.4])}, 10),    # norm 0.5
             ({"w": np.array([0.0, 1.0])}, 30),    # norm 1
             ({"w": np.array([1.2, 1.6])}, 20),    # norm 2
             ({"w": np.array([300.0, 400.0])}, 40)]  # norm 500, a ×100 attacker with the most rows
    inner = FedAvg()
    monkeypatch.setattr(inner, "configure_train", lambda *args: [])
    strategy = MedianNormClipping(inner, factor=2.0)
    strategy.configure_train(1, ArrayRecord({"w": Array(global_["w"])}), None, None)
    arrays, _ = strategy.aggregate_train(1, [_reply(a, n, node) for node, (a, n) in enumerate(sites, start=1)])
    # median of (0.5, 1, 2, 500) is 1.5, bound 3: only the attacker is clipped, to (1.8, 2.4); weights by rows kept
    assert strategy.bounds == {1: pytest.approx(3.0)}
    assert strategy.norms[1] == pytest.approx({1: 0.5, 2: 1.0, 3: 2.0, 4: 500.0})
    expected = (10 * np.array([0.3, 0.4]) + 30 * np.array([0.0, 1.0]) + 20 * np.array([1.2, 1.6])
                + 40 * np.array([1.8, 2.4])) / 100  # = (0.99, 1.62)
    np.testing.assert_allclose(arrays["w"].numpy(), expected)
    np.testing.assert_allclose(expected, [0.99, 1.62])


def test_median_clipping_is_chosen_by_its_setting_and_not_together_with_a_fixed_bound():
    wrapped = make_strategy("fedavg", n_sites=10, clip_median_factor=1.5)
    assert type(wrapped) is MedianNormClipping and wrapped.factor == 1.5 and type(wrapped.strategy) is FedAvg
    with pytest.raises(ValueError, match="choose one update norm bound"):
        make_strategy("fedavg", n_sites=10, clip_norm=1.0, clip_median_factor=1.5)
    with pytest.raises(ValueError, match="factor"):
        MedianNormClipping(FedAvg(), factor=0.0)
    assert MedianNormClipping(FedAvg(), factor=2.0).bound([]) == np.inf  # no update: nothing to clip against


def test_run_record_keeps_the_update_norms_and_bounds_by_site_name():
    from server.run_record import ModelRecord, RunRecord, update_norm_record

    norms = update_norm_record({11: "clinic_00", 12: "clinic_01"}, {1: 3.0, 2: 2.5},
                               {1: {11: 1.0, 12: 500.0}, 2: {11: 2.0, 13: 3.0}})
    assert norms == {"bound": {"1": 3.0, "2": 2.5},
                     "per_site": {"1": {"clinic_00": 1.0, "clinic_01": 500.0},
                                  "2": {"clinic_00": 2.0, "node 13": 3.0}}}
    record = RunRecord(run_id="r", settings={}, models={"ann": ModelRecord(family="ann", mode="fedavg",
                                                                           update_norms=norms)})
    assert RunRecord.from_dict(record.to_dict()).models["ann"].update_norms == norms


def test_a_deployed_run_too_small_for_its_robust_strategy_is_refused_in_its_record_and_ends(monkeypatch, tmp_path):
    import server.app
    from server.run_record import RunRecord
    from server.settings import RunSettings
    from server.site_check import SiteCheck
    from shared.protocol.privacy import SitePrivacy

    three_sites = SiteCheck(usable={1: "clinic_a", 2: "clinic_b", 3: "clinic_c"},
                            privacy={n: SitePrivacy(dp=False) for n in (1, 2, 3)})
    monkeypatch.setattr(server.app, "usable_sites",
                        lambda grid, min_nodes, plan, resumes=None: (three_sites, three_sites.nodes))

    def no_phase(*args, **kwargs):
        raise AssertionError("a refused run asks the sites nothing more")

    monkeypatch.setattr(server.app, "federated_encoder", no_phase)
    settings = RunSettings(strategy="bulyan", models="ann", out_dir=str(tmp_path))
    record = server.app.run_federation(grid=None, settings=settings, run_id="r1")  # returns: the ServerApp ends
    why = ("bulyan tolerating 1 malicious site needs n ≥ 4f + 3, at least 7 training sites; this run has 3: add "
           "sites, assume fewer malicious sites, or choose another strategy")
    assert record.refused == {"training": why}
    written = RunRecord.read(tmp_path)
    assert written.refused == {"training": why} and written.models == {}
    assert written.sites == ["clinic_a", "clinic_b", "clinic_c"]
    # the same three sites are enough for the median (n ≥ 2f + 1 = 3): nothing refused
    assert server.app.aggregation_refusal(RunSettings(strategy="fedmedian", models="ann"), three_sites) is None
    assert server.app.aggregation_refusal(RunSettings(strategy="bulyan", models="xgboost"), three_sites) is None


def test_a_run_where_no_site_grants_training_is_refused_naming_each_site_and_why():
    import server.app
    from server.settings import RunSettings
    from server.site_check import SiteCheck
    from shared.protocol.privacy import SitePrivacy

    spent = {1: SitePrivacy(dp=True, epsilon_budget=3.0, refused={"training": "privacy budget exhausted"}),
             2: SitePrivacy(dp=True, epsilon_budget=3.0, refused={})}
    sites = SiteCheck(usable={1: "clinic_a", 2: "clinic_b"}, privacy=spent)
    why = server.app.aggregation_refusal(RunSettings(strategy="fedavg", models="ann"), sites)
    assert why == ("no site grants training (clinic_a: privacy budget exhausted; "
                   "clinic_b: training was not in the run's plan)")


def test_settings_refuse_two_update_norm_bounds_and_old_records_read_without_refusals():
    from server.run_record import RunRecord
    from server.settings import RunSettings

    with pytest.raises(ValueError, match="choose one update norm bound"):
        RunSettings(clip_norm=1.0, clip_median_factor=2.0)
    body = RunRecord(run_id="r", settings={}).to_dict()
    del body["refused"]  # a record written before the field existed
    assert RunRecord.from_dict(body).refused == {}


def _benchmark(monkeypatch):
    """benchmarks/robust_aggregation.py as a module (it imports its sibling ``record`` as a script does)."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module("robust_aggregation")


def test_benchmark_runs_its_cells_with_the_bound_asked_for_and_merges_formulations_as_the_coordinator(monkeypatch):
    import argparse

    import pandas as pd

    from shared.dosing_policy import FORMULATION_FEATURES

    bench = _benchmark(monkeypatch)
    args = argparse.Namespace(cells="fedavg:none,fedavg+clipmed=2:scale=100,krum+clip=1.5:sign-flip")
    assert bench.grid(args) == [("fedavg", 0.0, 0.0, "none"), ("fedavg", 0.0, 2.0, "scale=100"),
                                ("krum", 1.5, 0.0, "sign-flip")]
    with pytest.raises(ValueError, match="clipmed"):
        bench.grid(argparse.Namespace(cells="fedavg+median=2:none"))
    assert bench.clipped_label("fedavg", 0.0, 2.0) == "fedavg+clip2xmed"
    assert bench.clipped_label("fedavg", 1.5, 0.0) == "fedavg+clip1.5"

    def site(rows):  # rows: (formulation id, value of every property)
        frame = pd.DataFrame([{"formulation_id": f, **{k: v for k in FORMULATION_FEATURES}} for f, v in rows])
        return argparse.Namespace(episodes=frame)

    merged = bench.formulations_of({"a": site([("F1", 1.0), ("F1", 3.0), ("F2", 5.0)]), "b": site([("F1", 4.0)])})
    # F1: site a's mean 2, site b's 4 → 3; F2 at site a only → 5
    assert merged == {"F1": dict.fromkeys(FORMULATION_FEATURES, 3.0), "F2": dict.fromkeys(FORMULATION_FEATURES, 5.0)}


def test_row_weighted_trimmed_mean_trims_by_value_then_weighs_the_rest_by_rows():
    from strategies.weighted_trimmed_mean import row_weighted_trim_mean

    values = np.array([[1.0, 10.0], [2.0, -50.0], [3.0, 20.0], [100.0, 30.0], [4.0, 40.0]])
    rows = np.array([10.0, 20.0, 30.0, 800.0, 40.0])
    # cut ⌊0.2 · 5⌋ = 1 at each end. Column 0 keeps 2, 3, 4 (rows 20, 30, 40): (40 + 90 + 160) / 90 = 3.2222;
    # column 1 keeps 10, 20, 30 (rows 10, 30, 800): (100 + 600 + 24000) / 840 = 29.405 — the site with 800 rows
    # is trimmed where it is extreme and weighs by its rows where it is not
    np.testing.assert_allclose(row_weighted_trim_mean(values, rows, 0.2), [290 / 90, 24700 / 840])
    np.testing.assert_allclose(row_weighted_trim_mean(values, np.ones(5), 0.2), [3.0, 20.0])  # = FedTrimmedAvg
    np.testing.assert_allclose(row_weighted_trim_mean(values, rows, 0.0), rows @ values / rows.sum())  # = FedAvg
    with pytest.raises(ValueError, match="cut_fraction"):
        row_weighted_trim_mean(values, rows, 0.5)


def test_rowtrimmedavg_by_name_aggregates_replies_with_their_num_examples(monkeypatch, task_identity):
    from strategies.weighted_trimmed_mean import RowWeightedTrimmedAvg

    strategy = make_strategy("rowtrimmedavg", n_sites=5)
    assert type(strategy) is RowWeightedTrimmedAvg and strategy.beta == 0.3  # (1 + ½) / 5
    sites = [([1.0, 10.0], 10), ([2.0, -50.0], 20), ([3.0, 20.0], 30), ([100.0, 30.0], 800), ([4.0, 40.0], 40)]
    arrays, _ = strategy.aggregate_train(1, [_reply({"w": np.array(v)}, n, node)
                                             for node, (v, n) in enumerate(sites, start=1)])
    np.testing.assert_allclose(arrays["w"].numpy(), [290 / 90, 24700 / 840])
    with pytest.raises(ImpossibleAggregation, match="rowtrimmedavg: a trim fraction of 0.05 drops 0 of 10"):
        make_strategy("rowtrimmedavg", n_sites=10, robust=RobustParameters(1, 0.05))
