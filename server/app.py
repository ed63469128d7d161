"""The coordinator's Flower ServerApp: the phases of a federated run, in order, and its record.

| phase | module | what the sites send |
|---|---|---|
| 1. site check | :mod:`server.site_check` | verdict on their data, privacy terms for the run's phases |
| 2. statistics | :mod:`server.statistics_phase` | aggregates for one shared encoder |
| 3. ANN training | :mod:`server.training_phase` | weights each round, evaluation summaries |
| 3b. personalised ANNs (``--personalise``) | :mod:`server.personalisation_phase` | each site's choice, metrics |
| 4. boosting | :mod:`server.boosting_phase` (bagging, cyclic), :mod:`server.hist_phase` | trees; histograms |
| 4b. personalised boosters (``--personalise site-trees``) | :mod:`server.personalisation_phase` | choice, metrics |
| 5. importance | :mod:`server.importance_phase` | permutation loss sums (secure sum) |
| 6. policy (with a signing key) | :mod:`server.policy_phase`, :mod:`server.adjustment_phase` | catalogue, sums |

The run record (:mod:`server.run_record`, ``OUT/federation.json``) and the models (:mod:`shared.artifacts`,
keyed by the run id) go to ``out-dir``. Every phase that sends something derived from a site's rows is in the
run's privacy plan (:class:`shared.protocol.privacy.RunPlan`): a site under DP answers it through its one DP
release or refuses it, and the record shows ε per phase per site. Settings come from the run config
(:mod:`server.settings`); in-process simulations pass overrides to :func:`make_server_app`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from server.boosting_phase import boosting_round, run_boosting
from server.checkpoint import STAGES, Checkpoint, record_arrays, strategy_state
from server.checkpoint import remove as remove_checkpoint
from server.hist_phase import run_hist_boosting
from server.importance_phase import federated_importance
from server.personalisation_phase import run_boosting_personalisation, run_personalisation
from server.policy_phase import run_policy_phase
from server.prompt_grid import prompt
from server.run_record import ModelRecord, RunRecord, SitePrivacyRecord, final_metrics
from server.settings import RunSettings
from server.site_check import SiteCheck, usable_sites
from server.statistics_phase import federated_encoder
from server.training_phase import eval_bins, train_ann, training_config
from shared.artifacts import RunArtifacts
from shared.encoding import FeatureEncoder
from shared.protocol.personalisation import Personalisation, ann_methods, boosting_methods, choice_rule
from shared.protocol.privacy import RunPlan
from shared.protocol.training import EVAL_BINS
from strategies.choice import make_strategy
from strategies.robust import ImpossibleAggregation


def builds_policy(settings: RunSettings) -> bool:
    """The dosing policy needs a signing key and the built-in task (formulations, doses, outcomes)."""
    return bool(settings.signing_key) and not settings.task_path


def run_plan(settings: RunSettings) -> RunPlan:
    """The phases this run will ask the sites for, in order (what a DP site splits its budget over)."""
    models = settings.model_names
    phases = ["statistics"]
    if "ann" in models:
        phases.append("training")
    phases.append("evaluation")
    if "ann" in models and ann_methods(settings.personalise):
        phases.append("personalisation")
    if "xgboost" in models and settings.boosting == "hist":
        phases.append("boosting")
    phases.append("importance")
    if builds_policy(settings) and settings.fqi_iterations > 0:
        phases.append("adjuster")
    if builds_policy(settings) and settings.policy_model == "structured":
        phases.append("dose_response")
    if builds_policy(settings):
        phases.append("policy")
    return RunPlan(tuple(phases))


def aggregation_refusal(settings: RunSettings, sites: SiteCheck) -> str | None:
    """Why the run's strategy cannot aggregate the ANN over the sites that will train (a robust strategy that
    cannot tolerate its assumed malicious sites with so few: :class:`strategies.robust.ImpossibleAggregation`),
    or None. Asked before any phase, so no site spends ε on a run that would stop at training."""
    if "ann" not in settings.model_names:
        return None
    n_sites = len(sites.granting("training"))
    if n_sites == 0:
        refusing = sites.refusing("training")
        return "no site grants training (" + "; ".join(f"{name}: {why}" for name, why in sorted(refusing.items())) + ")"
    try:
        make_strategy(settings.strategy, n_sites, proximal_mu=settings.proximal_mu, server_lr=settings.server_lr,
                      robust=settings.robust_parameters(n_sites), clip_norm=settings.clip_norm,
                      clip_median_factor=settings.clip_median_factor, central=settings.central_dp_parameters())
    except ImpossibleAggregation as err:
        return str(err)
    return None


def run_federation(grid: Grid, settings: RunSettings, on_round: Callable[[int], None] | None = None,
                   run_id: str = "local") -> RunRecord:
    """All phases; returns the run record (also written to ``settings.out_dir``). A run whose strategy cannot
    aggregate over the sites that came ends after the site check, its record saying why (``refused``).

    The run checkpoints after the site check, the statistics, each ANN round and the ANN family
    (:mod:`server.checkpoint`, ``OUT/checkpoint``, removed when the run ends). With ``settings.resume`` and a
    checkpoint in ``out_dir``, it continues that run under its original run id (the sites answer as that run:
    ``client.run_state``) from its last completed stage; without one it starts afresh."""
    task = settings.task()
    plan = run_plan(settings)
    started = time.perf_counter()
    out = Path(settings.out_dir)
    resumed = Checkpoint.read(out) if settings.resume else None
    if resumed is not None:
        resumed.check_settings(settings.to_run_config())
        run_id = resumed.run_id
        log(INFO, "resuming run %s from its checkpoint: stage %s, %d training round(s) done", run_id,
            resumed.stage, resumed.server_round)
    sites, _ = usable_sites(grid, settings.min_nodes, plan, resumes=run_id if resumed is not None else None)
    record = RunRecord(run_id=str(run_id), settings=settings.to_run_config(),
                       sites=sorted(sites.usable.values()),
                       rejected={name: errors for name, errors in sites.rejected.values()},
                       privacy={sites.usable[n]: SitePrivacyRecord.from_terms(sites.privacy[n])
                                for n in sites.nodes},
                       phase_seconds={"site_check": time.perf_counter() - started})
    if resumed is not None:  # the original run's record (its privacy terms as the sites gave them then)
        record = RunRecord.from_dict(resumed.record, f"checkpoint of run {run_id}")
    refusal = aggregation_refusal(settings, sites)
    if refusal is not None:  # refused in the record, and the run ends cleanly: nothing was asked of the sites yet
        log(ERROR, "run refused before training: %s", refusal)
        record.refused["training"] = refusal
        record.write(out)
        return record
    reached = STAGES.index(resumed.stage) if resumed is not None else -1

    def checkpoint(stage: str, server_round: int = 0, arrays: ArrayRecord | None = None,
                   strategy: Strategy | None = None) -> None:
        state, moments = strategy_state(strategy, sites.usable) if strategy is not None else ({}, {})
        Checkpoint(run_id=str(run_id), settings=settings.to_run_config(), stage=stage, record=record.to_dict(),
                   encoder=encoder.to_dict() if stage != "started" else None, server_round=server_round,
                   arrays=(record_arrays(arrays) if arrays is not None else {}) | moments,
                   strategy=state).write(out)

    encoder = None
    if reached < 0:
        checkpoint("started")
    artifacts = RunArtifacts.start(out, str(run_id))
    if reached >= STAGES.index("statistics"):
        encoder = FeatureEncoder.from_dict(resumed.encoder)
    else:
        with record.timed("statistics"):
            encoder = federated_encoder(grid, sites, task, settings.split_seed, plan, record, settings.secure_sum)
        checkpoint("statistics")
    artifacts.save_encoder(encoder)
    importance_config = training_config(settings, encoder, plan)
    if "ann" in settings.model_names:
        if reached >= STAGES.index("ann"):
            family, arrays = record.models["ann"], resumed.global_arrays()
            artifacts.save_ann(arrays.to_torch_state_dict(), settings.hidden_sizes)
        else:
            with record.timed("training"):
                family, arrays = train_ann(
                    grid, sites, task, encoder, settings, plan, record, on_round,
                    resume=resumed if resumed is not None and resumed.stage == "training" else None,
                    on_round_end=lambda server_round, global_arrays, strategy: checkpoint(
                        "training", server_round, global_arrays, strategy))
            artifacts.save_ann(arrays.to_torch_state_dict(), settings.hidden_sizes)
            with record.timed("importance"):
                family.importance = federated_importance(grid, sites, encoder, importance_config, "ann", arrays,
                                                         settings.secure_sum)
            record.models["ann"] = family
            checkpoint("ann", settings.num_server_rounds, arrays)
        if "personalisation" in plan.phases:
            config = training_config(settings, encoder, plan)
            config[EVAL_BINS] = eval_bins(sites)
            ann_plan = Personalisation(ann_methods(settings.personalise), choice=choice_rule(settings.personalise))
            with record.timed("personalisation"):
                record.personalisation = run_personalisation(grid, sites, task, arrays, config, ann_plan, record)
    if "xgboost" in settings.model_names:
        boost = run_hist_boosting if settings.boosting == "hist" else run_boosting
        with record.timed("boosting"):
            boosted = boost(grid, sites, encoder, settings, record)
        artifacts.save_boosters(boosted.models)
        with record.timed("importance"):
            importance = (federated_importance(grid, sites, encoder, importance_config, "xgboost", boosted.models,
                                               settings.secure_sum) if boosted.models else {})
        record.models["xgboost"] = ModelRecord(
            family="xgboost", mode=settings.boosting, seconds=boosted.seconds, heads=sorted(boosted.models),
            final=final_metrics(task, sites.usable, boosted.evaluations, sites.declared_rows()),
            failures={sites.usable.get(n, f"node {n}"): reason for n, reason in boosted.failures.items()},
            refused=boosted.refused, importance=importance)
        if boosting_methods(settings.personalise) and boosted.models:
            config = boosting_round(settings).to_config(encoder)  # fine score bins: only sites without DP answer
            plan = Personalisation(boosting_methods(settings.personalise), local_rounds=settings.xgb_rounds)
            with record.timed("personalisation_xgboost"):
                record.personalisation_xgboost = run_boosting_personalisation(
                    grid, sites, task, boosted.models, config, plan, record)
    if builds_policy(settings):
        with record.timed("policy"):
            record.policy = run_policy_phase(grid, sites, artifacts, record, settings)
    record.write(out)
    remove_checkpoint(out)
    return record


def make_server_app(overrides: dict | None = None, on_round: Callable[[int], None] | None = None) -> ServerApp:
    """A ServerApp whose settings are the run config updated with ``overrides`` (for in-process runs);
    ``on_round`` is told each finished round (progress displays)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        settings = RunSettings.from_run_config({**dict(context.run_config), **(overrides or {})})
        run_federation(prompt(grid), settings, on_round, run_id=str(context.run_id))

    return server


app = make_server_app()
