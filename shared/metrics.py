"""Evaluation metrics a federation can compute from summaries, so test data never leave a site.

Each site evaluates the model on its own test split and reduces ``(y_true, prediction)`` to a *summary*: counts,
sums and score histograms, nothing row-level. Every value in a summary is a sum over rows, so the summary of the
union of several test sets is the element-wise sum of their summaries (``combine``). The server therefore gets
per-site metrics from each site's summary and overall metrics from the combined one -- exactly the numbers pooled
test data would give (AUC to histogram resolution), without ever seeing a row.

Summaries are plain ``dict``s of ``int`` / ``float`` / ``list[int]`` / ``list[float]``, so they fit in a Flower
``MetricRecord``; ``to_metric_record`` / ``from_metric_record`` put several of them (one per outcome) in one record
under key prefixes such as ``"response/hist_pos"``.

Sources
-------
* AUC: the Mann-Whitney U statistic divided by ``n_pos * n_neg`` is the area under the empirical ROC curve
  (Mann & Whitney 1947, Ann. Math. Statist. 18:50-60; Hanley & McNeil 1982, Radiology 143:29-36). Here scores are
  binned on the logit scale; pairs whose scores share a bin count 1/2, as ties do in U. The result equals the exact
  AUC whenever no positive and negative share a bin, and is otherwise within half the tied fraction of pairs.
* Macro one-vs-rest AUC for several classes: the unweighted mean over classes of the AUC of class ``c`` against
  the rest (Provost & Domingos 2000; scikit-learn's ``multi_class="ovr", average="macro"``).
* Balanced accuracy: the mean of the per-class recalls over the classes present in ``y_true``
  (Brodersen, Ong, Stephan & Buhmann 2010, "The balanced accuracy and its posterior distribution", ICPR,
  3121-3124), as scikit-learn's ``balanced_accuracy_score``.

Undefined metrics are ``float("nan")``: AUC with a single class present, anything of an empty test set, R² of a
constant target. ``json.dump`` writes NaN as the non-standard token ``NaN``; pass results through ``json_safe``
first, which turns NaN into ``None`` (JSON ``null``), meaning "undefined".

Example
-------
>>> import numpy as np
>>> y, p = np.array([0, 1, 1, 0]), np.array([0.2, 0.9, 0.6, 0.4])
>>> site_a = summarise("binary", y[:2], p[:2])
>>> site_b = summarise("binary", y[2:], p[2:])
>>> metrics("binary", combine([site_a, site_b]))["auc"]
1.0
>>> record = to_metric_record(site_a, prefix="response")
>>> from_metric_record(record, prefix="response") == site_a
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import MetricRecord

from shared.task import OUTCOME_KINDS

Summary = dict[str, int | float | list[int] | list[float]]
"""A site's evaluation summary: sums, counts and histograms only, so summaries of disjoint test sets add up."""

DEFAULT_N_BINS = 2000
"""Score histogram bins: 2000 over [-12, 12] is a bin width of 0.012 in log-odds (odds ratio 1.012)."""

COARSE_N_BINS = 20
"""Score histogram bins when some site of a run releases its summaries under DP: every site of the run uses
them, so summaries still add up. 1.2 log-odds per bin; a DP site's histogram noise (~100 counts per bin at ε
0.15) would drown 2000 fine bins."""

LOGIT_CLIP = 12.0
"""Scores are binned on logit(p) clipped to [-12, 12], i.e. p in [6.1e-6, 1 - 6.1e-6]; beyond it scores tie."""

THRESHOLD = 0.5
"""A binary score at or above this is called positive for accuracy and the confusion counts."""

SST_RELATIVE_FLOOR = 1e-12
"""R² is undefined when the target's sum of squares about its mean is below this fraction of ``sum_y2``: a
variance that small is indistinguishable from the rounding of ``sum_y2 - sum_y**2 / n``."""

BINARY_KEYS = ("hist_pos", "hist_neg", "tp", "fp", "tn", "fn", "n", "sum_abs_err", "sum_sq_err")
MULTICLASS_KEYS = ("hist_pos", "hist_neg", "confusion", "n")
REGRESSION_KEYS = ("n", "sum_y", "sum_y2", "sum_err", "sum_abs_err", "sum_sq_err")
_SUMMARY_KEYS = frozenset(BINARY_KEYS + MULTICLASS_KEYS + REGRESSION_KEYS)

PREFIX_SEPARATOR = "/"


# --- input checks -----------------------------------------------------------------------------------------


def _float_vector(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def _check_same_length(y_true: np.ndarray, prediction: np.ndarray, name: str) -> None:
    if len(y_true) != len(prediction):
        raise ValueError(f"{name} has {len(prediction)} rows but y_true has {len(y_true)}")


def _check_probabilities(values: np.ndarray, name: str) -> None:
    bad = ~((values >= 0.0) & (values <= 1.0))  # also catches NaN
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ValueError(f"{name} must be probabilities in [0, 1]; row {row} holds {values.flat[bad.argmax()]!r}")


def _check_finite(values: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(f"{name} must be finite where y_true is known; row {row} holds {values[row]!r}")


# --- summaries --------------------------------------------------------------------------------------------


def _score_bins(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each probability: equal-width bins of logit(p) clipped to [-LOGIT_CLIP, LOGIT_CLIP]."""
    with np.errstate(divide="ignore"):
        logit = np.log(p) - np.log1p(-p)
    logit = np.clip(logit, -LOGIT_CLIP, LOGIT_CLIP)
    index = np.floor((logit + LOGIT_CLIP) * (n_bins / (2.0 * LOGIT_CLIP))).astype(np.int64)
    return np.clip(index, 0, n_bins - 1)


def _histogram(bins: np.ndarray, n_bins: int) -> list[int]:
    return np.bincount(bins, minlength=n_bins).tolist()


def _check_n_bins(n_bins: int) -> None:
    if not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def summarise_binary(y_true: Any, p_positive: Any, n_bins: int = DEFAULT_N_BINS) -> Summary:
    """Summary of a binary outcome: score histograms of positives and negatives, confusion counts at 0.5, n.

    Parameters
    ----------
    y_true : array-like of shape (n,)
        0/1 (or False/True) labels; rows holding NaN are skipped.
    p_positive : array-like of shape (n,)
        Predicted probability of the positive class, in [0, 1].
    n_bins : int, default=DEFAULT_N_BINS
        Histogram bins on the logit scale; every site of a federation must use the same value.

    Returns
    -------
    Summary
        ``hist_pos``, ``hist_neg`` (``n_bins`` counts each), ``tp``, ``fp``, ``tn``, ``fn``, ``n``, and
        ``sum_abs_err`` / ``sum_sq_err`` of the probability against the 0/1 label (the seed paper's MAE and
        RMSE of a classifier; RMSE² is the Brier score, Brier 1950).
    """
    _check_n_bins(n_bins)
    y = _float_vector(y_true, "y_true")
    p = _float_vector(p_positive, "p_positive")
    _check_same_length(y, p, "p_positive")
    known = ~np.isnan(y)
    y, p = y[known], p[known]
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"y_true of a binary outcome must be 0 or 1, got values {sorted(set(y.tolist()) - {0, 1})}")
    _check_probabilities(p, "p_positive")
    positive = y == 1.0
    called = p >= THRESHOLD
    bins = _score_bins(p, n_bins)
    return {
        "hist_pos": _histogram(bins[positive], n_bins),
        "hist_neg": _histogram(bins[~positive], n_bins),
        "tp": int(np.sum(positive & called)),
        "fp": int(np.sum(~positive & called)),
        "tn": int(np.sum(~positive & ~called)),
        "fn": int(np.sum(positive & ~called)),
        "n": int(len(y)),
        "sum_abs_err": float(np.sum(np.abs(p - y))),
        "sum_sq_err": float(np.sum((p - y) ** 2)),
    }


def summarise_multiclass(y_true_int: Any, proba: Any, n_bins: int = DEFAULT_N_BINS) -> Summary:
    """Summary of a K-class outcome: one-vs-rest score histograms per class and the confusion matrix of argmax.

    Parameters
    ----------
    y_true_int : array-like of shape (n,)
        Class labels 0 .. K-1; rows holding NaN are skipped.
    proba : array-like of shape (n, K)
        Predicted class probabilities, in [0, 1].
    n_bins : int, default=DEFAULT_N_BINS
        Histogram bins on the logit scale; every site of a federation must use the same value.

    Returns
    -------
    Summary
        ``hist_pos``: K x n_bins counts, row c the histogram of ``proba[:, c]`` over rows of class c, flattened
        row-major; ``hist_neg``: the same over rows not of class c; ``confusion``: K x K counts, row = true class,
        column = argmax class, flattened row-major; ``n``.
    """
    _check_n_bins(n_bins)
    y = _float_vector(y_true_int, "y_true_int")
    scores = np.asarray(proba, dtype=float)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"proba must have shape (n, K) with K >= 2, got shape {scores.shape}")
    _check_same_length(y, scores, "proba")
    known = ~np.isnan(y)
    y, scores = y[known], scores[known]
    n_classes = scores.shape[1]
    if not ((y == np.round(y)) & (y >= 0) & (y < n_classes)).all():
        raise ValueError(f"y_true_int must hold class labels 0 .. {n_classes - 1} (proba has {n_classes} columns)")
    _check_probabilities(scores, "proba")
    labels = y.astype(np.int64)
    bins = _score_bins(scores, n_bins)
    hist_pos = np.zeros((n_classes, n_bins), dtype=np.int64)
    hist_neg = np.zeros((n_classes, n_bins), dtype=np.int64)
    for c in range(n_classes):
        is_c = labels == c
        hist_pos[c] = np.bincount(bins[is_c, c], minlength=n_bins)
        hist_neg[c] = np.bincount(bins[~is_c, c], minlength=n_bins)
    predicted = np.argmax(scores, axis=1)
    confusion = np.bincount(labels * n_classes + predicted, minlength=n_classes * n_classes)
    return {
        "hist_pos": hist_pos.ravel().tolist(),
        "hist_neg": hist_neg.ravel().tolist(),
        "confusion": confusion.tolist(),
        "n": int(len(labels)),
    }


def summarise_regression(y_true: Any, y_pred: Any) -> Summary:
    """Summary of a continuous outcome: n and the sums of y, y², err, |err|, err² with err = y_pred - y_true.

    Rows whose ``y_true`` is NaN are skipped; ``y_pred`` must be finite on the others.
    """
    y = _float_vector(y_true, "y_true")
    pred = _float_vector(y_pred, "y_pred")
    _check_same_length(y, pred, "y_pred")
    known = ~np.isnan(y)
    y, pred = y[known], pred[known]
    _check_finite(y, "y_true")
    _check_finite(pred, "y_pred")
    err = pred - y
    return {
        "n": int(len(y)),
        "sum_y": float(np.sum(y)),
        "sum_y2": float(np.sum(y * y)),
        "sum_err": float(np.sum(err)),
        "sum_abs_err": float(np.sum(np.abs(err))),
        "sum_sq_err": float(np.sum(err * err)),
    }


def combine(summaries: Sequence[Mapping[str, Any]]) -> Summary:
    """The summary of the union of the test sets: the element-wise sum of their summaries (all of one kind)."""
    if not summaries:
        raise ValueError("combine needs at least one summary")
    keys = list(summaries[0])
    for index, summary in enumerate(summaries[1:], start=1):
        if set(summary) != set(keys):
            raise ValueError(f"summary {index} has keys {sorted(summary)}, summary 0 has {sorted(keys)}")
    combined: Summary = {}
    for key in keys:
        values = [summary[key] for summary in summaries]
        if isinstance(values[0], list | tuple | np.ndarray):
            lengths = {len(value) for value in values}
            if len(lengths) != 1:
                raise ValueError(f"{key!r} has lengths {sorted(lengths)} across summaries (different n_bins or K?)")
            combined[key] = np.sum(np.asarray(values), axis=0).tolist()
        else:
            combined[key] = sum(values)
    return combined


# --- Flower records ---------------------------------------------------------------------------------------


def _key(prefix: str, name: str) -> str:
    return f"{prefix}{PREFIX_SEPARATOR}{name}" if prefix else name


def _plain(value: Any) -> int | float | list[int] | list[float]:
    if isinstance(value, list | tuple | np.ndarray):
        return np.asarray(value).tolist()
    return value.item() if isinstance(value, np.generic) else value


def to_metric_record(summary: Mapping[str, Any], prefix: str = "") -> MetricRecord:
    """A Flower ``MetricRecord`` holding ``summary``, its keys as ``"{prefix}/{key}"`` (bare keys if no prefix).

    Several outcomes share one record: ``record.update(to_metric_record(other, prefix="toxicity"))``.
    """
    return MetricRecord({_key(prefix, name): _plain(value) for name, value in summary.items()})


def from_metric_record(record: Mapping[str, Any], prefix: str = "") -> Summary:
    """The summary stored in ``record`` under ``prefix`` by ``to_metric_record``; other keys are ignored."""
    summary: Summary = {}
    for name in _SUMMARY_KEYS:
        key = _key(prefix, name)
        if key in record:
            value = record[key]
            summary[name] = list(value) if isinstance(value, list | tuple) else value
    if not summary:
        raise KeyError(f"no summary under prefix {prefix!r} in the record (keys: {sorted(record)})")
    return summary


# --- metrics ----------------------------------------------------------------------------------------------


def _auc_from_histograms(hist_pos: np.ndarray, hist_neg: np.ndarray) -> float:
    """Mann-Whitney U / (n_pos * n_neg), a pair in one bin counting 1/2 (Hanley & McNeil 1982)."""
    n_pos, n_neg = float(hist_pos.sum()), float(hist_neg.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(hist_neg) - hist_neg
    twice_u = float(np.sum(hist_pos * (2.0 * neg_below + hist_neg)))
    return twice_u / (2.0 * n_pos * n_neg)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def _n_classes(summary: Mapping[str, Any]) -> int:
    cells = len(summary["confusion"])
    n_classes = math.isqrt(cells)
    if n_classes * n_classes != cells:
        raise ValueError(f"confusion has {cells} cells, not K x K")
    return n_classes


def _class_histograms(summary: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    n_classes = _n_classes(summary)
    hist_pos = np.asarray(summary["hist_pos"], dtype=float).reshape(n_classes, -1)
    hist_neg = np.asarray(summary["hist_neg"], dtype=float).reshape(n_classes, -1)
    return hist_pos, hist_neg


def _balanced_accuracy(confusion: np.ndarray) -> float:
    """Mean recall over the classes present in y_true (Brodersen et al. 2010)."""
    support = confusion.sum(axis=1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float(np.mean(np.diag(confusion)[present] / support[present]))


def binary_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """``auc``, ``accuracy``, ``balanced_accuracy``, ``mae``, ``rmse`` (of the probability), ``n``,
    ``prevalence`` of a binary summary (NaN = undefined)."""
    hist_pos = np.asarray(summary["hist_pos"], dtype=float)
    hist_neg = np.asarray(summary["hist_neg"], dtype=float)
    tp, fp, tn, fn = (float(summary[key]) for key in ("tp", "fp", "tn", "fn"))
    n = float(summary["n"])
    confusion = np.array([[tn, fp], [fn, tp]])
    return {
        "auc": _auc_from_histograms(hist_pos, hist_neg),
        "accuracy": _ratio(tp + tn, n),
        "balanced_accuracy": _balanced_accuracy(confusion),
        "mae": _ratio(float(summary["sum_abs_err"]), n),
        "rmse": float(np.sqrt(_ratio(float(summary["sum_sq_err"]), n))),
        "n": n,
        "prevalence": _ratio(tp + fn, n),
    }


def multiclass_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """``auc`` (macro one-vs-rest), ``accuracy``, ``balanced_accuracy``, ``n`` of a multiclass summary.

    The macro AUC averages over the classes that have both members and non-members in the test set; a site
    lacking a class still gets an AUC over the others (scikit-learn refuses such a set). NaN if no class has both.
    """
    hist_pos, hist_neg = _class_histograms(summary)
    per_class = np.array([_auc_from_histograms(pos, neg) for pos, neg in zip(hist_pos, hist_neg, strict=True)])
    defined = ~np.isnan(per_class)
    confusion = np.asarray(summary["confusion"], dtype=float).reshape(len(per_class), len(per_class))
    n = float(summary["n"])
    return {
        "auc": float(np.mean(per_class[defined])) if defined.any() else float("nan"),
        "accuracy": _ratio(float(np.trace(confusion)), n),
        "balanced_accuracy": _balanced_accuracy(confusion),
        "n": n,
    }


def regression_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """``mae``, ``rmse``, ``r2``, ``n`` of a regression summary; r2 = 1 - SSE/SST, SST = sum_y2 - sum_y²/n.

    SST from raw sums loses digits when the target's mean is large against its spread (|mean| / sd of 1e4
    costs about 8 of float64's 16 digits); R² is NaN when SST is below ``SST_RELATIVE_FLOOR`` of ``sum_y2``.
    """
    n = float(summary["n"])
    if n == 0:
        return {"mae": float("nan"), "rmse": float("nan"), "r2": float("nan"), "n": 0.0}
    sum_y, sum_y2, sse = float(summary["sum_y"]), float(summary["sum_y2"]), float(summary["sum_sq_err"])
    sst = sum_y2 - sum_y * sum_y / n
    r2 = 1.0 - sse / sst if sst > SST_RELATIVE_FLOOR * sum_y2 else float("nan")
    return {"mae": float(summary["sum_abs_err"]) / n, "rmse": math.sqrt(sse / n), "r2": r2, "n": n}


def roc_curve_points(summary: Mapping[str, Any], cls: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr)`` from the score histograms, for plotting; ``cls`` picks a class of a multiclass one.

    One point per occupied bin, thresholds falling from the top bin, starting at (0, 0) and ending at (1, 1);
    the trapezoidal area under these points equals the histogram AUC. Empty arrays if a class is missing.
    """
    if "confusion" in summary:
        if cls is None:
            raise ValueError("cls is required for a multiclass summary: the class whose one-vs-rest curve to draw")
        hist_pos_all, hist_neg_all = _class_histograms(summary)
        if not 0 <= cls < len(hist_pos_all):
            raise ValueError(f"cls must be a class index 0 .. {len(hist_pos_all) - 1}, got {cls}")
        hist_pos, hist_neg = hist_pos_all[cls], hist_neg_all[cls]
    else:
        if cls is not None:
            raise ValueError(f"cls applies to multiclass summaries only, got cls={cls} for a binary summary")
        hist_pos = np.asarray(summary["hist_pos"], dtype=float)
        hist_neg = np.asarray(summary["hist_neg"], dtype=float)
    n_pos, n_neg = hist_pos.sum(), hist_neg.sum()
    if n_pos == 0 or n_neg == 0:
        return np.empty(0), np.empty(0)
    pos_desc, neg_desc = hist_pos[::-1], hist_neg[::-1]
    occupied = (pos_desc + neg_desc) > 0
    tpr = np.concatenate([[0.0], np.cumsum(pos_desc)[occupied] / n_pos])
    fpr = np.concatenate([[0.0], np.cumsum(neg_desc)[occupied] / n_neg])
    return fpr, tpr


# --- one entry for every outcome kind ---------------------------------------------------------------------

_SUMMARISERS: dict[str, Callable[[Any, Any], Summary]] = {
    "binary": summarise_binary,
    "multiclass": summarise_multiclass,
    "regression": summarise_regression,
}
_METRICS: dict[str, Callable[[Mapping[str, Any]], dict[str, float]]] = {
    "binary": binary_metrics,
    "multiclass": multiclass_metrics,
    "regression": regression_metrics,
}
assert set(_SUMMARISERS) == set(OUTCOME_KINDS) == set(_METRICS)


def _check_kind(kind: str) -> None:
    if kind not in OUTCOME_KINDS:
        raise ValueError(f"kind must be one of {', '.join(OUTCOME_KINDS)}; got {kind!r}")


def summarise(kind: str, y_true: Any, prediction: Any, n_bins: int = DEFAULT_N_BINS) -> Summary:
    """The summary of one outcome of ``kind`` (binary: P(positive); multiclass: n x K probabilities; regression:
    predicted values), with ``n_bins`` score bins for a class outcome (every site of a run must use the same)."""
    _check_kind(kind)
    if kind == "regression":
        return summarise_regression(y_true, prediction)
    return _SUMMARISERS[kind](y_true, prediction, n_bins=n_bins)


def metrics(kind: str, summary: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of a summary of ``kind``; NaN marks a metric that is undefined for that test set."""
    _check_kind(kind)
    return _METRICS[kind](summary)


def json_safe(value: Any) -> Any:
    """``value`` with NaN / inf turned into ``None`` (JSON null = undefined) and numpy scalars and arrays into
    Python ones, nested dicts and lists included, so ``json.dumps(..., allow_nan=False)`` accepts it."""
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
