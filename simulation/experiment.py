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

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from client.site import SiteSource
from server.run_record import RunRecord
from server.settings import DEFAULTS, RunSettings, parse_hidden
from shared.ann import predict
from shared.artifacts import RunArtifacts
from shared.boosting import BoostingConfig, predict_heads
from shared.durable import write_json_atomically
from shared.exploration import Exploration
from shared.task import NANOPARTICLE_TASK, TaskSpec, assign_split
from shared.validation import SiteDataError, load_site
from simulation.attacks import UPDATE_KINDS, Attack, AttackError, attacked_sources, attackers_by_partition
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
from simulation.clinics import SIMULATED_STATE_DIR, SitePrivacy, World, generate_sites, make_world
from simulation.personalisation import personalisation_results, personalised_entry, site_records
from simulation.seed_comparison import CLASSIC, local_classic, pooled_classic, pooled_importance

EXPERIMENT_FILE = "experiment.json"
"""The options of a ``fednano simulate`` run, in its OUT folder (``--resume OUT`` reads them)."""


class ExperimentError(ValueError):
    """The experiment cannot run as asked (e.g. the same site given twice); says why."""


@dataclass
class ExperimentConfig:
    """Everything ``fednano simulate`` takes. The federated run's defaults are :mod:`server.settings`'
    (``seed`` seeds the world, the split and the models alike)."""

    out: Path = Path("runs/simulate")
    clinics: int = 5
    rounds: int = DEFAULTS.num_server_rounds
    dp: bool = True
    epsilon: float = 3.0
    delta: float = 1e-5
    strategy: str = DEFAULTS.strategy
    seed: int = DEFAULTS.seed
    sites: list[Path] = field(default_factory=list)
    task: Path | None = None
    local_epochs: int = DEFAULTS.local_epochs
    batch_size: int = DEFAULTS.batch_size
    lr: float = DEFAULTS.lr
    hidden: str = DEFAULTS.hidden
    patients_per_clinic: int | None = None
    models: str = DEFAULTS.models
    boosting: str = DEFAULTS.boosting
    xgb_rounds: int = DEFAULTS.xgb_rounds
    xgb_scale_bits: int = DEFAULTS.xgb_scale_bits  # --boosting hist: fixed-point scale (TreeParams.scale_bits)
    xgb_hist_batch_heads: bool = DEFAULTS.xgb_hist_batch_heads  # --boosting hist: all heads in one level request
    secure_sum: str = DEFAULTS.secure_sum  # hist boosting: pairwise | recovering | off (RunSettings)
    ann_secure_sum: str = DEFAULTS.ann_secure_sum  # ANN rounds: auto | pairwise | recovering | off (RunSettings)
    compare: bool = True  # the seed paper's comparison: random forest, SVM, gradient boosting
    fqi_iterations: int = DEFAULTS.fqi_iterations
    release_gate: bool = DEFAULTS.release_gate  # False ships the policy whatever the sites' estimates (tests)
    deploy_cycles: int = 1  # policy versions to reach: K − 1 deployment periods, each followed by a refit
    deploy_patients: int | None = None  # new patients per clinic per period (default: half the clinic's own)
    explore: bool = False  # randomise first cycles in the loop (shared.exploration): dose spread, trial arm
    policy_model: str = DEFAULTS.policy_model
    policy_reference: str = DEFAULTS.policy_reference
    malicious_sites: int = DEFAULTS.malicious_sites  # robust strategies' f (negative: derived)
    trim_fraction: float = DEFAULTS.trim_fraction  # FedTrimmedAvg's β (negative: derived)
    clip_norm: float = DEFAULTS.clip_norm  # bound on each site's update norm (0: off)
    clip_median_factor: float = DEFAULTS.clip_median_factor  # or: bound = factor × the round's median norm
    central_dp: str = DEFAULTS.central_dp  # "" | fixed | adaptive: central DP of the ANN (strategies.central_dp)
    central_noise_multiplier: float = DEFAULTS.central_noise_multiplier
    central_clip: float = DEFAULTS.central_clip  # fixed clipping norm, or the adaptive one's initial norm
    central_delta: float = DEFAULTS.central_delta
    central_accountant: str = DEFAULTS.central_accountant
    attacks: list[str] = field(default_factory=list)  # SITE:KIND[=FACTOR], simulation.attacks
    personalise: str = DEFAULTS.personalise  # personalised ANNs / boosters at the sites (simulation.personalisation)
    policy: bool = True  # build, sign and evaluate the dosing policy (the built-in task only)
    one_message_rounds: bool = DEFAULTS.one_message_rounds  # evaluate and train in one exchange (RunSettings)
    ray_address: str | None = None  # a running Ray cluster's head (HOST:PORT); None: a local Ray per simulation
    supernode_cpus: float = 1.0  # CPUs Ray reserves for each simulated SuperNode's ClientApp actor
    resume: bool = False  # continue the federation checkpointed in OUT/federated on the sites already in OUT

    def to_file(self) -> Path:
        """Write these options to ``OUT/experiment.json`` (what ``fednano simulate --resume OUT`` runs again)."""
        path = self.out / EXPERIMENT_FILE
        body = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k != "resume"}
        body["sites"] = [str(p) for p in self.sites]
        write_json_atomically(path, body)
        return path

    @classmethod
    def resumed(cls, out: Path) -> ExperimentConfig:
        """The options of the experiment in ``out`` (its ``experiment.json``), to resume it;
        :class:`ExperimentError` if it has none."""
        path = Path(out) / EXPERIMENT_FILE
        try:
            body = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ExperimentError(f"{path}: no experiment to resume there ({err}); --resume takes the OUT folder "
                                  "of a simulate run that stopped") from err
        known = {f.name for f in dataclasses.fields(cls)}
        body = {k: v for k, v in body.items() if k in known}
        return cls(**{**body, "out": Path(out), "sites": [Path(p) for p in body.get("sites", [])],
                      "task": Path(body["task"]) if body.get("task") else None, "resume": True})

    def run_settings(self, n_sites: int, signing_key: Path | None) -> RunSettings:
        """The federated run's settings for these options (one mapping, here)."""
        return dataclasses.replace(
            DEFAULTS, num_server_rounds=self.rounds, strategy=self.strategy, local_epochs=self.local_epochs,
            batch_size=self.batch_size, lr=self.lr, hidden=self.hidden, seed=self.seed, split_seed=self.seed,
            min_nodes=n_sites, out_dir=str(self.out / "federated"), task_path=str(self.task) if self.task else "",
            models=self.models, boosting=self.boosting, xgb_rounds=self.xgb_rounds, secure_sum=self.secure_sum,
            ann_secure_sum=self.ann_masking(), xgb_scale_bits=self.xgb_scale_bits,
            xgb_hist_batch_heads=self.xgb_hist_batch_heads,
            signing_key=str(signing_key) if signing_key is not None else "",
            policy_dir=str(self.out / "policy"), fqi_iterations=self.fqi_iterations, release_gate=self.release_gate,
            policy_model=self.policy_model, policy_reference=self.policy_reference, personalise=self.personalise,
            malicious_sites=self.malicious_sites, trim_fraction=self.trim_fraction, clip_norm=self.clip_norm,
            clip_median_factor=self.clip_median_factor, one_message_rounds=self.one_message_rounds,
            central_dp=self.central_dp, central_noise_multiplier=self.central_noise_multiplier,
            central_clip=self.central_clip, central_delta=self.central_delta,
            central_accountant=self.central_accountant, resume=self.resume)

    def ann_masking(self) -> str:
        """The run's ``ann_secure_sum``: ``auto`` becomes ``off`` when an attack rewrites a site's plain training
        reply (``sign-flip``, ``scale``: :func:`simulation.attacks.attack_mod` works on the weights a site sends,
        and under masks it sends words); an explicit ``pairwise`` or ``recovering`` with such an attack is refused."""
        rewrites = [a for a in self.parsed_attacks() if a.kind in UPDATE_KINDS]
        if not rewrites or self.ann_secure_sum == "off":
            return self.ann_secure_sum
        if self.ann_secure_sum != "auto":
            raise ExperimentError(f"--attack {rewrites[0].site}:{rewrites[0].kind} rewrites the site's plain ANN "
                                  "weights, which masked rounds never send: use --ann-secure-sum off (or auto) "
                                  "with it")
        return "off"

    def parsed_attacks(self) -> list[Attack]:
        return [Attack.parse(text) for text in self.attacks]


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
    earlier run, is replaced, and so is the folder keeping their ledgers' head copies (``OUT/sites/
    .ledger-heads``), so fresh clinics start fresh budgets and nothing lands in the user's home. Your own
    sites keep their heads in the default state folder (``client.ledger``)."""
    if cfg.sites:
        return distinct_sites([SiteSource(Path(p), cfg.task) for p in cfg.sites]), None
    out = cfg.out / "sites"
    if cfg.resume and out.is_dir():  # the same clinics, their ledgers and heads as the run being resumed had
        world = make_world(cfg.clinics, cfg.seed, cfg.patients_per_clinic)
        return [SiteSource(out / c.name, state_dir=out / SIMULATED_STATE_DIR) for c in world.clinics], world
    shutil.rmtree(out, ignore_errors=True)
    # a closed loop runs the federation once per version: each run may spend its share of the lifetime budget
    per_run = cfg.epsilon / cfg.deploy_cycles if cfg.deploy_cycles > 1 else None
    world = generate_sites(cfg.clinics, cfg.seed, out, cfg.patients_per_clinic,
                           SitePrivacy(dp=cfg.dp, epsilon=cfg.epsilon, delta=cfg.delta, epsilon_per_run=per_run))
    return [SiteSource(out / c.name, state_dir=out / SIMULATED_STATE_DIR) for c in world.clinics], world


def distinct_sites(sources: list[SiteSource]) -> list[SiteSource]:
    """``sources``, or :class:`ExperimentError` if a folder is given twice (its privacy ledger and records would
    be counted as two sites')."""
    seen: dict[Path, Path] = {}
    for source in sources:
        resolved = source.path.resolve()
        if resolved in seen:
            raise ExperimentError(f"the site {source.path} is given twice (as {seen[resolved]} too): each site once")
        seen[resolved] = source.path
    return sources


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


def check_robustness_options(cfg: ExperimentConfig, sources: list[SiteSource]) -> None:
    """:class:`ExperimentError` before anything runs if the attacks name no site of the run or the strategy
    cannot tolerate its assumed malicious sites with this many sites."""
    from strategies.choice import make_strategy
    from strategies.robust import ImpossibleAggregation

    try:
        settings = cfg.run_settings(len(sources), None)
        make_strategy(settings.strategy, len(sources), robust=settings.robust_parameters(len(sources)),
                      clip_norm=settings.clip_norm, clip_median_factor=settings.clip_median_factor,
                      central=settings.central_dp_parameters())
        attacks = cfg.parsed_attacks()
        if attacks and cfg.deploy_cycles > 1:
            raise ExperimentError("--attack is for single-run experiments, not the closed loop (--deploy-cycles)")
        attackers_by_partition(attacks, sources)
    except (ImpossibleAggregation, AttackError, ValueError) as err:  # ValueError: two update norm bounds
        raise ExperimentError(str(err)) from err


def run_federation(cfg: ExperimentConfig, sources: list[SiteSource],
                   on_round: Callable[[int], None] | None = None) -> RunRecord:
    """The federated run in Flower's simulation runtime; returns the server's run record. Attacking sites
    (``cfg.attacks``) answer through :mod:`simulation.attacks`; the others are the honest ClientApp."""
    from client.app import make_client_app
    from server.app import make_server_app
    from simulation.flower_runtime import simulate

    signing_key = cfg.out / "kit" / "coordinator" / "policy_signing.key"  # from prepare_kit: build a policy
    settings = cfg.run_settings(len(sources), signing_key if cfg.policy and signing_key.exists() else None)
    record_path = Path(settings.out_dir) / "federation.json"
    record_path.unlink(missing_ok=True)
    served, mods = attacked_sources(cfg.parsed_attacks(), sources, cfg.out)
    simulate(make_server_app(settings.to_run_config(), on_round=on_round), make_client_app(served, mods=mods),
             num_supernodes=len(sources), ray_address=cfg.ray_address, supernode_cpus=cfg.supernode_cpus)
    if not record_path.exists():
        raise RuntimeError(f"the federation wrote no run record ({record_path}); see the log above")
    return RunRecord.read(record_path)


def site_privacy(site) -> Privacy | None:
    privacy = site.config.get("privacy", {})
    return Privacy(float(privacy["epsilon"]), float(privacy["delta"])) if privacy.get("dp") else None


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


def federated_entry(task: TaskSpec, family, summaries: dict) -> dict:
    """``models.<family>.federated``: the federated model's metrics on the sites' test splits as measured by the
    simulation (exact, every site), beside what the sites released to the coordinator (noised and coarsely
    binned at a DP site, which also reports only the final round) and who refused and why."""
    entry = model_metrics(task, summaries)
    entry.update(mode=family.mode, released={"overall": family.final["overall"], "per_site": family.final["per_site"]},
                 refused=family.refused, failures=family.failures)
    return entry


def ann_family(task: TaskSpec, record: RunRecord, artifacts: RunArtifacts, sites: dict,
               settings: BaselineSettings, privacy: dict[str, Privacy | None]) -> Family:
    """The federated ANN and its baselines (local-only; pooled with the sites' DP and without)."""
    federated = record.models["ann"]
    pooled_privacy = pooled_budget(privacy)
    model, encoder = pooled_model(sites, pooled_privacy, settings)
    local_predictors: dict = {}
    federated_encoder = artifacts.encoder()
    summaries = {"federated": evaluate_per_site(partial(predict, artifacts.ann()), federated_encoder, sites,
                                                settings),
                 "local": local_only(sites, privacy, settings, keep=local_predictors),
                 "pooled": evaluate_per_site(partial(predict, model), encoder, sites, settings)}
    if pooled_privacy is not None:
        summaries["pooled_no_dp"] = pooled(sites, None, settings)
    models = {"federated": federated_entry(task, federated, summaries["federated"])}
    models |= {name: model_metrics(task, s) for name, s in summaries.items() if name != "federated"}
    importance = {"federated": federated.importance.get("features", {}),
                  "pooled": pooled_importance(partial(predict, model), encoder, sites, settings)}
    return Family(models, summaries, importance, (encoder, partial(predict, model)), local_predictors)


def boosting_family(task: TaskSpec, record: RunRecord, artifacts: RunArtifacts, sites: dict,
                    settings: BaselineSettings, cfg: ExperimentConfig) -> Family:
    """Federated XGBoost and its local-only and pooled baselines."""
    federated = record.models["xgboost"]
    config = BoostingConfig(seed=cfg.seed)
    boosters, encoder = pooled_boosters(sites, settings, config, cfg.xgb_rounds)
    pooled_predict = partial(predict_heads, boosters, encoder)
    federated_encoder = artifacts.encoder()
    local_predictors: dict = {}
    summaries = {"federated": evaluate_per_site(partial(predict_heads, artifacts.boosters(), federated_encoder),
                                                federated_encoder, sites, settings),
                 "local": local_boosting(sites, settings, config, cfg.xgb_rounds, keep=local_predictors),
                 "pooled": evaluate_per_site(pooled_predict, encoder, sites, settings)}
    models = {"federated": federated_entry(task, federated, summaries["federated"])}
    models |= {name: model_metrics(task, s) for name, s in summaries.items() if name != "federated"}
    importance = {"federated": federated.importance.get("features", {}),
                  "pooled": pooled_importance(pooled_predict, encoder, sites, settings)}
    return Family(models, summaries, importance, (encoder, pooled_predict), local_predictors)


def classic_family(name: str, task: TaskSpec, sites: dict, settings: BaselineSettings) -> Family:
    """A scikit-learn model of the seed paper's comparison, local-only and pooled."""
    summaries = {"local": local_classic(name, sites, settings), "pooled": pooled_classic(name, sites, settings)}
    return Family({mode: model_metrics(task, s) for mode, s in summaries.items()}, summaries, {})


def policy_results(cfg: ExperimentConfig, policy: dict, sources: list[SiteSource], world: World | None,
                   families: dict[str, Family], sites: dict, ensemble: Callable[[dict], object | None] = lambda f: None
                   ) -> dict:
    """Where the signed policy is, which key verifies it, which sites hold it, and — in the simulated world —
    how it does against the oracle, standard of care, local-only and pooled policies, and, for a structured
    candidate, against ``ensemble(formulations)``: this run's ANN + XGBoost policy (issue 12: "compare both")."""
    from shared.policy_loader import policy_from_bundle, policy_from_folder
    from shared.structured_policy import StructuredDosingPolicy
    from simulation.policy_evaluation import evaluate_policies, random_decider

    trust = sources[0].trust_key
    result = {"bundle": policy["bundle"], "trust_key": str(trust), "version": policy["version"],
              "shipped": policy["shipped"], "candidate": policy["candidate"], "gate": policy["gate"],
              "formulations": policy["formulations"], "sites": policy["sites"],
              "adjustment": policy.get("adjustment"), "policy_model": policy.get("policy_model", "ensemble"),
              "structured": policy.get("structured"), "evaluation": None}
    if world is None:
        return result  # the user's own sites: no ground truth to judge a policy by
    # what the gate judged: the signed bundle when it shipped, else the candidate it stopped
    federated = (policy_from_bundle(Path(policy["bundle"]), trust) if policy["shipped"]
                 else policy_from_folder(Path(policy["candidate"])))
    if isinstance(federated, StructuredDosingPolicy):
        pooled, local = structured_baselines(federated, sites, cfg.seed)
    else:
        pooled, local = ensemble_baselines(federated, families, sites)
    usual = {name: site_usual(site) for name, site in sites.items()}  # learned once, used by every policy
    policies = {"federated": lambda site: site_decider(federated, usual[site]),
                "local": lambda site: site_decider(local[site], usual[site]),
                "pooled": lambda site: site_decider(pooled, usual[site]),
                "random": lambda site: random_decider(federated, seed=cfg.seed + 2)}
    policies[SITE_SOC] = lambda site: site_soc_decider(federated, usual[site])
    alongside = ensemble(federated.formulations) if isinstance(federated, StructuredDosingPolicy) else None
    if alongside is not None:
        policies["ensemble"] = lambda site: site_decider(alongside, usual[site])
    evaluation = evaluate_policies(world, policies, federated, seed=cfg.seed + 1, sites=list(sites))
    result["evaluation"] = evaluation
    result["gate"] = gate_against_truth(policy["gate"], evaluation)
    return result


def ensemble_of_run(cfg: ExperimentConfig, record: RunRecord, artifacts: RunArtifacts, formulations: dict):
    """This run's ANN + XGBoost policy, built by the coordinator's own ``write_candidate`` (no dose adjuster: the
    run fitted none for a structured candidate) into ``OUT/ensemble-comparison``; None if the run trained no
    model. Judged beside a structured candidate only, never signed or sent."""
    from server.policy_phase import write_candidate
    from shared.policy_loader import policy_from_folder

    if not artifacts.has_ann and not artifacts.booster_keys:
        return None
    folder = cfg.out / "ensemble-comparison"
    write_candidate(artifacts, record, formulations, folder)
    return policy_from_folder(folder)


def structured_baselines(federated, sites: dict, split_seed: int) -> tuple[object, dict]:
    """The structured policy fitted on the pooled training rows (equal to the federated fit without DP) and on
    each site's own (local-only, its own formulations)."""
    import pandas as pd

    from shared.structured_policy import fit_structured_policy

    train = {name: site.episodes[assign_split(site.episodes, site.task, split_seed) == "train"]
             for name, site in sites.items()}
    pooled = fit_structured_policy([pd.concat(list(train.values()), ignore_index=True)], federated.formulations,
                                   federated.objective)
    local = {}
    for name, frame in train.items():
        own = set(sites[name].episodes["formulation_id"].astype(str))
        local[name] = fit_structured_policy([frame], {f: v for f, v in federated.formulations.items() if f in own},
                                            federated.objective)
    return pooled, local


def ensemble_baselines(federated, families: dict[str, Family], sites: dict) -> tuple[object, dict]:
    """The ANN + XGBoost policy with the pooled models and with each site's local-only models."""
    members = [name for name in ("ann", "xgboost") if name in families]

    def like_federated(encoder, predictors: dict, formulations: dict):
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
    return pooled, local


def version_entry(cfg: ExperimentConfig, policy: dict, trust: Path, world: World, sites: dict,
                  record: RunRecord, evaluation: dict | None = None) -> dict:
    """One entry of ``policy.versions``: the version the run built, whether it shipped, its true value / oracle
    overall and per site next to standard of care's (measured as :func:`policy_results` measures version 1;
    a stopped candidate is measured too, so the gate's decision can be judged), the gate and ε per site.
    ``sites``: site name → its data now (each site's own standard of care is learned from them)."""
    from shared.policy_loader import policy_from_bundle, policy_from_folder
    from simulation.policy_evaluation import evaluate_policies

    if evaluation is None:
        candidate = (policy_from_bundle(Path(policy["bundle"]), trust) if policy["shipped"]
                     else policy_from_folder(Path(policy["candidate"])))
        usual = {name: site_usual(site) for name, site in sites.items()}
        evaluation = evaluate_policies(world, {"federated": lambda site: site_decider(candidate, usual[site]),
                                               SITE_SOC: lambda site: site_soc_decider(candidate, usual[site])},
                                       candidate, seed=cfg.seed + 1, sites=list(sites))
    overall = evaluation["overall"]
    return {"version": policy["version"], "shipped": policy["shipped"],
            "policy_model": policy.get("policy_model", "ensemble"),
            "value_oracle": overall["federated"]["value_ratio"],
            "soc_value_oracle": overall["standard_of_care"]["value_ratio"],
            "toxicity_rate": overall["federated"]["toxicity_rate"],
            "per_site": {site: {"value": part["federated"]["value"], "soc_value": part["standard_of_care"]["value"],
                                "oracle_value": part["oracle"]["value"], "patients": part["federated"]["patients"]}
                         for site, part in evaluation["per_site"].items()},
            "epsilon_spent": {site: p["epsilon"] for site, p in privacy_results(record).items()},  # lifetime
            "epsilon_this_run": {site: p["epsilon"] - (p["epsilon_before"] or 0.0)
                                 for site, p in privacy_results(record).items()},
            "gate": gate_against_truth(policy["gate"], evaluation)}


def deploy(cfg: ExperimentConfig, world: World, sources: list[SiteSource],
           on_round: Callable[[int], None] | None, say: Callable[[str], None],
           first: dict) -> tuple[list[dict], list[dict]]:
    """The closed loop (:mod:`simulation.deployment`): K − 1 periods of treating new patients with the installed
    policy (randomised on first cycles with ``cfg.explore``), each followed by a federated refit on the grown site
    data; ``first``: version 1's policy entry of the run record. Returns the versions after version 1 and the
    periods' figures. Each refit's run record is kept as ``OUT/deployment/federation-<period>.json``."""
    from simulation.deployment import treat_period

    folders = {load_site(s.path).name: (s.path, s.trust_key) for s in sources}
    sizes = {name: int(load_site(path).episodes["patient_id"].nunique()) for name, (path, _) in folders.items()}
    (cfg.out / "deployment").mkdir(exist_ok=True)
    exploration = Exploration() if cfg.explore else None
    versions, periods, last = [], [], first
    for period in range(1, cfg.deploy_cycles):
        say(f"deployment period {period}/{cfg.deploy_cycles - 1}")
        start = time.perf_counter()
        trial = trial_arm(last, exploration) if exploration is not None else None
        candidate = stopped_candidate(last) if exploration is not None else None
        sites = {}
        for name, source in folders.items():
            patients = cfg.deploy_patients or max(10, sizes[name] // 2)
            sites.update(treat_period(world, {name: source}, period, patients, cfg.seed, exploration,
                                      {name: trial} if trial is not None else None, candidate))
        treated_s = time.perf_counter() - start
        say(f"refit after period {period}")
        record = run_federation(cfg, sources, on_round)
        shutil.copy(Path(cfg.run_settings(len(sources), None).out_dir) / "federation.json",
                    cfg.out / "deployment" / f"federation-{period}.json")
        if not record.policy:
            raise RuntimeError(f"the refit after deployment period {period} built no policy")
        last = record.policy
        now = {name: load_site(path) for name, (path, _) in folders.items()}
        entry = version_entry(cfg, record.policy, sources[0].trust_key, world, now, record)
        cycles = np.array([s["cycles"] for s in sites.values()], dtype=float)
        value = float(np.average([s["value_per_cycle"] for s in sites.values()], weights=cycles))
        soc = float(np.average([s["soc_value_per_cycle"] for s in sites.values()], weights=cycles))
        ruled = float(np.average([s["soc_under_rules_value_per_cycle"] for s in sites.values()], weights=cycles))
        explored = {k: sum(s["exploration"][k] for s in sites.values())
                    for k in ("first_cycles", "trial_arm", "equipoise", "dose_spread")}
        periods.append({"period": period, "patients": sum(s["patients"] for s in sites.values()),
                        "cycles": int(cycles.sum()), "value_per_cycle": value, "soc_value_per_cycle": soc,
                        "cost_vs_soc": soc - value, "soc_under_rules_value_per_cycle": ruled,
                        "cost_vs_soc_under_rules": ruled - value, "treat_s": treated_s,
                        "refit_s": time.perf_counter() - start - treated_s, "sites": sites,
                        "exploration": explored | {"explore": exploration is not None, "trial": trial is not None}})
        versions.append(entry)
    return versions, periods


def trial_arm(policy_entry: dict, exploration: Exploration):
    """The last run's candidate as a trial arm (:mod:`shared.exploration`), loaded now (the next run's candidate
    replaces its folder): only if it was not shipped and the gate stopped it in equipoise within the trial's
    margin (:meth:`shared.exploration.Exploration.allows_trial`); None otherwise."""
    if not exploration.allows_trial(policy_entry.get("gate") or {}):
        return None
    return stopped_candidate(policy_entry)


def stopped_candidate(policy_entry: dict):
    """The last run's candidate if the gate stopped it (loaded now: the next run's candidate replaces its
    folder), else None. Where standard of care is served, its models judge which formulation is in equipoise
    with it (:class:`simulation.deployment.Recommender`)."""
    from shared.policy_loader import policy_from_folder

    if policy_entry.get("shipped") or not policy_entry.get("candidate"):
        return None
    return policy_from_folder(Path(policy_entry["candidate"]))


SITE_SOC = "site_standard_of_care"
"""The evaluation's name of what the gate compares against: each site's own standard of care as ``client.ope``
defines it (its most-logged first-cycle formulation per tumour type at the label dose; ``client.site_gate``),
which differs from the simulator's ``standard_of_care`` (the clinic's one usual formulation) by up to 0.07
utility per patient (BENCHMARKS.md, "Release gate's off-policy estimate against the truth")."""


def site_usual(site):
    """A site's usual formulations (``client.site_gate.UsualFormulations``) from the first cycles it decided by
    its own practice (``site``: its :class:`shared.validation.SiteData`): the rows the gate and the site's store
    read."""
    from client.decision_log import own_practice
    from client.ope import first_cycles
    from client.site_gate import UsualFormulations

    return UsualFormulations.of(own_practice(first_cycles(site.episodes), site.decisions))


def site_soc_decider(limits, usual):
    """A site's own standard of care (:data:`SITE_SOC`) as a decide function; ``usual``: :func:`site_usual`."""
    from shared.dosing_policy import label_actions

    return lambda frame: label_actions(limits, frame, usual.for_records(frame["tumour_type"]))


def site_decider(policy, usual):
    """``policy`` deciding first cycles at a site as the site serves it: each record carries the site's usual
    formulations (``usual``: :func:`site_usual`; ``client.site_gate.GatedPolicy``), which a policy relative to
    standard of care measures against."""
    return lambda frame: policy.recommend_frame(usual.annotate(frame), adjust=False)


def gate_against_truth(gate: dict, evaluation: dict) -> dict:
    """The gate's estimate of (candidate − standard of care) next to the simulator's true value of the same
    quantity: per site the candidate's true value minus that of the site's own standard of care
    (:data:`SITE_SOC`) on new patients, overall their mean weighted by the cycles each site valued (``n``), as
    the gate weights them. So ``covered`` says whether the gate's interval holds what it estimates."""
    per_site = evaluation["per_site"]

    def truth(part: dict) -> float:
        return part["federated"]["value"] - part[SITE_SOC]["value"]

    gate = dict(gate)
    weights = {site: float(entry["n"]) for site, entry in gate["per_site"].items()
               if site in per_site and (entry.get("n") or 0) > 0}
    gate["true_difference"] = (sum(w * truth(per_site[site]) for site, w in weights.items()) / sum(weights.values())
                               if weights else None)
    gate["covered"] = (bool(gate["lower"] <= gate["true_difference"] <= gate["upper"])
                       if gate.get("lower") is not None and gate["true_difference"] is not None else None)
    gate["per_site"] = {site: {**entry, "true_difference": truth(per_site[site])}
                        if site in per_site else entry for site, entry in gate["per_site"].items()}
    return gate


def privacy_results(record: RunRecord) -> dict[str, dict]:
    """Per site under DP: ε spent of its budget at δ, and per phase the ε it granted, its releases and ε after."""
    result = {}
    for site, p in record.privacy.items():
        if not p.dp:
            continue
        phases = {phase: {"granted": p.granted.get(phase), "releases": p.releases.get(phase, 0),
                          "epsilon_after": p.epsilon_after.get(phase)}
                  for phase in dict.fromkeys([*p.granted, *p.releases])}
        result[site] = {"epsilon": p.epsilon_spent, "delta": p.delta, "budget": p.epsilon_budget,
                        "epsilon_before": p.epsilon_spent_before, "phases": phases, "refused": p.refused}
    return result


def run_experiment(cfg: ExperimentConfig, on_round: Callable[[int], None] | None = None,
                   on_phase: Callable[[str], None] | None = None) -> dict:
    """Sites → federation → baselines → results.json / report.md / plots under ``cfg.out``. A closed loop's
    federations (one per cycle) share one Ray and its actors (``simulation.flower_runtime.ray_session``)."""
    from simulation.flower_runtime import ray_session

    with ray_session() if cfg.deploy_cycles > 1 else contextlib.nullcontext():
        return _run_experiment(cfg, on_round, on_phase)


def _run_experiment(cfg: ExperimentConfig, on_round: Callable[[int], None] | None,
                    on_phase: Callable[[str], None] | None) -> dict:
    say = on_phase or (lambda _: None)
    with one_torch_thread():
        return _experiment_steps(cfg, on_round, say)


@contextlib.contextmanager
def one_torch_thread():
    """The driver's torch on one thread while the experiment runs, as Ray gives each ClientApp actor.

    The baselines train and evaluate small MLPs in batches of tens of rows, where an intra-op thread pool
    costs more than it saves, and on a shared machine its threads wait on each other: 40 sites' local-only
    ANNs took 3.3-6.0 s on one thread against 19-135 s on two, same process, load 6-10 (2026-12-04)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _experiment_steps(cfg: ExperimentConfig, on_round: Callable[[int], None] | None,
                      say: Callable[[str], None]) -> dict:
    cfg.out.mkdir(parents=True, exist_ok=True)
    task = TaskSpec.from_toml(cfg.task) if cfg.task else NANOPARTICLE_TASK
    say("sites")
    start = time.perf_counter()
    if not cfg.resume:
        cfg.to_file()
    sources, world = prepare_sites(cfg)
    if cfg.task is None and cfg.policy:  # the dosing policy (and its signing kit) exist for the built-in task only
        sources = prepare_kit(cfg, sources, fresh=world is not None and not cfg.resume)
    check_robustness_options(cfg, sources)
    sites_seconds = time.perf_counter() - start
    say("federation")
    start = time.perf_counter()
    record = run_federation(cfg, sources, on_round)
    artifacts = RunArtifacts.open(cfg.out / "federated", run_id=record.run_id)
    federated_seconds = time.perf_counter() - start

    say("baselines")
    sites = {}
    for source in sources:
        try:
            site = load_site(source.path, task if cfg.task else None)
        except SiteDataError:
            continue  # the federation's record names it; baselines use the same usable sites
        if site.name in record.sites:
            sites[site.name] = site
    settings = BaselineSettings(task=task, epochs=cfg.rounds * cfg.local_epochs, batch_size=cfg.batch_size,
                                lr=cfg.lr, hidden=parse_hidden(cfg.hidden), seed=cfg.seed, split_seed=cfg.seed)
    privacy = {name: site_privacy(site) for name, site in sites.items()}
    start = time.perf_counter()
    families: dict[str, Family] = {}
    if "ann" in record.models:
        families["ann"] = ann_family(task, record, artifacts, sites, settings, privacy)
    if "xgboost" in record.models and artifacts.booster_keys:
        families["xgboost"] = boosting_family(task, record, artifacts, sites, settings, cfg)
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
        "sites": record.sites,
        "rejected": record.rejected,
        "attacks": [attack.to_record() for attack in cfg.parsed_attacks()],
        "models": models,
        "privacy": privacy_results(record),
        "central_dp": asdict(record.central_dp) if record.central_dp is not None else None,
        "statistics": record.statistics,
        "rounds": record.models["ann"].rounds if "ann" in record.models else [],
        "timing": {"sites_s": sites_seconds, "federation_s": federated_seconds, "baselines_s": baseline_seconds,
                   **{f"{family}_s": model.seconds for family, model in record.models.items()}},
        "pooled_dp_budget": asdict(pooled_privacy) if pooled_privacy else None,
        "importance": {name: family.importance for name, family in families.items() if family.importance},
        "not_trained": {family: {"refused": model.refused, "failures": model.failures}
                        for family, model in record.models.items() if family not in families},
        "policy": None,
    }
    source_at = {s.path.resolve(): s for s in sources}  # one resolve per site: a site × source scan was 10⁶ at 1,000
    by_name = {name: source_at[Path(site.path).resolve()] for name, site in sites.items()
               if Path(site.path).resolve() in source_at}
    for family, phase, key in (("ann", record.personalisation, "personalisation"),
                               ("xgboost", record.personalisation_xgboost, "personalisation_xgboost")):
        if phase is not None and family in models:
            exact = site_records(by_name, record.run_id, family)
            models[family]["personalised"] = personalised_entry(task, phase, exact,
                                                                results["privacy"] if family == "ann" else {})
            results[key] = personalisation_results(phase)
    if record.policy:
        say("policy")
        start = time.perf_counter()
        results["policy"] = policy_results(cfg, record.policy, sources, world, families, sites,
                                           partial(ensemble_of_run, cfg, record, artifacts))
        if world is not None:  # version 1, then the closed loop's versions
            first = version_entry(cfg, record.policy, sources[0].trust_key, world, sites, record,
                                  results["policy"]["evaluation"])
            results["policy"]["versions"], results["policy"]["deployment"] = [first], []
            if cfg.deploy_cycles > 1:
                later, periods = deploy(cfg, world, sources, on_round, say, record.policy)
                results["policy"]["versions"] += later
                results["policy"]["deployment"] = periods
        results["timing"]["policy_evaluation_s"] = time.perf_counter() - start
    (cfg.out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    say("report")
    from simulation.report import write_report

    write_report(cfg.out, results, summaries)
    return results
