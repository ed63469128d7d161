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
remaining lifetime anthracycline allowance; no dose is given while neutropenia (and fever) signs persist or
without a pre-cycle ANC; the absolute dose uses the BSA capped at 2.0 m².

No input that means the patient tolerates the drug worse may raise the dose (the monotone guard): the models
see the tolerance inputs (:data:`TOLERANCE_GRADES`: bilirubin, creatinine clearance, ANC, age, ECOG; from cycle
2 with the adjuster also :data:`HISTORY_GRADES`) by clinical grade, and the dose is capped at the lowest dose
the policy gives any better-graded version of the same patient. Models fitted on logs where frail patients
were given less learn that frailty predicts less toxicity; the guard keeps that confounding out of the dose.
On the simulated clinics of the tests' real bundle (3 clinics, 400 new patients each) it lowered the federated
policy's value by about 2 % (0.257 → 0.252, true utility per patient).

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
from dataclasses import asdict, dataclass, field, replace
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


LABEL_DOSE_MG_M2 = {"ovarian": 50.0, "breast": 50.0, "kaposi": 20.0, "myeloma": 30.0, "sarcoma": 50.0}
"""Label starting doses of liposomal doxorubicin in mg/m² (Doxil/Caelyx SmPC): ovarian 50, breast 50, Kaposi
20, myeloma 30 (with bortezomib); soft-tissue sarcoma 50 (Judson et al., Eur J Cancer 2001). Standard of care
doses by them."""
HEPATIC_BANDS_UMOL_L = (20.5, 51.0)
HEPATIC_FACTORS = (0.75, 0.5)
"""Label hepatic reductions: bilirubin 1.2–3 mg/dL (20.5–51 µmol/L) → 75 % of the dose, above → 50 %."""
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
      ANC < 1.5 × 10⁹/L or not measured (febrile-neutropenia signs), nor without a pre-cycle ANC at all (the
      label asks for blood counts before each dose; a missing count is not a normal one); the cycle is
      delayed ``withhold_days``;
    - dose changes between cycles: after a grade ≥ 3 toxicity, or a previous-cycle ANC nadir below
      ``anc_grade4_e9_l`` (grade 4 neutropenia, CTCAE v5.0; the label's dose modifications for
      haematological toxicity redose grade 4 at a 25 % reduction), the next dose is at most 75 % of the
      previous one, otherwise at most ``max_escalation`` above it (the band the sites' logs cover), never
      below the smallest dose;
    - body size: the absolute dose is computed on the BSA capped at ``bsa_cap_m2`` (2.0 m²), the convention
      of many oncology protocols for large patients. ASCO's guideline (Griggs et al., J Clin Oncol
      2012;30:1553) prefers full weight-based doses when the intent is cure; this policy's indications
      (recurrent ovarian, metastatic breast, Kaposi sarcoma, myeloma) are palliative, its doses are learned
      rather than label doses, and the lifetime limit is per m², so the cap errs on the side of less drug.
      The rule is shown whenever it applies; the clinician may decide otherwise.
    """

    hepatic_bands_umol_l: tuple[float, float] = HEPATIC_BANDS_UMOL_L
    hepatic_factors: tuple[float, float] = HEPATIC_FACTORS
    cumulative_limit_mg_m2: float = 550.0
    anc_withhold_e9_l: float = 1.0
    anc_febrile_e9_l: float = 1.5
    withhold_days: int = 7
    after_toxicity_factor: float = 0.75
    max_escalation: float = 0.25
    anc_grade4_e9_l: float = 0.5
    bsa_cap_m2: float = 2.0


@dataclass(frozen=True)
class ToleranceGrades:
    """An input whose worse values mean the patient tolerates the drug worse, cut into clinical grades.

    ``limits`` run from the best grade to the worst; a measured value belongs to the first grade whose limit
    it does not pass (higher-is-worse: the first limit ≥ the value, grades ``(previous limit, limit]``;
    lower-is-worse: the first limit ≤ it, grades ``[limit, previous limit)``). A grade is represented by the
    middle of its limits, the best grade (open on its better side) by ``normal``; a discrete input
    (``normal`` None: ECOG, a toxicity flag) by its limit itself. A missing value has index ``len(limits)`` and
    is not ordered with the grades: it says nothing about how the patient tolerates the drug, and the hard
    rules say what it means (bilirubin treated as raised, no dose without a pre-cycle ANC).
    """

    column: str
    limits: tuple[float, ...]
    higher_is_worse: bool
    template: str  # how a grade reads, from its limit: "bilirubin ≤ {:g} µmol/L"
    normal: float | None = None

    def levels(self, values: np.ndarray) -> np.ndarray:
        """Grade index per value (``len(limits)`` for NaN)."""
        values = np.asarray(values, dtype=float)
        sign = 1.0 if self.higher_is_worse else -1.0
        found = np.searchsorted(sign * np.asarray(self.limits, dtype=float), sign * values, side="left")
        return np.where(np.isnan(values), len(self.limits), np.minimum(found, len(self.limits) - 1))

    def values(self, levels: np.ndarray) -> np.ndarray:
        """The representative value of each grade index (NaN for a missing value)."""
        limits = np.asarray(self.limits, dtype=float)
        representative = limits if self.normal is None else np.r_[self.normal, (limits[:-1] + limits[1:]) / 2]
        return np.append(representative, np.nan)[np.asarray(levels, dtype=int)]

    def describe(self, level: int) -> str:
        return self.template.format(self.limits[level])

    def with_limits(self, extra: Sequence[float]) -> ToleranceGrades:
        """These grades with ``extra`` limits added (the thresholds of the hard rules on this input)."""
        merged = sorted(set(self.limits) | {float(x) for x in extra}, reverse=not self.higher_is_worse)
        return replace(self, limits=tuple(merged))


TOLERANCE_GRADES = (
    ToleranceGrades("bilirubin_umol_l", (20.5, 51.0, 102.5, 205.0, 600.0), True, "bilirubin ≤ {:g} µmol/L", 10.0),
    ToleranceGrades("creatinine_clearance_ml_min", (90.0, 60.0, 30.0, 15.0, 5.0), False,
                    "creatinine clearance ≥ {:g} mL/min", 110.0),
    ToleranceGrades("anc_baseline_e9_l", (2.0, 1.5, 1.0, 0.0), False, "ANC ≥ {:g} × 10⁹/L", 4.0),
    ToleranceGrades("age_years", (50.0, 65.0, 75.0, 85.0, 110.0), True, "age ≤ {:g}", 40.0),
    ToleranceGrades("ecog", (0.0, 1.0, 2.0, 3.0, 4.0), True, "ECOG {:g}"),
)
"""The patient's tolerance inputs and their grades. Bilirubin: upper limit of normal 20.5 µmol/L (1.2 mg/dL),
the label's 51 µmol/L band (3 mg/dL), 5 and 10 × ULN (CTCAE v5.0 grades 3 and 4 of blood bilirubin
increased), the contract's maximum; creatinine clearance: the KDIGO 2012 GFR categories G1, G2, G3 (45-59 and
30-44 together), G4, G5 (down to the contract's minimum); ANC: lower limit of normal 2.0, then the CTCAE v5.0
grade 2 (1.5) and 3 (1.0) limits, below which no dose is given anyway; age: under 50, 50-64, the geriatric-
oncology bands 65-74, 75-84 and 85+ (SIOG); ECOG: its five levels. Normal values represent the best grades
(bilirubin 10 µmol/L, clearance 110 mL/min, ANC 4 × 10⁹/L, age 40). Few grades keep the guard's versions few
(their number is the product of the grades at or better than the patient's). The hard rules' own thresholds
are added to these limits (:meth:`DosingPolicy.tolerance_grades`), so that within a grade the hard rules
decide alike and the models see one value."""

HISTORY_GRADES = (
    ToleranceGrades("previous_toxicity_grade3", (0.0, 1.0), True, "no grade ≥ 3 toxicity last cycle"),
    ToleranceGrades("previous_anc_nadir_e9_l", (1.5, 1.0, 0.5, 0.0), False, "ANC nadir ≥ {:g} × 10⁹/L last cycle",
                    2.5),
)
"""Tolerance inputs of the previous cycle (CTCAE v5.0 neutrophil grades 1-4 for the nadir). Besides the hard rules,
which are monotone in them, only the fitted-Q adjuster reads them, so they are graded where it applies."""
HISTORY_COLUMNS = frozenset(g.column for g in HISTORY_GRADES)

MAX_GUARD_CANDIDATES = 20_000
"""Most candidate actions the monotone guard scores for one patient (better-graded versions × formulations ×
doses: some 600 versions with a catalogue of 3, 50-60 ms on a busy 2-core machine). It bounds the work one
record can ask for (``client.service.MAX_BATCH`` records of at most this many: 200 took 11 s). A patient far
from normal on many inputs at once has more versions: they are offered the smallest dose, which keeps the
guarantee (no better-graded version of them gets less)."""
GUARD_CHUNK_CANDIDATES = 200_000
"""Candidate actions scored at once by the guard (a few tens of MB of encoded rows)."""


def graded_frame(frame: pd.DataFrame, grades: Sequence[ToleranceGrades]) -> pd.DataFrame:
    """``frame`` with every tolerance input at its grade's representative value: what the outcome models and the
    adjuster see, so that the policy's dose can depend on these inputs only through their grades."""
    graded = frame.copy()
    for g in grades:
        if g.column in graded:
            graded[g.column] = g.values(g.levels(graded[g.column].to_numpy(dtype=float)))
    return graded


@dataclass
class BetterVersions:
    """The better-graded versions of some patients (:func:`better_versions`)."""

    frame: pd.DataFrame  # one row per version: its owner's graded row with some tolerance inputs changed
    owner: np.ndarray  # the patient row each version belongs to
    levels: np.ndarray  # (versions, grades): the grade index of each tolerance input
    own: np.ndarray  # (patients, grades): the patients' own grade indices
    grades: list[ToleranceGrades]
    too_many: np.ndarray  # patient rows not expanded: more than MAX_GUARD_CANDIDATES actions to score

    def describe(self, k: int) -> str:
        """What is better in version ``k`` than in its patient: "bilirubin ≤ 20.5 µmol/L, ECOG 1"."""
        mine = self.own[self.owner[k]]
        return ", ".join(g.describe(level) for g, level, own in zip(self.grades, self.levels[k], mine, strict=True)
                         if level != own)

    def limits(self, doses: Callable[[], np.ndarray], patients: int, smallest: float
               ) -> tuple[np.ndarray, dict[int, str]]:
        """Per patient row, the guard's cap — the lowest of its versions' unguarded ``doses()`` (+inf without
        versions; ``smallest`` for the rows in ``too_many``) — and, per capped-by-a-version row, that version
        described."""
        limit = np.full(patients, np.inf)
        lowest_of: dict[int, str] = {}
        if len(self.owner):
            dose, owner = doses(), self.owner
            order = np.lexsort((np.arange(len(dose)), dose, owner))
            first = order[np.r_[True, owner[order][1:] != owner[order][:-1]]]  # the lowest dose of each owner
            limit[owner[first]] = dose[first]
            lowest_of = {int(owner[k]): self.describe(k) for k in first}
        limit[self.too_many] = smallest
        return limit, lowest_of


def guard_rule(limit: float, lowest: str | None) -> RuleApplied:
    """The monotone guard's rule for a capped dose; ``lowest``: the better-graded version that set the cap (None:
    too many versions to check)."""
    why = (f"the same patient with {lowest} would be offered {limit:g} mg/m²" if lowest is not None else
           f"more than {MAX_GUARD_CANDIDATES} actions of better-graded versions of this patient to check: "
           "the smallest dose is offered and a clinician decides")
    return RuleApplied("monotone-guard", f"dose capped at {limit:g} mg/m²",
                       f"{why}; worse organ function or tolerance never raises the dose")


def better_versions(graded: pd.DataFrame, rows: np.ndarray, grades: Sequence[ToleranceGrades], with_history: bool,
                    per_version: np.ndarray) -> BetterVersions:
    """Every better-graded version of each of ``rows`` of ``graded``: each tolerance input at its own grade or a
    better one, in every combination, the patient itself excluded; previous-cycle inputs too where
    ``with_history`` and the row has a previous cycle. A missing input stays missing (it is not a grade: the
    hard rules say what a missing value means, e.g. bilirubin treated as raised, no dose without an ANC).
    Rows with more than ``MAX_GUARD_CANDIDATES`` candidate actions (``per_version[row]`` per version) to score
    are not expanded but listed in ``too_many``. ``grades``: the tolerance inputs, previous-cycle ones named in
    ``HISTORY_COLUMNS``."""
    history = with_history & ~np.isnan(_column(graded, "previous_dose_mg_m2"))
    grades = [g for g in grades if g.column in graded]
    own = np.column_stack([g.levels(graded[g.column].to_numpy(dtype=float)) for g in grades])
    expandable = np.array([[level < len(g.limits) and (g.column not in HISTORY_COLUMNS or history[i])
                            for g, level in zip(grades, own[i], strict=True)] for i in range(len(graded))], dtype=bool)
    options = np.where(expandable, own + 1, 1)  # own grade and every better one, or only its own
    count = options.prod(axis=1) - 1
    rows = np.asarray(rows, dtype=int)
    heavy = count[rows] * per_version[rows] > MAX_GUARD_CANDIDATES
    too_many = rows[heavy]
    owners, levels = [], []
    for i in rows[~heavy]:
        grid = np.indices(options[i]).reshape(len(grades), -1).T  # every combination of the options
        grid = np.where(expandable[i], grid, own[i])
        grid = grid[(grid != own[i]).any(axis=1)]
        owners.append(np.full(len(grid), i))
        levels.append(grid)
    owner = np.concatenate(owners) if owners else np.zeros(0, dtype=int)
    levels_of = np.concatenate(levels) if levels else np.zeros((0, len(grades)), dtype=int)
    frame = graded.iloc[owner].reset_index(drop=True)
    for j, g in enumerate(grades):
        frame[g.column] = g.values(levels_of[:, j])
    return BetterVersions(frame, owner, levels_of, own, grades, too_many)


def _standardised_into(encoder: FeatureEncoder, x: np.ndarray, values: dict[str, np.ndarray]) -> np.ndarray:
    """``x`` (encoded rows) with the numeric features ``values`` standardised into their columns and their
    missing indicators set, as :meth:`FeatureEncoder.transform` would (a missing value: 0 and indicator 1)."""
    names = encoder.feature_names_out_
    for name, column in values.items():
        missing = np.isnan(column)
        x[:, names.index(name)] = np.where(missing, 0.0, (column - encoder.means_[name]) / encoder.scales_[name])
        if name in encoder.missing_indicator_:
            x[:, names.index(name + MISSING_SUFFIX)] = missing
    return x


def _best(cand: pd.DataFrame) -> pd.DataFrame:
    """The best-ranked candidate per patient row (index = row)."""
    return cand.loc[cand.groupby("row")["rank"].idxmax()].set_index("row")


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
    bsa_m2: float | None = None  # the BSA dose_mg was computed on (after the BSA cap)

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
        """The ``policy.json`` of this policy, given how its models are stored (see ``server.policy_phase``)."""
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
        return [recommendation_of(row, self.version) for row in table.itertuples(index=False)]

    def predicted_outcomes(self, frame: pd.DataFrame, actions: pd.DataFrame) -> pd.DataFrame:
        """The outcome models' mean P(response) and P(grade ≥ 3 toxicity) of one given action per patient row
        (``actions``, aligned with ``frame``: formulation_id, dose_mg_m2, interval_days) — e.g. the logged action,
        for off-policy evaluation (``shared.off_policy``). NaN where the policy does not know the formulation."""
        frame = frame.reset_index(drop=True)
        known, cand, out = known_actions(actions, self.formulations)
        if not known.any():
            return out
        x = self._encode(self._patients_x(frame), cand)
        predictions = [member(x) for member in self.members.values()]
        for outcome in (RESPONSE, TOXICITY):
            out.loc[known, outcome] = np.mean([np.asarray(p[outcome], dtype=float) for p in predictions], axis=0)
        return out

    def recommend_frame(self, frame: pd.DataFrame, adjust: bool = True) -> pd.DataFrame:
        """Recommendations for the flat records of :func:`shared.patient_record.records_frame`: one row per
        patient with action, formulation_id, dose_mg_m2, dose_mg, interval_days, response/toxicity
        mean/low/high and ``rules`` (a list of :class:`RuleApplied`).

        1. the hard rules give each patient a verdict and a dose cap (:meth:`safety_limits`);
        2. the best action is chosen for the patient with its tolerance inputs graded (:func:`graded_frame`:
           what the models and the adjuster see of them);
        3. the monotone guard caps the dose at the lowest dose any better-graded version of the patient would
           get (:meth:`_monotone_guard`).
        """
        frame = frame.reset_index(drop=True)
        rules: list[list[RuleApplied]] = [[] for _ in range(len(frame))]
        cap, verdict = self.safety_limits(frame, rules)
        grades = self.tolerance_grades()
        graded = graded_frame(frame, grades)
        graded_x = self._patients_x(graded)
        known = self._known_formulations(graded, rules)
        rows = np.repeat(np.arange(len(frame)), [len(k) for k in known])
        own = self._ranked(graded, self._scored(graded, graded_x, rows, np.concatenate(known), cap), adjust)
        self._note_adjusted(graded, own, rules)
        chosen = self._monotone_guard(graded, graded_x, known, grades, verdict, adjust, own, rules)
        self._note_ceiling(chosen, rules)
        return self._assemble(frame, verdict, chosen, rules)

    def tolerance_grades(self) -> tuple[ToleranceGrades, ...]:
        """:data:`TOLERANCE_GRADES` and :data:`HISTORY_GRADES` with the thresholds of this policy's hard rules
        added, so that every value of a grade meets the hard rules alike (the guard's guarantee rests on it)."""
        s = self.safety
        thresholds = {"bilirubin_umol_l": s.hepatic_bands_umol_l,
                      "anc_baseline_e9_l": (s.anc_withhold_e9_l, s.anc_febrile_e9_l),
                      "previous_anc_nadir_e9_l": (s.anc_grade4_e9_l,)}
        return tuple(g.with_limits(thresholds.get(g.column, ())) for g in (*TOLERANCE_GRADES, *HISTORY_GRADES))

    def safety_limits(self, frame: pd.DataFrame, rules: list[list[RuleApplied]] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Per patient: the highest dose the hard rules allow, and "give"/"withhold"/"stop" (vectorised); the
        rules that applied are appended to ``rules`` (one list per row), in the order below, if given.

        Every rule is monotone: a worse value never loosens a cap nor turns a hold into a dose."""
        s, space = self.safety, self.action_space
        bilirubin = frame["bilirubin_umol_l"].to_numpy(dtype=float)
        anc = frame["anc_baseline_e9_l"].to_numpy(dtype=float)
        fever = _column(frame, "wearable_fever_days")
        cumulative = frame["cumulative_dose_mg_m2"].to_numpy(dtype=float)
        previous = _column(frame, "previous_dose_mg_m2")
        toxic = _column(frame, "previous_toxicity_grade3") == 1
        nadir = _column(frame, "previous_anc_nadir_e9_l")
        with np.errstate(invalid="ignore"):  # NaN compares False: "not measured" is handled explicitly
            hepatic = np.isnan(bilirubin) | (bilirubin > s.hepatic_bands_umol_l[0])
            factor = np.where(bilirubin > s.hepatic_bands_umol_l[1], s.hepatic_factors[1], s.hepatic_factors[0])
            cap = np.where(hepatic, space.dose_max_mg_m2 * factor, space.dose_max_mg_m2)
            remaining = s.cumulative_limit_mg_m2 - cumulative
            stop = remaining < space.dose_min_mg_m2
            cumulative_cap = ~stop & (remaining < cap)
            cap = np.where(cumulative_cap, remaining, cap)
            febrile = (fever >= 1) & (np.isnan(anc) | (anc < s.anc_febrile_e9_l))
            hold = ~stop & (np.isnan(anc) | (anc < s.anc_withhold_e9_l) | febrile)
            grade4 = nadir < s.anc_grade4_e9_l
        verdict = np.where(stop, "stop", np.where(hold, "withhold", "give")).astype(object)
        limit = np.maximum(previous * np.where(toxic | grade4, s.after_toxicity_factor, 1 + s.max_escalation),
                           space.dose_min_mg_m2)
        changed = (verdict == "give") & ~np.isnan(previous) & (limit < cap)
        cap = np.where(changed, limit, cap)
        if rules is not None:
            self._note_hepatic(rules, np.flatnonzero(hepatic), bilirubin, factor)
            self._note_cumulative(rules, np.flatnonzero(stop | cumulative_cap), stop, cumulative, remaining)
            self._note_hold(rules, np.flatnonzero(hold), febrile, fever, anc)
            self._note_change(rules, np.flatnonzero(changed), limit, previous, toxic, grade4, nadir)
        return cap, verdict

    def _note_hepatic(self, rules, rows, bilirubin, factor) -> None:
        s, top = self.safety, self.action_space.dose_max_mg_m2
        for i in rows:
            b = bilirubin[i]
            why = ("bilirubin not measured: treated as raised until measured" if np.isnan(b) else
                   f"bilirubin {b:g} µmol/L above {s.hepatic_bands_umol_l[0]:g} (label hepatic reduction)")
            rules[i].append(RuleApplied("hepatic-reduction", f"dose capped at {top * factor[i]:g} mg/m² "
                                        f"({factor[i]:.0%} of {top:g})", why))

    def _note_cumulative(self, rules, rows, stop, cumulative, remaining) -> None:
        s, smallest = self.safety, self.action_space.dose_min_mg_m2
        for i in rows:
            done = f"cumulative {cumulative[i]:g} of {s.cumulative_limit_mg_m2:g} mg/m²"
            rules[i].append(RuleApplied("cumulative-limit", "no further anthracycline",
                                        f"{done} leaves less than the smallest dose ({smallest:g})") if stop[i] else
                            RuleApplied("cumulative-limit", f"dose capped at {remaining[i]:g} mg/m²", done))

    def _note_hold(self, rules, rows, febrile, fever, anc) -> None:
        s = self.safety
        for i in rows:
            if febrile[i]:
                why = (f"fever on {fever[i]:g} day(s) of the last cycle and ANC "
                       f"{'not measured' if np.isnan(anc[i]) else f'{anc[i]:g} × 10⁹/L'}")
            elif np.isnan(anc[i]):
                why = ("ANC not measured before this cycle: no anthracycline without a pre-cycle blood count "
                       "(label: blood counts before each dose)")
            else:
                why = f"ANC {anc[i]:g} × 10⁹/L below {s.anc_withhold_e9_l:g} (grade ≥ 3 neutropenia)"
            rules[i].append(RuleApplied("neutropenia-hold", f"no dose now; re-assess in {s.withhold_days} days", why))

    def _note_change(self, rules, rows, limit, previous, toxic, grade4, nadir) -> None:
        s = self.safety
        resume = f"resume {1 - s.after_toxicity_factor:.0%} lower"
        for i in rows:
            if grade4[i]:
                why = (f"ANC nadir {nadir[i]:g} × 10⁹/L after {previous[i]:g} mg/m² in the previous cycle: grade 4 "
                       f"neutropenia (label: {resume})")
            elif toxic[i]:
                why = f"grade ≥ 3 toxicity in the previous cycle at {previous[i]:g} mg/m² (label: {resume})"
            else:
                why = f"previous dose {previous[i]:g} mg/m²: at most +{s.max_escalation:.0%} a cycle"
            rules[i].append(RuleApplied("dose-change-limit", f"dose capped at {limit[i]:g} mg/m²", why))

    def _candidates(self, frame: pd.DataFrame, cap: np.ndarray, rules: list[list[RuleApplied]]) -> pd.DataFrame:
        """Every allowed (patient, formulation of its catalogue the policy knows, dose, interval), scored."""
        known = self._known_formulations(frame, rules)
        rows = np.repeat(np.arange(len(frame)), [len(k) for k in known])
        return self._scored(frame, self._patients_x(frame), rows, np.concatenate(known), cap)

    def _known_formulations(self, frame: pd.DataFrame, rules: list[list[RuleApplied]]) -> list[np.ndarray]:
        """Per patient, the formulations of its catalogue the policy knows; the others are noted as a rule."""
        known = []
        for i, catalogue in enumerate(frame["catalogue"]):
            mine = [f for f in catalogue if f in self.formulations]
            unknown = sorted(set(catalogue) - set(mine))
            if unknown:
                rules[i].append(RuleApplied("unknown-formulation", f"not considered: {', '.join(unknown)}",
                                            "the policy has no data on these formulations"))
            known.append(np.asarray(mine, dtype=object))
        if not any(len(k) for k in known):
            raise ValueError("no formulation of the catalogue is known to the policy: "
                             f"it knows {', '.join(sorted(self.formulations))}")
        return known

    def _scored(self, frame: pd.DataFrame, patients_x: np.ndarray, rows: np.ndarray, ids: np.ndarray,
                cap: np.ndarray) -> pd.DataFrame:
        """Each (row, formulation) pair × the dose grid × the intervals, doses above the row's cap left out,
        with predicted outcomes, the pessimistic ``score`` and whether it is ``safe`` (under the ceiling);
        ``patients_x``: the rows of ``frame`` encoded (:meth:`_patients_x`)."""
        doses, n_delays = self.action_space.doses(), len(self.action_space.delays_days)
        per_pair = len(doses) * n_delays
        pair = np.repeat(np.arange(len(rows)), per_pair)
        row = np.asarray(rows)[pair]
        dose = np.tile(np.repeat(doses, n_delays), len(rows))
        keep = dose <= cap[row] + 1e-9
        delay = np.tile(np.arange(n_delays), len(rows) * len(doses))[keep]
        row, dose = row[keep], dose[keep]
        intervals = self.action_space.intervals(frame["tumour_type"])
        cand = pd.DataFrame({"row": row, "formulation_id": np.asarray(ids, dtype=object)[pair[keep]],
                             "dose_mg_m2": dose, "interval_days": intervals[row, delay]})
        cand = self._with_bounds(patients_x, cand)
        cand["score"] = cand[f"{RESPONSE}_low"] - self.objective.toxicity_weight * cand[f"{TOXICITY}_high"]
        cand["safe"] = cand[f"{TOXICITY}_high"] <= self.objective.toxicity_ceiling
        return cand

    def _with_bounds(self, patients_x: np.ndarray, cand: pd.DataFrame) -> pd.DataFrame:
        """``cand`` with each outcome's ensemble mean and pessimistic/optimistic bounds (mean ∓ z SD, clipped)."""
        predictions = [member(self._encode(patients_x, cand)) for member in self.members.values()]
        z = self.objective.z
        for outcome in (RESPONSE, TOXICITY):
            p = np.stack([np.asarray(pred[outcome], dtype=float) for pred in predictions])
            mean, sd = p.mean(axis=0), p.std(axis=0)
            cand[f"{outcome}_mean"] = mean
            cand[f"{outcome}_low"] = np.clip(mean - z * sd, 0.0, 1.0)
            cand[f"{outcome}_high"] = np.clip(mean + z * sd, 0.0, 1.0)
        return cand

    def predicted_bounds(self, frame: pd.DataFrame, actions: pd.DataFrame) -> pd.DataFrame:
        """Each action's predicted P(response) and P(grade ≥ 3 toxicity) with the bounds the policy ranks by
        (columns ``response_mean/low/high``, ``toxicity_mean/low/high``), for the patient as the policy sees it
        when it chooses (tolerance inputs graded, :func:`graded_frame`). ``actions``: ``row`` (of ``frame``),
        formulation_id (known to the policy), dose_mg_m2, interval_days. What the clinician's page charts
        against dose (:mod:`client.clinician_view`); the numbers at the recommended action are the
        recommendation's own."""
        graded = graded_frame(frame.reset_index(drop=True), self.tolerance_grades())
        cand = actions.reset_index(drop=True)[["row", "formulation_id", "dose_mg_m2", "interval_days"]].copy()
        return self._with_bounds(self._patients_x(graded), cand)

    def _patients_x(self, frame: pd.DataFrame) -> np.ndarray:
        """The patients' encoded rows, the action's columns (formulation properties, dose, interval) left as
        placeholders for :meth:`_encode` to fill."""
        patients = frame.copy()
        for name in (*FORMULATION_FEATURES, "dose_mg_m2", "interval_days"):
            patients[name] = 0.0
        return self.encoder.transform(patients)

    def _encode(self, patients_x: np.ndarray, cand: pd.DataFrame) -> np.ndarray:
        """Encoded candidate rows: each patient's encoded row with the action's columns (never missing)
        standardised in — the same numbers :meth:`FeatureEncoder.transform` gives for the full rows, many times
        faster."""
        props = pd.DataFrame.from_dict(self.formulations, orient="index")
        which = props.index.get_indexer(cand["formulation_id"])
        action = {name: props[name].to_numpy(dtype=float)[which] for name in FORMULATION_FEATURES}
        action |= {"dose_mg_m2": cand["dose_mg_m2"].to_numpy(dtype=float),
                   "interval_days": cand["interval_days"].to_numpy(dtype=float)}
        return _standardised_into(self.encoder, patients_x[cand["row"].to_numpy()], action)

    def _ranked(self, frame: pd.DataFrame, cand: pd.DataFrame, adjust: bool) -> pd.DataFrame:
        """The candidates with their ``rank``: below the ceiling the score, else the lower the pessimistic
        toxicity risk the better; from cycle 2 the adjuster's ranking (:meth:`_adjusted`)."""
        cand = cand.copy()
        cand["rank"] = np.where(cand["safe"], cand["score"], -10.0 - cand[f"{TOXICITY}_high"])
        if adjust and self.adjuster is not None:
            cand = self._adjusted(frame, cand)
        return cand

    def _note_ceiling(self, best: pd.DataFrame, rules: list[list[RuleApplied]]) -> None:
        for i, risk in best.loc[~best["safe"], f"{TOXICITY}_high"].items():
            rules[i].append(RuleApplied(
                "toxicity-ceiling", "lowest-risk action chosen", f"no allowed action keeps the pessimistic "
                f"toxicity risk below {self.objective.toxicity_ceiling:.0%} (lowest {risk:.0%})"))

    def _monotone_guard(self, graded: pd.DataFrame, graded_x: np.ndarray, known: list[np.ndarray],
                        grades: Sequence[ToleranceGrades], verdict: np.ndarray, adjust: bool, own: pd.DataFrame,
                        rules: list[list[RuleApplied]]) -> pd.DataFrame:
        """Cap each dose at the lowest dose any better-graded version of the same patient would get.

        The versions (:func:`better_versions`) are the patient with each tolerance input at its own grade or
        a better one, in every combination; each gets the policy's unguarded decision. The patient's dose
        becomes the lowest of theirs and its own, with the best-ranked action at that dose. A worse patient's
        versions include a better one's (and, the hard rules deciding alike within a grade, the better one
        itself), so the dose is non-increasing in every tolerance input, jointly. A patient with more than
        ``MAX_GUARD_CANDIDATES`` candidate actions to check gets the smallest dose.
        """
        per_formulation = len(self.action_space.doses()) * len(self.action_space.delays_days)
        per_version = np.array([len(k) for k in known]) * per_formulation
        giving = np.flatnonzero(verdict == "give")
        versions = better_versions(graded, giving, grades, adjust and self.adjuster is not None, per_version)
        limit, lowest_of = versions.limits(lambda: self._dose_of_each(versions, graded_x, known, adjust),
                                           len(graded), self.action_space.dose_min_mg_m2)
        best = _best(own)
        chosen = best["dose_mg_m2"].reindex(range(len(graded))).to_numpy(dtype=float)
        capped = limit < chosen - 1e-9
        if not capped.any():
            return best
        row = own["row"].to_numpy()
        options = own[capped[row] & (own["dose_mg_m2"].to_numpy() <= limit[row] + 1e-9)]
        options = options[options["dose_mg_m2"] == options.groupby("row")["dose_mg_m2"].transform("max")]
        picked = _best(options)  # the highest dose under the cap, its best-ranked formulation and interval
        for i in picked.index:
            rules[i].append(guard_rule(limit[i], lowest_of.get(i)))
        return pd.concat([best.drop(index=picked.index), picked]).sort_index()

    def _dose_of_each(self, versions: BetterVersions, graded_x: np.ndarray, known: list[np.ndarray],
                      adjust: bool) -> np.ndarray:
        """The unguarded dose (mg/m²) of each version; +inf where the hard rules give none. A version's encoded
        row is its patient's with the tolerance columns standardised anew. Computed in chunks of about
        ``GUARD_CHUNK_CANDIDATES`` candidate actions, so memory stays bounded."""
        per_formulation = len(self.action_space.doses()) * len(self.action_space.delays_days)
        counts = np.array([len(k) for k in known])[versions.owner]
        chunk_of = (np.cumsum(counts * per_formulation) - 1) // GUARD_CHUNK_CANDIDATES
        columns = [g.column for g in versions.grades if g.column in self.encoder.means_]
        doses = []
        for chunk in np.split(np.arange(len(versions.owner)), np.flatnonzero(np.diff(chunk_of)) + 1):
            part = versions.frame.iloc[chunk].reset_index(drop=True)
            owner = versions.owner[chunk]
            part_x = _standardised_into(self.encoder, graded_x[owner],
                                        {c: part[c].to_numpy(dtype=float) for c in columns})
            cap, verdict = self.safety_limits(part)
            rows = np.repeat(np.arange(len(part)), counts[chunk])
            ids = np.concatenate([known[o] for o in owner])
            best = _best(self._ranked(part, self._scored(part, part_x, rows, ids, cap), adjust))
            dose = best["dose_mg_m2"].reindex(np.arange(len(part))).to_numpy(dtype=float)
            doses.append(np.where(verdict == "give", dose, np.inf))
        return np.concatenate(doses)

    def _adjusted(self, frame: pd.DataFrame, cand: pd.DataFrame) -> pd.DataFrame:
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
        adjusted_rows = np.unique(rows[same])
        dose_index = np.searchsorted(doses, cand["dose_mg_m2"].to_numpy())
        q_cand = q_table[rows, dose_index]
        # Adjusted patients: only the previous formulation; safe doses ranked by Q, then by score for the
        # interval (Q does not depend on it).
        adjusted = np.isin(rows, adjusted_rows)
        keep = ~adjusted | same
        cand = cand[keep].copy()
        ranked_by_q = adjusted[keep] & cand["safe"].to_numpy() & ~np.isnan(q_cand[keep])
        cand["rank"] = np.where(ranked_by_q, 100.0 + np.nan_to_num(q_cand[keep]) + 1e-6 * cand["score"],
                                cand["rank"])
        cand["adjusted"] = adjusted[keep]
        return cand

    def _note_adjusted(self, frame: pd.DataFrame, cand: pd.DataFrame, rules: list[list[RuleApplied]]) -> None:
        """The fitted-Q rule, with what the adjuster read, for the patients whose dose it ranked."""
        if "adjusted" not in cand:
            return
        formulation, dose = frame["previous_formulation_id"].to_numpy(), frame["previous_dose_mg_m2"].to_numpy()
        toxic, fever = _column(frame, "previous_toxicity_grade3"), _column(frame, "wearable_fever_days")
        steps = _column(frame, "wearable_steps_change_pct")
        for i in np.unique(cand.loc[cand["adjusted"], "row"]):
            rules[i].append(RuleApplied(
                "fitted-q-adjustment", f"dose chosen by the fitted-Q adjuster; formulation {formulation[i]} kept",
                f"previous dose {dose[i]:g} mg/m², grade ≥ 3 toxicity {int(toxic[i])}, fever days "
                f"{_fmt(fever[i])}, activity change {_fmt(steps[i])} %"))

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
        out["bsa_m2"] = self._dosing_bsa(frame, giving, rules)
        out["dose_mg"] = np.round(out["dose_mg_m2"].to_numpy(dtype=float) * out["bsa_m2"].to_numpy(), 1)
        out["rules"] = rules
        return out

    def _dosing_bsa(self, frame: pd.DataFrame, giving: np.ndarray, rules: list[list[RuleApplied]]) -> np.ndarray:
        """The BSA the absolute dose is computed on: the record's (checked against height and weight by
        :class:`shared.patient_record.PatientRecord`), capped at ``bsa_cap_m2``; the rule is noted where it
        applies to a dose given."""
        bsa = frame["bsa_m2"].to_numpy(dtype=float)
        cap = self.safety.bsa_cap_m2
        for i in np.flatnonzero(giving & (bsa > cap)):
            rules[i].append(RuleApplied("bsa-cap", f"absolute dose computed on {cap:g} m², not {bsa[i]:g} m²",
                                        f"BSA above {cap:g} m² (capped BSA, a common protocol convention for large "
                                        "patients; the dose per m² actually given is lower than stated)"))
        return np.minimum(bsa, cap)


def label_actions(policy, records: pd.DataFrame, formulation: np.ndarray,
                  rules: list[list[RuleApplied]] | None = None) -> pd.DataFrame:
    """Standard of care's action per record, under ``policy``'s hard rules (either policy kind): ``formulation``
    at the label dose of its tumour type with the label hepatic reduction (measured bilirubin), rounded to the
    dose step, within the policy's caps, at the label interval; ``action`` is the policy's hard rules' verdict
    (give / withhold / stop), whose rules are appended to ``rules`` if given. Columns: action, formulation_id,
    dose_mg_m2, interval_days (rows of ``records``)."""
    space, safety = policy.action_space, policy.safety
    bilirubin = np.nan_to_num(records["bilirubin_umol_l"].to_numpy(dtype=float), nan=0.0)
    hepatic = np.where(bilirubin > safety.hepatic_bands_umol_l[1], safety.hepatic_factors[1],
                       np.where(bilirubin > safety.hepatic_bands_umol_l[0], safety.hepatic_factors[0], 1.0))
    label = records["tumour_type"].map(LABEL_DOSE_MG_M2).to_numpy(dtype=float)
    cap, verdict = policy.safety_limits(records, rules)
    step = space.dose_step_mg_m2
    dose = np.clip(step * np.rint(label * hepatic / step), space.dose_min_mg_m2, space.dose_max_mg_m2)
    return pd.DataFrame({"action": verdict, "formulation_id": np.asarray(formulation, dtype=object),
                         "dose_mg_m2": np.minimum(dose, cap),
                         "interval_days": space.intervals(records["tumour_type"])[:, 0]})


def known_actions(actions: pd.DataFrame, formulations) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """For ``predicted_outcomes`` of either policy: which given actions use a formulation the policy knows, those
    actions as candidate rows (``row``, formulation_id, dose_mg_m2, interval_days), and the output table to fill
    (NaN P(response) and P(toxicity) for every action)."""
    actions = actions.reset_index(drop=True)
    known = actions["formulation_id"].astype(str).isin(set(formulations)).to_numpy()
    out = pd.DataFrame({RESPONSE: np.full(len(actions), np.nan), TOXICITY: np.full(len(actions), np.nan)})
    cand = pd.DataFrame({"row": np.flatnonzero(known),
                         "formulation_id": actions.loc[known, "formulation_id"].astype(str).to_numpy(),
                         "dose_mg_m2": actions.loc[known, "dose_mg_m2"].to_numpy(dtype=float),
                         "interval_days": actions.loc[known, "interval_days"].to_numpy(dtype=float)})
    return known, cand, out


def recommendation_of(row, version: int | None) -> Recommendation:
    """One row of a ``recommend_frame`` table as the :class:`Recommendation` shown (either policy kind)."""
    give = row.action == "give"

    def estimate(outcome: str) -> Estimate | None:
        if not give:
            return None
        return Estimate(*(round(float(getattr(row, f"{outcome}_{b}")), 4) for b in ("mean", "low", "high")))

    return Recommendation(
        patient_id=str(row.patient_id), action=str(row.action),
        formulation_id=None if row.action == "stop" else str(row.formulation_id),
        dose_mg_m2=float(row.dose_mg_m2), dose_mg=float(row.dose_mg), interval_days=int(row.interval_days),
        response=estimate(RESPONSE), toxicity=estimate(TOXICITY), rules=tuple(row.rules), policy_version=version,
        bsa_m2=round(float(row.bsa_m2), 3))


def _column(frame: pd.DataFrame, name: str) -> np.ndarray:
    return frame[name].to_numpy(dtype=float) if name in frame else np.full(len(frame), np.nan)


def _fmt(value: float) -> str:
    return "not recorded" if np.isnan(value) else f"{value:g}"


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
