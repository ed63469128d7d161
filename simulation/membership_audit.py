"""Empirical privacy audit of a simulated run's released models: how well can an attacker tell a site's training
rows (members) from its held-out test rows (non-members) by querying the released global ANN and XGBoost models?

The simulator knows which rows trained (each site's ``train`` split, :func:`client.split.split_site` with the run's
split seed) and which did not (its ``test`` split), and it can draw new patients from the same clinics. Attacks,
each a per-row membership score (higher: more likely a member):

- ``loss`` — the loss-threshold attack of Yeom et al., "Privacy risk in machine learning: analyzing the
  connection to overfitting", CSF 2018 (https://arxiv.org/abs/1709.01604): score = −loss of the released model.
- ``calibrated`` — difficulty calibration of Watson et al., "On the importance of difficulty calibration in
  membership inference attacks", ICLR 2022 (https://arxiv.org/abs/2111.08440): score = −(loss of the released
  model − mean loss of reference models that never saw the row), so rows that are simply easy stop looking like
  members.
- ``lira`` — the offline likelihood-ratio attack of Carlini et al., "Membership inference attacks from first
  principles", IEEE S&P 2022 (https://arxiv.org/abs/2112.03570): per row, a Gaussian fitted to the reference
  models' logit-scaled confidence in the true label, φ = log p_y − log(1 − p_y) (for a regression outcome
  −(y − ŷ)² on the standardised scale); score = Φ((φ_target − μ_out) / σ_out), the one-sided test that the
  released model is more confident than a model without the row. With few reference models the paper's
  global variance is used (σ_out pooled over rows), as it recommends.

Reference models are trained by the auditor on fresh patients of the same clinics (new seeds of the simulator's
own clinic profiles), as many rows per clinic as the site's training split, with the run's epochs, batch size,
learning rate, widths and (at a DP run) DP-SGD at the tightest site's budget, and pooled: a stand-in for the
federated training whose per-row difficulty they measure (XGBoost references are pooled boosters without DP).
Sites given by the user (``--sites``) have no simulator behind them: only the uncalibrated ``loss`` attack runs.

Each site's non-members are all its test rows with the outcome recorded; as many of its training rows are drawn
(seeded) as members, so every comparison is balanced and states its counts. Rows are episodes (a patient's
cycles share a split). Metrics: the ROC AUC (``sklearn.metrics.roc_auc_score``, with the Hanley & McNeil 1982
standard error) and the TPR at 1 % FPR: the largest true-positive rate of a threshold whose false-positive rate
is at most 1 %, read off ``sklearn.metrics.roc_curve`` without interpolating upwards. With N non-members only
⌊0.01 N⌋ of them may score above that threshold; when that is 0 the figure is the TPR at zero false positives,
and ``false_positives_at_1pct`` says so.

``OUT/audit/membership.json``: ``{"overall": {"auc", "tpr_at_1pct_fpr", ...}, "per_site": {site: {...}}}`` for
the headline (the calibrated attack on the ANN's total training loss, or the loss attack without references),
plus every model × head × attack in ``"attacks"``; ``OUT/audit/membership.md`` the same as tables, and the run's
``report.md`` gets (or has replaced) its "Membership-inference audit" section.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve

from client.boosting import train_pooled_heads
from client.split import encode, split_site
from server.run_record import RunRecord
from shared.ann import predict
from shared.artifacts import RunArtifacts
from shared.boosting import BoostingConfig, predict_heads
from shared.encoding import FeatureEncoder
from shared.task import NANOPARTICLE_TASK, TaskSpec
from shared.validation import SiteDataError, load_site
from simulation.baselines import BaselineSettings, Privacy, fit_model
from simulation.clinics import World, make_world, simulate_clinic

AUDIT_DIR = "audit"
AUDIT_FILE = "membership.json"
AUDIT_REPORT = "membership.md"
FORMAT = "fednano/membership-audit"
FORMAT_VERSION = 1
LOW_FPR = 0.01
"""The false-positive rate at which the TPR is reported (Carlini et al. 2022 argue for low-FPR figures)."""
ALL_HEADS = "all"
"""The pseudo-head whose loss is the sum over a row's recorded outcomes (what the model was trained to lower)."""
ATTACKS = ("loss", "calibrated", "lira")
PROBABILITY_FLOOR = 1e-7  # keeps log p and log(1 − p) finite for a saturated prediction
REPORT_SECTION = "## Membership-inference audit"


class AuditError(ValueError):
    """The folder cannot be audited (no run there, or its sites are gone); says which file and why."""


# -- metrics ---------------------------------------------------------------------------------------------------


def hanley_mcneil_se(auc: float, n_members: int, n_non_members: int) -> float:
    """Standard error of an ROC AUC (Hanley & McNeil, Radiology 1982;143:29, eq. 2)."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    variance = (auc * (1 - auc) + (n_members - 1) * (q1 - auc**2)
                + (n_non_members - 1) * (q2 - auc**2)) / (n_members * n_non_members)
    return float(math.sqrt(max(variance, 0.0)))


def tpr_at_fpr(is_member: np.ndarray, score: np.ndarray, fpr_limit: float = LOW_FPR) -> float:
    """The largest TPR over thresholds whose FPR is at most ``fpr_limit`` (a point of the empirical ROC curve,
    never interpolated upwards)."""
    fpr, tpr, _ = roc_curve(is_member, score)
    return float(tpr[fpr <= fpr_limit + 1e-12].max())


def attack_metrics(member_scores: np.ndarray, non_member_scores: np.ndarray) -> dict:
    """AUC (with its standard error), TPR at 1 % FPR and the counts behind them, for one attack's scores."""
    member_scores, non_member_scores = np.asarray(member_scores, float), np.asarray(non_member_scores, float)
    n1, n0 = len(member_scores), len(non_member_scores)
    if n1 == 0 or n0 == 0:
        return {"auc": None, "auc_se": None, "tpr_at_1pct_fpr": None, "members": n1, "non_members": n0,
                "false_positives_at_1pct": 0}
    labels = np.r_[np.ones(n1), np.zeros(n0)]
    scores = np.r_[member_scores, non_member_scores]
    auc = float(roc_auc_score(labels, scores))
    return {"auc": auc, "auc_se": hanley_mcneil_se(auc, n1, n0), "tpr_at_1pct_fpr": tpr_at_fpr(labels, scores),
            "members": n1, "non_members": n0, "false_positives_at_1pct": int(math.floor(LOW_FPR * n0 + 1e-9))}


# -- per-row statistics of a model ---------------------------------------------------------------------------


@dataclass
class RowStatistics:
    """Per row and head: the model's loss and its logit-scaled confidence in the true label (NaN: unrecorded)."""

    loss: dict[str, np.ndarray]
    confidence: dict[str, np.ndarray]


def row_statistics(task: TaskSpec, predictions: dict[str, np.ndarray], targets: dict[str, np.ndarray]) -> RowStatistics:
    """Loss and φ per outcome (module docstring), and their totals over the recorded outcomes (:data:`ALL_HEADS`)."""
    kinds = {o.name: o.kind for o in task.outcomes}
    loss, confidence = {}, {}
    for name, kind in kinds.items():
        y, p = np.asarray(targets[name], float), np.asarray(predictions[name], float)
        recorded = ~np.isnan(y)
        safe_y = np.where(recorded, y, 0.0)
        if kind == "regression":
            row_loss = (p - safe_y) ** 2
            phi = -row_loss
        else:
            if kind == "binary":
                p_true = np.where(safe_y == 1, p, 1 - p)
            else:
                p_true = p[np.arange(len(p)), safe_y.astype(int)]
            p_true = np.clip(p_true, PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
            row_loss = -np.log(p_true)
            phi = np.log(p_true) - np.log1p(-p_true)
        loss[name] = np.where(recorded, row_loss, np.nan)
        confidence[name] = np.where(recorded, phi, np.nan)
    total = np.nansum(np.vstack(list(loss.values())), axis=0)
    loss[ALL_HEADS], confidence[ALL_HEADS] = total, -total
    return RowStatistics(loss, confidence)


# -- the rows under audit --------------------------------------------------------------------------------------


@dataclass
class AuditRows:
    """One site's audited rows: its sampled members then all its non-members, with the flag."""

    frame: pd.DataFrame
    is_member: np.ndarray


def audit_rows(episodes: pd.DataFrame, task: TaskSpec, split_seed: int, rng: np.random.Generator) -> AuditRows:
    """All test rows as non-members and as many training rows, drawn without replacement, as members."""
    parts = split_site(episodes, task, split_seed)
    test, train = parts["test"], parts["train"]
    n = min(len(test), len(train))
    members = train.iloc[rng.choice(len(train), size=n, replace=False)]
    return AuditRows(pd.concat([members, test.iloc[:n]], ignore_index=True), np.r_[np.ones(n, bool), np.zeros(n, bool)])


# -- the run under audit ----------------------------------------------------------------------------------------


Predictor = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass
class AuditedRun:
    """What the audit reads of a finished ``fednano simulate`` run."""

    out: Path
    config: dict
    task: TaskSpec
    record: RunRecord
    artifacts: RunArtifacts
    sites: dict  # site name -> shared.validation.SiteData, the sites that took part
    world: World | None  # the simulator's world when the sites are its clinics

    @classmethod
    def open(cls, out: Path) -> AuditedRun:
        out = Path(out)
        results_path = out / "results.json"
        try:
            results = json.loads(results_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise AuditError(f"{results_path}: no readable results of a `fednano simulate` run ({err})") from err
        config = results["config"]
        record = RunRecord.read(out / "federated")
        artifacts = RunArtifacts.open(out / "federated", run_id=record.run_id)
        task = TaskSpec.from_toml(config["task"]) if config.get("task") else NANOPARTICLE_TASK
        sites = {}
        for given in config["sites"]:
            path = Path(given)
            if not path.is_absolute() and not path.exists():
                path = out / "sites" / path.name  # a simulated site, the run's --out given relative
            try:
                site = load_site(path, task if config.get("task") else None)
            except SiteDataError as err:
                raise AuditError(f"{path}: the site's data no longer validates; it cannot be audited") from err
            if site.name in record.sites:
                sites[site.name] = site
        return cls(out, config, task, record, artifacts, sites, simulated_world(out, config))

    @property
    def split_seed(self) -> int:
        return int(self.record.settings.get("split_seed", self.config["seed"]))

    def privacy(self) -> dict[str, Privacy | None]:
        result = {}
        for name, site in self.sites.items():
            p = site.config.get("privacy", {})
            result[name] = Privacy(float(p["epsilon"]), float(p["delta"])) if p.get("dp") else None
        return result

    def released(self) -> dict[str, Predictor]:
        """The released models as predictors on encoded rows: ``ann`` and ``xgboost`` where the run left them."""
        models: dict[str, Predictor] = {}
        if self.artifacts.has_ann:
            models["ann"] = partial(predict, self.artifacts.ann())
        if self.artifacts.booster_keys:
            models["xgboost"] = partial(predict_heads, self.artifacts.boosters(), self.artifacts.encoder())
        return models

    def trained_sites(self, model: str) -> list[str]:
        """The sites whose training rows went into ``model`` (not those that refused or failed it)."""
        family = self.record.models.get(model)
        left_out = set(family.refused) | set(family.failures) if family is not None else set()
        return [name for name in self.sites if name not in left_out]


def simulated_world(out: Path, config: dict) -> World | None:
    """The simulator's world of the run, rebuilt from its seed, when its sites are the simulator's clinics (their
    ``world.json`` agrees); None for the user's own sites."""
    described = out / "sites" / "world.json"
    if config.get("task") or not described.is_file():
        return None
    if not all(Path(s).parent.name == "sites" for s in config["sites"]):
        return None
    world = make_world(int(config["clinics"]), int(config["seed"]), config.get("patients_per_clinic"))
    written = json.loads(described.read_text())
    if [c["seed"] for c in written["clinics"]] != [c.seed for c in world.clinics]:
        raise AuditError(f"{described}: the world there is not the one seed {config['seed']} makes")
    return world


# -- reference models ---------------------------------------------------------------------------------------------


def fresh_training_rows(run: AuditedRun, reference: int) -> pd.DataFrame:
    """New patients of every audited clinic (a seed the run never used), as many training rows per clinic as
    the site's own training split, pooled."""
    assert run.world is not None
    parts = []
    for clinic in run.world.clinics:
        if clinic.name not in run.sites:
            continue
        own = split_site(run.sites[clinic.name].episodes, run.task, run.split_seed)["train"]
        seed = int(np.random.SeedSequence([clinic.seed, 0x4155_4449, reference]).generate_state(1)[0])
        episodes, _ = simulate_clinic(run.world, dataclasses.replace(clinic, seed=seed))
        fresh = split_site(episodes, run.task, run.split_seed)["train"]
        parts.append(fresh.iloc[:len(own)])
    return pd.concat(parts, ignore_index=True)


def reference_models(run: AuditedRun, encoder: FeatureEncoder, rows: pd.DataFrame, reference: int,
                     models: list[str]) -> dict[str, Predictor]:
    """One reference model per released family, trained on ``rows`` with the run's settings."""
    cfg = run.config
    result: dict[str, Predictor] = {}
    if "ann" in models:
        budgets = [p for p in run.privacy().values() if p is not None]
        privacy = min(budgets, key=lambda p: p.epsilon) if budgets else None
        settings = BaselineSettings(task=run.task, epochs=int(cfg["rounds"]) * int(cfg["local_epochs"]),
                                    batch_size=int(cfg["batch_size"]), lr=float(cfg["lr"]),
                                    hidden=tuple(run.artifacts.hidden), seed=int(cfg["seed"]) + 1 + reference,
                                    split_seed=run.split_seed)
        result["ann"] = partial(predict, fit_model(encoder, rows, privacy, settings))
    if "xgboost" in models:
        data = encode(encoder, rows)
        boosters = train_pooled_heads(encoder, data.x, data.targets,
                                      BoostingConfig(seed=int(cfg["seed"]) + 1 + reference), int(cfg["xgb_rounds"]))
        result["xgboost"] = partial(predict_heads, boosters, encoder)
    return result


# -- scores ----------------------------------------------------------------------------------------------------------


def attack_scores(target: RowStatistics, references: list[RowStatistics], head: str) -> dict[str, np.ndarray]:
    """Each attack's membership score for one head's rows (module docstring); without references, ``loss`` only."""
    scores = {"loss": -target.loss[head]}
    if not references:
        return scores
    ref_loss = np.vstack([r.loss[head] for r in references])
    scores["calibrated"] = -(target.loss[head] - ref_loss.mean(axis=0))
    if len(references) >= 2:
        ref_phi = np.vstack([r.confidence[head] for r in references])
        mu = ref_phi.mean(axis=0)
        sigma = math.sqrt(max(float(np.nanmean(ref_phi.var(axis=0, ddof=1))), 1e-12))  # global variance
        scores["lira"] = norm.cdf((target.confidence[head] - mu) / sigma)
    return scores


def balanced(member_scores: np.ndarray, non_member_scores: np.ndarray,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The two groups at the same size: the larger one subsampled at random (seeded)."""
    k = min(len(member_scores), len(non_member_scores))
    return (rng.choice(member_scores, size=k, replace=False) if len(member_scores) > k else member_scores,
            rng.choice(non_member_scores, size=k, replace=False) if len(non_member_scores) > k else non_member_scores)


def _metrics_by_site(scores: dict[str, np.ndarray], flags: dict[str, np.ndarray], seed: int) -> dict:
    """Per site and overall (the sites' rows pooled, one threshold for all) metrics of one score; rows whose
    score is NaN (outcome not recorded) are left out and the groups balanced again."""
    rng = np.random.default_rng(seed)
    per_site, members, non_members = {}, [], []
    for site, score in scores.items():
        keep = ~np.isnan(score)
        m, n = balanced(score[keep & flags[site]], score[keep & ~flags[site]], rng)
        per_site[site] = attack_metrics(m, n)
        members.append(m)
        non_members.append(n)
    return {"overall": attack_metrics(np.concatenate(members), np.concatenate(non_members)), "per_site": per_site}


# -- the audit ---------------------------------------------------------------------------------------------------------


def run_membership_audit(out: Path, references: int = 4, seed: int = 0,
                         say: Callable[[str], None] = lambda _: None) -> dict:
    """Audit the run in ``out``; writes ``out/audit/membership.json`` and ``membership.md`` and updates the run's
    ``report.md``. ``references``: reference models per family (0: the uncalibrated loss attack only)."""
    run = AuditedRun.open(out)
    released = run.released()
    if not released:
        raise AuditError(f"{out / 'federated'}: run {run.record.run_id} released no ANN or XGBoost model")
    encoder = run.artifacts.encoder()
    rng = np.random.default_rng(seed)
    rows = {name: audit_rows(site.episodes, run.task, run.split_seed, rng) for name, site in run.sites.items()}
    encoded = {name: encode(encoder, r.frame) for name, r in rows.items()}
    n_refs = references if run.world is not None else 0
    ref_stats: dict[str, dict[str, list[RowStatistics]]] = {m: {s: [] for s in rows} for m in released}
    for r in range(n_refs):
        say(f"reference models {r + 1}/{n_refs}")
        fresh = fresh_training_rows(run, r)
        for model, predictor in reference_models(run, encoder, fresh, r, list(released)).items():
            for site, data in encoded.items():
                ref_stats[model][site].append(row_statistics(run.task, predictor(data.x), data.targets))
    say("attacks")
    detail: dict = {}
    heads = [o.name for o in run.task.outcomes] + [ALL_HEADS]
    for model, predictor in released.items():
        trained = run.trained_sites(model)
        target = {s: row_statistics(run.task, predictor(encoded[s].x), encoded[s].targets) for s in trained}
        detail[model] = {}
        for head in heads:
            by_attack: dict[str, dict[str, np.ndarray]] = {}
            for site in trained:
                for attack, score in attack_scores(target[site], ref_stats[model][site], head).items():
                    by_attack.setdefault(attack, {})[site] = score
            flags = {s: rows[s].is_member for s in trained}
            detail[model][head] = {attack: _metrics_by_site(scores, flags, seed) for attack, scores in by_attack.items()}
    headline_model = "ann" if "ann" in detail else next(iter(detail))
    headline_attack = "calibrated" if n_refs else "loss"
    headline = detail[headline_model][ALL_HEADS][headline_attack]
    privacy = run.privacy()
    audit = {
        "format": FORMAT, "version": FORMAT_VERSION, "run_id": run.record.run_id,
        "overall": headline["overall"], "per_site": headline["per_site"],
        "headline": {"model": headline_model, "head": ALL_HEADS, "attack": headline_attack},
        "dp": {site: (dataclasses.asdict(p) if p else None) for site, p in privacy.items()},
        "reference_models": n_refs, "seed": seed,
        "reference_note": ("pooled models on fresh patients of the same clinics, the run's epochs and (ANN) DP budget"
                           if n_refs else "no simulator behind these sites: the uncalibrated loss attack only"),
        "rows": {site: {"members": int(r.is_member.sum()), "non_members": int((~r.is_member).sum())}
                 for site, r in rows.items()},
        "attacks": detail,
    }
    folder = Path(out) / AUDIT_DIR
    folder.mkdir(exist_ok=True)
    (folder / AUDIT_FILE).write_text(json.dumps(audit, indent=1, allow_nan=False) + "\n")
    section = audit_section(audit)
    (folder / AUDIT_REPORT).write_text("\n".join(["# " + REPORT_SECTION.removeprefix("## "), *section[1:]]))
    add_to_report(Path(out) / "report.md", section)
    return audit


# -- report -----------------------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def audit_section(audit: dict) -> list[str]:
    """The report's audit section (markdown lines) from ``membership.json``'s content."""
    head = audit["headline"]
    dp = {site: p for site, p in audit["dp"].items()}
    lines = [REPORT_SECTION, "",
             f"Membership inference on the released models (`audit/membership.json`, run {audit['run_id']}): "
             f"members are a site's training rows, non-members its test rows, balanced per site; "
             f"{audit['reference_models']} reference model(s) per family ({audit['reference_note']}). "
             "AUC 0.5 is chance; TPR at 1 % FPR is read off the empirical ROC curve (with fewer than 100 "
             "non-members, at zero false positives).", "",
             f"Headline: {head['attack']} attack on the {head['model']} (sum of the outcomes' losses).", "",
             "| site | DP ε | members | non-members | AUC ± se | TPR @ 1 % FPR | FP allowed |",
             "|---|---|---|---|---|---|---|"]
    for site, m in [*audit["per_site"].items(), ("overall", audit["overall"])]:
        eps = "–" if site == "overall" else (f"{dp[site]['epsilon']:g}" if dp.get(site) else "no DP")
        lines.append(f"| {site} | {eps} | {m['members']} | {m['non_members']} | {_fmt(m['auc'])} ± "
                     f"{_fmt(m['auc_se'])} | {_fmt(m['tpr_at_1pct_fpr'])} | {m['false_positives_at_1pct']} |")
    lines += ["", "Every model, head and attack (overall):", "",
              "| model | head | attack | AUC ± se | TPR @ 1 % FPR | members/non-members |", "|---|---|---|---|---|---|"]
    for model, heads in audit["attacks"].items():
        for head_name, attacks in heads.items():
            for attack, result in attacks.items():
                m = result["overall"]
                lines.append(f"| {model} | {head_name} | {attack} | {_fmt(m['auc'])} ± {_fmt(m['auc_se'])} | "
                             f"{_fmt(m['tpr_at_1pct_fpr'])} | {m['members']}/{m['non_members']} |")
    return lines + [""]


def add_to_report(report: Path, section: list[str]) -> None:
    """Put ``section`` into the run's ``report.md``, replacing an earlier audit's section (nothing if the run
    wrote no report)."""
    if not report.is_file():
        return
    text = report.read_text()
    start = text.find(REPORT_SECTION)
    if start >= 0:
        end = text.find("\n## ", start + len(REPORT_SECTION))
        text = text[:start] + (text[end + 1:] if end >= 0 else "")
    report.write_text(text.rstrip("\n") + "\n\n" + "\n".join(section))
