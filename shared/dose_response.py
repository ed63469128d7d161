"""Outcome models made for dose decisions, fitted by Newton–Raphson on per-site sums: what they share.

The models (:mod:`shared.tumour_response`, :mod:`shared.toxicity_model`) are penalised likelihoods whose fit
needs only sums over a site's episodes. At the current coefficients θ a site computes, over its rows i,

    gradient  g = Σ_i ∂ℓ_i/∂θ,     hessian  H = Σ_i −∂²ℓ_i/∂θ∂θᵀ  (the information; Gauss–Newton where η is
    nonlinear in θ),     loglik  L = Σ_i max(ℓ_i, LOGLIK_FLOOR),     n = number of rows,

and the coordinator adds the sites' sums and takes one penalised Newton–Raphson step (:class:`NewtonRaphson`):

    θ ← θ + (H + Λ)⁻¹ (g − Λ(θ − m))                                           (Nocedal & Wright 2006, §3.3)

with Λ = diag(precision) and m the prior mean (ridge / Gaussian random effects: Hoerl & Kennard 1970; the
penalised quasi-likelihood of Breslow & Clayton, JASA 1993;88:9). Because the sums of several sites are the
sums of their union, the federated fit *is* the pooled fit (to rounding): ``model.fit(frame)`` runs the same
loop with one site. The approach is that of distributed GLM fitting by summed score and information (Karr,
Lin, Sanil & Reiter, JCGS 2005;14:254 for regression; Wu, Jiang, Kim & Ohno-Machado, JAMIA 2012;19:758,
"Grid Binary LOgistic REgression (GLORE)", for logistic regression by Newton–Raphson on summed site
matrices). The inverse of the penalised information at the optimum is the coefficients' covariance, so every
prediction carries a standard error (delta method; Bishop 2006, §4.5 for the logistic case).

**Formulation effects borrow strength from the formulation's properties.** A formulation's effect is
``γ·p_f + u_f``: a regression on its standardised properties ``p_f`` (:data:`PROPERTY_TERMS`) plus its own
deviation ``u_f ~ N(0, 1/λ_form)`` — a random effect shrunk toward the property regression, in the manner of
the Bayesian hierarchical models of exchangeable effects with a covariate-driven mean (Gelman & Hill 2007,
§12.6 "group-level predictors"). A rarely used formulation is then predicted mostly from its properties; a
formulation nobody logged (not in ``formulations``) from its properties alone.

**Bounded rows, for differential privacy.** Every design value is clipped to a declared range (the site-data
contract of :mod:`shared.schema`, tighter where a log needs it, named below), so one row changes each sum by
a bounded amount; :meth:`DoseResponseModel.sum_bounds` states those bounds as :class:`SumBound` (a per-entry
``scale`` and the number of entries one row can ``touch``) for ``client.dp.Block``. Where the bound depends
on the coefficients (the Emax term, the ordinal thresholds) it is evaluated at the coefficients the
coordinator sent, which are public.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy.special import expit

from shared.dosing_policy import LABEL_INTERVAL_DAYS
from shared.schema import TUMOUR_TYPES

LOGLIK_FLOOR = -30.0
"""A row's log-likelihood enters the summed ``loglik`` at least at this value (probability e⁻³⁰ ≈ 1e-13): it
bounds the sum for DP and never binds at sensible coefficients; gradient and Hessian are exact."""

DOSE_REFERENCE_MG_M2 = 40.0
"""Log dose is ``log(dose / 40)``: 40 mg/m² is the middle of the label doses of liposomal doxorubicin
(20–50 mg/m², Doxil/Caelyx SmPC)."""
DOSE_RANGE_MG_M2 = (5.0, 150.0)
"""Doses are clipped to this range before the log: the schema allows 0–150 mg/m², and a first cycle below
5 mg/m² is no treatment."""
LOG_DOSE_RANGE = (math.log(DOSE_RANGE_MG_M2[0] / DOSE_REFERENCE_MG_M2),
                  math.log(DOSE_RANGE_MG_M2[1] / DOSE_REFERENCE_MG_M2))

MAX_HALVINGS = 40
"""Step halvings before the Newton–Raphson loop stops at its best point (a step that does not improve the
penalised objective is halved towards the best point so far)."""


# ---------------------------------------------------------------------------------------------------------
# Design columns: patient covariates, formulation properties and dose, each clipped to a declared range


@dataclass(frozen=True)
class Term:
    """One design column computed from an episode frame, with the largest ``|value|`` any row can give.

    ``compute(frame) -> array`` clips to declared ranges and fills missing values, so ``|value| ≤ bound`` holds
    for every row the schema lets through (tests/test_dose_response.py checks it at the schema's extremes)."""

    name: str
    compute: Callable[[pd.DataFrame], np.ndarray]
    bound: float
    description: str


def _numbers(frame: pd.DataFrame, column: str) -> np.ndarray:
    return pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)


def _log_ratio(column: str, reference: float, low: float, high: float) -> Callable[[pd.DataFrame], np.ndarray]:
    """log(clip(x, low, high) / reference); missing → 0 (the reference value)."""

    def compute(frame: pd.DataFrame) -> np.ndarray:
        x = _numbers(frame, column)
        return np.where(np.isnan(x), 0.0, np.log(np.clip(x, low, high) / reference))

    return compute


def _missing(column: str) -> Callable[[pd.DataFrame], np.ndarray]:
    return lambda frame: np.isnan(_numbers(frame, column)).astype(float)


def _age_decades(frame: pd.DataFrame) -> np.ndarray:
    return (np.clip(_numbers(frame, "age_years"), 18.0, 110.0) - 60.0) / 10.0


def _age_over_60_decades(frame: pd.DataFrame) -> np.ndarray:
    return np.maximum(np.clip(_numbers(frame, "age_years"), 18.0, 110.0) - 60.0, 0.0) / 10.0


def _female(frame: pd.DataFrame) -> np.ndarray:
    return (frame["sex"].astype(str).to_numpy() == "F").astype(float)


def _ecog(frame: pd.DataFrame) -> np.ndarray:
    return np.clip(_numbers(frame, "ecog"), 0.0, 4.0)


def _log_bilirubin_excess(frame: pd.DataFrame) -> np.ndarray:
    """log(max(bilirubin, 17) / 17): 0 within the normal range (upper limit ~17 µmol/L), rising with
    cholestasis, which slows doxorubicin's hepatic clearance (Benjamin et al., Cancer 1974;33:19)."""
    x = _numbers(frame, "bilirubin_umol_l")
    return np.where(np.isnan(x), 0.0, np.log(np.clip(x, 17.0, 600.0) / 17.0))


def _delay_weeks(frame: pd.DataFrame) -> np.ndarray:
    """Weeks of delay beyond the label interval of the tumour type (0 on schedule)."""
    label = frame["tumour_type"].map(LABEL_INTERVAL_DAYS).to_numpy(dtype=float)
    interval = np.clip(_numbers(frame, "interval_days"), 7.0, 42.0)
    return np.clip(np.nan_to_num((interval - label) / 7.0), -3.0, 3.0)


def _tumour(t: str) -> Callable[[pd.DataFrame], np.ndarray]:
    return lambda frame: (frame["tumour_type"].astype(str).to_numpy() == t).astype(float)


PATIENT_TERMS: dict[str, Term] = {term.name: term for term in (
    Term("age_decades", _age_decades, 5.0, "(age − 60) / 10, age clipped to 18–110 years"),
    Term("age_over_60_decades", _age_over_60_decades, 5.0, "max(age − 60, 0) / 10"),
    Term("female", _female, 1.0, "1 for sex F"),
    Term("ecog", _ecog, 4.0, "ECOG performance status 0–4"),
    Term("log_tumour_burden", _log_ratio("tumour_burden_mm", 60.0, 5.0, 500.0), math.log(60.0 / 5.0),
         "log(burden / 60 mm), burden clipped to the schema's 5–500 mm; missing → 0"),
    Term("tumour_burden_missing", _missing("tumour_burden_mm"), 1.0, "1 when the burden is not recorded"),
    Term("log_bilirubin_excess", _log_bilirubin_excess, math.log(600.0 / 17.0),
         "log(max(bilirubin, 17) / 17 µmol/L), bilirubin clipped to the schema's ≤ 600; missing → 0"),
    Term("bilirubin_missing", _missing("bilirubin_umol_l"), 1.0, "1 when bilirubin is not measured"),
    Term("log_anc", _log_ratio("anc_baseline_e9_l", 4.2, 0.3, 20.0), math.log(4.2 / 0.3),
         "log(ANC / 4.2 × 10⁹/L), ANC clipped to 0.3–20 (below 0.3 is grade 4 already); missing → 0"),
    Term("anc_missing", _missing("anc_baseline_e9_l"), 1.0, "1 when the ANC is not measured"),
    Term("delay_weeks", _delay_weeks, 3.0, "weeks beyond the tumour type's label interval, clipped to ±3"),
    *(Term(f"tumour_{t}", _tumour(t), 1.0, f"1 for tumour type {t} (reference: {TUMOUR_TYPES[0]})")
      for t in TUMOUR_TYPES[1:]),
)}
"""Patient terms a model may use (by name). Nothing here is fitted: the transforms and ranges are public."""


def _log_size(frame: pd.DataFrame) -> np.ndarray:
    return np.log(np.clip(_numbers(frame, "particle_size_nm"), 1.0, 1000.0) / 100.0)


def _encapsulation(frame: pd.DataFrame) -> np.ndarray:
    return (np.clip(_numbers(frame, "encapsulation_pct"), 0.0, 100.0) - 85.0) / 10.0


def _pegylated(frame: pd.DataFrame) -> np.ndarray:
    return np.clip(_numbers(frame, "pegylated"), 0.0, 1.0)


def _log_release_time(frame: pd.DataFrame) -> np.ndarray:
    return np.log(np.clip(_numbers(frame, "release_tau_h"), 0.01, 5000.0) / 12.0) / 2.0


PROPERTY_TERMS: tuple[Term, ...] = (
    Term("log_size", _log_size, math.log(100.0), "log(size / 100 nm): the EPR window near 100 nm (Perrault et "
         "al., Nano Lett 2009;9:1909) and splenic clearance above ~200 nm (Moghimi et al., Pharmacol Rev 2001)"),
    Term("encapsulation", _encapsulation, 8.5, "(EE − 85 %) / 10: unencapsulated drug is free drug"),
    Term("pegylated", _pegylated, 1.0, "PEG prolongs circulation (Gabizon et al., Cancer Res 1994;54:987)"),
    Term("log_release_time", _log_release_time, math.log(12.0 / 0.01) / 2.0,
         "log(Weibull τ / 12 h) / 2: how fast the carrier releases its drug"),
)
"""The formulation properties the formulation effects are shrunk towards (a deliberately small model: 4
properties against the dozen formulations a federation logs; 8 over-fitted in the prototype experiments)."""


def property_bounds() -> tuple[np.ndarray, np.ndarray]:
    """Per property term, the smallest and largest value any row can give."""
    probe = pd.DataFrame({"particle_size_nm": [1.0, 1000.0], "encapsulation_pct": [0.0, 100.0],
                          "pegylated": [0.0, 1.0], "release_tau_h": [0.01, 5000.0]})
    values = np.column_stack([term.compute(probe) for term in PROPERTY_TERMS])
    return values.min(axis=0), values.max(axis=0)


def log_dose(frame: pd.DataFrame) -> np.ndarray:
    """log(dose / 40 mg/m²), the dose clipped to :data:`DOSE_RANGE_MG_M2`."""
    return np.log(np.clip(_numbers(frame, "dose_mg_m2"), *DOSE_RANGE_MG_M2) / DOSE_REFERENCE_MG_M2)


def design(frame: pd.DataFrame, terms: Sequence[Term]) -> np.ndarray:
    """The (rows, terms) matrix of ``terms`` on ``frame``."""
    if not terms:
        return np.zeros((len(frame), 0))
    return np.column_stack([term.compute(frame) for term in terms]).astype(float)


def formulation_index(frame: pd.DataFrame, formulations: Sequence[str]) -> np.ndarray:
    """Position of each row's formulation in ``formulations``; −1 for a formulation not in it."""
    position = {f: i for i, f in enumerate(formulations)}
    return np.array([position.get(str(f), -1) for f in frame["formulation_id"]], dtype=int)


def formulation_properties(formulations: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """The catalogue (id → property columns of the schema) as a frame indexed by id."""
    return pd.DataFrame.from_dict({str(k): dict(v) for k, v in formulations.items()}, orient="index")


# ---------------------------------------------------------------------------------------------------------
# Sums, their bounds, and the Newton–Raphson loop on them


@dataclass(frozen=True)
class SumBound:
    """How much one row can change a released sum: ``|Δ entry| ≤ scale`` (per entry, broadcast), and at most
    ``touched`` entries change (upper triangle only when ``symmetric``). This is ``client.dp.Block``'s
    ``scale`` / ``touched`` / ``symmetric``."""

    scale: np.ndarray | float
    touched: int
    symmetric: bool = False


class Probability(NamedTuple):
    """A predicted probability per row with its lower and upper confidence bounds."""

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def add_sums(parts: Sequence[Mapping[str, np.ndarray | float]]) -> dict[str, np.ndarray | float]:
    """The sums of several sites: every key added entry by entry (the pooled sums, to rounding)."""
    if not parts:
        raise ValueError("no site sums to add")
    return {key: sum((np.asarray(p[key], dtype=float) for p in parts[1:]), np.asarray(parts[0][key], dtype=float))
            for key in parts[0]}


def information_sums(jacobian_a: np.ndarray, jacobian_b: np.ndarray, w_aa: np.ndarray, w_bb: np.ndarray,
                     w_ab: np.ndarray) -> np.ndarray:
    """Σ_i [a_i b_i] W_i [a_i b_i]ᵀ for per-row 2 × 2 weights ``W_i = [[w_aa, w_ab], [w_ab, w_bb]]`` and rows
    ``a_i`` / ``b_i`` of the two Jacobians (a binary model passes zeros for ``b``)."""
    h = (jacobian_a * w_aa[:, None]).T @ jacobian_a + (jacobian_b * w_bb[:, None]).T @ jacobian_b
    cross = (jacobian_a * w_ab[:, None]).T @ jacobian_b
    return h + cross + cross.T


@dataclass
class NewtonRaphson:
    """Penalised Newton–Raphson on summed sums, one step per round of site sums, with step halving.

    Drive it with the sums at the coefficients it asks for::

        solver = NewtonRaphson.for_model(model)
        coef = solver.start
        while coef is not None:
            coef = solver.update(coef, add_sums([model.site_sums(frame, coef) for frame in site_frames]))
        model.adopt(solver)

    Each update evaluates the penalised objective ``Q(θ) = −L + ½ Σ λ_j (θ_j − m_j)²`` at the coefficients it
    was given: if Q is worse than at the best point so far, the step is halved towards the best point;
    otherwise the point is accepted and the next Newton point returned. It stops (returns None) when the
    Newton decrement ``gᵀ(H + Λ)⁻¹g`` (Boyd & Vandenberghe 2004, §9.5.1) falls below ``tol`` or after
    ``max_iter`` accepted points.
    """

    start: np.ndarray
    precision: np.ndarray
    prior_mean: np.ndarray
    valid: Callable[[np.ndarray], bool] = lambda coef: True
    max_iter: int = 100
    tol: float = 1e-10
    best_coef: np.ndarray | None = None
    best_objective: float = math.inf
    best_sums: dict | None = None
    iterations: int = 0
    halvings: int = 0
    converged: bool = False
    history: list[float] = field(default_factory=list)

    @classmethod
    def for_model(cls, model: DoseResponseModel) -> NewtonRaphson:
        precision, mean = model.penalty()
        return cls(start=model.start(), precision=precision, prior_mean=mean, valid=model.valid_coefficients,
                   max_iter=model.max_iter, tol=model.tol)

    def objective(self, coef: np.ndarray, sums: Mapping) -> float:
        return float(-sums["loglik"] + 0.5 * np.sum(self.precision * (coef - self.prior_mean) ** 2))

    def update(self, coef: np.ndarray, sums: Mapping) -> np.ndarray | None:
        """The next coefficients to evaluate, or None when done (the result is ``best_coef``)."""
        coef = np.asarray(coef, dtype=float)
        q = self.objective(coef, sums)
        if self.best_coef is not None and not q <= self.best_objective + 1e-12 * abs(self.best_objective):
            self.halvings += 1
            if self.halvings > MAX_HALVINGS:
                return None
            return self.best_coef + 0.5 * (coef - self.best_coef)
        self.best_coef, self.best_objective, self.best_sums = coef, q, dict(sums)
        self.halvings, self.iterations = 0, self.iterations + 1
        self.history.append(q)
        gradient = -np.asarray(sums["gradient"]) + self.precision * (coef - self.prior_mean)
        step = np.linalg.solve(self.penalised_information(), gradient)
        if float(gradient @ step) < self.tol:
            self.converged = True
            return None
        if self.iterations >= self.max_iter:
            return None
        proposal = coef - step
        while not self.valid(proposal):
            step = step / 2.0
            proposal = coef - step
        return proposal

    def penalised_information(self) -> np.ndarray:
        """``H + Λ`` at the best point (its inverse is the coefficients' covariance)."""
        if self.best_sums is None:
            raise ValueError("no sums evaluated yet")
        return np.asarray(self.best_sums["hessian"], dtype=float) + np.diag(self.precision)


class DoseResponseModel:
    """What every outcome model here offers (scikit-learn style: hyper-parameters in ``__init__``, learned
    state in ``coef_``, ``covariance_``, ``n_iter_``, ``converged_``, ``loglik_``, ``n_``).

    Subclasses define the parameters (:meth:`parameter_names`, :meth:`start`, :meth:`penalty`), the sums
    (:meth:`site_sums`, :meth:`sum_bounds`) and :meth:`logit_and_gradient` — the logit of the predicted
    probability and its gradient in the coefficients, from which :meth:`predict` and
    :meth:`predict_proba` follow."""

    max_iter: int = 100
    tol: float = 1e-10

    # ---- to be defined by a model ----------------------------------------------------------------------
    def parameter_names(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> np.ndarray:
        raise NotImplementedError

    def penalty(self) -> tuple[np.ndarray, np.ndarray]:
        """Prior precision and prior mean per coefficient."""
        raise NotImplementedError

    def site_sums(self, frame: pd.DataFrame, coef: np.ndarray) -> dict[str, np.ndarray | float]:
        raise NotImplementedError

    def sum_bounds(self, coef: np.ndarray) -> dict[str, SumBound]:
        raise NotImplementedError

    def logit_and_gradient(self, frame: pd.DataFrame, coef: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def valid_coefficients(self, coef: np.ndarray) -> bool:
        return bool(np.all(np.isfinite(coef)))

    # ---- fitting ----------------------------------------------------------------------------------------
    def fit(self, frame: pd.DataFrame) -> DoseResponseModel:
        """Fit on one frame: the federated loop with a single site (:class:`NewtonRaphson`)."""
        solver = NewtonRaphson.for_model(self)
        coef = solver.start
        while coef is not None:
            coef = solver.update(coef, self.site_sums(frame, coef))
        return self.adopt(solver)

    def adopt(self, solver: NewtonRaphson) -> DoseResponseModel:
        """Take the solver's best point as the fit; the covariance is the inverse penalised information."""
        if solver.best_coef is None:
            raise ValueError("the solver has evaluated no coefficients")
        self.coef_ = solver.best_coef.copy()
        self.covariance_ = np.linalg.inv(solver.penalised_information())
        self.covariance_ = (self.covariance_ + self.covariance_.T) / 2.0
        self.n_iter_, self.converged_ = solver.iterations, solver.converged
        self.loglik_ = float(solver.best_sums["loglik"])
        self.n_ = int(round(float(solver.best_sums["n"])))
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise ValueError(f"{type(self).__name__} is not fitted: call fit() or adopt() first")

    # ---- predicting -------------------------------------------------------------------------------------
    def predict(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """Per row: the logit of the predicted probability and its standard error (delta method,
        ``se² = ∇ᵀ Σ ∇`` with Σ = ``covariance_``)."""
        self._check_fitted()
        logit, gradient = self.logit_and_gradient(frame, self.coef_)
        se = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", gradient, self.covariance_, gradient), 0.0))
        return {"logit": logit, "se": se}

    def predict_proba(self, frame: pd.DataFrame, z: float = 0.0) -> Probability:
        """The probability per row and its bounds ``expit(logit ∓ z·se)`` (a Wald interval on the logit scale,
        kept inside (0, 1))."""
        p = self.predict(frame)
        return Probability(expit(p["logit"]), expit(p["logit"] - z * p["se"]), expit(p["logit"] + z * p["se"]))

    def probability_gradient(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """The probability per row and its gradient in the coefficients (for delta-method contrasts)."""
        self._check_fitted()
        logit, gradient = self.logit_and_gradient(frame, self.coef_)
        p = expit(logit)
        return p, (p * (1.0 - p))[:, None] * gradient

    # ---- storing ----------------------------------------------------------------------------------------
    def fitted_dict(self) -> dict:
        self._check_fitted()
        return {"coef": self.coef_.tolist(), "covariance": self.covariance_.tolist(), "n_iter": self.n_iter_,
                "converged": self.converged_, "loglik": self.loglik_, "n": self.n_,
                "parameters": self.parameter_names()}

    def restore_fitted(self, values: Mapping) -> DoseResponseModel:
        names = list(values["parameters"])
        if names != self.parameter_names():
            raise ValueError(f"{type(self).__name__}: stored parameters {names} do not match the model's "
                             f"{self.parameter_names()}")
        self.coef_ = np.asarray(values["coef"], dtype=float)
        self.covariance_ = np.asarray(values["covariance"], dtype=float)
        self.n_iter_, self.converged_ = int(values["n_iter"]), bool(values["converged"])
        self.loglik_, self.n_ = float(values["loglik"]), int(values["n"])
        return self


def fit_by_sums(model: DoseResponseModel, frames: Sequence[pd.DataFrame]) -> DoseResponseModel:
    """Fit ``model`` from the added sums of several sites' frames (what the coordinator does, without the
    messaging): equal to ``model.fit(pd.concat(frames))`` to rounding."""
    solver = NewtonRaphson.for_model(model)
    coef = solver.start
    while coef is not None:
        coef = solver.update(coef, add_sums([model.site_sums(frame, coef) for frame in frames]))
    return model.adopt(solver)


def first_cycles(frame: pd.DataFrame) -> pd.DataFrame:
    """The first-cycle episodes (``cycle == 1``): the rows the dose-decision models learn from.

    Later cycles are not a random sample of anything a first-cycle policy decides: patients whose tumour
    progressed have left (RECIST), and doses were reduced or delayed *because* of the toxicity the patient's own
    sensitivity caused, so dose and outcome are confounded by what the covariates do not record. Measured on
    the default world and 3 more seeds (prototype of these models, value / oracle): first cycles 0.714,
    all cycles 0.664, all cycles with the previous cycle's outcomes as covariates 0.493."""
    cycle = pd.to_numeric(frame["cycle"], errors="coerce") if "cycle" in frame else pd.Series(1, index=frame.index)
    return frame[(cycle == 1).to_numpy()]
