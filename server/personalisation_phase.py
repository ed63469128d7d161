"""Phase 3b: personalised ANNs at the sites, after the federation's last round (``--personalise``); phase 4b: the
same choice for the finished boosters (``--personalise site-trees``, :func:`run_boosting_personalisation`).

The server sends the final global weights with the ANN's training config and
:class:`shared.protocol.personalisation.Personalisation` to every site that grants the ``personalisation`` phase
(every site without DP; DP sites that gave it a share of ε); each site trains its candidates, chooses on its
validation split and replies its choice, why, and every candidate's summaries (``client.personalisation_handlers``).
No personalised weight comes back. Under a pooled choice rule the coordinator then pools the sites' validation
evidence and tells the sites the federation's default (``query.personalise_keep``, :func:`keep_pooled`); under the
default rule (``pooled-non-dp``) only the sites without DP pool and are told, each DP site's own choice stands.
The record keeps, per site, the choice, the reason, what decided it (the pooled default with its gain ± margin,
or the site's own rule and why), whether its evidence was under DP, and the metrics of each
candidate on the validation and test splits (from the released summaries: noised at a DP site), and what the
phase cost: seconds and bytes on the wire. A DP site's privacy record counts every entry the phase made in its
ledger: one per candidate trained by DP-SGD and the two Gaussian releases (validation, test).

For the boosters the server sends the finished boosters, the boosting settings and the plan to every site
without DP (XGBoost's site trees have no DP form: a DP site is recorded as refusing, with why); each site chooses
among the global boosters, its local-only ones and the global ones with its own trees added, and replies the
same :class:`shared.protocol.personalisation.PersonalisationReply`. No tree the site grew comes back.
"""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from server.run_record import RunRecord, add_privacy, outcome_metrics
from server.site_check import SiteCheck
from shared import metrics
from shared.protocol import messages
from shared.protocol import records as r
from shared.protocol.boosting import evaluation_request
from shared.protocol.personalisation import (
    BOOSTING_DP_REFUSAL,
    CHOICE,
    DEFAULT_KEY,
    GLOBAL,
    POOLED_EQUAL,
    POOLED_NON_DP,
    POOLED_RULES,
    POOLED_SITE,
    SITE_DEFAULT,
    VALIDATION_PRIVACY,
    Personalisation,
    PersonalisationReply,
    awaits_keep,
    evidence_under_dp,
)
from shared.selection import (
    EQUAL,
    OWN_RULE,
    PRECISION,
    SiteEvidence,
    decided_by,
    default_from_gains,
    non_dp_pooled_default,
    one_sided_z,
    pooled_gains,
)
from shared.task import TaskSpec

PHASE = "personalisation"


def personalisation_request(arrays: ArrayRecord, config: ConfigRecord, plan: Personalisation) -> RecordDict:
    """The message content: the global weights, and the training config with the plan."""
    return RecordDict({r.ARRAYS: arrays, r.CONFIG: with_plan(config, plan)})


def with_plan(config: ConfigRecord, plan: Personalisation) -> ConfigRecord:
    """A copy of ``config`` with the plan's keys added."""
    merged = ConfigRecord(dict(config))
    merged.update(plan.to_config())
    return merged


def run_personalisation(grid: Grid, sites: SiteCheck, task: TaskSpec, arrays: ArrayRecord, config: ConfigRecord,
                        plan: Personalisation, record: RunRecord) -> dict:
    """Ask the granting sites to personalise; the phase's record (module docstring), DP releases into ``record``.
    Each site's entry says what decided its choice (``rule``: ``pooled`` or ``own``; ``decided_by``: the pooled
    default with its gain ± margin, or its own rule and why)."""
    start = time.perf_counter()
    content = personalisation_request(arrays, config, plan)
    nodes = sites.granting(PHASE)
    sent = [Message(content, dst_node_id=n, message_type=messages.PERSONALISE.type) for n in nodes]
    per_site, failures, received = collect(grid, sites, task, sent, record)
    sent_bytes = len(nodes) * sum(record_bytes(v) for v in content.values())
    phase = {"methods": list(plan.methods), "candidates": list(plan.candidates), "epochs": plan.epochs,
             "ditto_lambda": plan.ditto_lambda, "choice": plan.choice}
    for entry in per_site.values():
        entry["rule"], entry["decided_by"] = OWN, SITE_RULE_WORDS
    if plan.choice in POOLED_RULES and per_site:
        phase["pooled"], more_sent, more_received = keep_pooled(grid, sites, plan, per_site, failures)
        sent_bytes, received = sent_bytes + more_sent, received + more_received
    return phase | {"seconds": time.perf_counter() - start, "bytes": {"sent": sent_bytes, "received": received},
                    "per_site": per_site, "failures": failures, "refused": sites.refusing(PHASE)}


OWN, POOLED_BY = "own", "pooled"
"""A site entry's ``rule``: its own rule's choice stands, or it chose with the federation's pooled default."""
SITE_RULE_WORDS = "its own rule (the site rule: the default it keeps unless beaten by its own margin)"


def keep_pooled(grid: Grid, sites: SiteCheck, plan: Personalisation, per_site: dict,
                failures: dict) -> tuple[dict, int, int]:
    """The federation's default from the sites' replied validation evidence (``shared.selection``), sent to the
    sites that wait for it (``query.personalise_keep``, :func:`shared.protocol.personalisation.awaits_keep`); each
    chooses again with it and keeps that model. Under ``pooled-non-dp`` (the default rule) only the evidence of the
    sites without DP is pooled (``non_dp_pooled_default``; whether a reply's evidence is under DP:
    ``evidence_under_dp``, recorded by :func:`collect`) and only they are told; a DP site's own choice stands.
    Under the other pooled rules every site's evidence is pooled (by precision or equally) and every site told:
    the best candidate if significant, else global or, under ``pooled-site``, each site's own default.
    Updates ``per_site`` (``chosen``, ``reason``, ``rule``, ``decided_by``; the site's own choice under
    ``site_chosen``); returns the default with why, and the bytes sent and received."""
    evidence = {site: evidence_of(entry) for site, entry in per_site.items() if entry.get("validation_scores")}
    under_dp = {site: bool(entry.get("evidence_dp", True)) for site, entry in per_site.items()}
    weighting = EQUAL if plan.choice == POOLED_EQUAL else PRECISION
    if plan.choice == POOLED_NON_DP:
        default, why, gains = non_dp_pooled_default(evidence, under_dp, plan.candidates, GLOBAL)
        pooled_sites = sorted(site for site in evidence if not under_dp[site])
    else:
        gains, pooled_sites = pooled_gains(evidence, plan.candidates, GLOBAL, weighting), sorted(evidence)
        default, why = default_from_gains(gains, plan.candidates, GLOBAL, weighting)
    words = decided_by(default, gains, GLOBAL) if default is not None else "its own rule: nothing pooled"
    sent_default = default if default is not None else SITE_DEFAULT
    if plan.choice == POOLED_SITE and default == GLOBAL:  # nothing significant: each site's own default
        default = sent_default = SITE_DEFAULT
        why += "; each site keeps its own choice"
        words = f"its own rule ({words})"
    log(INFO, "personalisation: federation default %s (%s)", sent_default, why)
    for site in per_site:
        if plan.choice == POOLED_NON_DP and under_dp[site]:
            per_site[site]["decided_by"] = OWN_RULE
    content = RecordDict({r.CONFIG: ConfigRecord({DEFAULT_KEY: sent_default})})
    node_of = {name: node for node, name in sites.usable.items()}
    told = [site for site in per_site if site in node_of and awaits_keep(plan.choice, under_dp[site])]
    sent = [Message(content, dst_node_id=node_of[site], message_type=messages.PERSONALISE_KEEP.type) for site in told]
    received = 0
    for reply in grid.send_and_receive(sent) if sent else ():
        name = sites.usable.get(reply.metadata.src_node_id, f"node {reply.metadata.src_node_id}")
        if reply.has_error():
            failures[name] = f"personalise_keep: {reply.error.reason}"
            continue
        received += sum(record_bytes(v) for v in reply.content.values())
        answer = reply.content[CHOICE]
        entry = per_site[name]
        entry["site_chosen"], entry["chosen"], entry["reason"] = (entry["chosen"], str(answer["chosen"]),
                                                                   str(answer["reason"]))
        entry["rule"] = OWN if sent_default == SITE_DEFAULT else POOLED_BY
        entry["decided_by"] = words
    z = one_sided_z(len(gains))
    return ({"default": default, "reason": why, "weighting": weighting, "sites": pooled_sites,
             "left_out_under_dp": sorted(site for site in evidence if under_dp[site])
             if plan.choice == POOLED_NON_DP else [], "told": told, "z": z,
             "gains": {c: {"gain": g.gain, "sd": g.sd, "margin": z * g.sd, "sites": g.sites}
                       for c, g in gains.items()}},
            len(told) * sum(record_bytes(v) for v in content.values()), received)


def evidence_of(entry: dict) -> SiteEvidence:
    """A site's :class:`shared.selection.SiteEvidence` from its phase record (:func:`collect`)."""
    names = list(entry["validation_scores"])
    cov = entry["validation_covariance"]
    return SiteEvidence(dict(entry["validation_scores"]),
                        {(a, b): cov[i][j] for i, a in enumerate(names) for j, b in enumerate(names)})


def run_boosting_personalisation(grid: Grid, sites: SiteCheck, task: TaskSpec, boosters: dict[str, bytes],
                                 config: ConfigRecord, plan: Personalisation, record: RunRecord) -> dict:
    """Ask every site without DP to personalise the finished ``boosters`` (``config``: the boosting settings
    with the encoder); the phase's record, shaped as :func:`run_personalisation`'s."""
    start = time.perf_counter()
    content = evaluation_request(with_plan(config, plan), boosters)
    nodes = [n for n in sites.nodes if n not in sites.dp_nodes()]
    sent = [Message(content, dst_node_id=n, message_type=messages.PERSONALISE_BOOSTING.type) for n in nodes]
    per_site, failures, received = collect(grid, sites, task, sent, record)
    return {"methods": list(plan.methods), "candidates": list(plan.candidates), "site_trees": plan.site_trees,
            "site_trees_lambda": plan.site_trees_lambda, "local_rounds": plan.local_rounds,
            "seconds": time.perf_counter() - start,
            "bytes": {"sent": len(nodes) * sum(record_bytes(v) for v in content.values()), "received": received},
            "per_site": per_site, "failures": failures,
            "refused": {sites.usable[n]: BOOSTING_DP_REFUSAL for n in sites.dp_nodes()}}


def collect(grid: Grid, sites: SiteCheck, task: TaskSpec, sent: list[Message],
            record: RunRecord) -> tuple[dict, dict, int]:
    """Send ``sent`` and read the sites' :class:`PersonalisationReply`: per site its choice, reason, DP-SGD steps
    and every candidate's metrics per split; failures (site → reason); bytes received. DP releases and DP-SGD
    fits go into ``record``'s privacy records."""
    per_site, failures, received = {}, {}, 0
    for reply in grid.send_and_receive(sent):
        node = reply.metadata.src_node_id
        name = sites.usable.get(node, f"node {node}")
        if reply.has_error():
            failures[name] = reply.error.reason
            log(INFO, "personalisation: %s failed: %s", name, reply.error.reason)
            continue
        received += sum(record_bytes(v) for v in reply.content.values())
        answer = PersonalisationReply.from_records(reply.content)
        for key in (VALIDATION_PRIVACY, r.PRIVACY):  # in the order released: ε after the phase is the last's
            if key in reply.content:
                add_privacy(record, sites.usable, node, dict(reply.content[key]))
        if answer.dp_fits and name in record.privacy:
            record.privacy[name].add_ledger_entries(PHASE, answer.dp_fits)
        per_site[name] = {"chosen": answer.chosen, "reason": answer.reason, "dp_steps": answer.dp_steps,
                          **{split: {c: outcome_metrics(task, _as_record(s)) for c, s in by.items()}
                             for split, by in answer.summaries.items()}}
        per_site[name]["evidence_dp"] = evidence_under_dp(reply.content)  # a DP release's, or exact rows'
        if answer.scores:  # the ANN phase: the validation evidence the federation's default pools
            names = list(answer.scores)
            per_site[name]["validation_scores"] = dict(answer.scores)
            per_site[name]["validation_covariance"] = [[answer.covariance.get((a, b), 0.0) for b in names]
                                                       for a in names]
    return per_site, failures, received


def record_bytes(record) -> int:
    """Bytes of a record's payload as Flower counts them (``count_bytes``)."""
    return int(record.count_bytes())


def _as_record(summaries: dict[str, dict]) -> dict:
    """Per-outcome summaries as one flat record of prefixed keys (what ``outcome_metrics`` reads)."""
    flat: dict = {}
    for outcome, summary in summaries.items():
        flat.update(metrics.to_metric_record(summary, prefix=outcome))
    return flat
