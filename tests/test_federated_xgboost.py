"""Flower simulation of federated XGBoost, bagging and cyclic, against the same boosters trained pooled."""


import pytest
import xgboost as xgb

from server.run_record import RunRecord
from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_experiment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["bagging", "cyclic"])
def run(request, tmp_path_factory, shared_ray):
    out = tmp_path_factory.mktemp(request.param)
    flower_environment(out)
    quiet_flower()
    # fqi_iterations=0: the policy phase's dose adjuster is not under test here (test_dose_adjustment and
    # test_dp_federation run it through Flower); its 25 default message rounds cost more than the boosting
    cfg = ExperimentConfig(out=out, clinics=3, dp=False, seed=2, models="xgboost", boosting=request.param,
                           xgb_rounds=12, patients_per_clinic=250, compare=False, fqi_iterations=0)
    return request.param, out, run_experiment(cfg)


def test_only_boosting_ran_with_one_head_per_outcome(run):
    mode, out, results = run
    assert list(results["models"]) == ["xgboost"]
    boosting = RunRecord.read(out / "federated").models["xgboost"]
    assert boosting.mode == mode
    assert boosting.heads == ["efficacy_pct", "response", "toxicity_grade3"]
    assert not boosting.failures


def test_federated_boosters_are_real_xgboost_models(run):
    mode, out, _ = run
    booster = xgb.Booster(model_file=str(out / "federated" / "xgb_response.json"))
    # bagging: 3 sites add a tree each per round; cyclic: one site per round adds one.
    assert booster.num_boosted_rounds() == (36 if mode == "bagging" else 12)


def test_federated_boosting_learns_and_stays_near_pooled(run):
    mode, _, results = run
    models = results["models"]["xgboost"]
    for outcome in ("response", "toxicity_grade3"):
        federated = models["federated"]["overall"][outcome]["auc"]
        pooled = models["pooled"]["overall"][outcome]["auc"]
        assert federated > 0.6, (mode, outcome, federated)
        assert federated > pooled - 0.1, (mode, outcome, federated, pooled)
    efficacy = models["federated"]["overall"]["efficacy_pct"]
    assert efficacy["r2"] > 0.1 and efficacy["n"] > 0
