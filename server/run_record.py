"""The record of a federated run: per round, per site and overall metrics, ε spent, failures.

Overall metrics are computed from the *sum* of the sites' evaluation summaries (``shared.metrics``), so
they are the metrics of the union of the sites' test sets, not an average of per-site metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared import metrics
from shared.task import TaskSpec

if TYPE_CHECKING:
    from server.app import RunSettings, SiteCheck
    from server.boosting_phase import BoostingOutcome
    from strategies.per_site import SiteRounds

TRAIN_KEYS = ("num-examples", "train-loss", "steps", "epsilon", "epsilon-budget", "delta", "noise-multiplier")


def outcome_metrics(task: TaskSpec, record: dict) -> dict[str, dict]:
    """Metrics per outcome from one (possibly summed) evaluation record of prefixed summaries."""
    return {o.name: metrics.json_safe(metrics.metrics(o.kind, metrics.from_metric_record(record, prefix=o.name)))
            for o in task.outcomes}


def federation_record(task: TaskSpec, sites: SiteCheck, rounds: SiteRounds, settings: RunSettings,
                      seconds: float) -> dict:
    """The JSON-safe record of the neural network's rounds: per round, final, privacy."""
    names = sites.usable
    per_round = []
    privacy: dict[str, dict] = {}
    for r in sorted(set(rounds.train) | set(rounds.evaluate)):
        train = rounds.train.get(r, {})
        evaluate = rounds.evaluate.get(r, {})
        entry = {"round": r, "per_site": {}, "failures": {names.get(n, str(n)): reason
                                                           for n, reason in rounds.failures.get(r, {}).items()}}
        for node, name in names.items():
            site = {}
            if node in train:
                site["train"] = {k: train[node][k] for k in TRAIN_KEYS if k in train[node]}
                if "epsilon" in train[node]:
                    p = privacy.setdefault(name, {"per_round": []})
                    p.update(epsilon=train[node]["epsilon"], delta=train[node]["delta"],
                             budget=train[node]["epsilon-budget"])
                    p["per_round"].append({"round": r, "epsilon": train[node]["epsilon"]})
            if node in evaluate:
                site["evaluate"] = outcome_metrics(task, evaluate[node])
            entry["per_site"][name] = site
        if evaluate:
            entry["overall"] = outcome_metrics(task, metrics.combine(list(evaluate.values())))
        per_round.append(entry)
    last_eval = next((rounds.evaluate[r] for r in sorted(rounds.evaluate, reverse=True) if rounds.evaluate[r]), {})
    return {
        "seconds": seconds,
        "rounds": per_round,
        "final": {
            "overall": outcome_metrics(task, metrics.combine(list(last_eval.values()))) if last_eval else {},
            "per_site": {names[n]: outcome_metrics(task, rec) for n, rec in last_eval.items() if n in names},
            "summaries": {names[n]: rec for n, rec in last_eval.items() if n in names},
        },
        "privacy": privacy,
    }


def boosting_record(task: TaskSpec, sites: SiteCheck, boosted: BoostingOutcome, mode: str) -> dict:
    """The JSON-safe record of the boosting phase: final metrics overall and per site, failures."""
    names = sites.usable
    evaluations = {names[n]: rec for n, rec in boosted.evaluations.items() if n in names}
    return {
        "mode": mode,
        "seconds": boosted.seconds,
        "heads": sorted(boosted.models),
        "failures": {names.get(n, str(n)): reason for n, reason in boosted.failures.items()},
        "final": {
            "overall": outcome_metrics(task, metrics.combine(list(evaluations.values()))) if evaluations else {},
            "per_site": {site: outcome_metrics(task, rec) for site, rec in evaluations.items()},
            "summaries": evaluations,
        },
    }
