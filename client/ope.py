"""A site's off-policy estimate of a candidate dosing policy against its own standard of care (``query.policy_value``).

From the site's logged first cycles (cycle 1 of each patient: the first-cycle decision the policy makes), the
site computes the doubly-robust terms of :mod:`shared.off_policy` for the candidate and for its standard of
care, and releases only their sums (:class:`shared.off_policy.ValueSums`), noised under DP (phase ``policy``
of ``client.dp``). What stays at the site:

- the **logging-policy model** ``p̂(a | x)`` of how this site chose formulation and dose (fitted on all its
  logged first cycles, never sent): a multinomial logistic regression of the formulation on the patient's
  covariates, and a linear model of log dose on the covariates and the formulation with a normal residual
  (a log-normal dose density); scikit-learn, standardised covariates, median-imputed with missing indicators;
- the cycles it evaluates on: its held-out first cycles (validation and test splits, ``shared.task``), which
  the candidate's models were not trained on, with all three outcomes recorded;
- its decision log (``decisions.csv``, :mod:`client.decision_log`), where the telemedicine service recorded
  every option of a decision with its probability: for a cycle it holds, the exact probability of the action
  given replaces the habits model (and the habits model is fitted on the cycles it does not hold).

A cycle whose candidate action is off the logs' support earns the structured models' lower 95 % bound on the
improvement over standard of care, never more than the plain difference (:func:`off_support_credit`;
``shared.off_policy``).

**Standard of care** at a site is what it does today, in the simulator's and the label's terms: per tumour
type the formulation it logs most often at the first cycles it decided by its own practice (not those a served
policy or an exploration draw decided: :func:`client.decision_log.own_practice`; its most used overall where
it has none), at the label dose for the tumour type with the label hepatic reduction (``shared.dosing_policy``),
rounded to the dose step, under the same hard safety rules as any policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from client.decision_log import logged_probability, own_practice
from client.dp import Block, PhaseRelease
from client.site_gate import UsualFormulations
from shared.dosing_policy import RESPONSE, TOXICITY, DosingPolicy, label_actions
from shared.off_policy import (
    MIN_SUPPORT,
    Z_95,
    ValueSums,
    box_kernel,
    chf_cycle_probability,
    dr_terms,
    utility,
)
from shared.patient_record import PREVIOUS_PREFIX, WEARABLE_PREFIX, PreviousCycle, WearableSummary
from shared.protocol.privacy import ReleaseFacts
from shared.task import assign_split

NUMERIC = ("age_years", "weight_kg", "height_cm", "bsa_m2", "bilirubin_umol_l", "creatinine_clearance_ml_min",
           "anc_baseline_e9_l", "ecog", "tumour_burden_mm", "cumulative_dose_mg_m2")
CATEGORICAL = ("sex", "tumour_type")
OUTCOMES = ("response", "toxicity_grade3", "chf")
RECORD_COLUMNS = ("patient_id", "cycle", *NUMERIC, *CATEGORICAL)
MIN_DOSE_SD = 0.05
"""Floor of the log-dose residual sd: a site dosing one formulation at one dose has a density, not a spike."""


def covariates(frame: pd.DataFrame) -> ColumnTransformer:
    """Standardised numeric covariates (median-imputed, with missing indicators) and one-hot categories."""
    numeric = make_pipeline(SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True),
                            StandardScaler())
    return ColumnTransformer([("numeric", numeric, list(NUMERIC)),
                              ("categorical", OneHotEncoder(handle_unknown="ignore"), list(CATEGORICAL))])


@dataclass
class LoggingPolicy:
    """The site's own dosing habits: ``p(formulation | x)`` and a log-normal density of the dose given both.

    Parameters
    ----------
    C : float, default 1.0
        Inverse L2 penalty of the formulation model (scikit-learn's ``LogisticRegression``).
    """

    C: float = 1.0

    def fit(self, episodes: pd.DataFrame) -> LoggingPolicy:
        """Fit on the cycles that were given: a withheld cycle (recorded at dose 0, e.g. a deployed policy's
        hold) has no dose to model; it keeps no inverse-propensity weight (:func:`dose_density` is 0 there)."""
        episodes = episodes[episodes["dose_mg_m2"].to_numpy(dtype=float) > 0]
        x = episodes[list(NUMERIC) + list(CATEGORICAL)]
        formulation = episodes["formulation_id"].astype(str).to_numpy()
        self.formulations_ = np.unique(formulation)
        if len(self.formulations_) > 1:
            self.formulation_model_ = make_pipeline(covariates(x), LogisticRegression(C=self.C, max_iter=2000))
            self.formulation_model_.fit(x, formulation)
        with_f = x.assign(formulation_id=formulation)
        dose_features = ColumnTransformer([("x", covariates(x), list(NUMERIC) + list(CATEGORICAL)),
                                           ("f", OneHotEncoder(handle_unknown="ignore"), ["formulation_id"])])
        self.dose_model_ = make_pipeline(dose_features, LinearRegression())
        log_dose = np.log(episodes["dose_mg_m2"].to_numpy(dtype=float))
        self.dose_model_.fit(with_f, log_dose)
        residual = log_dose - self.dose_model_.predict(with_f)
        self.dose_sd_ = max(float(np.std(residual)), MIN_DOSE_SD)
        return self

    def formulation_probability(self, frame: pd.DataFrame, formulation: np.ndarray) -> np.ndarray:
        if len(self.formulations_) == 1:
            return (np.asarray(formulation, dtype=str) == self.formulations_[0]).astype(float)
        proba = self.formulation_model_.predict_proba(frame[list(NUMERIC) + list(CATEGORICAL)])
        classes = list(self.formulation_model_.classes_)
        index = np.array([classes.index(f) if f in classes else -1 for f in np.asarray(formulation, dtype=str)])
        return np.where(index >= 0, proba[np.arange(len(frame)), np.maximum(index, 0)], 0.0)

    def dose_density(self, frame: pd.DataFrame, formulation: np.ndarray, dose: np.ndarray) -> np.ndarray:
        """Log-normal density of ``dose`` (per mg/m²) given the patient and the formulation."""
        with_f = frame[list(NUMERIC) + list(CATEGORICAL)].assign(formulation_id=np.asarray(formulation, dtype=str))
        dose = np.asarray(dose, dtype=float)
        given = dose > 0
        z = (np.log(np.where(given, dose, 1.0)) - self.dose_model_.predict(with_f)) / self.dose_sd_
        return np.where(given, np.exp(-0.5 * z * z) / (np.sqrt(2 * np.pi) * self.dose_sd_ * np.where(given, dose, 1.0)),
                        0.0)


def first_cycles(episodes: pd.DataFrame) -> pd.DataFrame:
    """The logged first cycles whose three outcomes are recorded."""
    first = episodes[episodes["cycle"].astype(int) == 1]
    return first.dropna(subset=list(OUTCOMES)).reset_index(drop=True)


def as_records(cycles: pd.DataFrame, catalogue: tuple[str, ...]) -> pd.DataFrame:
    """Logged first cycles in the flat form of patient records the policy decides on (no history yet)."""
    frame = cycles[list(RECORD_COLUMNS)].copy()
    frame["catalogue"] = [catalogue] * len(frame)
    for name in PreviousCycle.model_fields:
        frame[PREVIOUS_PREFIX + name] = np.nan
    for name in WearableSummary.model_fields:
        frame[WEARABLE_PREFIX + name] = np.nan
    return frame


def standard_of_care(policy: DosingPolicy, cycles: pd.DataFrame, records: pd.DataFrame,
                     logged: pd.DataFrame) -> pd.DataFrame:
    """The site's standard of care for each record (module docstring), under the policy's safety rules: what a
    site whose logs find the policy worse serves instead (:mod:`client.site_gate`, the same code)."""
    return label_actions(policy, records, UsualFormulations.of(logged).for_records(records["tumour_type"]))


def dr_gamma(policy: DosingPolicy, logging: LoggingPolicy, records: pd.DataFrame, logged: pd.DataFrame,
             reward: np.ndarray, target: pd.DataFrame, decisions: pd.DataFrame | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Γ of ``target`` (the policy's or standard of care's actions) on the logged cycles, and whether each
    target action is within the logs' support (``shared.off_policy.MIN_SUPPORT``).

    Where the site's decision log (``decisions``, :mod:`client.decision_log`) holds the cycle's decision and
    the action given was one of its options, the propensity and the support are its exact probabilities;
    elsewhere the fitted model of the site's habits (``logging``) gives them."""
    gives = (target["action"].to_numpy() == "give") & target["formulation_id"].notna().to_numpy()
    cumulative = records["cumulative_dose_mg_m2"].to_numpy(dtype=float)

    def q(actions: pd.DataFrame) -> np.ndarray:
        p = policy.predicted_outcomes(records, actions)
        return utility(p[RESPONSE], p[TOXICITY], chf_cycle_probability(cumulative, actions["dose_mg_m2"]))

    q_logged = q(logged)
    safe_target = target.assign(formulation_id=target["formulation_id"].fillna(logged["formulation_id"]),
                                dose_mg_m2=np.where(gives, target["dose_mg_m2"], logged["dose_mg_m2"]))
    q_target = q(safe_target)
    width = policy.action_space.dose_step_mg_m2
    logged_f, target_f = logged["formulation_id"].astype(str).to_numpy(), safe_target["formulation_id"].astype(str)
    logged_dose = logged["dose_mg_m2"].to_numpy(dtype=float)
    target_dose = safe_target["dose_mg_m2"].to_numpy(dtype=float)
    same = logged_f == target_f.to_numpy()
    kernel = box_kernel(logged_dose, target_dose, width)
    exact = logged_probability(decisions, records, logged_f, logged_dose, width)
    exact = np.where(exact > 0, exact, np.nan)  # a given action the log did not offer: the model's propensity
    modelled = logging.formulation_probability(records, logged_f) * logging.dose_density(records, logged_f, logged_dose)
    propensity = np.where(np.isnan(exact), modelled, exact / width)
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = np.where(same & (propensity > 0), kernel / propensity, 0.0)
    target_f = target_f.to_numpy()
    support = (logging.formulation_probability(records, target_f)
               * logging.dose_density(records, target_f, target_dose) * width)
    support = np.where(np.isnan(exact), support, logged_probability(decisions, records, target_f, target_dose, width))
    return dr_terms(q_target, q_logged, reward, weight, gives), (support >= MIN_SUPPORT) | ~gives


def site_value_sums(policy: DosingPolicy, episodes: pd.DataFrame, task, split_seed: int,
                    decisions: pd.DataFrame | None = None) -> ValueSums:
    """The site's doubly-robust sums for the candidate ``policy`` and its standard of care (module docstring);
    ``decisions``: the site's decision log (exact probabilities where it has them, :func:`dr_gamma`)."""
    all_first = first_cycles(episodes)
    if int((all_first["dose_mg_m2"].to_numpy(dtype=float) > 0).sum()) < 2:  # nothing to learn the habits from
        return ValueSums(0.0, 0.0, 0.0, 0.0, 0.0)
    held_out = assign_split(episodes, task, split_seed)
    keep_ids = set(episodes.loc[held_out != "train", "episode_id"].astype(str))
    cycles = all_first[all_first["episode_id"].astype(str).isin(keep_ids)].reset_index(drop=True)
    if cycles.empty:
        return ValueSums(0.0, 0.0, 0.0, 0.0, 0.0)
    logging = LoggingPolicy().fit(habits(all_first, decisions))
    catalogue = tuple(sorted(set(all_first["formulation_id"].astype(str)) & set(policy.formulations)))
    practice = own_practice(all_first, decisions)
    # each record carries the site's usual formulation: a policy relative to standard of care measures against
    # this site's (as the site serves it: client.site_gate.GatedPolicy)
    records = UsualFormulations.of(practice).annotate(as_records(cycles, catalogue))
    logged = pd.DataFrame({"formulation_id": cycles["formulation_id"].astype(str),
                           "dose_mg_m2": cycles["dose_mg_m2"].astype(float),
                           "interval_days": cycles["interval_days"].astype(float)})
    reward = utility(cycles["response"], cycles["toxicity_grade3"], cycles["chf"])
    chosen = policy.recommend_frame(records, adjust=False)
    candidate, supported = dr_gamma(policy, logging, records, logged, reward, chosen, decisions)
    soc = standard_of_care(policy, cycles, records, practice)
    standard, _ = dr_gamma(policy, logging, records, logged, reward, soc, decisions)
    off_support = off_support_credit(policy, records, chosen, soc, candidate - standard)
    return ValueSums.of(np.where(supported, candidate, standard + off_support), standard)


def off_support_credit(policy, records: pd.DataFrame, chosen: pd.DataFrame, soc: pd.DataFrame,
                       difference: np.ndarray) -> np.ndarray:
    """What a cycle whose candidate action is off the logs' support adds to standard of care's Γ: the models'
    lower 95 % confidence bound on the candidate's improvement over standard of care for that patient, never
    more than the plain doubly-robust difference (``difference``) — pessimism where the data cannot judge
    (Jin, Yang & Wang, ICML 2021) instead of no credit, which is optimistic for a candidate worse than standard
    of care off the support and blind to one better. A policy without confidence bounds on its models (the
    ensemble) gets no credit (0); so does a row the bound cannot be computed for."""
    bound = getattr(policy, "improvement_lower_bound", None)
    if bound is None:
        return np.zeros(len(records))
    gives = (chosen["action"].to_numpy() == "give") & chosen["formulation_id"].notna().to_numpy()
    actions = chosen.assign(formulation_id=chosen["formulation_id"].where(gives, soc["formulation_id"]),
                            dose_mg_m2=np.where(gives, chosen["dose_mg_m2"], soc["dose_mg_m2"]))
    lower = bound(records, actions, soc, Z_95)
    return np.where(gives & np.isfinite(lower), np.minimum(np.nan_to_num(lower), difference), 0.0)


def habits(first: pd.DataFrame, decisions: pd.DataFrame | None) -> pd.DataFrame:
    """The first cycles the logging model learns the site's unlogged habits from: those without a logged
    decision or given otherwise than it offered (exact probabilities replace the model elsewhere), or all of
    them when fewer than 2 are left."""
    if decisions is None or decisions.empty:
        return first
    logged = logged_probability(decisions, first, first["formulation_id"].astype(str).to_numpy(),
                                first["dose_mg_m2"].to_numpy(dtype=float), 1.0)
    unlogged = first[~(logged > 0)]  # no decision logged, or the action given was none of its options
    return unlogged if int((unlogged["dose_mg_m2"].to_numpy(dtype=float) > 0).sum()) >= 2 else first


def private_value_sums(sums: ValueSums, release: PhaseRelease, index: int) -> tuple[ValueSums, ReleaseFacts]:
    """The sums through the site's ``policy`` release: one Gaussian mechanism on the five bounded sums."""
    blocks = {k: Block(v, ValueSums.BOUNDS[k], 1) for k, v in sums.arrays().items()}
    noised, facts = release.release(blocks, index)
    values = {k: float(v[0]) for k, v in noised.items()}
    values["n"] = max(values["n"], 0.0)
    values["difference_sq"] = max(values["difference_sq"], 0.0)
    return ValueSums(**values, noise_sd=facts.noise_sd), facts
