"""Benchmark: the statistics, analytics and model-fit phases with their sums off, pairwise-masked and recovering.

    python benchmarks/secure_phases.py [--sites 3] [--patients 200] [--repeats 3] [--phases statistics,...]
                                       [--out FILE.json]

Each phase runs in this one process with the real code on both sides — the server's phase
(``server.statistics_phase.federated_encoder``, ``server.analytics_phase.run_analyses`` with ``GridAsker`` or
``SecureGridAsker``), the dose adjuster's fitted-Q iteration (``server.adjustment_phase.fit_adjuster``, 25
iterations) and the structured dose–response fit (``server.dose_response_phase.fit_structured_policy_federated``:
three Newton fits and the support) over an in-process stand-in for Flower's Grid that hands every message to the
sites' real handlers (``client.training_handlers.statistics``, ``client.secure_statistics``, ``client.analytics``,
``client.adjustment_handlers``, ``client.dose_response_handlers``, ``client.secure_aggregation``), one Flower
Context per node, simulated clinics (``simulation.clinics``), no DP.
Modes: ``off`` (plain sums, the phases as before), ``pairwise`` (one key exchange, one masked exchange per
release), ``recovering`` (four exchanges per release), and ``recovering, 1 lost`` (the last site lost before
sending its first masked answer: recovered, the phase goes on without it).

Reported per case (median over ``--repeats``): wall seconds of the whole phase (every party, one process: sites'
and server's compute, no network), message exchanges (``send_and_receive`` calls), payload kB down (server →
sites) and up (no framing: array bytes and config values, ``server.secure_aggregation.record_bytes``), and the
ratios to ``off``. Every masked run is checked against the plain one on the same sites: the encoder's means and
scales, the analytics' numbers (other than min / max, not sent masked), the adjuster's Q-function weights and
scaling, the dose–response models' coefficients, covariances and log-likelihoods and the support counts, within
1e−9 relative (``= plain``; the covariances, inverses of an information matrix whose conditioning amplifies the
2^−41 rounding of its summed entries, within 1e−7); ``max diff`` is the largest ``|masked − plain| / max(|plain|,
1)`` over them.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
from flwr.app import Context, Error, Message, RecordDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script

from record import machine, write_record  # noqa: E402

from client import adjustment_handlers as ah  # noqa: E402
from client import analytics as ca  # noqa: E402
from client import dose_response_handlers as dh  # noqa: E402
from client import secure_aggregation as sa  # noqa: E402
from client import secure_statistics as cs  # noqa: E402
from client.training_handlers import statistics as plain_statistics  # noqa: E402
from server import statistics_phase as sp  # noqa: E402
from server.adjustment_phase import fit_adjuster  # noqa: E402
from server.analytics_phase import AnalyticsSession, GridAsker, SecureGridAsker, run_analyses  # noqa: E402
from server.analytics_plan import AnalyticsSettings, plan_for  # noqa: E402
from server.dose_response_phase import fit_structured_policy_federated  # noqa: E402
from server.run_record import RunRecord  # noqa: E402
from server.secure_aggregation import record_bytes  # noqa: E402
from server.site_check import SiteCheck  # noqa: E402
from shared.protocol import messages  # noqa: E402
from shared.protocol import records as r  # noqa: E402
from shared.protocol.errors import ShareableError  # noqa: E402
from shared.protocol.privacy import RunPlan  # noqa: E402
from shared.structured_policy import catalogue_of  # noqa: E402
from shared.task import NANOPARTICLE_TASK  # noqa: E402
from simulation.clinics import make_world, simulate_clinic  # noqa: E402

CASES = ("off", "pairwise", "recovering", "recovering, 1 lost")
PHASES = ("statistics", "analytics", "adjuster", "dose-response")
FIRST_MASKED = (messages.STATISTICS_MASKED.type, messages.ANALYTICS_DESCRIBE.type, messages.FQI_SCALING.type,
                messages.DOSE_RESPONSE_SUMS.type)
"""The first masked request of each phase: the lost site is lost before answering it."""


class Request:
    """``client.site.SiteRequest`` as the phases' handlers use it: a site without DP."""

    dp = None

    def __init__(self, site, config, context: Context, name: str) -> None:
        self.frame, self.config, self.context, self.name = site.episodes, config, context, name
        self.site = site  # one object per site, as a deployed site's is cached (its transitions are, by it)

    def rows(self, split: str) -> pd.DataFrame:
        return self.frame


class InProcessGrid:
    """Flower's Grid as the phases use it: each message to that node's real handler; counts exchanges, bytes."""

    def __init__(self, frames: dict[int, pd.DataFrame], lost: int | None = None,
                 vitals: dict[int, pd.DataFrame] | None = None) -> None:
        self.frames = frames
        self.sites = {n: SimpleNamespace(task=NANOPARTICLE_TASK, episodes=f, vitals=(vitals or {}).get(n))
                      for n, f in frames.items()}
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in frames}
        self.answers = {messages.STATISTICS.type: plain_statistics, messages.STATISTICS_LAYOUT.type: cs.layout,
                        messages.STATISTICS_MASKED.type: cs.masked_statistics,
                        **{m.type: ca._answerer(m.action) for m in messages.ANALYTICS},
                        **{m.type: ah.answer_sums(m.action) for m in (messages.FQI_SCALING, messages.FQI_RIDGE)},
                        messages.DOSE_RESPONSE_SUMS.type: dh.model_sums,
                        messages.DOSE_RESPONSE_SUPPORT.type: dh.support_counts}
        self.rounds = {m.type: handler for m, handler in sa.SECURE_ROUNDS.items()}
        self.lost, self.gone = lost, False
        self.exchanges = self.bytes_down = self.bytes_up = 0

    def send_and_receive(self, sent, timeout=None):
        if sent:
            self.exchanges += 1
        for msg in sent:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            self.bytes_down += record_bytes(msg.content)
            if node == self.lost and kind in FIRST_MASKED:
                self.gone = True  # lost before sending its first masked answer
            if node == self.lost and self.gone:
                continue
            reply = self.answer(msg, node, kind)
            if not reply.has_error():
                self.bytes_up += record_bytes(reply.content)
            yield reply

    def answer(self, msg, node, kind):
        context = self.contexts[node]
        try:
            if kind in self.rounds:
                return self.rounds[kind](msg, context)
            request = Request(self.sites[node], msg.content[r.CONFIG], context, f"clinic_{node}")
            return Message(self.answers[kind](msg, request), reply_to=msg)
        except ShareableError as err:
            return Message(Error(code=1, reason=str(err)), reply_to=msg)


def mode_of(case: str) -> str:
    return case.split(",")[0]


def statistics_phase(frames, case):
    grid = InProcessGrid(frames, max(frames) if "lost" in case else None)
    record = RunRecord(run_id="bench", settings={})
    start = time.perf_counter()
    encoder = sp.federated_encoder(grid, SiteCheck(usable={n: f"clinic_{n}" for n in frames}), NANOPARTICLE_TASK,
                                   0, RunPlan(("statistics",)), record, mode_of(case))
    return time.perf_counter() - start, grid, encoder


def analytics_phase(frames, case, settings):
    grid = InProcessGrid(frames, max(frames) if "lost" in case else None)
    plan = plan_for(settings.task(), settings.dp)
    asker = GridAsker(grid) if case == "off" else SecureGridAsker(grid, mode_of(case))
    session = AnalyticsSession(asker, list(frames), plan.queries(settings), {n: f"clinic_{n}" for n in frames},
                               plan.schedule(settings))
    start = time.perf_counter()
    result = run_analyses(session, plan, settings)
    return time.perf_counter() - start, grid, result


def adjuster_phase(sites, case):
    frames, vitals = sites
    grid = InProcessGrid(frames, max(frames) if "lost" in case else None, vitals)
    start = time.perf_counter()
    fitted = fit_adjuster(grid, list(frames), {"split-seed": 0, "fqi-iterations": 25}, secure_sum=mode_of(case))
    return time.perf_counter() - start, grid, fitted


def dose_response_phase(frames, case, catalogue):
    grid = InProcessGrid(frames, max(frames) if "lost" in case else None)
    start = time.perf_counter()
    policy, _ = fit_structured_policy_federated(grid, list(frames), catalogue, 0, secure_sum=mode_of(case))
    return time.perf_counter() - start, grid, policy


def fit_numbers(phase: str, out) -> dict[str, float]:
    """What the model fits are compared on: the adjuster's weights and scaling; the dose–response models'
    coefficients, covariances and log-likelihoods and the support counts."""
    if phase == "adjuster":
        arrays = {"coef": out.coef_, "mean": out.mean_, "scale": out.scale_}
    else:
        arrays = {"support": out.support.counts}
        for key in ("response", "neutropenia", "other_toxicity"):
            model = getattr(out, key)
            arrays.update({f"{key}/coef": model.coef_, f"{key}/covariance": model.covariance_,
                           f"{key}/loglik": np.array([model.loglik_])})
    return {f"{name}/{i}": float(v) for name, values in arrays.items()
            for i, v in enumerate(np.asarray(values, dtype=float).ravel())}


def phase_numbers(phase: str, out) -> dict[str, float]:
    if phase == "statistics":
        return {**{f"mean/{k}": float(v) for k, v in out.means_.items()},
                **{f"scale/{k}": float(v) for k, v in out.scales_.items()}}
    if phase == "analytics":
        return dict(numbers(out))
    return fit_numbers(phase, out)


def max_difference(got: dict[str, float], want: dict[str, float]) -> float:
    """The largest |got − want| / max(|want|, 1) (NaN in both: 0; a key missing: inf)."""
    if set(got) != set(want):
        return math.inf
    worst = 0.0
    for key, value in want.items():
        if math.isnan(value) and math.isnan(got[key]):
            continue
        worst = max(worst, abs(got[key] - value) / max(abs(value), 1.0))
    return worst


def numbers(tree, path=()):
    """Every number of an analytics result by path, min / max / quantiles / sites / timing left out."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key not in ("min", "max", "quantiles", "sites", "timing", "budget", "noise", "skipped"):
                yield from numbers(value, (*path, str(key)))
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            yield from numbers(value, (*path, str(i)))
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield "/".join(path), float(tree)


def same(a: float, b: float, tolerance: float = 1e-9) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/secure_phases.json"))
    args = parser.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    if unknown := set(phases) - set(PHASES):
        parser.error(f"--phases: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(PHASES)}")
    load = os.getloadavg()
    world = make_world(args.sites, seed=0, patients_per_clinic=args.patients)
    simulated = {100 + i: simulate_clinic(world, clinic) for i, clinic in enumerate(world.clinics)}
    frames = {n: episodes for n, (episodes, _) in simulated.items()}
    vitals = {n: v for n, (_, v) in simulated.items()}
    survivors = {n: f for n, f in frames.items() if n != max(frames)}
    catalogue = catalogue_of(pd.concat(list(frames.values()), ignore_index=True))  # the policy phase's, all sites
    settings = AnalyticsSettings(k=3, seed=0)
    runners = {"statistics": statistics_phase, "analytics": lambda f, c: analytics_phase(f, c, settings),
               "adjuster": lambda f, c: adjuster_phase((f, vitals), c),
               "dose-response": lambda f, c: dose_response_phase(f, c, catalogue)}
    rows, results = [], {}
    for phase in phases:
        reference = {}
        runners[phase](frames, "off")  # untimed: fills the sites' caches (transitions), as a run's earlier phases do
        for case in CASES:
            runs = [runners[phase](frames, case) for _ in range(args.repeats)]
            seconds = statistics.median(s for s, _, _ in runs)
            _, grid, out = runs[0]
            expected = reference.get("lost" if "lost" in case else "all")
            if expected is None:  # the plain run on the same sites
                plain = runners[phase](survivors if "lost" in case else frames, "off")
                expected = reference.setdefault("lost" if "lost" in case else "all", plain[2])
            want, got = phase_numbers(phase, expected), phase_numbers(phase, out)
            checked = set(want) == set(got) and all(same(got[k], v, 1e-7 if "covariance" in k else 1e-9)
                                                    for k, v in want.items())
            entry = {"seconds": seconds, "exchanges": grid.exchanges, "kb_down": grid.bytes_down / 1000,
                     "kb_up": grid.bytes_up / 1000, "equal_to_plain": bool(checked),
                     "max_difference": max_difference(got, want), "compared": len(want)}
            results.setdefault(phase, {})[case] = entry
            base = results[phase]["off"]
            rows.append((phase, case, entry, entry["seconds"] / base["seconds"],
                         (entry["kb_down"] + entry["kb_up"]) / (base["kb_down"] + base["kb_up"])))
    print(f"{args.sites} sites × {args.patients} patients, medians of {args.repeats}; load {load[0]:.1f}")
    print("| phase | secure sum | s | exchanges | kB down | kB up | time × off | bytes × off | = plain | max diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for phase, case, e, time_ratio, byte_ratio in rows:
        print(f"| {phase} | {case} | {e['seconds']:.3f} | {e['exchanges']} | {e['kb_down']:.1f} | {e['kb_up']:.1f} | "
              f"{time_ratio:.2f} | {byte_ratio:.2f} | {'yes' if e['equal_to_plain'] else 'NO'} | "
              f"{e['max_difference']:.1e} |")
    write_record(args.out, "python " + " ".join(["benchmarks/secure_phases.py", *(argv or sys.argv[1:])]), results,
                 machine=machine(load_average=list(load)), sites=args.sites, patients=args.patients,
                 repeats=args.repeats, phases=phases)
    return 0 if all(e["equal_to_plain"] for p in results.values() for e in p.values()) else 1


if __name__ == "__main__":
    from flwr.supercore.task_identity import TaskIdentity

    for _name, _value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # what Message() needs, as a ServerApp
        setattr(TaskIdentity, _name, _value)
    np.seterr(all="ignore")
    raise SystemExit(main())
