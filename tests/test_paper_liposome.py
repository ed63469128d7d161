"""The liposome release-class paper re-run (Yanes et al., Digital Discovery 2025, doi:10.1039/D5DD00112A;
CC BY 4.0): the paper's numbers, its protocol pooled, the federated site splits, and a short federated run."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, matthews_corrcoef
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import LabelEncoder, StandardScaler
from sklearn.tree import DecisionTreeClassifier

from shared.task import TaskSpec
from shared.validation import load_site
from simulation import paper_liposome as pl

DATA = pl.DATA_DIR


@pytest.fixture(scope="module")
def table():
    return pl.load_table()


@pytest.fixture(scope="module")
def pooled(table):
    return pl.pooled_rows(True, table)


def _row(rows, model, mode):
    return next(r for r in rows if r["model"] == model and r["mode"] == mode)


def test_paper_rows_are_the_values_of_test_cv_csv():
    csv = pd.read_csv(DATA / "test_CV.csv", index_col=0)
    rows = pl.paper_rows()
    assert [r["model"] for r in rows] == list(csv.index) == list(pl.CLASSIFIERS)
    for r in rows:
        s = csv.loc[r["model"]]
        assert r["mode"] == "paper"
        assert r["balanced_accuracy_mean"] == s["mean_balaccuracy"] and r["balanced_accuracy_sd"] == s["sd_balaccuracy"]
        assert r["f1_mean"] == s["mean_f1"] and r["mcc_mean"] == s["mean_mcc"] and r["mcc_sd"] == s["sd_mcc"]
        assert len(r["folds"]) == 5 and pl.CITATION in r["source"]
    assert _row(rows, "XGBClassifier", "paper")["balanced_accuracy_mean"] == pytest.approx(0.697, abs=5e-4)


def test_the_paper_sd_is_the_population_sd_of_its_folds():
    rows = pl.paper_rows()
    for r in rows:
        values = [f["balanced_accuracy"] for f in r["folds"]]
        assert r["balanced_accuracy_sd"] == pytest.approx(np.std(values, ddof=0), abs=1e-12)
        assert r["balanced_accuracy_sd"] != pytest.approx(np.std(values, ddof=1), abs=1e-4)


def test_pooled_rows_recompute_the_paper_fold_by_fold(pooled):
    per_fold = pd.read_csv(DATA / "model_per_fold_results.csv")
    assert [r["model"] for r in pooled] == list(pl.CLASSIFIERS)
    for r in pooled:
        paper = per_fold[per_fold["Model"] == r["model"]].sort_values("Fold")
        assert [f["balanced_accuracy"] for f in r["folds"]] == pytest.approx(list(paper["Balanced Accuracy"]))
        assert [f["f1"] for f in r["folds"]] == pytest.approx(list(paper["F1 Score"]))
        assert [f["mcc"] for f in r["folds"]] == pytest.approx(list(paper["MCC"]))
    xgb = _row(pooled, "XGBClassifier", "pooled")
    paper_xgb = _row(pl.paper_rows(), "XGBClassifier", "paper")
    assert abs(xgb["balanced_accuracy_mean"] - 0.697) <= paper_xgb["balanced_accuracy_sd"]


def test_a_pooled_fold_matches_an_independent_recomputation(table, pooled):
    """Fold 2 of the decision tree, written out here with sklearn alone: scaler on all rows (as the paper)."""
    x = StandardScaler().fit_transform(table[list(pl.FEATURES)])
    y = LabelEncoder().fit_transform(table["cluster"])
    train, test = list(StratifiedKFold(5, shuffle=True, random_state=15).split(x, y))[1]
    pred = DecisionTreeClassifier(random_state=1884).fit(x[train], y[train]).predict(x[test])
    fold = _row(pooled, "DecisionTreeClassifier", "pooled")["folds"][1]
    assert fold["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y[test], pred))
    assert fold["mcc"] == pytest.approx(matthews_corrcoef(y[test], pred))
    assert fold["f1"] == pytest.approx(np.mean(pred == y[test]))  # micro F1 = accuracy


def test_scaling_on_the_training_fold_moves_distance_models_only(table, pooled):
    fold_scaled = pl.pooled_rows(False, table)
    for name in ("DecisionTreeClassifier", "RandomForestClassifier", "GaussianNB", "XGBClassifier"):
        assert _row(fold_scaled, name, "pooled-fold-scaler")["folds"] == _row(pooled, name, "pooled")["folds"]
    knn_leaky = _row(pooled, "KNeighborsClassifier", "pooled")["balanced_accuracy_mean"]
    knn_clean = _row(fold_scaled, "KNeighborsClassifier", "pooled-fold-scaler")["balanced_accuracy_mean"]
    assert knn_leaky != pytest.approx(knn_clean, abs=1e-3)


def test_the_iid_split_is_stratified_and_seeded(table):
    for train_idx, _ in pl.folds(table):
        train = table.iloc[train_idx]
        sites = pl.iid_sites(train, seed=3)
        assert [s.tolist() for s in sites] == [s.tolist() for s in pl.iid_sites(train, seed=3)]
        assert [s.tolist() for s in sites] != [s.tolist() for s in pl.iid_sites(train, seed=4)]
        assert sorted(np.concatenate(sites).tolist()) == list(range(len(train)))
        for rows in sites:
            assert set(train["cluster"].iloc[rows]) == set(train["cluster"])


def test_the_noniid_split_puts_each_api_at_exactly_one_site(table):
    methods = pl.release_method(table)
    for train_idx, _ in pl.folds(table):
        parts, how = pl.split_training_fold(table, train_idx, "noniid", 0, methods)
        assert how["by"] == "API_type"  # the API split is not degenerate on these folds: no fallback
        apis = [set(p["API_type"]) for p in parts]
        assert all(a.isdisjoint(b) for i, a in enumerate(apis) for b in apis[i + 1:])
        assert set().union(*apis) == set(table.iloc[train_idx]["API_type"])
        assert sum(len(p) for p in parts) == len(train_idx)
        assert all(len(p) >= pl.MIN_SITE_ROWS and p["cluster"].nunique() >= 2 for p in parts)


def test_a_degenerate_api_split_falls_back_to_release_method():
    frame = pd.DataFrame({"API_type": 5, "cluster": [(i // 3) % 3 + 1 for i in range(30)]})
    methods = pd.Series([i % 3 for i in range(30)])
    sites, how = pl.noniid_sites(frame, methods)
    assert how["by"] == "release_method" and sorted(len(s) for s in sites) == [10, 10, 10]
    assert pl.degenerate(frame, pl.group_sites(frame["API_type"])[0])


def test_release_method_is_aligned_and_would_be_degenerate_on_this_data(table):
    methods = pl.release_method(table)
    assert len(methods) == len(table) and set(methods) <= {0, 1, 2, 3, 4, 5}
    assert (methods == 1).sum() == 49  # most formulations share one release method (code 1)
    with pytest.raises(ValueError, match="both the API and the release-method splits"):
        pl.noniid_sites(table.assign(API_type=5), methods)


def test_sites_written_for_the_federation_validate_and_train_on_every_row(tmp_path, table):
    train_idx, _ = pl.folds(table)[0]
    parts, _ = pl.split_training_fold(table, train_idx, "iid", 0)
    sources, task_path = pl.write_sites(tmp_path, parts)
    task = TaskSpec.from_toml(task_path)
    assert task.split == "split" and task.categorical == ("API_type",)
    for source, part in zip(sources, parts, strict=True):
        site = load_site(source.path, task)
        labels = site.episodes["split"]
        assert (labels == "train").all() and len(labels) == len(part)  # no held-out row reaches a site


def test_comparison_sentences_come_from_the_rows(pooled):
    rows = pl.paper_rows() + pooled
    fake = dict(_row(pooled, "XGBClassifier", "pooled"), model=pl.XGB_BAGGING, mode="federated-iid",
                balanced_accuracy_mean=0.5)
    pooled_ovr = dict(fake, model=pl.XGB_POOLED, mode="pooled", balanced_accuracy_mean=0.7)
    text = " ".join(pl.comparison_sentences([*rows, fake, pooled_ovr]))
    assert "0.697" in text and "gap -0.200" in text


@pytest.mark.slow
def test_federated_rows_on_two_folds(tmp_path, monkeypatch, shared_ray):
    """The federated part on 2 folds, few rounds; non-IID bagging (the ANN comes with it) only, to stay short."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    from simulation.experiment import quiet_flower

    quiet_flower()
    settings = pl.FederatedSettings(rounds=2, xgb_rounds=2, local_epochs=2)
    rows, sites = pl.federated_rows(settings, fold_ids=[0, 1], splits=("noniid",), boosting_modes=("bagging",),
                                    work_dir=tmp_path)
    assert {r["model"] for r in rows} == {pl.ANN_FEDERATED, pl.XGB_BAGGING}
    assert [s["fold"] for s in sites["noniid"]] == [1, 2]
    for r in rows:
        assert r["mode"] == "federated-noniid" and len(r["folds"]) == 2
        for key in ("balanced_accuracy_mean", "balanced_accuracy_sd", "f1_mean", "mcc_mean"):
            assert key in r
        assert 0 <= r["balanced_accuracy_mean"] <= 1 and 0 <= r["f1_mean"] <= 1
        assert -1 <= r["mcc_mean"] <= 1
    json.dumps(rows, allow_nan=False)


def test_the_built_in_task_copy_matches_examples_liposome_task_toml(tmp_path):
    copy = tmp_path / "copy.toml"
    copy.write_text(pl._TASK_FALLBACK)
    assert TaskSpec.from_toml(copy) == TaskSpec.from_toml(pl.TASK_EXAMPLE)
