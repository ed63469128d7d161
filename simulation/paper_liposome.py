"""The liposome release-class paper re-run: its own numbers, its protocol pooled, and the same folds federated.

Data and paper (CC BY 4.0, copied unchanged in ``simulation/data/liposome_ivr``, see its README.md):
D. Yanes et al., "A machine learning workflow to accelerate the design of in vitro release tests from
liposomes", Digital Discovery 2025, doi:10.1039/D5DD00112A — repository danielyanes22/accelerated_IVR.
77 liposome formulations, 7 features, 3 release classes (``cluster``: k-means on Weibull parameters).

The paper's protocol (its ``experiments/testing_scores.py``, which wrote ``test_CV.csv`` and
``model_per_fold_results.csv``): StandardScaler fitted on **all 77 rows before splitting**, LabelEncoder on
``cluster``, StratifiedKFold(5, shuffle=True, random_state=15), seven classifiers with random_state=1884, and
per test fold balanced accuracy, F1 with ``average="micro"`` (equal to accuracy for single-label data) and
MCC; mean and **population** sd (``np.std``, ddof=0) over the 5 folds. Re-running that protocol here
reproduces every per-fold number of the paper exactly (tests/test_paper_liposome.py checks it).

Rows (``run_paper_liposome`` writes them to ``OUT/paper_liposome.json``), one per model and mode:

- ``paper``: the paper's numbers, read from ``test_CV.csv`` (folds from ``model_per_fold_results.csv``);
- ``pooled``: the protocol re-run, scaler fitted on all rows as the paper did;
- ``pooled-fold-scaler``: the same with the scaler fitted on the training fold only (no test-fold leakage;
  tree models are unchanged, KNN/SVC/LR move);
- ``pooled`` rows of fednano's own ANN and one-vs-rest XGBoost trained centrally on each training fold
  (the pipeline the federation runs, so the federated-vs-pooled gap compares like with like);
- ``federated-iid`` / ``federated-noniid``: each training fold split over 3 sites (stratified at random, or
  by API so that each drug lives at one site), trained by the real Flower ServerApp/ClientApp
  (``simulation.experiment.run_federation``), then the saved models predict the held-out test fold
  centrally (``shared.artifacts``).

F1 is reported two ways: ``f1_*`` is the paper's definition (micro average = accuracy), ``f1_weighted_*``
the support-weighted F1; the paper rows have no weighted F1.
"""

from __future__ import annotations

import json
import tempfile
import time
import tomllib
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, f1_score, matthews_corrcoef
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import LabelEncoder, StandardScaler

DATA_DIR = Path(__file__).parent / "data" / "liposome_ivr"
TASK_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "liposome_task.toml"
TARGET = "cluster"
FEATURES = ("media_pH", "media_temp_oC", "drug_loading", "Z_average_nm", "API_type", "weighted_Mw", "weighted_Tm")
CV_SEED = 15
MODEL_SEED = 1884
N_FOLDS = 5
N_SITES = 3
MIN_SITE_ROWS = 8
"""A non-IID site with fewer training rows, or with a single class, makes the split degenerate."""

CITATION = ("D. Yanes et al., \"A machine learning workflow to accelerate the design of in vitro release tests "
            "from liposomes\", Digital Discovery 2025, doi:10.1039/D5DD00112A (data: repository "
            "danielyanes22/accelerated_IVR, ML_7_features_df.csv, test_CV.csv, model_per_fold_results.csv)")
LICENCE = "CC BY 4.0 (Creative Commons Attribution 4.0 International); see simulation/data/liposome_ivr/LICENSE.md"

CLASSIFIERS = ("DecisionTreeClassifier", "SVC", "GaussianNB", "KNeighborsClassifier", "LogisticRegression",
               "RandomForestClassifier", "XGBClassifier")
ANN_FEDERATED = "ANN (federated)"
XGB_BAGGING = "XGBoost (federated, bagging)"
XGB_CYCLIC = "XGBoost (federated, cyclic)"
XGB_HIST = "XGBoost (federated, hist)"
ANN_POOLED = "ANN (pooled)"
XGB_POOLED = "XGBoost (pooled, one-vs-rest)"
SPLITS = ("iid", "noniid")
BOOSTING_MODES = ("bagging", "cyclic", "hist")
XGB_MODELS = {"bagging": XGB_BAGGING, "cyclic": XGB_CYCLIC, "hist": XGB_HIST}
METRICS = ("balanced_accuracy", "f1", "f1_weighted", "mcc")


@dataclass(frozen=True)
class FederatedSettings:
    """Training settings of the federated runs (and of the pooled fednano models they are compared with).

    With ~20 training rows per site, one local step per round (the project default: 1 epoch, batch 32)
    barely moves the ANN; 5 local epochs in batches of 8 at lr 0.01 for 20 rounds gives it ~300 steps.
    Boosting (eta 0.1, depth 4, one booster per class): bagging adds one tree per site and round
    (3 × ``xgb_rounds`` trees per class); cyclic adds one tree per round, so it gets ``3 × xgb_rounds``
    rounds (``cyclic_rounds``) for the same number of trees, as does histogram boosting (one tree per round);
    the pooled one-vs-rest XGBoost gets as many.
    """

    rounds: int = 20
    xgb_rounds: int = 10
    cyclic_rounds: int | None = None
    local_epochs: int = 5
    batch_size: int = 8
    lr: float = 0.01
    hidden: str = "64,32"
    seed: int = 0
    hist_batch_heads: bool = True  # histogram boosting: the three heads' trees in the same level requests

    @property
    def trees(self) -> int:
        return N_SITES * self.xgb_rounds

    @property
    def cyclic(self) -> int:
        return self.cyclic_rounds if self.cyclic_rounds is not None else self.trees

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(int(h) for h in self.hidden.split(",") if h.strip())


# -- data and folds ---------------------------------------------------------------------------------------


def load_table() -> pd.DataFrame:
    """The 77 formulations of the paper's classifier screen (``ML_7_features_df.csv``)."""
    return pd.read_csv(DATA_DIR / "ML_7_features_df.csv")


def folds(table: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray]]:
    """The paper's folds: StratifiedKFold(5, shuffle=True, random_state=15) on the encoded ``cluster``."""
    y = LabelEncoder().fit_transform(table[TARGET])
    cv = StratifiedKFold(n_splits=N_FOLDS, shuffle=True, random_state=CV_SEED)
    return [(train, test) for train, test in cv.split(table[list(FEATURES)], y)]


def release_method(table: pd.DataFrame) -> pd.Series:
    """``release_method`` of each row of ``table`` (ML_7 rows), from ML_9_features_df.csv.

    ML_9 holds the same rows in the same order plus one extra row (78 rows; an extra copy among the rows
    with 55 °C medium, index 33 to 35); rows are matched in order on the 7 features and the class.
    """
    nine = pd.read_csv(DATA_DIR / "ML_9_features_df.csv")
    columns = [*FEATURES, TARGET]
    wanted = table[columns].to_numpy(dtype=float)
    have = nine[columns].to_numpy(dtype=float)
    methods, j = [], 0
    for row in wanted:
        while j < len(have) and not np.allclose(have[j], row, equal_nan=True):
            j += 1
        if j == len(have):
            raise ValueError("ML_9_features_df.csv does not hold the rows of ML_7_features_df.csv in order")
        methods.append(int(nine["release_method"].iloc[j]))
        j += 1
    return pd.Series(methods, index=table.index, name="release_method")


def iid_sites(train: pd.DataFrame, seed: int, n_sites: int = N_SITES) -> list[np.ndarray]:
    """Positions (into ``train``) of each site's rows: StratifiedKFold(n_sites, shuffle, seed) parts, so every
    class is at every site whenever it has at least ``n_sites`` rows; the same seed gives the same sites."""
    cv = StratifiedKFold(n_splits=n_sites, shuffle=True, random_state=seed)
    return [np.sort(part) for _, part in cv.split(np.zeros(len(train)), train[TARGET].to_numpy())]


def group_sites(groups: pd.Series, n_sites: int = N_SITES) -> tuple[list[np.ndarray], dict[int, int]]:
    """Whole groups to sites, largest group first, each to the site with fewest rows so far (ties: lower
    site, lower group value). Returns each site's row positions and the group → site assignment."""
    sizes = groups.value_counts()
    order = sorted(sizes.index, key=lambda g: (-sizes[g], g))
    load = [0] * n_sites
    assignment: dict[int, int] = {}
    for g in order:
        site = int(np.argmin(load))
        assignment[int(g)] = site
        load[site] += int(sizes[g])
    site_of_row = groups.map(assignment).to_numpy()
    return [np.flatnonzero(site_of_row == s) for s in range(n_sites)], assignment


def degenerate(train: pd.DataFrame, sites: Sequence[np.ndarray]) -> bool:
    """A site with fewer than ``MIN_SITE_ROWS`` rows or a single class."""
    return any(len(rows) < MIN_SITE_ROWS or train[TARGET].iloc[rows].nunique() < 2 for rows in sites)


def noniid_sites(train: pd.DataFrame, methods: pd.Series | None = None) -> tuple[list[np.ndarray], dict]:
    """Sites holding different drugs: whole ``API_type`` groups per site (``group_sites``). If that is
    degenerate, whole ``release_method`` groups instead (``methods``, aligned with ``train``).
    Returns the sites and a description ``{"by": column, "assignment": {value: site}}``."""
    sites, assignment = group_sites(train["API_type"])
    if not degenerate(train, sites):
        return sites, {"by": "API_type", "assignment": {str(g): s for g, s in assignment.items()}}
    if methods is None:
        raise ValueError("the API split is degenerate and no release_method was given to fall back on")
    sites, assignment = group_sites(methods.loc[train.index])
    if degenerate(train, sites):
        raise ValueError("both the API and the release-method splits give a degenerate site")
    return sites, {"by": "release_method", "assignment": {str(g): s for g, s in assignment.items()}}


# -- metrics and rows -------------------------------------------------------------------------------------


def fold_scores(y_true: Sequence, y_pred: Sequence) -> dict[str, float]:
    """The paper's metrics of one test fold (F1 micro as the paper) plus the weighted F1."""
    return {"balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "f1": float(f1_score(y_true, y_pred, average="micro")),
            "f1_weighted": float(f1_score(y_true, y_pred, average="weighted")),
            "mcc": float(matthews_corrcoef(y_true, y_pred))}


def make_row(model: str, mode: str, per_fold: list[dict], **extra) -> dict:
    """A row: mean and population sd (ddof=0, as the paper's ``np.std``) of each metric over the folds."""
    row = {"model": model, "mode": mode}
    for metric in METRICS:
        values = [f[metric] for f in per_fold if f.get(metric) is not None]
        row[f"{metric}_mean"] = float(np.mean(values)) if values else None
        row[f"{metric}_sd"] = float(np.std(values)) if values else None
    row["folds"] = per_fold
    row.update(extra)
    row["source"] = CITATION
    return row


def paper_rows() -> list[dict]:
    """The paper's own test-fold results (``test_CV.csv``; per fold from ``model_per_fold_results.csv``)."""
    summary = pd.read_csv(DATA_DIR / "test_CV.csv", index_col=0)
    per_fold = pd.read_csv(DATA_DIR / "model_per_fold_results.csv")
    rows = []
    for model, s in summary.iterrows():
        f = per_fold[per_fold["Model"] == model].sort_values("Fold")
        row = {"model": str(model), "mode": "paper",
               "balanced_accuracy_mean": float(s["mean_balaccuracy"]),
               "balanced_accuracy_sd": float(s["sd_balaccuracy"]),
               "f1_mean": float(s["mean_f1"]), "f1_sd": float(s["sd_f1"]),
               "f1_weighted_mean": None, "f1_weighted_sd": None,
               "mcc_mean": float(s["mean_mcc"]), "mcc_sd": float(s["sd_mcc"]),
               "folds": [{"fold": int(r["Fold"]), "balanced_accuracy": float(r["Balanced Accuracy"]),
                          "f1": float(r["F1 Score"]), "f1_weighted": None, "mcc": float(r["MCC"])}
                         for _, r in f.iterrows()],
               "scaling": "all 77 rows before splitting (the paper's script)", "source": CITATION}
        rows.append(row)
    return rows


def classifier(name: str):
    """One of the paper's classifiers with its settings (``experiments/testing_scores.py``)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC
    from sklearn.tree import DecisionTreeClassifier
    from xgboost import XGBClassifier

    makers = {
        "DecisionTreeClassifier": lambda: DecisionTreeClassifier(random_state=MODEL_SEED),
        "SVC": lambda: SVC(random_state=MODEL_SEED, probability=True),
        "GaussianNB": GaussianNB,
        "KNeighborsClassifier": lambda: KNeighborsClassifier(n_neighbors=3),
        "LogisticRegression": lambda: LogisticRegression(random_state=MODEL_SEED),
        "RandomForestClassifier": lambda: RandomForestClassifier(random_state=MODEL_SEED),
        # use_label_encoder=False of the paper is gone from xgboost >= 2 (it was already the behaviour).
        "XGBClassifier": lambda: XGBClassifier(random_state=MODEL_SEED, eval_metric="mlogloss", num_class=3),
    }
    return makers[name]()


def pooled_fold(name: str, table: pd.DataFrame, train: np.ndarray, test: np.ndarray,
                scale_on_all: bool = True) -> dict[str, float]:
    """One classifier on one fold; the scaler is fitted on all rows (the paper) or on the training fold."""
    x = table[list(FEATURES)]
    y = LabelEncoder().fit_transform(table[TARGET])
    scaler = StandardScaler().fit(x if scale_on_all else x.iloc[train])
    x_train, x_test = scaler.transform(x.iloc[train]), scaler.transform(x.iloc[test])
    model = classifier(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # sklearn >= 1.9 deprecates SVC(probability=True)
        model.fit(x_train, y[train])
        return fold_scores(y[test], model.predict(x_test))


def pooled_rows(scale_on_all: bool = True, table: pd.DataFrame | None = None) -> list[dict]:
    """The paper's protocol re-run, one row per classifier (mode ``pooled``, or ``pooled-fold-scaler``
    when the scaler is fitted on the training fold only)."""
    table = load_table() if table is None else table
    mode = "pooled" if scale_on_all else "pooled-fold-scaler"
    scaling = "all 77 rows before splitting (as the paper)" if scale_on_all else "training fold only"
    rows = []
    for name in CLASSIFIERS:
        per_fold = [{"fold": k + 1, **pooled_fold(name, table, train, test, scale_on_all)}
                    for k, (train, test) in enumerate(folds(table))]
        rows.append(make_row(name, mode, per_fold, scaling=scaling))
    return rows


# -- fednano's own models, pooled and federated -----------------------------------------------------------


_TASK_FALLBACK = """[task]
kind = "multiclass"
target = "cluster"
[features]
numeric = ["media_pH", "media_temp_oC", "drug_loading", "Z_average_nm", "weighted_Mw", "weighted_Tm"]
categorical = ["API_type"]
[ranges]
media_pH = [0, 14]
media_temp_oC = [0, 100]
Z_average_nm = [1, 50000]
"""
"""The task of ``examples/liposome_task.toml``, for an installed package that has no ``examples/`` folder."""


def task_toml_text() -> str:
    """``examples/liposome_task.toml`` with ``split = "split"``, so each site uses every row it is given."""
    doc = tomllib.loads(TASK_EXAMPLE.read_text() if TASK_EXAMPLE.exists() else _TASK_FALLBACK)
    task, features = doc["task"], doc.get("features", {})
    lines = ["# The liposome release-class task (Yanes et al., Digital Discovery 2025, doi:10.1039/D5DD00112A;",
             "# CC BY 4.0), every row of a site in the training split.", "[task]",
             f"kind = {json.dumps(task['kind'])}", f"target = {json.dumps(task['target'])}", 'split = "split"',
             "", "[features]"]
    lines += [f"{key} = {json.dumps(list(features.get(key, [])))}" for key in ("numeric", "categorical")]
    if doc.get("ranges"):
        lines += ["", "[ranges]"] + [f"{k} = [{float(a)!r}, {float(b)!r}]" for k, (a, b) in doc["ranges"].items()]
    return "\n".join(lines) + "\n"


def _predicted_labels(classes: list[str], proba: np.ndarray) -> np.ndarray:
    return np.array([int(float(classes[i])) for i in np.asarray(proba).argmax(axis=1)])


def pooled_fednano_rows(settings: FederatedSettings, table: pd.DataFrame | None = None) -> list[dict]:
    """fednano's ANN and one-vs-rest XGBoost trained centrally on each training fold (encoder from the
    training fold), the same epochs (rounds × local epochs) and trees as the federated runs."""
    import torch

    from client.boosting import train_pooled_heads
    from client.split import encode
    from client.training import TrainConfig, train
    from shared import boosting
    from shared.ann import build_model, predict
    from shared.encoding import fit_local
    from shared.task import TaskSpec

    table = load_table() if table is None else table
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "task.toml"
        path.write_text(task_toml_text())
        task = TaskSpec.from_toml(path)
    frame = table.assign(split="train")
    ann_folds, xgb_folds = [], []
    config = boosting.BoostingConfig(seed=settings.seed)
    for k, (train_idx, test_idx) in enumerate(folds(table)):
        train_rows, test_rows = frame.iloc[train_idx], frame.iloc[test_idx]
        encoder = fit_local(train_rows, task)
        data = encode(encoder, train_rows)
        classes = encoder.classes_[TARGET]
        y_test = test_rows[TARGET].to_numpy()
        x_test = encoder.transform(test_rows)
        model = build_model(encoder, task, settings.hidden_sizes, seed=settings.seed)
        train(model, data, TrainConfig(epochs=settings.rounds * settings.local_epochs,
                                       batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed))
        with torch.no_grad():
            ann_pred = _predicted_labels(classes, predict(model, x_test)[TARGET])
        ann_folds.append({"fold": k + 1, **fold_scores(y_test, ann_pred)})
        boosters = train_pooled_heads(encoder, data.x, data.targets, config, settings.trees)
        xgb_pred = _predicted_labels(classes, boosting.predict_heads(boosters, encoder, x_test)[TARGET])
        xgb_folds.append({"fold": k + 1, **fold_scores(y_test, xgb_pred)})
    scaling = "training fold (fednano encoder: standardised numerics, one-hot API_type)"
    return [make_row(ANN_POOLED, "pooled", ann_folds, scaling=scaling,
                     settings={"epochs": settings.rounds * settings.local_epochs, "batch_size": settings.batch_size,
                               "lr": settings.lr, "hidden": settings.hidden}),
            make_row(XGB_POOLED, "pooled", xgb_folds, scaling=scaling,
                     settings={"trees_per_class": settings.trees, "eta": config.eta, "max_depth": config.max_depth})]


def split_training_fold(table: pd.DataFrame, train_idx: np.ndarray, split: str, seed: int,
                        methods: pd.Series | None = None) -> tuple[list[pd.DataFrame], dict]:
    """The training fold's rows at each of the 3 sites, and how they were split."""
    train = table.iloc[train_idx]
    if split == "iid":
        sites, how = iid_sites(train, seed), {"by": "StratifiedKFold(3) over the training fold", "seed": seed}
    elif split == "noniid":
        sites, how = noniid_sites(train, methods)
    else:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    return [train.iloc[rows] for rows in sites], how


def write_sites(folder: Path, parts: list[pd.DataFrame]) -> tuple[list, Path]:
    """Each site's rows as ``site_<k>.csv`` (``split`` = train for all) and the task toml, in ``folder``.

    The sites hold no test rows (their per-site evaluation is empty); the held-out fold is predicted
    centrally from the federated models.
    """
    from client.app import SiteSource

    folder.mkdir(parents=True, exist_ok=True)
    task_path = folder / "task.toml"
    task_path.write_text(task_toml_text())
    sources = []
    for k, part in enumerate(parts):
        path = folder / f"site_{k + 1}.csv"
        part.assign(split="train").to_csv(path, index=False)
        sources.append(SiteSource(path, task_path))
    return sources, task_path


def federate(folder: Path, parts: list[pd.DataFrame], test: pd.DataFrame, settings: FederatedSettings,
             boosting_mode: str) -> dict[str, dict[str, float]]:
    """One federated run over the sites; the saved models' scores on the held-out ``test`` rows, by model."""
    from shared.artifacts import RunArtifacts
    from simulation.experiment import ExperimentConfig, run_federation

    with_ann = boosting_mode == "bagging"
    sources, task_path = write_sites(folder, parts)
    cfg = ExperimentConfig(out=folder / "run", rounds=settings.rounds, seed=settings.seed, dp=False,
                           task=task_path, local_epochs=settings.local_epochs, batch_size=settings.batch_size,
                           lr=settings.lr, hidden=settings.hidden, models="ann,xgboost" if with_ann else "xgboost",
                           boosting=boosting_mode, xgb_hist_batch_heads=settings.hist_batch_heads,
                           xgb_rounds=settings.xgb_rounds if boosting_mode == "bagging" else settings.cyclic)
    record = run_federation(cfg, sources)
    artifacts = RunArtifacts.open(cfg.out / "federated", run_id=record.run_id)
    classes = artifacts.encoder().classes_[TARGET]
    y_test = test[TARGET].to_numpy()
    scores = {}
    if with_ann:
        proba = artifacts.predict_ann(test)[TARGET]
        scores[ANN_FEDERATED] = fold_scores(y_test, _predicted_labels(classes, proba))
    proba = artifacts.predict_xgboost(test)[TARGET]
    scores[XGB_MODELS[boosting_mode]] = fold_scores(
        y_test, _predicted_labels(classes, proba))
    return scores


def federated_rows(settings: FederatedSettings, fold_ids: Iterable[int] = range(N_FOLDS),
                   splits: Sequence[str] = SPLITS, boosting_modes: Sequence[str] = BOOSTING_MODES,
                   table: pd.DataFrame | None = None, work_dir: Path | None = None,
                   on_progress: Callable[[str], None] | None = None) -> tuple[list[dict], dict]:
    """Federated ANN / XGBoost rows on the paper's folds (``fold_ids``, 0-based), and the site splits used.

    One ``run_federation`` per (fold, split, boosting mode): the bagging run also trains the ANN.
    """
    table = load_table() if table is None else table
    say = on_progress or (lambda _: None)
    methods = release_method(table)
    all_folds = folds(table)
    fold_ids = list(fold_ids)
    per_fold: dict[tuple[str, str], list[dict]] = {}
    sites_used: dict[str, list[dict]] = {split: [] for split in splits}
    total, done = len(fold_ids) * len(splits) * len(boosting_modes), 0
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for k in fold_ids:
            train_idx, test_idx = all_folds[k]
            test = table.iloc[test_idx]
            for split in splits:
                parts, how = split_training_fold(table, train_idx, split, settings.seed, methods)
                classes = [{str(c): int(n) for c, n in p[TARGET].value_counts().sort_index().items()} for p in parts]
                sites_used[split].append({"fold": k + 1, **how, "rows": [len(p) for p in parts], "classes": classes})
                for mode in boosting_modes:
                    start = time.perf_counter()
                    scores = federate(Path(tmp) / f"fold{k + 1}-{split}-{mode}", parts, test, settings, mode)
                    for model, s in scores.items():
                        per_fold.setdefault((model, split), []).append({"fold": k + 1, **s})
                    done += 1
                    say(f"[{done}/{total}] fold {k + 1}, {split}, {mode}: "
                        + ", ".join(f"{m} BA {s['balanced_accuracy']:.3f}" for m, s in scores.items())
                        + f" ({time.perf_counter() - start:.0f} s)")
    order = [ANN_FEDERATED, XGB_BAGGING, XGB_CYCLIC, XGB_HIST]
    rows = [make_row(model, f"federated-{split}", per_fold[(model, split)], sites=N_SITES,
                     scaling="federated statistics of the training fold (no row leaves a site)")
            for split in splits for model in order if (model, split) in per_fold]
    return rows, sites_used


# -- report -----------------------------------------------------------------------------------------------


def _find(rows: list[dict], model: str, mode: str) -> dict | None:
    return next((r for r in rows if r["model"] == model and r["mode"] == mode), None)


def _pm(row: dict, metric: str) -> str:
    mean, sd = row.get(f"{metric}_mean"), row.get(f"{metric}_sd")
    if mean is None:
        return "—"
    return f"{mean:.3f} ± {sd:.3f}" if sd is not None else f"{mean:.3f}"


def table_markdown(rows: list[dict]) -> str:
    """Model × mode: balanced accuracy, F1 (micro, the paper's), F1 (weighted), MCC — mean ± population sd."""
    lines = ["| model | mode | balanced accuracy | F1 (micro, as the paper) | F1 (weighted) | MCC | folds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['mode']} | {_pm(r, 'balanced_accuracy')} | {_pm(r, 'f1')} | "
                     f"{_pm(r, 'f1_weighted')} | {_pm(r, 'mcc')} | {len(r.get('folds') or [])} |")
    return "\n".join(lines)


def comparison_sentences(rows: list[dict]) -> list[str]:
    """Sentences computed from the rows: pooled XGBoost vs the paper, federated vs pooled per split."""
    out = []
    paper, pooled = _find(rows, "XGBClassifier", "paper"), _find(rows, "XGBClassifier", "pooled")
    if paper and pooled:
        diff = pooled["balanced_accuracy_mean"] - paper["balanced_accuracy_mean"]
        out.append(f"Pooled XGBoost (the paper's XGBClassifier re-run on its folds) reaches balanced accuracy "
                   f"{_pm(pooled, 'balanced_accuracy')} against the paper's {_pm(paper, 'balanced_accuracy')} "
                   f"(difference {diff:+.3f}).")
    pairs = [(ANN_FEDERATED, ANN_POOLED), (XGB_BAGGING, XGB_POOLED), (XGB_CYCLIC, XGB_POOLED),
             (XGB_HIST, XGB_POOLED)]
    for split in SPLITS:
        parts = []
        for fed_name, pooled_name in pairs:
            fed, base = _find(rows, fed_name, f"federated-{split}"), _find(rows, pooled_name, "pooled")
            if fed and base:
                gap = fed["balanced_accuracy_mean"] - base["balanced_accuracy_mean"]
                parts.append(f"{fed_name} {fed['balanced_accuracy_mean']:.3f} vs {pooled_name} "
                             f"{base['balanced_accuracy_mean']:.3f} (gap {gap:+.3f})")
        xgb_paper = pooled
        for fed_name in (XGB_BAGGING, XGB_CYCLIC, XGB_HIST):
            fed = _find(rows, fed_name, f"federated-{split}")
            if fed and xgb_paper:
                gap = fed["balanced_accuracy_mean"] - xgb_paper["balanced_accuracy_mean"]
                parts.append(f"{fed_name} vs pooled XGBClassifier {xgb_paper['balanced_accuracy_mean']:.3f} "
                             f"(gap {gap:+.3f})")
        if parts:
            label = "IID (stratified at random)" if split == "iid" else "non-IID (by API)"
            out.append(f"Federated {label}, balanced accuracy: " + "; ".join(parts) + ".")
    return out


def write_report(out: Path, rows: list[dict], meta: dict) -> str:
    """``OUT/paper_liposome.md``: the table, the comparison sentences, the citation and licence."""
    noniid_by = sorted({s["by"] for s in meta.get("sites", {}).get("noniid", [])})
    text = "\n".join([
        "# Liposome release classes: the paper, its protocol re-run, and the same folds federated", "",
        f"Data and reference results: {CITATION}. Licence: {LICENCE}.", "",
        "Protocol: StratifiedKFold(5, shuffle=True, random_state=15) on 77 formulations, 3 release classes; "
        "mean ± population sd (ddof = 0, as the paper's np.std) over the 5 test folds. `pooled` scales on all "
        "77 rows before splitting, as the paper's script did; `pooled-fold-scaler` scales on the training fold. "
        "F1 (micro) is the paper's F1 (it equals accuracy); F1 (weighted) is added. Federated: each training "
        f"fold split over {N_SITES} sites, IID = stratified at random (seed {meta['settings']['seed']}), non-IID = "
        f"whole {', '.join(noniid_by) or 'API_type'} groups per site; Flower simulation, then the saved models "
        "predict the held-out fold.", "",
        table_markdown(rows), "",
        *comparison_sentences(rows), "",
        f"Settings: {json.dumps(meta['settings'])}. Wall time {meta.get('seconds', 0):.0f} s.", ""])
    (out / "paper_liposome.md").write_text(text)
    return text


def run_paper_liposome(out: Path, rounds: int = 20, xgb_rounds: int = 10, seed: int = 0, *,
                       federated: bool = True, fold_ids: Iterable[int] = range(N_FOLDS),
                       on_progress: Callable[[str], None] | None = print,
                       boosting_modes: Sequence[str] = BOOSTING_MODES) -> list[dict]:
    """Paper rows, pooled rows and federated rows → ``OUT/paper_liposome.json`` (a list of rows),
    ``OUT/paper_liposome_meta.json`` (citation, licence, settings, site splits) and ``OUT/paper_liposome.md``;
    prints the table. ``rounds``: ANN rounds; ``xgb_rounds``: bagging rounds (cyclic and hist get 3 ×)."""
    from simulation.experiment import flower_environment, quiet_flower
    from simulation.flower_runtime import ray_session

    start = time.perf_counter()
    fold_ids = list(fold_ids)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = FederatedSettings(rounds=rounds, xgb_rounds=xgb_rounds, seed=seed)
    say = on_progress or (lambda _: None)
    table = load_table()
    rows = paper_rows() + pooled_rows(True, table) + pooled_rows(False, table)
    say("paper and pooled classifiers done")
    rows += pooled_fednano_rows(settings, table)
    say("pooled fednano ANN and XGBoost done")
    sites: dict = {}
    if federated:
        flower_environment(Path.cwd())
        quiet_flower()
        with ray_session():  # its 5 folds × splits × models are one simulation each: one Ray for all
            fed, sites = federated_rows(settings, fold_ids, boosting_modes=boosting_modes, table=table,
                                        on_progress=say)
        rows += fed
    seconds = time.perf_counter() - start
    from server.app import RunSettings

    server_defaults = RunSettings()  # run_federation passes no xgb eta/depth: the server's defaults apply
    meta = {"source": CITATION, "licence": LICENCE,
            "settings": {"rounds": rounds, "xgb_rounds": xgb_rounds, "cyclic_rounds": settings.cyclic,
                         "local_epochs": settings.local_epochs, "batch_size": settings.batch_size, "lr": settings.lr,
                         "hidden": settings.hidden, "xgb_eta": server_defaults.xgb_eta,
                         "xgb_max_depth": server_defaults.xgb_max_depth, "seed": seed,
                         "folds": [k + 1 for k in fold_ids] if federated else []},
            "sd": "population (ddof=0), as np.std in the paper's script; matches test_CV.csv",
            "f1": "f1 = micro average (the paper's, = accuracy); f1_weighted = support-weighted",
            "scaling": "the paper fitted StandardScaler on all 77 rows before splitting",
            "sites": sites, "seconds": seconds}
    (out / "paper_liposome.json").write_text(json.dumps(rows, indent=1, allow_nan=False) + "\n")
    (out / "paper_liposome_meta.json").write_text(json.dumps(meta, indent=1, allow_nan=False) + "\n")
    write_report(out, rows, meta)
    print(table_markdown(rows))
    for sentence in comparison_sentences(rows):
        print(sentence)
    print(f"Data: {CITATION}. Licence: {LICENCE}.")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m simulation.paper_liposome --out DIR [--rounds R] [--xgb-rounds X] [--seed S]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/paper_liposome"))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--xgb-rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run_paper_liposome(args.out, rounds=args.rounds, xgb_rounds=args.xgb_rounds, seed=args.seed)


if __name__ == "__main__":
    main()
