"""The record of a federated run, one typed shape for every model family, written and read only here.

``OUT/federation.json`` (``RECORD_FILE``), format ``fednano/run-record`` version 2::

    {"format", "version", "run_id", "settings": {run-config keys},
     "sites": [usable site names], "rejected": {site: [problems]},
     "privacy": {site: SitePrivacyRecord},          # every usable site, DP or not
     "statistics": {"sites": [...], "failures": {site: reason}, "refused": {site: reason},
                    "secure_sum": off | pairwise | recovering, "bytes": {"down", "up"} (masked only)},
     "models": {"ann" | "xgboost": ModelRecord},   # only the families the run trained
     "personalisation": {...} or null,             # server.personalisation_phase (--personalise)
     "personalisation_xgboost": {...} or null,     # the same for the boosters (--personalise site-trees)
     "central_dp": CentralDPRecord or null,        # central DP of the ANN (--central-dp), its own accounting
     "policy": {...} or null,
     "refused": {phase: why},                      # phases the coordinator refused; the run ended there
     "phase_seconds": {phase: seconds}}            # the coordinator's wall clock per phase

A :class:`ModelRecord` holds the family's rounds (per round: each site's training and evaluation metrics,
failures, overall metrics from the summed summaries — the metrics of the union of the test sets, not an
average), its final metrics, the sites that failed or refused the phase and why, and its permutation
importance, and with update-norm clipping the update norms seen and the bound of each round. Sites under DP
are evaluated at the final round only (each evaluation is charged to their
budget). :class:`SitePrivacyRecord` holds what a site's DP releases cost: ε granted per phase at the site
check, releases per phase and ε spent after the last one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared import metrics
from shared.durable import write_json_atomically
from shared.metrics_bounds import check_evaluation
from shared.protocol.privacy import ReleaseFacts, SitePrivacy
from shared.sum_bounds import InfeasibleSum
from shared.task import TaskSpec

RECORD_FILE = "federation.json"
PROGRESS_FILE = "federation.progress.json"
"""While the ANN trains, the record so far (same format; rounds done so far, ε charged so far), rewritten
atomically after each round for the dashboard; removed when ``federation.json`` is written."""
FORMAT = "fednano/run-record"
VERSION = 2
TRAIN_KEYS = ("num-examples", "train-loss", "steps", "epsilon", "epsilon-budget", "delta", "noise-multiplier")


class RecordError(ValueError):
    """A file that is not a run record this version can read; names the file and the field."""


def outcome_metrics(task: TaskSpec, record: dict) -> dict[str, dict]:
    """Metrics per outcome from one (possibly summed) evaluation record of prefixed summaries."""
    return {o.name: metrics.json_safe(metrics.metrics(o.kind, metrics.from_metric_record(record, prefix=o.name)))
            for o in task.outcomes}


@dataclass
class SitePrivacyRecord:
    """One site's privacy over the run."""

    dp: bool
    epsilon_budget: float | None = None
    delta: float | None = None
    epsilon_spent_before: float | None = None
    epsilon_spent: float | None = None
    granted: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    releases: dict[str, int] = field(default_factory=dict)
    epsilon_after: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_terms(cls, terms: SitePrivacy) -> SitePrivacyRecord:
        if not terms.dp:
            return cls(dp=False)
        return cls(dp=True, epsilon_budget=terms.epsilon_budget, delta=terms.delta,
                   epsilon_spent_before=terms.epsilon_spent, epsilon_spent=terms.epsilon_spent,
                   granted=dict(terms.epsilon), refused=dict(terms.refused))

    def add_release(self, facts: ReleaseFacts) -> None:
        """Count one noised release of a phase and the ε spent after it."""
        self.releases[facts.phase] = self.releases.get(facts.phase, 0) + 1
        self.epsilon_after[facts.phase] = facts.epsilon_spent
        self.epsilon_spent = max(self.epsilon_spent or 0.0, facts.epsilon_spent)

    def add_ledger_entries(self, phase: str, count: int) -> None:
        """Count ``count`` more entries of ``phase`` in the site's ledger that came without release facts of their
        own (e.g. the DP-SGD fits of the personalisation phase; its releases come through :meth:`add_release`)."""
        self.releases[phase] = self.releases.get(phase, 0) + int(count)

    def add_training(self, epsilon: float, steps_round: bool = True) -> None:
        """Count one round of DP-SGD and the ε spent after it."""
        self.releases["training"] = self.releases.get("training", 0) + int(steps_round)
        self.epsilon_after["training"] = epsilon
        self.epsilon_spent = max(self.epsilon_spent or 0.0, epsilon)


@dataclass
class CentralDPRecord:
    """Central DP of the ANN's global models (``strategies.central_dp``, accounted by ``server.central_accounting``):
    user-level (ε, δ) of the released model sequence, a site's whole contribution being the unit. Separate from the
    sites' own DP in :class:`SitePrivacyRecord` (a row of a site against the coordinator): never added to it."""

    mechanism: str
    """``fixed`` (McMahan et al. 2018) or ``adaptive`` (Andrew et al. 2021)."""
    noise_multiplier: float
    """z as set (adaptive: of the update and count releases together)."""
    clip: float
    """C as set (adaptive: the initial norm; per round in ``per_round``)."""
    denominator: int
    """n, the sites trained each round: the average divides by it, the noise sd is z·C/n."""
    sample_rate: float
    delta: float
    accountant: str
    rounds: int
    """Rounds that released a noised average."""
    epsilon: float | None
    """ε of the whole released sequence at ``delta`` (∞, written null, when z = 0: no guarantee)."""
    per_round: dict[str, dict] = field(default_factory=dict)
    """Round → updates averaged, clip_norm, noise_sd, noise_multiplier accounted, unclipped_fraction (adaptive),
    epsilon after it."""
    update_noise_multiplier: float | None = None
    """z_Δ, the noise on the average alone (adaptive: larger than z, the count takes the rest)."""
    count_noise_sd: float | None = None
    """σ_b, the noise on the count of unclipped updates (adaptive only)."""
    adjacency: str = "add or remove one site's whole contribution (user-level DP)"
    covers: str = "the ANN's global weights after every round (every model the sites and the run release)"
    not_covered: list[str] = field(default_factory=list)
    """The run's other phases: what they release is protected only by the sites' own DP, if any."""
    local_dp_sites: list[str] = field(default_factory=list)
    """Sites that also trained under their own DP-SGD (site.toml): their ε is in ``privacy``, apart."""


@dataclass
class ModelRecord:
    """One model family's federated training: rounds, final metrics, who failed or refused, importance."""

    family: str
    mode: str
    seconds: float = 0.0
    rounds: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=lambda: {"overall": {}, "per_site": {}, "summaries": {}})
    failures: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    importance: dict = field(default_factory=dict)
    heads: list[str] = field(default_factory=list)
    secure_sum: str = ""
    """ANN: ``pairwise: why`` or ``recovering: why`` when the rounds were masked sums
    (``strategies.pairwise_masked_mean``), ``off: why`` when not; empty for other families and older records."""
    update_norms: dict = field(default_factory=dict)
    """With update-norm clipping (:mod:`strategies.update_clipping`): ``{"bound": {round: bound},
    "per_site": {round: {site: norm before clipping}}}``; empty without."""


@dataclass
class RunRecord:
    """The whole run (module docstring)."""

    run_id: str
    settings: dict[str, Any]
    sites: list[str] = field(default_factory=list)
    rejected: dict[str, list[str]] = field(default_factory=dict)
    privacy: dict[str, SitePrivacyRecord] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=dict)
    models: dict[str, ModelRecord] = field(default_factory=dict)
    policy: dict | None = None
    personalisation: dict | None = None
    personalisation_xgboost: dict | None = None
    central_dp: CentralDPRecord | None = None
    refused: dict[str, str] = field(default_factory=dict)
    """Phase → why the coordinator refused to run it (the run ended there, its record written): e.g. a robust
    strategy that cannot tolerate its assumed malicious sites with the sites that came."""
    phase_seconds: dict[str, float] = field(default_factory=dict)
    """Phase → the coordinator's wall-clock seconds in it (site check, statistics, training, ...): where a run's
    time goes as the federation grows (``benchmarks/scale.py``)."""

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the wall-clock seconds of the ``with`` block to :attr:`phase_seconds` [``phase``]."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - start

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        return metrics.json_safe({"format": FORMAT, "version": VERSION, **body})

    def write(self, folder: Path) -> Path:
        path = Path(folder) / RECORD_FILE
        write_json_atomically(path, self.to_dict())
        (Path(folder) / PROGRESS_FILE).unlink(missing_ok=True)
        return path

    def write_progress(self, folder: Path) -> Path:
        """The record so far as :data:`PROGRESS_FILE` (the run has not ended)."""
        path = Path(folder) / PROGRESS_FILE
        write_json_atomically(path, self.to_dict())
        return path

    @classmethod
    def from_dict(cls, data: Any, where: str = "run record") -> RunRecord:
        if not isinstance(data, dict):
            raise RecordError(f"{where}: expected a JSON object at the top level")
        _check_fields(data, where)
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise RecordError(f"{where}: not a {FORMAT} version {VERSION} record (format {data.get('format')!r}, "
                              f"version {data.get('version')!r})")
        try:
            return cls(
                run_id=str(data["run_id"]), settings=dict(data["settings"]), sites=list(data["sites"]),
                rejected={str(k): list(v) for k, v in data["rejected"].items()},
                privacy={str(k): SitePrivacyRecord(**v) for k, v in data["privacy"].items()},
                statistics=dict(data["statistics"]),
                models={str(k): ModelRecord(**v) for k, v in data["models"].items()}, policy=data.get("policy"),
                personalisation=data.get("personalisation"),
                personalisation_xgboost=data.get("personalisation_xgboost"),
                central_dp=CentralDPRecord(**data["central_dp"]) if data.get("central_dp") else None,
                refused={str(k): str(v) for k, v in data.get("refused", {}).items()},
                phase_seconds={str(k): float(v) for k, v in data.get("phase_seconds", {}).items()})
        except (KeyError, TypeError, AttributeError) as err:
            raise RecordError(f"{where}: a field is missing or of the wrong kind ({err})") from err

    @classmethod
    def read(cls, path: Path) -> RunRecord:
        """The record at ``path`` (``federation.json`` or the out-dir holding it); :class:`RecordError` else."""
        path = Path(path)
        file = path / RECORD_FILE if path.is_dir() else path
        if not file.is_file():
            raise RecordError(f"{file}: no run record (expected the {RECORD_FILE} a run writes into its out-dir)")
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RecordError(f"{file}: not JSON ({err})") from err
        return cls.from_dict(data, str(file))


def _check_fields(data: dict, where: str) -> None:
    """Raise :class:`RecordError` naming the first field that is missing or of the wrong kind."""

    def expect(value: Any, kind: type | tuple, field_name: str, what: str) -> None:
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            shown = type(value).__name__ if isinstance(value, dict | list) else repr(value)
            raise RecordError(f"{where}: field {field_name} expected {what}, got {shown}")

    expect(data.get("sites"), list, "'sites'", "a list")
    expect(data.get("rejected"), dict, "'rejected'", "an object")
    expect(data.get("privacy"), dict, "'privacy'", "an object")
    expect(data.get("models"), dict, "'models'", "an object")
    for site, privacy in data["privacy"].items():
        expect(privacy, dict, f"'privacy.{site}'", "an object")
        if privacy.get("dp"):
            expect(privacy.get("epsilon_spent"), int | float, f"'privacy.{site}.epsilon_spent'", "a number")
    for family, model in data["models"].items():
        expect(model, dict, f"'models.{family}'", "an object")
        expect(model.get("rounds"), list, f"'models.{family}.rounds'", "a list")
        for row, entry in enumerate(model["rounds"]):
            name = f"'models.{family}.rounds[{row}]"
            expect(entry, dict, name + "'", "an object")
            expect(entry.get("round"), int, name + ".round'", "a round number")
            expect(entry.get("per_site"), dict, name + ".per_site'", "an object")
            expect(entry.get("failures", {}), dict, name + ".failures'", "an object")


# ---------------------------------------------------------------------------------------------------------
# Building model records from a phase's replies


def add_privacy(record: RunRecord, names: dict[int, str], node: int, facts: dict | ReleaseFacts) -> None:
    """Count one DP release of ``node``'s site in the record."""
    name = names.get(node)
    if name is not None and name in record.privacy:
        record.privacy[name].add_release(facts if isinstance(facts, ReleaseFacts) else ReleaseFacts.from_record(facts))


def feasible_evaluations(task: TaskSpec, names: dict[int, str], evaluations: dict[int, dict],
                         declared: dict[int, float | None] | None) -> tuple[dict[int, dict], dict[str, str]]:
    """The sites' evaluation records whose summaries an honest site could send (``shared.metrics_bounds``, with
    its declared row count; no check without ``declared``), and the others by site name with the bound broken."""
    if declared is None:
        return dict(evaluations), {}
    kept, infeasible = {}, {}
    for node, rec in evaluations.items():
        try:
            check_evaluation("evaluation", task, rec, declared.get(node))
        except InfeasibleSum as err:
            infeasible[names.get(node, f"node {node}")] = f"left out of the overall metrics: {err}"
            continue
        kept[node] = rec
    return kept, infeasible


def model_rounds(task: TaskSpec, names: dict[int, str], rounds, record: RunRecord,
                 declared: dict[int, float | None] | None = None) -> list[dict]:
    """Per round: each site's training and evaluation metrics, failures, overall metrics; ε into ``record``.

    ``rounds`` is a :class:`strategies.per_site.SiteRounds`; ``declared`` (site → its site-check row count): a
    site whose evaluation summaries are infeasible is left out of the round's overall metrics and named in its
    ``infeasible``."""
    per_round = []
    for r in sorted(set(rounds.train) | set(rounds.evaluate) | set(rounds.failures)):
        train, evaluate = rounds.train.get(r, {}), rounds.evaluate.get(r, {})
        entry = {"round": r, "per_site": {},
                 "failures": {names.get(n, f"node {n}"): reason for n, reason in rounds.failures.get(r, {}).items()}}
        for node, name in names.items():
            site = {}
            if node in train:
                site["train"] = {k: train[node][k] for k in TRAIN_KEYS if k in train[node]}
                if "epsilon" in train[node] and name in record.privacy:
                    record.privacy[name].add_training(float(train[node]["epsilon"]))
            if node in evaluate:
                site["evaluate"] = outcome_metrics(task, evaluate[node])
            entry["per_site"][name] = site
        for node, facts in rounds.privacy.get(r, {}).items():
            add_privacy(record, names, node, facts)
        kept, infeasible = feasible_evaluations(task, names, evaluate, declared)
        if infeasible:
            entry["infeasible"] = infeasible
        if kept:
            entry["overall"] = outcome_metrics(task, metrics.combine(list(kept.values())))
        per_round.append(entry)
    return per_round


def final_metrics(task: TaskSpec, names: dict[int, str], evaluations: dict[int, dict],
                  declared: dict[int, float | None] | None = None) -> dict:
    """Overall metrics from the summed summaries, per-site metrics and the summaries themselves. With ``declared``
    (site → its site-check row count) a site whose summaries are infeasible (``shared.metrics_bounds``) is left
    out of the overall metrics and named in ``infeasible`` (its own metrics are still listed)."""
    named = {names[n]: rec for n, rec in evaluations.items() if n in names}
    kept, infeasible = feasible_evaluations(task, names, {n: r for n, r in evaluations.items() if n in names},
                                            declared)
    overall = [rec for n, rec in kept.items()]
    out = {"overall": outcome_metrics(task, metrics.combine(overall)) if overall else {},
           "per_site": {site: outcome_metrics(task, rec) for site, rec in named.items()},
           "summaries": named}
    if infeasible:
        out["infeasible"] = infeasible
    return out


def last_evaluations(rounds) -> dict[int, dict]:
    """The evaluation records of the last round that has any: every site's view of the final model."""
    return next((rounds.evaluate[r] for r in sorted(rounds.evaluate, reverse=True) if rounds.evaluate[r]), {})


def update_norm_record(names: dict[int, str], bounds: dict[int, float], norms: dict[int, dict[int, float]]) -> dict:
    """``ModelRecord.update_norms`` from a clipping strategy's per-round ``bounds`` and per-node ``norms``."""
    return {"bound": {str(r): b for r, b in sorted(bounds.items())},
            "per_site": {str(r): {names.get(n, f"node {n}"): v for n, v in per_node.items()}
                         for r, per_node in sorted(norms.items())}}
