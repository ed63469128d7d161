"""The wire protocol (shared.protocol): one definition of every message, key and error code, and conversions
that read back what they wrote."""

from __future__ import annotations

import pytest

from client.app import make_client_app
from shared.boosting import Head
from shared.protocol import ErrorCode, messages
from shared.protocol.boosting import BoostingRound, head_from_config, head_to_config
from shared.protocol.policy import Installed, catalogue_of, catalogue_reply
from shared.protocol.privacy import PHASES, PUBLIC_RELEASES, ReleaseFacts, RunPlan, SitePrivacy
from shared.protocol.site_check import SiteCheckReply, plan_of, request
from shared.protocol.training import AnnTraining, TrainReply


def every_message() -> list[messages.MessageName]:
    return [value for value in vars(messages).values() if isinstance(value, messages.MessageName)]


def test_the_client_app_answers_every_message_of_the_protocol_and_nothing_else():
    registered = set(make_client_app()._registered_funcs)
    wire = {m.type if m.action else f"{m.category}.default" for m in every_message()}
    assert registered == wire


def test_message_types_are_flowers_category_dot_action():
    assert messages.SITE_CHECK.type == "query.site_check"
    assert messages.TRAIN.type == "train" and messages.TRAIN_XGBOOST.type == "train.xgboost"
    with pytest.raises(ValueError, match="Python identifier"):
        messages.query("site-check")


def test_error_codes_are_unique_and_ours():
    codes = [code.value for code in ErrorCode]
    assert len(codes) == len(set(codes)) and min(codes) >= 4000


def test_public_releases_name_messages_of_the_protocol():
    actions = {m.action for m in every_message()}
    assert set(PUBLIC_RELEASES) <= actions


def test_site_check_request_and_reply_round_trip():
    plan = RunPlan(("statistics", "training", "evaluation"))
    assert plan_of(request(plan)) == plan
    privacy = SitePrivacy(dp=True, epsilon_budget=3.0, delta=1e-5, epsilon_spent=0.5,
                          epsilon={"statistics": 0.125, "training": 2.0}, refused={"importance": "no DP form"})
    reply = SiteCheckReply(site="alpha", ok=True, errors=[], warnings=2, summary={}, privacy=privacy)
    assert SiteCheckReply.from_records(reply.to_records()) == reply
    bad = SiteCheckReply(site="beta", ok=False, errors=["episodes.csv, column 'age_years': rows 3"], warnings=0)
    assert SiteCheckReply.from_records(bad.to_records()) == bad


def test_an_unknown_phase_cannot_be_planned():
    with pytest.raises(ValueError, match="unknown phase"):
        RunPlan(("statistics", "gossip"))
    assert set(PHASES) >= set(RunPlan(PHASES).phases)


def test_release_facts_round_trip_as_a_config_record():
    facts = ReleaseFacts("boosting", 4, 12.5, 40.0, 1.2, 3.0, 1e-5)
    assert ReleaseFacts.from_record(facts.to_record()) == facts


def test_training_settings_and_replies_round_trip(tmp_path):
    from shared.encoding import fit_local
    from shared.task import NANOPARTICLE_TASK
    from simulation.clinics import make_world, simulate_clinic

    world = make_world(1, seed=0, patients_per_clinic=20)
    encoder = fit_local(simulate_clinic(world, world.clinics[0])[0], NANOPARTICLE_TASK)
    settings = AnnTraining(local_epochs=2, batch_size=16, lr=0.01, seed=3, split_seed=4, max_grad_norm=1.0,
                           num_rounds=5, hidden=(8, 4), plan=RunPlan(("statistics", "training")))
    assert AnnTraining.from_config(settings.to_config(encoder)) == settings
    exact = TrainReply(num_examples=120, server_round=2, steps=8, train_loss=0.4)
    assert TrainReply.from_metrics(dict(exact.to_metric_record())) == exact
    private = TrainReply(num_examples=117.0, server_round=2, steps=8, epsilon=1.1, epsilon_budget=3.0, delta=1e-5,
                         noise_multiplier=1.7)
    back = TrainReply.from_metrics(dict(private.to_metric_record()))
    assert back == private and back.train_loss is None  # a DP site sends no mean loss over its rows
    round_settings = BoostingRound(eta=0.1, max_depth=4, local_rounds=1, seed=0, split_seed=0, mode="hist")
    assert BoostingRound.from_config(round_settings.to_config(encoder)) == round_settings


@pytest.mark.parametrize("head", [Head("response", "binary"), Head("stage", "binary", 2),
                                  Head("efficacy_pct", "regression")])
def test_a_head_is_written_once_and_read_back(head):
    assert head_from_config(head_to_config(head)) == head


def test_catalogue_and_install_replies_round_trip():
    features = ("particle_size_nm", "zeta_mv")
    catalogue = {"F1": {"particle_size_nm": 90.0, "zeta_mv": -8.0}, "F2": {"particle_size_nm": 120.0, "zeta_mv": 2.0}}
    assert catalogue_of(catalogue_reply(catalogue, features), features) == catalogue
    assert catalogue_of(catalogue_reply({}, features), features) == {}
    assert Installed.from_records(Installed(3, "/x/v3").to_records()) == Installed(3, "/x/v3")
