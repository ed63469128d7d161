"""The mixed candidate (``mix``, issue 18): the global and the local-only model's predictions mixed at the site
(``client.personalised.mix``), its formula, its registration, its gain over both members when their errors are
independent, and the site's handler: the mix is a candidate, kept whole, and costs a DP site no DP-SGD fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from client.dp import SiteDP, start_run
from client.personalisation_handlers import PHASE, SITE_RECORD_DIR, personalise
from client.personalised.candidates import METHODS, MIXES, mixes, trainers
from client.personalised.mix import Mix, MixedMLP
from shared import metrics
from shared.ann import AnnSpec, MultiTaskMLP, predict
from shared.protocol import personalisation as p
from shared.protocol.privacy import RunPlan
from tests.personalising_site import personalise_request

SPEC = AnnSpec(n_inputs=4, outcomes=(("response", "binary", 1), ("kind", "multiclass", 3),
                                     ("efficacy", "regression", 1)), hidden=(8, 4))


def _model(seed: int) -> MultiTaskMLP:
    torch.manual_seed(seed)
    return MultiTaskMLP(SPEC)


def _x(n: int = 50) -> np.ndarray:
    return np.random.default_rng(3).normal(scale=3.0, size=(n, 4)).astype(np.float32)


def _logits(model: MultiTaskMLP, x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {k: v.numpy() for k, v in model(torch.as_tensor(x)).items()}


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_in_probability_space_the_mix_is_alpha_times_the_global_probabilities_plus_the_rest_times_the_local(alpha):
    g, loc, x = _model(1), _model(2), _x()
    mixed = Mix(alpha=alpha).fit(g, loc).predict(x)
    pg, pl = predict(g, x), predict(loc, x)
    for name in ("response", "kind", "efficacy"):
        np.testing.assert_allclose(mixed[name], alpha * pg[name] + (1 - alpha) * pl[name], atol=2e-6)
    np.testing.assert_allclose(mixed["kind"].sum(axis=1), 1.0, atol=1e-5)


def test_in_logit_space_the_mix_is_the_sigmoid_and_softmax_of_the_mixed_logits():
    g, loc, x = _model(1), _model(2), _x()
    mixed = Mix(alpha=0.25, space="logit").fit(g, loc).predict(x)
    zg, zl = _logits(g, x), _logits(loc, x)
    z = {k: 0.25 * zg[k] + 0.75 * zl[k] for k in zg}
    np.testing.assert_allclose(mixed["response"], 1 / (1 + np.exp(-z["response"][:, 0])), atol=2e-6)
    softmax = np.exp(z["kind"]) / np.exp(z["kind"]).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(mixed["kind"], softmax, atol=2e-6)
    np.testing.assert_allclose(mixed["efficacy"], z["efficacy"][:, 0], atol=2e-6)
    # the two spaces differ (the geometric and the arithmetic mean of two probabilities)
    assert np.abs(Mix(alpha=0.25).fit(g, loc).predict(x)["response"] - mixed["response"]).max() > 1e-4


def test_the_mix_holds_both_models_trains_neither_and_refuses_a_bad_alpha_or_space():
    g, loc = _model(1), _model(2)
    before = {k: v.clone() for k, v in g.state_dict().items()}
    fitted = Mix(alpha=0.5).fit(g, loc)
    state = fitted.model_.state_dict()
    assert float(state["alpha"]) == 0.5
    assert {"first.heads.response.weight", "second.heads.response.weight"} <= set(state)
    again = MixedMLP(_model(5), _model(6), 0.0, "probability")
    again.load_state_dict(state)  # a site's saved mix loads whole: both members and α
    x = _x()
    np.testing.assert_allclose(predict(again, x)["response"], fitted.predict(x)["response"], atol=1e-7)
    assert all(torch.equal(v, g.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="alpha.*1.5"):
        Mix(alpha=1.5).fit(g, loc)
    with pytest.raises(ValueError, match="space.*rank"):
        Mix(space="rank").fit(g, loc)
    other = MultiTaskMLP(AnnSpec(n_inputs=4, outcomes=SPEC.outcomes, hidden=(6,)))
    with pytest.raises(ValueError, match="differ in architecture"):
        Mix().fit(g, other)


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    return metrics.binary_metrics(metrics.summarise("binary", y, score))["auc"]


def test_two_models_with_independent_errors_mix_into_a_model_better_than_both():
    """Each member sees the signal plus its own independent error (a linear head on one noise feature); their mix
    halves the error's variance, so its AUC and R² beat the better member's: the ensemble effect the mix is for."""
    spec = AnnSpec(n_inputs=3, outcomes=(("response", "binary", 1), ("efficacy", "regression", 1)), hidden=())
    members = []
    for noise_column in (1, 2):
        model = MultiTaskMLP(spec)
        with torch.no_grad():
            for head in model.heads.values():
                head.weight.zero_()
                head.bias.zero_()
                head.weight[0, 0], head.weight[0, noise_column] = 1.0, 1.0  # signal x0 + its own error
        members.append(model)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 3)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=4000) > 0).astype(float)
    mixed = Mix(alpha=0.5).fit(*members).predict(x)
    one, two = (predict(m, x) for m in members)
    aucs = [_auc(y, q["response"]) for q in (one, two, mixed)]
    r2 = [metrics.regression_metrics(metrics.summarise("regression", x[:, 0], q["efficacy"]))["r2"]
          for q in (one, two, mixed)]
    print(f"members AUC {aucs[0]:.3f} / {aucs[1]:.3f}, mix {aucs[2]:.3f}; "
          f"R² {r2[0]:.3f} / {r2[1]:.3f}, mix {r2[2]:.3f}")
    assert aucs[2] > max(aucs[:2]) + 0.03, aucs  # measured 0.802 / 0.800 → 0.849
    assert r2[2] > max(r2[:2]) + 0.4, r2  # errors of variance 1 → 1/2: R² 0.064 / 0.039 → 0.520
    # with one model twice (perfectly correlated errors) the mix is that model: no gain without decorrelation
    same = Mix(alpha=0.5).fit(members[0], members[0]).predict(x)
    assert _auc(y, same["response"]) == pytest.approx(aucs[0])


def test_mix_is_selectable_by_name_crosses_the_wire_and_is_refused_without_the_ann_family():
    assert p.parse_methods("finetune,ditto,fedper,mix") == ("finetune", "ditto", "fedper", "mix")
    assert p.ann_methods("mix,site-trees") == ("mix",)
    assert "mix" in p.family_problem("mix,site-trees", ("xgboost",)) and "ann" in p.family_problem("mix", ("xgboost",))
    plan = p.Personalisation(methods=("finetune", "mix"), mix_alpha=0.7, mix_space="logit")
    assert p.Personalisation.from_config(plan.to_config()) == plan
    assert plan.candidates == (p.GLOBAL, "finetune", "mix", p.LOCAL)
    with pytest.raises(ValueError, match="mix_alpha"):
        p.Personalisation(methods=("mix",), mix_alpha=-0.1)
    assert set(METHODS) | set(MIXES) == set(p.METHODS) and not set(METHODS) & set(MIXES)


def test_the_mix_is_made_of_the_trained_local_only_model_and_is_not_itself_trained():
    plan = p.Personalisation(methods=("mix", "fedper"), epochs=1, mix_alpha=0.4)
    made = trainers(plan, batch_size=16, seed=0, local_epochs=2, local_lr=0.01)
    assert list(made) == [p.LOCAL, "fedper"]  # nothing to train for the mix
    rng = np.random.default_rng(0)
    from client.split import EncodedSplit

    x = rng.normal(size=(64, 4)).astype(np.float32)
    data = EncodedSplit(x=x, targets={"response": (x[:, 0] > 0).astype(float), "kind": (x[:, 1] > 0).astype(float),
                                      "efficacy": x[:, 2]}, frame=None)
    g = _model(1)
    made[p.LOCAL].fit(g, data)
    mix = mixes(plan, made, g)["mix"]
    assert mix.model_.first is g and mix.model_.second is made[p.LOCAL].model_ and mix.alpha == 0.4


def test_a_site_without_dp_scores_and_keeps_the_mix_as_a_candidate(personalising_clinic, task_identity):
    root, name = personalising_clinic
    plan = p.Personalisation(methods=("finetune", "mix"), epochs=1)
    msg, request = personalise_request(root, name, plan, dp=False)
    reply = p.PersonalisationReply.from_records(personalise(msg, request))
    assert set(reply.summaries["test"]) == {p.GLOBAL, "finetune", "mix", p.LOCAL}
    kept = json.loads((request.source.folder / SITE_RECORD_DIR / request.name / "11.json").read_text())
    test = {c: metrics.binary_metrics(kept["summaries"]["test"][c]["response"]) for c in ("mix", p.LOCAL, p.GLOBAL)}
    assert test["mix"]["n"] == test[p.GLOBAL]["n"] > 0
    assert test["mix"]["auc"] not in (test[p.LOCAL]["auc"], test[p.GLOBAL]["auc"])  # a third model, not a copy


def test_a_dp_site_pays_no_dp_sgd_fit_for_the_mix(personalising_clinic, task_identity):
    root, name = personalising_clinic
    plan = p.Personalisation(methods=("mix",), epochs=1)
    msg, request = personalise_request(root, name, plan, dp=True)
    dp = request.dp
    start_run(request.context, dp, RunPlan(("statistics", "training", "evaluation", PHASE)))
    reply = p.PersonalisationReply.from_records(personalise(msg, request))
    after = SiteDP.of(request.source.folder, request.site.config, state_dir=root / "heads").ledger
    entries = [e for e in after.entries if e["phase"] == PHASE and e["run_id"] == "11"]
    assert reply.dp_fits == 1  # the local-only model only
    assert len(entries) == 1 + 2  # its fit, the validation and the test release
    assert set(reply.summaries["validation"]) == {p.GLOBAL, "mix", p.LOCAL}


# --- the boosters' mix (mix-trees) ------------------------------------------------------------------------------


def _encoder():
    """What ``shared.boosting.heads`` reads of an encoder: the task's outcomes and a multiclass outcome's classes."""
    from types import SimpleNamespace

    from shared.task import Outcome, TaskSpec

    task = TaskSpec(outcomes=(Outcome("response", "binary"), Outcome("kind", "multiclass"),
                              Outcome("efficacy", "regression")), numeric=("x",), categorical=())
    return SimpleNamespace(task=task, classes_={"kind": ["a", "b", "c"]})


def _boosters(seed: int, x: np.ndarray) -> dict[str, bytes]:
    import xgboost as xgb

    from shared import boosting

    rng = np.random.default_rng(seed)
    made = {}
    for head in boosting.heads(_encoder()):
        y = (x[:, 0] + rng.normal(size=len(x)) > 0).astype(float) if head.kind == "binary" else x[:, 1] + rng.normal(
            size=len(x))
        params = boosting.BoostingConfig(seed=seed).params(head.kind)
        made[head.key] = bytes(xgb.train(params, xgb.DMatrix(x, label=y), num_boost_round=5).save_raw("json"))
    return made


@pytest.mark.parametrize("space", ["probability", "logit"])
def test_the_boosters_mix_is_the_formula_on_the_heads_predictions_or_margins(space):
    import xgboost as xgb

    from client.personalised.mix_trees import MixTrees
    from shared import boosting

    x = np.random.default_rng(1).normal(size=(60, 3)).astype(np.float32)
    first, second, encoder = _boosters(1, x), _boosters(2, x), _encoder()
    mixed = MixTrees(alpha=0.3, space=space).fit(first, second).predict(encoder, x)
    if space == "probability":
        a, b = boosting.predict_heads(first, encoder, x), boosting.predict_heads(second, encoder, x)
        for name in ("response", "kind", "efficacy"):
            np.testing.assert_allclose(mixed[name], 0.3 * a[name] + 0.7 * b[name], rtol=1e-6)
    else:
        def margin(models, key):
            return xgb.Booster(model_file=bytearray(models[key])).predict(xgb.DMatrix(x), output_margin=True)

        m = {key: 0.3 * margin(first, key) + 0.7 * margin(second, key) for key in first}
        np.testing.assert_allclose(mixed["response"], 1 / (1 + np.exp(-m["response"])), rtol=1e-5)
        np.testing.assert_allclose(mixed["efficacy"], m["efficacy"], rtol=1e-5, atol=1e-6)
        ovr = np.stack([1 / (1 + np.exp(-m[f"kind={c}"])) for c in range(3)], axis=1)
        np.testing.assert_allclose(mixed["kind"], ovr / ovr.sum(axis=1, keepdims=True), rtol=1e-5)
    single = MixTrees(alpha=1.0, space=space).fit(first, second).predict(encoder, x)  # α = 1: the global boosters
    np.testing.assert_allclose(single["response"], boosting.predict_heads(first, encoder, x)["response"], rtol=1e-5)


def test_the_boosters_mix_keeps_both_members_and_is_selectable_only_with_the_boosters():
    from client.personalised.mix_trees import MixTrees

    x = np.random.default_rng(1).normal(size=(40, 3)).astype(np.float32)
    first, second = _boosters(1, x), _boosters(2, x)
    files = MixTrees(alpha=0.5).fit(first, second).files()
    assert {f"global/{k}" for k in first} | {f"local/{k}" for k in second} | {"mix"} == set(files)
    assert json.loads(files["mix"]) == {"alpha": 0.5, "space": "probability", "members": ["global", "local"]}
    with pytest.raises(ValueError, match="heads differ"):
        MixTrees().fit(first, {"response": first["response"]})
    assert p.boosting_methods("mix,mix-trees,site-trees") == ("mix-trees", "site-trees")
    assert "xgboost" in p.family_problem("mix-trees", ("ann",))
    assert p.family_problem("mix,mix-trees", ("ann", "xgboost")) is None


def test_a_site_without_dp_chooses_among_the_boosters_mix_too_and_keeps_both_members_if_chosen(personalising_clinic,
                                                                                                task_identity):
    from flwr.app import Context, Message, RecordDict

    from client.boosting import train_pooled_heads
    from client.personalisation_handlers import BOOSTING_RECORD, personalise_boosting, site_record_folder
    from client.site import SiteRequest
    from client.split import encode
    from shared import boosting
    from shared.protocol import messages
    from shared.protocol.boosting import BoostingRound, evaluation_request

    root, name = personalising_clinic
    plan = p.Personalisation(methods=("mix-trees",), local_rounds=5, mix_alpha=0.5)  # kept here at 0.5 (not 0.75)
    msg, ann_request = personalise_request(root, name, plan, dp=False)  # the site (DP off) and its encoder
    encoder = ann_request.encoder
    config = BoostingRound(eta=0.3, max_depth=3, local_rounds=1, seed=5, split_seed=5, mode="hist").to_config(encoder)
    config.update(plan.to_config())
    train = encode(encoder, ann_request.rows("train"))
    federated = train_pooled_heads(encoder, train.x, train.targets, boosting.BoostingConfig(seed=9), 8)
    context = Context(run_id=12, node_id=1, node_config={}, state=RecordDict(), run_config={})
    request = SiteRequest(ann_request.source, ann_request.site, config, context)
    content = evaluation_request(config, federated)
    reply = p.PersonalisationReply.from_records(personalise_boosting(
        Message(content, dst_node_id=1, message_type=messages.PERSONALISE_BOOSTING.type), request))
    assert reply.candidates == (p.GLOBAL, "mix-trees", p.LOCAL) and reply.chosen in reply.candidates
    test = {c: metrics.binary_metrics(reply.summaries["test"][c]["response"])["auc"] for c in reply.candidates}
    assert test["mix-trees"] not in (test[p.GLOBAL], test[p.LOCAL])
    stem = BOOSTING_RECORD.format(run=12)
    folder = site_record_folder(request.source.folder, request.name) / f"{stem}-{reply.chosen}"
    kept = {f.relative_to(folder).as_posix() for f in folder.rglob("*.json")}
    print(reply.chosen, reply.reason, test)
    assert reply.chosen == "mix-trees"  # the first method named is the default kept unless beaten (boosting_order)
    assert kept == {"mix.json"} | {f"{member}/{key}.json" for member in ("global", "local") for key in federated}


def test_when_the_mix_is_asked_for_it_is_the_default_a_site_keeps_unless_beaten():
    from client.personalisation_handlers import ann_order
    from client.personalised.choice import choose_by_margin

    plan = p.Personalisation(methods=("finetune", "ditto", "fedper", "mix"))
    assert ann_order(plan) == ("mix", p.GLOBAL, "finetune", "ditto", "fedper", p.LOCAL)
    assert ann_order(p.Personalisation(methods=("finetune", "ditto")))[0] == "finetune"  # unchanged without it
    assert plan.mix_alpha == 0.75 and plan.mix_space == "probability"
    scores = {"mix": 0.70, p.GLOBAL: 0.72, "finetune": 0.71, "ditto": 0.70, "fedper": 0.70, p.LOCAL: 0.6}
    assert choose_by_margin(scores, dict.fromkeys(scores, 0.05), ann_order(plan))[0] == "mix"


@pytest.mark.parametrize(("family", "candidates", "words"), [
    ("ann", (p.GLOBAL, "finetune", "mix", p.LOCAL), "kept its default (the mix of the global and its local-only mod"),
    ("xgboost", (p.GLOBAL, "mix-trees", p.LOCAL), "kept its default (the mix of the global and its local-only boo"),
])
def test_the_report_names_the_mix_as_the_default_the_sites_kept(family, candidates, words):
    from simulation.personalisation import report_section

    metric = {"response": {"auc": 0.8}}
    entry = {"candidates": {c: {"per_site": {"clinic_00": metric}} for c in candidates},
             "chosen": {"clinic_00": candidates[1]}, "per_site": {"clinic_00": metric}}
    results = {"models": {family: {"personalised": entry}}, "task": {"outcomes": [["response", "binary"]]}}
    text = " ".join("\n".join(report_section(results, family)).split())
    assert words in text and "| clinic_00 | 0.800 | 0.800 |" in text
