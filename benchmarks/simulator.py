"""Benchmark of the ground-truth simulator: episode generation and the oracle. Prints a table, writes JSON.

    python benchmarks/simulator.py [--out benchmarks/results/simulator.json]

Each case runs in a fresh Python process so that its peak resident memory (ru_maxrss) is its own; the
memory of a process that only imports the simulator is measured too, so the table shows what each case
adds. Rates are episodes generated in memory per second (episodes and their daily wearable rows),
and the oracle's time for a patients × formulations × doses grid.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from record import write_record

ROOT = Path(__file__).resolve().parents[1]
CYCLES_PER_PATIENT = 3.3  # measured mean of the default world; used only to size the cohorts


def case_import() -> dict:
    import simulation.clinics  # noqa: F401
    import simulation.oracle  # noqa: F401

    return {}


def case_episodes(n_target: int) -> dict:
    from simulation.clinics import make_world, simulate_clinic
    from simulation.effect import nadir_ratio_table

    nadir_ratio_table()  # one-off table, built at first use; not part of the per-episode cost
    n_clinics = 10
    world = make_world(n_clinics, seed=0, patients_per_clinic=int(n_target / CYCLES_PER_PATIENT / n_clinics))
    start = time.perf_counter()
    episodes = vitals = 0
    for clinic in world.clinics:
        e, v = simulate_clinic(world, clinic)
        episodes += len(e)
        vitals += len(v)
    seconds = time.perf_counter() - start
    return {"episodes": episodes, "vitals_rows": vitals, "seconds": seconds, "episodes_per_s": episodes / seconds}


def case_oracle(n_patients: int, n_doses: int, n_formulations: int) -> dict:
    import numpy as np

    from simulation.clinics import make_world
    from simulation.effect import nadir_ratio_table
    from simulation.oracle import PatientState, best_action
    from simulation.patients import Population, sample_patients

    nadir_ratio_table()
    world = make_world(1, seed=0)
    rng = np.random.default_rng(0)
    p = sample_patients(rng, n_patients, Population())
    state = PatientState(
        age_years=p.age_years, female=p.female, bsa_m2=p.bsa_m2, bilirubin_umol_l=p.bilirubin_umol_l,
        creatinine_clearance_ml_min=p.creatinine_clearance_ml_min, anc_baseline_e9_l=p.anc_baseline_e9_l,
        ecog=p.ecog, tumour_type=p.tumour_type, tumour_burden_mm=p.tumour_burden_mm,
        cumulative_dose_mg_m2=p.prior_dose_mg_m2)
    catalogue = world.library.take(np.arange(n_formulations))
    doses = np.linspace(10, 80, n_doses)
    start = time.perf_counter()
    choice = best_action(state, catalogue, doses, [21])
    seconds = time.perf_counter() - start
    return {"grid": f"{n_patients} x {n_formulations} x {n_doses} x 1", "seconds": seconds,
            "mean_best_utility": float(choice.utility.mean())}


CASES = {
    "import": (case_import, {}),
    "episodes_1e5": (case_episodes, {"n_target": 100_000}),
    "episodes_1e6": (case_episodes, {"n_target": 1_000_000}),
    "oracle_1e4x50x5": (case_oracle, {"n_patients": 10_000, "n_doses": 50, "n_formulations": 5}),
}


def run_case(name: str) -> dict:
    """Run one case in a fresh interpreter; returns its figures and its peak RSS in MiB."""
    out = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "simulator.json")
    args = parser.parse_args()
    if args.case:
        fn, kwargs = CASES[args.case]
        result = fn(**kwargs)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    results = {name: run_case(name) for name in CASES}
    base = results["import"]["peak_rss_mib"]
    print(f"{'case':18s} {'episodes':>9s} {'vitals rows':>11s} {'seconds':>8s} {'episodes/s':>11s} "
          f"{'peak RSS MiB':>12s} {'above import':>12s}")
    for name, r in results.items():
        print(f"{name:18s} {r.get('episodes', ''):>9} {r.get('vitals_rows', ''):>11} "
              f"{r.get('seconds', float('nan')):8.2f} {r.get('episodes_per_s', float('nan')):11.0f} "
              f"{r['peak_rss_mib']:12.0f} {r['peak_rss_mib'] - base:12.0f}")
    write_record(args.out, "python benchmarks/simulator.py", results)


if __name__ == "__main__":
    main()
