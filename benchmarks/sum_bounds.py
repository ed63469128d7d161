"""Benchmark of the statistics' feasibility check (``shared.sum_bounds``): honest refusals, attacks caught, residue.

    python benchmarks/sum_bounds.py [--worlds 5] [--clinics 5] [--draws 200] [--out FILE.json]

For ``--worlds`` simulated worlds of ``--clinics`` clinics each (``simulation.clinics``, 60 patients per
clinic), every clinic's federated statistics are computed by the site's own code (``SiteStatistics.from_frame``,
and under DP ``client.statistics.private_statistics`` with the real Gaussian release of ``client.dp`` at noise
sd σ per count) and laid out as the secure sum lays them out (``shared.statistics_vector``). Then:

1. honest refusals: ``--draws`` noise draws per world and σ in {1, 5, 20}, half the clinics under DP, checked
   summed (what a masked run checks) and per site (what ``secure-sum = off`` checks); target 0;
2. attacks caught: the largest clinic reports every numeric column's sum × FACTOR (``--attack SITE:inflate``,
   exact statistics) for several factors; the share of worlds where the masked sum is refused and where the
   site, checked alone, is dropped;
3. the largest shift of an encoder mean (in units of the column's declared range) an attacker within its
   allowance achieves: per site (off), every value of the column at the top of the range, against the stated
   bound C_a / C (its share of the column's values); under masks, the pooled sum set to C × the top of the
   range (what a sum check cannot tell from honest), against its bound (hi − pooled mean) / (hi − lo).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.dp import gaussian_release, sensitivity  # noqa: E402
from client.secure_statistics import declared_layout  # noqa: E402
from client.statistics import private_statistics  # noqa: E402
from shared.bounds import declared_range  # noqa: E402
from shared.encoding import SiteStatistics  # noqa: E402
from shared.protocol.privacy import ReleaseFacts  # noqa: E402
from shared.sum_bounds import Contributors, InfeasibleSum, check_statistics  # noqa: E402
from shared.task import NANOPARTICLE_TASK as TASK  # noqa: E402
from simulation.clinics import make_world, simulate_clinic  # noqa: E402

SIGMAS = (1.0, 5.0, 20.0)
FACTORS = (1.02, 1.1, 1.5, 2.0, 5.0, 10.0)


class Release:
    """The DP release of ``client.dp.PhaseRelease`` without its ledger: the same Gaussian noise, at noise sd σ."""

    def __init__(self, noise_sd: float, rng: np.random.Generator) -> None:
        self.noise_sd, self.rng = noise_sd, rng

    def release(self, blocks, index):
        sigma = self.noise_sd / sensitivity(blocks)
        return gaussian_release(blocks, sigma, self.rng), ReleaseFacts("statistics", index, sigma, self.noise_sd,
                                                                       0.0, 1.0, 1e-5)


def feasible(layout, vector, who) -> bool:
    try:
        check_statistics(layout, vector, TASK, who)
    except InfeasibleSum:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, default=5)
    parser.add_argument("--clinics", type=int, default=5)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sum_bounds.json"))
    args = parser.parse_args()
    started = time.time()
    rng = np.random.default_rng(0)
    honest = {"releases": 0, "refused_summed": 0, "refused_alone": 0}
    caught = {f: {"masked": 0, "alone": 0} for f in FACTORS}
    shift_off, shift_masked = [], []
    for world_seed in range(args.worlds):
        world = make_world(args.clinics, seed=100 + world_seed, patients_per_clinic=60)
        frames = [simulate_clinic(world, clinic)[0] for clinic in world.clinics]
        stats = [SiteStatistics.from_frame(f, TASK) for f in frames]
        declared = [float(len(f)) for f in frames]
        layout = declared_layout(stats[0], TASK)  # every value declared: the layout DP sites use
        exact = [layout.vector(s) for s in stats]
        dp_sites = range(0, args.clinics, 2)
        for noise_sd in SIGMAS:
            for _ in range(args.draws):
                vectors, sds = list(exact), []
                for i in dp_sites:
                    noised, facts = private_statistics(stats[i], TASK, Release(noise_sd, rng))
                    vectors[i] = layout.vector(noised)
                    sds.append(facts.noise_sd)
                    honest["refused_alone"] += not feasible(layout, vectors[i], Contributors(1, None, (noise_sd,)))
                for i in set(range(args.clinics)) - set(dp_sites):
                    honest["refused_alone"] += not feasible(layout, vectors[i], Contributors(1, declared[i]))
                honest["refused_summed"] += not feasible(layout, sum(vectors),
                                                         Contributors(args.clinics, None, tuple(sds)))
                honest["releases"] += 1
        attacker = int(np.argmax(declared))
        everyone = Contributors(args.clinics, float(sum(declared)))
        alone = Contributors(1, declared[attacker])
        columns = [(layout.numeric.index(c), c, declared_range(TASK, c)) for c in layout.numeric]
        for factor in FACTORS:
            v = exact[attacker].copy()
            for i, _, _ in columns:
                v[2 + 3 * i + 1] *= factor
                count, s = exact[attacker][2 + 3 * i], exact[attacker][2 + 3 * i + 1]
                if count > 0:  # the centred sum of squares kept, as the inflated plain reply keeps it
                    v[2 + 3 * i + 2] += (v[2 + 3 * i + 1] ** 2 - s ** 2) / count
            caught[factor]["alone"] += not feasible(layout, v, alone)
            caught[factor]["masked"] += not feasible(layout, sum(exact) - exact[attacker] + v, everyone)
        clean = sum(exact)
        for i, name, (lo, hi) in columns:
            at = 2 + 3 * i
            count = exact[attacker][at]
            if count <= 0:
                continue
            v = exact[attacker].copy()
            v[at + 1], v[at + 2] = count * hi, count * hi * hi
            assert feasible(layout, v, alone), name
            total = clean - exact[attacker] + v
            shift = (total[at + 1] / total[at] - clean[at + 1] / clean[at]) / (hi - lo)
            shift_off.append({"column": name, "shift": float(shift), "bound": float(count / clean[at])})
            pooled = clean.copy()
            pooled[at + 1], pooled[at + 2] = clean[at] * hi, clean[at] * hi * hi
            assert feasible(layout, pooled, everyone), name
            mean = clean[at + 1] / clean[at]
            shift_masked.append({"column": name, "shift": float((hi - mean) / (hi - lo)),
                                 "bound": float((hi - mean) / (hi - lo))})
    worst_off = max(shift_off, key=lambda r: r["shift"])
    worst_masked = max(shift_masked, key=lambda r: r["shift"])
    result = {
        "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}", "load_average": os.getloadavg(),
        "worlds": args.worlds, "clinics": args.clinics, "draws": args.draws, "sigmas": SIGMAS,
        "honest": honest, "caught": {str(f): c for f, c in caught.items()},
        "shift_off": {"worst": worst_off, "all_within_bound": all(r["shift"] <= r["bound"] + 1e-9 for r in shift_off)},
        "shift_masked": {"worst": worst_masked}, "seconds": round(time.time() - started, 1)}
    print(f"honest releases {honest['releases']} (σ in {SIGMAS}, {len(range(0, args.clinics, 2))} of "
          f"{args.clinics} DP): refused summed {honest['refused_summed']}, per site {honest['refused_alone']}")
    print("| inflate factor | masked sum refused | site alone dropped |")
    print("|---|---|---|")
    for factor, c in caught.items():
        print(f"| {factor:g} | {c['masked']}/{args.worlds} | {c['alone']}/{args.worlds} |")
    print(f"largest mean shift within allowance, per site (off): {worst_off['shift']:.3f} of the range "
          f"({worst_off['column']}; stated bound C_a/C = {worst_off['bound']:.3f}); all within bound: "
          f"{result['shift_off']['all_within_bound']}")
    print(f"largest mean shift a masked sum cannot tell from honest: {worst_masked['shift']:.3f} of the range "
          f"({worst_masked['column']}: the pooled mean moved to the top of its range)")
    print(f"{result['seconds']} s, load average {result['load_average']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
