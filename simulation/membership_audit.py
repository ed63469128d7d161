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

Each site's non-members are all its test rows; its members are the rows of as many of its training patients, drawn
(seeded), as the test split holds; rows without the outcome scored are left out and the larger group subsampled, so
every comparison is balanced and states its counts. With ``non_members="fresh"`` (simulated sites only) the
non-members are the test rows plus the rows of fresh patients of the same clinics (a seed stream neither the run
nor the reference models use), as many as make the non-member patients as many as the training patients, and
every training patient is a member: about 8 × the pairs at the default 80:10:10 split, so the standard errors
fall by almost 3 ×. The simulator draws a clinic's patients independently from its fixed profile, so fresh
patients are exchangeable with the test ones; ``non_member_check`` measures it (the headline score's AUC of test
against fresh non-members, ≈ 0.5 when it holds). Rows are episodes, and a patient's cycles share a split: the
attack is run per row and per patient (the mean of the patient's row scores), because DP-SGD here bounds one row's
influence, and a patient of k cycles is protected only at kε (group privacy). Metrics: the ROC AUC
(``sklearn.metrics.roc_auc_score``, with the Hanley & McNeil 1982 standard error and, for rows, a bootstrap over
whole patients, ``auc_se_clustered``, the one to read: a patient's cycles are not independent) and the TPR at
1 % FPR: the largest true-positive rate of a threshold whose false-positive rate is at most 1 %, read off
``sklearn.metrics.roc_curve`` without interpolating upwards. With N non-members only ⌊0.01 N⌋ of them may score
above that threshold; when that is 0 the figure is the TPR at zero false positives, and ``false_positives_at_1pct``
says so.

``OUT/audit/membership.json``: ``{"overall": {"auc", "tpr_at_1pct_fpr", ...}, "per_site": {site: {...}}}`` for the
headline (the calibrated attack on the ANN's total training loss, or the loss attack without references), the same
per patient in ``"patients"``, plus every model × head × attack (rows, and patients) in ``"attacks"``, the
non-member source (``"non_members"``, its ``"non_member_check"``) and the seconds spent (``"seconds"``);
``OUT/audit/membership.md`` the same as tables, and the run's ``report.md`` gets (or has replaced) its
"Membership-inference audit" section.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm, rankdata
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
from simulation.experiment import one_torch_thread

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
BOOTSTRAP_RESAMPLES = 200
"""Resamples of the cluster bootstrap: its standard error is itself within about 5 % (1/√(2·200))."""
NON_MEMBERS = ("test", "fresh")
"""Where non-members come from: the sites' test splits only, or those plus fresh patients of the same clinics
(simulated sites only) so that every training patient can be a member (:func:`fresh_patients`)."""
FRESH_PREFIX = "fresh/"
"""Prefix of a fresh (never-at-the-site) non-member's unit, so it never shares a name with a site's patient."""
FRESH_STREAM = 0x4E4F_4E4D
"""Seed stream of the fresh non-members' patients, apart from the reference models' (``0x4155_4449``)."""
NON_MEMBER_NOTE = " and fresh patients of the same clinics (never at any site), so every training patient is a member"
TRAINING_PHASE = "training"
"""The run record's name of the federated ANN's DP-SGD phase (its ``privacy.<site>.granted`` key)."""


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


def cluster_bootstrap_se(member_scores: np.ndarray, non_member_scores: np.ndarray, member_units: np.ndarray,
                         non_member_units: np.ndarray, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> float:
    """Standard error of the AUC when rows come in clusters (a patient's cycles): the spread of the AUC over
    resamples of whole units, drawn with replacement within members and within non-members (Field & Welsh,
    JRSS B 2007, the cluster bootstrap). Rows of one patient are not independent, so Hanley & McNeil's
    standard error, which counts rows, is too small for them."""
    rng = np.random.default_rng(seed)
    groups = []
    for scores, units in ((member_scores, member_units), (non_member_scores, non_member_units)):
        names, index = np.unique(units, return_inverse=True)
        groups.append([scores[index == i] for i in range(len(names))])
    aucs = []
    for _ in range(resamples):
        m, n = (np.concatenate([g[i] for i in rng.integers(len(g), size=len(g))]) for g in groups)
        aucs.append(mann_whitney_auc(m, n))
    return float(np.std(aucs, ddof=1))


def mann_whitney_auc(member_scores: np.ndarray, non_member_scores: np.ndarray) -> float:
    """The ROC AUC as the Mann-Whitney U statistic over n1·n0 (ties count one half): what ``roc_auc_score``
    returns, without its input checks (the bootstrap computes it hundreds of times)."""
    n1, n0 = len(member_scores), len(non_member_scores)
    ranks = rankdata(np.r_[member_scores, non_member_scores])
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def attack_metrics(member_scores: np.ndarray, non_member_scores: np.ndarray, member_units: np.ndarray | None = None,
                   non_member_units: np.ndarray | None = None) -> dict:
    """AUC (with its standard error), TPR at 1 % FPR and the counts behind them, for one attack's scores. Given
    each score's unit (patient), also the cluster-bootstrap standard error (``auc_se_clustered``)."""
    member_scores, non_member_scores = np.asarray(member_scores, float), np.asarray(non_member_scores, float)
    n1, n0 = len(member_scores), len(non_member_scores)
    if n1 == 0 or n0 == 0:
        return {"auc": None, "auc_se": None, "tpr_at_1pct_fpr": None, "members": n1, "non_members": n0,
                "false_positives_at_1pct": 0}
    labels = np.r_[np.ones(n1), np.zeros(n0)]
    scores = np.r_[member_scores, non_member_scores]
    auc = float(roc_auc_score(labels, scores))
    result = {"auc": auc, "auc_se": hanley_mcneil_se(auc, n1, n0), "tpr_at_1pct_fpr": tpr_at_fpr(labels, scores),
              "members": n1, "non_members": n0, "false_positives_at_1pct": int(math.floor(LOW_FPR * n0 + 1e-9))}
    if member_units is not None and non_member_units is not None:
        result["auc_se_clustered"] = cluster_bootstrap_se(member_scores, non_member_scores, member_units,
                                                          non_member_units)
        result["member_units"] = int(len(np.unique(member_units)))
        result["non_member_units"] = int(len(np.unique(non_member_units)))
    return result


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
            p_true = (np.where(safe_y == 1, p, 1 - p) if kind == "binary"
                      else p[np.arange(len(p)), safe_y.astype(int)])
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
    """One site's audited rows: its sampled members then all its non-members, with the flag and each row's unit
    (its patient for a task with a group column, else the row itself)."""

    frame: pd.DataFrame
    is_member: np.ndarray
    unit: np.ndarray


def audit_rows(episodes: pd.DataFrame, task: TaskSpec, split_seed: int, rng: np.random.Generator,
               outsiders: pd.DataFrame | None = None) -> AuditRows:
    """All test rows as non-members; as members, the rows of as many training units (patients), drawn without
    replacement, as the non-members hold. ``outsiders``: rows of patients who were never at the site (fresh
    patients of the same clinic, :func:`fresh_patients`), non-members too, their units prefixed ``fresh/``, so
    that up to all training patients can be members. Row counts then differ a little; the metrics balance them
    again."""
    parts = split_site(episodes, task, split_seed)
    test, train = parts["test"], parts["train"]

    def units(frame: pd.DataFrame, prefix: str = "") -> np.ndarray:
        return (np.char.add(prefix, frame[task.group].astype(str).to_numpy().astype(str)) if task.group is not None
                else np.array([f"{prefix}row{i}" for i in frame.index]))

    train_units, test_units = units(train), units(test)
    non_members, non_member_units = test, test_units
    if outsiders is not None and len(outsiders):
        non_members = pd.concat([test, outsiders], ignore_index=True)
        non_member_units = np.r_[test_units, units(outsiders, FRESH_PREFIX)]
    distinct = np.unique(train_units)
    chosen = rng.choice(distinct, size=min(len(np.unique(non_member_units)), len(distinct)), replace=False)
    members = train[np.isin(train_units, chosen)]
    return AuditRows(pd.concat([members, non_members], ignore_index=True),
                     np.r_[np.ones(len(members), bool), np.zeros(len(non_members), bool)],
                     np.r_[units(members), non_member_units])


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
        config = results.get("config") if isinstance(results, dict) else None
        if not isinstance(config, dict) or not isinstance(config.get("sites"), list):
            raise AuditError(f"{results_path}: no 'config' with the run's 'sites' (not a `fednano simulate` result)")
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

    def privacy(self) -> dict[str, dict | None]:
        """Per site under DP: its budget, δ, ε spent by the run and ε granted to the ANN's training phase."""
        result: dict[str, dict | None] = {}
        for name in self.sites:
            p = self.record.privacy.get(name)
            result[name] = None if p is None or not p.dp else {
                "epsilon_budget": p.epsilon_budget, "delta": p.delta, "epsilon_spent": p.epsilon_spent,
                "epsilon_training": p.granted.get(TRAINING_PHASE)}
        return result

    def training_privacy(self) -> Privacy | None:
        """The DP-SGD budget the reference ANNs train at: the tightest site's ε granted to training, or None."""
        granted = [Privacy(p["epsilon_training"], p["delta"]) for p in self.privacy().values()
                   if p is not None and p["epsilon_training"]]
        return min(granted, key=lambda p: p.epsilon, default=None)

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


def fresh_patients(run: AuditedRun, site: str, count: int) -> pd.DataFrame:
    """The rows of ``count`` new patients of ``site``'s clinic, drawn by the simulator with a seed stream that
    neither the run nor the reference models use: non-members exchangeable with the site's test patients (the
    simulator draws a clinic's patients independently from its fixed profile, which the audit checks: the
    ``non_member_check`` AUC of test against fresh non-members). Patients are taken in order of appearance;
    more fresh cohorts are drawn until ``count`` are found."""
    assert run.world is not None and run.task.group is not None
    clinic = next(c for c in run.world.clinics if c.name == site)
    parts, found, draw = [], 0, 0
    while found < count:
        seed = int(np.random.SeedSequence([clinic.seed, FRESH_STREAM, draw]).generate_state(1)[0])
        episodes, _ = simulate_clinic(run.world, dataclasses.replace(clinic, seed=seed))
        names = pd.unique(episodes[run.task.group].astype(str))[:count - found]
        if len(names) == 0:
            raise AuditError(f"{site}: the simulator drew a clinic without patients; no fresh non-members")
        part = episodes[episodes[run.task.group].astype(str).isin(names)].copy()
        part[run.task.group] = f"d{draw}:" + part[run.task.group].astype(str)  # distinct across draws
        parts.append(part)
        found, draw = found + len(names), draw + 1
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()  # none asked for


def reference_models(run: AuditedRun, encoder: FeatureEncoder, rows: pd.DataFrame, reference: int,
                     models: list[str], seconds: dict | None = None) -> dict[str, Predictor]:
    """One reference model per released family, trained on ``rows`` with the run's settings; ``seconds`` (if
    given) accumulates each family's training time under ``reference_<family>``."""
    cfg = run.config
    result: dict[str, Predictor] = {}
    seconds = {} if seconds is None else seconds
    start = time.perf_counter()
    if "ann" in models:
        privacy = run.training_privacy()
        settings = BaselineSettings(task=run.task, epochs=int(cfg["rounds"]) * int(cfg["local_epochs"]),
                                    batch_size=int(cfg["batch_size"]), lr=float(cfg["lr"]),
                                    hidden=tuple(run.artifacts.hidden), seed=int(cfg["seed"]) + 1 + reference,
                                    split_seed=run.split_seed)
        result["ann"] = partial(predict, fit_model(encoder, rows, privacy, settings))
        seconds["reference_ann"] = seconds.get("reference_ann", 0.0) + time.perf_counter() - start
    start = time.perf_counter()
    if "xgboost" in models:
        data = encode(encoder, rows)
        boosters = train_pooled_heads(encoder, data.x, data.targets,
                                      BoostingConfig(seed=int(cfg["seed"]) + 1 + reference), int(cfg["xgb_rounds"]))
        result["xgboost"] = partial(predict_heads, boosters, encoder)
        seconds["reference_xgboost"] = seconds.get("reference_xgboost", 0.0) + time.perf_counter() - start
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


def balanced(members: np.ndarray, non_members: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the two groups (positions in ``members``, ``non_members``) at the same size: the larger group
    subsampled at random (seeded), the smaller one whole."""
    k = min(len(members), len(non_members))
    return tuple(np.sort(rng.choice(len(g), size=k, replace=False)) if len(g) > k else np.arange(len(g))
                 for g in (members, non_members))


def per_unit(score: np.ndarray, rows: AuditRows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A unit's (patient's) score: the mean of its rows' recorded scores; returns (scores, is_member, units)."""
    frame = pd.DataFrame({"unit": rows.unit, "score": score, "member": rows.is_member}).dropna()
    grouped = frame.groupby("unit", sort=True).agg(score=("score", "mean"), member=("member", "first"))
    return grouped["score"].to_numpy(), grouped["member"].to_numpy(bool), grouped.index.to_numpy()


def _metrics_by_site(scores: dict[str, np.ndarray], rows: dict[str, AuditRows], seed: int,
                     patients: bool = False) -> dict:
    """Per site and overall (the sites' rows pooled, one threshold for all) metrics of one score; rows whose
    score is NaN (outcome not recorded) are left out and the groups balanced again (subsampled, seeded). With
    ``patients``, each unit's mean score is the attack's score for the unit."""
    rng = np.random.default_rng(seed)
    per_site, parts = {}, []
    for site, score in scores.items():
        flags, units = rows[site].is_member, rows[site].unit
        if patients:
            score, flags, units = per_unit(score, rows[site])
        keep = ~np.isnan(score)
        m, n = (score[keep & f] for f in (flags, ~flags))
        mu, nu = (np.char.add(f"{site}/", units[keep & f].astype(str)) for f in (flags, ~flags))
        im, jn = balanced(m, n, rng)
        part = (m[im], n[jn], mu[im], nu[jn])
        per_site[site] = attack_metrics(*part) if not patients else attack_metrics(*part[:2])
        parts.append(part)
    pooled = [np.concatenate(column) for column in zip(*parts, strict=True)]
    return {"overall": attack_metrics(*pooled) if not patients else attack_metrics(*pooled[:2]), "per_site": per_site}


# -- the audit ---------------------------------------------------------------------------------------------------------


def outsiders_needed(episodes: pd.DataFrame, task: TaskSpec, split_seed: int) -> int:
    """How many fresh non-member patients make a site's non-members as many as its training patients."""
    parts = split_site(episodes, task, split_seed)
    return max(0, int(parts["train"][task.group].nunique()) - int(parts["test"][task.group].nunique()))


def non_member_check(score: dict[str, np.ndarray], rows: dict[str, AuditRows]) -> dict:
    """The headline score of the sites' test non-members against their fresh non-members (pooled, episodes with
    the cluster bootstrap, and patients): AUC ≈ 0.5 when the fresh patients are exchangeable with the test ones,
    which the fresh non-members rely on. Not balanced (every non-member counts). Also, under
    ``"members_vs_test"``, the attack without the fresh patients: every member against the test non-members only
    (unbalanced; what the headline would be if the fresh patients were not exchangeable)."""
    parts: dict[str, list] = {k: [] for k in ("member", "test", "fresh")}
    units: dict[str, list] = {k: [] for k in parts}
    patients: dict[str, list] = {k: [] for k in parts}
    for site, s in score.items():
        r = rows[site]
        fresh = np.char.startswith(r.unit.astype(str), FRESH_PREFIX)
        named = np.char.add(f"{site}/", r.unit.astype(str))
        unit_scores, unit_member, unit_names = per_unit(s, r)
        unit_fresh = np.char.startswith(unit_names.astype(str), FRESH_PREFIX)
        for name, flag, unit_flag in (("member", r.is_member, unit_member),
                                      ("test", ~r.is_member & ~fresh, ~unit_member & ~unit_fresh),
                                      ("fresh", ~r.is_member & fresh, ~unit_member & unit_fresh)):
            keep = flag & ~np.isnan(s)
            parts[name].append(s[keep])
            units[name].append(named[keep])
            patients[name].append(unit_scores[unit_flag])
    x, u, pt = ({k: np.concatenate(v) for k, v in d.items()} for d in (parts, units, patients))

    def compare(a: str, b: str) -> dict:
        return attack_metrics(x[a], x[b], u[a], u[b]) | {"patients": attack_metrics(pt[a], pt[b])}

    return compare("test", "fresh") | {"members_vs_test": compare("member", "test")}


def run_membership_audit(out: Path, references: int = 4, seed: int = 0, non_members: str = "test",
                         say: Callable[[str], None] = lambda _: None) -> dict:
    """Audit the run in ``out``; writes ``out/audit/membership.json`` and ``membership.md`` and updates the run's
    ``report.md``. ``references``: reference models per family (0: the uncalibrated loss attack only).
    ``non_members``: ``"test"`` (the sites' test patients, and as many training patients as members) or
    ``"fresh"`` (those plus fresh patients of the same clinics, so that every training patient is a member;
    simulated sites only). Torch runs on one thread meanwhile (``one_torch_thread``, as the simulation's
    baselines): the reference ANNs are small MLPs whose two-thread pool mostly waits on a shared machine."""
    with one_torch_thread():
        return _membership_audit(out, references, seed, non_members, say)


def _membership_audit(out: Path, references: int, seed: int, non_members: str,
                      say: Callable[[str], None]) -> dict:
    if non_members not in NON_MEMBERS:
        raise AuditError(f"non-members {non_members!r}: expected one of {', '.join(NON_MEMBERS)}")
    started = time.perf_counter()
    run = AuditedRun.open(out)
    released = run.released()
    if not released:
        raise AuditError(f"{out / 'federated'}: run {run.record.run_id} released no ANN or XGBoost model")
    if non_members == "fresh" and (run.world is None or run.task.group is None):
        raise AuditError(f"{out / 'results.json'}: fresh non-members need the simulator's clinics behind the sites "
                         "(a run of `fednano simulate` on its own world); use the test non-members")
    encoder = run.artifacts.encoder()
    rng = np.random.default_rng(seed)
    rows = {}
    for name, site in run.sites.items():
        outsiders = (fresh_patients(run, name, outsiders_needed(site.episodes, run.task, run.split_seed))
                     if non_members == "fresh" else None)
        rows[name] = audit_rows(site.episodes, run.task, run.split_seed, rng, outsiders)
    encoded = {name: encode(encoder, r.frame) for name, r in rows.items()}
    n_refs = references if run.world is not None else 0
    seconds = {"rows": time.perf_counter() - started, "references": 0.0}
    ref_stats: dict[str, dict[str, list[RowStatistics]]] = {m: {s: [] for s in rows} for m in released}
    for r in range(n_refs):
        say(f"reference models {r + 1}/{n_refs}")
        fresh = fresh_training_rows(run, r)
        for model, predictor in reference_models(run, encoder, fresh, r, list(released), seconds).items():
            for site, data in encoded.items():
                ref_stats[model][site].append(row_statistics(run.task, predictor(data.x), data.targets))
    seconds["references"] = time.perf_counter() - started - seconds["rows"]
    say("attacks")
    detail: dict = {}
    scores_of: dict[tuple[str, str], dict[str, dict[str, np.ndarray]]] = {}  # (model, head) → attack → site → scores
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
            scores_of[model, head] = by_attack
            detail[model][head] = {attack: _metrics_by_site(scores, rows, seed)
                                   | {"patients": _metrics_by_site(scores, rows, seed, patients=True)}
                                   for attack, scores in by_attack.items()}
    headline_model = "ann" if "ann" in detail else next(iter(detail))
    headline_attack = "calibrated" if n_refs else "loss"
    headline = detail[headline_model][ALL_HEADS][headline_attack]
    check = None
    if non_members == "fresh":
        check = non_member_check(scores_of[headline_model, ALL_HEADS][headline_attack], rows)
    seconds["attacks"] = time.perf_counter() - started - seconds["rows"] - seconds["references"]
    privacy = run.privacy()
    audit = {
        "format": FORMAT, "version": FORMAT_VERSION, "run_id": run.record.run_id,
        "overall": headline["overall"], "per_site": headline["per_site"],
        "headline": {"model": headline_model, "head": ALL_HEADS, "attack": headline_attack},
        "dp": privacy,
        "reference_models": n_refs, "seed": seed, "non_members": non_members, "non_member_check": check,
        "seconds": seconds,
        "reference_note": ("pooled models on fresh patients of the same clinics, the run's epochs and (ANN) DP budget"
                           if n_refs else "none asked for: the uncalibrated loss attack only" if run.world is not None
                           else "no simulator behind these sites: the uncalibrated loss attack only"),
        "patients": headline["patients"],
        "rows": {site: {"members": int(r.is_member.sum()), "non_members": int((~r.is_member).sum()),
                        "member_units": int(len(np.unique(r.unit[r.is_member]))),
                        "non_member_units": int(len(np.unique(r.unit[~r.is_member]))),
                        "fresh_non_member_units": int(len(np.unique(
                            r.unit[~r.is_member & np.char.startswith(r.unit.astype(str), FRESH_PREFIX)])))}
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


def _se(metrics: dict) -> float | None:
    """The standard error to print: the cluster bootstrap's where rows come in patients, else Hanley & McNeil's."""
    return metrics.get("auc_se_clustered", metrics["auc_se"])


def audit_section(audit: dict) -> list[str]:
    """The report's audit section (markdown lines) from ``membership.json``'s content."""
    head = audit["headline"]
    dp = {site: p for site, p in audit["dp"].items()}
    lines = [REPORT_SECTION, "",
             f"Membership inference on the released models (`audit/membership.json`, run {audit['run_id']}): "
             f"members are a site's training rows, non-members its test rows"
             f"{NON_MEMBER_NOTE if audit.get('non_members') == 'fresh' else ''}, balanced per site; "
             f"{audit['reference_models']} reference model(s) per family ({audit['reference_note']}). "
             "AUC 0.5 is chance; ± is a standard error (for episodes by a bootstrap over whole patients, whose "
             "cycles are not independent); TPR at 1 % FPR is read off the empirical ROC curve (with fewer than 100 "
             "non-members, at zero false positives).", "",
             f"Headline: {head['attack']} attack on the {head['model']} (sum of the outcomes' losses).", "",
             "| site | DP ε (training of budget) | members | non-members | AUC ± se | TPR @ 1 % FPR | FP allowed |",
             "|---|---|---|---|---|---|---|"]
    for unit, part in (("episodes", audit), ("patients", audit["patients"])):
        for site, m in [*part["per_site"].items(), ("overall", part["overall"])]:
            eps = ("–" if site == "overall" else
                   f"{dp[site]['epsilon_training']:.2g} of {dp[site]['epsilon_budget']:g}" if dp.get(site) else "no DP")
            lines.append(f"| {site} ({unit}) | {eps} | {m['members']} | {m['non_members']} | {_fmt(m['auc'])} ± "
                         f"{_fmt(_se(m))} | {_fmt(m['tpr_at_1pct_fpr'])} | {m['false_positives_at_1pct']} |")
    check = audit.get("non_member_check")
    if check is not None:
        lines += ["", f"Fresh against test non-members (should be chance): AUC {_fmt(check['auc'])} ± "
                      f"{_fmt(_se(check))} per episode, {_fmt(check['patients']['auc'])} ± "
                      f"{_fmt(_se(check['patients']))} per patient. Members against the test non-members only: "
                      f"AUC {_fmt(check['members_vs_test']['auc'])} ± {_fmt(_se(check['members_vs_test']))} per "
                      f"episode, {_fmt(check['members_vs_test']['patients']['auc'])} ± "
                      f"{_fmt(_se(check['members_vs_test']['patients']))} per patient."]
    lines += ["", "Every model, head and attack (overall; episodes, then patients):", "",
              "| model | head | attack | AUC ± se (episodes) | TPR @ 1 % FPR | members/non-members | "
              "AUC ± se (patients) | TPR @ 1 % FPR | members/non-members |", "|---|---|---|---|---|---|---|---|---|"]
    for model, heads in audit["attacks"].items():
        for head_name, attacks in heads.items():
            for attack, result in attacks.items():
                cells = [f"{_fmt(m['auc'])} ± {_fmt(_se(m))} | {_fmt(m['tpr_at_1pct_fpr'])} | "
                         f"{m['members']}/{m['non_members']}" for m in (result["overall"],
                                                                         result["patients"]["overall"])]
                lines.append(f"| {model} | {head_name} | {attack} | {cells[0]} | {cells[1]} |")
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
