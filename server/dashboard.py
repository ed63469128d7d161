"""The coordinator's federation dashboard (``fednano dashboard RUNS_DIR``): every run under a folder, in a browser.

``fednano status --record`` prints one run's rounds and sites in a terminal; this page shows every run found
under ``RUNS_DIR`` — ``fednano simulate`` output folders and deployed runs' out-dirs — with, per run: rounds
completed of planned, which site trained or failed in each round and why, the overall and per-site metric
curves, ε spent against each site's budget, and the policy versions with their release-gate figures and which
site installed them. A run still going on is refreshed by a small script polling ``/api/state`` (nothing else
on the page runs script).

Where each fact comes from (the same readers as ``fednano status``, :mod:`server.status`):

- the run record ``federation.json`` (:mod:`server.run_record`): rounds, sites, failures, privacy, policy;
- ``results.json`` of a simulation: the experiment finished (it is written last, after the baselines);
- ``deployment/federation-<period>.json`` of a simulation's closed loop: the later policy versions.

The ServerApp writes its record once, at the end of the federated run, so a run in progress shows that it is
running and how long since it last wrote a file, not its rounds so far.

Read-only: the dashboard starts nothing, writes nothing and serves nothing from the runs but what the records
hold (never a site's data). A record that cannot be read — not JSON, half written, of another version, a field
of the wrong kind — is shown on its run's card as a message, never as an HTTP 500.

Example
-------
>>> app = make_dashboard(Path("runs"))                                # doctest: +SKIP
>>> uvicorn.run(app, host="127.0.0.1", port=8050)                     # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from server.run_record import PROGRESS_FILE, RECORD_FILE, RecordError, RunRecord
from server.status import (
    SIMULATION_RECORD_FOLDER,
    CentralDPSummary,
    StatusError,
    central_dp_summary,
    headline_metric,
    participation,
    progress_file,
    read_record,
    record_file,
    record_run_id,
    round_summaries,
    short_reason,
)
from shared.web import STATIC_DIR
from shared.web.access import TLSFiles, check_binding, protect, uvicorn_tls_kwargs
from shared.web.svg import Series, line_chart

TEMPLATES_DIR = Path(__file__).parent / "templates"
RESULTS_FILE = "results.json"
DEPLOYMENT_FOLDER = "deployment"
MAX_DEPTH = 3
"""How deep under RUNS_DIR runs are looked for (``runs/<experiment>/<seed>/`` is found)."""
NOT_RUN_FOLDERS = frozenset({"sites", "kit", "policy", "candidate", SIMULATION_RECORD_FOLDER, DEPLOYMENT_FOLDER})
"""Folders that are parts of a run, never runs themselves (and may hold a site's data: never searched)."""
REFRESH_SECONDS = 5.0
"""How often a page of a run in progress asks whether anything changed."""
STALE_AFTER_S = 3600.0
"""A simulation folder without a record and no file written for this long is taken to have stopped."""
ACTIVITY_SCAN_LIMIT = 2000
"""At most this many entries are looked at for a run's last write (a refresh stays cheap on big folders)."""

FINISHED, RUNNING, STOPPED, UNREADABLE = "finished", "running", "stopped", "unreadable"


# ---------------------------------------------------------------------------------------------------------
# Finding runs


@dataclass(frozen=True)
class RunFolder:
    """A run found under RUNS_DIR: its key in the dashboard's addresses, its folder and what wrote it."""

    key: str
    path: Path
    kind: str  # "simulation" (fednano simulate's output folder) | "deployed" (a ServerApp's out-dir)


def run_kind(folder: Path) -> str | None:
    """``simulation``, ``deployed`` or None (not a run folder)."""
    if (folder / RESULTS_FILE).is_file() or (folder / SIMULATION_RECORD_FOLDER).is_dir() \
            or ((folder / "sites").is_dir() and (folder / "kit").is_dir()):
        return "simulation"
    if (folder / RECORD_FILE).is_file() or (folder / PROGRESS_FILE).is_file():
        return "deployed"
    return None


def find_runs(runs_dir: Path) -> list[RunFolder]:
    """Every run folder under ``runs_dir`` (itself included), at most :data:`MAX_DEPTH` levels down, by key."""
    runs_dir = Path(runs_dir)
    kind = run_kind(runs_dir)
    if kind is not None:
        return [RunFolder(runs_dir.resolve().name or "run", runs_dir, kind)]
    found, stack = [], [(runs_dir, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            children = sorted((e for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")),
                              key=lambda e: e.name)
        except OSError:
            continue
        for entry in children:
            path = Path(entry.path)
            kind = run_kind(path)
            if kind is not None:
                found.append(RunFolder(path.relative_to(runs_dir).as_posix(), path, kind))
            elif depth + 1 < MAX_DEPTH and entry.name not in NOT_RUN_FOLDERS:
                stack.append((path, depth + 1))
    return sorted(found, key=lambda run: run.key)


# ---------------------------------------------------------------------------------------------------------
# A run's state (what the refresh asks for: cheap, no record parsed)


@dataclass(frozen=True)
class RunState:
    """Whether a run is finished, running or stopped; ``fingerprint`` changes whenever a file it shows does."""

    state: str
    detail: str
    live: bool
    fingerprint: str


def _stat(path: Path) -> str:
    try:
        s = path.stat()
    except OSError:
        return f"{path.name}:-"
    return f"{path.name}:{s.st_mtime_ns}:{s.st_size}"


def deployment_records(run: RunFolder) -> list[Path]:
    """A simulation's closed-loop records (``deployment/federation-<period>.json``), by period."""
    folder = run.path / DEPLOYMENT_FOLDER
    if run.kind != "simulation" or not folder.is_dir():
        return []

    def period(path: Path) -> tuple[int, str]:
        tail = path.stem.removeprefix("federation-")
        return (int(tail), "") if tail.isdigit() else (10**9, tail)

    return sorted(folder.glob("federation-*.json"), key=period)


def last_write(folder: Path) -> float | None:
    """The newest modification time among the run folder's files (breadth first, capped), or None."""
    newest, seen, queue = None, 0, [folder]
    while queue and seen < ACTIVITY_SCAN_LIMIT:
        try:
            entries = list(os.scandir(queue.pop(0)))
        except OSError:
            continue
        for entry in entries:
            seen += 1
            try:
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                continue
            newest = mtime if newest is None else max(newest, mtime)
            if entry.is_dir(follow_symlinks=False):
                queue.append(Path(entry.path))
    return newest


def ago(seconds: float) -> str:
    """``42 s``, ``3 min``, ``2.5 h`` ago."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run_state(run: RunFolder, now: float | None = None) -> RunState:
    """The run's state from which files exist (no record is parsed: this is what each refresh costs)."""
    now = time.time() if now is None else now
    record, results, progress = record_file(run.path), run.path / RESULTS_FILE, progress_file(run.path)
    files = [record, results, *deployment_records(run), *([progress] if progress else [])]
    fingerprint = hashlib.sha1("|".join(_stat(f) for f in files).encode()).hexdigest()[:16]
    if results.is_file() or (run.kind == "deployed" and record.is_file()):
        return RunState(FINISHED, "finished", False, fingerprint)
    if progress is not None and not record.is_file():
        since = now - progress.stat().st_mtime
        if since > STALE_AFTER_S:
            return RunState(STOPPED, f"training stopped: its progress record was last written {ago(since)} ago",
                            False, fingerprint)
        return RunState(RUNNING, f"training: the coordinator's progress record ({PROGRESS_FILE}) was written "
                                 f"{ago(since)} ago", True, fingerprint)
    if record.is_file():
        return RunState(RUNNING, "the federated run has finished; the experiment is still evaluating its models "
                                 "(results.json not written yet)", True, fingerprint)
    written = last_write(run.path)
    since = now - written if written is not None else math.inf
    if since > STALE_AFTER_S:
        return RunState(STOPPED, f"no run record, and nothing written for {ago(since)}: the run stopped before "
                                 "its end", False, fingerprint)
    return RunState(RUNNING, f"in progress: no run record yet (the coordinator writes {PROGRESS_FILE} after each "
                             f"training round, {RECORD_FILE} when the federated run ends); last file written "
                             f"{ago(since)} ago", True,
                    fingerprint + f":{int(written or 0)}")


# ---------------------------------------------------------------------------------------------------------
# A run's view: what its page shows, built from the record (every value checked here, not in the template)


@dataclass
class SiteRow:
    """One site over the run."""

    site: str
    trained: list[int]
    failed: dict[int, str]
    dp: bool
    epsilon_spent: float | None = None
    epsilon_budget: float | None = None
    delta: float | None = None
    epsilon_per_phase: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    policy: str = "–"


@dataclass
class RoundRow:
    """One training round: each site's part in it (``trained`` | ``failed: why`` | ``–``), loss, metrics."""

    round: int
    cells: dict[str, str]
    trained: int
    failed: dict[str, str]
    train_loss: float | None
    overall: dict[str, tuple[str, float]]  # outcome -> (metric, value)


@dataclass
class PolicyRow:
    """One policy version a run built: the gate's figures and, per site, its verdict and what it installed."""

    source: str
    version: int | None
    shipped: bool
    policy_model: str
    gate_passed: bool | None
    gate_reason: str
    gate_estimate: float | None
    gate_lower: float | None
    gate_upper: float | None
    gate_n: float | None
    sites: dict[str, dict[str, Any]]  # site -> {"gate": "estimate [lower, upper]" | "–", "worse": bool, "install": str}


@dataclass
class RunView:
    """Everything a run's card and page show."""

    key: str
    kind: str
    state: str
    detail: str
    live: bool
    fingerprint: str
    messages: list[str] = field(default_factory=list)
    run_id: str | None = None
    strategy: str | None = None
    rounds_planned: int | None = None
    rounds_done: int | None = None
    site_names: list[str] = field(default_factory=list)
    sites: list[SiteRow] = field(default_factory=list)
    rejected: dict[str, list[str]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # phase -> why the coordinator refused it (run ended)
    rounds: list[RoundRow] = field(default_factory=list)
    final: dict[str, dict[str, tuple[str, float]]] = field(default_factory=dict)  # family -> outcome -> metric
    policies: list[PolicyRow] = field(default_factory=list)
    charts: list[str] = field(default_factory=list)  # inline SVG (escaped by shared.web.svg)
    central_dp: CentralDPSummary | None = None  # central DP of the ANN: mode, clip norm, z, ε (δ) so far

    @property
    def has_record(self) -> bool:
        return self.run_id is not None

    def to_json(self) -> dict:
        """The view as JSON (charts left out): what ``/api/runs/<key>`` answers."""
        body = asdict(self)
        body.pop("charts")
        return body


def number(value: Any) -> float | None:
    """A finite number as float, else None (a record's value is never trusted to be one)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def headlines(metrics_by_outcome: Any) -> dict[str, tuple[str, float]]:
    """Outcome → (headline metric, value) for the outcomes that have one (AUC for a class, R² otherwise)."""
    result = {}
    for outcome, values in (metrics_by_outcome or {}).items():
        if not isinstance(values, dict):
            continue
        metric = headline_metric(values)
        if metric is not None and number(values[metric]) is not None:
            result[str(outcome)] = (metric, float(values[metric]))
    return result


def site_rows(record: RunRecord) -> list[SiteRow]:
    """One row per site (usable sites, then any other a round names), as ``fednano status`` counts them."""
    rows = []
    for part in participation(record):
        p = part.privacy
        row = SiteRow(site=part.site, trained=list(part.trained),
                      failed={r: short_reason(why) for r, why in part.failed.items()}, dp=bool(p is not None and p.dp))
        if row.dp:
            row.epsilon_spent, row.epsilon_budget = number(p.epsilon_spent), number(p.epsilon_budget)
            row.delta = number(p.delta)
            row.epsilon_per_phase = {str(k): float(v) for k, v in p.epsilon_after.items() if number(v) is not None}
            row.refused = {str(k): short_reason(str(v)) for k, v in p.refused.items()}
        rows.append(row)
    return rows


def round_rows(record: RunRecord, names: list[str]) -> list[RoundRow]:
    """One row per training round with every site's cell."""
    rows = []
    for summary in round_summaries(record):
        cells = {site: ("trained" if site in summary.trained
                        else f"failed: {short_reason(summary.failed[site])}" if site in summary.failed else "–")
                 for site in names}
        rows.append(RoundRow(round=summary.round, cells=cells, trained=len(summary.trained),
                             failed={s: short_reason(why) for s, why in summary.failed.items()},
                             train_loss=number(summary.train_loss), overall=headlines(summary.overall)))
    return rows


def install_status(entry: Any) -> str:
    """``installed v3`` or ``not installed: why`` from a policy entry's ``sites.<site>``."""
    if not isinstance(entry, dict):
        return "–"
    if entry.get("installed"):
        return f"installed v{entry.get('version', '?')}"
    return f"not installed: {short_reason(str(entry.get('reason', 'no reason given')))}"


def policy_row(policy: Any, source: str, names: list[str]) -> PolicyRow:
    """A run record's ``policy`` entry as a row (``ValueError`` if it is not an object)."""
    if not isinstance(policy, dict):
        raise ValueError(f"{source}: the policy entry is not an object")
    gate = policy.get("gate") if isinstance(policy.get("gate"), dict) else {}
    per_site = gate.get("per_site") if isinstance(gate.get("per_site"), dict) else {}
    installs = policy.get("sites") if isinstance(policy.get("sites"), dict) else {}
    sites = {}
    for site in [*names, *(s for s in [*per_site, *installs] if s not in names)]:
        verdict = per_site.get(site) if isinstance(per_site.get(site), dict) else {}
        est, lo, hi = (number(verdict.get(k)) for k in ("estimate", "lower", "upper"))
        interval = "" if lo is None or hi is None else f" [{lo:+.3f}, {hi:+.3f}]"
        figures = "–" if est is None else f"{est:+.3f}{interval}"
        install = install_status(installs.get(site)) if policy.get("shipped") else "kept its version (not shipped)"
        sites[str(site)] = {"gate": figures, "worse": bool(verdict.get("worse")), "install": install}
    version = policy.get("version")
    return PolicyRow(source=source, version=version if isinstance(version, int) and not isinstance(version, bool)
                     else None, shipped=bool(policy.get("shipped")),
                     policy_model=str(policy.get("policy_model", "ensemble")),
                     gate_passed=gate.get("passed") if isinstance(gate.get("passed"), bool) else None,
                     gate_reason=str(gate.get("reason", "no gate recorded")),
                     gate_estimate=number(gate.get("estimate")), gate_lower=number(gate.get("lower")),
                     gate_upper=number(gate.get("upper")), gate_n=number(gate.get("n")), sites=sites)


def metric_charts(record: RunRecord, names: list[str]) -> list[str]:
    """Per outcome: its headline metric per round, overall (the union of the test sets) and per site."""
    rounds = record.models["ann"].rounds if "ann" in record.models else []
    xs = [e["round"] for e in rounds]
    outcomes: dict[str, str] = {}
    for entry in rounds:
        for outcome, (metric, _) in headlines(entry.get("overall")).items():
            outcomes.setdefault(outcome, metric)
    charts = []
    for outcome, metric in outcomes.items():
        def value(metrics: Any, outcome=outcome, metric=metric) -> float | None:
            values = metrics.get(outcome) if isinstance(metrics, dict) else None
            return number(values.get(metric)) if isinstance(values, dict) else None

        series = [Series("overall", xs, [value(e.get("overall")) for e in rounds])]
        for site in names:
            ys = [value((e["per_site"].get(site) or {}).get("evaluate")) for e in rounds]
            if any(y is not None for y in ys):
                series.append(Series(site, xs, ys))
        charts.append(line_chart(series, title=f"{outcome}: {metric} per round", x_label="round", y_label=metric,
                                 y_range=(0.0, 1.0) if metric == "auc" else None))
    return charts


def epsilon_chart(record: RunRecord, sites: list[SiteRow]) -> str | None:
    """ε spent after each training round per DP site, with each budget as a flat line."""
    rounds = record.models["ann"].rounds if "ann" in record.models else []
    dp_sites = [s for s in sites if s.dp]
    if not rounds or not dp_sites:
        return None
    xs = [e["round"] for e in rounds]
    series = []
    for site in dp_sites:
        ys = [number(((e["per_site"].get(site.site) or {}).get("train") or {}).get("epsilon")) for e in rounds]
        series.append(Series(site.site, xs, ys))
    budgets = sorted({s.epsilon_budget for s in dp_sites if s.epsilon_budget is not None})
    for budget in budgets:
        series.append(Series(f"budget ε = {budget:g}", [xs[0], xs[-1]], [budget, budget]))
    top = max([*budgets, *(y for s in series for y in s.y if y is not None)], default=0.0)
    return line_chart(series, title="ε spent by DP-SGD after each round (budget: flat line)", x_label="round",
                      y_label="ε", y_range=(0.0, top * 1.05) if top > 0 else None)


def fill_from_record(view: RunView, record: RunRecord) -> None:
    """Everything the record says, into ``view`` (raises on a record whose fields are of the wrong kind)."""
    view.run_id = shown_run_id(record)
    settings = record.settings
    view.strategy = str(settings.get("strategy")) if settings.get("strategy") else None
    planned = settings.get("num-server-rounds")
    view.rounds_planned = planned if isinstance(planned, int) and not isinstance(planned, bool) else None
    view.sites = site_rows(record)
    view.site_names = [s.site for s in view.sites]
    view.rejected = {str(k): [str(e) for e in v] for k, v in record.rejected.items()}
    view.refused = {str(k): str(v) for k, v in record.refused.items()}
    view.rounds = round_rows(record, view.site_names)
    view.central_dp = central_dp_summary(record)
    view.rounds_done = len(view.rounds) if "ann" in record.models else None
    view.final = {family: headlines(model.final.get("overall") if isinstance(model.final, dict) else None)
                  for family, model in record.models.items()}
    charts = metric_charts(record, view.site_names)
    eps = epsilon_chart(record, view.sites)
    view.charts = ([eps] if eps else []) + charts
    if record.policy is not None:
        view.policies.append(policy_row(record.policy, "this run", view.site_names))


def shown_run_id(record: RunRecord) -> str:
    """The record's run id, else its policy manifest's; ``not recorded`` if neither can be read."""
    try:
        return record_run_id(record) or "not recorded"
    except (OSError, ValueError, AttributeError):
        return "not recorded"


READ_ERRORS = (StatusError, RecordError, ValueError, TypeError, KeyError, AttributeError, IndexError, OSError)
"""What a malformed record can raise while its view is built: each becomes a message on the run's card."""


def add_deployment_policies(view: RunView, run: RunFolder) -> None:
    """The closed loop's later policy versions, one row per readable record (a message per unreadable one)."""
    for path in deployment_records(run):
        label = f"{DEPLOYMENT_FOLDER}/{path.name}"
        try:
            record = RunRecord.read(path)
            if record.policy is not None:
                view.policies.append(policy_row(record.policy, f"closed loop, {label}", view.site_names))
        except READ_ERRORS as err:
            view.messages.append(f"{label} could not be read: {short_reason(str(err), 300)}")


def results_message(run: RunFolder) -> str | None:
    """A message if the simulation's ``results.json`` exists but is not a JSON object."""
    path = run.path / RESULTS_FILE
    if run.kind != "simulation" or not path.is_file():
        return None
    try:
        if isinstance(json.loads(path.read_text()), dict):
            return None
        problem = "not a JSON object"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problem = str(err)
    return f"{RESULTS_FILE} could not be read ({short_reason(problem, 200)}); if the run is writing it, this page " \
           "refreshes when it is done"


def load_run(run: RunFolder, now: float | None = None) -> RunView:
    """The view of one run; whatever is wrong with its files becomes a message on it, never an exception."""
    state = run_state(run, now)
    view = RunView(key=run.key, kind=run.kind, state=state.state, detail=state.detail, live=state.live,
                   fingerprint=state.fingerprint)
    problem = results_message(run)
    if problem:
        view.messages.append(problem)
        view.state, view.detail = UNREADABLE, "its results could not be read"
    progress = progress_file(run.path)
    finished = record_file(run.path).is_file()
    if not finished and progress is None:
        return view
    try:
        fill_from_record(view, read_record(run.path) if finished else RunRecord.read(progress))
    except READ_ERRORS as err:
        view.messages.append(f"the run record could not be shown: {short_reason(str(err), 300)}")
        view.state, view.detail, view.run_id = UNREADABLE, "its run record could not be read", None
        view.sites, view.rounds, view.charts, view.policies = [], [], [], []
        return view
    add_deployment_policies(view, run)
    return view


# ---------------------------------------------------------------------------------------------------------
# The app


def overall_fingerprint(states: list[tuple[RunFolder, RunState]]) -> str:
    joined = "|".join(f"{run.key}={state.fingerprint}" for run, state in states)
    return hashlib.sha1(joined.encode()).hexdigest()[:16]


def make_dashboard(runs_dir: Path, refresh_seconds: float = REFRESH_SECONDS) -> FastAPI:
    """The dashboard's FastAPI app over ``runs_dir`` (read on every request: new runs appear by themselves).

    Routes: ``/`` every run's card; ``/runs/<key>`` one run; ``/api/state[?run=<key>]`` the refresh's answer
    (states and a fingerprint that changes when a shown file does); ``/api/runs/<key>`` one run's view as JSON;
    ``/static`` the shared stylesheet.
    """
    runs_dir = Path(runs_dir)
    app = FastAPI(title="fednano dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    refresh_ms = int(refresh_seconds * 1000)

    def lookup(key: str) -> RunFolder | None:
        return next((run for run in find_runs(runs_dir) if run.key == key), None)

    def not_found(request: Request, key: str) -> HTMLResponse:
        return templates.TemplateResponse(request, "dashboard_missing.html",
                                          {"key": key, "runs_dir": str(runs_dir)}, status_code=404)

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request) -> HTMLResponse:
        runs = find_runs(runs_dir)
        views = [load_run(run) for run in runs]
        return templates.TemplateResponse(request, "dashboard_index.html", {
            "views": views, "runs_dir": str(runs_dir), "live": any(v.live for v in views),
            "fingerprint": overall_fingerprint([(run, run_state(run)) for run in runs]),
            "state_query": "", "refresh_ms": refresh_ms})

    @app.get("/runs/{key:path}", response_class=HTMLResponse)
    def run_page(request: Request, key: str) -> HTMLResponse:
        run = lookup(key)
        if run is None:
            return not_found(request, key)
        view = load_run(run)
        return templates.TemplateResponse(request, "dashboard_run.html", {
            "view": view, "runs_dir": str(runs_dir), "live": view.live,
            "fingerprint": overall_fingerprint([(run, run_state(run))]), "state_query": f"?run={key}",
            "refresh_ms": refresh_ms})

    @app.get("/api/state")
    def state(run: str | None = None) -> JSONResponse:
        runs = find_runs(runs_dir)
        if run is not None:
            runs = [r for r in runs if r.key == run]
            if not runs:
                return JSONResponse({"error": f"no run {run!r} under the dashboard's folder"}, status_code=404)
        states = [(r, run_state(r)) for r in runs]
        return JSONResponse({"fingerprint": overall_fingerprint(states),
                             "runs": [{"key": r.key, "kind": r.kind, **asdict(s)} for r, s in states]})

    @app.get("/api/runs/{key:path}")
    def run_json(key: str) -> JSONResponse:
        run = lookup(key)
        if run is None:
            return JSONResponse({"error": f"no run {key!r} under the dashboard's folder"}, status_code=404)
        return JSONResponse(load_run(run).to_json())

    return app


def serve_dashboard(runs_dir: Path, host: str = "127.0.0.1", port: int = 8050, token: str | None = None,
                    tls: TLSFiles | None = None) -> None:
    """Serve the dashboard with uvicorn until interrupted; refuses (:class:`WebAccessError`) to listen off this
    machine without an access token and TLS (:mod:`shared.web.access`)."""
    import uvicorn

    check_binding(host, token, tls)
    app = make_dashboard(runs_dir)
    protect(app, token)
    uvicorn.run(app, host=host, port=port, log_level="warning", **uvicorn_tls_kwargs(tls))
