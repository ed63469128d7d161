"""Flower simulations of federated histogram boosting: the trees equal pooled training of the same algorithm."""

import json

import numpy as np
import pytest
import xgboost as xgb

from client.site import SiteSource, load
from client.split import encode, split_site
from server.run_record import RunRecord
from shared.boosting import Head, head_labels
from shared.encoding import FeatureEncoder
from shared.hist_learner import HistGradientBoosting, pooled_thresholds
from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_experiment

pytestmark = pytest.mark.slow
ROUNDS = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_ray):
    out = tmp_path_factory.mktemp("hist")
    flower_environment(out)
    quiet_flower()
    # fqi_iterations=0: the policy phase's dose adjuster is not under test here (test_dose_adjustment and
    # test_dp_federation run it through Flower); its 25 default message rounds cost more than the trees
    cfg = ExperimentConfig(out=out, clinics=3, dp=False, seed=2, models="xgboost", boosting="hist",
                           xgb_rounds=ROUNDS, patients_per_clinic=120, compare=False, fqi_iterations=0)
    return out, run_experiment(cfg)


def pooled_training(out):
    """The encoded training rows of every site, pooled, with the run's encoder (for the reference only)."""
    encoder = FeatureEncoder.from_dict(json.loads((out / "federated" / "encoder.json").read_text()))
    xs, targets = [], []
    for folder in sorted(p for p in (out / "sites").iterdir() if p.is_dir()):
        site = load(SiteSource(folder))
        data = encode(encoder, split_site(site.episodes, site.task, 2)["train"])
        xs.append(data.x)
        targets.append(data.targets)
    pooled = {name: np.concatenate([t[name] for t in targets]) for name in targets[0]}
    return encoder, np.concatenate(xs), pooled


def tree_arrays(model_bytes):
    return json.loads(model_bytes)["learner"]["gradient_booster"]["model"]["trees"]


def test_federated_trees_equal_the_pooled_run_of_the_same_algorithm(run):
    out, _ = run
    encoder, x, targets = pooled_training(out)
    bins = pooled_thresholds(x)  # the federation cuts bins on all training rows, labelled or not
    for key, kind in (("response", "binary"), ("efficacy_pct", "regression")):
        y = head_labels(Head(key, kind), targets)
        keep = ~np.isnan(y)
        pooled = HistGradientBoosting(objective="binary:logistic" if kind == "binary" else "reg:squarederror",
                                      n_estimators=ROUNDS, learning_rate=0.1, max_depth=4,
                                      base_score=0.5 if kind == "binary" else 0.0).fit(x[keep], y[keep], bins)
        federated = tree_arrays((out / "federated" / f"xgb_{key}.json").read_bytes())
        reference = tree_arrays(pooled.to_xgboost_json())
        assert len(federated) == len(reference) == ROUNDS
        for fed, ref in zip(federated, reference, strict=True):
            assert fed["split_indices"] == ref["split_indices"]
            assert fed["left_children"] == ref["left_children"]
            assert np.allclose(fed["split_conditions"], ref["split_conditions"], rtol=0, atol=1e-9)
            assert np.allclose(fed["sum_hessian"], ref["sum_hessian"], rtol=0, atol=1e-9)
        assert sum(len(t["split_indices"]) for t in federated) > ROUNDS  # the trees did split


def test_federated_hist_models_load_in_xgboost_and_feed_the_usual_record(run):
    out, results = run
    boosting = RunRecord.read(out / "federated").models["xgboost"]
    assert boosting.mode == "hist"
    assert boosting.heads == ["efficacy_pct", "response", "toxicity_grade3"]
    assert not boosting.failures
    booster = xgb.Booster(model_file=str(out / "federated" / "xgb_response.json"))
    assert booster.num_boosted_rounds() == ROUNDS
    assert booster.get_score(importance_type="gain")
    models = results["models"]["xgboost"]
    federated = models["federated"]["overall"]["response"]["auc"]
    pooled = models["pooled"]["overall"]["response"]["auc"]
    assert federated > 0.6 and abs(federated - pooled) < 0.05, (federated, pooled)
    assert set(boosting.importance["features"])
    # the importance sums went through the run's secure sum (pairwise by default), through Flower
    assert boosting.importance["secure_sum"]["mode"] == "pairwise" and not boosting.importance["failures"]
