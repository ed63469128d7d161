"""The ANN choice's default rule, ``pooled-non-dp`` (issue 18, ``shared.selection.non_dp_pooled_default``): the
coordinator pools the validation evidence of the sites without DP only, sends that default to them only, and each
DP site keeps its own rule's choice; the record says for each site what decided (BENCHMARKS.md, "Personalisation:
pooling only the sites without DP")."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from client.personalisation_handlers import CANDIDATES_DIR, SITE_RECORD_DIR, personalise
from shared import metrics
from shared.protocol import messages
from shared.protocol import personalisation as p
from shared.protocol import records as r
from shared.protocol.privacy import ReleaseFacts
from shared.selection import (
    NO_GAIN_FALLBACK,
    OWN_RULE,
    SiteEvidence,
    choice_with_default,
    decided_by,
    non_dp_pooled_choices,
    non_dp_pooled_default,
    one_sided_z,
    pooled_default,
)
from shared.task import Outcome, TaskSpec
from tests.personalising_site import personalise_request

CANDIDATES = (p.GLOBAL, "ditto", p.LOCAL)
ORDER = CANDIDATES  # without fine-tuning the site's order is the plan's (client.personalisation_handlers.ann_order)


def _site(scores: dict[str, float], sd: float, correlation: float) -> SiteEvidence:
    cov = {(a, b): sd * sd * (1.0 if a == b else correlation) for a in scores for b in scores}
    return SiteEvidence(scores, cov)


FLAT = _site({p.GLOBAL: 0.80, "ditto": 0.80, p.LOCAL: 0.75}, 0.03, 0.98)  # no gain anywhere
DITTO = _site({p.GLOBAL: 0.80, "ditto": 0.81, p.LOCAL: 0.70}, 0.03, 0.98)  # +0.01, per site within its margin
FAKE_LOCAL = _site({p.GLOBAL: 0.70, "ditto": 0.70, p.LOCAL: 1.20}, 0.01, 0.5)  # a DP release's huge biased gain


# --- the rule ------------------------------------------------------------------------------------------------


def test_a_dp_sites_huge_gain_does_not_move_the_default_pooled_over_the_sites_without_dp():
    evidence = {**{f"plain_{i}": FLAT for i in range(4)}, "dp_0": FAKE_LOCAL, "dp_1": FAKE_LOCAL}
    under_dp = {site: site.startswith("dp") for site in evidence}
    # pooled over every site (the `pooled` rule), the DP sites' +0.5 makes local the federation's default
    assert pooled_default(evidence, CANDIDATES, p.GLOBAL)[0] == p.LOCAL
    default, why, gains = non_dp_pooled_default(evidence, under_dp, CANDIDATES, p.GLOBAL)
    assert default == p.GLOBAL and why.startswith("pooled over the 4 sites without DP")
    assert gains[p.LOCAL].sites == 4 and gains[p.LOCAL].gain == pytest.approx(-0.05)
    # a site the caller did not say is without DP counts as DP: its evidence is left out
    assert non_dp_pooled_default(evidence, {"plain_0": False}, CANDIDATES, p.GLOBAL)[2][p.LOCAL].sites == 1


def test_without_dp_every_site_gets_the_pooled_default_and_a_dp_site_keeps_its_own_choice():
    evidence = {**{f"plain_{i}": DITTO for i in range(10)}, "dp_0": FAKE_LOCAL}
    under_dp = {site: site == "dp_0" for site in evidence}
    own = {site: (p.GLOBAL, "kept global (own rule)") for site in evidence}
    default, _, choices = non_dp_pooled_choices(evidence, under_dp, ORDER, p.GLOBAL, own)
    assert default == "ditto"  # +0.01 per site against z·sd = 2.13 × 0.006 / √10 pooled
    for site, (chosen, reason, decided) in choices.items():
        if site == "dp_0":
            assert (chosen, reason, decided) == (p.GLOBAL, "kept global (own rule)", OWN_RULE)
        else:
            assert (chosen, reason) == choice_with_default(DITTO, ORDER, "ditto")
            margin = one_sided_z(2) * DITTO.difference_sd(p.GLOBAL)["ditto"] / math.sqrt(10)
            assert decided == f"pooled default ditto: gain +0.0100 ± {margin:.4f} (z·sd) over global per site, 10 sites"


def test_with_no_significant_gain_the_sites_without_dp_get_fedper_unless_it_is_significantly_worse():
    """NO_GAIN_FALLBACK: the global model only when FedPer did not run or its pooled gain is below −z·sd."""
    with_fedper = (*CANDIDATES, "fedper")

    def sites(fedper: float, n: int = 10) -> dict[str, SiteEvidence]:
        return {f"plain_{i}": _site({p.GLOBAL: 0.80, "ditto": 0.80, p.LOCAL: 0.75, "fedper": 0.80 + fedper}, 0.03,
                                    0.98) for i in range(n)}

    under_dp = dict.fromkeys(sites(0.0), False)
    # a small gain, within the margin (z·sd = 2.24 × 0.006 / √10 = 0.0042): the fallback, said to be one
    default, why, gains = non_dp_pooled_default(sites(0.002), under_dp, with_fedper, p.GLOBAL)
    assert default == NO_GAIN_FALLBACK == "fedper" and "the measured fallback" in why
    assert decided_by(default, gains, p.GLOBAL).startswith("fallback default fedper: no pooled gain over global")
    # a little worse, still within −z·sd: the fallback too (not shown worse on the sites' evidence)
    assert non_dp_pooled_default(sites(-0.002), under_dp, with_fedper, p.GLOBAL)[0] == "fedper"
    # significantly worse: the global model, and why
    default, why, _ = non_dp_pooled_default(sites(-0.02), under_dp, with_fedper, p.GLOBAL)
    assert default == p.GLOBAL and "not the fallback fedper" in why
    # FedPer not run: the global model; a significant gain still wins over the fallback
    assert non_dp_pooled_default(sites(0.002), under_dp, CANDIDATES, p.GLOBAL)[0] == p.GLOBAL
    default, _, gains = non_dp_pooled_default(sites(0.02), under_dp, with_fedper, p.GLOBAL)
    assert default == "fedper" and decided_by(default, gains, p.GLOBAL).startswith("pooled default fedper: gain")
    assert non_dp_pooled_default(sites(0.002), under_dp, with_fedper, p.GLOBAL, fallback=None)[0] == p.GLOBAL


def test_an_all_dp_federation_is_the_site_rule_exactly():
    evidence = {f"dp_{i}": FAKE_LOCAL if i % 2 else DITTO for i in range(6)}
    own = {site: (c, f"own {c}") for site, c in zip(evidence, (p.GLOBAL, "ditto", p.LOCAL) * 2, strict=True)}
    default, why, choices = non_dp_pooled_choices(evidence, dict.fromkeys(evidence, True), ORDER, p.GLOBAL, own)
    assert default is None and "nothing pooled" in why
    assert {site: c[:2] for site, c in choices.items()} == own
    assert not any(p.awaits_keep(p.POOLED_NON_DP, dp=True) for _ in evidence)


def test_the_default_rule_is_pooled_non_dp_and_the_named_rules_stay():
    assert p.choice_rule("finetune,ditto") == p.DEFAULT_CHOICE == p.POOLED_NON_DP
    assert p.Personalisation(methods=("ditto",)).choice == p.POOLED_NON_DP
    assert p.choice_rule("finetune,site") == p.SITE_RULE and p.parse_methods("finetune,site") == ("finetune",)
    for rule in (p.POOLED, p.POOLED_EQUAL, p.POOLED_SITE, p.POOLED_NON_DP):
        assert p.choice_rule(f"ditto,{rule}") == rule
    with pytest.raises(ValueError, match="one choice rule"):
        p.choice_rule("ditto,site,pooled")
    # an older coordinator's config (no choice key) sent no keep message: the site rule
    config = p.Personalisation(methods=("ditto",)).to_config()
    del config["personalise-choice"]
    assert p.Personalisation.from_config(config).choice == p.SITE_RULE
    assert [p.awaits_keep(rule, dp) for rule in (p.SITE_RULE, p.POOLED, p.POOLED_NON_DP) for dp in (False, True)] \
        == [False, False, True, True, True, False]
    from server.settings import RunSettings

    with pytest.raises(ValueError, match="one choice rule"):
        RunSettings(personalise="ditto,site,pooled")


# --- the coordinator -------------------------------------------------------------------------------------------


def _run(choice: str, evidence: dict[int, SiteEvidence], dp_nodes: set[int], own: str = p.GLOBAL):
    """The phase against fake sites: node n replies ``evidence[n]`` (with its validation release's facts if it is
    in ``dp_nodes``) and its own choice ``own``; a keep message is answered as the site would
    (``choice_with_default`` on its evidence). Returns the phase's record and the keep messages sent."""
    from server.personalisation_phase import run_personalisation
    from server.run_record import RunRecord

    summary = metrics.summarise("binary", np.array([0, 1, 1]), np.array([0.2, 0.7, 0.4]), n_bins=20)
    by = {c: {"response": summary} for c in CANDIDATES}
    facts = ReleaseFacts(phase="personalisation", index=0, sigma=2.0, noise_sd=2.0, epsilon_spent=2.9,
                         epsilon_budget=3.0, delta=1e-5).to_record()
    sent_keep = []

    def send_and_receive(batch):
        batch = list(batch)
        if batch[0].metadata.message_type == messages.PERSONALISE.type:
            replies = []
            for m in batch:
                e = evidence[m.metadata.dst_node_id]
                content = p.PersonalisationReply(chosen=own, reason=f"own rule: {own}",
                                                 summaries={"validation": by, "test": by}, candidates=CANDIDATES,
                                                 scores=dict(e.scores), covariance=dict(e.covariance)).to_records()
                if m.metadata.dst_node_id in dp_nodes:
                    content[p.VALIDATION_PRIVACY] = facts
                replies.append(SimpleNamespace(metadata=SimpleNamespace(src_node_id=m.metadata.dst_node_id),
                                               has_error=lambda: False, content=content))
            return replies
        sent_keep.extend(batch)
        replies = []
        for m in batch:
            default = str(m.content[r.CONFIG][p.DEFAULT_KEY])
            chosen, reason = ((own, "no federation default") if default == p.SITE_DEFAULT
                              else choice_with_default(evidence[m.metadata.dst_node_id], ORDER, default))
            replies.append(SimpleNamespace(metadata=SimpleNamespace(src_node_id=m.metadata.dst_node_id),
                                           has_error=lambda: False,
                                           content=RecordDict({p.CHOICE: ConfigRecord({"chosen": chosen,
                                                                                       "reason": reason})})))
        return replies

    nodes = {n: f"clinic_{n:02d}" for n in evidence}
    sites = SimpleNamespace(usable=nodes, granting=lambda phase: list(nodes), refusing=lambda phase: {})
    record = RunRecord(run_id="1", settings={}, sites=list(nodes.values()))
    task = TaskSpec(outcomes=(Outcome("response", "binary"),), numeric=("x",), categorical=())
    phase = run_personalisation(SimpleNamespace(send_and_receive=send_and_receive), sites, task, ArrayRecord(),
                                ConfigRecord(), p.Personalisation(("ditto",), choice=choice), record)
    return phase, sent_keep


def test_a_federation_without_dp_gets_the_pooled_default_and_the_record_says_so(task_identity):
    phase, sent = _run(p.POOLED_NON_DP, dict.fromkeys(range(10), DITTO), set())
    assert phase["pooled"]["default"] == "ditto" and phase["pooled"]["sites"] == [f"clinic_{n:02d}" for n in range(10)]
    assert phase["pooled"]["left_out_under_dp"] == [] and len(sent) == 10
    assert phase["pooled"]["gains"]["ditto"]["margin"] == pytest.approx(
        one_sided_z(2) * DITTO.difference_sd(p.GLOBAL)["ditto"] / math.sqrt(10))
    for entry in phase["per_site"].values():
        assert entry["evidence_dp"] is False and entry["rule"] == "pooled"
        assert entry["chosen"] == "ditto" and entry["site_chosen"] == p.GLOBAL
        assert entry["decided_by"].startswith("pooled default ditto: gain +0.0100 ± 0.00")
    # the same federation under the `pooled` rule: the same default (no DP site to leave out)
    assert _run(p.POOLED, dict.fromkeys(range(10), DITTO), set())[0]["pooled"]["default"] == "ditto"


def test_an_all_dp_federation_is_told_nothing_and_keeps_the_site_rules_choices(task_identity):
    evidence = {n: FAKE_LOCAL if n % 2 else DITTO for n in range(6)}
    phase, sent = _run(p.POOLED_NON_DP, evidence, set(evidence))
    site_rule, site_sent = _run(p.SITE_RULE, evidence, set(evidence))
    assert not sent and not site_sent and phase["pooled"]["default"] is None
    assert {s: e["chosen"] for s, e in phase["per_site"].items()} \
        == {s: e["chosen"] for s, e in site_rule["per_site"].items()} == dict.fromkeys(phase["per_site"], p.GLOBAL)
    assert all(e["rule"] == "own" and e["decided_by"] == OWN_RULE and "site_chosen" not in e
               for e in phase["per_site"].values())
    # the `pooled` rule on the same replies pools the DP releases: their +0.5 makes local every site's default
    pooled, pooled_sent = _run(p.POOLED, evidence, set(evidence))
    assert pooled["pooled"]["default"] == p.LOCAL and len(pooled_sent) == 6


def test_a_mixed_federation_pools_and_tells_only_the_sites_without_dp(task_identity):
    evidence = {**dict.fromkeys(range(8), DITTO), 8: FAKE_LOCAL, 9: FAKE_LOCAL}
    phase, sent = _run(p.POOLED_NON_DP, evidence, {8, 9})
    pooled = phase["pooled"]
    assert pooled["default"] == "ditto" and pooled["left_out_under_dp"] == ["clinic_08", "clinic_09"]
    assert pooled["gains"][p.LOCAL]["sites"] == 8 and pooled["gains"][p.LOCAL]["gain"] == pytest.approx(-0.10)
    assert sorted(m.metadata.dst_node_id for m in sent) == list(range(8)) and pooled["told"] == [
        f"clinic_{n:02d}" for n in range(8)]
    for n, entry in enumerate(e for _, e in sorted(phase["per_site"].items())):
        if n < 8:
            assert (entry["rule"], entry["chosen"], entry["evidence_dp"]) == ("pooled", "ditto", False)
        else:
            assert (entry["rule"], entry["chosen"], entry["evidence_dp"]) == ("own", p.GLOBAL, True)
            assert entry["decided_by"] == OWN_RULE and entry["reason"] == "own rule: global"
    # what the results and the report say per site
    from simulation.personalisation import personalisation_results, report_section

    for entry in phase["per_site"].values():
        entry["validation"] = {}
    parts = personalisation_results(phase)
    assert parts["clinic_09"]["decided_by"] == OWN_RULE and parts["clinic_00"]["rule"] == "pooled"
    metric = {"response": {"auc": 0.8}}
    names = sorted(parts)
    entry = {"candidates": {c: {"per_site": dict.fromkeys(names, metric)} for c in CANDIDATES},
             "chosen": {s: parts[s]["chosen"] for s in names}, "per_site": dict.fromkeys(names, metric)}
    text = "\n".join(report_section({"models": {"ann": {"personalised": entry}},
                                     "task": {"outcomes": [["response", "binary"]]}, "personalisation": parts}))
    assert "pooled from the validation evidence of the sites without DP" in text
    assert f"- clinic_09: global — decided by {OWN_RULE}; own rule: global" in text
    assert "- clinic_00: ditto — decided by pooled default ditto: gain +0.0100" in text


# --- the site --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dp", [False, True])
def test_under_the_default_rule_only_a_site_without_dp_waits_for_the_default(personalising_clinic, task_identity, dp):
    """The one site-side change: a DP site under ``pooled-non-dp`` is told nothing, so it keeps only its own
    choice; a site without DP keeps every candidate until told. Its reply says which it is."""
    from client.dp import start_run
    from shared.protocol.privacy import RunPlan

    root, name = personalising_clinic
    plan = p.Personalisation(methods=("ditto",), epochs=1)
    assert plan.choice == p.POOLED_NON_DP
    msg, request = personalise_request(root, name, plan, dp=dp, run_id=13 + dp)
    if dp:
        start_run(request.context, request.dp, RunPlan(("statistics", "training", "evaluation", "personalisation")))
    content = personalise(msg, request)
    assert p.evidence_under_dp(content) is dp
    folder = request.source.folder / SITE_RECORD_DIR / request.name
    run = 13 + dp
    stored = sorted(f.stem for f in (folder / CANDIDATES_DIR.format(run=run)).glob("*.pt"))
    assert stored == ([] if dp else sorted(CANDIDATES))
    record = json.loads((folder / f"{run}.json").read_text())
    assert "evidence" in record and (folder / f"{run}-{record['chosen']}.pt").is_file()
