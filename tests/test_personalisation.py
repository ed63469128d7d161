"""Personalised ANNs at a site (issue 18): each method on small tensors, the site's choice rule, the wire format,
and the site's handler with and without DP (its steps charged to the ledger, no weight in the reply)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict

from client.dp import SiteDP, start_run
from client.personalisation_handlers import PHASE, SITE_RECORD_DIR, personalise
from client.personalised import METHODS, Ditto, FedPer, FineTune, LocalOnly, trainers
from client.personalised.choice import choose, validation_score
from client.site import SiteRequest, SiteSource, load
from client.training import DPConfig, EncodedSplit, proximal_step, split_site
from client.training_handlers import EVAL_BINS
from shared import metrics
from shared.ann import AnnSpec, MultiTaskMLP, build_model, to_arrays
from shared.encoding import fit_local
from shared.protocol import messages
from shared.protocol import personalisation as p
from shared.protocol import records as r
from shared.protocol.privacy import RunPlan
from shared.protocol.training import AnnTraining
from shared.task import Outcome, TaskSpec
from simulation.clinics import SitePrivacy, generate_sites

SPEC = AnnSpec(n_inputs=4, outcomes=(("response", "binary", 1), ("efficacy", "regression", 1)), hidden=(8, 4))


def _global_model(seed: int = 7) -> MultiTaskMLP:
    torch.manual_seed(seed)
    return MultiTaskMLP(SPEC)


def _data(n: int = 96, seed: int = 0) -> EncodedSplit:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return EncodedSplit(x=x, targets={"response": (x[:, 0] > 0).astype(float), "efficacy": 2 * x[:, 1]}, frame=None)


def _distance(a: MultiTaskMLP, b: MultiTaskMLP) -> float:
    with torch.no_grad():
        return float(sum(((pa - pb) ** 2).sum() for pa, pb in zip(a.parameters(), b.parameters(), strict=True)).sqrt())


def test_fine_tune_starts_from_the_global_weights_and_leaves_the_global_model_untouched():
    global_model = _global_model()
    before = [q.detach().clone() for q in global_model.parameters()]
    tuned = FineTune(epochs=1, lr=1e-7).fit(global_model, _data())
    assert _distance(tuned.model_, global_model) < 1e-4  # a vanishing step from the global weights
    assert _distance(LocalOnly(epochs=1, lr=1e-7).fit(global_model, _data()).model_, global_model) > 0.5
    assert all(torch.equal(q, b) for q, b in zip(global_model.parameters(), before, strict=True))
    assert tuned.model_ is not global_model and tuned.steps_ == tuned.planned_steps(96) == 3


def test_the_proximal_step_of_ditto_pulls_toward_the_global_weights_by_lr_times_lambda():
    global_model = _global_model()
    personal = _global_model()
    with torch.no_grad():
        for q in personal.parameters():
            q.add_(1.0)  # v = w* + 1 everywhere
    anchor = [q.detach().clone() for q in global_model.parameters()]
    lr, lam = 0.1, 0.5
    proximal_step(personal, anchor, lr * lam)
    for v, w in zip(personal.parameters(), global_model.parameters(), strict=True):
        torch.testing.assert_close(v - w, torch.full_like(v, 0.95))  # 1 − lr·λ = 0.95


def test_ditto_with_a_larger_lambda_ends_closer_to_the_global_model_than_fine_tuning():
    global_model, data = _global_model(), _data()
    free = _distance(FineTune(epochs=4, lr=0.05).fit(global_model, data).model_, global_model)
    pulled = _distance(Ditto(lam=5.0, epochs=4, lr=0.05).fit(global_model, data).model_, global_model)
    assert Ditto(lam=0.0, epochs=4, lr=0.05).fit(global_model, data).model_ is not None
    assert pulled < 0.8 * free, (pulled, free)


@pytest.mark.parametrize("dp", [None, DPConfig(noise_multiplier=1.0)])
def test_fedper_keeps_the_global_trunk_and_trains_only_the_heads(dp):
    global_model = _global_model()
    fitted = FedPer(epochs=2, lr=0.05).fit(global_model, _data(), dp=dp, history=[])
    for mine, theirs in zip(fitted.model_.trunk.parameters(), global_model.trunk.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    assert _distance(fitted.model_.heads, global_model.heads) > 0
    assert all(q.requires_grad for q in fitted.model_.parameters())  # the copy is an ordinary model again


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_under_dp_sgd_returns_the_accountants_history_with_its_steps(method):
    data = _data()
    model = METHODS[method](epochs=2, batch_size=32).fit(_global_model(), data, DPConfig(1.2), history=[(2.0, 0.5, 4)])
    assert model.history_[0] == (2.0, 0.5, 4)
    sigma, rate, steps = model.history_[-1]
    assert (sigma, steps) == (1.2, model.planned_steps(len(data))) and math.isclose(rate, 1 / 3)


def test_the_trainers_are_the_local_only_model_and_the_methods_asked_for_with_their_settings():
    plan = p.Personalisation(methods=("ditto", "fedper"), epochs=3, lr=0.01, ditto_lambda=2.0)
    made = trainers(plan, batch_size=16, seed=4, local_epochs=20, local_lr=0.005)
    assert list(made) == [p.LOCAL, "ditto", "fedper"]
    assert (made[p.LOCAL].epochs, made[p.LOCAL].lr) == (20, 0.005)
    assert (made["ditto"].epochs, made["ditto"].lr, made["ditto"].lam, made["ditto"].batch_size) == (3, 0.01, 2.0, 16)
    assert set(METHODS) == set(p.METHODS)


# --- the site's choice ---------------------------------------------------------------------------------------

ORDER = (p.GLOBAL, "finetune", "ditto", p.LOCAL)


def test_the_site_keeps_the_candidate_with_the_best_validation_score_and_says_why():
    chosen, reason = choose({p.GLOBAL: 0.70, "finetune": 0.71, "ditto": 0.74, p.LOCAL: 0.66}, ORDER)
    assert chosen == "ditto"
    assert reason == "best validation score 0.740 (global 0.700, finetune 0.710, local 0.660)"


def test_a_tie_goes_to_the_global_model_and_a_candidate_without_a_score_is_never_chosen():
    assert choose({p.GLOBAL: 0.7, "finetune": 0.7, "ditto": math.nan, p.LOCAL: 0.7}, ORDER)[0] == p.GLOBAL
    assert choose({p.GLOBAL: math.nan, "finetune": 0.6, "ditto": 0.5, p.LOCAL: math.nan}, ORDER)[0] == "finetune"
    chosen, reason = choose(dict.fromkeys(ORDER, math.nan), ORDER)
    assert chosen == p.GLOBAL and "no candidate has a validation score" in reason


def test_the_validation_score_is_the_mean_of_auc_and_r2_over_the_outcomes():
    task = TaskSpec(outcomes=(Outcome("response", "binary"), Outcome("efficacy", "regression")), numeric=("x",),
                    categorical=())
    y = np.array([0, 0, 1, 1])
    summaries = {"response": metrics.summarise("binary", y, np.array([0.1, 0.6, 0.4, 0.9])),  # AUC 0.75
                 "efficacy": metrics.summarise("regression", np.array([1.0, 2, 3, 4]), np.array([1.0, 2, 3, 5]))}
    assert validation_score(task, summaries) == pytest.approx((0.75 + 0.8) / 2)  # R² = 1 − 1/5
    summaries["efficacy"] = metrics.summarise("regression", np.array([1.0, 2, 3, 4]), np.array([9.0, -5, 9, -5]))
    assert validation_score(task, summaries) == pytest.approx(0.75 / 2)  # R² far below 0 counts as 0


# --- the wire ------------------------------------------------------------------------------------------------


def test_the_plan_crosses_the_wire_and_unknown_methods_are_refused_naming_them():
    plan = p.Personalisation(methods=("finetune", "fedper"), epochs=2, lr=0.01, ditto_lambda=0.3)
    assert p.Personalisation.from_config(plan.to_config()) == plan
    assert plan.candidates == (p.GLOBAL, "finetune", "fedper", p.LOCAL)
    assert p.parse_methods(" ditto,finetune,ditto ") == ("ditto", "finetune")
    with pytest.raises(ValueError, match="unknown method.*apfl"):
        p.parse_methods("ditto,apfl")


def test_the_reply_carries_summaries_and_the_choice_but_no_weights():
    summary = metrics.summarise("binary", np.array([0, 1, 1]), np.array([0.2, 0.7, 0.4]), n_bins=20)
    by = {c: {"response": summary} for c in (p.GLOBAL, "ditto", p.LOCAL)}
    reply = p.PersonalisationReply(chosen="ditto", reason="best", summaries={"validation": by, "test": by},
                                   num_examples=3, dp_steps=12, candidates=(p.GLOBAL, "ditto", p.LOCAL))
    content = reply.to_records()
    assert r.ARRAYS not in content and set(content) == {r.METRICS, p.CHOICE}
    back = p.PersonalisationReply.from_records(content)
    assert (back.chosen, back.reason, back.dp_steps, back.candidates) == ("ditto", "best", 12, reply.candidates)
    assert back.summaries["test"]["ditto"]["response"]["hist_pos"] == list(summary["hist_pos"])


# --- the site's handler --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clinic(tmp_path_factory):
    root = tmp_path_factory.mktemp("personal")
    world = generate_sites(2, 5, root / "sites", patients_per_clinic=80,
                           privacy=SitePrivacy(dp=True, epsilon=3.0, delta=1e-5))
    return root, world.clinics[0].name


@pytest.fixture()
def task_identity(monkeypatch):
    """What Flower's runtime sets in a ClientApp process (Message() needs it)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _request(root, name, plan: p.Personalisation, dp: bool):
    source = SiteSource(root / "sites" / name, state_dir=root / "heads")
    site = load(source)
    if not dp:  # a copy: the loaded site is cached for the other tests
        site = dataclasses.replace(site, config={**site.config, "privacy": {"dp": False}})
    encoder = fit_local(split_site(site.episodes, site.task, 5)["train"], site.task)
    config = AnnTraining(local_epochs=1, batch_size=32, lr=0.005, seed=5, split_seed=5, max_grad_norm=1.0,
                         num_rounds=2, hidden=(16, 8)).to_config(encoder)
    config.update(plan.to_config())
    config[EVAL_BINS] = metrics.COARSE_N_BINS
    context = Context(run_id=11, node_id=1, node_config={}, state=RecordDict(), run_config={})
    request = SiteRequest(source, site, config, context)
    model = build_model(encoder, site.task, (16, 8), seed=5)
    msg = Message(RecordDict({r.ARRAYS: to_arrays(model), r.CONFIG: config}), dst_node_id=1,
                  message_type=messages.PERSONALISE.type)
    return msg, request


def test_a_site_without_dp_replies_its_choice_and_keeps_the_chosen_model_in_its_folder(clinic, task_identity):
    root, name = clinic
    plan = p.Personalisation(methods=p.METHODS, epochs=1)
    msg, request = _request(root, name, plan, dp=False)
    content = personalise(msg, request)
    assert not any(isinstance(rec, ArrayRecord) for rec in content.values())
    reply = p.PersonalisationReply.from_records(content)
    assert reply.chosen in plan.candidates and reply.reason.startswith(("kept global", f"{reply.chosen} beat global"))
    assert set(reply.summaries["test"]) == set(plan.candidates) and reply.dp_steps == 0
    kept_in = request.source.folder / SITE_RECORD_DIR / request.name
    kept = json.loads((kept_in / "11.json").read_text())
    assert kept["chosen"] == reply.chosen and set(kept["summaries"]["test"]) == set(plan.candidates)
    assert (kept_in / f"11-{reply.chosen}.pt").is_file()


def test_a_dp_site_charges_every_personalised_step_and_release_to_its_ledger(clinic, task_identity):
    root, name = clinic
    plan = p.Personalisation(methods=p.METHODS, epochs=1)
    msg, request = _request(root, name, plan, dp=True)
    dp = request.dp
    assert isinstance(dp, SiteDP)
    budget = start_run(request.context, dp, RunPlan(("statistics", "training", "evaluation", PHASE)))
    before = dp.ledger.spent()
    content = personalise(msg, request)
    after = SiteDP.of(request.source.folder, request.site.config, state_dir=root / "heads").ledger
    entries = [e for e in after.entries if e["phase"] == PHASE]
    # the local-only model and the three methods (DP-SGD), then the validation and the test releases
    assert len(entries) == 4 + 2
    assert after.spent() > before
    assert after.spent() - before <= budget.epsilon[PHASE] + 1e-6  # within the phase's share
    reply = p.PersonalisationReply.from_records(content)
    assert reply.dp_steps == sum(e["steps"] for e in entries[:4])
    assert reply.reason.endswith("on the noised validation release")
    assert float(content[r.PRIVACY]["epsilon-spent"]) == pytest.approx(after.spent())
