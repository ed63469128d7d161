"""Benchmark: can the structured dose-response policy be fitted under each site's local DP? Measured, per design.

    python benchmarks/structured_dp.py [--clinics 5] [--seeds 0,1,2,3] [--patients 300] [--shares 0.1,0.2,0.4]
    python benchmarks/structured_dp.py --floor [--clinics 5] [--seeds 0,1,2,3]

Issue 12, item 1: with DP, a site's sums (:meth:`shared.dose_response.DoseResponseModel.site_sums`) would get
Gaussian noise charged to its ledger under a declared share of its budget. Before building that, this measures
what the noise leaves of the policy on the ``make run`` world (``make_world(clinics, seed)``, each clinic's
training split as in ``benchmarks/structured_policy.py``), with the real mechanism: every site's sums are
released by :func:`client.dp.gaussian_release` as :class:`client.dp.Block` with the models' own
:meth:`~shared.dose_response.DoseResponseModel.sum_bounds`, σ from :func:`client.ledger.calibrate_noise` for the
phase's planned number of releases at ε_phase = share × 3, δ = 1e-5 (a fresh ledger; sample rate 1). The
server adds the noised sums and steps; no step halving (the log-likelihood is not released).

Designs (K = releases per model; the phase plans 3 K + 1 releases, the last the support counts):

- ``newton``: K noisy Newton–Raphson steps, each releasing gradient and information at the current point;
- ``fixed_h``: quasi-Newton with a fixed information: release 0 is gradient and information at the public
  start, releases 1 … K − 1 gradient only (L2 sensitivity √touched instead of √(touched + touched(touched+1)/2));
- ``fixed_h_ridge``: as ``fixed_h``, with the server adding ``κ`` × the known noise sd of each diagonal
  information entry to the prior precision (a ridge scaled by the noise, as in Wang 2018's adaptive
  sufficient-statistics perturbation), κ = 2;
- ``small_ridge``: ``fixed_h_ridge`` on smaller models (response: tumour type only; toxicities: no host
  covariates), fewer entries one row touches.

In every DP design the information is projected on the PSD cone before the prior is added (post-processing),
and the coefficients' covariance is the sandwich ``A⁻¹ + A⁻¹ D A⁻¹`` (``A`` the penalised noised information,
``D`` the last gradient release's summed noise variance), so the pessimistic policies see the noise. The support
counts (formulation × tumour type × dose bin, scale 1, one cell per row) are released once per site; the server
keeps the summed cells above 2 × their summed noise sd. ``exact_support``: the ``fixed_h_ridge`` models with the
exact support (not a DP design: it isolates the models' noise). ``noiseless``: each design without noise (what
K fixed steps lose by themselves).

Each fitted policy is evaluated as ``structured`` (absolute pessimistic score, z = 1) and ``vs_soc`` (leaves
standard of care only where the lower bound of the improvement is positive, z = 0.5) on fresh patients
(``simulation.policy_evaluation``): value / oracle, against standard of care and the no-DP policy of the same
run. ``--control``: the ridge designs at share 0.2 (two noise draws) against the same designs fitted from
noise alone (:data:`PURE_NOISE_SIGMA`). ``--floor``: the noise floor of :func:`floor` instead. Prints a table; writes
``benchmarks/results/structured_dp[_<clinics>_clinics].json`` (``structured_dp_floor_<clinics>_clinics.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from record import write_record  # noqa: E402
from structured_policy import site_training_frames, usual_formulation  # noqa: E402

from client.dp import Block, gaussian_release, sensitivity  # noqa: E402
from client.ledger import calibrate_noise  # noqa: E402
from shared.dose_response import DoseResponseModel, fit_by_sums  # noqa: E402
from shared.dosing_policy import DosingPolicy  # noqa: E402
from shared.structured_policy import (  # noqa: E402
    USUAL_FORMULATION,
    StructuredDosingPolicy,
    StructuredObjective,
    Support,
    catalogue_of,
    fit_structured_policy,
    site_support_counts,
)
from shared.toxicity_model import NeutropeniaModel, OtherToxicityModel  # noqa: E402
from shared.tumour_response import TUMOUR_CONTRASTS, TumourResponseModel  # noqa: E402
from simulation.clinics import make_world  # noqa: E402
from simulation.policy_evaluation import evaluate_policies, random_decider  # noqa: E402

EPSILON, DELTA = 3.0, 1e-5
RIDGE_KAPPA = 2.0
SUPPORT_THRESHOLD_SD = 2.0


@dataclasses.dataclass(frozen=True)
class Design:
    name: str
    releases: int            # K per model
    fixed_hessian: bool
    ridge: float = 0.0
    small: bool = False


DESIGNS = (Design("newton", 5, False), Design("fixed_h", 4, True), Design("fixed_h_ridge", 4, True, RIDGE_KAPPA),
           Design("small_ridge", 4, True, RIDGE_KAPPA, small=True))


def models(catalogue, small: bool) -> dict[str, DoseResponseModel]:
    if small:
        return {"response": TumourResponseModel(catalogue, covariates=TUMOUR_CONTRASTS),
                "neutropenia": NeutropeniaModel(catalogue, covariates=()),
                "other_toxicity": OtherToxicityModel(catalogue, covariates=())}
    return {"response": TumourResponseModel(catalogue), "neutropenia": NeutropeniaModel(catalogue),
            "other_toxicity": OtherToxicityModel(catalogue)}


def release(model: DoseResponseModel, frame: pd.DataFrame, coef: np.ndarray, keys: tuple[str, ...], sigma: float,
            rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One site's release of ``keys`` at ``coef`` (noised; exact when sigma is 0) and each entry's noise sd."""
    sums, bounds = model.site_sums(frame, coef), model.sum_bounds(coef)
    blocks = {k: Block(np.asarray(sums[k], dtype=float), bounds[k].scale, bounds[k].touched, bounds[k].symmetric)
              for k in keys}
    sd = {k: np.broadcast_to(sigma * sensitivity(blocks) * np.asarray(b.scale, dtype=float), b.values.shape)
          for k, b in blocks.items()}
    if sigma == 0:
        return {k: b.values for k, b in blocks.items()}, sd
    if not all(np.all(np.isfinite(b.values)) for b in blocks.values()):
        raise FloatingPointError("sums not finite")
    return gaussian_release(blocks, sigma, rng), sd


def nearest_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.maximum(values, 0.0)) @ vectors.T


def fit_dp(model: DoseResponseModel, frames: list[pd.DataFrame], design: Design, sigma: float,
           rng: np.random.Generator) -> DoseResponseModel:
    """K releases per site, the server stepping on the added noised sums (module docstring)."""
    precision, mean = model.penalty()
    coef = model.start()
    hessian = ridge = None
    for k in range(design.releases):
        keys = ("gradient",) if design.fixed_hessian and k > 0 else ("gradient", "hessian")
        try:
            parts = [release(model, frame, coef, keys, sigma, rng) for frame in frames]
        except FloatingPointError:  # coefficients so far off that a site's sums overflow: stop at the last point
            break
        gradient = sum(p[0]["gradient"] for p in parts)
        gradient_var = sum(p[1]["gradient"] ** 2 for p in parts)
        if "hessian" in keys:
            hessian = nearest_psd(sum(p[0]["hessian"] for p in parts))
            hessian_sd = np.sqrt(sum(np.diag(p[1]["hessian"]) ** 2 for p in parts))
            ridge = design.ridge * hessian_sd
        penalised = hessian + np.diag(precision + ridge)
        step = np.linalg.solve(penalised, gradient - precision * (coef - mean))
        if not np.all(np.isfinite(step)):  # the noise drove the sums to overflow: keep the last point
            break
        proposal = coef + step
        for _ in range(60):  # a public check (threshold order), no data
            if model.valid_coefficients(proposal):
                coef = proposal
                break
            step = step / 2.0
            proposal = coef + step
    inverse = np.linalg.inv(penalised)
    covariance = inverse + inverse @ np.diag(gradient_var) @ inverse
    model.coef_, model.covariance_ = coef, (covariance + covariance.T) / 2.0
    model.n_iter_, model.converged_, model.loglik_, model.n_ = design.releases, False, float("nan"), 0
    return model


def noised_support(frames: list[pd.DataFrame], ids: tuple[str, ...], sigma: float,
                   rng: np.random.Generator) -> Support:
    """Each site's counts released once (scale 1, one cell per row); summed cells below 2 noise sd dropped."""
    if sigma == 0:
        return Support(ids, sum(site_support_counts(frame, ids) for frame in frames))
    total = sum(gaussian_release({"counts": Block(site_support_counts(frame, ids), 1.0, 1)}, sigma, rng)["counts"]
                for frame in frames)
    threshold = SUPPORT_THRESHOLD_SD * sigma * math.sqrt(len(frames))
    return Support(ids, np.where(total >= threshold, total, 0.0))


def dp_policy(frames, catalogue, design: Design, sigma: float, rng, exact_support: bool = False,
              support_sigma: float | None = None) -> StructuredDosingPolicy:
    fitted = {key: fit_dp(model, frames, design, sigma, rng) for key, model in models(catalogue, design.small).items()}
    ids = tuple(sorted(catalogue))
    support = (Support.from_sites(frames, ids) if exact_support else
               noised_support(frames, ids, sigma if support_sigma is None else support_sigma, rng))
    return StructuredDosingPolicy(response=fitted["response"], neutropenia=fitted["neutropenia"],
                                  other_toxicity=fitted["other_toxicity"], support=support, formulations=catalogue)


def phase_sigma(design: Design, share: float) -> float:
    """σ for the phase's 3 K + 1 releases at ε = share × 3, δ = 1e-5 (a fresh ledger)."""
    return calibrate_noise(share * EPSILON, DELTA, 1.0, 3 * design.releases + 1)


def floor(clinics: int, seed: int) -> list[dict]:
    """The best any design here could do: the whole ε = 3 on a single release of the gradient alone (Δ = √touched),
    taken at the exact optimum with the exact information known to the server for free. The noise alone then
    gives the coefficients the covariance ``A⁻¹ D A⁻¹`` (``A`` the exact penalised information, ``D`` the summed
    gradient noise variance); compared with the dose coefficient's value and sampling se (``A⁻¹``)."""
    world = make_world(clinics, seed)
    frames = list(site_training_frames(world, seed).values())
    catalogue = catalogue_of(pd.concat(frames, ignore_index=True))
    rows = []
    for key, model in models(catalogue, small=False).items():
        model = fit_by_sums(model, frames)
        names = model.parameter_names()
        j = names.index("log_dose") if "log_dose" in names else names.index("emax_scale")
        bound = model.sum_bounds(model.coef_)["gradient"]
        for epsilon, releases in ((EPSILON, 1), (0.2 * EPSILON, 13)):
            sigma = calibrate_noise(epsilon, DELTA, 1.0, releases)
            sd = sigma * math.sqrt(bound.touched) * np.asarray(bound.scale, dtype=float)
            noise = model.covariance_ @ np.diag(len(frames) * sd**2) @ model.covariance_
            rows.append({"clinics": clinics, "seed": seed, "model": key, "coefficient": names[j],
                         "value": float(model.coef_[j]), "sampling_se": float(math.sqrt(model.covariance_[j, j])),
                         "epsilon": epsilon, "releases": releases, "sigma": sigma,
                         "noise_se": float(math.sqrt(noise[j, j]))})
    return rows


PURE_NOISE_SIGMA = 1e6
"""The control: models fitted from noise alone (σ so large the data are invisible), the support from a real
release at share 0.2. A design's policy is worth what it gains over this."""


def run_seed(clinics: int, seed: int, patients: int, shares: list[float], control: bool = False) -> dict:
    world = make_world(clinics, seed)
    frames = site_training_frames(world, seed)
    parts = list(frames.values())
    catalogue = catalogue_of(pd.concat(parts, ignore_index=True))
    rng = np.random.default_rng([seed, 2024])
    fitted: dict[str, StructuredDosingPolicy] = {"no_dp": fit_structured_policy(parts, catalogue)}
    sigmas = {}
    start = time.perf_counter()
    for design in DESIGNS if control else ():
        if design.ridge == 0:
            continue
        sigma = sigmas[f"{design.name}@0.2"] = phase_sigma(design, 0.2)
        for draw in (1, 2):
            fitted[f"{design.name}@0.2#{draw}"] = dp_policy(parts, catalogue, design, sigma, rng)
            fitted[f"{design.name}@pure_noise#{draw}"] = dp_policy(parts, catalogue, design, PURE_NOISE_SIGMA, rng,
                                                                   support_sigma=sigma)
    for design in DESIGNS if not control else ():
        fitted[f"{design.name}@noiseless"] = dp_policy(parts, catalogue, design, 0.0, rng)
        for share in shares:
            sigma = sigmas[f"{design.name}@{share:g}"] = phase_sigma(design, share)
            fitted[f"{design.name}@{share:g}"] = dp_policy(parts, catalogue, design, sigma, rng)
            if design.name == "fixed_h_ridge":
                fitted[f"exact_support@{share:g}"] = dp_policy(parts, catalogue, design, sigma, rng,
                                                                exact_support=True)
    fit_seconds = time.perf_counter() - start
    limits = DosingPolicy(encoder=None, members={}, formulations={})
    clinic_of = {c.name: c for c in world.clinics}

    def decider(policy: StructuredDosingPolicy):
        return lambda site: (lambda frame: policy.recommend_frame(
            frame.assign(**{USUAL_FORMULATION: usual_formulation(world, clinic_of[site])})))

    policies = {"random": lambda site: random_decider(limits, seed=seed + 2)}
    failed = [name for name, policy in fitted.items() if not all(
        np.all(np.isfinite(m.coef_)) and np.all(np.isfinite(m.covariance_))
        for m in (policy.response, policy.neutropenia, policy.other_toxicity))]
    for name, policy in fitted.items():
        if name in failed:  # coefficients or covariance overflowed: no policy to evaluate
            continue
        policies[f"{name}/structured"] = decider(policy)
        if name.startswith(("newton", "fixed_h@")) or name.endswith("noiseless") or "#" in name:
            continue  # to save evaluation time (2 shared cores): the absolute score says enough of these
        policies[f"{name}/vs_soc"] = decider(dataclasses.replace(
            policy, objective=StructuredObjective(z=0.5, reference="standard_of_care")))
    start = time.perf_counter()
    evaluation = evaluate_policies(world, policies, limits, n_per_site=patients, seed=seed + 1)
    evaluation_seconds = time.perf_counter() - start
    overall = {name: {k: v[k] for k in ("value", "value_ratio", "toxicity_rate")}
               for name, v in evaluation["overall"].items()}
    logged = {name: int(len(frame[frame["cycle"] == 1])) for name, frame in frames.items()}
    return {"seed": seed, "clinics": clinics, "first_cycles_per_site": logged, "sigma": sigmas, "failed": failed,
            "fit_seconds": fit_seconds, "evaluation_seconds": evaluation_seconds, "overall": overall}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinics", type=int, default=5)
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--patients", type=int, default=300, help="fresh patients per clinic")
    parser.add_argument("--shares", default="0.1,0.2,0.4", help="shares of ε = 3 for the phase")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--floor", action="store_true", help="only the noise floor of the dose coefficients")
    parser.add_argument("--control", action="store_true",
                        help="only the ridge designs at share 0.2 against models fitted from noise alone")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.floor:
        rows = [row for seed in seeds for row in floor(args.clinics, seed)]
        print(f"{'seed':>4s} {'model':15s}{'coefficient':>12s}{'value':>8s}{'sampling se':>12s}{'ε':>5s}"
              f"{'releases':>9s}{'σ':>7s}{'noise se':>10s}")
        for row in rows:
            print(f"{row['seed']:4d} {row['model']:15s}{row['coefficient']:>12s}{row['value']:8.2f}"
                  f"{row['sampling_se']:12.3f}{row['epsilon']:5.1f}{row['releases']:9d}{row['sigma']:7.2f}"
                  f"{row['noise_se']:10.1f}")
        name = f"structured_dp_floor_{args.clinics}_clinics.json"
        out = args.out or Path(__file__).resolve().parent / "results" / name
        write_record(out, "python benchmarks/structured_dp.py " + " ".join(argv or sys.argv[1:]), {"floor": rows})
        return {"floor": rows}
    shares = [float(s) for s in args.shares.split(",")]
    out = args.out or Path(__file__).resolve().parent / "results" / (
        ("structured_dp" if args.clinics == 5 else f"structured_dp_{args.clinics}_clinics")
        + ("_control" if args.control else "") + ".json")
    results = []
    for seed in seeds:
        results.append(run_seed(args.clinics, seed, args.patients, shares, args.control))
        r = results[-1]
        print(f"seed {seed}: first cycles per site {r['first_cycles_per_site']}; fits {r['fit_seconds']:.0f} s, "
              f"evaluation {r['evaluation_seconds']:.0f} s; overflowed (not evaluated, nan below): {r['failed']}",
              flush=True)
    names = list(dict.fromkeys(name for r in results for name in r["overall"]))
    summary = {}
    soc = np.array([r["overall"]["standard_of_care"]["value"] for r in results])
    print(f"\n{args.clinics} clinics, seeds {seeds}: value / oracle per seed, mean; seeds above SOC's value; σ")
    print(f"{'policy':34s}" + "".join(f"{'s' + str(s):>8s}" for s in seeds) + f"{'mean':>8s}{'>SOC':>6s}{'σ':>8s}")
    for name in names:
        ratios = np.array([r["overall"][name]["value_ratio"] if name in r["overall"] else np.nan for r in results])
        values = np.array([r["overall"][name]["value"] if name in r["overall"] else np.nan for r in results])
        above = int(np.sum(values > soc + 1e-12))
        key = name.split("/")[0].split("#")[0]
        sigma = results[0]["sigma"].get(key.replace("exact_support", "fixed_h_ridge"), float("nan"))
        summary[name] = {"value_ratio_mean": float(np.nanmean(ratios)), "value_ratio": ratios.tolist(),
                         "seeds_above_soc": above, "sigma": sigma}
        print(f"{name:34s}" + "".join(f"{x:8.3f}" for x in ratios) + f"{np.nanmean(ratios):8.3f}"
              + f"{above:>4d}/{len(seeds)}" + (f"{sigma:8.1f}" if not math.isnan(sigma) else ""))
    write_record(out, "python benchmarks/structured_dp.py " + " ".join(argv or sys.argv[1:]),
                 {"summary": summary, "seeds": results})
    return {"summary": summary, "seeds": results}


if __name__ == "__main__":
    main()
