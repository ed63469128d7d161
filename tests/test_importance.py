"""Permutation importance from site sums: adds up across sites, ranks the informative feature first."""

import numpy as np
import pandas as pd

from client.importance import permutation_sums
from client.split import encode
from shared import metrics
from shared.encoding import fit_local
from shared.importance import feature_groups, importance_from_sums
from shared.task import Outcome, TaskSpec

TASK = TaskSpec(outcomes=(Outcome("y", "binary"), Outcome("z", "regression")), numeric=("signal", "noise"),
                categorical=("group",))


def _frame(seed, n=400):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"signal": rng.normal(size=n), "noise": rng.normal(size=n),
                          "group": rng.choice(["a", "b", "c"], n)})
    frame["y"] = (frame["signal"] > 0).astype(float)
    frame["z"] = 2 * frame["signal"] + (frame["group"] == "a") + rng.normal(0, 0.1, n)
    return frame


def _oracle(encoder):
    signal = encoder.feature_names_out_.index("signal")
    group_a = encoder.feature_names_out_.index("group__a")

    def predict(x):
        z = 2 * (x[:, signal] * encoder.scales_["signal"] + encoder.means_["signal"]) + x[:, group_a]
        return {"y": 1 / (1 + np.exp(-8 * x[:, signal])),
                "z": (z - encoder.target_means_["z"]) / encoder.target_scales_["z"]}

    return predict


def test_features_group_their_one_hot_columns():
    encoder = fit_local(_frame(0), TASK)
    groups = feature_groups(encoder)
    assert set(groups) == {"signal", "noise", "group"} and len(groups["group"]) == 3


def test_informative_features_rank_first_and_noise_is_near_zero():
    encoder = fit_local(_frame(0), TASK)
    sums = permutation_sums(_oracle(encoder), encoder, encode(encoder, _frame(1)), seed=0)
    importance = importance_from_sums(encoder, sums)
    assert list(importance["y"])[0] == "signal" and list(importance["z"])[0] == "signal"
    assert abs(importance["y"]["noise"]) < 1e-9 and importance["z"]["group"] > 0.05


def test_site_sums_add_up_to_the_union_of_test_sets():
    encoder = fit_local(_frame(0), TASK)
    parts = [permutation_sums(_oracle(encoder), encoder, encode(encoder, _frame(s, 150)), seed=s) for s in (1, 2)]
    total = metrics.combine(parts)
    assert total["y/n"] == 300
    combined = importance_from_sums(encoder, total)
    expected = {f: (parts[0][f"y/{f}"] + parts[1][f"y/{f}"] - parts[0]["y/base"] - parts[1]["y/base"]) / 300
                for f in ("signal", "noise", "group")}
    assert combined["y"] == expected


def test_a_site_without_test_rows_answers_zeros_with_the_same_keys():
    encoder = fit_local(_frame(0), TASK)
    empty = permutation_sums(_oracle(encoder), encoder, encode(encoder, _frame(1).iloc[:0]), seed=0)
    full = permutation_sums(_oracle(encoder), encoder, encode(encoder, _frame(1)), seed=0)
    assert set(empty) == set(full) and not any(empty.values())


def test_seed_comparison_models_predict_in_the_pipelines_conventions():
    from simulation.seed_comparison import CLASSIC, fit_classic

    encoder = fit_local(_frame(0), TASK)
    train, test = encode(encoder, _frame(0)), encode(encoder, _frame(1, 100))
    for name in CLASSIC:
        out = fit_classic(name, encoder, train, seed=0)(test.x)
        assert out["y"].shape == (100,) and np.all((out["y"] >= 0) & (out["y"] <= 1))
        auc = metrics.binary_metrics(metrics.summarise("binary", test.targets["y"], out["y"]))["auc"]
        assert auc > 0.95, name
        assert np.corrcoef(out["z"], test.targets["z"])[0, 1] > 0.9, name
