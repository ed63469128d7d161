"""The pooled reference learner of histogram gradient boosting, with the scikit-learn API.

It runs the same algorithm as the federation (``shared.hist_boosting``: global bins from refined grid counts, fixed-
point gradient/hessian histograms, XGBoost's split gain, level-wise growth) on one table. With the same bins
and DP and masking off, a federated run over sites holding the rows of this table grows the same trees bit
for bit: that is the exactness test. Algorithm: Chen & Guestrin, "XGBoost", KDD 2016 (``tree_method="hist"``).

Example
-------
>>> model = HistGradientBoosting(objective="binary:logistic", n_estimators=20).fit(X, y)   # doctest: +SKIP
>>> model.predict_proba(X_test)[:, 1]                                                        # doctest: +SKIP
>>> xgboost.Booster(model_file=bytearray(model.to_xgboost_json()))                         # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np

from shared import hist_boosting as hb
from shared.xgboost_json import export_model


class HistGradientBoosting:
    """Histogram gradient boosting on a pooled table, grown exactly as the federated protocol grows it.

    Parameters
    ----------
    objective : str, default "binary:logistic"
        ``binary:logistic``, ``reg:squarederror`` or ``multi:softprob`` (labels 0 .. n_classes − 1).
    n_estimators : int, default 20
        Boosting rounds (one tree per round, one per class and round for softmax).
    learning_rate, max_depth, reg_lambda, gamma, min_child_weight : see ``shared.hist_boosting.TreeParams``.
    max_bin : int, default 256
    scale_bits : int, default ``shared.hist_boosting.SCALE_BITS``
        Fixed-point scale of the summed gradients and hessians (``TreeParams.scale_bits``); a federation grows
        the same trees as this learner with the same value.
    base_score : float, default 0.5
        Starting prediction (probability for logistic, margin otherwise), as XGBoost's ``base_score``.
    n_classes : int or None, default None
        Classes for softmax (default: ``max(y) + 1``).

    Attributes
    ----------
    thresholds_ : list of ndarray
        Bin thresholds per feature.
    rounds_ : list of list of Tree
        The trees, per boosting round.
    n_features_in_, n_outputs_ : int
    """

    def __init__(self, objective: str = "binary:logistic", n_estimators: int = 20, learning_rate: float = 0.1,
                 max_depth: int = 4, reg_lambda: float = 1.0, gamma: float = 0.0, min_child_weight: float = 1.0,
                 max_bin: int = hb.MAX_BIN, base_score: float = 0.5, n_classes: int | None = None,
                 scale_bits: int = hb.SCALE_BITS) -> None:
        self.objective = objective
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.max_depth = max_depth
        self.reg_lambda = reg_lambda
        self.gamma = gamma
        self.min_child_weight = min_child_weight
        self.max_bin = max_bin
        self.base_score = base_score
        self.n_classes = n_classes
        self.scale_bits = scale_bits

    @property
    def tree_params(self) -> hb.TreeParams:
        return hb.TreeParams(learning_rate=self.learning_rate, max_depth=self.max_depth, reg_lambda=self.reg_lambda,
                             gamma=self.gamma, min_child_weight=self.min_child_weight, scale_bits=self.scale_bits)

    def fit(self, x: np.ndarray, y: np.ndarray, thresholds: list[np.ndarray] | None = None) -> HistGradientBoosting:
        """Learn bins (unless ``thresholds`` are given) and ``n_estimators`` rounds of trees."""
        x, y = _check_xy(x, y)
        hb.check_objective(self.objective)
        classes = self.n_classes or (int(y.max()) + 1 if self.objective == "multi:softprob" else 0)
        self.n_features_in_ = x.shape[1]
        self.n_outputs_ = hb.n_outputs(self.objective, classes)
        self.thresholds_ = thresholds if thresholds is not None else pooled_thresholds(x, self.max_bin)
        bins = hb.bin_rows(x, self.thresholds_)
        self.rounds_: list[list[hb.Tree]] = []
        start = hb.base_margin(self.objective, self.base_score)
        margin = np.full((len(x), self.n_outputs_), start)
        for _ in range(self.n_estimators):
            g, h = hb.gradients(self.objective, y, margin)
            trees = self._grow_round(bins, g, h)
            self.rounds_.append(trees)
            for k, tree in enumerate(trees):
                margin[:, k] += tree.predict_bins(bins)
        return self

    def _grow_round(self, bins: np.ndarray, g: np.ndarray, h: np.ndarray) -> list[hb.Tree]:
        params = self.tree_params
        grower = hb.LevelGrower(self.n_outputs_, self.thresholds_, params)
        width = hb.n_bins(self.thresholds_)
        while not grower.done:
            positions = hb.frontier_positions(grower.trees, bins)
            grower.grow(hb.level_histograms(bins, positions, grower.requested, g, h, width, params.scale_bits))
        return grower.trees

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Margins (rows, outputs)."""
        bins = hb.bin_rows(np.asarray(x, dtype=np.float32), self.thresholds_)
        return hb.predict_margin(self.rounds_, bins, self.n_outputs_, hb.base_margin(self.objective, self.base_score))

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (rows, classes) for logistic and softmax objectives."""
        p = hb.transform(self.objective, self.decision_function(x))
        return np.column_stack([1.0 - p, p]) if self.objective == "binary:logistic" else p

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class labels for classification, values for regression."""
        if self.objective == "reg:squarederror":
            return hb.transform(self.objective, self.decision_function(x))
        return np.argmax(self.predict_proba(x), axis=1)

    def to_xgboost_json(self, feature_names: list[str] | None = None) -> bytes:
        """The model in XGBoost's JSON format (``xgboost.Booster(model_file=bytearray(...))`` loads it)."""
        return export_model(self.rounds_, self.objective, self.base_score, self.n_features_in_, feature_names)


def pooled_thresholds(x: np.ndarray, max_bin: int = hb.MAX_BIN) -> list[np.ndarray]:
    """Bins of a pooled table: its min / max, its grid counts and refinements, cut as every federation cuts them."""
    lo, hi = x.min(axis=0).astype(np.float64), x.max(axis=0).astype(np.float64)
    return hb.global_thresholds(hb.grid_counts(x, lo, hi), lo, hi, lambda bounds: hb.cell_counts(x, bounds), max_bin)


def _check_xy(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"fit: X must be a non-empty 2-D array, got shape {x.shape}")
    if y.shape != (len(x),):
        raise ValueError(f"fit: y must have one value per row of X ({len(x)}), got shape {y.shape}")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1) | ~np.isfinite(y))
    if len(bad):
        raise ValueError(f"fit: row {int(bad[0])} holds a missing or infinite value; encode missing values first")
    return x, y
