"""Personalised boosting (issue 18 item 2): the federation's histogram trees as the base, a few trees added at a
site on its own rows with XGBoost, measured against the base and a local-only booster on a site whose case mix
differs from the federation's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xgboost as xgb
from sklearn.metrics import roc_auc_score

from client.personalised.site_trees import SiteTrees
from shared.hist_learner import HistGradientBoosting


def _rows(n: int, site_effect: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Response driven by x0 and x1 everywhere; at the personalising site x2 matters too (its own case mix)."""
    x = rng.normal(size=(n, 4)).astype(np.float32)
    logit = 1.2 * x[:, 0] - 0.8 * x[:, 1] + site_effect * x[:, 2]
    return x, (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(float)


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    federation = _rows(3000, 0.0, rng)  # the other sites' rows, pooled: the federated model grows these trees
    base = HistGradientBoosting(objective="binary:logistic", n_estimators=30, max_depth=4,
                                scale_bits=32).fit(*federation)  # the scale the AUCs below were measured at
    return base.to_xgboost_json(), _rows(100, 1.5, rng), _rows(400, 1.5, rng)


def test_site_trees_beat_the_federated_trees_and_the_local_only_booster_on_a_site_with_its_own_case_mix(world):
    """100 training rows at a site where x2 matters (it does not elsewhere): test AUC (400 rows) federated 0.756,
    local-only XGBoost (50 trees) 0.810, federated + 20 site trees 0.825."""
    base_json, (x_train, y_train), (x_test, y_test) = world
    base = xgb.Booster(model_file=bytearray(base_json))
    personal = SiteTrees(n_trees=20, eta=0.1).fit(base_json, x_train, y_train)
    local = xgb.train(SiteTrees().params(), xgb.DMatrix(x_train, label=y_train), num_boost_round=50)
    auc = {"federated": roc_auc_score(y_test, base.predict(xgb.DMatrix(x_test))),
           "personalised": roc_auc_score(y_test, personal.predict(x_test)),
           "local": roc_auc_score(y_test, local.predict(xgb.DMatrix(x_test)))}
    print({k: round(v, 3) for k, v in auc.items()})
    assert auc == pytest.approx({"federated": 0.756, "personalised": 0.825, "local": 0.810}, abs=0.001)
    assert auc["personalised"] > auc["federated"] + 0.05 and auc["personalised"] > auc["local"] + 0.01


def test_the_federated_trees_stay_as_they_were_and_no_added_tree_means_the_federated_model(world):
    base_json, (x_train, y_train), (x_test, _) = world
    base = xgb.Booster(model_file=bytearray(base_json))
    personal = SiteTrees(n_trees=5).fit(base_json, x_train, y_train)
    assert personal.base_rounds_ == 30 and personal.booster_.num_boosted_rounds() == 35
    base_trees = json.loads(base.save_raw("json"))["learner"]["gradient_booster"]["model"]["trees"]
    kept = json.loads(personal.booster_.save_raw("json"))["learner"]["gradient_booster"]["model"]["trees"][:30]
    assert [t["split_conditions"] for t in kept] == [t["split_conditions"] for t in base_trees]
    none_added = SiteTrees(n_trees=0).fit(base_json, x_train, y_train)
    np.testing.assert_allclose(none_added.predict(x_test), base.predict(xgb.DMatrix(x_test)), rtol=1e-6)
    with pytest.raises(ValueError, match="n_trees"):
        SiteTrees(n_trees=-1).fit(base_json, x_train, y_train)
