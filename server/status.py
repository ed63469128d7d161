"""The coordinator's view of a federation (``fednano status``): runs, rounds, per-site participation, ε spent.

Two sources, each the authority on its part:

- **Flower's own CLI** for the runs the SuperLink knows: ``flwr ls <federation> --format json`` (run id, app,
  status, elapsed time, traffic), run with the caller's ``FLWR_HOME`` so it reaches the coordinator's SuperLink
  with its TLS settings;
- **the run record** the ServerApp writes (``OUT/federation.json``, :mod:`server.run_record`) for what Flower
  does not keep: each round's per-site replies, the sites that failed and why, and the ε each site has spent.

Example
-------
>>> runs = flower_runs("hospitals")                                   # doctest: +SKIP
>>> record = read_record(Path("runs/federation"))                     # doctest: +SKIP
>>> Console().print(runs_table(runs), sites_table(record))            # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from server.run_record import PROGRESS_FILE, RECORD_FILE, RecordError, RunRecord, SitePrivacyRecord
from shared.policy_bundle import MANIFEST_FILE

FLWR_TIMEOUT_S = 60.0
HEADLINE_METRICS = ("auc", "r2")
"""Per outcome, the first of these a round's overall metrics have is shown (AUC for a class, R² otherwise)."""


class StatusError(RuntimeError):
    """A source of the status could not be read; the message names it and what was expected."""


# ---------------------------------------------------------------------------------------------------------
# Flower's runs


def flwr_executable() -> str:
    """``flwr`` of this environment (next to the interpreter), else the one on PATH."""
    beside = Path(sys.executable).parent / "flwr"
    if beside.exists():
        return str(beside)
    found = shutil.which("flwr")
    if found is None:
        raise StatusError("the Flower CLI `flwr` is not installed in this environment nor on PATH")
    return found


def flower_runs(federation: str, run_id: int | None = None, env: dict[str, str] | None = None) -> list[dict]:
    """The runs ``flwr ls FEDERATION --format json`` lists (one run with ``run_id``), newest first."""
    command = [flwr_executable(), "ls", federation, "--format", "json"]
    if run_id is not None:
        command += ["--run-id", str(run_id)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=FLWR_TIMEOUT_S, stdin=subprocess.DEVNULL,
                          env=env if env is not None else dict(os.environ))
    return parse_flower_runs(done.stdout, done.stderr, federation)


def parse_flower_runs(stdout: str, stderr: str, federation: str) -> list[dict]:
    """The ``runs`` of ``flwr ls --format json`` output; StatusError with Flower's own message on failure."""
    try:
        answer = json.loads(stdout)
    except json.JSONDecodeError as err:
        raise StatusError(f"`flwr ls {federation}` printed no JSON: {(stdout + stderr).strip()[:500]}") from err
    if not isinstance(answer, dict) or not answer.get("success", False):
        message = answer.get("error-message") if isinstance(answer, dict) else None
        raise StatusError(f"`flwr ls {federation}` failed: {message or (stdout + stderr).strip()[:500]} "
                          f"(is FLWR_HOME the coordinator folder whose config.toml names '{federation}'?)")
    runs = answer.get("runs")
    if not isinstance(runs, list):
        raise StatusError(f"`flwr ls {federation}`: expected a list under 'runs', got {type(runs).__name__}")
    return sorted(runs, key=lambda run: str(run.get("pending-at", "")), reverse=True)


def runs_table(runs: list[dict], federation: str) -> Table:
    """One row per run: id, app, status, elapsed time, when it ran, traffic."""
    table = Table(title=f"runs of {federation} (flwr ls)")
    for column in ("run", "app", "status", "elapsed", "started", "finished", "traffic"):
        table.add_column(column, justify="right" if column in ("elapsed", "traffic") else "left")
    for run in runs:
        traffic = run.get("network-traffic", {}).get("total-bytes")
        table.add_row(str(run.get("run-id")), f"{run.get('fab-name', '?')}=={run.get('fab-version', '?')}",
                      str(run.get("status")), _seconds(run.get("elapsed")), str(run.get("running-at") or "–"),
                      str(run.get("finished-at") or "–"), "–" if traffic is None else f"{traffic / 1e3:.0f} kB")
    return table


def _seconds(value) -> str:
    return "–" if value is None else f"{float(value):.0f} s"


# ---------------------------------------------------------------------------------------------------------
# The run record


@dataclass(frozen=True)
class SiteParticipation:
    """One site over a run: the rounds it trained in, the rounds it failed (with why), its privacy."""

    site: str
    trained: tuple[int, ...]
    failed: dict[int, str]
    privacy: SitePrivacyRecord | None


SIMULATION_RECORD_FOLDER = "federated"
"""Where ``fednano simulate`` keeps its federated run's record inside its output folder."""


def record_file(path: Path) -> Path:
    """Where the run record of ``path`` is: ``path`` itself if a file, else the out-dir's ``federation.json`` or a
    ``fednano simulate`` output folder's ``federated/federation.json`` (the first that exists; the out-dir's if
    neither does, so the error names the file a deployed run would have written)."""
    path = Path(path)
    if not path.is_dir():
        return path
    candidates = _in_run_folders(path, RECORD_FILE)
    return next((c for c in candidates if c.is_file()), candidates[0])


def progress_file(path: Path) -> Path | None:
    """The coordinator's progress record (:data:`server.run_record.PROGRESS_FILE`) of the out-dir or simulation
    folder ``path``, if one exists: the run is training and has not written its record yet."""
    return next((c for c in _in_run_folders(Path(path), PROGRESS_FILE) if c.is_file()), None)


def _in_run_folders(path: Path, name: str) -> list[Path]:
    """``name`` in a deployed run's out-dir ``path``, then in a simulation output folder's record folder."""
    return [path / name, path / SIMULATION_RECORD_FOLDER / name]


def read_record(path: Path) -> RunRecord:
    """The run record at ``path`` (:func:`record_file`); :class:`StatusError` naming the file otherwise."""
    try:
        return RunRecord.read(record_file(path))
    except RecordError as err:
        raise StatusError(str(err)) from err


def training_rounds(record: RunRecord) -> list[dict]:
    """The rounds of the run's round-based training (the ANN's; none if the run trained boosting only)."""
    return record.models["ann"].rounds if "ann" in record.models else []


def participation(record: RunRecord) -> list[SiteParticipation]:
    """Per site of the record (usable sites first, then any other site a round names): rounds and privacy."""
    rounds = training_rounds(record)
    names = list(record.sites)
    for entry in rounds:
        names += [s for s in [*entry["per_site"], *entry.get("failures", {})] if s not in names]
    result = []
    for site in names:
        trained = tuple(e["round"] for e in rounds if "train" in e["per_site"].get(site, {}))
        failed = {e["round"]: str(e["failures"][site]) for e in rounds if site in e.get("failures", {})}
        result.append(SiteParticipation(site, trained, failed, record.privacy.get(site)))
    return result


def weighted_train_loss(entry: dict) -> float | None:
    """The round's training loss averaged over the sites that report one (not DP sites: a mean loss over their
    rows is not a DP release), weighted by their examples (as FedAvg weighs them)."""
    pairs = [(s["train"]["train-loss"], s["train"]["num-examples"]) for s in entry["per_site"].values()
             if "train-loss" in s.get("train", {}) and s["train"].get("num-examples")]
    total = sum(n for _, n in pairs)
    return sum(loss * n for loss, n in pairs) / total if total else None


def headline_metric(values: dict) -> str | None:
    """The metric shown for one outcome's metrics: the first of :data:`HEADLINE_METRICS` it has as a number."""
    return next((m for m in HEADLINE_METRICS if isinstance(values.get(m), int | float)
                 and not isinstance(values.get(m), bool)), None)


def headline(overall: dict) -> str:
    """``outcome metric value`` for each outcome of a round's overall metrics."""
    parts = []
    for outcome, values in overall.items():
        metric = headline_metric(values)
        if metric is not None:
            parts.append(f"{outcome} {metric} {values[metric]:.3f}")
    return ", ".join(parts) or "–"


@dataclass(frozen=True)
class RoundSummary:
    """One training round: the sites that trained, those that failed and why, the loss, the overall metrics."""

    round: int
    trained: tuple[str, ...]
    failed: dict[str, str]
    train_loss: float | None
    overall: dict


def round_summaries(record: RunRecord) -> list[RoundSummary]:
    """One :class:`RoundSummary` per round of the run's round-based training (what ``fednano status`` and the
    dashboard show)."""
    return [RoundSummary(round=entry["round"],
                         trained=tuple(site for site, s in entry["per_site"].items() if "train" in s),
                         failed={site: str(reason) for site, reason in entry.get("failures", {}).items()},
                         train_loss=weighted_train_loss(entry), overall=entry.get("overall", {}))
            for entry in training_rounds(record)]


def rounds_table(record: RunRecord, title: str) -> Table:
    """One row per round: sites that trained, sites that failed and why, loss, overall metrics."""
    table = Table(title=title)
    for column in ("round", "trained", "failed", "train loss", "overall (test sets evaluated)"):
        table.add_column(column, justify="right" if column in ("round", "trained", "train loss") else "left")
    n_sites = len(record.sites)
    for entry in round_summaries(record):
        failures = "; ".join(f"{site}: {short_reason(reason)}" for site, reason in entry.failed.items())
        table.add_row(str(entry.round), f"{len(entry.trained)}/{n_sites}", failures or "–",
                      "–" if entry.train_loss is None else f"{entry.train_loss:.4f}", headline(entry.overall))
    return table


def sites_table(record: RunRecord, title: str) -> Table:
    """One row per site: rounds trained, rounds failed, ε spent of its budget at δ, ε per phase."""
    table = Table(title=title)
    for column in ("site", "trained rounds", "failed rounds", "ε spent", "ε budget", "δ", "ε per phase"):
        table.add_column(column, justify="left" if column in ("site", "failed rounds", "ε per phase") else "right")
    n_rounds = len(training_rounds(record))
    for site in participation(record):
        failed = ", ".join(f"{r} ({short_reason(reason)})" for r, reason in site.failed.items())
        p = site.privacy
        dp = p is not None and p.dp
        phases = "; ".join(f"{phase} {eps:.2f}" for phase, eps in p.epsilon_after.items()) if dp else ""
        refused = "; ".join(f"refuses {phase}" for phase in p.refused) if dp else ""
        table.add_row(site.site, f"{len(site.trained)}/{n_rounds}", f"failed: {failed}" if failed else "–",
                      f"{p.epsilon_spent:.2f}" if dp else "no DP", f"{p.epsilon_budget:g}" if dp else "–",
                      f"{p.delta:g}" if dp else "–", "; ".join(x for x in (phases, refused) if x) or "–")
    return table


@dataclass
class CentralDPSummary:
    """Central DP of a run's ANN as the record says so far (``RunRecord.central_dp``)."""

    mechanism: str
    clip_norm: float
    """The bound of the last round released (adaptive: it moves each round); the one set before any round."""
    noise_multiplier: float
    epsilon: float | None
    """ε of the rounds released so far at ``delta`` (None: no noise, no guarantee)."""
    delta: float
    rounds: int
    accountant: str


def central_dp_summary(record: RunRecord) -> CentralDPSummary | None:
    """The run's central DP (mode, current clip norm, noise multiplier, ε (δ) so far), or None without it."""
    central = record.central_dp
    if central is None:
        return None
    rounds = sorted(central.per_round, key=int)
    clip = float(central.per_round[rounds[-1]]["clip_norm"]) if rounds else float(central.clip)
    return CentralDPSummary(mechanism=central.mechanism, clip_norm=clip,
                            noise_multiplier=float(central.noise_multiplier),
                            epsilon=None if central.epsilon is None else float(central.epsilon),
                            delta=float(central.delta), rounds=int(central.rounds), accountant=central.accountant)


def central_dp_table(record: RunRecord, title: str) -> Table | None:
    """One row: central DP's mode, clip norm, noise multiplier and ε (δ) spent so far; None for a run without it."""
    summary = central_dp_summary(record)
    if summary is None:
        return None
    table = Table(title=title)
    for column in ("central DP", "clip norm", "noise multiplier", "ε spent (δ)", "rounds released"):
        table.add_column(column, justify="left" if column == "central DP" else "right")
    epsilon = "∞ (no noise)" if summary.epsilon is None else f"{summary.epsilon:.3f}"
    table.add_row(summary.mechanism, f"{summary.clip_norm:.4g}", f"{summary.noise_multiplier:g}",
                  f"{epsilon} (δ={summary.delta:g}, {summary.accountant})", str(summary.rounds))
    return table


def short_reason(reason: str, limit: int = 80) -> str:
    """The first line of a reason, cut to ``limit`` characters (a Ray traceback is reduced to its error)."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    if not lines:
        return "no reason given"
    line = next((ln for ln in reversed(lines) if ": " in ln and not ln.startswith(("File ", "Traceback"))), lines[0])
    return line if len(line) <= limit else line[: limit - 1] + "…"


def rejected_lines(record: RunRecord) -> list[str]:
    """One line per site whose data the site check refused, with its first errors."""
    return [f"{site} left out: {'; '.join(errors)}" for site, errors in record.rejected.items()]


def record_run_id(record: RunRecord) -> str | None:
    """The Flower run that wrote the record: its run id, else the run id of its signed policy's manifest."""
    if record.run_id:
        return record.run_id
    policy = record.policy or {}
    manifest = Path(str(policy.get("bundle", ""))) / MANIFEST_FILE
    if policy.get("bundle") and manifest.is_file():
        return str(json.loads(manifest.read_text()).get("run_id") or "") or None
    return None
