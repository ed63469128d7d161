"""The federation's pooled default for the personalised ANN choice (issue 18, ``shared.selection``,
``--personalise ...,pooled``): the coordinator sums the sites' paired validation gains over the global model and
sends the significant best (else global) back as every site's default; a site leaves it only by its own margin."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.personalisation_handlers import (
    CANDIDATES_DIR,
    SITE_RECORD_DIR,
    personalise,
    personalise_keep,
    score_covariance,
)
from client.site import SiteRequest, SiteSource, load
from client.split import split_site
from shared import metrics
from shared.ann import build_model, to_arrays
from shared.encoding import fit_local
from shared.protocol import messages
from shared.protocol import personalisation as p
from shared.protocol import records as r
from shared.protocol.training import EVAL_BINS, AnnTraining
from shared.selection import (
    EQUAL,
    PRECISION,
    WEIGHTINGS,
    SiteEvidence,
    choice_with_default,
    choose_by_margin,
    one_sided_z,
    pooled_choices,
    pooled_default,
    pooled_gains,
)
from shared.task import Outcome, TaskSpec
from simulation.clinics import SitePrivacy, generate_sites

ORDER = (p.FINETUNE, p.GLOBAL, "ditto", p.LOCAL)
CANDIDATES = (p.GLOBAL, p.FINETUNE, "ditto", p.LOCAL)


def _site(scores: dict[str, float], sd: float, correlation: float = 0.0) -> SiteEvidence:
    """Evidence with every score's SD ``sd`` and every pair's correlation ``correlation``."""
    cov = {(a, b): sd * sd * (1.0 if a == b else correlation) for a in scores for b in scores}
    return SiteEvidence(scores, cov)


def test_the_pooled_default_is_global_when_the_summed_gain_is_within_its_noise():
    # 5 sites, ditto +0.01 over global at each; difference SD sqrt(2)·0.05 = 0.071 per site: summed +0.05 against
    # z·sd = 2.13 × 0.158 = 0.34 (three alternatives) → not significant
    sites = {f"s{i}": _site({p.GLOBAL: 0.80, p.FINETUNE: 0.80, "ditto": 0.81, p.LOCAL: 0.70}, 0.05)
             for i in range(5)}
    for weighting in WEIGHTINGS:  # equal SDs: both weightings are the same test
        gains = pooled_gains(sites, CANDIDATES, p.GLOBAL, weighting)
        assert gains["ditto"].gain == pytest.approx(0.01) and gains["ditto"].sites == 5
        assert gains["ditto"].sd == pytest.approx(math.sqrt(5 * 2 * 0.05 ** 2) / 5)
        default, why = pooled_default(sites, CANDIDATES, p.GLOBAL, weighting)
        assert default == p.GLOBAL and "no candidate" in why


def test_weighted_by_precision_a_small_noisy_site_cannot_drown_the_large_precise_ones():
    # 6 precise sites: ditto +0.01, difference SD 0.004; one noisy site: ditto −0.30, difference SD 0.2
    precise = {f"s{i}": _site({p.GLOBAL: 0.80, "ditto": 0.81}, 0.02, 0.98) for i in range(6)}
    noisy = {"small": _site({p.GLOBAL: 0.80, "ditto": 0.50}, 0.2 / math.sqrt(2))}
    sites = precise | noisy
    precision = pooled_gains(sites, (p.GLOBAL, "ditto"), p.GLOBAL, PRECISION)["ditto"]
    w_precise, w_noisy = 1 / (2 * 0.02 ** 2 * 0.02), 1 / 0.2 ** 2
    assert precision.gain == pytest.approx((6 * w_precise * 0.01 - w_noisy * 0.30) / (6 * w_precise + w_noisy))
    assert precision.sd == pytest.approx(1 / math.sqrt(6 * w_precise + w_noisy))
    assert pooled_default(sites, (p.GLOBAL, "ditto"), p.GLOBAL, PRECISION)[0] == "ditto"
    # weighted equally the noisy site's −0.30 outweighs six +0.01 (mean −0.034): global
    equal = pooled_gains(sites, (p.GLOBAL, "ditto"), p.GLOBAL, EQUAL)["ditto"]
    assert equal.gain == pytest.approx((6 * 0.01 - 0.30) / 7)
    assert pooled_default(sites, (p.GLOBAL, "ditto"), p.GLOBAL, EQUAL)[0] == p.GLOBAL
    with pytest.raises(ValueError, match="weighting"):
        pooled_gains(sites, (p.GLOBAL, "ditto"), p.GLOBAL, "median")


def test_the_pooled_default_is_the_method_whose_summed_gain_is_significant_though_no_site_alone_shows_it():
    # each site's paired difference SD is 0.006 (scores correlated 0.98): per site ditto's +0.01 is below
    # z·sd = 2.13 × 0.006 = 0.013 (three alternatives); pooled over 10 sites it is +0.01 against 2.13 × 0.0019
    sites = {f"s{i}": _site({p.GLOBAL: 0.80, p.FINETUNE: 0.795, "ditto": 0.81, p.LOCAL: 0.70}, 0.03, 0.98)
             for i in range(10)}
    one = sites["s0"]
    assert one.difference_sd(p.GLOBAL)["ditto"] == pytest.approx(0.03 * math.sqrt(2 * 0.02))
    # alone, a site keeping global by its own rule does not move (the rule before: the site's default decides)
    assert choose_by_margin(one.scores, one.difference_sd(p.GLOBAL), (p.GLOBAL, p.FINETUNE, "ditto", p.LOCAL))[0] \
        == p.GLOBAL
    assert one_sided_z(3) * one.difference_sd(p.GLOBAL)["ditto"] > 0.01
    default, why, choices = pooled_choices(sites, CANDIDATES, p.GLOBAL)
    assert default == "ditto" and why.startswith("pooled over the sites (precision weights) ditto beat global")
    assert all(chosen == "ditto" for chosen, _ in choices.values())


def test_without_the_pairing_the_same_gains_are_not_significant():
    # the covariance matters: the same scores with independent noise of the same SD do not pass
    sites = {f"s{i}": _site({p.GLOBAL: 0.80, p.FINETUNE: 0.795, "ditto": 0.81, p.LOCAL: 0.70}, 0.03, 0.0)
             for i in range(10)}
    assert pooled_default(sites, CANDIDATES, p.GLOBAL)[0] == p.GLOBAL


def test_a_site_leaves_the_federation_default_only_when_its_own_split_beats_it_by_its_margin():
    pooled = {p.GLOBAL: 0.80, p.FINETUNE: 0.795, "ditto": 0.81, p.LOCAL: 0.70}
    strong = _site({**pooled, p.LOCAL: 0.95}, 0.01, 0.5)  # local +0.14 over ditto, difference SD 0.01
    weak = _site({**pooled, p.LOCAL: 0.83}, 0.05, 0.0)  # local +0.02 over ditto, difference SD 0.071
    assert choice_with_default(strong, ORDER, "ditto")[0] == p.LOCAL
    chosen, reason = choice_with_default(weak, ORDER, "ditto")
    assert chosen == "ditto" and reason.startswith("federation default ditto; kept ditto")


def test_a_site_without_a_score_is_left_out_of_the_pool():
    sites = {"a": _site({p.GLOBAL: 0.8, "ditto": 0.9}, 0.01, 0.9),
             "b": _site({p.GLOBAL: math.nan, "ditto": 0.1}, 0.01, 0.9)}
    assert pooled_gains(sites, (p.GLOBAL, "ditto"), p.GLOBAL)["ditto"].sites == 1


def test_the_covariance_of_paired_draws_gives_the_difference_sd_of_the_draws():
    rng = np.random.default_rng(0)
    common = rng.normal(0.8, 0.05, 200)
    draws = {p.GLOBAL: list(common), "ditto": list(common + rng.normal(0.01, 0.01, 200)), p.LOCAL: [math.nan] * 3
             + list(rng.normal(0.7, 0.05, 197))}
    cov = score_covariance(draws, (p.GLOBAL, "ditto", p.LOCAL))
    both = np.isfinite(np.array(draws[p.LOCAL]))
    difference = np.array(draws["ditto"])[both] - np.array(draws[p.GLOBAL])[both]
    evidence = SiteEvidence({p.GLOBAL: 0.8, "ditto": 0.81, p.LOCAL: 0.7}, cov)
    assert evidence.difference_sd(p.GLOBAL)["ditto"] == pytest.approx(np.std(difference, ddof=1), rel=1e-9)
    assert evidence.difference_sd(p.GLOBAL)["ditto"] < 0.02 < math.sqrt(cov[(p.GLOBAL, p.GLOBAL)])


def test_pooled_is_named_among_the_methods_and_crosses_the_wire_in_the_plan_and_the_reply():
    assert p.parse_methods("finetune,ditto,pooled") == ("finetune", "ditto")
    assert p.choice_rule("finetune,ditto,pooled") == p.POOLED and p.choice_rule("finetune") == p.DEFAULT_CHOICE
    assert p.choice_rule("ditto,pooled-equal") == p.POOLED_EQUAL and p.parse_methods("ditto,pooled-equal") == ("ditto",)
    with pytest.raises(ValueError, match="one choice rule"):
        p.choice_rule("pooled,pooled-equal")
    assert p.family_problem("finetune,pooled", ["ann"]) is None
    with pytest.raises(ValueError, match="pool"):
        p.parse_methods("finetune,pool")
    plan = p.Personalisation(methods=("finetune",), choice=p.POOLED)
    assert p.Personalisation.from_config(plan.to_config()).choice == p.POOLED
    with pytest.raises(ValueError, match="choice"):
        p.Personalisation(methods=(), choice="median")
    summary = metrics.summarise("binary", np.array([0, 1, 1]), np.array([0.2, 0.7, 0.4]), n_bins=20)
    by = {c: {"response": summary} for c in (p.GLOBAL, "ditto")}
    cov = {(p.GLOBAL, p.GLOBAL): 0.01, (p.GLOBAL, "ditto"): 0.008, ("ditto", p.GLOBAL): 0.008, ("ditto", "ditto"): 0.02}
    reply = p.PersonalisationReply(chosen="ditto", reason="x", summaries={"validation": by, "test": by},
                                   candidates=(p.GLOBAL, "ditto"), scores={p.GLOBAL: 0.7, "ditto": math.nan},
                                   covariance=cov)
    back = p.PersonalisationReply.from_records(reply.to_records())
    assert back.covariance == cov and back.scores[p.GLOBAL] == 0.7 and math.isnan(back.scores["ditto"])


def test_the_coordinator_sends_the_pooled_default_and_records_each_sites_new_and_own_choice(task_identity):
    from server.personalisation_phase import run_personalisation
    from server.run_record import RunRecord

    summary = metrics.summarise("binary", np.array([0, 1, 1]), np.array([0.2, 0.7, 0.4]), n_bins=20)
    by = {c: {"response": summary} for c in (p.GLOBAL, "ditto", p.LOCAL)}
    current = {"evidence": _site({p.GLOBAL: 0.80, "ditto": 0.81, p.LOCAL: 0.70}, 0.03, 0.98)}
    sent_keep = []

    def send_and_receive(batch):
        batch = list(batch)
        if batch[0].metadata.message_type == messages.PERSONALISE.type:
            return [SimpleNamespace(metadata=SimpleNamespace(src_node_id=m.metadata.dst_node_id),
                                    has_error=lambda: False,
                                    content=p.PersonalisationReply(
                                        chosen=p.GLOBAL, reason="kept global", summaries={"validation": by,
                                                                                          "test": by},
                                        candidates=(p.GLOBAL, "ditto", p.LOCAL),
                                        scores=dict(current["evidence"].scores),
                                        covariance=dict(current["evidence"].covariance)).to_records())
                    for m in batch]
        sent_keep.extend(batch)
        return [SimpleNamespace(metadata=SimpleNamespace(src_node_id=m.metadata.dst_node_id), has_error=lambda: False,
                                content=RecordDict({p.CHOICE: ConfigRecord({
                                    "chosen": str(m.content[r.CONFIG][p.DEFAULT_KEY]) or p.GLOBAL,
                                    "reason": "federation"})}))
                for m in batch]

    nodes = {n: f"clinic_{n:02d}" for n in range(10)}
    sites = SimpleNamespace(usable=nodes, granting=lambda phase: list(nodes), refusing=lambda phase: {})
    record = RunRecord(run_id="1", settings={}, sites=list(nodes.values()))
    task = TaskSpec(outcomes=(Outcome("response", "binary"),), numeric=("x",), categorical=())
    phase = run_personalisation(SimpleNamespace(send_and_receive=send_and_receive), sites, task, ArrayRecord(),
                                ConfigRecord(), p.Personalisation(("ditto",), choice=p.POOLED), record)
    assert phase["pooled"]["default"] == "ditto" and phase["pooled"]["gains"]["ditto"]["sites"] == 10
    assert phase["pooled"]["gains"]["ditto"]["gain"] == pytest.approx(0.01)
    assert phase["pooled"]["weighting"] == PRECISION
    assert len(sent_keep) == 10 and all(m.metadata.message_type == messages.PERSONALISE_KEEP.type for m in sent_keep)
    assert all(e["chosen"] == "ditto" and e["site_chosen"] == p.GLOBAL for e in phase["per_site"].values())
    # pooled-site: the same evidence gives ditto; with no significant gain each site's own default (not global)
    sent_keep.clear()
    phase = run_personalisation(SimpleNamespace(send_and_receive=send_and_receive), sites, task, ArrayRecord(),
                                ConfigRecord(), p.Personalisation(("ditto",), choice=p.POOLED_SITE), record)
    assert phase["pooled"]["default"] == "ditto"
    current["evidence"] = _site({p.GLOBAL: 0.80, "ditto": 0.81, p.LOCAL: 0.70}, 0.05)  # +0.01 within the noise
    sent_keep.clear()
    phase = run_personalisation(SimpleNamespace(send_and_receive=send_and_receive), sites, task, ArrayRecord(),
                                ConfigRecord(), p.Personalisation(("ditto",), choice=p.POOLED_SITE), record)
    assert phase["pooled"]["default"] == p.SITE_DEFAULT
    assert "each site keeps its own choice" in phase["pooled"]["reason"]
    assert {str(m.content[r.CONFIG][p.DEFAULT_KEY]) for m in sent_keep} == {p.SITE_DEFAULT}
    phase = run_personalisation(SimpleNamespace(send_and_receive=send_and_receive), sites, task, ArrayRecord(),
                                ConfigRecord(), p.Personalisation(("ditto",), choice=p.POOLED), record)
    assert phase["pooled"]["default"] == p.GLOBAL
    # the site rule asks nothing more
    sent_keep.clear()
    phase = run_personalisation(SimpleNamespace(send_and_receive=send_and_receive), sites, task, ArrayRecord(),
                                ConfigRecord(), p.Personalisation(("ditto",), choice=p.SITE_RULE), record)
    assert not sent_keep and "pooled" not in phase and phase["per_site"]["clinic_00"]["chosen"] == p.GLOBAL


# --- the site's side -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clinic(tmp_path_factory):
    root = tmp_path_factory.mktemp("pooled")
    world = generate_sites(2, 5, root / "sites", patients_per_clinic=80,
                           privacy=SitePrivacy(dp=False, epsilon=3.0, delta=1e-5))
    return root, world.clinics[0].name


def _request(root, name, plan: p.Personalisation, message_type: str, content: RecordDict | None = None):
    source = SiteSource(root / "sites" / name, state_dir=root / "heads")
    site = load(source)
    site = dataclasses.replace(site, config={**site.config, "privacy": {"dp": False}})
    encoder = fit_local(split_site(site.episodes, site.task, 5)["train"], site.task)
    config = AnnTraining(local_epochs=1, batch_size=32, lr=0.005, seed=5, split_seed=5, max_grad_norm=1.0,
                         num_rounds=2, hidden=(16, 8)).to_config(encoder)
    config.update(plan.to_config())
    config[EVAL_BINS] = metrics.DEFAULT_N_BINS
    context = Context(run_id=12, node_id=1, node_config={}, state=RecordDict(), run_config={})
    request = SiteRequest(source, site, config, context)
    model = build_model(encoder, site.task, (16, 8), seed=5)
    body = content or RecordDict({r.ARRAYS: to_arrays(model), r.CONFIG: config})
    return Message(body, dst_node_id=1, message_type=message_type), request


def test_a_site_keeps_every_candidate_until_told_the_default_then_only_the_model_it_chooses_with_it(clinic,
                                                                                                     task_identity):
    root, name = clinic
    plan = p.Personalisation(methods=(p.FINETUNE, "ditto"), epochs=1, choice=p.POOLED)
    msg, request = _request(root, name, plan, messages.PERSONALISE.type)
    reply = p.PersonalisationReply.from_records(personalise(msg, request))
    assert set(reply.scores) == set(plan.candidates)
    assert all(math.isfinite(reply.covariance[(c, c)]) and reply.covariance[(c, c)] > 0 for c in plan.candidates)
    folder = request.source.folder / SITE_RECORD_DIR / request.name
    stored = folder / CANDIDATES_DIR.format(run=12)
    assert sorted(f.stem for f in stored.glob("*.pt")) == sorted(plan.candidates)
    own = json.loads((folder / "12.json").read_text())["chosen"]
    # the federation's default: local-only, which this site's own rule did not keep
    other = p.LOCAL if own != p.LOCAL else p.GLOBAL
    keep_msg, keep_request = _request(root, name, plan, messages.PERSONALISE_KEEP.type,
                                      RecordDict({r.CONFIG: ConfigRecord({p.DEFAULT_KEY: other})}))
    answer = personalise_keep(keep_msg, keep_request)[p.CHOICE]
    record = json.loads((folder / "12.json").read_text())
    evidence = SiteEvidence(reply.scores, reply.covariance)
    expected = choice_with_default(evidence, tuple(record["evidence"]["order"]), other)
    assert (answer["chosen"], answer["reason"]) == expected
    assert answer["reason"].startswith(f"federation default {other}")
    assert record["chosen"] == answer["chosen"] and record["site_chosen"] == own
    assert record["federation_default"] == other
    assert not stored.exists() and sorted(f.name for f in folder.glob("12-*.pt")) == [f"12-{answer['chosen']}.pt"]
    # pooled-site without a significant pooled gain: the site's own choice stands (a redone answer is the same)
    msg, request = _request(root, name, plan, messages.PERSONALISE.type)
    personalise(msg, request)  # the phase again: every candidate stored anew
    for _ in range(2):
        again, again_request = _request(root, name, plan, messages.PERSONALISE_KEEP.type,
                                        RecordDict({r.CONFIG: ConfigRecord({p.DEFAULT_KEY: p.SITE_DEFAULT})}))
        answer = personalise_keep(again, again_request)[p.CHOICE]
        record = json.loads((folder / "12.json").read_text())
        assert answer["chosen"] == own == record["chosen"] and record["site_chosen"] == own
        assert answer["reason"].startswith("no federation default") and answer["reason"].count("no federation") == 1
        assert (folder / f"12-{own}.pt").is_file() and not stored.exists()
    bad, bad_request = _request(root, name, plan, messages.PERSONALISE_KEEP.type,
                                RecordDict({r.CONFIG: ConfigRecord({p.DEFAULT_KEY: "fedper"})}))
    with pytest.raises(ValueError, match="not among this site's candidates"):
        personalise_keep(bad, bad_request)


def test_the_report_says_the_default_was_the_federations_when_a_pooled_rule_chose():
    from simulation.personalisation import personalisation_results, report_section

    metric = {"response": {"auc": 0.8}}
    entry = {"candidates": {c: {"per_site": {"clinic_00": metric}} for c in (p.GLOBAL, p.FINETUNE, p.LOCAL)},
             "chosen": {"clinic_00": p.FINETUNE}, "per_site": {"clinic_00": metric}}
    phase = {"per_site": {"clinic_00": {"chosen": p.FINETUNE, "reason": "federation default finetune; kept",
                                        "validation": {}, "dp_steps": 0, "site_chosen": p.GLOBAL}}}
    results = {"models": {"ann": {"personalised": entry}}, "task": {"outcomes": [["response", "binary"]]},
               "personalisation": personalisation_results(phase)}
    assert results["personalisation"]["clinic_00"]["site_chosen"] == p.GLOBAL
    text = "\n".join(report_section(results))
    assert "the federation's default, pooled" in text and "kept its default (the fine-tuned model)" not in text
    del phase["per_site"]["clinic_00"]["site_chosen"]
    results["personalisation"] = personalisation_results(phase)
    assert "kept its default (the fine-tuned model)" in "\n".join(report_section(results))
