"""Phase 2: the federated statistics, summed into one feature encoder every site shares.

Each usable site sends aggregates of its training split (``query.statistics``; noised at a site under DP,
``client.statistics``); the server adds them (``shared.encoding.combine``) and fits one
:class:`shared.encoding.FeatureEncoder`, so every site standardises and one-hot-encodes identically without a
row leaving it. A DP site that refused the phase is not asked (and, with no noised row count to weigh it by,
will not train).

With ``secure-sum`` on (``pairwise`` or ``recovering``, the run's one secure-sum mode, as histogram boosting
uses it), the sites' statistics are summed through the secure sum of ``server.secure_aggregation`` instead
(:func:`secure_encoder`): ``query.statistics_layout`` (the union of the sites' category and class values, and
every site's min and max, in the clear: they are not sums), then the key exchange (pairwise: once; recovering:
keys and shares, then unmasking around the masked request), and ``query.statistics_masked``, every site's
statistics as one fixed-point vector of sums (``shared.statistics_vector``), masked: the server learns the
pooled statistics only, the same as ``combine`` gives within the fixed-point rounding. Pairwise: a site lost
after the key exchange leaves its masks in the sum, and the phase fails naming it; recovering: the sum is that
of the sites whose masked vector arrived (up to n − t lost). With one site there is nothing to hide the sum
among: its statistics are asked in the clear, as with ``off``.
"""

from __future__ import annotations

from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from server.run_record import RunRecord, add_privacy
from server.secure_aggregation import SecureProtocolError, SecureSession
from server.site_check import SiteCheck
from shared.encoding import FeatureEncoder, SiteStatistics, combine
from shared.protocol import messages
from shared.protocol import records as r
from shared.protocol.hist import secure_sum_mode
from shared.protocol.privacy import RunPlan
from shared.protocol.training import statistics_request
from shared.secure_sum import MIN_SITES
from shared.statistics_vector import VALUES, StatisticsLayout, layout_reply
from shared.sum_bounds import Contributors, InfeasibleSum, check_statistics, declared_rows
from shared.task import TaskSpec


class NoStatistics(RuntimeError):
    """No site could report statistics: nothing to train on."""


def federated_encoder(grid: Grid, sites: SiteCheck, task: TaskSpec, split_seed: int, plan: RunPlan,
                      record: RunRecord, secure_sum: str | bool = "off", secure_threshold: int = 0) -> FeatureEncoder:
    """Sum the sites' training-split aggregates into one encoder; who answered and who did not go to ``record``.
    With ``secure_sum`` pairwise or recovering (and two sites or more), through :func:`secure_encoder`."""
    nodes = sites.granting("statistics")
    mode = secure_sum_mode(secure_sum)
    if mode != "off" and len(nodes) >= MIN_SITES:
        return secure_encoder(grid, sites, task, split_seed, plan, record, mode, secure_threshold)
    sent = [Message(statistics_request(split_seed, plan), dst_node_id=n, message_type=messages.STATISTICS.type)
            for n in nodes]
    received, failures = {}, {}
    for reply in grid.send_and_receive(sent):
        node = reply.metadata.src_node_id
        if reply.has_error():
            failures[sites.usable.get(node, f"node {node}")] = reply.error.reason
            log(INFO, "statistics: %s failed: %s", sites.usable.get(node, node), reply.error.reason)
            continue
        facts = dict(reply.content[r.PRIVACY]) if r.PRIVACY in reply.content else None
        received[node] = (SiteStatistics.from_records(reply.content[r.STATISTICS], reply.content[r.NAMES]), facts)
    infeasible = infeasible_sites(sites, task, received)
    stats, answered = [], []
    for node, (own, facts) in received.items():
        if sites.usable[node] in infeasible:
            log(INFO, "statistics: %s dropped: %s", sites.usable[node], infeasible[sites.usable[node]])
            continue
        stats.append(own)
        answered.append(sites.usable[node])
        if facts is not None:
            add_privacy(record, sites.usable, node, facts)
    record.statistics = {"sites": sorted(answered), "failures": failures, "refused": sites.refusing("statistics"),
                         "secure_sum": "off", "infeasible": infeasible}
    if not stats:
        raise NoStatistics("no site could report statistics: nothing to train on")
    return FeatureEncoder(task).fit_statistics(combine(stats))


def contributors(sites: SiteCheck, nodes: list[int], facts: dict[int, dict]) -> Contributors:
    """What is public about the sites ``nodes`` of one sum (``shared.sum_bounds``): their declared row counts
    (None if one declared none) and the noise sd each DP site among them stated (``facts``: node → DP facts)."""
    declared = [declared_rows(sites.summaries.get(n, {})) for n in nodes]
    return Contributors.of(declared, (facts[n]["noise-sd"] for n in nodes if n in facts))


def infeasible_sites(sites: SiteCheck, task: TaskSpec, received: dict[int, tuple[SiteStatistics, dict | None]]
                     ) -> dict[str, str]:
    """With every site's statistics in the clear: site name → why its statistics are infeasible on their own
    (``shared.sum_bounds.check_statistics`` with its own declared row count and noise); those sites are dropped."""
    if not received:
        return {}
    layout = None
    for own, _ in received.values():
        layout = StatisticsLayout.of(own) if layout is None else layout.union(StatisticsLayout.of(own))
    result = {}
    for node, (own, facts) in received.items():
        who = contributors(sites, [node], {node: facts} if facts is not None else {})
        try:
            check_statistics(layout, layout.vector(own), task, who)
        except InfeasibleSum as err:
            result[sites.usable[node]] = str(err)
    return result


def secure_encoder(grid: Grid, sites: SiteCheck, task: TaskSpec, split_seed: int, plan: RunPlan, record: RunRecord,
                   mode: str, threshold: int = 0) -> FeatureEncoder:
    """The federated encoder from the secure sum of the sites' statistics (module docstring)."""

    def name(node: int) -> str:
        return sites.usable.get(node, f"node {node}")

    base = ConfigRecord(dict(statistics_request(split_seed, plan)[r.CONFIG]))
    session = SecureSession(grid, sites.granting("statistics"), mode, base, threshold)
    failures: dict[str, str] = {}
    try:
        replies, failed = session.ask_all(messages.STATISTICS_LAYOUT, {}, ArrayRecord())
        failures.update({name(n): reason for n, reason in failed.items()})
        session.lose(failed)
        layouts = {n: layout_reply(replies[n]) for n in session.nodes}
        union = None
        for own, _, _ in layouts.values():
            union = own if union is None else union.union(own)
        if mode == "pairwise":
            session.exchange_keys()
        total = session.summed_floats(messages.STATISTICS_MASKED, dict(union.to_config()), ArrayRecord(), VALUES)
    except SecureProtocolError as err:
        failures.update({name(n): reason for n, reason in session.lost.items()})
        record.statistics = {"sites": [], "failures": failures, "refused": sites.refusing("statistics"),
                             "secure_sum": mode}
        hint = (" (pairwise masks: a site lost after the key exchange leaves its masks in the sum; "
                "secure-sum = recovering survives it)" if mode == "pairwise" else "")
        raise NoStatistics(f"the secure sum of the statistics failed at {name(err.node)}: {err.reason}{hint}") from None
    summed = session.summed_nodes
    try:
        check_statistics(union, total, task,
                         contributors(sites, summed, {n: f for n, f in session.privacy if n in summed}))
    except InfeasibleSum as err:
        failures.update({name(n): reason for n, reason in session.lost.items()})
        record.statistics = {"sites": [], "failures": failures, "refused": sites.refusing("statistics"),
                             "secure_sum": mode, "infeasible": {"sum": str(err)}}
        raise NoStatistics(f"the secure sum of the statistics was refused: {err}") from None
    minima = {c: min(layouts[n][1][c] for n in summed) for c in union.numeric}
    maxima = {c: max(layouts[n][2][c] for n in summed) for c in union.numeric}
    for node, facts in session.privacy:
        if node in summed:
            add_privacy(record, sites.usable, node, facts)
    failures.update({name(n): reason for n, reason in session.lost.items()})
    record.statistics = {"sites": sorted(name(n) for n in summed), "failures": failures,
                         "refused": sites.refusing("statistics"), "secure_sum": mode, "infeasible": {},
                         "bytes": {"down": session.bytes_down, "up": session.bytes_up}}
    log(INFO, "statistics: secure sum (%s) over %d sites", mode, len(summed))
    return FeatureEncoder(task).fit_statistics(union.statistics(total, minima, maxima))
