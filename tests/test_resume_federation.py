"""Resume in a Flower simulation: a run stopped inside round 2 (its replies aggregated, its checkpoint not yet
written) and resumed finishes with the same final ANN as an uninterrupted run, no checkpointed round done
twice, and at DP sites the same ε as the uninterrupted run (the round asked again is charged once)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message

import client.app
from client.ledger import SITE_LEDGER_FILE, PrivacyLedger
from client.site import SiteSource
from server.checkpoint import CHECKPOINT_FOLDER, Checkpoint
from shared.artifacts import RunArtifacts
from simulation.clinics import SitePrivacy, generate_sites
from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_federation

pytestmark = pytest.mark.slow
ROUNDS = 3
STOP_AFTER = 1
"""``on_round(1)`` raises. With one-message rounds (no DP) it comes with round 2's training replies: round 1 is
checkpointed, round 2 aggregated and not. Under DP it comes with round 1's evaluation, before round 1's
checkpoint. Either way the run stops with a round whose replies were aggregated but not checkpointed."""


class Stop(RuntimeError):
    """The coordinator 'crashes'."""


def training_logger(path: Path):
    """A client mod appending one JSON line per training message: partition and round."""

    def log_training(msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type.startswith("train"):
            with open(path, "a") as out:
                out.write(json.dumps({"partition": int(context.node_config.get("partition-id", -1)),
                                      "round": int(msg.content["config"]["server-round"])}) + "\n")
        return call_next(msg, context)

    return log_training


def run(out: Path, dp: bool, stop: bool, resume: bool = False, log: Path | None = None):
    """One federation of the 3 clinics of seed 4 in ``out`` (made on the first call), optionally stopped."""
    cfg = ExperimentConfig(out=out, clinics=3, rounds=ROUNDS, seed=4, models="ann", compare=False, policy=False,
                           strategy="fedadam", resume=resume)
    if not (out / "sites").exists():
        generate_sites(3, 4, out / "sites", patients_per_clinic=60,
                       privacy=SitePrivacy(dp=dp, epsilon=3.0, delta=1e-5))
    sources = [SiteSource(out / "sites" / f"clinic_0{i}") for i in range(3)]

    def on_round(server_round: int) -> None:
        if stop and server_round == STOP_AFTER:
            raise Stop(f"stopped after round {server_round}")

    real = client.app.make_client_app
    if log is not None:
        client.app.make_client_app = lambda sites, mods=None: real(sites, mods=[*(mods or []), training_logger(log)])
    try:
        return run_federation(cfg, sources, on_round)
    finally:
        client.app.make_client_app = real


def final_ann(out: Path) -> dict[str, np.ndarray]:
    artifacts = RunArtifacts.open(out / "federated")
    return {k: v.numpy() for k, v in torch.load(artifacts.path("ann")).items()}


def ledgers(out: Path) -> list[PrivacyLedger]:
    return [PrivacyLedger.open(out / "sites" / f"clinic_0{i}" / SITE_LEDGER_FILE, 3.0, 1e-5) for i in range(3)]


@pytest.fixture(scope="module")
def environment(tmp_path_factory, shared_ray):
    flower_environment(tmp_path_factory.mktemp("flwr"))
    quiet_flower()


@pytest.mark.parametrize("dp", [False, True], ids=["no-dp", "dp"])
def test_a_stopped_run_resumes_to_the_uninterrupted_runs_model_and_epsilon(tmp_path, environment, dp):
    whole = run(tmp_path / "whole", dp, stop=False)
    log = tmp_path / "trainings.jsonl"
    with pytest.raises(Stop, match="stopped after round 1"):
        run(tmp_path / "stopped", dp, stop=True, log=log)
    checkpoint = Checkpoint.read(tmp_path / "stopped" / "federated")
    assert checkpoint is not None and checkpoint.stage in ("statistics", "training")
    resumed = run(tmp_path / "stopped", dp, stop=False, resume=True, log=log)

    assert resumed.run_id == checkpoint.run_id != whole.run_id  # the original run, continued
    assert not (tmp_path / "stopped" / "federated" / CHECKPOINT_FOLDER).exists()  # removed once the run ended
    trainings = Counter(json.loads(line)["round"] for line in log.read_text().splitlines())
    done = checkpoint.server_round
    assert all(trainings[r] == 3 for r in range(1, done + 1)), trainings  # no checkpointed round done twice
    assert trainings[done + 1] == 6 and all(trainings[r] == 3 for r in range(done + 2, ROUNDS + 1)), trainings
    assert [r["round"] for r in resumed.models["ann"].rounds] == [r["round"] for r in whole.models["ann"].rounds]
    if not dp:
        a, b = final_ann(tmp_path / "whole"), final_ann(tmp_path / "stopped")
        assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) <= 1e-6
        for outcome, figures in whole.models["ann"].final["overall"].items():
            assert resumed.models["ann"].final["overall"][outcome] == pytest.approx(figures, rel=1e-6), outcome
    else:
        # same charges as the uninterrupted run, phase by phase, and the same ε at every site
        for w, s in zip(ledgers(tmp_path / "whole"), ledgers(tmp_path / "stopped"), strict=True):
            assert Counter(e["phase"] for e in s.entries) == Counter(e["phase"] for e in w.entries)
            assert s.spent() == pytest.approx(w.spent(), rel=1e-9)
            assert {str(e["run_id"]) for e in s.entries} == {checkpoint.run_id}
        assert {k: v.epsilon_spent for k, v in resumed.privacy.items()} == pytest.approx(
            {k: v.epsilon_spent for k, v in whole.privacy.items()}, rel=1e-9)
