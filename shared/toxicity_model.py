"""Dose–toxicity models for dose decisions: grade ≥ 3 neutropenia, and the other grade ≥ 3 toxicities.

One logistic regression (Cox, JRSS B 1958;20:215) per toxicity, on a site's first-cycle episodes
(:func:`shared.dose_response.first_cycles`), fitted by Newton–Raphson on per-site sums
(:mod:`shared.dose_response`):

    logit P(toxicity) = β₀ + β·x + b·log(dose / 40) + γ·p_f + u_f,        u_f ~ N(0, 1/λ_form)

- ``x``: host covariates (:data:`TOXICITY_COVARIATES`: age with a slope change at 60, sex, ECOG, bilirubin
  above normal, baseline ANC, delay beyond the label interval) — toxicity is a property of the host and the
  exposure, so there is no tumour-type term (measured: none 0.841, with tumour type 0.834 value / oracle);
- one slope ``b`` in log dose for every formulation: parallel dose–toxicity curves on the logit scale, shifted
  by the formulation's potency ``γ·p_f + u_f`` — the exposure a dose gives differs by carrier, the host's
  tolerance of exposure does not (a tolerance distribution in log exposure, Finney, *Probit Analysis* 1971).
  Toxicity then rises monotonically with dose whenever ``b > 0``, and a formulation logged at few doses borrows
  the slope of all of them. A quadratic in log dose or per-formulation slopes did no better (prototype experiments) and
  can bend a fitted toxicity curve downwards at the doses the policy would extrapolate to.

Two outcomes (:class:`NeutropeniaModel`, :class:`OtherToxicityModel`): the site's toxicity column is "any grade
≥ 3", but the ANC nadir says which part is neutropenia (CTCAE v5: nadir < 1.0 × 10⁹/L), whose exposure–response
(free drug; Friberg et al., J Clin Oncol 2002;20:4713) differs from hand-foot syndrome's (circulating carrier;
Lyass et al., Cancer 2000;89:1037) and infusion reactions' (surface charge; Szebeni, Mol Immunol 2014;61:163).
The other toxicities are modelled on the episodes without grade ≥ 3 neutropenia, and the two combine as
independent risks: ``P(any) = 1 − (1 − P(neutropenia))(1 − P(other))`` (:func:`any_toxicity`).

Per-row bounds (what :meth:`ToxicityModel.sum_bounds` states): every design value ``|x_j| ≤ B_j``; the score
``(y − p) x_j`` is bounded by ``B_j``, the information ``p(1 − p) x_j x_k`` by ``B_j B_k / 4``, the log-likelihood
by ``|LOGLIK_FLOOR|``, the count by 1; one row touches one formulation column only.

Example
-------
>>> model = NeutropeniaModel(formulations).fit(site.episodes)          # doctest: +SKIP
>>> model.predict_proba(candidates, z=1.0).high                        # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.special import expit, log_expit

from shared.dose_response import (
    LOG_DOSE_RANGE,
    LOGLIK_FLOOR,
    PATIENT_TERMS,
    PROPERTY_TERMS,
    DoseResponseModel,
    Probability,
    SumBound,
    design,
    first_cycles,
    formulation_index,
    log_dose,
    property_bounds,
)

TOXICITY_COVARIATES = ("age_decades", "age_over_60_decades", "female", "ecog", "log_bilirubin_excess",
                       "bilirubin_missing", "log_anc", "anc_missing", "delay_weeks")
"""Host covariates of the toxicity models (names of :data:`shared.dose_response.PATIENT_TERMS`): marrow
tolerance falls with age and frailty (Friberg 2002's covariate analyses), women clear doxorubicin more slowly
(Dobbs et al., Cancer Chemother Pharmacol 1998;42:233), cholestasis slows its hepatic clearance (Benjamin et al.,
Cancer 1974;33:19), and a lower baseline ANC needs a smaller fall to reach grade 3."""

GRADE3_NADIR_E9_L = 1.0
"""Grade ≥ 3 neutropenia: ANC below 1.0 × 10⁹/L (CTCAE v5.0)."""


class ToxicityModel(DoseResponseModel):
    """Logistic dose–toxicity model (module docstring) on the rows and target a subclass defines.

    Parameters
    ----------
    formulations : mapping of id → {schema property column: value}
        The federation's catalogue: each gets its own effect ``u_f``; others are predicted from their
        properties (read from the frame's property columns).
    covariates : sequence of str, default :data:`TOXICITY_COVARIATES`
        Host terms (names in :data:`shared.dose_response.PATIENT_TERMS`).
    formulation_precision : float, default 4.0
        Prior precision of ``u_f`` (sd 0.5 on the logit scale): how strongly a formulation's effect is shrunk
        toward its property regression.
    property_precision : float, default 10.0
        Prior precision of the property coefficients ``γ`` (shrunk toward 0: few formulations inform them).
    covariate_precision : float, default 0.01
        Prior precision of the host covariates (nearly flat).
    max_iter, tol
        Newton–Raphson limits (accepted steps; Newton decrement).
    """

    outcome = "toxicity"

    def __init__(self, formulations: Mapping[str, Mapping[str, float]], covariates: Sequence[str] = TOXICITY_COVARIATES,
                 formulation_precision: float = 4.0, property_precision: float = 10.0,
                 covariate_precision: float = 1e-2, max_iter: int = 100, tol: float = 1e-10):
        self.formulations = formulations
        self.covariates = covariates
        self.formulation_precision = formulation_precision
        self.property_precision = property_precision
        self.covariate_precision = covariate_precision
        self.max_iter = max_iter
        self.tol = tol

    # ---- the rows and the target (subclasses) --------------------------------------------------------------
    def rows_and_target(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
        raise NotImplementedError

    # ---- parameters ---------------------------------------------------------------------------------------
    def _ids(self) -> list[str]:
        return sorted(str(f) for f in self.formulations)

    def _terms(self):
        unknown = sorted(set(self.covariates) - set(PATIENT_TERMS))
        if unknown:
            raise ValueError(f"covariates: unknown term(s) {unknown}; expected names of PATIENT_TERMS")
        return [PATIENT_TERMS[name] for name in self.covariates]

    def parameter_names(self) -> list[str]:
        return (["intercept", *self.covariates, "log_dose", *(f"property:{t.name}" for t in PROPERTY_TERMS),
                 *(f"formulation:{f}" for f in self._ids())])

    def start(self) -> np.ndarray:
        return np.zeros(len(self.parameter_names()))

    def penalty(self) -> tuple[np.ndarray, np.ndarray]:
        c, g, f = len(self.covariates), len(PROPERTY_TERMS), len(self._ids())
        precision = np.concatenate([[1e-4], np.full(c, self.covariate_precision), [1e-4],
                                    np.full(g, self.property_precision), np.full(f, self.formulation_precision)])
        return precision, np.zeros_like(precision)

    def design_matrix(self, frame: pd.DataFrame) -> np.ndarray:
        """``[1, x, log dose, p_f, one-hot(f)]`` per row (values clipped to their declared ranges)."""
        ids = self._ids()
        onehot = np.zeros((len(frame), len(ids)))
        index = formulation_index(frame, ids)
        known = index >= 0
        onehot[np.flatnonzero(known), index[known]] = 1.0
        return np.column_stack([np.ones(len(frame)), design(frame, self._terms()), log_dose(frame),
                                design(frame, PROPERTY_TERMS), onehot])

    def row_bound(self) -> np.ndarray:
        """Largest ``|value|`` of each design column over every row the schema allows."""
        low, high = property_bounds()
        return np.concatenate([[1.0], [t.bound for t in self._terms()], [max(map(abs, LOG_DOSE_RANGE))],
                               np.maximum(np.abs(low), np.abs(high)), np.ones(len(self._ids()))])

    # ---- the sums -----------------------------------------------------------------------------------------
    def site_sums(self, frame: pd.DataFrame, coef: np.ndarray) -> dict[str, np.ndarray | float]:
        """At ``coef``, over the site's rows (:meth:`rows_and_target`): ``gradient`` Σ (y − p) x, ``hessian``
        Σ p(1 − p) x xᵀ, ``loglik`` Σ max(ℓ, LOGLIK_FLOOR) and the row count ``n``."""
        rows, y = self.rows_and_target(frame)
        x = self.design_matrix(rows)
        eta = x @ np.asarray(coef, dtype=float)
        p = expit(eta)
        loglik = np.maximum(y * log_expit(eta) + (1.0 - y) * log_expit(-eta), LOGLIK_FLOOR)
        return {"gradient": x.T @ (y - p), "hessian": (x * (p * (1.0 - p))[:, None]).T @ x,
                "loglik": float(loglik.sum()), "n": float(len(y))}

    def sum_bounds(self, coef: np.ndarray | None = None) -> dict[str, SumBound]:
        """Per-row bounds of :meth:`site_sums` (they do not depend on ``coef``): |Δgradient_j| ≤ B_j,
        |Δhessian_jk| ≤ B_j B_k / 4, |Δloglik| ≤ |LOGLIK_FLOOR|, |Δn| ≤ 1; one row touches every column but
        the formulation one-hots it does not have."""
        b = self.row_bound()
        touched = len(b) - len(self._ids()) + 1
        return {"gradient": SumBound(b, touched), "hessian": SumBound(np.outer(b, b) / 4.0,
                                                                     touched * (touched + 1) // 2, True),
                "loglik": SumBound(abs(LOGLIK_FLOOR), 1), "n": SumBound(1.0, 1)}

    # ---- predicting ---------------------------------------------------------------------------------------
    def logit_and_gradient(self, frame: pd.DataFrame, coef: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self.design_matrix(frame)
        return x @ np.asarray(coef, dtype=float), x

    # ---- storing ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"kind": self.kind, "formulations": {k: dict(v) for k, v in self.formulations.items()},
                "covariates": list(self.covariates), "formulation_precision": self.formulation_precision,
                "property_precision": self.property_precision, "covariate_precision": self.covariate_precision,
                "fitted": self.fitted_dict()}

    @classmethod
    def from_dict(cls, values: Mapping) -> ToxicityModel:
        kinds = {sub.kind: sub for sub in (NeutropeniaModel, OtherToxicityModel)}
        if values.get("kind") not in kinds:
            raise ValueError(f"toxicity model kind {values.get('kind')!r}; expected one of {sorted(kinds)}")
        model = kinds[values["kind"]](values["formulations"], tuple(values["covariates"]),
                                      float(values["formulation_precision"]), float(values["property_precision"]),
                                      float(values["covariate_precision"]))
        return model.restore_fitted(values["fitted"])


class NeutropeniaModel(ToxicityModel):
    """P(grade ≥ 3 neutropenia): a first-cycle ANC nadir below 1.0 × 10⁹/L, on first cycles with a nadir."""

    kind = "neutropenia-logistic/1"
    outcome = "neutropenia"

    def rows_and_target(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
        rows = first_cycles(frame)
        nadir = pd.to_numeric(rows["anc_nadir_e9_l"], errors="coerce").to_numpy(dtype=float)
        kept = ~np.isnan(nadir)
        return rows[kept], (nadir[kept] < GRADE3_NADIR_E9_L).astype(float)


class OtherToxicityModel(ToxicityModel):
    """P(another grade ≥ 3 toxicity | no grade ≥ 3 neutropenia): the toxicity column on first cycles whose ANC
    nadir stayed at or above 1.0 × 10⁹/L."""

    kind = "other-toxicity-logistic/1"
    outcome = "other_toxicity"

    def rows_and_target(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
        rows = first_cycles(frame)
        nadir = pd.to_numeric(rows["anc_nadir_e9_l"], errors="coerce").to_numpy(dtype=float)
        toxicity = pd.to_numeric(rows["toxicity_grade3"], errors="coerce").to_numpy(dtype=float)
        kept = (nadir >= GRADE3_NADIR_E9_L) & ~np.isnan(toxicity)
        return rows[kept], toxicity[kept]


def any_toxicity(neutropenia: Probability, other: Probability) -> Probability:
    """P(any grade ≥ 3 toxicity) = 1 − (1 − P(neutropenia))(1 − P(other)), bound by bound (both bounds are
    monotone in each risk)."""
    return Probability(*(1.0 - (1.0 - n) * (1.0 - o) for n, o in zip(neutropenia, other, strict=True)))
