"""Phase 3: the neural network's training rounds with the chosen Flower strategy.

Every round the strategy (``strategies.choice``) sends the global weights to the sites, which train locally
(DP-SGD at a site under DP) and reply weights and metrics; :class:`strategies.per_site.PerSiteRecord` keeps
each site's reply. Sites evaluate the global model on their test splits every round, except sites under DP,
which evaluate it at the final round only (each evaluation is a release charged to their budget); in a run
with DP sites every site bins scores coarsely (``shared.metrics.COARSE_N_BINS``) so summaries still add up.
With ``one_message_rounds`` (the default) a site without DP evaluates the previous round's model in the same
exchange as it trains the next (``PerSiteRecord``'s ``one_message_nodes``): a deployed round is one message
per site, not two.
With central DP (``settings.central_dp``) the strategy is wrapped in :class:`strategies.central_dp.CentralDP` and
the record gets its accounting (``server.central_accounting``, ``RunRecord.central_dp``).
With masked rounds (``settings.ann_secure_sum``, :meth:`server.settings.RunSettings.ann_masking`) it is wrapped in
:class:`strategies.pairwise_masked_mean.PairwiseMaskedMean` over sessions of the one secure sum
(``server.secure_aggregation.SecureSession``, pairwise or recovering): the sites send masked fixed-point words
and the coordinator sees only their sum; the record says which (``ModelRecord.secure_sum``) and names any round
a lost site failed, and (recovering) every site lost and recovered.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server.central_accounting import central_dp_record
from server.checkpoint import Checkpoint, CheckpointError, FromRound, restore_strategy
from server.run_record import (
    ModelRecord,
    RunRecord,
    final_metrics,
    last_evaluations,
    model_rounds,
    update_norm_record,
)
from server.secure_aggregation import SecureSession
from server.settings import RunSettings
from server.site_check import SiteCheck
from shared import metrics
from shared.ann import build_model, to_arrays
from shared.encoding import FeatureEncoder
from shared.protocol import messages
from shared.protocol.privacy import RELEASE_INDEX, RELEASES, RunPlan
from shared.protocol.training import EVAL_BINS, AnnTraining
from shared.task import TaskSpec
from strategies.central_dp import CentralDP
from strategies.choice import make_strategy
from strategies.pairwise_masked_mean import PairwiseMaskedMean, SessionFactory
from strategies.per_site import PerSiteRecord
from strategies.update_clipping import UpdateNormClipping

PROGRESS_SHARE = 0.1
"""The most of a run's time its progress record may take (``train_ann``'s ``write_progress``)."""
PROGRESS_FREE_S = 0.2
"""A progress write cheaper than this is always made (small federations: after every round)."""


def ann_sessions(mode: str) -> SessionFactory:
    """The masked ANN rounds' sessions of the one secure sum (``server.secure_aggregation``), in ``mode``."""

    def session(grid: Grid, nodes: list[int]) -> SecureSession:
        return SecureSession(grid, nodes, mode, rounds=(messages.ANN_KEYS, messages.ANN_SHARES, messages.ANN_UNMASK))

    return session


def training_config(settings: RunSettings, encoder: FeatureEncoder, plan: RunPlan) -> ConfigRecord:
    """What every site needs to train a round identically (the encoder travels with it)."""
    return AnnTraining(local_epochs=settings.local_epochs, batch_size=settings.batch_size, lr=settings.lr,
                       seed=settings.seed, split_seed=settings.split_seed, max_grad_norm=settings.max_grad_norm,
                       num_rounds=settings.num_server_rounds, hidden=settings.hidden_sizes,
                       plan=plan).to_config(encoder)


def eval_bins(sites: SiteCheck) -> int:
    """Score histogram bins of every site's evaluation summaries: coarse in a run with DP sites, so their noise
    does not drown the histograms, and the same at every site so the summaries add up."""
    return metrics.COARSE_N_BINS if sites.dp_nodes() else metrics.DEFAULT_N_BINS


def evaluation_config(base: ConfigRecord, sites: SiteCheck, families: int, index: int) -> ConfigRecord:
    """``base`` with the score bins of this run and the position of this family's final evaluation among the
    run's evaluation releases (one per model family) for DP sites."""
    config = ConfigRecord(dict(base))
    config[EVAL_BINS] = eval_bins(sites)
    config[RELEASES], config[RELEASE_INDEX] = families, index
    return config


def train_ann(grid: Grid, sites: SiteCheck, task: TaskSpec, encoder: FeatureEncoder, settings: RunSettings,
              plan: RunPlan, record: RunRecord, on_round: Callable[[int], None] | None = None,
              resume: Checkpoint | None = None,
              on_round_end: Callable[[int, ArrayRecord, Strategy], None] | None = None
              ) -> tuple[ModelRecord, ArrayRecord]:
    """The strategy's rounds; returns the family's record and the final weights. ``resume`` (a checkpoint at
    stage ``training``) continues from its last completed round, its global arrays and strategy state;
    ``on_round_end(round, arrays, strategy)`` is told each completed round (the coordinator checkpoints)."""
    model = build_model(encoder, task, settings.hidden_sizes, seed=settings.seed)
    trainers = sites.granting("training")
    declared = sites.declared_rows()  # each site's cap for the evaluation summaries' checks (fixed by the site check)

    written = {"at": -math.inf, "cost": 0.0}

    def write_progress(server_round: int) -> None:
        """The record with the rounds so far, for the dashboard (a copy: ε is charged to ``record`` once, at the
        end, from the same rounds). Its cost grows with rounds × sites, so a round skips it while the last one
        took over :data:`PROGRESS_SHARE` of the time since (at 1,000 clinics a write took seconds; the
        dashboard polls every 5 s)."""
        del server_round
        now = time.perf_counter()
        if written["cost"] > PROGRESS_FREE_S and written["cost"] > PROGRESS_SHARE * (now - written["at"]):
            return
        snapshot = copy.deepcopy(record)
        snapshot.models["ann"] = ModelRecord(family="ann", mode=settings.strategy,
                                             rounds=model_rounds(task, sites.usable, strategy.rounds, snapshot,
                                                                 declared))
        if isinstance(strategy.strategy, CentralDP):  # its ε so far, for fednano status and the dashboard
            snapshot.central_dp = central_dp_record(strategy.strategy, settings.central_delta,
                                                    settings.central_accountant, plan,
                                                    [sites.usable[n] for n in trainers if n in dp])
        snapshot.write_progress(Path(settings.out_dir))
        written["at"] = time.perf_counter()
        written["cost"] = written["at"] - now

    dp = sites.dp_nodes()
    evaluators = [n for n in sites.nodes if n not in dp or n in sites.granting("evaluation")]
    secure_mode, masking = settings.ann_masking(len(trainers))
    log(INFO, "ANN rounds: %s (%s)", f"{secure_mode} masked sums" if secure_mode != "off" else "plain replies",
        masking)
    strategy = PerSiteRecord(make_strategy(settings.strategy, n_sites=len(trainers),
                                           proximal_mu=settings.proximal_mu, server_lr=settings.server_lr,
                                           robust=settings.robust_parameters(len(trainers)),
                                           clip_norm=settings.clip_norm,
                                           clip_median_factor=settings.clip_median_factor,
                                           central=settings.central_dp_parameters(),
                                           masked=secure_mode != "off", masked_nodes=trainers,
                                           site_names=sites.usable, session_factory=ann_sessions(secure_mode)),
                             on_round=on_round, train_nodes=trainers, evaluate_nodes=evaluators,
                             final_round_only=dp, final_round=settings.num_server_rounds,
                             on_progress=write_progress,
                             one_message_nodes=[n for n in trainers if n not in dp and n in evaluators]
                             if settings.one_message_rounds else ())
    config = training_config(settings, encoder, plan)
    if settings.one_message_rounds:  # the sites' evaluations in training replies bin scores as the final one
        config[EVAL_BINS] = eval_bins(sites)
    start = time.perf_counter()
    initial, done = to_arrays(model), 0
    if resume is not None:
        if settings.central_dp and "central_dp" not in resume.strategy and resume.server_round > 0:
            raise CheckpointError(f"run {resume.run_id} used central DP ({settings.central_dp}) but its checkpoint "
                                  "keeps no central-DP state (clipping, accounting, noise): it cannot resume "
                                  "mid-training without under-counting its ε; start it afresh")
        restore_strategy(strategy, resume.strategy, resume.arrays, {name: n for n, name in sites.usable.items()})
        initial, done = resume.global_arrays(), resume.server_round
    arrays = initial
    if done < settings.num_server_rounds:
        rounds_from = FromRound(strategy, done, on_round_end=None if on_round_end is None else
                                lambda server_round, global_arrays: on_round_end(server_round, global_arrays, strategy))
        result = rounds_from.start(grid=grid, initial_arrays=initial, num_rounds=settings.num_server_rounds - done,
                                   train_config=config,
                                   evaluate_config=evaluation_config(config, sites, len(settings.model_names),
                                                                     settings.model_names.index("ann")))
        arrays = result.arrays if result.arrays is not None else initial
    rounds = strategy.rounds
    family = ModelRecord(family="ann", mode=settings.strategy, seconds=time.perf_counter() - start,
                         rounds=model_rounds(task, sites.usable, rounds, record, declared),
                         final=final_metrics(task, sites.usable, last_evaluations(rounds), declared),
                         refused={**sites.refusing("training"),
                                  **{f"{name} (evaluation)": why
                                     for name, why in sites.refusing("evaluation").items()}},
                         secure_sum=f"{secure_mode}: {masking}")
    if isinstance(strategy.strategy, PairwiseMaskedMean):
        family.failures.update({f"round {n}": why for n, why in strategy.strategy.failed_rounds.items()})
        family.failures.update({f"round {n} ({sites.usable.get(node, f'node {node}')} lost, recovered)": why
                                for n, lost in strategy.strategy.recovered.items() for node, why in lost.items()})
    if isinstance(strategy.strategy, UpdateNormClipping):
        family.update_norms = update_norm_record(sites.usable, strategy.strategy.bounds, strategy.strategy.norms)
    if isinstance(strategy.strategy, CentralDP):
        record.central_dp = central_dp_record(strategy.strategy, settings.central_delta, settings.central_accountant,
                                              plan, [sites.usable[n] for n in trainers if n in dp])
    return family, arrays
