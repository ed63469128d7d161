"""The one-command multi-site experiment (``fednano simulate``): federation, baselines, report.

1. Sites: the built-in simulator writes ``OUT/sites/clinic_XX`` (their ``site.toml`` carries the DP
   budget), or the user brings site folders / CSV files (``--sites``, with ``--task`` for a generic task).
2. Federation: the real ServerApp and ClientApp (``server.app``, ``client.app``) run in Flower's
   simulation runtime, one SuperNode per site.
3. Baselines with the same code and the same per-site test splits: local-only and pooled (with and without
   DP) — ``simulation.baselines``.
4. ``OUT/results.json``, ``OUT/report.md`` and PNG plots — ``simulation.report``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from client.app import SiteSource
from shared import metrics
from shared.ann import predict
from shared.boosting import BoostingConfig, predict_heads
from shared.task import NANOPARTICLE_TASK, TaskSpec
from shared.validation import SiteDataError, load_site
from simulation.baselines import (
    BaselineSettings,
    Privacy,
    evaluate_per_site,
    local_boosting,
    local_only,
    model_metrics,
    pooled,
    pooled_boosters,
    pooled_model,
)
from simulation.clinics import SitePrivacy, World, generate_sites
from simulation.seed_comparison import CLASSIC, local_classic, pooled_classic, pooled_importance


@dataclass
class ExperimentConfig:
    """Everything ``fednano simulate`` takes."""

    out: Path = Path("runs/simulate")
    clinics: int = 5
    rounds: int = 10
    dp: bool = True
    epsilon: float = 3.0
    delta: float = 1e-5
    strategy: str = "fedavg"
    seed: int = 0
    sites: list[Path] = field(default_factory=list)
    task: Path | None = None
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.005
    hidden: str = "64,32"
    patients_per_clinic: int | None = None
    models: str = "ann,xgboost"
    boosting: str = "bagging"
    xgb_rounds: int = 20
    compare: bool = True  # the seed paper's comparison: random forest, SVM, gradient boosting
    fqi_iterations: int = 25  # fitted-Q iterations of the federated dose adjuster (0: none)


def flower_environment(project_home: Path) -> None:
    """Keep Flower's state in the project and Flower offline (unless the caller already chose)."""
    os.environ.setdefault("FLWR_HOME", str(project_home / ".flwr"))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def quiet_flower() -> None:
    """Flower logs every record at INFO (evaluation summaries are long) and warns that in-process
    simulation is deprecated in favour of ``flwr run``: keep errors only; the progress bar says the rest."""
    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)


def prepare_sites(cfg: ExperimentConfig) -> tuple[list[SiteSource], World | None]:
    """The sites of the experiment: the user's, or freshly simulated clinics (then also their world).

    Simulated clinics are new every run: their folder, with any privacy ledger or installed policy of an
    earlier run, is replaced."""
    if cfg.sites:
        return [SiteSource(Path(p), cfg.task) for p in cfg.sites], None
    out = cfg.out / "sites"
    shutil.rmtree(out, ignore_errors=True)
    world = generate_sites(cfg.clinics, cfg.seed, out, cfg.patients_per_clinic,
                           SitePrivacy(dp=cfg.dp, epsilon=cfg.epsilon, delta=cfg.delta))
    return [SiteSource(out / c.name) for c in world.clinics], world


def prepare_kit(cfg: ExperimentConfig, sources: list[SiteSource], fresh: bool) -> list[SiteSource]:
    """A throwaway provisioning kit in ``OUT/kit`` (one site kit per source, named ``site-<i>``): the
    coordinator's signing key signs the policy, each site trusts the public key of its own kit. ``fresh``
    replaces an existing kit (simulated sites are new too); otherwise an existing kit is kept, so the policy
    versions of repeated runs on the same sites keep increasing."""
    from server.provision import provision

    kit = cfg.out / "kit"
    names = [f"site-{i}" for i in range(len(sources))]
    if fresh:  # a new kit restarts the version counter: earlier bundles go with the old kit
        shutil.rmtree(kit, ignore_errors=True)
        shutil.rmtree(cfg.out / "policy", ignore_errors=True)
    if not (kit / "coordinator" / "policy_signing.key").exists():
        provision("simulate", names, kit)
    elif not all((kit / "sites" / n).exists() for n in names):
        provision("simulate", names, kit, add_sites=True)
    return [dataclasses.replace(s, trust_key=kit / "sites" / n / "policy_signing.pub")
            for s, n in zip(sources, names, strict=True)]


def run_federation(cfg: ExperimentConfig, sources: list[SiteSource],
                   on_round: Callable[[int], None] | None = None) -> dict:
    """The federated run in Flower's simulation runtime; returns the server's run record."""
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    signing_key = cfg.out / "kit" / "coordinator" / "policy_signing.key"  # from prepare_kit: build a policy
    overrides = {"num-server-rounds": cfg.rounds, "strategy": cfg.strategy, "local-epochs": cfg.local_epochs,
                 "batch-size": cfg.batch_size, "lr": cfg.lr, "hidden": cfg.hidden, "seed": cfg.seed,
                 "split-seed": cfg.seed, "min-nodes": len(sources), "out-dir": str(cfg.out / "federated"),
                 "task-path": str(cfg.task) if cfg.task else "", "models": cfg.models, "boosting": cfg.boosting,
                 "xgb-rounds": cfg.xgb_rounds,
                 "signing-key": str(signing_key) if signing_key.exists() else "",
                 "policy-dir": str(cfg.out / "policy"), "fqi-iterations": cfg.fqi_iterations}
    run_simulation(server_app=make_server_app(overrides, on_round=on_round),
                   client_app=make_client_app(sources), num_supernodes=len(sources),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False,
                                                 "logging_level": "ERROR"}})
    record_path = cfg.out / "federated" / "federation.json"
    if not record_path.exists():
        raise RuntimeError(f"the federation wrote no run record ({record_path}); see the log above")
    return json.loads(record_path.read_text())


def site_privacy(site) -> Privacy | None:
    privacy = site.config.get("privacy", {})
    return Privacy(float(privacy["epsilon"]), float(privacy["delta"])) if privacy.get("dp") else None


def _federated_summaries(task: TaskSpec, final: dict) -> dict[str, dict[str, dict]]:
    return {site: {o.name: metrics.from_metric_record(record, prefix=o.name) for o in task.outcomes}
            for site, record in final["summaries"].items()}


@dataclass
class Family:
    """One model family's metrics, summaries (for plots) and permutation importance."""

    models: dict
    summaries: dict
    importance: dict
    pooled_predictor: tuple | None = None  # (encoder, predict)
    local_predictors: dict = field(default_factory=dict)  # site -> (encoder, predict)


def pooled_budget(privacy: dict[str, Privacy | None]) -> Privacy | None:
    """The DP budget of the pooled baseline: the tightest site's, or None if no site uses DP."""
    return min((p for p in privacy.values() if p is not None), key=lambda p: p.epsilon, default=None)


def ann_family(task: TaskSpec, federation: dict, sites: dict, settings: BaselineSettings,
               privacy: dict[str, Privacy | None]) -> Family:
    """The federated ANN and its baselines (local-only; pooled with the sites' DP and without)."""
    pooled_privacy = pooled_budget(privacy)
    model, encoder = pooled_model(sites, pooled_privacy, settings)
    local_predictors: dict = {}
    summaries = {"federated": _federated_summaries(task, federation["final"]),
                 "local": local_only(sites, privacy, settings, keep=local_predictors),
                 "pooled": evaluate_per_site(partial(predict, model), encoder, sites, settings)}
    if pooled_privacy is not None:
        summaries["pooled_no_dp"] = pooled(sites, None, settings)
    models = {"federated": {"overall": federation["final"]["overall"], "per_site": federation["final"]["per_site"]}}
    models |= {name: model_metrics(task, s) for name, s in summaries.items() if name != "federated"}
    importance = {"federated": federation["importance"].get("ann", {}),
                  "pooled": pooled_importance(partial(predict, model), encoder, sites, settings)}
    return Family(models, summaries, importance, (encoder, partial(predict, model)), local_predictors)


def boosting_family(task: TaskSpec, federation: dict, sites: dict, settings: BaselineSettings,
                    cfg: ExperimentConfig) -> Family:
    """Federated XGBoost and its local-only and pooled baselines."""
    final = federation["xgboost"]["final"]
    config = BoostingConfig(seed=cfg.seed)
    boosters, encoder = pooled_boosters(sites, settings, config, cfg.xgb_rounds)
    pooled_predict = partial(predict_heads, boosters, encoder)
    local_predictors: dict = {}
    summaries = {"federated": _federated_summaries(task, final),
                 "local": local_boosting(sites, settings, config, cfg.xgb_rounds, keep=local_predictors),
                 "pooled": evaluate_per_site(pooled_predict, encoder, sites, settings)}
    models = {"federated": {"overall": final["overall"], "per_site": final["per_site"],
                            "mode": federation["xgboost"]["mode"]}}
    models |= {name: model_metrics(task, s) for name, s in summaries.items() if name != "federated"}
    importance = {"federated": federation["importance"].get("xgboost", {}),
                  "pooled": pooled_importance(pooled_predict, encoder, sites, settings)}
    return Family(models, summaries, importance, (encoder, pooled_predict), local_predictors)


def classic_family(name: str, task: TaskSpec, sites: dict, settings: BaselineSettings) -> Family:
    """A scikit-learn model of the seed paper's comparison, local-only and pooled."""
    summaries = {"local": local_classic(name, sites, settings), "pooled": pooled_classic(name, sites, settings)}
    return Family({mode: model_metrics(task, s) for mode, s in summaries.items()}, summaries, {})


def policy_results(cfg: ExperimentConfig, policy: dict, sources: list[SiteSource], world: World | None,
                   families: dict[str, Family], sites: dict) -> dict:
    """Where the signed policy is, which key verifies it, which sites hold it, and — in the simulated world —
    how it does against the oracle, standard of care, local-only and pooled policies."""
    from shared.dosing_policy import DosingPolicy
    from simulation.policy_evaluation import evaluate_policies, policy_decider

    trust = sources[0].trust_key
    result = {"bundle": policy["bundle"], "trust_key": str(trust), "version": policy["version"],
              "formulations": policy["formulations"], "sites": policy["sites"],
              "adjustment": policy.get("adjustment"), "evaluation": None}
    if world is None:
        return result  # the user's own sites: no ground truth to judge a policy by
    federated = DosingPolicy.from_bundle(Path(policy["bundle"]), trust)
    members = [name for name in ("ann", "xgboost") if name in families]

    def like_federated(encoder, predictors: dict, formulations: dict) -> DosingPolicy:
        return dataclasses.replace(federated, encoder=encoder, members=predictors, formulations=formulations,
                                   manifest=None)

    pooled = like_federated(families[members[0]].pooled_predictor[0],
                            {m: families[m].pooled_predictor[1] for m in members}, federated.formulations)
    local = {}
    for name in sites:
        own = set(sites[name].episodes["formulation_id"].astype(str))
        local[name] = like_federated(families[members[0]].local_predictors[name][0],
                                     {m: families[m].local_predictors[name][1] for m in members},
                                     {f: v for f, v in federated.formulations.items() if f in own})
    policies = {"federated": lambda site: policy_decider(federated),
                "local": lambda site: policy_decider(local[site]),
                "pooled": lambda site: policy_decider(pooled)}
    result["evaluation"] = evaluate_policies(world, policies, federated, seed=cfg.seed + 1, sites=list(sites))
    return result


def run_experiment(cfg: ExperimentConfig, on_round: Callable[[int], None] | None = None,
                   on_phase: Callable[[str], None] | None = None) -> dict:
    """Sites → federation → baselines → results.json / report.md / plots under ``cfg.out``."""
    say = on_phase or (lambda _: None)
    cfg.out.mkdir(parents=True, exist_ok=True)
    task = TaskSpec.from_toml(cfg.task) if cfg.task else NANOPARTICLE_TASK
    say("sites")
    sources, world = prepare_sites(cfg)
    if cfg.task is None:  # the dosing policy (and its signing kit) exist for the built-in task only
        sources = prepare_kit(cfg, sources, fresh=world is not None)
    say("federation")
    start = time.perf_counter()
    federation = run_federation(cfg, sources, on_round)
    federated_seconds = time.perf_counter() - start

    say("baselines")
    sites = {}
    for source in sources:
        try:
            site = load_site(source.path, task if cfg.task else None)
        except SiteDataError:
            continue  # the federation's record names it; baselines use the same usable sites
        if site.name in federation["sites"]:
            sites[site.name] = site
    settings = BaselineSettings(task=task, epochs=cfg.rounds * cfg.local_epochs, batch_size=cfg.batch_size,
                                lr=cfg.lr, hidden=tuple(int(h) for h in cfg.hidden.split(",")), seed=cfg.seed,
                                split_seed=cfg.seed)
    privacy = {name: site_privacy(site) for name, site in sites.items()}
    start = time.perf_counter()
    families: dict[str, Family] = {}
    if "rounds" in federation:
        families["ann"] = ann_family(task, federation, sites, settings, privacy)
    if federation.get("xgboost"):
        families["xgboost"] = boosting_family(task, federation, sites, settings, cfg)
    if cfg.compare:
        for name in CLASSIC:
            say(f"baselines: {name.replace('_', ' ')}")
            families[name] = classic_family(name, task, sites, settings)
    models = {name: family.models for name, family in families.items()}
    summaries = {name: family.summaries for name, family in families.items()}
    baseline_seconds = time.perf_counter() - start
    pooled_privacy = pooled_budget(privacy)

    results = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                   if k not in ("sites",)} | {"sites": [str(s.path) for s in sources]},
        "task": {"outcomes": [[o.name, o.kind] for o in task.outcomes]},
        "sites": federation["sites"],
        "rejected": federation["rejected"],
        "models": models,
        "privacy": {name: {"epsilon": p.get("epsilon"), "delta": p.get("delta"), "budget": p.get("budget")}
                    for name, p in federation.get("privacy", {}).items()},
        "rounds": federation.get("rounds", []),
        "timing": {"federation_s": federated_seconds, "baselines_s": baseline_seconds,
                   "ann_s": federation.get("seconds"),
                   "xgboost_s": federation["xgboost"]["seconds"] if federation.get("xgboost") else None},
        "pooled_dp_budget": asdict(pooled_privacy) if pooled_privacy else None,
        "importance": {name: family.importance for name, family in families.items() if family.importance},
        "policy": None,
    }
    if federation.get("policy"):
        say("policy")
        results["policy"] = policy_results(cfg, federation["policy"], sources, world, families, sites)
    (cfg.out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    say("report")
    from simulation.report import write_report

    write_report(cfg.out, results, summaries)
    return results
