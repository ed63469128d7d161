"""Benchmark: the structured dose–response policy against the oracle, standard of care and random, per seed.

    python benchmarks/structured_policy.py [--clinics 10] [--seeds 0,1,2,3] [--patients 500]

For each world seed, the clinics of ``make_world(clinics, seed)`` log their episodes; each site keeps its
training split (80:10:10 by patient, seeded like ``fednano simulate``). The structured policy
(:mod:`shared.structured_policy`) is fitted the federated way: the three outcome models by Newton–Raphson on
the *added per-site sums* (``fit_by_sums``), the support from added per-site counts — the code the federation
runs, without the messaging — and checked against the same models fitted on the pooled rows (they must agree
to float noise). Then 500 new first-cycle patients of every clinic are treated by each policy and scored with
their true state (``simulation.policy_evaluation``): value / oracle, grade ≥ 3 toxicity rate, and per site
whether the policy's true value is above standard of care's.

Policies: oracle (1.0 by definition), standard of care (the clinic's usual formulation at the label dose),
random (uniform over catalogue × allowed doses), ``structured`` (absolute pessimistic score, z = 1) and
``structured_vs_soc`` (leaves standard of care only where the lower bound of the predicted improvement over
it is positive, z = 0.5). Prints a table and writes ``benchmarks/results/structured_policy.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from record import write_record  # noqa: E402

from shared.dosing_policy import DosingPolicy  # noqa: E402
from shared.structured_policy import (  # noqa: E402
    USUAL_FORMULATION,
    StructuredDosingPolicy,
    StructuredObjective,
    catalogue_of,
    fit_structured_policy,
)
from shared.task import NANOPARTICLE_TASK, assign_split  # noqa: E402
from simulation.clinics import make_world, simulate_clinic  # noqa: E402
from simulation.policy_evaluation import evaluate_policies, random_decider  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "structured_policy.json"
POLICIES = ("oracle", "standard_of_care", "random", "structured", "structured_vs_soc")
MIN_SITE_PATIENTS = 30
"""Sites with at least this many logged patients are judged one by one against standard of care (issue 12)."""


def site_training_frames(world, split_seed: int) -> dict[str, pd.DataFrame]:
    """Each clinic's training-split episodes (what each site fits on)."""
    frames = {}
    for clinic in world.clinics:
        episodes, _ = simulate_clinic(world, clinic)
        frames[clinic.name] = episodes[assign_split(episodes, NANOPARTICLE_TASK, split_seed) == "train"]
    return frames


def largest_difference_to_pooled(policy: StructuredDosingPolicy, frames: list[pd.DataFrame]) -> float:
    """Largest |federated − pooled| coefficient over the three models, relative to max(1, |pooled|)."""
    pooled = pd.concat(frames, ignore_index=True)
    worst = 0.0
    for model in (policy.response, policy.neutropenia, policy.other_toxicity):
        reference = type(model)(model.formulations).fit(pooled)
        scale = np.maximum(1.0, np.abs(reference.coef_))
        worst = max(worst, float(np.max(np.abs(model.coef_ - reference.coef_) / scale)))
    return worst


def usual_formulation(world, clinic) -> str:
    """The clinic's usual formulation: what its standard of care gives (``simulation.policy_rollout``)."""
    return str(world.catalogue(clinic).formulation_id[int(np.argmax(clinic.formulation_preference))])


def run_seed(clinics: int, seed: int, patients: int) -> dict:
    world = make_world(clinics, seed)
    frames = site_training_frames(world, seed)
    parts = list(frames.values())
    catalogue = catalogue_of(pd.concat(parts, ignore_index=True))
    start = time.perf_counter()
    absolute = fit_structured_policy(parts, catalogue)
    fit_seconds = time.perf_counter() - start
    difference = largest_difference_to_pooled(absolute, parts)
    assert difference < 1e-6, f"seed {seed}: federated fit differs from pooled by {difference:.3g}"
    versus_soc = dataclasses.replace(absolute, objective=StructuredObjective(z=0.5, reference="standard_of_care"))
    limits = DosingPolicy(encoder=None, members={}, formulations={})  # default action space and safety rules
    clinic_of = {c.name: c for c in world.clinics}

    def decider(policy: StructuredDosingPolicy):
        return lambda site: (lambda frame: policy.recommend_frame(
            frame.assign(**{USUAL_FORMULATION: usual_formulation(world, clinic_of[site])})))

    policies = {"random": lambda site: random_decider(limits, seed=seed + 2),  # as simulation.experiment
                "structured": decider(absolute), "structured_vs_soc": decider(versus_soc)}
    start = time.perf_counter()
    evaluation = evaluate_policies(world, policies, limits, n_per_site=patients, seed=seed + 1)
    evaluation_seconds = time.perf_counter() - start
    logged = {name: int(frame["patient_id"].nunique()) for name, frame in frames.items()}
    judged = [name for name, n in logged.items() if n >= MIN_SITE_PATIENTS]
    per_site_vs_soc = {
        policy: {site: evaluation["per_site"][site][policy]["value"]
                 - evaluation["per_site"][site]["standard_of_care"]["value"] for site in judged}
        for policy in ("random", "structured", "structured_vs_soc")}
    iterations = {m.outcome: m.n_iter_ for m in (absolute.response, absolute.neutropenia, absolute.other_toxicity)}
    return {"seed": seed, "clinics": clinics, "logged_patients": logged, "fit_seconds": fit_seconds,
            "evaluation_seconds": evaluation_seconds, "newton_iterations": iterations,
            "largest_relative_difference_federated_vs_pooled": difference,
            "overall": evaluation["overall"], "per_site": evaluation["per_site"],
            "per_site_value_minus_soc": per_site_vs_soc}


def print_seed(result: dict) -> None:
    overall = result["overall"]
    print(f"\nseed {result['seed']}: {result['clinics']} clinics, {sum(result['logged_patients'].values())} logged "
          f"training patients; fit {result['fit_seconds']:.1f} s (Newton iterations {result['newton_iterations']}), "
          f"federated vs pooled coefficients: largest relative difference "
          f"{result['largest_relative_difference_federated_vs_pooled']:.1e}")
    print(f"{'policy':20s}{'value':>9s}{'value/oracle':>14s}{'response':>10s}{'tox>=3':>9s}"
          f"{'sites above SOC':>17s}{'worst site - SOC':>18s}")
    for name in POLICIES:
        o = overall[name]
        gaps = result["per_site_value_minus_soc"].get(name)
        above = f"{sum(g > 0 for g in gaps.values())}/{len(gaps)}" if gaps else "-"
        worst = f"{min(gaps.values()):+.4f}" if gaps else "-"
        print(f"{name:20s}{o['value']:9.4f}{o['value_ratio']:14.3f}{o['response_rate']:10.3f}"
              f"{o['toxicity_rate']:9.3f}{above:>17s}{worst:>18s}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinics", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2,3", help="world seeds, comma-separated")
    parser.add_argument("--patients", type=int, default=500, help="fresh patients per clinic")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for seed in seeds:
        results.append(run_seed(args.clinics, seed, args.patients))
        print_seed(results[-1])
    summary = {}
    print(f"\nover seeds {seeds} (mean ± sd of value / oracle; toxicity rate; seeds where the policy beats SOC)")
    for name in POLICIES:
        ratios = np.array([r["overall"][name]["value_ratio"] for r in results])
        tox = np.array([r["overall"][name]["toxicity_rate"] for r in results])
        beats = [r["seed"] for r in results
                 if r["overall"][name]["value"] > r["overall"]["standard_of_care"]["value"]]
        summary[name] = {"value_ratio_mean": float(ratios.mean()), "value_ratio_sd": float(ratios.std(ddof=1))
                         if len(ratios) > 1 else 0.0, "toxicity_rate_mean": float(tox.mean()),
                         "seeds_above_soc": beats}
        print(f"{name:20s}{ratios.mean():7.3f} ± {summary[name]['value_ratio_sd']:.3f}   tox {tox.mean():.3f}   "
              f"above SOC at seeds {beats}")
    write_record(args.out, "python benchmarks/structured_policy.py " + " ".join(argv or sys.argv[1:]),
                 {"summary": summary, "seeds": results})
    return {"summary": summary, "seeds": results}


if __name__ == "__main__":
    main()
