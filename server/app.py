"""The coordinator's Flower ServerApp: site check → federated statistics → training rounds → run record.

1. **site check** — every connected site validates its own data against the shared contract and reports
   counts (never rows); sites whose data fail are named with their first errors and left out.
2. **federated statistics** — the usable sites send aggregates of their training split; the server adds
   them into one :class:`shared.encoding.FeatureEncoder`, so every site encodes features identically.
3. **training** — the selected Flower strategy (``strategies.choice``) runs the rounds; every site's reply
   (loss, ε spent, evaluation summaries) is kept per round by :class:`strategies.per_site.PerSiteRecord`.
4. **run record** — ``OUT/federation.json`` (per-round, per-site metrics, overall metrics from summed
   summaries, ε per site) and the final model (``ann_federated.pt``, ``encoder.json``).

Settings come from the run config (``pyproject.toml [tool.flwr.app.config]`` or ``flwr run --run-config``);
in-process simulations pass them to :func:`make_server_app`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server.adjustment_phase import AdjustmentFailed, fit_adjuster
from server.boosting_phase import run_boosting
from server.importance_phase import federated_importance
from server.policy_phase import build_policy, collect_catalogue, distribute
from server.run_record import boosting_record, federation_record
from shared.ann import build_model, to_arrays
from shared.config import settings_from_run_config
from shared.encoding import FeatureEncoder, SiteStatistics, combine
from shared.task import NANOPARTICLE_TASK, TaskSpec
from strategies.choice import make_strategy
from strategies.per_site import PerSiteRecord

SITE_CHECK = "query.site_check"
STATISTICS = "query.statistics"


@dataclass(frozen=True)
class RunSettings:
    """Run-config keys (hyphenated in the run config) and their defaults."""

    num_server_rounds: int = 10
    strategy: str = "fedavg"
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.005
    hidden: str = "64,32"
    seed: int = 0
    split_seed: int = 0
    max_grad_norm: float = 1.0
    proximal_mu: float = 0.1
    server_lr: float = 0.05
    min_nodes: int = 1
    task_path: str = ""
    out_dir: str = "runs/federation"
    models: str = "ann"  # comma-separated: ann, xgboost
    boosting: str = "bagging"  # bagging | cyclic
    xgb_rounds: int = 20
    xgb_eta: float = 0.1
    xgb_max_depth: int = 4
    signing_key: str = ""  # the coordinator's policy_signing.key: build, sign and distribute the dosing policy
    policy_dir: str = ""  # where signed bundles go (v<N> folders); default OUT/policy
    fqi_iterations: int = 0  # > 0: learn the fitted-Q dose adjuster federated (2 + iterations message rounds)

    @classmethod
    def from_run_config(cls, run_config: dict) -> RunSettings:
        return settings_from_run_config(cls, run_config)

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(int(h) for h in self.hidden.split(",") if h.strip())

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.models.split(",") if m.strip())

    def task(self) -> TaskSpec:
        return TaskSpec.from_toml(self.task_path) if self.task_path else NANOPARTICLE_TASK


@dataclass
class SiteCheck:
    """What each site said about its data, by node id."""

    usable: dict[int, str] = field(default_factory=dict)  # node id -> site name
    rejected: dict[int, tuple[str, list[str]]] = field(default_factory=dict)  # node id -> (site, errors)
    summaries: dict[int, dict[str, float]] = field(default_factory=dict)


def wait_for_nodes(grid: Grid, min_nodes: int, timeout_s: float = 120.0, poll_s: float = 0.5) -> list[int]:
    """Node ids once at least ``min_nodes`` are connected (or whatever is connected at the timeout)."""
    deadline = time.monotonic() + timeout_s
    nodes = list(grid.get_node_ids())
    while len(nodes) < min_nodes and time.monotonic() < deadline:
        time.sleep(poll_s)
        nodes = list(grid.get_node_ids())
    return nodes


def check_sites(grid: Grid, min_nodes: int = 1, timeout: float | None = None) -> SiteCheck:
    """Ask every node to validate its site; sort them into usable and rejected."""
    nodes = wait_for_nodes(grid, min_nodes)
    messages = [Message(RecordDict(), dst_node_id=n, message_type=SITE_CHECK) for n in nodes]
    result = SiteCheck()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            result.rejected[node] = (f"node {node}", [reply.error.reason])
            continue
        status = reply.content["status"]
        name = str(status["site-name"])
        if status["ok"]:
            result.usable[node] = name
            result.summaries[node] = dict(reply.content["summary"])
        else:
            result.rejected[node] = (name, [e for e in status["errors"] if e])
    return result


def federated_encoder(grid: Grid, nodes: list[int], task: TaskSpec, split_seed: int) -> FeatureEncoder:
    """Phase 2: sum the sites' training-split aggregates into one encoder."""
    config = ConfigRecord({"split-seed": split_seed})
    messages = [Message(RecordDict({"config": config}), dst_node_id=n, message_type=STATISTICS) for n in nodes]
    stats = []
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            log(INFO, "statistics: node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        stats.append(SiteStatistics.from_records(reply.content["statistics"], reply.content["names"]))
    if not stats:
        raise RuntimeError("no site could report statistics: nothing to train on")
    return FeatureEncoder(task).fit_statistics(combine(stats))


def train_config(settings: RunSettings, encoder: FeatureEncoder) -> ConfigRecord:
    """What every site needs to train a round identically (the encoder travels with it)."""
    config = encoder.to_config_record()
    for key, value in {"local-epochs": settings.local_epochs, "batch-size": settings.batch_size,
                       "lr": settings.lr, "seed": settings.seed, "split-seed": settings.split_seed,
                       "max-grad-norm": settings.max_grad_norm, "num-rounds": settings.num_server_rounds,
                       "hidden": list(settings.hidden_sizes)}.items():
        config[key] = value
    return config


def usable_sites(grid: Grid, min_nodes: int) -> tuple[SiteCheck, list[int]]:
    """Phase 1: the site check, logged; the node ids of the sites with usable data (error if none)."""
    sites = check_sites(grid, min_nodes=min_nodes)
    for name, errors in sites.rejected.values():
        log(INFO, "site %s rejected: %s", name, "; ".join(errors))
    nodes = sorted(sites.usable)
    if not nodes:
        raise RuntimeError("no site has usable data")
    log(INFO, "sites usable: %s", ", ".join(sites.usable[n] for n in nodes))
    return sites, nodes


def run_federation(grid: Grid, settings: RunSettings, on_round: Callable[[int], None] | None = None,
                   run_id: str = "") -> dict:
    """All phases; returns the run record (also written to ``settings.out_dir``)."""
    task = settings.task()
    sites, nodes = usable_sites(grid, settings.min_nodes)
    encoder = federated_encoder(grid, nodes, task, settings.split_seed)
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoder.json").write_text(json.dumps(encoder.to_dict(), indent=1) + "\n")
    record = {"run-id": run_id, "settings": {k.replace("_", "-"): v for k, v in vars(settings).items()},
              "sites": sorted(sites.usable.values()),
              "rejected": {name: errors for name, errors in sites.rejected.values()}, "xgboost": None}
    importance_config = train_config(settings, encoder)
    record["importance"] = {}
    if "ann" in settings.model_names:
        ann_record, arrays = train_ann(grid, nodes, sites, task, encoder, settings, on_round)
        record.update(ann_record)
        importance_config["family"] = "ann"
        record["importance"]["ann"] = federated_importance(grid, nodes, encoder, importance_config, arrays)
    if "xgboost" in settings.model_names:
        boosted = run_boosting(grid, nodes, encoder, settings)
        for key, model in boosted.models.items():
            (out / f"xgb_{key}.json").write_bytes(model)
        record["xgboost"] = boosting_record(task, sites, boosted, settings.boosting)
        importance_config["family"] = "xgboost"
        record["importance"]["xgboost"] = federated_importance(grid, nodes, encoder, importance_config,
                                                               ConfigRecord(dict(boosted.models)))
    # The dosing policy needs the built-in task (formulations, doses, outcomes); a generic task gets none.
    builds_policy = bool(settings.signing_key) and not settings.task_path
    record["policy"] = policy_phase(grid, nodes, sites, encoder, record, settings, run_id) if builds_policy else None
    (out / "federation.json").write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    return record


def policy_phase(grid: Grid, nodes: list[int], sites: SiteCheck, encoder: FeatureEncoder, record: dict,
                 settings: RunSettings, run_id: str) -> dict:
    """Phase 5: build and sign the dosing policy from this run's models, send it to every site."""
    formulations = collect_catalogue(grid, nodes)
    adjuster, adjustment = None, {"fitted": False, "reason": "fqi-iterations = 0"}
    if settings.fqi_iterations > 0:
        try:
            adjuster = fit_adjuster(grid, nodes, {"split-seed": settings.split_seed,
                                                  "fqi-iterations": settings.fqi_iterations})
            adjustment = {"fitted": True, "iterations": settings.fqi_iterations,
                          "privacy": {str(node): {k: float(v) for k, v in dict(spent).items()}
                                      for node, spent in getattr(adjuster, "privacy_", {}).items()}}
        except AdjustmentFailed as err:
            log(INFO, "dose adjuster not fitted: %s", err)
            adjustment = {"fitted": False, "reason": str(err)}
    bundle = build_policy(Path(settings.out_dir), record, encoder, formulations, settings.hidden_sizes,
                          Path(settings.signing_key), run_id or "local",
                          Path(settings.policy_dir or Path(settings.out_dir) / "policy"), adjuster)
    installed = distribute(grid, nodes, sites.usable, bundle)
    version = int(bundle.name.removeprefix("v"))
    return {"bundle": str(bundle), "version": version, "formulations": sorted(formulations), "sites": installed,
            "adjustment": adjustment}


def train_ann(grid: Grid, nodes: list[int], sites: SiteCheck, task: TaskSpec, encoder: FeatureEncoder,
              settings: RunSettings, on_round: Callable[[int], None] | None) -> tuple[dict, ArrayRecord]:
    """Phase 3 for the neural network: the strategy's rounds; returns the run record and the final weights
    (also saved)."""
    model = build_model(encoder, task, settings.hidden_sizes, seed=settings.seed)
    strategy = PerSiteRecord(make_strategy(settings.strategy, n_sites=len(nodes),
                                           proximal_mu=settings.proximal_mu, server_lr=settings.server_lr),
                             on_round=on_round)
    config = train_config(settings, encoder)
    start = time.perf_counter()
    result = strategy.start(grid=grid, initial_arrays=to_arrays(model), num_rounds=settings.num_server_rounds,
                            train_config=config, evaluate_config=config)
    record = federation_record(task, sites, strategy.rounds, settings, time.perf_counter() - start)
    arrays = result.arrays if result.arrays is not None else to_arrays(model)
    torch.save(arrays.to_torch_state_dict(), Path(settings.out_dir) / "ann_federated.pt")
    return record, arrays


def make_server_app(overrides: dict | None = None, on_round: Callable[[int], None] | None = None) -> ServerApp:
    """A ServerApp whose settings are the run config updated with ``overrides`` (for in-process runs);
    ``on_round`` is told each finished round (progress displays)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        settings = RunSettings.from_run_config({**dict(context.run_config), **(overrides or {})})
        run_federation(grid, settings, on_round, run_id=str(context.run_id))

    return server


app = make_server_app()
