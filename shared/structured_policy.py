"""A dosing policy on structured dose–response models, restricted to what the federation's logs support.

For each patient the policy considers the actions the hard safety rules allow (:class:`SafetyRules` and
:class:`ActionSpace` of :mod:`shared.dosing_policy`, through its own ``safety_limits``: caps, holds, stops)
and keeps those the federation has data on (:class:`Support`):

- formulations of the patient's catalogue with at least ``min_episodes`` logged first cycles, summed over the
  sites;
- doses up to ``dose_factor`` × the largest dose logged for that formulation *and* tumour type (offline
  decisions are trusted on the data's support only: Fujimoto, Meger & Precup, ICML 2019; Laroche, Trichelair &
  Tachet des Combes, "Safe policy improvement with baseline bootstrapping", ICML 2019).

Each candidate is scored with the simulator's own utility, made pessimistic by confidence bounds
(pessimism in offline decision making: Jin, Yang & Wang, ICML 2021):

    score = low(P(response)) − W_TOXICITY · high(P(grade ≥ 3 toxicity)) − W_CHF · P(CHF this cycle)

``low``/``high`` are the models' Wald bounds ``expit(logit ∓ z·se)`` (:mod:`shared.tumour_response`,
:mod:`shared.toxicity_model`; the any-toxicity risk combines the neutropenia and other-toxicity bounds); the
heart-failure risk is the public cumulative-dose curve (:mod:`shared.cardiotoxicity`, Swain 2003) with the
whole dose counted as cardiac dose (an upper bound: a carrier releases at most all its drug; measured on the
default world it costs 0.001 of value / oracle against the true cardiac dose).

With ``reference = "standard_of_care"`` the score is instead a lower bound on the improvement over standard
of care for the same patient, ``ΔU − z · se(ΔU)`` (delta method over the three models' covariances), and the
policy leaves standard of care only where that bound is positive (the baseline-bootstrapping idea above).

**Standard of care** — a formulation at the label dose of the tumour type with the label's hepatic reduction,
within the safety caps — is what the policy recommends when no candidate qualifies (no formulation of the
catalogue in the support, or, relative to standard of care, no positive bound), and says so. The formulation:
relative to standard of care, the site's usual one (the record frame's ``usual_formulation_id``, which a site
gives every record: ``client.site_gate``), the one the improvement is measured against; otherwise, and where
a record carries none, the catalogue's formulation the federation logged most — measured better for the
absolute policy in the closed loop (world seed 1, version 1: 0.688 of oracle against 0.640 with the site's own;
BENCHMARKS.md, attempt 5).

``policy.json`` (:meth:`StructuredDosingPolicy.document`, kind :data:`KIND`) holds every number: the three
fitted models with their covariances, the support counts, the formulations, action space, safety rules and
objective; :func:`shared.policy_loader.policy_from_bundle` loads either kind (verified), so the recommender
serves either.

Example
-------
>>> policy = fit_structured_policy([site_a.episodes, site_b.episodes], catalogue)     # doctest: +SKIP
>>> policy.recommend_frame(records_frame(records))                                  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from shared.cardiotoxicity import chf_cycle_probability
from shared.dose_adjustment import W_CHF, W_TOXICITY
from shared.dose_response import first_cycles, fit_by_sums
from shared.dosing_policy import (
    FORMULATION_FEATURES,
    RESPONSE,
    TOXICITY,
    ActionSpace,
    DosingPolicy,
    Recommendation,
    RuleApplied,
    SafetyRules,
    ToleranceGrades,
    better_versions,
    graded_frame,
    guard_rule,
    known_actions,
    label_actions,
    recommendation_of,
)
from shared.patient_record import PatientRecord, records_frame
from shared.policy_bundle import Manifest
from shared.schema import TUMOUR_TYPES
from shared.toxicity_model import NeutropeniaModel, OtherToxicityModel, ToxicityModel, any_toxicity
from shared.tumour_response import TumourResponseModel

KIND = "fednano-structured-dosing-policy/1"
DOSE_BIN_CENTRES_MG_M2 = np.arange(0.0, 150.0 + 1e-9, 5.0)
"""Support histograms count first-cycle doses in 5 mg/m² bins centred on these doses (the schema's 0–150)."""
USUAL_FORMULATION = "usual_formulation_id"
"""Optional record-frame column: the site's usual formulation, the one its standard of care uses."""
REFERENCES = ("absolute", "standard_of_care")
GRADED_INPUTS = ("bilirubin_umol_l", "anc_baseline_e9_l", "age_years", "ecog")
"""The tolerance inputs (:data:`shared.dosing_policy.TOLERANCE_GRADES`) this policy reads, in its models' terms
(:data:`shared.dose_response.PATIENT_TERMS`) or its hard rules: the monotone guard grades these. Creatinine
clearance is read by neither; the previous cycle's toxicity and nadir only by the hard rules, which are
monotone in them already (tests/test_structured_policy_monotone.py checks both)."""
GUARD_CHUNK_VERSIONS = 5_000
"""Better-graded versions decided at once by the guard (a catalogue of 3 × 11 doses: ~165,000 candidates)."""


# ---------------------------------------------------------------------------------------------------------
# Support: what the federation's logs cover


def site_support_counts(frame: pd.DataFrame, formulations: Sequence[str]) -> np.ndarray:
    """One site's first-cycle episodes counted by formulation (in the order of ``formulations``; others are not
    counted), tumour type and dose bin: an array (formulations, tumour types, dose bins). Counts add up across
    sites; one episode adds 1 to one cell (for DP: ``client.dp.Block(counts, 1.0, 1)``)."""
    rows = first_cycles(frame)
    counts = np.zeros((len(formulations), len(TUMOUR_TYPES), len(DOSE_BIN_CENTRES_MG_M2)))
    f = pd.Series(rows["formulation_id"].astype(str).to_numpy()).map({k: i for i, k in enumerate(formulations)})
    t = pd.Series(rows["tumour_type"].astype(str).to_numpy()).map({k: i for i, k in enumerate(TUMOUR_TYPES)})
    dose = pd.to_numeric(rows["dose_mg_m2"], errors="coerce").to_numpy(dtype=float)
    width = DOSE_BIN_CENTRES_MG_M2[1] - DOSE_BIN_CENTRES_MG_M2[0]
    d = np.clip(np.rint(dose / width), 0, len(DOSE_BIN_CENTRES_MG_M2) - 1)
    ok = f.notna().to_numpy() & t.notna().to_numpy() & ~np.isnan(dose)
    np.add.at(counts, (f.to_numpy()[ok].astype(int), t.to_numpy()[ok].astype(int), d[ok].astype(int)), 1.0)
    return counts


@dataclass(frozen=True)
class Support:
    """The federation's logged first cycles by formulation × tumour type × dose bin (sites' counts, summed).

    Parameters
    ----------
    formulations : tuple of str
        The formulations counted, in the order of the first axis of ``counts``.
    counts : ndarray (formulations, tumour types, dose bins)
        Summed :func:`site_support_counts` (DP-noised counts are read with ``min_count``).
    """

    formulations: tuple[str, ...]
    counts: np.ndarray

    @classmethod
    def from_sites(cls, frames: Sequence[pd.DataFrame], formulations: Sequence[str]) -> Support:
        ids = tuple(sorted(str(f) for f in formulations))
        return cls(ids, sum(site_support_counts(frame, ids) for frame in frames))

    def episodes(self, formulation: str) -> float:
        """First cycles logged with ``formulation`` (0 if not counted)."""
        if formulation not in self.formulations:
            return 0.0
        return float(self.counts[self.formulations.index(formulation)].sum())

    def largest_logged_dose(self, formulation: str, tumour_type: str, min_count: float = 1.0) -> float:
        """The largest dose bin with at least ``min_count`` first cycles of ``formulation`` in ``tumour_type``;
        NaN if none."""
        if formulation not in self.formulations or tumour_type not in TUMOUR_TYPES:
            return float("nan")
        row = self.counts[self.formulations.index(formulation), TUMOUR_TYPES.index(tumour_type)]
        logged = np.flatnonzero(row >= min_count)
        return float(DOSE_BIN_CENTRES_MG_M2[logged[-1]]) if logged.size else float("nan")

    def to_dict(self) -> dict:
        return {"formulations": list(self.formulations), "tumour_types": list(TUMOUR_TYPES),
                "dose_bin_centres_mg_m2": DOSE_BIN_CENTRES_MG_M2.tolist(), "counts": self.counts.tolist()}

    @classmethod
    def from_dict(cls, values: Mapping) -> Support:
        if list(values["tumour_types"]) != list(TUMOUR_TYPES) or not np.allclose(
                values["dose_bin_centres_mg_m2"], DOSE_BIN_CENTRES_MG_M2):
            raise ValueError("support counts on other tumour types or dose bins than this version's")
        return cls(tuple(values["formulations"]), np.asarray(values["counts"], dtype=float))


# ---------------------------------------------------------------------------------------------------------
# The policy


@dataclass(frozen=True)
class StructuredObjective:
    """What the structured policy maximises and where it may act.

    ``z``: confidence multiplier of the bounds (measured best at 1 for ``absolute`` and 0.5 relative to
    standard of care in the prototype experiments); ``min_episodes``: first cycles a formulation needs in the
    federation's logs; ``dose_factor``: how far above the largest logged dose (per formulation and tumour type)
    the policy may go; ``dose_min_count``: episodes a dose bin needs to count as logged (1 without DP)."""

    toxicity_weight: float = W_TOXICITY
    heart_failure_weight: float = W_CHF
    z: float = 1.0
    reference: str = "absolute"
    min_episodes: float = 30.0
    dose_factor: float = 1.25
    dose_min_count: float = 1.0

    def __post_init__(self):
        if self.reference not in REFERENCES:
            raise ValueError(f"reference {self.reference!r}: expected one of {', '.join(REFERENCES)}")

    @classmethod
    def for_reference(cls, reference: str) -> StructuredObjective:
        """The objective for ``reference`` with its measured ``z`` (1 absolute, 0.5 relative to standard of
        care: BENCHMARKS.md, "Structured dose–response policy")."""
        return cls(reference=reference, z=0.5 if reference == "standard_of_care" else 1.0)


@dataclass
class StructuredDosingPolicy:
    """A dosing policy on :class:`TumourResponseModel`, :class:`NeutropeniaModel` and
    :class:`OtherToxicityModel` (fitted), restricted to ``support`` (module docstring).

    Offers what :class:`shared.dosing_policy.DosingPolicy` offers the recommender: ``recommend``,
    ``recommend_frame`` (same columns), ``safety_limits``, ``formulations``, ``manifest``, ``version``."""

    response: TumourResponseModel
    neutropenia: NeutropeniaModel
    other_toxicity: OtherToxicityModel
    support: Support
    formulations: dict[str, dict[str, float]]
    action_space: ActionSpace = field(default_factory=ActionSpace)
    safety: SafetyRules = field(default_factory=SafetyRules)
    objective: StructuredObjective = field(default_factory=StructuredObjective)
    manifest: Manifest | None = None

    @property
    def version(self) -> int | None:
        return self.manifest.version if self.manifest is not None else None

    # ---- storing -------------------------------------------------------------------------------------------
    def document(self) -> dict:
        """The ``policy.json`` of this policy (everything in one file)."""
        return {"kind": KIND, "formulations": self.formulations,
                "models": {"response": self.response.to_dict(), "neutropenia": self.neutropenia.to_dict(),
                           "other_toxicity": self.other_toxicity.to_dict()},
                "support": self.support.to_dict(), "action_space": asdict(self.action_space),
                "safety": asdict(self.safety), "objective": asdict(self.objective)}

    @classmethod
    def from_document(cls, document: Mapping, manifest: Manifest | None = None) -> StructuredDosingPolicy:
        if document.get("kind") != KIND:
            raise ValueError(f"policy kind {document.get('kind')!r}, expected {KIND!r}")
        models = document["models"]
        return cls(response=TumourResponseModel.from_dict(models["response"]),
                   neutropenia=ToxicityModel.from_dict(models["neutropenia"]),
                   other_toxicity=ToxicityModel.from_dict(models["other_toxicity"]),
                   support=Support.from_dict(document["support"]),
                   formulations={k: dict(v) for k, v in document["formulations"].items()},
                   action_space=_settings(ActionSpace, document["action_space"]),
                   safety=_settings(SafetyRules, document["safety"]),
                   objective=_settings(StructuredObjective, document["objective"]), manifest=manifest)

    @classmethod
    def from_folder(cls, folder: Path, manifest: Manifest | None = None) -> StructuredDosingPolicy:
        import json

        from shared.dosing_policy import POLICY_FILE

        return cls.from_document(json.loads((Path(folder) / POLICY_FILE).read_text()), manifest)

    # ---- recommending --------------------------------------------------------------------------------------
    def recommend(self, records: Sequence[PatientRecord], adjust: bool = False) -> list[Recommendation]:
        """One recommendation per record (``adjust`` is accepted for the recommender's sake; this policy has
        no cycle-to-cycle adjuster: the safety rules' dose-change limits apply)."""
        if not records:
            return []
        table = self.recommend_frame(records_frame(list(records)))
        return [recommendation_of(row, self.version) for row in table.itertuples(index=False)]

    def _rules(self) -> DosingPolicy:
        """A model-free :class:`DosingPolicy` carrying this policy's action space and safety rules, so both
        policies apply the same hard rules by the same code."""
        return DosingPolicy(encoder=None, members={}, formulations=self.formulations,  # type: ignore[arg-type]
                            action_space=self.action_space, safety=self.safety)

    def safety_limits(self, frame: pd.DataFrame, rules: list[list[RuleApplied]] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """The hard rules, exactly as :meth:`shared.dosing_policy.DosingPolicy.safety_limits` applies them."""
        return self._rules().safety_limits(frame, rules)

    def recommend_frame(self, frame: pd.DataFrame, adjust: bool = False) -> pd.DataFrame:
        """Recommendations for the flat records of :func:`shared.patient_record.records_frame` (one row per
        patient, the columns of ``DosingPolicy.recommend_frame``).

        1. the hard rules give each patient a verdict and a dose cap (:meth:`safety_limits`);
        2. the best supported action is chosen for the patient with its tolerance inputs graded
           (:func:`shared.dosing_policy.graded_frame`: what the models see of them), else standard of care;
        3. the monotone guard caps the dose at the lowest dose any better-graded version of the patient would
           get (:meth:`_monotone_guard`, the ensemble policy's guard: no input that means the patient tolerates
           the drug worse raises the dose, whatever the fitted models learned from confounded logs).
        """
        return self._recommend(frame)[0]

    def recommend_with_alternatives(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        """:meth:`recommend_frame`'s table, and per patient given a dose the action **in equipoise** with the
        recommended one (:meth:`equipoise_with` the table itself)."""
        table, graded, candidates = self._recommend(frame)
        return table, self._equipoise(graded, table, candidates, self._guarded_limit(table))

    def equipoise_with(self, frame: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
        """Per patient whom ``reference`` (aligned with ``frame``: action, formulation_id, dose_mg_m2,
        interval_days; e.g. standard of care) gives a dose, the action of another formulation that this policy's
        models **cannot rank below it**: of each other formulation its best-scoring supported action within the
        hard caps, kept if its *optimistic* utility (``high(P(response)) − W_TOXICITY · low(P(toxicity)) −
        W_CHF · P(CHF)``) reaches the reference action's *pessimistic* score (the confidence bounds overlap, or
        it is better: the data do not show it worse), and of those the best-scoring one — one alternative per
        patient, so that a share of the decision split between two actions keeps each above the off-policy
        estimate's support threshold (``shared.off_policy.MIN_SUPPORT``). Its dose is never above the dose
        this policy's monotone guard would give the patient. This is the condition under which a site may
        randomise between them (``shared.exploration``). Returns columns row, formulation_id, dose_mg_m2,
        interval_days, and ``ceiling``: that guard's dose for the patient (infinite where it did not act), which
        a dose spread around the alternative must not exceed either."""
        table, graded, candidates = self._recommend(frame)
        return self._equipoise(graded, reference.reset_index(drop=True), candidates, self._guarded_limit(table))

    def _recommend(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """The recommendation table (:meth:`recommend_frame`), the graded records and the scored candidates."""
        frame = frame.reset_index(drop=True)
        rules: list[list[RuleApplied]] = [[] for _ in range(len(frame))]
        cap, verdict = self.safety_limits(frame, rules)
        grades = self.tolerance_grades()
        graded = graded_frame(frame, grades)
        candidates, chosen = self._decide(graded, cap, rules)
        chosen = self._monotone_guard(graded, grades, verdict, candidates, chosen, rules)
        return self._assemble(frame, verdict, chosen, rules), graded, candidates

    @staticmethod
    def _guarded_limit(table: pd.DataFrame) -> np.ndarray:
        """Per row: the recommended dose where the monotone guard capped it, else infinity."""
        guarded = np.array([any(rule.rule == "monotone-guard" for rule in rules) for rules in table["rules"]],
                           dtype=bool)
        return np.where(guarded, table["dose_mg_m2"].to_numpy(dtype=float), np.inf)

    def _equipoise(self, graded: pd.DataFrame, reference: pd.DataFrame, candidates: pd.DataFrame,
                   limit: np.ndarray) -> pd.DataFrame:
        """The alternative of :meth:`equipoise_with` to each giving row of ``reference``, from the scored
        candidates, no dose above ``limit`` (per row)."""
        columns = ["row", "formulation_id", "dose_mg_m2", "interval_days", "ceiling"]
        giving = np.flatnonzero(reference["action"].astype(str).to_numpy() == "give")
        if candidates.empty or not giving.size:
            return pd.DataFrame({c: pd.Series(dtype=object if c == "formulation_id" else float) for c in columns})
        o = self.objective
        picked = reference.iloc[giving][["formulation_id", "dose_mg_m2", "interval_days"]].assign(row=giving)
        scored = self._predict(graded, picked[columns[:4]].reset_index(drop=True)).set_index("row")
        cand = candidates[candidates["row"].isin(giving)]
        cand = cand[cand["formulation_id"].to_numpy() != picked.set_index("row")["formulation_id"].reindex(
            cand["row"]).to_numpy()]
        cand = cand[cand["dose_mg_m2"].to_numpy() <= limit[cand["row"].to_numpy()] + 1e-9]
        if cand.empty:
            return cand.assign(ceiling=np.inf)[columns].reset_index(drop=True)
        best = cand.loc[cand.groupby(["row", "formulation_id"])["score"].idxmax()]
        optimistic = (best[f"{RESPONSE}_high"] - o.toxicity_weight * best[f"{TOXICITY}_low"]
                      - o.heart_failure_weight * best["chf"]).to_numpy()
        reference_score = scored["score"].reindex(best["row"]).to_numpy()
        kept = best[optimistic >= reference_score]  # NaN (a formulation the models do not know) is never kept
        kept = kept.loc[kept.groupby("row")["score"].idxmax()] if len(kept) else kept
        kept = kept.assign(ceiling=limit[kept["row"].to_numpy()])
        return kept[columns].sort_values(columns[:2]).reset_index(drop=True)

    def tolerance_grades(self) -> tuple[ToleranceGrades, ...]:
        """The ensemble's tolerance grades (the hard rules' thresholds added) of the inputs this policy reads
        (:data:`GRADED_INPUTS`)."""
        return tuple(g for g in self._rules().tolerance_grades() if g.column in GRADED_INPUTS)

    def _decide(self, frame: pd.DataFrame, cap: np.ndarray, rules: list[list[RuleApplied]]
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The scored supported candidates and the unguarded choice per row (index = row)."""
        candidates = self.candidates(frame, cap, rules)
        return candidates, self._choose(frame, candidates, self.standard_of_care(frame), rules)

    def _monotone_guard(self, graded: pd.DataFrame, grades: Sequence[ToleranceGrades], verdict: np.ndarray,
                        candidates: pd.DataFrame, chosen: pd.DataFrame, rules: list[list[RuleApplied]]
                        ) -> pd.DataFrame:
        """Cap each dose at the lowest dose any better-graded version of the same patient would get
        (:func:`shared.dosing_policy.better_versions`; the ensemble's ``DosingPolicy._monotone_guard``).

        A capped patient gets the highest supported dose under the cap (its best-scoring formulation there),
        or standard of care's formulation at the cap when no supported action is under it: exactly the cap
        either way, which is what keeps the dose non-increasing in every tolerance input jointly. A patient
        with more than ``MAX_GUARD_CANDIDATES`` actions of better-graded versions to check gets the smallest
        dose."""
        per_version = np.array([len(c) for c in graded["catalogue"]]) * len(self.action_space.doses()) * len(
            self.action_space.delays_days)
        versions = better_versions(graded, np.flatnonzero(verdict == "give"), grades, False, per_version)
        limit, lowest_of = versions.limits(lambda: self._dose_of_each(versions.frame), len(graded),
                                           self.action_space.dose_min_mg_m2)
        dose = chosen["dose_mg_m2"].reindex(range(len(graded))).to_numpy(dtype=float)
        capped = np.flatnonzero(limit < dose - 1e-9)
        if not capped.size:
            return chosen
        chosen = chosen.copy()
        row = candidates["row"].to_numpy()
        options = candidates[np.isin(row, capped) & (candidates["dose_mg_m2"].to_numpy() <= limit[row] + 1e-9)]
        options = options[options["dose_mg_m2"] == options.groupby("row")["dose_mg_m2"].transform("max")]
        picked = options.loc[options.groupby("row")["score"].idxmax()].set_index("row")
        chosen.loc[picked.index, picked.columns] = picked
        bare = np.setdiff1d(capped, picked.index.to_numpy())  # no supported action under the cap
        if bare.size:  # standard of care's formulation at the cap
            at_cap = chosen.loc[bare, ["formulation_id", "interval_days"]].assign(dose_mg_m2=limit[bare])
            predicted = self._predict(graded, at_cap.reset_index(names="row")).set_index("row")
            chosen.loc[bare, predicted.columns] = predicted
        for i in capped:
            rules[i].append(guard_rule(limit[i], lowest_of.get(i)))
        return chosen

    def _dose_of_each(self, versions: pd.DataFrame) -> np.ndarray:
        """The unguarded dose (mg/m²) of each version (rows of a graded frame); +inf where the hard rules give
        none. Decided in chunks of :data:`GUARD_CHUNK_VERSIONS` versions, so memory stays bounded."""
        doses = []
        for start in range(0, len(versions), GUARD_CHUNK_VERSIONS):
            part = versions.iloc[start:start + GUARD_CHUNK_VERSIONS].reset_index(drop=True)
            discarded: list[list[RuleApplied]] = [[] for _ in range(len(part))]
            cap, verdict = self.safety_limits(part)
            _, chosen = self._decide(part, cap, discarded)
            dose = chosen["dose_mg_m2"].reindex(np.arange(len(part))).to_numpy(dtype=float)
            doses.append(np.where(verdict == "give", dose, np.inf))
        return np.concatenate(doses)

    def standard_of_care(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Per patient: the usual formulation (module docstring) at the label dose with the label's hepatic
        reduction (measured bilirubin), rounded to 5 mg/m², within the hard rules' caps, at the label interval
        (:func:`shared.dosing_policy.label_actions`, the same code a site serving standard of care runs)."""
        relative = self.objective.reference == "standard_of_care"
        usual = (frame[USUAL_FORMULATION] if relative and USUAL_FORMULATION in frame
                 else pd.Series([None] * len(frame)))
        most_logged: dict[tuple, str] = {}  # per catalogue: a population has few, and patients many
        formulation = []
        for u, catalogue in zip(usual, frame["catalogue"], strict=True):
            if not (isinstance(u, str) and u in catalogue):
                key = tuple(catalogue)
                if key not in most_logged:
                    most_logged[key] = self._most_logged(catalogue)
                u = most_logged[key]
            formulation.append(u)
        actions = label_actions(self, frame, np.asarray(formulation, dtype=object)).drop(columns="action")
        return actions.assign(row=np.arange(len(frame)))[["row", "formulation_id", "dose_mg_m2", "interval_days"]]

    def _most_logged(self, catalogue: Sequence[str]) -> str:
        return max(catalogue, key=lambda f: (self.support.episodes(f), f in self.formulations))

    def dose_limit(self, formulation: str, tumour_type: str) -> float:
        """The highest dose the support allows for ``formulation`` in ``tumour_type``: ``dose_factor`` × the
        largest logged dose; NaN when the formulation has fewer than ``min_episodes`` first cycles, or none
        logged in that tumour type."""
        o = self.objective
        if formulation not in self.formulations or self.support.episodes(formulation) < o.min_episodes:
            return float("nan")
        return o.dose_factor * self.support.largest_logged_dose(formulation, tumour_type, o.dose_min_count)

    def candidates(self, frame: pd.DataFrame, cap: np.ndarray, rules: list[list[RuleApplied]]) -> pd.DataFrame:
        """Every supported action within the caps, with predicted outcomes and its score."""
        rows, ids, doses, intervals = [], [], [], []
        grid = self.action_space.doses()
        limits = {(f, t): self.dose_limit(f, t) for f in self.formulations for t in TUMOUR_TYPES}
        interval_choices = self.action_space.intervals(frame["tumour_type"])
        for i, (catalogue, tumour) in enumerate(zip(frame["catalogue"], frame["tumour_type"], strict=True)):
            left_out = []
            for f in catalogue:
                limit = min(limits.get((f, str(tumour)), np.nan), cap[i])
                allowed = grid[grid <= limit + 1e-9] if not np.isnan(limit) else grid[:0]
                if allowed.size == 0:
                    left_out.append(f)
                for interval in interval_choices[i]:
                    rows += [i] * allowed.size
                    ids += [f] * allowed.size
                    doses += allowed.tolist()
                    intervals += [interval] * allowed.size
            if left_out:
                rules[i].append(RuleApplied(
                    "outside-support", f"not considered: {', '.join(sorted(left_out))}",
                    f"fewer than {self.objective.min_episodes:g} logged first cycles, none in {tumour}, or no logged "
                    f"dose within the caps"))
        cand = pd.DataFrame({"row": np.asarray(rows, dtype=int), "formulation_id": np.asarray(ids, dtype=object),
                             "dose_mg_m2": np.asarray(doses, dtype=float),
                             "interval_days": np.asarray(intervals, dtype=float)})
        return self._predict(frame, cand)

    def _action_frame(self, frame: pd.DataFrame, actions: pd.DataFrame) -> pd.DataFrame:
        """Patient rows of ``actions['row']`` with the action's formulation properties, dose and interval."""
        rows = frame.iloc[actions["row"].to_numpy()].reset_index(drop=True)
        props = pd.DataFrame.from_dict(self.formulations, orient="index")
        ids = actions["formulation_id"].to_numpy()
        for name in FORMULATION_FEATURES:
            rows[name] = props[name].reindex(ids).to_numpy(dtype=float) if name in props else np.nan
        rows["formulation_id"] = ids
        rows["dose_mg_m2"] = actions["dose_mg_m2"].to_numpy(dtype=float)
        rows["interval_days"] = actions["interval_days"].to_numpy(dtype=float)
        return rows

    def _predict(self, frame: pd.DataFrame, actions: pd.DataFrame) -> pd.DataFrame:
        """``actions`` with response / toxicity mean, low, high, the heart-failure risk and the score."""
        actions = actions.reset_index(drop=True).copy()
        if actions.empty:
            for column in (*(f"{o}_{b}" for o in (RESPONSE, TOXICITY) for b in ("mean", "low", "high")), "chf",
                           "utility", "score"):
                actions[column] = pd.Series(dtype=float)
            return actions
        z = self.objective.z
        rows = self._action_frame(frame, actions)
        response = self.response.predict_proba(rows, z)
        toxicity = any_toxicity(self.neutropenia.predict_proba(rows, z), self.other_toxicity.predict_proba(rows, z))
        for outcome, p in ((RESPONSE, response), (TOXICITY, toxicity)):
            for bound, values in zip(("mean", "low", "high"), p, strict=True):
                actions[f"{outcome}_{bound}"] = values
        cumulative = np.clip(pd.to_numeric(rows["cumulative_dose_mg_m2"], errors="coerce").fillna(0.0), 0, None)
        actions["chf"] = chf_cycle_probability(cumulative.to_numpy(dtype=float), actions["dose_mg_m2"].to_numpy())
        o = self.objective
        actions["utility"] = (response.mean - o.toxicity_weight * toxicity.mean
                              - o.heart_failure_weight * actions["chf"].to_numpy())
        actions["score"] = (response.low - o.toxicity_weight * toxicity.high
                            - o.heart_failure_weight * actions["chf"].to_numpy())
        return actions

    def predicted_outcomes(self, frame: pd.DataFrame, actions: pd.DataFrame) -> pd.DataFrame:
        """The models' mean P(response) and P(grade ≥ 3 toxicity) of one given action per patient row
        (``actions`` aligned with ``frame``: formulation_id, dose_mg_m2, interval_days), for off-policy evaluation
        (``client.ope``), as :meth:`shared.dosing_policy.DosingPolicy.predicted_outcomes`; NaN where the policy
        does not know the formulation."""
        frame = frame.reset_index(drop=True)
        known, cand, out = known_actions(actions, self.formulations)
        if not known.any():
            return out
        rows = self._action_frame(frame, cand)
        out.loc[known, RESPONSE] = self.response.predict_proba(rows).mean
        out.loc[known, TOXICITY] = any_toxicity(self.neutropenia.predict_proba(rows),
                                                self.other_toxicity.predict_proba(rows)).mean
        return out

    def predicted_bounds(self, frame: pd.DataFrame, actions: pd.DataFrame) -> pd.DataFrame:
        """Each action's predicted P(response) and P(grade ≥ 3 toxicity) with the Wald bounds the policy scores
        with, for the patient as the policy sees it when it chooses (tolerance inputs graded), as
        :meth:`shared.dosing_policy.DosingPolicy.predicted_bounds` (same columns; ``actions``: row,
        formulation_id, dose_mg_m2, interval_days). What the clinician's page charts against dose."""
        graded = graded_frame(frame.reset_index(drop=True), self.tolerance_grades())
        predicted = self._predict(graded, actions[["row", "formulation_id", "dose_mg_m2", "interval_days"]])
        return predicted[["row", "formulation_id", "dose_mg_m2", "interval_days",
                          *(f"{o}_{b}" for o in (RESPONSE, TOXICITY) for b in ("mean", "low", "high"))]]

    def improvement_lower_bound(self, frame: pd.DataFrame, actions: pd.DataFrame, reference: pd.DataFrame,
                                z: float) -> np.ndarray:
        """Per row of ``frame``: ``ΔU − z·se(ΔU)`` of ``actions`` over ``reference`` (both aligned with the rows:
        formulation_id, dose_mg_m2, interval_days), the models' lower confidence bound on the improvement
        (:meth:`improvement_bound`); NaN where either action's formulation is unknown to the policy. For the
        release gate's credit off the logs' support (``client.ope``)."""
        frame = frame.reset_index(drop=True)
        out = np.full(len(frame), np.nan)
        columns = ["formulation_id", "dose_mg_m2", "interval_days"]
        mine, theirs = actions.reset_index(drop=True)[columns], reference.reset_index(drop=True)[columns]
        known = (mine["formulation_id"].isin(list(self.formulations))
                 & theirs["formulation_id"].isin(list(self.formulations))).to_numpy()
        if known.any():
            rows = np.flatnonzero(known)
            cand = self._predict(frame, mine.iloc[rows].assign(row=rows))
            soc = theirs.iloc[rows].assign(row=rows)[["row", *columns]]
            out[rows] = self.improvement_bound(frame, cand, soc, z)
        return out

    def improvement_bound(self, frame: pd.DataFrame, cand: pd.DataFrame, soc: pd.DataFrame,
                          z: float | None = None) -> np.ndarray:
        """Per candidate: ``ΔU − z·se(ΔU)``, ΔU the predicted utility of the candidate minus that of standard
        of care for the same patient; se by the delta method over the three models' covariances (independent
        fits); ``z`` defaults to the objective's."""
        reference = soc.set_index("row").loc[cand["row"].to_numpy()].reset_index()
        mine, theirs = self._action_frame(frame, cand), self._action_frame(frame, reference)
        o = self.objective
        variance = np.zeros(len(cand))
        gradients = {}
        for rows_of, key in ((mine, "mine"), (theirs, "theirs")):
            _, g_r = self.response.probability_gradient(rows_of)
            p_n, g_n = self.neutropenia.probability_gradient(rows_of)
            p_o, g_o = self.other_toxicity.probability_gradient(rows_of)
            gradients[key] = (g_r, -o.toxicity_weight * (1 - p_o)[:, None] * g_n,
                              -o.toxicity_weight * (1 - p_n)[:, None] * g_o)
        for model, g_a, g_b in zip((self.response, self.neutropenia, self.other_toxicity), gradients["mine"],
                                   gradients["theirs"], strict=True):
            d = g_a - g_b
            variance += np.einsum("ij,jk,ik->i", d, model.covariance_, d)
        reference_utility = self._predict(frame, reference)["utility"].to_numpy()
        z = o.z if z is None else z
        return cand["utility"].to_numpy() - reference_utility - z * np.sqrt(np.maximum(variance, 0.0))

    def _choose(self, frame: pd.DataFrame, cand: pd.DataFrame, soc: pd.DataFrame,
                rules: list[list[RuleApplied]]) -> pd.DataFrame:
        """The chosen action per patient row (index = row): the best-scoring candidate, or standard of care."""
        soc = self._predict(frame, soc)
        with_candidates = set(cand["row"].tolist())
        if self.objective.reference == "standard_of_care" and not cand.empty:
            cand = cand.assign(score=self.improvement_bound(frame, cand, soc))
            cand = cand[cand["score"] > 0]
        best = cand.loc[cand.groupby("row")["score"].idxmax()].set_index("row") if not cand.empty else cand
        chosen = soc.set_index("row").copy()
        chosen.loc[best.index, best.columns] = best
        for i in sorted(set(range(len(frame))) - set(best.index)):
            reason = ("no supported action's lower bound on the improvement over standard of care is positive"
                      if i in with_candidates else "no action of the catalogue is within the federation's support")
            rules[i].append(RuleApplied("standard-of-care", f"{chosen.loc[i, 'formulation_id']} at the label dose "
                                        f"({chosen.loc[i, 'dose_mg_m2']:g} mg/m²)", reason))
        return chosen

    def _assemble(self, frame: pd.DataFrame, verdict: np.ndarray, chosen: pd.DataFrame,
                  rules: list[list[RuleApplied]]) -> pd.DataFrame:
        """The recommendation table, assembled as the ensemble policy assembles it (BSA cap included)."""
        return self._rules()._assemble(frame, verdict, chosen, rules)


def fit_structured_policy(frames: Sequence[pd.DataFrame], formulations: Mapping[str, Mapping[str, float]],
                          objective: StructuredObjective | None = None, **model_params) -> StructuredDosingPolicy:
    """The structured policy from the added sums of several sites' episode frames (pooled: one frame; the
    coordinator does the same over Flower): the three models by Newton–Raphson on summed sums, the support
    from summed counts. ``formulations``: the catalogue (id → ``FORMULATION_FEATURES``); ``model_params`` go
    to every model (e.g. ``formulation_precision``)."""
    catalogue = {str(k): {name: float(v[name]) for name in FORMULATION_FEATURES} for k, v in formulations.items()}
    return StructuredDosingPolicy(
        response=fit_by_sums(TumourResponseModel(catalogue, **model_params), frames),
        neutropenia=fit_by_sums(NeutropeniaModel(catalogue, **model_params), frames),
        other_toxicity=fit_by_sums(OtherToxicityModel(catalogue, **model_params), frames),
        support=Support.from_sites(frames, list(catalogue)), formulations=catalogue,
        objective=objective or StructuredObjective())


def catalogue_of(frame: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Formulation id → properties as logged in an episode frame (first row of each id)."""
    first = frame.drop_duplicates("formulation_id").set_index("formulation_id")
    return {str(f): {name: float(first.loc[f, name]) for name in FORMULATION_FEATURES} for f in first.index}


def _settings(cls, values: Mapping):
    """A settings dataclass from its JSON form (lists back to tuples; unknown keys refused)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown setting(s) {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

