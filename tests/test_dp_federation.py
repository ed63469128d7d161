"""A DP site releases nothing unaccounted: in a Flower simulation of a whole run (statistics, DP-SGD, final
evaluation, histogram boosting, importance, dose adjuster, policy), every reply a DP site sends is either one
of the public answers the protocol names, or carries the facts of a DP release — and its privacy ledger holds
exactly one entry per such release, phase by phase, within its budget."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from flwr.app import Context, Message

import client.app
from client.ledger import SITE_LEDGER_FILE as LEDGER_FILE
from client.ledger import PrivacyLedger
from client.site import SiteSource
from shared.protocol import hist as h
from shared.protocol import records as r
from shared.protocol.privacy import PUBLIC_RELEASES
from simulation.clinics import SitePrivacy, generate_sites
from simulation.experiment import (
    ExperimentConfig,
    flower_environment,
    prepare_kit,
    quiet_flower,
    run_federation,
)

pytestmark = pytest.mark.slow
DP_SITE_SHARES = (("adjuster", 0.1), ("boosting", 0.2))


def reply_logger(path: Path):
    """A Flower client mod appending one JSON line per reply: node, message type, and what it carries."""

    def log_reply(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        entry = {"partition": int(context.node_config.get("partition-id", -1)), "type": msg.metadata.message_type,
                 "error": reply.has_error()}
        if not reply.has_error():
            entry["records"] = sorted(reply.content.keys())
            facts = [r.PRIVACY] + [h.privacy_key(i) for i in range(len(reply.content))]  # hist: one per head
            entry["phases"] = [str(reply.content[key]["phase"]) for key in facts
                               if key in reply.content and "phase" in reply.content[key]]
            if r.METRICS in reply.content and "epsilon" in reply.content[r.METRICS]:
                entry["dp_sgd"] = True
        with open(path, "a") as out:
            out.write(json.dumps(entry) + "\n")
        return reply

    return log_reply


@pytest.fixture(scope="module")
def federation(tmp_path_factory, shared_ray):
    out = tmp_path_factory.mktemp("dp_run")
    flower_environment(out)
    quiet_flower()
    cfg = ExperimentConfig(out=out, clinics=3, rounds=2, seed=5, models="ann,xgboost", boosting="hist",
                           xgb_rounds=2, fqi_iterations=2, compare=False)
    world = generate_sites(3, 5, out / "sites", patients_per_clinic=60,
                           privacy=SitePrivacy(dp=True, epsilon=3.0, shares=DP_SITE_SHARES))
    sources = prepare_kit(cfg, [SiteSource(out / "sites" / c.name) for c in world.clinics], fresh=True)
    log = out / "replies.jsonl"
    # run_federation builds its ClientApp with client.app.make_client_app(sources, mods=...): add the logging mod
    real = client.app.make_client_app
    client.app.make_client_app = lambda sites, mods=None: real(sites, mods=[*(mods or []), reply_logger(log)])
    try:
        record = run_federation(cfg, sources)
    finally:
        client.app.make_client_app = real
    replies = [json.loads(line) for line in log.read_text().splitlines()]
    return record, sources, replies


def test_every_reply_of_a_dp_site_is_public_or_a_charged_release(federation):
    record, sources, replies = federation
    public = {f"query.{action}" for action in PUBLIC_RELEASES} | {"query.hist_ranges"}
    for reply in replies:
        if reply["error"] or reply["type"] in public:
            continue
        assert reply["phases"] or reply.get("dp_sgd"), reply  # noised and charged, or a DP-SGD round


def test_each_sites_ledger_holds_one_entry_per_release_it_sent_phase_by_phase(federation):
    record, sources, replies = federation
    for partition, source in enumerate(sources):
        mine = [x for x in replies if x["partition"] == partition and not x["error"]]
        sent = Counter(phase for x in mine for phase in x.get("phases", []))
        sent["training"] = sum(1 for x in mine if x.get("dp_sgd"))
        ledger = PrivacyLedger.open(source.folder / LEDGER_FILE, 3.0, 1e-5)
        charged = Counter(entry["phase"] for entry in ledger.entries)
        assert charged == sent, (source.path.name, charged, sent)
        assert set(charged) == {"statistics", "training", "evaluation", "boosting", "adjuster", "policy"}
        assert ledger.spent() <= 3.0 + 1e-9
        privacy = record.privacy[source.path.name]
        assert privacy.epsilon_spent == pytest.approx(ledger.spent())
        assert {phase: n for phase, n in privacy.releases.items()} == dict(sent)


def test_what_has_no_dp_form_never_reached_a_dp_site_and_the_record_says_why(federation):
    record, _, replies = federation
    assert not [x for x in replies if x["type"] in ("query.importance", "train.xgboost")]
    for site in record.sites:
        assert "no DP form" in record.privacy[site].refused["importance"]
    assert record.models["ann"].importance["refused"].keys() == set(record.sites)
    assert record.policy is not None and record.policy["adjustment"]["fitted"]
    # the adjuster's noised sums went masked (the run's secure sum, pairwise by default), each release charged once
    assert record.policy["adjustment"]["secure_sum"]["mode"] == "pairwise"
    assert record.policy["adjustment"]["secure_sum"]["releases"] == 1 + 2
