"""Drug release from the carrier: the simulator's Weibull release model, calibrated on real liposome curves.

The released fraction of the encapsulated drug follows the Weibull function

    F(t) = 1 - exp(-(t / tau)^beta)

(Papadopoulou V., Kosmidis K., Vlachou M., Macheras P., "On the use of the Weibull function for the
discernment of drug release mechanisms", Int J Pharm 309:44-50, 2006), with tau the time (hours) at which
63.2 % is released and beta the shape (Papadopoulou et al.: beta <= 0.75 Fickian diffusion, in Euclidean
or fractal spaces; 0.75 < beta < 1 Fickian diffusion combined with another mechanism; beta > 1 a complex
mechanism, sigmoidal curve).

Data (CC BY 4.0, copied unchanged in ``simulation/data/liposome_ivr``, see its README.md):

- D. Yanes et al., "A machine learning workflow to accelerate the design of in vitro release tests from
  liposomes", Digital Discovery 2025, doi:10.1039/D5DD00112A (repository danielyanes22/accelerated_IVR):
  ``drug_release_exp.csv`` (3,332 digitised points of 209 real release curves, time already converted to
  hours by the authors) and ``weibull_params.csv`` (their Weibull fits of the 169 curves that pass their
  F2 > 50, non-biphasic and "originally recorded in hours" filters).
- D. Yanes et al., "Making in vitro release and formulation data AI-ready: a foundation for streamlined
  nanomedicine development" (repository danielyanes22/nanomed_IVR_data): ``backend_data.csv``
  (formulation and release-test features of each curve, ``IVR_ID`` = curve id).

What the data say (numbers reproduced by ``benchmarks/release_calibration.py``):

- beta of the paper's 169 fits: median 0.673, IQR 0.412-0.943 (the DESIGN's 0.67, 0.41-0.94 checks out);
  median tau 18.1 h (IQR 4.3-237 h). :func:`fit_weibull` reproduces the paper's fits on 155 of the 169
  curves (beta within 0.01, tau within 5 %); of the other 14, 6 fit better here (the paper's fit sits on
  its bound alpha <= 300 or in a worse local minimum, e.g. curve 139, whose paper beta 4.90 is the data
  set's maximum) and 8 release < 16 % in the observed window, so tau is not identifiable: here it stops
  at the 1e5 h bound, the paper's runs to 2e5-3e13 h. Over all 209 curves: median tau 17.1 h, beta 0.74.
- Many curves plateau below 100 %. A plain Weibull absorbs a plateau into a small beta and a long tau
  (beta rises with the final released fraction); a plateau factor F_max would describe these curves
  better (numbers in ``benchmarks/release_calibration.py``), but the simulator keeps the plain Weibull
  of the DESIGN: its small betas are partly plateaus.
- Held out by formulation, the features in ``backend_data.csv`` predict a curve only about as well as the
  population-median Weibull (:func:`calibration_report`, seed 0): pooled over points the median error of
  released fraction is 0.21 against the null's 0.16 (difference -0.007..+0.045 over fold seeds 0-9), while
  the median over curves of each curve's mean error is a little lower, 0.19 against 0.21 (lower on all 10
  seeds). Across-laboratory and assay variability dominates, and the files hold no lipid composition
  (no PEGylation, no Tm).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import least_squares
from sklearn.base import BaseEstimator
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import HuberRegressor, Ridge
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

__all__ = [
    "BETA_IQR",
    "BETA_LOGNORMAL_MU",
    "BETA_LOGNORMAL_SIGMA",
    "BETA_MEDIAN",
    "DATA_DIR",
    "DEFAULT_FEATURES",
    "FORMULATION_COLUMNS",
    "TAU_MEDIAN_H",
    "ReleaseModel",
    "alpha_from_tau",
    "calibration_report",
    "fit_weibull",
    "fitted_curves",
    "load_release_curves",
    "sample_beta",
    "tau_from_alpha",
    "weibull_released_fraction",
]

DATA_DIR = Path(__file__).parent / "data" / "liposome_ivr"
"""The packaged copy of the liposome IVR data (Yanes et al., CC BY 4.0)."""

CURVES_FILE = "drug_release_exp.csv"
FORMULATIONS_FILE = "backend_data.csv"
PAPER_FITS_FILE = "weibull_params.csv"

FORMULATION_COLUMNS = (
    "formulation_ID",
    "particle_size_nm",
    "zeta_potential",
    "drug_loading",
    "PDI",
    "media_temp_oC",
    "media_pH",
    "structure_type",
    "release_method",
)
"""Columns of ``backend_data.csv`` joined onto each curve (``structure_type`` is lamellarity: SUV, LUV,
MLV, LMVV; the files hold no lipid composition, so PEGylation is not derivable)."""

DEFAULT_FEATURES = ("particle_size_nm", "drug_loading", "zeta_potential", "media_temp_oC", "media_pH")
"""Numeric features of :class:`ReleaseModel` by default: size (nm), drug loading (drug/lipid ratio as
reported), zeta potential (mV), release-medium temperature (degC) and pH."""

# Parameter box of every fit and prediction. beta <= 5 is the bound of the paper's own fits; tau spans
# 0.36 s (the fastest curves are recorded in seconds) to 11 years (curves releasing a few % only, whose
# tau is an extrapolation and not identifiable from the data).
TAU_BOUNDS_H = (1e-4, 1e5)
BETA_BOUNDS = (0.05, 5.0)

# Derived from weibull_params.csv (the paper's 169 fits) and verified by tests/test_release.py, which
# recomputes them from the data.
BETA_MEDIAN = 0.6732
"""Median Weibull beta of the real liposome curves (Yanes et al. 2025 fits, n = 169)."""
BETA_IQR = (0.4123, 0.9433)
"""25th and 75th percentiles of beta over the same 169 fits."""
TAU_MEDIAN_H = 18.06
"""Median Weibull tau (hours) of the same 169 fits, tau = alpha^(1/beta); IQR 4.3-237 h."""

_Z75 = 0.6744897501960817  # standard normal 75th percentile, scipy.stats.norm.ppf(0.75)

# Lognormal for beta matched to the median and the interquartile range of the real betas:
# mu = ln(median), sigma = ln(q75 / q25) / (2 z_0.75). The maximum-likelihood lognormal (mean and sd of
# ln beta: mu = -0.523, sigma = 0.629) would put the median at 0.59, because ln beta is left-skewed; the
# quantile match keeps the median exact and gives IQR 0.445-1.018 (data: 0.412-0.943); KS distance to
# the 169 betas 0.115 (MLE: 0.114).
BETA_LOGNORMAL_MU = math.log(BETA_MEDIAN)
"""Location of ln(beta): ln(0.6732) = -0.3957."""
BETA_LOGNORMAL_SIGMA = math.log(BETA_IQR[1] / BETA_IQR[0]) / (2 * _Z75)
"""Scale of ln(beta): ln(0.9433 / 0.4123) / 1.349 = 0.6135."""


def weibull_released_fraction(t_h, tau_h, beta):
    """Fraction of the drug released by time ``t_h`` (hours): F = 1 - exp(-(t / tau)^beta).

    Vectorised over numpy broadcasting of all three arguments; negative times count as 0.
    Papadopoulou et al., Int J Pharm 2006.

    >>> float(weibull_released_fraction(12.0, 12.0, 0.67))  # 1 - 1/e at t = tau
    0.6321205588285577
    """
    t = np.maximum(np.asarray(t_h, dtype=float), 0.0)
    tau = np.asarray(tau_h, dtype=float)
    b = np.asarray(beta, dtype=float)
    if np.any(tau <= 0) or np.any(b <= 0):
        raise ValueError("tau_h and beta must be > 0")
    with np.errstate(over="ignore"):
        return -np.expm1(-np.power(t / tau, b))


def tau_from_alpha(alpha, beta):
    """tau (hours) from alpha of the ``weibull_params.csv`` form F = 1 - exp(-t^beta / alpha).

    t^beta / alpha = (t / tau)^beta, so tau = alpha^(1/beta).
    """
    return np.power(np.asarray(alpha, dtype=float), 1.0 / np.asarray(beta, dtype=float))


def alpha_from_tau(tau_h, beta):
    """alpha of the ``weibull_params.csv`` form from tau (hours): alpha = tau^beta."""
    return np.power(np.asarray(tau_h, dtype=float), np.asarray(beta, dtype=float))


def _resolve(data_dir) -> Path:
    return DATA_DIR if data_dir is None else Path(data_dir)


def load_release_curves(data_dir=None) -> pd.DataFrame:
    """The real release curves, one row per measured point, with their formulation features.

    Columns: ``curve_id`` (from ``file_name`` "data/drug_release/3..csv" -> 3), ``time_h``,
    ``released_fraction`` in [0, 1], ``release_percent`` (as digitised, unclipped),
    ``in_paper_fits`` (the curve is one of the 169 of ``weibull_params.csv``) and the
    :data:`FORMULATION_COLUMNS` of ``backend_data.csv`` (joined ``IVR_ID`` = ``curve_id``; NaN where the
    curve has no record: only curve 104). Rows are sorted by curve and time (11 curves are stored out of
    time order).

    Clipping: 129 points of 24 curves exceed 100 % (up to 115.2 %, curve 243) and 37 points lie below 0 %
    (down to -1.5 %). These are digitisation noise and assay normalisation (100 % is the separately
    measured nominal load), not release beyond the dose, and a Weibull cannot leave [0, 1]; so
    ``released_fraction = clip(release_percent / 100, 0, 1)``.

    Times are hours throughout: the authors converted curves recorded in minutes or seconds (the paper's
    ``weibull_params.csv`` then left those 30 curves out; they are kept here).
    """
    d = _resolve(data_dir)
    raw = pd.read_csv(d / CURVES_FILE)
    curve_id = raw["file_name"].str.extract(r"/(\d+)\.+csv$", expand=False)
    if curve_id.isna().any():
        bad = raw.loc[curve_id.isna(), "file_name"].iloc[0]
        raise ValueError(f"{d / CURVES_FILE}: column file_name: cannot read a curve id from {bad!r}")
    curves = pd.DataFrame(
        {
            "curve_id": curve_id.astype(int),
            "time_h": raw["time (Hrs)"].astype(float),
            "released_fraction": np.clip(raw["release_percent"].astype(float) / 100.0, 0.0, 1.0),
            "release_percent": raw["release_percent"].astype(float),
        }
    )
    paper_ids = set(pd.read_csv(d / PAPER_FITS_FILE)["ID"].astype(int))
    curves["in_paper_fits"] = curves["curve_id"].isin(paper_ids)
    formulations = pd.read_csv(d / FORMULATIONS_FILE)
    if formulations["IVR_ID"].duplicated().any():
        raise ValueError(f"{d / FORMULATIONS_FILE}: column IVR_ID: duplicate ids")
    formulations = formulations.set_index("IVR_ID")[list(FORMULATION_COLUMNS)]
    curves = curves.join(formulations, on="curve_id")
    return curves.sort_values(["curve_id", "time_h"], kind="stable").reset_index(drop=True)


def _weibull_plot_guess(t: np.ndarray, f: np.ndarray) -> tuple[float, float] | None:
    """(tau, beta) from the straight line ln(-ln(1 - F)) = beta ln t - beta ln tau, or None."""
    keep = (t > 0) & (f > 0.01) & (f < 0.99)
    if np.unique(t[keep]).size < 2:
        return None
    x, y = np.log(t[keep]), np.log(-np.log1p(-f[keep]))
    beta, intercept = np.polyfit(x, y, 1)
    if not np.isfinite(beta) or beta <= 0:
        return None
    beta = float(np.clip(beta, *BETA_BOUNDS))
    return float(np.exp(-intercept / beta)), beta


def fit_weibull(time_h, fraction) -> tuple[float, float]:
    """Least-squares Weibull fit of one release curve: returns (tau_h, beta).

    Minimises sum (F(t_i) - fraction_i)^2 (the paper's objective, in fraction instead of percent) with
    ``scipy.optimize.least_squares`` over (ln tau, ln beta), bounded to tau in [1e-4, 1e5] h and beta in
    [0.05, 5], from the Weibull-plot line and three fixed starts; the lowest cost wins. Curves that
    plateau below 100 % are fitted by the plain Weibull (smaller beta, longer tau); curves that release
    only a few % give a tau far beyond the data, up to the bound.
    """
    t = np.asarray(time_h, dtype=float)
    f = np.asarray(fraction, dtype=float)
    if t.shape != f.shape or t.ndim != 1:
        raise ValueError("time_h and fraction must be 1-D arrays of the same length")
    ok = np.isfinite(t) & np.isfinite(f)
    t, f = np.maximum(t[ok], 0.0), f[ok]
    if np.count_nonzero(t > 0) < 2:
        raise ValueError("fit_weibull needs at least two points with time_h > 0")
    lo = np.log([TAU_BOUNDS_H[0], BETA_BOUNDS[0]])
    hi = np.log([TAU_BOUNDS_H[1], BETA_BOUNDS[1]])
    positive = t > 0
    log_t = np.zeros_like(t)
    log_t[positive] = np.log(t[positive])

    def residuals(p):
        return weibull_released_fraction(t, math.exp(p[0]), math.exp(p[1])) - f

    def jacobian(p):
        beta = math.exp(p[1])
        with np.errstate(over="ignore"):
            u = np.exp(beta * (log_t - p[0]))
        u[~positive] = 0.0
        dF_du = np.exp(-u)
        d_logtau = dF_du * (-beta * u)
        d_logbeta = dF_du * u * beta * np.where(positive, log_t - p[0], 0.0)
        return np.column_stack([d_logtau, d_logbeta])

    t_max = float(t.max())
    starts = [(t_max, 0.5), (t_max, 1.5), (10 * t_max, 0.3)]
    guess = _weibull_plot_guess(t, f)
    if guess is not None:
        starts.insert(0, guess)
    best = None
    for tau0, beta0 in starts:
        x0 = np.clip(np.log([tau0, beta0]), lo + 1e-9, hi - 1e-9)
        sol = least_squares(residuals, x0, jac=jacobian, bounds=(lo, hi), method="trf")
        if best is None or sol.cost < best.cost:
            best = sol
    return float(math.exp(best.x[0])), float(math.exp(best.x[1]))


def sample_beta(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` Weibull shapes beta drawn from the lognormal matched to the real liposome betas.

    ln beta ~ Normal(BETA_LOGNORMAL_MU = -0.3957, BETA_LOGNORMAL_SIGMA = 0.6135): median 0.673 and IQR
    0.445-1.018 (data: 0.673, 0.412-0.943). Not truncated (P(beta > 5) = 5e-4).
    """
    return rng.lognormal(mean=BETA_LOGNORMAL_MU, sigma=BETA_LOGNORMAL_SIGMA, size=n)


class ReleaseModel(BaseEstimator):
    """Predicts a formulation's Weibull release parameters (tau_h, beta) from its features.

    Two regularised linear models, one on ln tau and one on ln beta, over median-imputed (with
    missing-value indicators) and standardised numeric features plus optional one-hot categorical ones.
    Predictions are clipped to the fitting box (tau 1e-4..1e5 h, beta 0.05..5).

    Held out on real curves it is only about as accurate as the population-median Weibull (a little
    better per curve, worse on the pooled-point median; :func:`calibration_report`): use it to place
    formulations in the observed range, not as an oracle.

    Parameters
    ----------
    features : sequence of str, default DEFAULT_FEATURES
        Numeric columns of ``X``. Columns absent from ``X`` at predict time are treated as missing and
        imputed with the training median (e.g. pass no ``media_pH`` for physiological conditions only if
        the training median, pH 7.4, is what you mean).
    categorical : sequence of str, default ()
        Categorical columns (e.g. ``"structure_type"``), one-hot encoded; unseen levels are ignored.
    alpha : float, default 1.0
        L2 penalty of both linear models.
    loss : {"huber", "squared_error"}, default "huber"
        "huber" (``HuberRegressor``, epsilon 1.35) resists the unidentifiable ln tau of curves that release
        only a few % (fitted tau at the 1e5 h bound); "squared_error" is ``Ridge``.

    Attributes
    ----------
    coef_ : ndarray of shape (2, n_transformed_features)
        Row 0: ln tau, row 1: ln beta, per standardised feature (see ``feature_names_out_``).
    intercept_ : ndarray of shape (2,)
    feature_names_out_ : ndarray of str
    n_features_in_ : int
    pipelines_ : tuple of two fitted sklearn Pipelines (ln tau, ln beta)

    Examples
    --------
    >>> X = pd.DataFrame({"particle_size_nm": [100, 150, 200, 120], "drug_loading": [0.1, 0.2, 0.1, 0.05],
    ...                   "zeta_potential": [-5, -20, -10, 2], "media_temp_oC": 37.0, "media_pH": 7.4})
    >>> model = ReleaseModel().fit(X, tau=[5.0, 20.0, 40.0, 8.0], beta=[0.6, 0.7, 0.8, 0.5])
    >>> tau_h, beta = model.predict(X.iloc[:1])
    """

    def __init__(self, features=DEFAULT_FEATURES, categorical=(), alpha=1.0, loss="huber"):
        self.features = features
        self.categorical = categorical
        self.alpha = alpha
        self.loss = loss

    def _columns(self) -> list[str]:
        return list(self.features) + list(self.categorical)

    def _frame(self, X) -> pd.DataFrame:
        columns = self._columns()
        if isinstance(X, pd.DataFrame):
            return X.reindex(columns=columns)
        X = np.asarray(X, dtype=object)
        if X.ndim != 2 or X.shape[1] != len(columns):
            raise ValueError(f"X: expected a DataFrame or a 2-D array with columns {columns}")
        return pd.DataFrame(X, columns=columns)

    def _make_pipeline(self) -> Pipeline:
        transformers = [
            (
                "numeric",
                make_pipeline(SimpleImputer(strategy="median", add_indicator=True), StandardScaler()),
                list(self.features),
            )
        ]
        if self.categorical:
            transformers.append(
                (
                    "categorical",
                    make_pipeline(
                        SimpleImputer(strategy="constant", fill_value="missing"),
                        OneHotEncoder(handle_unknown="ignore", sparse_output=False),
                    ),
                    list(self.categorical),
                )
            )
        if self.loss == "huber":
            regressor = HuberRegressor(alpha=self.alpha, epsilon=1.35, max_iter=1000)
        elif self.loss == "squared_error":
            regressor = Ridge(alpha=self.alpha)
        else:
            raise ValueError(f"loss: expected 'huber' or 'squared_error', got {self.loss!r}")
        return Pipeline([("features", ColumnTransformer(transformers)), ("regressor", regressor)])

    def fit(self, X, tau, beta) -> ReleaseModel:
        """Learn ln tau, ln beta from features ``X`` and the curves' fitted Weibull ``tau`` (h), ``beta``."""
        frame = self._frame(X)
        tau = np.asarray(tau, dtype=float)
        beta = np.asarray(beta, dtype=float)
        for name, values in (("tau", tau), ("beta", beta)):
            if values.shape != (len(frame),):
                raise ValueError(f"{name}: expected {len(frame)} values, got shape {values.shape}")
            if not np.all(np.isfinite(values) & (values > 0)):
                raise ValueError(f"{name}: all values must be finite and > 0")
        for column in self.features:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
        self.pipelines_ = tuple(self._make_pipeline().fit(frame, np.log(target)) for target in (tau, beta))
        self.n_features_in_ = len(self._columns())
        self.feature_names_in_ = np.asarray(self._columns(), dtype=object)
        self.feature_names_out_ = self.pipelines_[0][:-1].get_feature_names_out()
        self.coef_ = np.vstack([p[-1].coef_ for p in self.pipelines_])
        self.intercept_ = np.array([p[-1].intercept_ for p in self.pipelines_], dtype=float)
        return self

    def predict(self, X) -> tuple[np.ndarray, np.ndarray]:
        """(tau_h, beta) arrays for the formulations in ``X``, clipped to the fitting box."""
        if not hasattr(self, "pipelines_"):
            raise ValueError("ReleaseModel is not fitted; call fit(X, tau, beta) first")
        frame = self._frame(X)
        for column in self.features:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
        log_tau, log_beta = (p.predict(frame) for p in self.pipelines_)
        return (
            np.clip(np.exp(log_tau), *TAU_BOUNDS_H),
            np.clip(np.exp(log_beta), *BETA_BOUNDS),
        )


@lru_cache(maxsize=4)
def _fitted_curves_cached(data_dir: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    curves = load_release_curves(data_dir)
    rows = []
    for curve_id, points in curves.groupby("curve_id", sort=True):
        tau, beta = fit_weibull(points["time_h"].to_numpy(), points["released_fraction"].to_numpy())
        first = points.iloc[0]
        rows.append(
            {
                "curve_id": curve_id,
                "tau_h": tau,
                "beta": beta,
                "n_points": len(points),
                "t_max_h": points["time_h"].max(),
                "final_fraction": points["released_fraction"].iloc[-1],
                "in_paper_fits": bool(first["in_paper_fits"]),
                **{c: first[c] for c in FORMULATION_COLUMNS},
            }
        )
    return curves, pd.DataFrame(rows)


def fitted_curves(data_dir=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(points, per-curve fits): :func:`load_release_curves` and one :func:`fit_weibull` row per curve.

    The fits table has ``curve_id, tau_h, beta, n_points, t_max_h, final_fraction, in_paper_fits`` and the
    :data:`FORMULATION_COLUMNS`. Cached per data directory; copies are returned.
    """
    curves, fits = _fitted_curves_cached(str(_resolve(data_dir).resolve()))
    return curves.copy(), fits.copy()


def _grouped_folds(groups: np.ndarray, n_splits: int, seed: int) -> list[np.ndarray]:
    """Test-index arrays: the unique groups shuffled with ``seed`` and dealt into ``n_splits`` folds."""
    unique = np.unique(groups)
    if n_splits < 2 or n_splits > unique.size:
        raise ValueError(f"n_splits: expected 2..{unique.size}, got {n_splits}")
    shuffled = np.random.default_rng(seed).permutation(unique)
    return [np.flatnonzero(np.isin(groups, part)) for part in np.array_split(shuffled, n_splits)]


def _error_summary(errors: list[np.ndarray], description: str, held_out: bool) -> dict:
    pooled = np.concatenate(errors)
    per_curve = np.array([e.mean() for e in errors])
    return {
        "description": description,
        "held_out": held_out,
        "n_curves": len(errors),
        "n_points": int(pooled.size),
        "median_abs_error": float(np.median(pooled)),
        "mean_abs_error": float(np.mean(pooled)),
        "p90_abs_error": float(np.percentile(pooled, 90)),
        "median_curve_mean_abs_error": float(np.median(per_curve)),
    }


# The report's feature models: the default one, and two variants shown for transparency.
_REPORTED_FEATURE_MODELS = {
    "feature_model_heldout": (
        "ReleaseModel() default: size, loading, zeta, medium T and pH; Huber on ln tau, ln beta",
        {},
    ),
    "feature_model_ridge_heldout": (
        "ReleaseModel(loss='squared_error'): same features, Ridge",
        {"loss": "squared_error"},
    ),
    "feature_model_plus_assay_heldout": (
        "ReleaseModel + structure_type and release_method (an assay property, not the formulation's)",
        {"categorical": ("structure_type", "release_method")},
    ),
}


def calibration_report(data_dir=None, seed=0, n_splits=5) -> dict:
    """Held-out accuracy of the release model on the real curves, in released fraction.

    Every curve is fitted once by :func:`fit_weibull`. Curves with a ``backend_data.csv`` record (208 of
    209) are dealt into ``n_splits`` folds by formulation (``formulation_ID``: curves of one formulation
    under different release tests stay together), shuffled with ``seed``. For each held-out curve the
    (tau, beta) predicted from the other folds gives F at the curve's own time points; the absolute
    error |F - released_fraction| is pooled over all held-out points. Models:

    - ``per_curve_fit_in_sample``: each curve's own Weibull fit; NOT held out, the ceiling of the model form.
    - ``feature_model_heldout``: :class:`ReleaseModel` trained on the training folds' fits.
    - ``null_population_median_heldout``: median tau and median beta of the training folds' fits.
    - two :class:`ReleaseModel` variants (Ridge; plus structure type and release method).

    Returns a dict with the settings, data counts, the fitted-parameter summary and ``models``: per model
    ``median_abs_error``, ``mean_abs_error``, ``p90_abs_error`` (pooled points),
    ``median_curve_mean_abs_error`` (median over curves of each curve's mean error), ``n_curves``,
    ``n_points``, ``held_out`` and ``description``.
    """
    curves, fits = fitted_curves(data_dir)
    fits = fits[fits["formulation_ID"].notna()].reset_index(drop=True)
    points = {cid: g for cid, g in curves.groupby("curve_id")}

    def curve_error(curve_id, tau, beta) -> np.ndarray:
        g = points[curve_id]
        predicted = weibull_released_fraction(g["time_h"].to_numpy(), tau, beta)
        return np.abs(predicted - g["released_fraction"].to_numpy())

    errors: dict[str, list[np.ndarray]] = {
        "per_curve_fit_in_sample": [curve_error(r.curve_id, r.tau_h, r.beta) for r in fits.itertuples()],
        "null_population_median_heldout": [],
        **{name: [] for name in _REPORTED_FEATURE_MODELS},
    }
    for test in _grouped_folds(fits["formulation_ID"].to_numpy(), n_splits, seed):
        train = fits.drop(index=test)
        held = fits.loc[test]
        tau0, beta0 = train["tau_h"].median(), train["beta"].median()
        errors["null_population_median_heldout"] += [curve_error(c, tau0, beta0) for c in held["curve_id"]]
        for name, (_, params) in _REPORTED_FEATURE_MODELS.items():
            model = ReleaseModel(**params).fit(train, train["tau_h"], train["beta"])
            taus, betas = model.predict(held)
            errors[name] += [
                curve_error(c, t, b) for c, t, b in zip(held["curve_id"], taus, betas, strict=True)
            ]

    descriptions = {
        "per_curve_fit_in_sample": "each curve's own Weibull fit (in-sample ceiling, NOT held out)",
        "null_population_median_heldout": "population median tau and beta of the training curves",
        **{name: text for name, (text, _) in _REPORTED_FEATURE_MODELS.items()},
    }
    models = {
        name: _error_summary(errs, descriptions[name], held_out=name != "per_curve_fit_in_sample")
        for name, errs in errors.items()
    }
    return {
        "data_dir": str(_resolve(data_dir)),
        "seed": seed,
        "n_splits": n_splits,
        "grouping": "formulation_ID",
        "n_curves_total": int(curves["curve_id"].nunique()),
        "n_curves_evaluated": len(fits),
        "n_formulations": int(fits["formulation_ID"].nunique()),
        "n_points_evaluated": int(sum(len(points[c]) for c in fits["curve_id"])),
        "fitted_parameters": {
            "tau_h_median": float(fits["tau_h"].median()),
            "tau_h_iqr": [float(q) for q in fits["tau_h"].quantile([0.25, 0.75])],
            "beta_median": float(fits["beta"].median()),
            "beta_iqr": [float(q) for q in fits["beta"].quantile([0.25, 0.75])],
            "n_tau_at_upper_bound": int((fits["tau_h"] >= 0.999 * TAU_BOUNDS_H[1]).sum()),
        },
        "beta_lognormal": {"mu": BETA_LOGNORMAL_MU, "sigma": BETA_LOGNORMAL_SIGMA},
        "models": models,
    }
