"""One-message rounds (``RunSettings.one_message_rounds``): a site without DP evaluates the model it receives in
the same exchange as it trains, so R rounds are R + 1 exchanges, and the record holds the figures of Flower's
two-exchange rounds (train, then evaluate the new aggregate)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from flwr.app import Context, Message

import client.app
from client.site import SiteSource
from shared.protocol.training import EVALUATE_RECEIVED, RECEIVED_EVALUATION
from simulation.clinics import SitePrivacy, generate_sites
from simulation.experiment import ExperimentConfig, flower_environment, quiet_flower, run_federation

pytestmark = pytest.mark.slow
ROUNDS = 3
SITES = ("clinic_00", "clinic_01", "clinic_02")  # clinic_02 under DP


def message_logger(path: Path):
    """A client mod appending a JSON line per train/evaluate message: site, type, asked to evaluate the received
    model, replied with that evaluation."""

    def log(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type in ("train", "evaluate"):
            entry = {"site": SITES[int(context.node_config["partition-id"])], "type": msg.metadata.message_type,
                     "asked": EVALUATE_RECEIVED in msg.content["config"],
                     "answered": not reply.has_error() and RECEIVED_EVALUATION in reply.content}
            with open(path, "a") as out:
                out.write(json.dumps(entry) + "\n")
        return reply

    return log


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_ray):
    out = tmp_path_factory.mktemp("one_message")
    flower_environment(out)
    quiet_flower()
    generate_sites(2, seed=5, out=out / "sites", privacy=SitePrivacy(dp=False))
    generate_sites(3, seed=5, out=out / "dp_sites", privacy=SitePrivacy(dp=True, epsilon=3.0))
    (out / "dp_sites" / "clinic_02").rename(out / "sites" / "clinic_02")
    real = client.app.make_client_app
    result = {}
    # one-message rounds with the DP site (its budget is spent in a run); then both modes without it, whose
    # models are the same (DP-SGD's noise would differ from run to run)
    for name, one_message, sites in (("mixed", True, SITES), ("one", True, SITES[:2]), ("two", False, SITES[:2])):
        log = out / f"messages-{name}.jsonl"
        cfg = ExperimentConfig(out=out / name, rounds=ROUNDS, seed=5, models="ann", compare=False,
                               policy=False, one_message_rounds=one_message)
        client.app.make_client_app = lambda sites, mods=None, log=log: real(sites, mods=[*(mods or []),
                                                                                    message_logger(log)])
        try:
            record = run_federation(cfg, [SiteSource(out / "sites" / site) for site in sites])
        finally:
            client.app.make_client_app = real
        result[name] = record, [json.loads(line) for line in log.read_text().splitlines()]
    return result


def test_a_site_without_dp_has_one_exchange_per_round_and_one_final_evaluation(runs):
    record, messages = runs["mixed"]
    assert record.sites == list(SITES)
    for entry in record.models["ann"].rounds:  # sites with and without DP trained together in every round
        assert set(entry["per_site"]) == set(SITES) and not entry["failures"]
        assert all("train" in entry["per_site"][site] for site in SITES)
    for site in ("clinic_00", "clinic_01"):
        mine = [(m["type"], m["asked"], m["answered"]) for m in messages if m["site"] == site]
        assert sorted(mine) == sorted([("train", False, False)] + [("train", True, True)] * (ROUNDS - 1)
                                      + [("evaluate", False, False)])
    dp = [(m["type"], m["answered"]) for m in messages if m["site"] == "clinic_02"]  # asked, but a DP site
    assert Counter(dp) == {("train", False): ROUNDS, ("evaluate", False): 1}  # evaluates at the final round only
    _, two = runs["two"]
    assert Counter(m["type"] for m in two if m["site"] == "clinic_00") == {"train": ROUNDS, "evaluate": ROUNDS}
    assert not any(m["asked"] for m in two)


def test_the_record_holds_the_same_rounds_and_figures_either_way(runs):
    one, two = runs["one"][0].models["ann"], runs["two"][0].models["ann"]
    assert [r["round"] for r in one.rounds] == [r["round"] for r in two.rounds] == list(range(1, ROUNDS + 1))
    for a, b in zip(one.rounds, two.rounds, strict=True):
        assert set(a["per_site"]) == set(b["per_site"]) == set(SITES[:2]) and not a["failures"]
        for site in SITES[:2]:
            for outcome in ("response", "toxicity_grade3"):
                x, y = a["per_site"][site]["evaluate"][outcome], b["per_site"][site]["evaluate"][outcome]
                assert x["n"] == y["n"] > 0
                assert x["auc"] == pytest.approx(y["auc"], abs=1e-6)  # same model, up to FedAvg's sum order
        assert a["overall"]["response"]["auc"] == pytest.approx(b["overall"]["response"]["auc"], abs=1e-6)
    assert one.final["overall"]["response"]["auc"] == pytest.approx(two.final["overall"]["response"]["auc"],
                                                                     abs=1e-6)
