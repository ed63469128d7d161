"""Baselines a federated model is compared with, trained with the same code outside Flower (ANN and
XGBoost).

- **local-only**: each site trains alone on its own training split (its own encoder, fit on its rows);
- **pooled**: all sites' training rows in one place (the encoder of the summed statistics, as federated).

Both take the same number of passes over their data as a federated site does (rounds × local epochs), with
DP-SGD at the sites' budget where the run uses DP, and every model is evaluated on the same per-site test
splits. DP noise is calibrated on a throwaway accountant: a counterfactual baseline must not spend a real
site's privacy budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd

from client.boosting import train_pooled_heads
from client.evaluation import summaries
from client.ledger import calibrate_noise
from client.split import encode, split_site
from client.training import DPConfig, TrainConfig, sample_rate, steps_per_epoch, train
from shared import metrics
from shared.ann import MultiTaskMLP, build_model, predict
from shared.boosting import BoostingConfig, predict_heads
from shared.encoding import FeatureEncoder, SiteStatistics, combine, fit_local
from shared.task import TaskSpec
from shared.validation import SiteData


@dataclass(frozen=True)
class BaselineSettings:
    """What the baselines share with the federated run."""

    task: TaskSpec
    epochs: int
    batch_size: int
    lr: float
    hidden: tuple[int, ...]
    seed: int
    split_seed: int
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class Privacy:
    """A DP budget, or None for no DP."""

    epsilon: float
    delta: float


def _dp(privacy: Privacy | None, n_rows: int, s: BaselineSettings) -> DPConfig | None:
    if privacy is None:
        return None
    q = sample_rate(n_rows, s.batch_size)
    steps = s.epochs * steps_per_epoch(n_rows, s.batch_size)
    return DPConfig(calibrate_noise(privacy.epsilon, privacy.delta, q, steps), s.max_grad_norm)


def fit_model(encoder: FeatureEncoder, train_rows: pd.DataFrame, privacy: Privacy | None,
              s: BaselineSettings) -> MultiTaskMLP:
    """A model trained on ``train_rows`` for the baseline's epochs (DP-SGD at ``privacy`` if given)."""
    data = encode(encoder, train_rows)
    model = build_model(encoder, s.task, s.hidden, seed=s.seed)
    config = TrainConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, seed=s.seed)
    train(model, data, config, _dp(privacy, len(data), s))
    return model


def site_splits(sites: dict[str, SiteData], s: BaselineSettings) -> dict[str, dict[str, pd.DataFrame]]:
    """Each site's train / val / test rows, exactly as its federated client splits them."""
    return {name: split_site(site.episodes, s.task, s.split_seed) for name, site in sites.items()}


def local_models(sites: dict[str, SiteData], privacy: dict[str, Privacy | None],
                 s: BaselineSettings) -> dict[str, tuple[MultiTaskMLP, FeatureEncoder]]:
    """Each site's own model and encoder, from its own training rows only."""
    models = {}
    for name, parts in site_splits(sites, s).items():
        encoder = fit_local(parts["train"], s.task)
        models[name] = (fit_model(encoder, parts["train"], privacy[name], s), encoder)
    return models


def pooled_training_rows(sites: dict[str, SiteData], s: BaselineSettings) -> tuple[FeatureEncoder, pd.DataFrame]:
    """All sites' training rows, and the encoder of their summed statistics (the federated encoder)."""
    splits = site_splits(sites, s)
    stats = combine([SiteStatistics.from_frame(parts["train"], s.task) for parts in splits.values()])
    rows = pd.concat([parts["train"] for parts in splits.values()], ignore_index=True)
    return FeatureEncoder(s.task).fit_statistics(stats), rows


def evaluate_per_site(predict, encoder: FeatureEncoder, sites: dict[str, SiteData],
                      s: BaselineSettings) -> dict[str, dict[str, dict]]:
    """Summaries per site of one model's predictions on each site's test split."""
    result = {}
    for name, parts in site_splits(sites, s).items():
        test = encode(encoder, parts["test"])
        result[name] = summaries(encoder, test, predict(test.x))
    return result


def pooled_model(sites: dict[str, SiteData], privacy: Privacy | None,
                 s: BaselineSettings) -> tuple[MultiTaskMLP, FeatureEncoder]:
    """One model on all sites' training rows, with the encoder of the summed statistics (as federated)."""
    encoder, train_rows = pooled_training_rows(sites, s)
    return fit_model(encoder, train_rows, privacy, s), encoder


Fit = Callable[[str, FeatureEncoder, pd.DataFrame], Callable[[np.ndarray], dict[str, np.ndarray]]]


def local_summaries(sites: dict[str, SiteData], s: BaselineSettings, fit: Fit,
                    keep: dict | None = None) -> dict[str, dict[str, dict]]:
    """Summaries per site of each site's own model on its own test split: ``fit(site, encoder, train_rows)``
    returns a predictor; the encoder is fit on the site's training rows alone. ``keep``, if given, receives
    each site's ``(encoder, predictor)`` (the local-only dosing policies reuse them)."""
    result = {}
    for name, parts in site_splits(sites, s).items():
        encoder = fit_local(parts["train"], s.task)
        test = encode(encoder, parts["test"])
        predictor = fit(name, encoder, parts["train"])
        result[name] = summaries(encoder, test, predictor(test.x))
        if keep is not None:
            keep[name] = (encoder, predictor)
    return result


def local_only(sites: dict[str, SiteData], privacy: dict[str, Privacy | None],
               s: BaselineSettings, keep: dict | None = None) -> dict[str, dict[str, dict]]:
    """Summaries per site and outcome of each site's own ANN on its own test split."""
    return local_summaries(sites, s, lambda name, encoder, rows: partial(
        predict, fit_model(encoder, rows, privacy[name], s)), keep)


def pooled(sites: dict[str, SiteData], privacy: Privacy | None, s: BaselineSettings) -> dict[str, dict[str, dict]]:
    """Summaries per site and outcome of one model trained on all sites' training rows."""
    model, encoder = pooled_model(sites, privacy, s)
    return evaluate_per_site(partial(predict, model), encoder, sites, s)


def local_boosting(sites: dict[str, SiteData], s: BaselineSettings, config: BoostingConfig,
                   rounds: int, keep: dict | None = None) -> dict[str, dict[str, dict]]:
    """Summaries per site of each site's own boosters (same heads and parameters as federated)."""

    def fit(name: str, encoder: FeatureEncoder, rows: pd.DataFrame):
        data = encode(encoder, rows)
        return partial(predict_heads, train_pooled_heads(encoder, data.x, data.targets, config, rounds), encoder)

    return local_summaries(sites, s, fit, keep)


def pooled_boosters(sites: dict[str, SiteData], s: BaselineSettings, config: BoostingConfig,
                    rounds: int) -> tuple[dict[str, bytes], FeatureEncoder]:
    """Boosters (one per head) trained on all sites' training rows, and their encoder."""
    encoder, rows = pooled_training_rows(sites, s)
    train_data = encode(encoder, rows)
    return train_pooled_heads(encoder, train_data.x, train_data.targets, config, rounds), encoder


def model_metrics(task: TaskSpec, per_site: dict[str, dict[str, dict]]) -> dict:
    """``{"overall": {outcome: metrics}, "per_site": {site: {outcome: metrics}}}`` from summaries;
    overall is computed from the sum of the sites' summaries (the union of their test sets)."""
    kinds = {o.name: o.kind for o in task.outcomes}
    overall = {name: metrics.json_safe(metrics.metrics(kind, metrics.combine([s[name] for s in per_site.values()])))
               for name, kind in kinds.items()}
    return {"overall": overall,
            "per_site": {site: {name: metrics.json_safe(metrics.metrics(kinds[name], summary))
                                for name, summary in outcomes.items()} for site, outcomes in per_site.items()}}
