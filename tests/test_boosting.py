"""Local boosting for Flower's XGBoost strategies: trees travel, append and predict as one model."""

import json

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from flwr.serverapp.strategy.strategy_utils import aggregate_bagging

from client.boosting import boost, new_trees
from shared.boosting import BoostingConfig, Head, dmatrix, heads, predict_heads, rounds_in
from shared.encoding import fit_local
from shared.task import Outcome, TaskSpec


def _data(seed, n=300):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(0, 0.5, n) > 0).astype(float)
    return x, y


def test_bagging_round_appends_each_sites_new_trees_to_the_global_model():
    params = BoostingConfig().params("binary")
    global_model = b""
    for _ in range(3):  # three rounds, two sites each
        replies = []
        for seed in (0, 1):
            x, y = _data(seed)
            before = rounds_in(global_model)
            booster = boost(global_model, dmatrix(x, y), params, rounds=1)
            replies.append(new_trees(booster, before))
            assert rounds_in(replies[-1]) == 1  # only the new tree travels
        for reply in replies:
            global_model = aggregate_bagging(global_model, reply)
    model = xgb.Booster(model_file=bytearray(global_model))
    assert model.num_boosted_rounds() == 6
    x, y = _data(2)
    p = model.predict(xgb.DMatrix(x))
    assert np.mean((p > 0.5) == y) > 0.75


def test_every_site_starts_from_the_same_base_score():
    """XGBoost would estimate the base score from each site's own prevalence (0.9 vs 0.1 here)."""
    x = np.random.default_rng(0).normal(size=(100, 3))
    scores = []
    for y in (np.r_[np.ones(90), np.zeros(10)], np.r_[np.ones(10), np.zeros(90)]):
        booster = boost(b"", dmatrix(x, y), BoostingConfig().params("binary"), rounds=1)
        scores.append(json.loads(booster.save_config())["learner"]["learner_model_param"]["base_score"])
    assert scores[0] == scores[1] == "[5E-1]"


def test_multiclass_is_boosted_one_vs_rest_and_probabilities_sum_to_one():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=200), "b": rng.normal(size=200)})
    frame["y"] = np.digitize(frame["a"], [-0.5, 0.5]).astype(str)
    task = TaskSpec(outcomes=(Outcome("y", "multiclass"),), numeric=("a", "b"), categorical=())
    encoder = fit_local(frame, task)
    assert [h.key for h in heads(encoder)] == ["y=0", "y=1", "y=2"]
    x, targets = encoder.transform(frame), encoder.encode_targets(frame)
    from client.boosting import train_pooled_heads

    models = train_pooled_heads(encoder, x, targets, BoostingConfig(), rounds=20)
    proba = predict_heads(models, encoder, x)["y"]
    assert proba.shape == (200, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert np.mean(proba.argmax(axis=1) == targets["y"]) > 0.9


def test_head_key_names_the_class_of_a_one_vs_rest_head():
    assert Head("cluster", "binary", 2).key == "cluster=2"
    assert Head("response", "binary").key == "response"


@pytest.mark.parametrize("kind", ["binary", "regression"])
def test_rows_without_a_label_are_left_out_of_training(kind):
    x, y = _data(0, 50)
    y[:10] = np.nan
    assert dmatrix(x, y).num_row() == 40
