"""Flower simulation with a poisoned clinic: a scaled update ruins FedAvg's global model, FedMedian keeps it
close to the model trained without attack; the attack lives in the simulation, recorded in its results."""

import dataclasses
from functools import partial

import pytest

from shared.ann import predict
from shared.artifacts import RunArtifacts
from shared.task import NANOPARTICLE_TASK
from shared.validation import load_site
from simulation.baselines import BaselineSettings, evaluate_per_site, model_metrics
from simulation.clinics import SitePrivacy, generate_sites
from simulation.experiment import ExperimentConfig, flower_environment, prepare_sites, quiet_flower, run_federation

pytestmark = pytest.mark.slow
ROUNDS = 2
SCALE = 100.0


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_ray):
    out = tmp_path_factory.mktemp("poisoned")
    flower_environment(out)
    quiet_flower()
    base = ExperimentConfig(out=out / "run", clinics=5, rounds=ROUNDS, dp=False, seed=1, models="ann",
                            compare=False, fqi_iterations=0)
    clinics = generate_sites(base.clinics, base.seed, out / "sites", privacy=SitePrivacy(dp=False)).clinics
    folders = [out / "sites" / c.name for c in clinics]
    sources, _ = prepare_sites(dataclasses.replace(base, sites=folders))
    sites = {c.name: load_site(f) for c, f in zip(clinics, folders, strict=True)}
    attacker = max(clinics, key=lambda c: c.n_patients).name  # FedAvg weights it most
    settings = BaselineSettings(task=NANOPARTICLE_TASK, epochs=ROUNDS, batch_size=32, lr=0.005, hidden=(64, 32),
                                seed=base.seed, split_seed=base.seed)

    def auc(strategy: str, attacks: list[str]) -> float:
        cfg = dataclasses.replace(base, strategy=strategy, attacks=attacks, out=out / f"{strategy}-{len(attacks)}")
        record = run_federation(cfg, sources)
        artifacts = RunArtifacts.open(cfg.out / "federated", run_id=record.run_id)
        summaries = evaluate_per_site(partial(predict, artifacts.ann()), artifacts.encoder(), sites, settings)
        return model_metrics(NANOPARTICLE_TASK, summaries)["overall"]["response"]["auc"]

    scaled = [f"{attacker}:scale={SCALE:g}"]
    return {"clean": auc("fedavg", []), "fedavg": auc("fedavg", scaled), "fedmedian": auc("fedmedian", scaled)}


def test_a_scaled_update_ruins_fedavg_but_not_fedmedian(world):
    print("response AUC:", world)  # pytest -s shows the figures
    assert world["clean"] > 0.7, world
    assert world["fedavg"] < world["clean"] - 0.1, world  # one clinic moved the global model where it liked
    # measured 2026-12-03: clean 0.882, FedAvg attacked 0.500, FedMedian attacked 0.858 (most of the gap is the
    # median's own cost without attack: benchmarks/robust_aggregation.py)
    assert abs(world["fedmedian"] - world["clean"]) < 0.05, world
