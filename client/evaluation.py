"""A site's evaluation summaries of a model on its test split: exact, or through the DP release.

Summaries (``shared.metrics``) are counts and sums over the test rows, so they add up across sites. Under
DP (:func:`private_summaries`) they are one Gaussian release (``client.dp``) in which one row changes, per
outcome it has recorded:

- binary: one bin of the positive or negative score histogram, one confusion count, ``n``, and the sums of
  ``|p − y|`` and ``(p − y)²`` by at most 1 each (5 entries);
- multiclass with K classes: K histogram bins (positive for its class, negative for the others), one
  confusion cell, ``n`` (K + 2);
- regression, with the target and the prediction clipped to the target's declared range ``[lo, hi]``:
  ``n`` by 1, ``Σy`` by ``max|y|``, ``Σy²`` by ``max y²``, ``Σerr`` and ``Σ|err|`` by ``hi − lo``, ``Σerr²``
  by ``(hi − lo)²`` (6 blocks).

Every site of a run with a DP site bins scores coarsely (``shared.metrics.COARSE_N_BINS``) so the noise does
not drown the histograms. Noised counts are rounded and floored at 0; what the server computes from them
(AUC, accuracy, MAE, R²) is post-processing. A regression outcome without a declared range cannot be
released, and the site refuses naming it.
"""

from __future__ import annotations

import numpy as np

from client.dp import Block, PhaseRelease, PrivacyRefused
from shared import metrics
from shared.bounds import declared_range
from shared.encoding import FeatureEncoder
from shared.protocol.privacy import ReleaseFacts

COUNT_KEYS = ("hist_pos", "hist_neg", "tp", "fp", "tn", "fn", "confusion", "n")


def summaries(encoder: FeatureEncoder, data, predictions: dict[str, np.ndarray],
              n_bins: int = metrics.DEFAULT_N_BINS, clip: bool = False) -> dict[str, dict]:
    """Summaries per outcome of any model's predictions (ANN or boosting conventions alike) against
    ``data.targets`` (a ``client.training.EncodedSplit``); regression outcomes on their original scale, clipped
    to their declared range when ``clip`` (for the DP release)."""
    result = {}
    for outcome in encoder.task.outcomes:
        y, p = data.targets[outcome.name], predictions[outcome.name]
        if outcome.kind == "regression":
            y, p = encoder.decode_regression(outcome.name, y), encoder.decode_regression(outcome.name, p)
            if clip:
                low, high = _range(encoder, outcome.name)
                y, p = np.clip(y, low, high), np.clip(p, low, high)
        result[outcome.name] = metrics.summarise(outcome.kind, y, p, n_bins=n_bins)
    return result


def _range(encoder: FeatureEncoder, outcome: str) -> tuple[float, float]:
    bounds = declared_range(encoder.task, outcome)
    if bounds is None:
        raise PrivacyRefused(f"regression outcome {outcome!r} has no declared range: its evaluation sums cannot be "
                             "released under DP (declare it in task.toml [ranges])")
    return bounds


def summary_blocks(encoder: FeatureEncoder, exact: dict[str, dict]) -> dict[str, Block]:
    """The blocks of the DP release of ``exact`` (one dict of summaries per outcome), per the module docstring."""
    blocks = {}
    for outcome in encoder.task.outcomes:
        summary, name = exact[outcome.name], outcome.name
        if outcome.kind == "binary":
            blocks[f"{name}/hist"] = Block(np.concatenate([summary["hist_pos"], summary["hist_neg"]]), 1.0, 1)
            blocks[f"{name}/confusion"] = Block(np.array([summary[k] for k in ("tp", "fp", "tn", "fn")]), 1.0, 1)
            for key in ("n", "sum_abs_err", "sum_sq_err"):
                blocks[f"{name}/{key}"] = Block(np.array([summary[key]]), 1.0, 1)
        elif outcome.kind == "multiclass":
            k = len(encoder.classes_[name])
            blocks[f"{name}/hist"] = Block(np.concatenate([summary["hist_pos"], summary["hist_neg"]]), 1.0, k)
            blocks[f"{name}/confusion"] = Block(np.asarray(summary["confusion"]), 1.0, 1)
            blocks[f"{name}/n"] = Block(np.array([summary["n"]]), 1.0, 1)
        else:
            low, high = _range(encoder, name)
            width, top = high - low, max(abs(low), abs(high))
            for key, scale in (("n", 1.0), ("sum_y", top), ("sum_y2", top * top), ("sum_err", width),
                               ("sum_abs_err", width), ("sum_sq_err", width * width)):
                blocks[f"{name}/{key}"] = Block(np.array([summary[key]]), scale, 1)
    return blocks


def from_blocks(encoder: FeatureEncoder, noised: dict[str, np.ndarray]) -> dict[str, dict]:
    """Noised blocks back to summaries: counts rounded and floored at 0, sums as they are."""
    result = {}
    for outcome in encoder.task.outcomes:
        name, summary = outcome.name, {}
        if outcome.kind in ("binary", "multiclass"):
            hist = _counts(noised[f"{name}/hist"])
            summary["hist_pos"], summary["hist_neg"] = hist[: len(hist) // 2], hist[len(hist) // 2:]
            confusion = _counts(noised[f"{name}/confusion"])
            if outcome.kind == "binary":
                summary.update(zip(("tp", "fp", "tn", "fn"), confusion, strict=True))
                summary["sum_abs_err"] = max(float(noised[f"{name}/sum_abs_err"][0]), 0.0)
                summary["sum_sq_err"] = max(float(noised[f"{name}/sum_sq_err"][0]), 0.0)
            else:
                summary["confusion"] = confusion
            summary["n"] = _counts(noised[f"{name}/n"])[0]
        else:
            summary["n"] = _counts(noised[f"{name}/n"])[0]
            for key in ("sum_y", "sum_y2", "sum_err", "sum_abs_err", "sum_sq_err"):
                summary[key] = float(noised[f"{name}/{key}"][0])
            summary["sum_y2"], summary["sum_abs_err"] = max(summary["sum_y2"], 0.0), max(summary["sum_abs_err"], 0.0)
            summary["sum_sq_err"] = max(summary["sum_sq_err"], 0.0)
        result[name] = summary
    return result


def _counts(values: np.ndarray) -> list[int]:
    return [max(int(round(float(v))), 0) for v in np.ravel(values)]


def private_summaries(encoder: FeatureEncoder, data, predictions: dict[str, np.ndarray],
                      release: PhaseRelease, index: int) -> tuple[dict[str, dict], ReleaseFacts]:
    """The DP release of the summaries (coarse bins, clipped regression values); charges the site's ledger."""
    exact = summaries(encoder, data, predictions, n_bins=metrics.COARSE_N_BINS, clip=True)
    noised, facts = release.release(summary_blocks(encoder, exact), index)
    return from_blocks(encoder, noised), facts
