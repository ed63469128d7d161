"""Benchmark: dose adjustment across cycles (fitted-Q) vs one-shot dosing, in multi-cycle simulated rollouts.

    python benchmarks/policy_adjustment.py [--clinics 5] [--seed 0] [--patients 300]
                                           [--bundle runs/simulate/policy/v1 --trust KIT/.../policy_signing.pub]

The clinics of ``make_world(clinics, seed)`` (the world ``fednano simulate`` uses) log their trajectories;
the dose adjuster is fitted by fitted-Q iteration from the sums of every site's training-split transitions
(``client.adjustment_handlers.training_transitions``, ``shared.dose_adjustment.fitted_q_iteration``: the code
the ServerApp runs over Flower, which tests/test_dose_adjustment.py shows equals the pooled fit). Then fresh
patients of every clinic are treated for up to the clinic's cycle limit (``simulation.policy_rollout``) by:
standard of care (SOC), SOC with the fitted-Q dose from cycle 2 (γ = 0.9, and γ = 0: myopic), with a signed
policy bundle also the one-shot DosingPolicy every cycle and the DosingPolicy with its adjustment, and the
myopic oracle. Prints a table and writes ``benchmarks/results/policy_adjustment.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script

from record import write_record  # noqa: E402

from shared.dose_adjustment import DoseAdjuster, fitted_q_iteration, scaling_sums  # noqa: E402
from shared.task import NANOPARTICLE_TASK, assign_split  # noqa: E402
from simulation.clinics import make_world, simulate_clinic  # noqa: E402
from simulation.policy_rollout import compare_policies, standard_of_care, with_adjustment  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "policy_adjustment.json"
COLUMNS = ("value", "regret", "response_rate", "toxicity_rate", "chf_rate", "mean_dose_mg_m2", "cycles_per_patient")


def site_training_transitions(world, split_seed: int):
    """Each clinic's logged transitions of its training-split patients (what each site computes on)."""
    from shared.dose_adjustment import site_transitions

    parts = []
    for clinic in world.clinics:
        episodes, vitals = simulate_clinic(world, clinic)
        train = episodes[assign_split(episodes, NANOPARTICLE_TASK, split_seed) == "train"].reset_index(drop=True)
        parts.append(site_transitions(train, vitals[vitals["episode_id"].astype(str).isin(set(train["episode_id"]))]))
    return parts


def fit(parts, **params) -> DoseAdjuster:
    return fitted_q_iteration(DoseAdjuster(**params), lambda: [scaling_sums(t) for t in parts],
                              lambda adjuster: [adjuster.ridge_sums(t) for t in parts])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinics", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patients", type=int, default=300, help="fresh patients per clinic")
    parser.add_argument("--bundle", type=Path, help="a signed policy bundle (adds the DosingPolicy rows)")
    parser.add_argument("--trust", type=Path, help="the coordinator key the bundle verifies against")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    world = make_world(args.clinics, args.seed)
    parts = site_training_transitions(world, split_seed=args.seed)
    start = time.perf_counter()
    adjuster = fit(parts, gamma=0.9)
    fit_seconds = time.perf_counter() - start
    myopic = fit(parts, gamma=0.0)
    policies = {
        "standard_of_care": lambda c: standard_of_care(world, c),
        "soc+fitted_q": lambda c: with_adjustment(standard_of_care(world, c), adjuster),
        "soc+fitted_q_myopic": lambda c: with_adjustment(standard_of_care(world, c), myopic),
    }
    if args.bundle is not None:
        from shared.dosing_policy import DosingPolicy

        policy = DosingPolicy.from_bundle(args.bundle, args.trust)
        policy.adjuster = adjuster if policy.adjuster is None else policy.adjuster
        policies["one_shot_policy"] = lambda c: (lambda frame: policy.recommend_frame(frame, adjust=False))
        policies["policy+fitted_q"] = lambda c: (lambda frame: policy.recommend_frame(frame, adjust=True))
    start = time.perf_counter()
    result = compare_policies(world, policies, args.patients, seed=args.seed + 1)
    rollout_seconds = time.perf_counter() - start

    print(f"fitted-Q: {adjuster.n_transitions_} training transitions from {len(parts)} sites, "
          f"{adjuster.iterations} iterations in {fit_seconds:.2f} s (last change {adjuster.history_[-1]:.3g}); "
          f"rollouts {rollout_seconds:.1f} s")
    print(f"{'policy':24s}" + "".join(f"{c:>19s}" for c in COLUMNS))
    for name, numbers in result["overall"].items():
        print(f"{name:24s}" + "".join(f"{numbers[c]:19.4f}" for c in COLUMNS))
    print("\nvalue per site")
    names = list(result["overall"])
    print(f"{'site':12s}" + "".join(f"{n:>22s}" for n in names))
    for site, block in result["per_site"].items():
        print(f"{site:12s}" + "".join(f"{block[n]['value']:22.4f}" for n in names))
    write_record(args.out, "python benchmarks/policy_adjustment.py " + " ".join(argv or sys.argv[1:]), result,
                 adjuster={"transitions": adjuster.n_transitions_, "fit_seconds": fit_seconds,
                           "history": adjuster.history_, "params": adjuster.get_params()},
                 rollout_seconds=rollout_seconds)
    return result


if __name__ == "__main__":
    main()
