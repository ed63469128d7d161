"""The global dosing policy: from a patient record to formulation, dose and interval, with the reasons.

For each patient the policy scores every action in its action space — each formulation of the site's
catalogue that the policy knows × doses on a grid (mg/m²) × intervals (days) — with the federated outcome
models, and picks the action of highest *conservative* benefit:

    score = low(P(response)) − W_TOXICITY · high(P(grade ≥ 3 toxicity)),   subject to high(P(toxicity)) ≤ ceiling

where low/high are the ensemble mean ∓ z standard deviations across the outcome models (federated ANN and
federated XGBoost): where the models disagree, the policy assumes the worse (a simple form of the "pessimism
under uncertainty" of offline decision making; Jin, Yang & Wang, ICML 2021). W_TOXICITY is the simulator's
utility weight (:mod:`simulation.oracle`): the policy optimises the value it is judged by.

Hard safety rules come first and no model output overrides them (:class:`SafetyRules`, numbers from the
Doxil/Caelyx label): the dose grid is capped by the hepatic reduction for raised bilirubin and by the
remaining lifetime anthracycline allowance; no dose is given while neutropenia (and fever) signs persist.

From cycle 2 on, if the bundle holds a fitted-Q dose adjuster (:mod:`shared.dose_adjustment`, learned
federated from the sites' multi-cycle trajectories), the policy keeps the previous formulation and lets the
adjuster choose the dose from the previous cycle's outcome and wearable readings (``adjust=True``).

Every number the policy uses lives in ``policy.json`` inside the signed bundle; :meth:`DosingPolicy.from_bundle`
verifies the bundle before loading anything.

Example
-------
>>> policy = DosingPolicy.from_bundle(Path("runs/simulate/policy/v1"), Path("kit/sites/a/policy_signing.pub"))
...                                                                                        # doctest: +SKIP
>>> policy.recommend([PatientRecord.model_validate_json(Path("examples/patient.json").read_text())])[0].dose_mg
...                                                                                        # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shared.encoding import MISSING_SUFFIX, FeatureEncoder
from shared.patient_record import PatientRecord, records_frame
from shared.policy_bundle import Manifest, verify_bundle

POLICY_FILE = "policy.json"
KIND = "fednano-dosing-policy/1"
RESPONSE, TOXICITY = "response", "toxicity_grade3"
FORMULATION_FEATURES = ("particle_size_nm", "zeta_mv", "encapsulation_pct", "pegylated", "drug_loading_pct",
                        "release_tau_h", "release_beta")

Predictor = Callable[[np.ndarray], Mapping[str, np.ndarray]]
"""An outcome model: encoded feature rows → P(outcome) per outcome name (at least response and toxicity)."""


LABEL_INTERVAL_DAYS = {"ovarian": 28, "breast": 28, "kaposi": 21, "myeloma": 21, "sarcoma": 28}
"""Label schedules of liposomal doxorubicin (Doxil/Caelyx SmPC: ovarian and breast q4w, Kaposi q2-3w,
myeloma with bortezomib q3w; soft-tissue sarcoma q4w, Judson et al., Eur J Cancer 2001)."""
LABEL_DOSE_MG_M2 = {"ovarian": 50.0, "breast": 50.0, "kaposi": 20.0, "myeloma": 30.0, "sarcoma": 50.0}
"""Label starting doses in mg/m², same sources: the dose of standard of care (fixed BSA dosing)."""


@dataclass(frozen=True)
class ActionSpace:
    """The doses (a grid in mg/m²) and intervals the policy may choose from.

    Intervals are the tumour type's label schedule delayed by one of ``delays_days``. Only the label
    schedule by default: the sites' logs delay a cycle mostly after a toxicity, so the models cannot tell the
    effect of a delay from that of the toxicity before it, and a policy must not act on effects the data
    cannot identify (offline decision making is trusted on the data's support only). Measured in the default
    simulated world: allowing a one-week delay lowers the federated policy's value (BENCHMARKS.md)."""

    dose_min_mg_m2: float = 10.0
    dose_max_mg_m2: float = 60.0  # above the 50 mg/m² label start dose, within doses studied for PLD
    dose_step_mg_m2: float = 5.0
    delays_days: tuple[int, ...] = (0,)
    label_interval_days: dict[str, int] = field(default_factory=lambda: dict(LABEL_INTERVAL_DAYS))

    def doses(self) -> np.ndarray:
        n = int(round((self.dose_max_mg_m2 - self.dose_min_mg_m2) / self.dose_step_mg_m2)) + 1
        return self.dose_min_mg_m2 + self.dose_step_mg_m2 * np.arange(n)

    def intervals(self, tumour_type: pd.Series) -> np.ndarray:
        """Interval choices per patient: (patients, delays) in days."""
        label = tumour_type.map(self.label_interval_days).to_numpy(dtype=float)
        return label[:, None] + np.asarray(self.delays_days, dtype=float)[None, :]


@dataclass(frozen=True)
class SafetyRules:
    """Hard limits no model output overrides (liposomal doxorubicin, Doxil/Caelyx label).

    - hepatic: bilirubin 1.2–3 mg/dL (20.5–51 µmol/L) → 75 % of the dose, above → 50 %; an unmeasured
      bilirubin is treated as raised (75 %) until measured;
    - cumulative: lifetime doxorubicin-equivalent 550 mg/m² (cardiomyopathy risk rises steeply beyond; Swain
      et al., Cancer 2003); the dose is capped at what remains, and treatment stops when less than the
      smallest dose remains;
    - neutropenia: no cycle starts with ANC < 1.0 × 10⁹/L (grade ≥ 3), nor with fever on the wearable and
      ANC < 1.5 × 10⁹/L or not measured (febrile-neutropenia signs); the cycle is delayed ``withhold_days``;
    - dose changes between cycles: after a grade ≥ 3 toxicity the next dose is at most 75 % of the previous
      one (the label's 25 % reduction, never re-escalated within the cycle after), otherwise at most
      ``max_escalation`` above it (the band the sites' logs cover), never below the smallest dose.
    """

    hepatic_bands_umol_l: tuple[float, float] = (20.5, 51.0)
    hepatic_factors: tuple[float, float] = (0.75, 0.5)
    cumulative_limit_mg_m2: float = 550.0
    anc_withhold_e9_l: float = 1.0
    anc_febrile_e9_l: float = 1.5
    withhold_days: int = 7
    after_toxicity_factor: float = 0.75
    max_escalation: float = 0.25


@dataclass(frozen=True)
class Objective:
    """What the policy maximises: response minus weighted toxicity, pessimistic by ``z`` ensemble SDs, with a
    ceiling on the pessimistic toxicity risk."""

    toxicity_weight: float = 0.5
    toxicity_ceiling: float = 0.35
    z: float = 1.0


@dataclass(frozen=True)
class Estimate:
    """A predicted probability with its pessimistic/optimistic bounds (ensemble mean ∓ z SD, clipped)."""

    mean: float
    low: float
    high: float


@dataclass(frozen=True)
class RuleApplied:
    """One rule that shaped a recommendation: which, what it did, and why."""

    rule: str
    effect: str
    reason: str


@dataclass(frozen=True)
class Recommendation:
    """The policy's answer for one patient."""

    patient_id: str
    action: str  # "give" | "withhold" | "stop"
    formulation_id: str | None
    dose_mg_m2: float
    dose_mg: float
    interval_days: int
    response: Estimate | None
    toxicity: Estimate | None
    rules: tuple[RuleApplied, ...]
    policy_version: int | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DosingPolicy:
    """A dosing policy: outcome models, the formulations it knows, action space, safety rules, objective.

    Parameters
    ----------
    encoder : FeatureEncoder
        The federated feature encoder the outcome models were trained with.
    members : dict of name → predictor
        The outcome models (ensemble members); their spread is the policy's uncertainty.
    formulations : dict of id → {feature: value}
        Properties of every formulation the policy may choose (``FORMULATION_FEATURES``).
    adjuster : optional
        A fitted-Q dose adjuster (``q_values(frame, doses) -> (n, k)``) used from cycle 2 on.
    """

    encoder: FeatureEncoder
    members: dict[str, Predictor]
    formulations: dict[str, dict[str, float]]
    action_space: ActionSpace = field(default_factory=ActionSpace)
    safety: SafetyRules = field(default_factory=SafetyRules)
    objective: Objective = field(default_factory=Objective)
    adjuster: Any = None
    manifest: Manifest | None = None

    @property
    def version(self) -> int | None:
        return self.manifest.version if self.manifest is not None else None

    # ---- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, bundle_dir: Path, trust_key: Path) -> DosingPolicy:
        """Verify the signed bundle against the coordinator key, then load its policy and models.

        Raises ``shared.policy_bundle.BundleRejected`` if the bundle does not verify."""
        manifest = verify_bundle(Path(bundle_dir), Path(trust_key))
        return cls.from_folder(Path(bundle_dir), manifest)

    @classmethod
    def from_folder(cls, folder: Path, manifest: Manifest | None = None) -> DosingPolicy:
        """Load ``policy.json`` and the model files it names from ``folder`` (no verification: use
        :meth:`from_bundle` for anything received)."""
        document = json.loads((folder / POLICY_FILE).read_text())
        if document.get("kind") != KIND:
            raise ValueError(f"{folder / POLICY_FILE}: kind {document.get('kind')!r}, expected {KIND!r}")
        encoder = FeatureEncoder.from_dict(json.loads((folder / document["encoder"]).read_text()))
        members = {name: _load_member(folder, encoder, spec) for name, spec in document["models"].items()}
        adjuster = None
        if document.get("adjustment"):
            from shared.dose_adjustment import DoseAdjuster

            adjuster = DoseAdjuster.from_dict(document["adjustment"])
        return cls(encoder=encoder, members=members, formulations=document["formulations"],
                   action_space=_dataclass_from(ActionSpace, document["action_space"]),
                   safety=_dataclass_from(SafetyRules, document["safety"]),
                   objective=_dataclass_from(Objective, document["objective"]), adjuster=adjuster,
                   manifest=manifest)

    def document(self, model_files: dict[str, dict], encoder_file: str) -> dict:
        """The ``policy.json`` of this policy, given how its models are stored (see ``server.policy_builder``)."""
        return {"kind": KIND, "encoder": encoder_file, "models": model_files,
                "formulations": self.formulations, "action_space": asdict(self.action_space),
                "safety": asdict(self.safety), "objective": asdict(self.objective),
                "adjustment": self.adjuster.to_dict() if self.adjuster is not None else None}

    # ---- recommending --------------------------------------------------------------------------------------
    def recommend(self, records: Sequence[PatientRecord], adjust: bool = True) -> list[Recommendation]:
        """One recommendation per record (vectorised over the batch)."""
        if not records:
            return []
        table = self.recommend_frame(records_frame(list(records)), adjust=adjust)
        return [_recommendation(row, self.version) for row in table.itertuples(index=False)]

    def recommend_frame(self, frame: pd.DataFrame, adjust: bool = True) -> pd.DataFrame:
        """Recommendations for the flat records of :func:`shared.patient_record.records_frame`: one row per
        patient with action, formulation_id, dose_mg_m2, dose_mg, interval_days, response/toxicity
        mean/low/high and ``rules`` (a list of :class:`RuleApplied`)."""
        frame = frame.reset_index(drop=True)
        rules: list[list[RuleApplied]] = [[] for _ in range(len(frame))]
        cap, verdict = self.safety_limits(frame, rules)
        candidates = self._candidates(frame, cap, rules)
        chosen = self._choose(frame, candidates, adjust, rules)
        return self._assemble(frame, verdict, chosen, rules)

    def safety_limits(self, frame: pd.DataFrame, rules: list[list[RuleApplied]] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Per patient: the highest dose the hard rules allow, and "give"/"withhold"/"stop"; the rules that
        applied are appended to ``rules`` (one list per row) if given."""
        if rules is None:
            rules = [[] for _ in range(len(frame))]
        s, space = self.safety, self.action_space
        cap = np.full(len(frame), space.dose_max_mg_m2)
        verdict = np.full(len(frame), "give", dtype=object)
        bilirubin = frame["bilirubin_umol_l"].to_numpy(dtype=float)
        anc = frame["anc_baseline_e9_l"].to_numpy(dtype=float)
        fever = _column(frame, "wearable_fever_days")
        cumulative = frame["cumulative_dose_mg_m2"].to_numpy(dtype=float)
        previous_dose = _column(frame, "previous_dose_mg_m2")
        previous_toxicity = _column(frame, "previous_toxicity_grade3")
        for i in range(len(frame)):
            b = bilirubin[i]
            if np.isnan(b) or b > s.hepatic_bands_umol_l[0]:
                factor = s.hepatic_factors[1] if b > s.hepatic_bands_umol_l[1] else s.hepatic_factors[0]
                cap[i] = space.dose_max_mg_m2 * factor
                why = ("bilirubin not measured: treated as raised until measured" if np.isnan(b) else
                       f"bilirubin {b:g} µmol/L above {s.hepatic_bands_umol_l[0]:g} (label hepatic reduction)")
                rules[i].append(RuleApplied("hepatic-reduction", f"dose capped at {cap[i]:g} mg/m² "
                                            f"({factor:.0%} of {space.dose_max_mg_m2:g})", why))
            remaining = s.cumulative_limit_mg_m2 - cumulative[i]
            if remaining < space.dose_min_mg_m2:
                verdict[i] = "stop"
                rules[i].append(RuleApplied("cumulative-limit", "no further anthracycline",
                                            f"cumulative {cumulative[i]:g} of {s.cumulative_limit_mg_m2:g} mg/m²"
                                            f" leaves less than the smallest dose ({space.dose_min_mg_m2:g})"))
            elif remaining < cap[i]:
                cap[i] = remaining
                rules[i].append(RuleApplied("cumulative-limit", f"dose capped at {remaining:g} mg/m²",
                                            f"cumulative {cumulative[i]:g} of {s.cumulative_limit_mg_m2:g} mg/m²"))
            febrile = fever[i] >= 1 and (np.isnan(anc[i]) or anc[i] < s.anc_febrile_e9_l)
            if verdict[i] == "give" and (anc[i] < s.anc_withhold_e9_l or febrile):
                verdict[i] = "withhold"
                why = (f"fever on {fever[i]:g} day(s) of the last cycle and ANC "
                       f"{'not measured' if np.isnan(anc[i]) else f'{anc[i]:g} × 10⁹/L'}" if febrile else
                       f"ANC {anc[i]:g} × 10⁹/L below {s.anc_withhold_e9_l:g} (grade ≥ 3 neutropenia)")
                rules[i].append(RuleApplied("neutropenia-hold", f"no dose now; re-assess in {s.withhold_days} days",
                                            why))
            if verdict[i] == "give" and not np.isnan(previous_dose[i]):
                toxic = previous_toxicity[i] == 1
                limit = max(previous_dose[i] * (s.after_toxicity_factor if toxic else 1 + s.max_escalation),
                            space.dose_min_mg_m2)
                if limit < cap[i]:
                    cap[i] = limit
                    why = (f"grade ≥ 3 toxicity in the previous cycle at {previous_dose[i]:g} mg/m² (label: "
                           f"resume {1 - s.after_toxicity_factor:.0%} lower)" if toxic else
                           f"previous dose {previous_dose[i]:g} mg/m²: at most +{s.max_escalation:.0%} a cycle")
                    rules[i].append(RuleApplied("dose-change-limit", f"dose capped at {limit:g} mg/m²", why))
        return cap, verdict

    def _candidates(self, frame: pd.DataFrame, cap: np.ndarray, rules: list[list[RuleApplied]]) -> pd.DataFrame:
        """Every allowed (patient, formulation, dose, interval) with its predicted outcomes."""
        pairs = []
        for i, catalogue in enumerate(frame["catalogue"]):
            known = [f for f in catalogue if f in self.formulations]
            unknown = sorted(set(catalogue) - set(known))
            if unknown:
                rules[i].append(RuleApplied("unknown-formulation", f"not considered: {', '.join(unknown)}",
                                            "the policy has no data on these formulations"))
            pairs += [(i, f) for f in known]
        if not pairs:
            raise ValueError("no formulation of the catalogue is known to the policy: "
                             f"it knows {', '.join(sorted(self.formulations))}")
        rows, ids = zip(*pairs, strict=True)
        doses, delays = self.action_space.doses(), np.arange(len(self.action_space.delays_days))
        grid = pd.DataFrame({"dose_mg_m2": np.repeat(doses, len(delays)), "delay": np.tile(delays, len(doses))})
        base = pd.DataFrame({"row": rows, "formulation_id": ids})
        cand = base.merge(grid, how="cross")
        intervals = self.action_space.intervals(frame["tumour_type"])
        cand["interval_days"] = intervals[cand["row"].to_numpy(), cand.pop("delay").to_numpy()]
        cand = cand[cand["dose_mg_m2"].to_numpy() <= cap[cand["row"].to_numpy()] + 1e-9].reset_index(drop=True)
        x = self._encode(frame, cand)
        predictions = [member(x) for member in self.members.values()]
        z = self.objective.z
        for outcome in (RESPONSE, TOXICITY):
            p = np.stack([np.asarray(pred[outcome], dtype=float) for pred in predictions])
            mean, sd = p.mean(axis=0), p.std(axis=0)
            cand[f"{outcome}_mean"] = mean
            cand[f"{outcome}_low"] = np.clip(mean - z * sd, 0.0, 1.0)
            cand[f"{outcome}_high"] = np.clip(mean + z * sd, 0.0, 1.0)
        cand["score"] = cand[f"{RESPONSE}_low"] - self.objective.toxicity_weight * cand[f"{TOXICITY}_high"]
        cand["safe"] = cand[f"{TOXICITY}_high"] <= self.objective.toxicity_ceiling
        return cand

    def _encode(self, frame: pd.DataFrame, cand: pd.DataFrame) -> np.ndarray:
        """Encoded candidate rows. Each patient is encoded once; the action's columns (formulation
        properties, dose, interval: never missing) are then standardised into that patient's copies — the
        same numbers :meth:`FeatureEncoder.transform` gives for the full rows, many times faster."""
        enc = self.encoder
        patients = frame.copy()
        props = pd.DataFrame.from_dict(self.formulations, orient="index")
        action = {name: props.loc[cand["formulation_id"], name].to_numpy(dtype=float) for name in FORMULATION_FEATURES}
        action |= {"dose_mg_m2": cand["dose_mg_m2"].to_numpy(dtype=float),
                   "interval_days": cand["interval_days"].to_numpy(dtype=float)}
        for name in action:
            patients[name] = 0.0  # placeholders, overwritten below
        x = enc.transform(patients)[cand["row"].to_numpy()]
        names = enc.feature_names_out_
        for name, values in action.items():
            x[:, names.index(name)] = (values - enc.means_[name]) / enc.scales_[name]
            if name in enc.missing_indicator_:
                x[:, names.index(name + MISSING_SUFFIX)] = 0.0
        return x

    def _choose(self, frame: pd.DataFrame, cand: pd.DataFrame, adjust: bool,
                rules: list[list[RuleApplied]]) -> pd.DataFrame:
        """The chosen candidate per patient row (index = row)."""
        cand = cand.copy()
        # Below the ceiling, highest score; if nothing is below it, the lowest pessimistic toxicity risk.
        cand["rank"] = np.where(cand["safe"], cand["score"], -10.0 - cand[f"{TOXICITY}_high"])
        if adjust and self.adjuster is not None:
            cand = self._adjusted(frame, cand, rules)
        best = cand.loc[cand.groupby("row")["rank"].idxmax()].set_index("row")
        for i, risk in best.loc[~best["safe"], f"{TOXICITY}_high"].items():
            rules[i].append(RuleApplied(
                "toxicity-ceiling", "lowest-risk action chosen", f"no allowed action keeps the pessimistic "
                f"toxicity risk below {self.objective.toxicity_ceiling:.0%} (lowest {risk:.0%})"))
        return best

    def _adjusted(self, frame: pd.DataFrame, cand: pd.DataFrame, rules: list[list[RuleApplied]]) -> pd.DataFrame:
        """From cycle 2: keep the previous formulation, let the fitted-Q adjuster rank the doses."""
        previous = frame.get("previous_formulation_id")
        if previous is None:
            return cand
        doses = self.action_space.doses()
        has_history = frame["previous_dose_mg_m2"].notna().to_numpy()
        if not has_history.any():
            return cand
        history = frame.loc[has_history]
        # Q only within the band of doses the logs cover around the previous dose (the adjuster's own limit;
        # a linear Q-function extrapolates badly beyond it): other doses are not ranked by Q.
        q = np.where(self.adjuster.allowed(history, doses, np.inf), self.adjuster.q_values(history, doses), np.nan)
        q_table = np.full((len(frame), len(doses)), np.nan)
        q_table[has_history] = q
        rows = cand["row"].to_numpy()
        same = (cand["formulation_id"].to_numpy() == previous.to_numpy()[rows]) & has_history[rows]
        adjusted_rows = set(rows[same])
        dose_index = np.searchsorted(doses, cand["dose_mg_m2"].to_numpy())
        q_cand = q_table[rows, dose_index]
        # Adjusted patients: only the previous formulation; safe doses ranked by Q, then by score for the
        # interval (Q does not depend on it).
        keep = ~np.isin(rows, list(adjusted_rows)) | same
        cand = cand[keep].copy()
        q_keep, rows_keep = q_cand[keep], rows[keep]
        adjusted = np.isin(rows_keep, list(adjusted_rows))
        ranked_by_q = adjusted & cand["safe"].to_numpy() & ~np.isnan(q_keep)
        cand["rank"] = np.where(ranked_by_q, 100.0 + np.nan_to_num(q_keep) + 1e-6 * cand["score"], cand["rank"])
        for i in adjusted_rows:
            rules[i].append(RuleApplied(
                "fitted-q-adjustment", f"dose chosen by the fitted-Q adjuster; formulation "
                f"{previous.iloc[i]} kept", f"previous dose {frame['previous_dose_mg_m2'].iloc[i]:g} mg/m², "
                f"grade ≥ 3 toxicity {int(frame['previous_toxicity_grade3'].iloc[i])}, fever days "
                f"{_fmt(frame.get('wearable_fever_days'), i)}, activity change "
                f"{_fmt(frame.get('wearable_steps_change_pct'), i)} %"))
        return cand

    def _assemble(self, frame: pd.DataFrame, verdict: np.ndarray, best: pd.DataFrame,
                  rules: list[list[RuleApplied]]) -> pd.DataFrame:
        out = pd.DataFrame({"patient_id": frame["patient_id"].to_numpy(), "action": verdict})
        for column in ("formulation_id", "dose_mg_m2", "interval_days", *(
                f"{o}_{b}" for o in (RESPONSE, TOXICITY) for b in ("mean", "low", "high"))):
            out[column] = best[column].reindex(range(len(frame))).to_numpy()
        giving = out["action"].to_numpy() == "give"
        out.loc[~giving, "dose_mg_m2"] = 0.0
        out.loc[out["action"] == "withhold", "interval_days"] = self.safety.withhold_days
        out.loc[out["action"] == "stop", ["formulation_id", "interval_days"]] = [None, 0]
        out["dose_mg"] = np.round(out["dose_mg_m2"].to_numpy(dtype=float) * frame["bsa_m2"].to_numpy(dtype=float), 1)
        out["rules"] = rules
        return out


def _recommendation(row, version: int | None) -> Recommendation:
    give = row.action == "give"

    def estimate(outcome: str) -> Estimate | None:
        if not give:
            return None
        return Estimate(*(round(float(getattr(row, f"{outcome}_{b}")), 4) for b in ("mean", "low", "high")))

    return Recommendation(
        patient_id=str(row.patient_id), action=str(row.action),
        formulation_id=None if row.action == "stop" else str(row.formulation_id),
        dose_mg_m2=float(row.dose_mg_m2), dose_mg=float(row.dose_mg), interval_days=int(row.interval_days),
        response=estimate(RESPONSE), toxicity=estimate(TOXICITY), rules=tuple(row.rules), policy_version=version)


def _column(frame: pd.DataFrame, name: str) -> np.ndarray:
    return frame[name].to_numpy(dtype=float) if name in frame else np.full(len(frame), np.nan)


def _fmt(series: pd.Series | None, i: int) -> str:
    if series is None or pd.isna(series.iloc[i]):
        return "not recorded"
    return f"{float(series.iloc[i]):g}"


def _dataclass_from(cls, values: dict):
    """A settings dataclass from its JSON form (lists back to tuples)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _load_member(folder: Path, encoder: FeatureEncoder, spec: dict) -> Predictor:
    """An outcome model from the bundle: ``{"kind": "ann", "weights": FILE, "hidden": [...]}`` or
    ``{"kind": "xgboost", "heads": {head key: FILE}}`` (read by ``shared.artifacts``)."""
    from shared.artifacts import load_ann, load_booster

    if spec["kind"] == "ann":
        from shared.ann import predict

        model = load_ann(folder / spec["weights"], encoder, tuple(spec["hidden"]))
        return lambda x: predict(model, x)
    if spec["kind"] == "xgboost":
        # One thread: a recommendation scores ~100 rows per patient, where OpenMP start-up costs more than it
        # saves (and a busy host makes waiting threads spin).
        boosters = {key: load_booster(folder / spec["heads"][key], threads=1) for key in (RESPONSE, TOXICITY)}
        return lambda x: {key: booster.inplace_predict(x) for key, booster in boosters.items()}
    raise ValueError(f"{folder / POLICY_FILE}: unknown model kind {spec['kind']!r} (expected ann or xgboost)")
