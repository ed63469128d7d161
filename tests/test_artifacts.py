"""A run's models are read through its manifest (shared.artifacts): a reused output folder never lends an
earlier run's model to this run, in particular not to its signed policy bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.policy_phase import sign, write_candidate
from server.provision import provision
from server.run_record import ModelRecord, RunRecord
from shared.ann import build_model
from shared.artifacts import ArtifactsError, RunArtifacts
from shared.boosting import BoostingConfig, heads
from shared.encoding import fit_local
from shared.off_policy import GateResult
from shared.task import NANOPARTICLE_TASK
from simulation.clinics import make_world, simulate_clinic


@pytest.fixture(scope="module")
def fitted():
    world = make_world(1, seed=0, patients_per_clinic=40)
    rows = simulate_clinic(world, world.clinics[0])[0]
    encoder = fit_local(rows, NANOPARTICLE_TASK)
    model = build_model(encoder, NANOPARTICLE_TASK, (8, 4), seed=0)
    from client.boosting import train_pooled_heads

    boosters = train_pooled_heads(encoder, encoder.transform(rows), encoder.encode_targets(rows),
                                  BoostingConfig(), rounds=2)
    return rows, encoder, model, boosters


def test_a_run_reads_back_its_own_models(tmp_path, fitted):
    rows, encoder, model, boosters = fitted
    artifacts = RunArtifacts.start(tmp_path, run_id="1")
    artifacts.save_encoder(encoder)
    artifacts.save_ann(model.state_dict(), (8, 4))
    artifacts.save_boosters(boosters)
    again = RunArtifacts.open(tmp_path, run_id="1")
    assert again.booster_keys == sorted(h.key for h in heads(encoder)) and again.hidden == (8, 4)
    predictions = again.predict_ann(rows.head(5))
    assert set(predictions) == {"response", "toxicity_grade3", "efficacy_pct"}
    assert np.all(np.isfinite(again.predict_xgboost(rows.head(5))["response"]))
    with pytest.raises(ArtifactsError, match="run 1's, not run 2's"):
        RunArtifacts.open(tmp_path, run_id="2")


def test_a_new_run_in_a_reused_folder_removes_and_never_lists_the_earlier_runs_models(tmp_path, fitted):
    _, encoder, model, boosters = fitted
    first = RunArtifacts.start(tmp_path, run_id="1")
    first.save_encoder(encoder)
    first.save_ann(model.state_dict(), (8, 4))
    second = RunArtifacts.start(tmp_path, run_id="2")  # e.g. `fednano simulate --models xgboost` into the same OUT
    second.save_encoder(encoder)
    second.save_boosters(boosters)
    assert not (tmp_path / "ann_federated.pt").exists()
    reread = RunArtifacts.open(tmp_path, run_id="2")
    assert not reread.has_ann and "ann_federated.pt" not in reread.model_files()
    with pytest.raises(ArtifactsError, match="left no ann model"):
        reread.ann()


def test_the_policy_bundle_of_an_xgboost_only_run_holds_no_ann_from_an_earlier_run(tmp_path, fitted):
    _, encoder, model, boosters = fitted
    out, kit = tmp_path / "federated", tmp_path / "kit"
    provision("test", ["a"], kit)
    earlier = RunArtifacts.start(out, run_id="1")
    earlier.save_encoder(encoder)
    earlier.save_ann(model.state_dict(), (8, 4))
    artifacts = RunArtifacts.start(out, run_id="2")
    artifacts.save_encoder(encoder)
    artifacts.save_boosters(boosters)
    (out / "ann_federated.pt").write_bytes(b"an earlier run's weights, left behind")
    record = RunRecord(run_id="2", settings={}, models={"xgboost": ModelRecord(family="xgboost", mode="hist")})
    formulations = {"F1": {"particle_size_nm": 100.0, "zeta_mv": -5.0, "encapsulation_pct": 90.0, "pegylated": 1.0,
                           "drug_loading_pct": 10.0, "release_tau_h": 50.0, "release_beta": 0.7}}
    files = write_candidate(artifacts, record, formulations, tmp_path / "candidate")
    passed = GateResult(0.1, 0.05, 0.15, 0.2, 0.3, 100.0, True, "test")
    bundle = sign(files, record, passed, kit / "coordinator" / "policy_signing.key", tmp_path / "policy")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "ann_federated.pt" not in manifest["files"] and manifest["run_id"] == "2"
    assert json.loads((bundle / "policy.json").read_text())["models"].keys() == {"xgboost"}
