"""The site's side of ``query.personalise`` and ``query.personalise_boosting``: train its personalised models,
choose one, reply metrics only.

From the final global weights the site trains its candidates on its own training split (its local-only model
and each requested method, ``client.personalised``; ``mix`` is made of the global and the local-only model
without training, so it adds no DP-SGD fit), scores them and the global model on its validation split,
chooses (``client.personalised.choice``) and replies :class:`shared.protocol.personalisation.PersonalisationReply`:
the choice, the reason, and every candidate's summaries on the validation and test splits. The personalised
weights stay at the site: the chosen one is saved in the site's folder (``personalisation/<site>/<run>-<name>.pt``)
with the site's own exact record of the figures (``personalisation/<site>/<run>.json``), neither of which is sent
(by site name: CSV sites may share a folder).

Under DP everything is the run's ``personalisation`` phase, one share of the site's ε (``client.dp``):
:data:`TRAINING_PART` of it for the DP-SGD steps of all candidates (one noise multiplier set for all of them,
the same Opacus training and ledger as the federated rounds), the rest for two Gaussian releases — the
validation summaries of every candidate (:data:`VALIDATION_WEIGHT` of the releases' privacy loss: the choice
depends on them), then their test summaries (the rest: they are only reported). The choice is made on the
released (noised) validation figures and the release's σ, so it is post-processing of a DP release; the reply
carries both releases' facts and the number of DP-SGD fits, so the run record counts every ledger entry of the
phase. Without DP the margins come from a paired bootstrap of the site's exact validation rows. Every charge of
the phase is tagged (fit ``i`` at place :data:`FIT_INDEX_BASE` + i, the releases at 0 and 1) and its noise kept in
the node's state (:data:`STATE_KEY`, on the site's disk through ``client.run_state``): a resumed run that redoes
the phase sends the same numbers and is charged nothing new.

The reply also carries the site's validation scores and their covariance (the paired bootstrap without DP; the
release's noise and sampling under DP: post-processing), the evidence the coordinator pools when the plan's choice
is a pooled rule (``shared.selection``): then the site keeps every candidate's weights until
``query.personalise_keep`` (:func:`personalise_keep`) brings the federation's default, chooses again with it in
place of its own and keeps only that model.

``query.personalise_boosting`` (:func:`personalise_boosting`) is the same choice for the finished boosters:
the federation's boosters (global), the site's own local-only boosters and, for ``site-trees``, the
federation's trees with a few more grown on the site's training rows (``client.personalised.site_trees``); for
``mix-trees``, the global and the local-only boosters' predictions mixed (``client.personalised.mix_trees``). A
DP site refuses it (:data:`shared.protocol.personalisation.BOOSTING_DP_REFUSAL`); the server does not ask one.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from client.dp import (
    PhaseRelease,
    PrivacyRefused,
    SiteDP,
    gaussian_release,
    noise_for_phase,
    phase_epsilon,
    release_key,
    release_tag,
    training_seed,
    weighted_noise,
)
from client.evaluation import from_blocks, summaries, summary_blocks
from client.ledger import BudgetExhausted
from client.personalised.choice import choose_by_margin, sampling_se, validation_score
from client.run_state import RUN_ID_KEY
from client.site import SiteHandlers, SiteRequest
from client.split import EncodedSplit
from shared import metrics
from shared.durable import write_json_atomically
from shared.protocol import messages
from shared.protocol import records as r
from shared.protocol.personalisation import (
    BOOSTING_DP_REFUSAL,
    CHOICE,
    DEFAULT_KEY,
    FINETUNE,
    GLOBAL,
    LOCAL,
    MIX,
    MIX_TREES,
    SITE_DEFAULT,
    VALIDATION_PRIVACY,
    Personalisation,
    PersonalisationReply,
    awaits_keep,
)
from shared.protocol.training import EVAL_BINS, AnnTraining
from shared.selection import SiteEvidence, choice_with_default

PHASE = "personalisation"
TRAINING_PART = 0.8
"""Share of the phase's ε a DP site gives DP-SGD; the rest goes to the two summary releases (validation, test)."""
RELEASES = 2
VALIDATION_WEIGHT = 0.75
"""The validation release's share of the two releases' Rényi privacy loss (``client.dp.PhaseRelease``)."""
FIT_INDEX_BASE = RELEASES
"""Ledger place (``round``) of candidate ``i``'s DP-SGD fit: ``FIT_INDEX_BASE + i``, after the releases' 0 and 1,
so every charge of the phase has a place of its own and a redone one is charged once (``client.ledger``)."""
STATE_KEY = "dp-personalisation-noise"
"""Node-state record of the phase's noise in this run (kept on the site's disk by ``client.run_state``): a resumed
run redoing the phase trains and releases at the noise the first attempt set, so it sends the same numbers."""
SITE_RECORD_DIR = "personalisation"
"""Folder in the site's folder holding its chosen personalised model and its own exact record of the figures."""

Predictions = dict[str, dict[str, np.ndarray]]


def personalise(msg: Message, request: SiteRequest) -> RecordDict:
    """Train, score, choose; reply the choice and the summaries (module docstring)."""
    # torch (and Opacus for a DP site) load with the messages that train (client.app)
    from client.personalised.candidates import mixes, trainers
    from shared.ann import predict

    settings = AnnTraining.from_config(request.config)
    plan = Personalisation.from_config(request.config)
    global_model = request.ann(msg.content[r.ARRAYS])
    train_split = request.encoded("train")
    models = trainers(plan, settings.batch_size, settings.seed,
                      local_epochs=settings.num_rounds * settings.local_epochs, local_lr=settings.lr)
    dp = request.dp
    dp_steps = 0
    if dp is None:
        for model in models.values():
            model.fit(global_model, train_split)
    else:
        noise = _phase_noise(request, dp)
        epsilon, spent_at_start = float(noise["epsilon"]), float(noise["spent-at-start"])
        dp_steps = _fit_private(models, global_model, train_split, dp, settings, noise, request)
    made = models | mixes(plan, models, global_model)  # the mixes are of trained models: no fit, no ledger entry
    splits = {"validation": request.encoded("val"), "test": request.encoded("test")}
    predictions = {split: {GLOBAL: predict(global_model, data.x)} | {name: m.predict(data.x) for name, m in
                                                                      made.items()}
                   for split, data in splits.items()}
    exact = {split: {name: summaries(request.encoder, splits[split], p) for name, p in by.items()}
             for split, by in predictions.items()}
    content = RecordDict()
    if dp is None:
        n_bins = int(request.config.get(EVAL_BINS, metrics.DEFAULT_N_BINS))
        released = {split: {name: summaries(request.encoder, splits[split], p, n_bins=n_bins) for name, p in by.items()}
                    for split, by in predictions.items()}
        n = len(splits["test"])
    else:
        if "release-sigmas" not in noise:  # set once per run, after the fits (a redone phase reuses them)
            left = spent_at_start + epsilon - dp.ledger.spent()
            noise["release-epsilon"] = left
            noise["release-spent-at-start"] = dp.ledger.spent()
            noise["release-sigmas"] = list(weighted_noise(left, dp.ledger, (VALIDATION_WEIGHT, 1 - VALIDATION_WEIGHT)))
        release = PhaseRelease(dp, PHASE, RELEASES, tuple(float(s) for s in noise["release-sigmas"]),
                               str(request.context.run_id), epsilon=float(noise["release-epsilon"]),
                               spent_at_start=float(noise["release-spent-at-start"]))
        released, facts = {}, {}
        for index, split in enumerate(("validation", "test")):
            released[split], facts[split] = _private(request, splits[split], predictions[split], release, index)
        n = max((s["n"] for s in released["test"][GLOBAL].values()), default=0)
        content[VALIDATION_PRIVACY] = facts["validation"].to_record()
        content[r.PRIVACY] = facts["test"].to_record()
    task = request.site.task
    # a site without DP chooses on its exact, finely binned figures (its release is binned as the run's
    # evaluation: coarsely in a run with DP sites, so summaries add up, which blurs a close AUC); a DP site on
    # its release
    chosen_on = exact if dp is None else released
    order = ann_order(plan)
    scores = {name: validation_score(task, chosen_on["validation"][name]) for name in order}
    rng = np.random.default_rng(settings.seed)
    if dp is None:
        draws = bootstrap_scores(request, splits["validation"], predictions["validation"], order,
                                 metrics.DEFAULT_N_BINS, rng)
        spread = paired_differences_sd(draws, order)
        covariance = score_covariance(draws, order)
    else:
        variance = released_score_variance(request, released["validation"], release.sigma_at(0), order, rng)
        spread = independent_difference_sd(variance, order)
        covariance = {(name, name): v for name, v in variance.items()}  # the candidates' noise is independent
    chosen, reason = choose_by_margin(scores, spread, order)
    if dp is not None:
        reason += " on the noised validation release"
    evidence = SiteEvidence(scores, covariance)
    weights = {name: made[name].model_ if name in made else global_model for name in plan.candidates}
    _keep_at_site(request, chosen, reason, exact, weights[chosen],
                  candidates=weights if awaits_keep(plan.choice, dp is not None) else None, evidence=evidence,
                  order=order)
    reply = PersonalisationReply(chosen=chosen, reason=reason, summaries=released, num_examples=n,
                                 dp_steps=dp_steps, candidates=plan.candidates,
                                 dp_fits=len(models) if dp is not None else 0, scores=scores,
                                 covariance=covariance)
    for name, record in reply.to_records().items():
        content[name] = record
    return content


def personalise_boosting(msg: Message, request: SiteRequest) -> RecordDict:
    """Grow site trees on the finished boosters, train local-only boosters, choose on the validation split by
    the paired-bootstrap margin, reply the choice and every candidate's summaries (module docstring)."""
    from client.boosting import train_pooled_heads  # XGBoost: loaded by the messages that use it (client.app)
    from client.personalised.site_trees import SiteTrees
    from shared import boosting
    from shared.protocol.boosting import BoostingRound, boosters_of

    if request.dp is not None:
        raise PrivacyRefused(BOOSTING_DP_REFUSAL)
    plan = Personalisation.from_config(request.config)
    settings = BoostingRound.from_config(request.config)
    encoder = request.encoder
    train_split = request.encoded("train")
    federated = boosters_of(msg.content)
    config = boosting.BoostingConfig(eta=settings.eta, max_depth=settings.max_depth, seed=settings.seed)
    models = {GLOBAL: federated,
              LOCAL: train_pooled_heads(encoder, train_split.x, train_split.targets, config, plan.local_rounds)}
    mixed = None
    if MIX_TREES in plan.methods:  # of the two above: nothing trained
        from client.personalised.mix_trees import MixTrees

        mixed = MixTrees(alpha=plan.mix_alpha, space=plan.mix_space).fit(federated, models[LOCAL])
        models[MIX_TREES] = mixed.files()
    if "site-trees" in plan.methods:
        models["site-trees"] = {
            head.key: bytes(SiteTrees(n_trees=plan.site_trees, eta=settings.eta, reg_lambda=plan.site_trees_lambda,
                                      objective=boosting.OBJECTIVES[head.kind], seed=settings.seed)
                            .fit(federated[head.key], train_split.x, boosting.head_labels(head, train_split.targets))
                            .booster_.save_raw("json"))
            for head in boosting.heads(encoder)}
    n_bins = int(request.config.get(EVAL_BINS, metrics.DEFAULT_N_BINS))
    splits = {"validation": request.encoded("val"), "test": request.encoded("test")}
    predictions = {split: {name: mixed.predict(encoder, data.x) if name == MIX_TREES
                           else boosting.predict_heads(models[name], encoder, data.x) for name in plan.candidates}
                   for split, data in splits.items()}
    released = {split: {name: summaries(encoder, splits[split], p, n_bins=n_bins) for name, p in by.items()}
                for split, by in predictions.items()}
    task = request.site.task
    order = boosting_order(plan)
    scores = {name: validation_score(task, released["validation"][name]) for name in order}
    spread = paired_bootstrap_sd(request, splits["validation"], predictions["validation"], order, n_bins,
                                 np.random.default_rng(settings.seed))
    chosen, reason = choose_by_margin(scores, spread, order)
    _keep_boosters_at_site(request, chosen, reason, released, models[chosen])
    reply = PersonalisationReply(chosen=chosen, reason=reason, summaries=released, num_examples=len(splits["test"]),
                                 candidates=plan.candidates)
    return reply.to_records()


def ann_order(plan: Personalisation) -> tuple[str, ...]:
    """The ANN choice's candidates, the one kept unless another beats it first: the global model fine-tuned on the
    site's training split (``finetune``) when asked for, then global, the other methods, local-only; else the
    plan's order (global first).

    Why fine-tuning is the default: on average it was at or above max(local-only, global) per site in every run
    measured, and never below it by more than the test split's SE at any site (simulator, 10 clinics: +0.002
    without DP, +0.000 and +0.012 under DP at ε = 3; the liposome table split by drug: +0.012), while keeping
    the global model by default lost to max(local-only, global) where a site's validation split could not tell
    the small gain from noise (−0.026 under DP at seed 1; −0.009 on the liposome sites, whose 4-8 validation
    rows let no candidate pass the margin). BENCHMARKS.md, "Personalised ANNs and each site's choice" and
    "Personalisation on real data split by drug".

    When the mix (``mix``) is asked for it is the default instead, then global, the other methods, local-only. As
    every site's model (α = 0.75) it came closest to max(local-only, global) of all candidates on the simulator
    without DP on the seeds α was picked on (−0.003 AUC on average over seeds 0-4; fine-tuning −0.022, global
    −0.007) and tied the others on held-out seeds (5-9: −0.0105; global −0.0094, fine-tuning −0.0112), losing the
    fewest sites by more than their SE (1 of 26; fine-tuning 3); under DP (ε = 3, seeds 2-7) the choice with it as
    default was −0.0064 and lost no site (fine-tuning at every site −0.0042, one site). BENCHMARKS.md,
    "Personalisation: mixing the global and the local-only model"."""
    if MIX in plan.methods:
        return (MIX, GLOBAL, *(m for m in plan.methods if m != MIX), LOCAL)
    if FINETUNE not in plan.methods:
        return plan.candidates
    return (FINETUNE, GLOBAL, *(m for m in plan.methods if m != FINETUNE), LOCAL)


def boosting_order(plan: Personalisation) -> tuple[str, ...]:
    """The boosting choice's candidates, the one kept unless another beats it first: the federation's trees with
    the site's own added (``site-trees``) when asked for, then global, then local-only. The site trees are the
    global boosters plus a few shrunken trees (η 0.1, depth 3, leaf weights penalised by
    ``Personalisation.site_trees_lambda``), so they stay close to the global model; with
    global as the default, 10 clinics × 3 seeds kept it at 12 of 16 sites although the site trees were better
    on average (BENCHMARKS.md, "Personalised boosting")."""
    return (*plan.methods, GLOBAL, LOCAL)


BOOSTING_RECORD = "{run}-xgboost"
"""Stem of a site's record and chosen boosters of ``query.personalise_boosting`` in its record folder."""


def _keep_boosters_at_site(request: SiteRequest, chosen: str, reason: str, exact: dict,
                           boosters: dict[str, bytes]) -> None:
    """The chosen boosters (one XGBoost JSON per head) and the site's figures, in the site's own folder."""
    folder = site_record_folder(request.source.folder, request.name)
    stem = BOOSTING_RECORD.format(run=request.context.run_id)
    (folder / f"{stem}-{chosen}").mkdir(parents=True, exist_ok=True)
    for head, model in boosters.items():  # a mix's members in a folder each (MixTrees.files)
        (folder / f"{stem}-{chosen}" / f"{head}.json").parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}-{chosen}" / f"{head}.json").write_bytes(model)
    write_json_atomically(folder / f"{stem}.json", _site_record(request, chosen, reason, exact))


def _site_record(request: SiteRequest, chosen: str, reason: str, exact: dict) -> dict:
    """The site's own record of a personalisation phase: its choice and every candidate's summaries."""
    body = {"run_id": str(request.context.run_id), "chosen": chosen, "reason": reason,
            "summaries": {split: {name: {o: {k: np.asarray(v).tolist() for k, v in s.items()} for o, s in by.items()}
                                  for name, by in cands.items()} for split, cands in exact.items()}}
    return json.loads(json.dumps(body))


BOOTSTRAP_DRAWS = 200
"""Draws of each bootstrap that sets the choice's margins (their SDs are then within ≈ 5 %: 1/sqrt(2·200))."""


def paired_bootstrap_sd(request: SiteRequest, data: EncodedSplit, predictions: Predictions,
                        candidates: tuple[str, ...], n_bins: int, rng: np.random.Generator) -> dict[str, float]:
    """SD of ``score(c) − score(default)`` over bootstrap resamples of the validation rows, all candidates scored on
    the same resample (Efron & Tibshirani 1993, ch. 6; paired, so two near-identical models differ by little).
    Without DP only: it reads the site's exact rows."""
    return paired_differences_sd(bootstrap_scores(request, data, predictions, candidates, n_bins, rng), candidates)


def bootstrap_scores(request: SiteRequest, data: EncodedSplit, predictions: Predictions,
                     candidates: tuple[str, ...], n_bins: int, rng: np.random.Generator) -> dict[str, list[float]]:
    """Every candidate's validation score on each of :data:`BOOTSTRAP_DRAWS` resamples of the validation rows, all
    candidates on the same resample (paired). Without DP only: it reads the site's exact rows."""
    task = request.site.task
    draws: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(BOOTSTRAP_DRAWS):
        rows = rng.integers(0, len(data), len(data))
        sample = EncodedSplit(x=data.x[rows], targets={k: v[rows] for k, v in data.targets.items()}, frame=None)
        for name in candidates:
            draws[name].append(validation_score(task, summaries(request.encoder, sample,
                                                                {o: v[rows] for o, v in predictions[name].items()},
                                                                n_bins=n_bins)))
    return draws


def paired_differences_sd(draws: dict[str, list[float]], candidates: tuple[str, ...]) -> dict[str, float]:
    """SD over the draws of ``score(c) − score(candidates[0])`` for every other candidate."""
    default = candidates[0]
    return {name: _finite_sd([a - b for a, b in zip(draws[name], draws[default], strict=True)])
            for name in candidates[1:]}


def score_covariance(draws: dict[str, list[float]], candidates: tuple[str, ...]) -> dict[tuple[str, str], float]:
    """Covariance of the candidates' scores over the paired draws (those where every candidate has a score): what a
    site replies for the federation's pooled default (``shared.selection.SiteEvidence``)."""
    table = np.array([draws[name] for name in candidates], dtype=float)
    table = table[:, np.isfinite(table).all(axis=0)]
    if table.shape[1] < 2:
        return {(a, b): math.nan for a in candidates for b in candidates}
    cov = np.cov(table, ddof=1)
    return {(a, b): float(cov[i, j]) for i, a in enumerate(candidates) for j, b in enumerate(candidates)}


def released_difference_sd(request: SiteRequest, released: dict[str, dict], sigma: float,
                           candidates: tuple[str, ...], rng: np.random.Generator) -> dict[str, float]:
    """SD of ``score(c) − score(default)`` from the validation release alone (:func:`released_score_variance`,
    the candidates independent). Post-processing of the release and its public σ only."""
    return independent_difference_sd(released_score_variance(request, released, sigma, candidates, rng), candidates)


def independent_difference_sd(variance: dict[str, float], candidates: tuple[str, ...]) -> dict[str, float]:
    """SD of ``score(c) − score(candidates[0])`` for every other candidate, from each score's variance, the
    candidates' noise independent (a DP release's)."""
    return {name: math.sqrt(variance[name] + variance[candidates[0]]) for name in candidates[1:]}


def released_score_variance(request: SiteRequest, released: dict[str, dict], sigma: float,
                            candidates: tuple[str, ...], rng: np.random.Generator) -> dict[str, float]:
    """Variance of each candidate's score from the validation release alone: the release's noise (a parametric
    bootstrap: the released blocks noised again with the release's own σ, the same Gaussian mechanism) plus the
    split's sampling (:func:`client.personalised.choice.sampling_se` of the released summaries). Taken as
    independent between candidates (their noise is; their sampling is positively correlated, so a difference's
    variance from these over-states it). Post-processing of the release and its public σ only."""
    task = request.site.task
    blocks = {f"{name}|{key}": block for name in candidates
              for key, block in summary_blocks(request.encoder, released[name]).items()}
    draws: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(BOOTSTRAP_DRAWS):
        noised = gaussian_release(blocks, sigma, rng)
        for name in candidates:
            again = from_blocks(request.encoder, {key.split("|", 1)[1]: value for key, value in noised.items()
                                                  if key.startswith(name + "|")})
            draws[name].append(validation_score(task, again))
    return {name: _finite_sd(draws[name]) ** 2 + sampling_se(task, released[name]) ** 2 for name in candidates}


def _finite_sd(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.stdev(finite) if len(finite) > 1 else math.nan


def _phase_noise(request: SiteRequest, dp: SiteDP) -> ConfigRecord:
    """The phase's noise record of this run (:data:`STATE_KEY`): ε, the ledger's ε when the phase started and, once
    set, DP-SGD's σ and the releases' σ; made at the first attempt, the same record at a redone one."""
    context = request.context
    state = context.state.get(STATE_KEY)
    if state is not None and str(state[RUN_ID_KEY]) == str(context.run_id):
        return state
    context.state[STATE_KEY] = ConfigRecord({RUN_ID_KEY: str(context.run_id),
                                             "epsilon": phase_epsilon(context, dp, PHASE),
                                             "spent-at-start": dp.ledger.spent()})
    return context.state[STATE_KEY]


def _fit_private(models: dict, global_model, data: EncodedSplit, dp: SiteDP, settings: AnnTraining,
                 noise: ConfigRecord, request: SiteRequest) -> int:
    """DP-SGD for every candidate at one noise multiplier set for all their steps (within ``TRAINING_PART`` of the
    phase's ε, kept in ``noise``), each candidate's steps charged to the ledger as soon as they are taken, tagged
    with its weights at its own place (:data:`FIT_INDEX_BASE`): a fit redone in the same run (a resumed run) trains
    the same weights from the site's keyed seed and is charged once; returns the steps."""
    from client.training import DPConfig, sample_rate
    from shared.ann import to_arrays

    rate = sample_rate(len(data), settings.batch_size)
    planned = [model.planned_steps(len(data)) for model in models.values()]
    if "sigma" not in noise:
        noise["sigma"] = noise_for_phase(TRAINING_PART * float(noise["epsilon"]), dp.ledger, rate, sum(planned))
    sigma = float(noise["sigma"])
    run = str(request.context.run_id)
    charged = dp.ledger.charged_rounds(run, PHASE)
    pending = sum(n for index, n in enumerate(planned) if FIT_INDEX_BASE + index not in charged)
    if pending:
        dp.ledger.check_affordable(sigma, rate, pending)
    config = DPConfig(noise_multiplier=sigma, max_grad_norm=settings.max_grad_norm)
    key = release_key(dp.ledger)
    taken = 0
    for index, model in enumerate(models.values()):
        place = FIT_INDEX_BASE + index
        model.seed = training_seed(dp.ledger, run, PHASE, index)  # batches and noise: not the coordinator's seed
        accountant = dp.ledger.accountant()
        model.fit(global_model, data, config, history=accountant.history)
        accountant.history = model.history_
        tag = release_tag(key, run, PHASE, place, {k: a.numpy() for k, a in to_arrays(model.model_).items()})
        if place in charged and not dp.ledger.released(run, PHASE, place, tag):
            try:  # other weights than the fit charged here before: a new release, sent only if it fits
                dp.ledger.check_affordable(sigma, rate, model.steps_)
            except BudgetExhausted as err:
                raise PrivacyRefused(f"{PHASE} refused: {err}") from err
        dp.ledger.record_from_accountant(accountant, run_id=run, server_round=place, phase=PHASE, release=tag)
        taken += model.steps_
    return taken


def _private(request: SiteRequest, data: EncodedSplit, predictions: Predictions, release: PhaseRelease,
             index: int):
    """Every candidate's summaries of one split in one Gaussian release (one row touches all of them: their
    blocks together set the sensitivity); returns them and the release's facts."""
    blocks = {}
    for name, p in predictions.items():
        exact = summaries(request.encoder, data, p, n_bins=metrics.COARSE_N_BINS, clip=True)
        blocks |= {f"{name}|{key}": block for key, block in summary_blocks(request.encoder, exact).items()}
    noised, facts = release.release(blocks, index)
    return {name: from_blocks(request.encoder, {key.split("|", 1)[1]: value for key, value in noised.items()
                                                if key.startswith(name + "|")})
            for name in predictions}, facts


CANDIDATES_DIR = "{run}-candidates"
"""Folder (in the site's record folder) of every candidate's weights when the federation sets the default
(:data:`shared.protocol.personalisation.POOLED`): ``query.personalise_keep`` keeps one and removes it."""


def _keep_at_site(request: SiteRequest, chosen: str, reason: str, exact: dict, model,
                  candidates: dict | None = None, evidence: SiteEvidence | None = None,
                  order: tuple[str, ...] = ()) -> None:
    """The chosen model and the site's exact figures, in the site's own folder (never sent); with ``candidates``
    (the pooled choice) every candidate's weights too, until ``query.personalise_keep`` says which to keep."""
    import torch

    folder = site_record_folder(request.source.folder, request.name)
    folder.mkdir(parents=True, exist_ok=True)
    run = str(request.context.run_id)
    torch.save(model.state_dict(), folder / f"{run}-{chosen}.pt")
    if candidates:
        (folder / CANDIDATES_DIR.format(run=run)).mkdir(exist_ok=True)
        for name, weights in candidates.items():
            torch.save(weights.state_dict(), folder / CANDIDATES_DIR.format(run=run) / f"{name}.pt")
    body = _site_record(request, chosen, reason, exact)
    if evidence is not None:
        names = list(order)
        body["evidence"] = metrics.json_safe({
            "order": names, "scores": [evidence.scores.get(c, math.nan) for c in names],
            "covariance": [[evidence.covariance.get((a, b), 0.0) for b in names] for a in names]})
    write_json_atomically(folder / f"{run}.json", body)


def personalise_keep(msg: Message, request: SiteRequest) -> RecordDict:
    """``query.personalise_keep``: choose again with the federation's default (``shared.selection``) on the
    evidence this site recorded in the phase, keep that candidate's weights (the others are removed), update the
    site's record and reply the choice and why (no figure: the coordinator has them)."""
    import shutil

    import torch

    default = str(msg.content[r.CONFIG][DEFAULT_KEY])
    folder = site_record_folder(request.source.folder, request.name)
    run = str(request.context.run_id)
    path = folder / f"{run}.json"
    if not path.is_file() or "evidence" not in (record := json.loads(path.read_text())):
        raise ValueError(f"personalise_keep: {path} holds no evidence of this run's personalisation phase "
                         "(expected the phase to have run here first with the pooled choice)")
    order = tuple(record["evidence"]["order"])
    if default != SITE_DEFAULT and default not in order:
        raise ValueError(f"personalise_keep: the federation's default {default!r} is not among this site's "
                         f"candidates {', '.join(order)}")
    if default == SITE_DEFAULT:  # no significant pooled gain: the site's own rule stands
        chosen = record.get("site_chosen", record["chosen"])
        reason = f"no federation default (no significant pooled gain); {record.get('site_reason', record['reason'])}"
    else:
        chosen, reason = choice_with_default(evidence_from_record(record["evidence"]), order, default)
    stored = folder / CANDIDATES_DIR.format(run=run)
    if (stored / f"{chosen}.pt").is_file():
        torch.save(torch.load(stored / f"{chosen}.pt"), folder / f"{run}-{chosen}.pt")
        shutil.rmtree(stored)
    elif not (folder / f"{run}-{chosen}.pt").is_file():
        raise ValueError(f"personalise_keep: no weights of {chosen} in {stored} (removed by an earlier answer?)")
    if record["chosen"] != chosen:
        (folder / f"{run}-{record['chosen']}.pt").unlink(missing_ok=True)
    record |= {"site_chosen": record.get("site_chosen", record["chosen"]),
               "site_reason": record.get("site_reason", record["reason"]), "chosen": chosen, "reason": reason,
               "federation_default": default}
    write_json_atomically(path, record)
    return RecordDict({CHOICE: ConfigRecord({"chosen": chosen, "reason": reason})})


def evidence_from_record(body: dict) -> SiteEvidence:
    """:class:`shared.selection.SiteEvidence` from a site record's ``evidence`` (``None`` read as NaN)."""
    names = body["order"]

    def number(v) -> float:
        return math.nan if v is None else float(v)

    return SiteEvidence({c: number(v) for c, v in zip(names, body["scores"], strict=True)},
                        {(a, b): number(body["covariance"][i][j]) for i, a in enumerate(names)
                         for j, b in enumerate(names)})


def site_record_folder(site_folder: Path, site: str) -> Path:
    """Where a site keeps its chosen personalised model and its exact record of the phase."""
    return site_folder / SITE_RECORD_DIR / site


def register_personalisation(client, handlers: SiteHandlers) -> None:
    """Add the ``query.personalise``, ``query.personalise_boosting`` and ``query.personalise_keep`` handlers to
    ``client``."""
    client.query(messages.PERSONALISE.action)(handlers(personalise))
    client.query(messages.PERSONALISE_BOOSTING.action)(handlers(personalise_boosting))
    client.query(messages.PERSONALISE_KEEP.action)(handlers(personalise_keep))
