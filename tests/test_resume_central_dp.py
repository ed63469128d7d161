"""A central-DP run stopped mid-training resumes (issue 16, items 1 and 4): the checkpoint keeps the adaptive
clipping norm, the rounds already accounted and the state of the generator the central noise is drawn from, so the
resumed run clips, noises and accounts as the uninterrupted one: the same per-round bounds and noise, the same ε,
the same final model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from client.site import SiteSource
from server.checkpoint import Checkpoint
from shared.artifacts import RunArtifacts
from simulation.clinics import SitePrivacy, generate_sites
from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_federation
from simulation.flower_runtime import ray_session

pytestmark = pytest.mark.slow
ROUNDS = 3
CLINICS = 3
STOP_AFTER = 1


class Stop(RuntimeError):
    """The coordinator 'crashes'."""


def run(out: Path, sites: Path, stop: bool = False, resume: bool = False):
    cfg = ExperimentConfig(out=out, clinics=CLINICS, rounds=ROUNDS, seed=3, models="ann", compare=False,
                           policy=False, fqi_iterations=0, central_dp="adaptive", central_noise_multiplier=0.5,
                           central_clip=0.5, resume=resume)
    sources = [SiteSource(sites / f"clinic_0{i}") for i in range(CLINICS)]

    def on_round(server_round: int) -> None:
        if stop and server_round == STOP_AFTER:
            raise Stop(f"stopped after round {server_round}")

    return run_federation(cfg, sources, on_round)


def final_ann(out: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch.load(RunArtifacts.open(out / "federated").path("ann")).items()}


def test_a_stopped_central_dp_run_resumes_with_the_same_clip_norm_noise_and_epsilon(tmp_path, shared_ray):
    flower_environment(tmp_path / "flwr")
    quiet_flower()
    generate_sites(CLINICS, 3, tmp_path / "sites", patients_per_clinic=60, privacy=SitePrivacy(dp=False))
    with ray_session():  # one Ray for the three runs (each start is ~15 s, and under load may time out)
        np.random.seed(7)  # the generator Flower's wrappers draw the central noise from
        whole = run(tmp_path / "whole", tmp_path / "sites").central_dp
        np.random.seed(7)
        with pytest.raises(Stop):
            run(tmp_path / "stopped", tmp_path / "sites", stop=True)
        checkpoint = Checkpoint.read(tmp_path / "stopped" / "federated")
        assert checkpoint is not None and checkpoint.stage == "training" and checkpoint.server_round >= 1
        done = {str(r) for r in range(1, checkpoint.server_round + 1)}
        assert set(checkpoint.strategy["central_dp"]["rounds"]) == done
        np.random.seed(99)  # another seed: the noise of the rounds left must come from the checkpoint
        resumed = run(tmp_path / "stopped", tmp_path / "sites", resume=True).central_dp

    assert resumed.rounds == whole.rounds == ROUNDS
    for r in range(1, ROUNDS + 1):
        w, s = whole.per_round[str(r)], resumed.per_round[str(r)]
        assert s["clip_norm"] == pytest.approx(w["clip_norm"], rel=1e-12), r  # the adaptive bound carried on
        assert s["noise_sd"] == pytest.approx(w["noise_sd"], rel=1e-12), r
        assert s["unclipped_fraction"] == pytest.approx(w["unclipped_fraction"], rel=1e-12), r
    assert len({whole.per_round[str(r)]["clip_norm"] for r in range(1, ROUNDS + 1)}) == ROUNDS  # it did move
    assert resumed.epsilon == pytest.approx(whole.epsilon, rel=1e-12) and whole.epsilon > 0
    a, b = final_ann(tmp_path / "whole"), final_ann(tmp_path / "stopped")
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) <= 1e-6  # the same noise drawn in the rounds left
