"""Flower simulation of the federated ANN: it helps the smallest clinic and comes close to pooling the data.

The simulator gives what a real federation cannot: a large fresh sample of each clinic's own patients to
judge models on, so the comparison at a 12-patient clinic is not decided by its two or three test patients.
"""

import dataclasses
import time

import pandas as pd
import pytest

from client.split import encode
from client.training import evaluate
from server.run_record import PROGRESS_FILE, RunRecord
from shared import metrics
from shared.artifacts import RunArtifacts
from shared.task import NANOPARTICLE_TASK
from shared.validation import load_site
from simulation.baselines import BaselineSettings, local_models, pooled_model
from simulation.clinics import SitePrivacy, generate_sites, simulate_clinic
from simulation.experiment import ExperimentConfig, flower_environment, prepare_sites, quiet_flower, run_federation

pytestmark = pytest.mark.slow
ROUNDS = 8


@pytest.fixture(scope="module")
def federation(tmp_path_factory, shared_ray):
    out = tmp_path_factory.mktemp("federation")
    flower_environment(out)
    quiet_flower()
    # models="ann": the federated ANN is under test here; the default also grows 20 rounds of histogram trees,
    # which took most of the fixture's time (test_federated_hist and test_federated_xgboost test those)
    cfg = ExperimentConfig(out=out, clinics=4, rounds=ROUNDS, dp=False, seed=3, models="ann")
    world = generate_sites(cfg.clinics, cfg.seed, out / "sites", privacy=SitePrivacy(dp=False))
    sources, _ = prepare_sites(dataclasses.replace(cfg, sites=[out / "sites" / c.name for c in world.clinics]))
    progress = []  # the coordinator's progress record as the dashboard would read it, after each round

    def read_progress(server_round: int) -> None:
        snapshot = RunRecord.read(out / "federated" / PROGRESS_FILE)
        progress.append((server_round, [r["round"] for r in snapshot.models["ann"].rounds]))

    started = time.perf_counter()
    record = run_federation(cfg, sources, on_round=read_progress)
    wall = time.perf_counter() - started
    artifacts = RunArtifacts.open(out / "federated", run_id=record.run_id)
    encoder, model = artifacts.encoder(), artifacts.ann()
    sites = {c.name: load_site(out / "sites" / c.name) for c in world.clinics}
    settings = BaselineSettings(task=NANOPARTICLE_TASK, epochs=ROUNDS, batch_size=32, lr=0.005, hidden=(64, 32),
                                seed=cfg.seed, split_seed=cfg.seed)
    fresh = {c.name: simulate_clinic(world, dataclasses.replace(c, n_patients=1500, seed=c.seed + 1))[0]
             for c in world.clinics}
    return {"record": record, "wall": wall, "progress": progress, "out": out, "world": world,
            "federated": (model, encoder), "sites": sites,
            "local": local_models(sites, dict.fromkeys(sites), settings),
            "pooled": pooled_model(sites, None, settings), "fresh": fresh}


def test_the_coordinator_writes_its_progress_after_each_round_and_removes_it_at_the_end(federation):
    # one-message rounds: round r's evaluations come with round r + 1's training replies, so when round r is
    # complete the record already holds round r + 1's training too (the final round's evaluation comes alone)
    assert federation["progress"] == [(r, list(range(1, min(r + 1, ROUNDS) + 1))) for r in range(1, ROUNDS + 1)]
    assert not (federation["out"] / "federated" / PROGRESS_FILE).exists()
    assert (federation["out"] / "federated" / "federation.json").is_file()


def test_the_record_holds_the_coordinators_seconds_per_phase_within_the_runs_wall_time(federation):
    seconds = federation["record"].phase_seconds
    assert list(seconds) == ["site_check", "statistics", "training", "importance"]  # models="ann", no policy key
    assert all(s > 0 for s in seconds.values()) and sum(seconds.values()) < federation["wall"]
    assert RunRecord.read(federation["out"] / "federated").phase_seconds == seconds


def test_the_importance_is_summed_through_the_runs_secure_sum_over_every_site(federation):
    importance = RunRecord.read(federation["out"] / "federated").models["ann"].importance
    assert importance["secure_sum"]["mode"] == "pairwise" and importance["secure_sum"]["lost"] == {}
    assert importance["failures"] == {} and set(importance["features"]) == {o.name for o in NANOPARTICLE_TASK.outcomes}


def _auc(model_and_encoder, frame, outcome):
    model, encoder = model_and_encoder
    summary = evaluate(model, encoder, encode(encoder, frame.dropna(subset=[outcome])))[outcome]
    return metrics.binary_metrics(summary)["auc"]


def test_every_site_took_part_in_every_round_and_the_record_is_complete(federation):
    record = federation["record"]
    assert len(record.sites) == 4 and not record.rejected
    ann = record.models["ann"]
    assert [r["round"] for r in ann.rounds] == list(range(1, ROUNDS + 1))
    for r in ann.rounds:
        assert set(r["per_site"]) == set(record.sites) and not r["failures"]
    assert ann.final["overall"]["response"]["auc"] > 0.7


def test_federated_model_beats_local_only_at_the_smallest_clinic(federation):
    smallest = min(federation["world"].clinics, key=lambda c: c.n_patients)
    fresh = federation["fresh"][smallest.name]
    for outcome in ("response", "toxicity_grade3"):
        federated = _auc(federation["federated"], fresh, outcome)
        local = _auc(federation["local"][smallest.name], fresh, outcome)
        assert federated > local + 0.02, (outcome, federated, local)


def test_federated_model_comes_close_to_pooled_training(federation):
    fresh = pd.concat(federation["fresh"].values(), ignore_index=True)
    for outcome in ("response", "toxicity_grade3"):
        federated = _auc(federation["federated"], fresh, outcome)
        pooled = _auc(federation["pooled"], fresh, outcome)
        assert federated >= 0.97 * pooled, (outcome, federated, pooled)
