"""benchmarks/personalised_fresh.py: fresh patients of a clinic, encoded and scored, and the oracle's bias."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from shared.encoding import FeatureEncoder, SiteStatistics
from shared.protocol.personalisation import GLOBAL, LOCAL
from shared.task import NANOPARTICLE_TASK
from simulation.clinics import make_world, simulate_clinic, world_description


@pytest.fixture
def bench(monkeypatch):
    """The benchmark as a module (it imports its sibling ``personalised`` as a script does)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module("personalised_fresh")


@pytest.fixture(scope="module")
def tiny():
    world = make_world(3, 7, patients_per_clinic=15)
    clinic = world.clinics[1]
    episodes, _ = simulate_clinic(world, clinic)
    encoder = FeatureEncoder(NANOPARTICLE_TASK).fit_statistics(SiteStatistics.from_frame(episodes, NANOPARTICLE_TASK))
    return world, clinic, episodes, encoder


def test_fresh_cohort_is_new_patients_of_the_clinic_encoded_with_the_run_encoder(bench, tiny):
    world, clinic, episodes, encoder = tiny
    fresh = bench.fresh_cohort(world, clinic.name, 40, encoder)
    # 40 patients although the clinic has 15: three draws of the fresh stream, every cycle of each patient
    assert fresh.frame["patient_id"].nunique() == 40
    assert fresh.frame["patient_id"].str.startswith(("d0:", "d1:", "d2:")).all()
    assert set(fresh.frame["patient_id"].str.split(":").str[0]) == {"d0", "d1", "d2"}
    assert len(fresh) >= 40 and fresh.x.shape == (len(fresh), encoder.transform(episodes.iloc[:3]).shape[1])
    assert fresh.x.dtype.kind == "f" and np.isfinite(fresh.x).all()
    recorded = ~np.isnan(fresh.targets["response"])
    assert recorded.sum() > 0.8 * len(fresh)
    # new patients, not the site's: no fresh (age, weight) pair is one of the site's rows
    own = set(zip(episodes["age_years"], episodes["weight_kg"], strict=True))
    assert not own & set(zip(fresh.frame["age_years"], fresh.frame["weight_kg"], strict=True))
    # the same patients each time (a seeded stream), and the site's own rows encode as the run's
    again = bench.fresh_cohort(world, clinic.name, 40, encoder)
    np.testing.assert_array_equal(fresh.x, again.x)
    other = bench.fresh_cohort(world, world.clinics[0].name, 40, encoder)
    assert not np.array_equal(other.x[:20], fresh.x[:20])


def test_scored_gives_the_response_auc_its_se_and_the_choice_score(bench, tiny):
    world, clinic, _, encoder = tiny
    data = bench.fresh_cohort(world, clinic.name, 60, encoder)
    y = data.targets["response"]
    n_pos, n_neg = int(np.nansum(y == 1)), int(np.nansum(y == 0))
    assert n_pos and n_neg
    base = {name: np.nan_to_num(v) for name, v in data.targets.items()}  # every outcome predicted perfectly
    perfect = bench.scored(encoder, data, base)
    assert perfect["auc"] == pytest.approx(1.0) and (perfect["n_pos"], perfect["n_neg"]) == (n_pos, n_neg)
    assert perfect["se"] == pytest.approx(0.0, abs=1e-9) and perfect["score"] == pytest.approx(1.0)
    reversed_ = bench.scored(encoder, data, base | {"response": 1.0 - base["response"]})
    assert reversed_["auc"] == pytest.approx(0.0)
    assert reversed_["score"] < perfect["score"]
    constant = bench.scored(encoder, data, base | {"response": np.full(len(data), 0.3)})
    assert constant["auc"] == pytest.approx(0.5)
    # Hanley & McNeil at AUC 0.5: Q1 = Q2 = 1/3
    expected_se = math.sqrt((0.25 + (n_pos + n_neg - 2) * (1 / 3 - 0.25)) / (n_pos * n_neg))
    assert constant["se"] == pytest.approx(expected_se) and 0.01 < constant["se"] < 0.2


def test_oracle_terms_split_the_bias_into_selection_and_one_models_noise(bench):
    # on the test split local looks better (0.80 vs 0.75); on the fresh cohort global is (0.78 vs 0.70)
    terms = bench.oracle_terms({LOCAL: 0.80, GLOBAL: 0.75}, {LOCAL: 0.70, GLOBAL: 0.78})
    assert terms["bias"] == pytest.approx(0.02) and terms["selection"] == pytest.approx(0.05)
    assert terms["noise_of_better"] == pytest.approx(-0.03) and terms["better_on_fresh"] == GLOBAL
    # the test split ranks them as the truth does: no selection gain, the bias is the better model's noise
    same = bench.oracle_terms({LOCAL: 0.70, GLOBAL: 0.90}, {LOCAL: 0.72, GLOBAL: 0.85})
    assert same["selection"] == 0.0 and same["bias"] == pytest.approx(0.05)


def test_replay_difference_treats_two_nans_as_agreeing_and_one_as_infinite(bench):
    assert bench.replay_difference({"a": 0.7, "b": math.nan}, {"a": 0.7, "b": math.nan}) == 0.0
    assert bench.replay_difference({"a": 0.7, "b": 0.6}, {"a": 0.71, "b": 0.6}) == pytest.approx(0.01)
    assert bench.replay_difference({"a": 0.7}, {"a": math.nan}) == math.inf


def test_run_world_refuses_a_run_of_another_world(bench, tmp_path):
    world = make_world(3, 7)
    (tmp_path / "sites").mkdir()
    (tmp_path / "sites" / "world.json").write_text(json.dumps(world_description(world)))
    assert [c.seed for c in bench.run_world(tmp_path, 3, 7).clinics] == [c.seed for c in world.clinics]
    with pytest.raises(SystemExit, match="world.json"):
        bench.run_world(tmp_path, 3, 8)


def test_kept_model_loads_the_sites_saved_choice_a_mix_as_its_two_members(bench, tmp_path):
    import torch

    from client.personalised.mix import Mix
    from shared.ann import AnnSpec, MultiTaskMLP, predict
    from shared.protocol.personalisation import MIX, Personalisation

    spec = AnnSpec(n_inputs=4, outcomes=(("response", "binary", 1), ("efficacy", "regression", 1)), hidden=(8, 4))
    torch.manual_seed(0)
    global_model, local, tuned = MultiTaskMLP(spec), MultiTaskMLP(spec), MultiTaskMLP(spec)
    x = np.random.default_rng(1).normal(size=(30, 4)).astype(np.float32)
    folder = tmp_path / "personalisation" / "clinic_01"
    folder.mkdir(parents=True)
    plan = Personalisation(methods=("finetune", MIX), mix_alpha=0.25)
    mixed = Mix(alpha=0.25).fit(global_model, local)
    torch.save(mixed.model_.state_dict(), folder / f"run7-{MIX}.pt")
    torch.save(tuned.state_dict(), folder / "run7-finetune.pt")
    kept = bench.kept_model(tmp_path, "clinic_01", "run7", MIX, global_model, plan)
    assert bench.prediction_difference(predict(kept, x), mixed.predict(x)) < 1e-6
    # not the global model's predictions: the local member and α were loaded
    assert bench.prediction_difference(predict(kept, x), predict(global_model, x)) > 1e-3
    kept = bench.kept_model(tmp_path, "clinic_01", "run7", "finetune", global_model, plan)
    assert bench.prediction_difference(predict(kept, x), predict(tuned, x)) < 1e-6
    with pytest.raises(SystemExit, match="run7-ditto.pt"):
        bench.kept_model(tmp_path, "clinic_01", "run7", "ditto", global_model, plan)


def test_test_sized_draws_show_the_oracle_bias_of_two_equal_models_and_none_on_the_whole_cohort(bench):
    rng = np.random.default_rng(0)
    patients = np.repeat([f"p{i}" for i in range(1000)], 2)  # two cycles each
    y = (rng.random(2000) < 0.4).astype(float)
    y[::17] = np.nan  # not recorded: left out
    signal = np.where(np.isnan(y), 0.0, y)
    # two models of the same skill, independent errors; a third better than both
    def sigmoid(z: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-z))

    preds = {GLOBAL: sigmoid(signal + rng.normal(0, 1.0, 2000)), LOCAL: sigmoid(signal + rng.normal(0, 1.0, 2000)),
             "better": sigmoid(signal + rng.normal(0, 0.5, 2000))}
    whole = bench.test_sized_aucs(patients, y, preds, 1000, 3, np.random.default_rng(1))
    fresh = {c: float(v[0]) for c, v in whole.items()}
    for c in preds:  # every patient each time: no spread
        assert np.ptp(whole[c]) == 0.0
    assert fresh["better"] > max(fresh[GLOBAL], fresh[LOCAL]) and abs(fresh[GLOBAL] - fresh[LOCAL]) < 0.03
    terms = bench.expected_on_test_splits(whole, fresh, GLOBAL)
    assert terms["expected_bias"] == pytest.approx(0.0) and terms["draws"] == 3
    assert terms["expected_local_minus_global"] == pytest.approx(fresh[LOCAL] - fresh[GLOBAL])
    small = bench.test_sized_aucs(patients, y, preds, 30, 300, np.random.default_rng(2))
    assert 0.03 < np.nanstd(small[GLOBAL]) < 0.15  # a 30-patient split's AUC noise
    terms = bench.expected_on_test_splits(small, fresh, GLOBAL)
    # E[max of two noisy equal estimates] − max of the truths ≈ SD/√π ≈ 0.04 here: clearly above 0
    assert 0.01 < terms["expected_bias"] < 0.1
    assert terms["expected_chosen_minus_max"] < -0.01 and terms["chosen_at_or_above_max"] < 0.7
    assert terms["best_on_fresh"] == "better" and terms["expected_best_minus_max"] > terms["expected_chosen_minus_max"]
    with pytest.raises(ValueError, match="1001 patients"):
        bench.test_sized_aucs(patients, y, preds, 1001, 1, np.random.default_rng(0))


def test_compact_keeps_five_significant_digits_small_checks_and_non_floats(bench):
    body = bench.compact({"auc": 0.8765432, "check": 2.4e-07, "n": 124, "gap": [-0.0012345678, math.nan], "c": "mix"})
    assert body["auc"] == 0.87654 and body["check"] == 2.4e-07 and body["n"] == 124 and body["c"] == "mix"
    assert body["gap"][0] == -0.0012346 and math.isnan(body["gap"][1])
