"""The seed paper's model comparison, produced by our pipeline: random forest, SVM and gradient boosting
(scikit-learn) beside the ANN and XGBoost, each local-only and pooled, on the same encoding and splits.

These models have no federated form in Flower (a forest or an SVM does not average), so they appear
local-only and pooled; the ANN and XGBoost add their federated rows. Estimators: Breiman 2001 (random
forest), Cortes & Vapnik 1995 with Platt 1999 probabilities (SVM), Friedman 2001 (gradient boosting).
An RBF SVM trains in O(n²): on more than ``SVM_MAX_ROWS`` training rows it uses a seeded subsample of that
size, and says so in the report.

Also here: the pooled models' permutation importance, computed with the same function the sites use
(``client.importance``) on the union of the test splits, to stand next to the federated importance.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
from sklearn.ensemble import (
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.svm import SVC, SVR

from client.importance import permutation_sums
from client.split import EncodedSplit, encode
from shared.encoding import FeatureEncoder
from shared.importance import importance_from_sums
from shared.validation import SiteData
from simulation.baselines import (
    BaselineSettings,
    evaluate_per_site,
    local_summaries,
    pooled_training_rows,
    site_splits,
)

CLASSIC = ("random_forest", "svm", "gradient_boosting")
SVM_MAX_ROWS = 3000


def make_estimator(name: str, kind: str, seed: int):
    """The scikit-learn estimator ``name`` for an outcome of ``kind`` (classifier or regressor)."""
    classify = kind in ("binary", "multiclass")
    if name == "random_forest":
        cls = RandomForestClassifier if classify else RandomForestRegressor
        return cls(n_estimators=200, min_samples_leaf=2, random_state=seed, n_jobs=1)
    if name == "svm":
        # libsvm's own Platt scaling (probability=True, deprecated in scikit-learn 1.9; the warning is silenced at
        # fit): CalibratedClassifierCV, the suggested replacement, refuses a class with fewer rows than its folds,
        # which a local-only site of a real multi-site table has (tests/test_cli.py, liposome sites)
        return SVC(probability=True, random_state=seed) if classify else SVR()
    if name == "gradient_boosting":
        cls = GradientBoostingClassifier if classify else GradientBoostingRegressor
        return cls(random_state=seed)
    raise ValueError(f"unknown model {name!r}: expected one of {', '.join(CLASSIC)}")


def fit_classic(name: str, encoder: FeatureEncoder, data: EncodedSplit,
                seed: int) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """One estimator per outcome; returns a predictor in the pipeline's conventions."""
    rng = np.random.default_rng(seed)
    fitted = {}
    for outcome in encoder.task.outcomes:
        y = data.targets[outcome.name]
        rows = np.flatnonzero(~np.isnan(y))
        if name == "svm" and len(rows) > SVM_MAX_ROWS:
            rows = np.sort(rng.choice(rows, SVM_MAX_ROWS, replace=False))
        labels = y[rows].astype(int) if outcome.kind != "regression" else y[rows]
        if outcome.kind != "regression" and len(np.unique(labels)) < 2:
            fitted[outcome.name] = ("constant", float(labels[0]) if len(labels) else 0.0)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # SVC(probability=True): see make_estimator
            fitted[outcome.name] = ("model", make_estimator(name, outcome.kind, seed).fit(data.x[rows], labels))

    def predict(x: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for outcome in encoder.task.outcomes:
            how, model = fitted[outcome.name]
            n_classes = len(encoder.classes_.get(outcome.name, [0, 1]))
            if how == "constant":
                proba = np.zeros((len(x), n_classes))
                proba[:, int(model)] = 1.0
                out[outcome.name] = proba[:, 1] if outcome.kind == "binary" else proba
            elif outcome.kind == "regression":
                out[outcome.name] = model.predict(x)
            else:
                proba = np.zeros((len(x), n_classes))
                proba[:, model.classes_] = model.predict_proba(x)
                out[outcome.name] = proba[:, 1] if outcome.kind == "binary" else proba
        return out

    return predict


def local_classic(name: str, sites: dict[str, SiteData], s: BaselineSettings) -> dict[str, dict[str, dict]]:
    """Summaries per site of each site's own ``name`` model on its test split."""
    return local_summaries(sites, s, lambda _, encoder, rows: fit_classic(name, encoder, encode(encoder, rows),
                                                                          s.seed))


def pooled_classic(name: str, sites: dict[str, SiteData], s: BaselineSettings) -> dict[str, dict[str, dict]]:
    """Summaries per site of one ``name`` model trained on all sites' training rows."""
    encoder, rows = pooled_training_rows(sites, s)
    return evaluate_per_site(fit_classic(name, encoder, encode(encoder, rows), s.seed), encoder, sites, s)


def pooled_importance(predict: Callable[[np.ndarray], dict[str, np.ndarray]], encoder: FeatureEncoder,
                      sites: dict[str, SiteData], s: BaselineSettings) -> dict[str, dict[str, float]]:
    """Permutation importance of a pooled model over the union of the sites' test splits."""
    splits = site_splits(sites, s)
    test = encode(encoder, pd.concat([parts["test"] for parts in splits.values()], ignore_index=True))
    return importance_from_sums(encoder, permutation_sums(predict, encoder, test, seed=s.seed))
