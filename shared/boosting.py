"""The boosted outcome model: XGBoost heads, their parameters and their predictions (both sides use these).

One booster per outcome head: ``binary:logistic`` for a binary outcome, ``reg:squarederror`` on the
standardised target for a regression outcome. A multiclass outcome is boosted as one-vs-rest binary
boosters (one per class, probabilities renormalised), because Flower's bagging aggregation appends
``num_parallel_tree`` trees per site and round and so cannot carry the ``num_class`` trees of a softmax
iteration; cyclic training would allow softmax, but one form for both keeps them comparable.
XGBoost: Chen & Guestrin, KDD 2016. Models cross the wire and sit in bundles as XGBoost's own JSON bytes.

Training at a site is :mod:`client.boosting`; the server's phases are :mod:`server.boosting_phase` and
:mod:`server.hist_phase`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from shared.encoding import FeatureEncoder

if TYPE_CHECKING:  # XGBoost is imported where a booster is made or read, so that the heads' bookkeeping
    import xgboost as xgb  # (and the histogram protocol built on it) never loads the library

OBJECTIVES = {"binary": "binary:logistic", "regression": "reg:squarederror"}
# A fixed starting score that every site shares (XGBoost would otherwise estimate one per site from its own
# rows, and bagged trees fit around different starting points): P = 0.5, and 0 for a standardised target.
BASE_SCORES = {"binary": 0.5, "regression": 0.0}


@dataclass(frozen=True)
class BoostingConfig:
    """XGBoost hyper-parameters shared by federated, local-only and pooled boosting."""

    eta: float = 0.1
    max_depth: int = 4
    min_child_weight: float = 1.0
    reg_lambda: float = 1.0
    subsample: float = 1.0
    local_rounds: int = 1
    seed: int = 0

    def params(self, kind: str) -> dict:
        return {"objective": OBJECTIVES[kind], "base_score": BASE_SCORES[kind], "eta": self.eta,
                "max_depth": self.max_depth,
                "min_child_weight": self.min_child_weight, "lambda": self.reg_lambda, "subsample": self.subsample,
                "tree_method": "hist", "nthread": 1, "seed": self.seed,
                "eval_metric": "logloss" if kind == "binary" else "rmse"}


@dataclass(frozen=True)
class Head:
    """One booster to train: an outcome, its boosting kind, and for one-vs-rest the positive class."""

    outcome: str
    kind: str  # "binary" or "regression" (as boosted)
    positive_class: int | None = None

    @property
    def key(self) -> str:
        return self.outcome if self.positive_class is None else f"{self.outcome}={self.positive_class}"


def heads(encoder: FeatureEncoder) -> list[Head]:
    """The boosters a task needs: one per binary/regression outcome, one per class of a multiclass one."""
    result = []
    for outcome in encoder.task.outcomes:
        if outcome.kind == "multiclass":
            result += [Head(outcome.name, "binary", c) for c in range(len(encoder.classes_[outcome.name]))]
        else:
            result.append(Head(outcome.name, outcome.kind))
    return result


def head_labels(head: Head, targets: dict[str, np.ndarray]) -> np.ndarray:
    """The label vector of a head (NaN where the outcome is not recorded)."""
    y = targets[head.outcome].astype(float)
    if head.positive_class is None:
        return y
    return np.where(np.isnan(y), np.nan, (y == head.positive_class).astype(float))


def dmatrix(x: np.ndarray, y: np.ndarray | None = None) -> xgb.DMatrix:
    """A DMatrix of the rows whose label is recorded (all rows when there is no label)."""
    import xgboost as xgb

    if y is None:
        return xgb.DMatrix(x)
    keep = ~np.isnan(y)
    return xgb.DMatrix(x[keep], label=y[keep])


def load(model: bytes) -> xgb.Booster:
    """A booster from its JSON bytes (what crosses the wire)."""
    import xgboost as xgb

    return xgb.Booster(model_file=bytearray(model))


def rounds_in(model: bytes) -> int:
    """Boosting iterations in a serialised model (0 for empty bytes)."""
    return load(model).num_boosted_rounds() if model else 0


def predict_heads(models: dict[str, bytes], encoder: FeatureEncoder, x: np.ndarray) -> dict[str, np.ndarray]:
    """Predictions per outcome from the heads' boosters, in the ANN's conventions: P(positive) for binary,
    renormalised one-vs-rest probabilities for multiclass, the standardised value for regression."""
    data = dmatrix(x)
    return per_outcome(encoder, len(x), {head.key: load(models[head.key]).predict(data) for head in heads(encoder)})


def per_outcome(encoder: FeatureEncoder, n_rows: int, by_head: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each head's predictions (head key → P(positive), or the value of a regression head) as predictions per
    outcome in :func:`predict_heads`' conventions: a multiclass outcome's one-vs-rest heads put side by side and
    renormalised."""
    out: dict[str, np.ndarray] = {}
    for head in heads(encoder):
        p = by_head[head.key]
        if head.positive_class is None:
            out[head.outcome] = p
        else:
            out.setdefault(head.outcome, np.zeros((n_rows, len(encoder.classes_[head.outcome]))))
            out[head.outcome][:, head.positive_class] = p
    for outcome in encoder.task.outcomes:
        if outcome.kind == "multiclass":
            probs = np.clip(out[outcome.name], 1e-9, None)
            out[outcome.name] = probs / probs.sum(axis=1, keepdims=True)
    return out
