"""Benchmark: the release gate's off-policy estimate of (candidate − standard of care) against the simulator's truth.

    python benchmarks/ope_coverage.py [--clinics 5] [--seeds 0,1,2,3] [--patients 200]

For each world seed, ``make_world(clinics, seed)`` (5 clinics: the ``fednano simulate`` default world) logs its
episodes (``simulate_clinic``); each site keeps its training split (80:10:10 by patient, split seed = world seed,
as ``fednano simulate`` and ``benchmarks/structured_policy.py`` seed it). The structured policy is fitted on the
training splits (``fit_structured_policy``: the added per-site sums) and these candidates are judged:

- ``structured`` (absolute pessimistic score, z = 1) and ``structured_vs_soc`` (relative to standard of care,
  z = 0.5), as ``benchmarks/structured_policy.py`` builds them;
- ``rarest_top_dose``: a deliberately bad candidate, ``tests/test_off_policy.py``'s construction (the formulation
  logged least often over all the world's cycles, at the top dose, for everyone; outcome models the structured
  policy's), here restricted to the patient's catalogue (the world-rarest formulation the site stocks) and to
  the hard rules' cap ("top allowed dose"), so that it is a policy the simulator can score at every clinic;
- ``simulator_soc``: the simulator's standard of care as a candidate (the clinic's one usual formulation at the
  label dose, through ``shared.dosing_policy.label_actions``);
- ``site_soc``: the site's own standard of care as ``client.ope`` defines it (per tumour type its most logged
  formulation, label dose) — the null candidate: its Γ equals standard of care's row by row, so its estimate
  and its true difference are 0 by construction (a check of the arithmetic, left out of the summaries).

**Estimate.** Per site ``client.ope.site_value_sums`` (the code the sites run, on their held-out first cycles,
no DP) and the combined ``shared.off_policy.gate``: "DR, model's lower bound off support" (off the logs'
support a cycle adds to standard of care's Γ the outcome models' lower 95 % bound on the improvement, never
more than the plain difference: ``client.ope.off_support_credit``). The same Γ values are recorded from
``client.ope.dr_gamma`` and ``off_support_credit`` while ``site_value_sums`` runs (the module attributes are
wrapped for the call, nothing else changes) and give two more estimators through the same ``gate``: "DR, no
credit off support" (standard of care's Γ there: the gate before 2026-12-02's change) and "plain DR"
(Γ(candidate) everywhere, off the support too). Off support: the share of held-out cycles whose candidate
action the logging policy takes with probability below ``MIN_SUPPORT``.

**Truth.** ``--patients`` new first-cycle patients per clinic (``simulation.policy_evaluation.fresh_patients``,
seed = world seed + 1 as ``simulation.experiment``), every action scored with ``true_outcomes`` on the
patients' true state, as ``evaluate_policies`` does (its oracle is not needed here). Two truths:

- **estimand**: what the gate estimates — per site the true value of the candidate (deciding with the same
  catalogue the site's estimate used: its logged formulations the policy knows) minus the site's standard of
  care (``client.ope``'s), averaged over sites weighted by their held-out first cycles (the gate pools cycles);
- **experiment.py**: ``simulation.experiment.gate_against_truth``'s ``true_difference`` — the candidate
  (deciding with the clinic's full catalogue) minus the *simulator's* standard of care (the clinic's one usual
  formulation at the label dose), over all evaluation patients, every clinic weighted equally.

Prints a table and writes ``benchmarks/results/ope_coverage.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from record import write_record  # noqa: E402
from structured_policy import site_training_frames, usual_formulation  # noqa: E402

import client.ope as ope  # noqa: E402
from client.site_gate import UsualFormulations  # noqa: E402
from shared.dosing_policy import label_actions  # noqa: E402
from shared.off_policy import ValueSums, gate  # noqa: E402
from shared.structured_policy import (  # noqa: E402
    StructuredDosingPolicy,
    StructuredObjective,
    catalogue_of,
    fit_structured_policy,
)
from shared.task import NANOPARTICLE_TASK  # noqa: E402
from simulation.clinics import make_world, simulate_clinic  # noqa: E402
from simulation.policy_evaluation import fresh_patients, standard_of_care, true_outcomes  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "ope_coverage.json"
CANDIDATES = ("structured", "structured_vs_soc", "rarest_top_dose", "simulator_soc", "site_soc")
ESTIMATORS = ("dr_lower_bound_off_support", "dr_no_credit_off_support", "plain_dr")
NULL = "site_soc"
"""Identical to the site's standard of care by construction: a check, not evidence, so out of the summaries."""


class RuleCandidate(StructuredDosingPolicy):
    """A fixed rule judged with the structured policy's outcome models, hard rules and action space (the test's
    ``TopDoseOfTheRarest`` construction): ``formulation_of(frame)`` per row; the label dose (standard of care's
    dosing, ``shared.dosing_policy.label_actions``) or, with ``top_dose``, the highest dose the hard rules allow."""

    formulation_of = None
    top_dose = False

    @classmethod
    def like(cls, policy: StructuredDosingPolicy, formulation_of, top_dose: bool = False) -> RuleCandidate:
        rule = cls(**{f.name: getattr(policy, f.name) for f in dataclasses.fields(StructuredDosingPolicy)})
        rule.formulation_of, rule.top_dose = formulation_of, top_dose
        return rule

    def recommend_frame(self, frame: pd.DataFrame, adjust: bool = False) -> pd.DataFrame:
        frame = frame.reset_index(drop=True)
        formulation = self.formulation_of(frame)
        if not self.top_dose:
            return label_actions(self, frame, formulation)
        cap, verdict = self.safety_limits(frame)
        return pd.DataFrame({"action": verdict, "formulation_id": np.asarray(formulation, dtype=object),
                             "dose_mg_m2": np.minimum(self.action_space.dose_max_mg_m2, cap),
                             "interval_days": self.action_space.intervals(frame["tumour_type"])[:, 0]})


def rarest_of(counts: pd.Series):
    """Per row: the formulation of the row's catalogue logged least often in the whole world (ties by id)."""
    rank = {f: (n, f) for f, n in counts.items()}
    return lambda frame: np.array([min((f for f in catalogue if f in rank), key=rank.__getitem__)
                                   for catalogue in frame["catalogue"]], dtype=object)


@contextlib.contextmanager
def recorded(name: str):
    """The outputs of ``client.ope.<name>`` while ``site_value_sums`` runs, per call."""
    calls, original = [], getattr(ope, name)

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out)
        return out

    setattr(ope, name, recording)
    try:
        yield calls
    finally:
        setattr(ope, name, original)


def site_estimates(policy, episodes: pd.DataFrame, split_seed: int) -> dict:
    """The site's released sums (``site_value_sums``), and the no-credit and plain-DR sums from the same Γ."""
    with recorded("dr_gamma") as calls, recorded("off_support_credit") as credits:
        official = ope.site_value_sums(policy, episodes, NANOPARTICLE_TASK, split_seed)
    if not calls:  # the site could not judge (too few cycles): nothing to record
        return {"official": official, "no_credit": official, "plain": official, "n": 0, "off_support": 0,
                "soc_off_support": 0}
    (candidate, supported), (standard, soc_supported) = calls
    recomputed = ValueSums.of(np.where(supported, candidate, standard + credits[0]), standard)
    assert np.allclose(dataclasses.astuple(recomputed), dataclasses.astuple(official)), "recorded Γ ≠ released sums"
    return {"official": official, "no_credit": ValueSums.of(np.where(supported, candidate, standard), standard),
            "plain": ValueSums.of(candidate, standard), "n": int(len(candidate)),
            "off_support": int((~supported).sum()), "soc_off_support": int((~soc_supported).sum())}


def ope_catalogue(policy: StructuredDosingPolicy, episodes: pd.DataFrame) -> tuple[str, ...]:
    """The catalogue ``client.ope`` gives the records it judges: the site's logged formulations the policy knows."""
    logged = set(ope.first_cycles(episodes)["formulation_id"].astype(str))
    return tuple(sorted(logged & set(policy.formulations)))


def run_seed(clinics: int, seed: int, patients: int) -> dict:
    start = time.perf_counter()
    world = make_world(clinics, seed)
    frames = site_training_frames(world, seed)
    episodes = {c.name: simulate_clinic(world, c)[0] for c in world.clinics}
    parts = list(frames.values())
    policy = fit_structured_policy(parts, catalogue_of(pd.concat(parts, ignore_index=True)))
    versus_soc = dataclasses.replace(policy, objective=StructuredObjective(z=0.5, reference="standard_of_care"))
    counts = pd.concat(episodes.values())["formulation_id"].astype(str).value_counts()
    usual = {name: UsualFormulations.of(ope.first_cycles(frame)) for name, frame in episodes.items()}
    clinic_of = {c.name: c for c in world.clinics}

    def candidate(name: str, site: str):
        if name == "structured":
            return policy
        if name == "structured_vs_soc":
            return versus_soc
        if name == "rarest_top_dose":
            return RuleCandidate.like(policy, rarest_of(counts), top_dose=True)
        if name == "simulator_soc":
            usual_id = usual_formulation(world, clinic_of[site])
            return RuleCandidate.like(policy, lambda frame: np.full(len(frame), usual_id, dtype=object))
        return RuleCandidate.like(policy, lambda frame: usual[site].for_records(frame["tumour_type"]))

    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    estimates = {name: {site: site_estimates(candidate(name, site), episodes[site], seed) for site in episodes}
                 for name in CANDIDATES}
    ope_seconds = time.perf_counter() - start

    start = time.perf_counter()
    truth_parts: dict[str, dict[str, dict]] = {name: {} for name in CANDIDATES}
    for clinic in world.clinics:
        state, frame = fresh_patients(world, clinic, patients, seed + 1)
        formulations = world.catalogue(clinic)
        utility = {"simulator_soc_truth": true_outcomes(
            state, formulations, standard_of_care(world, clinic, policy)(frame))["utility"],
            "site_soc_truth": true_outcomes(state, formulations, label_actions(
                policy, frame, usual[clinic.name].for_records(frame["tumour_type"])))["utility"]}
        site_catalogue = ope_catalogue(policy, episodes[clinic.name])
        as_site = frame.assign(catalogue=[site_catalogue] * len(frame))
        same_catalogue = all(tuple(sorted(c)) == site_catalogue for c in frame["catalogue"])
        for name in CANDIDATES:
            decide = candidate(name, clinic.name).recommend_frame
            mine = true_outcomes(state, formulations, decide(as_site, adjust=False))["utility"]
            full = mine if same_catalogue else true_outcomes(state, formulations,
                                                              decide(frame, adjust=False))["utility"]
            versus_site = mine - utility["site_soc_truth"]
            truth_parts[name][clinic.name] = {
                "vs_site_soc": float(versus_site.mean()), "vs_site_soc_var": float(versus_site.var(ddof=1)),
                "full_catalogue_vs_simulator_soc": full - utility["simulator_soc_truth"],
                "same_catalogue": same_catalogue}
    truth_seconds = time.perf_counter() - start

    rows = []
    for name in CANDIDATES:
        sites = estimates[name]
        n = {site: sites[site]["n"] for site in sites}
        total = sum(n.values())
        parts_ = truth_parts[name]
        estimand = sum(n[s] * parts_[s]["vs_site_soc"] for s in sites) / total
        estimand_se = float(np.sqrt(sum((n[s] / total) ** 2 * parts_[s]["vs_site_soc_var"] / patients
                                        for s in sites)))
        experiment = float(np.concatenate([parts_[s]["full_catalogue_vs_simulator_soc"] for s in sites]).mean())
        off_support = sum(sites[s]["off_support"] for s in sites) / total
        soc_off_support = sum(sites[s]["soc_off_support"] for s in sites) / total
        for estimator in ESTIMATORS:
            key = {"dr_lower_bound_off_support": "official", "dr_no_credit_off_support": "no_credit"}.get(
                estimator, "plain")
            result = gate({s: sites[s][key] for s in sites})
            rows.append({
                "seed": seed, "candidate": name, "estimator": estimator, "n": result.n,
                "estimate": result.estimate, "lower": result.lower, "upper": result.upper, "passed": result.passed,
                "off_support_share": off_support, "soc_off_support_share": soc_off_support,
                "true_difference": estimand, "true_difference_se": estimand_se,
                "covered": bool(result.lower <= estimand <= result.upper),
                "error": result.estimate - estimand,
                "true_difference_experiment": experiment,
                "covered_experiment": bool(result.lower <= experiment <= result.upper),
                "per_site": {s: {"n": n[s], "off_support": sites[s]["off_support"],
                                 "estimate": result.per_site[s]["estimate"], "lower": result.per_site[s]["lower"],
                                 "upper": result.per_site[s]["upper"],
                                 "true_difference": parts_[s]["vs_site_soc"],
                                 "same_catalogue": parts_[s]["same_catalogue"]} for s in sites}})
    return {"seed": seed, "clinics": clinics, "held_out_first_cycles": {s: estimates["structured"][s]["n"]
                                                                       for s in episodes},
            "simulator_usual_formulation": {c.name: usual_formulation(world, c) for c in world.clinics},
            "site_usual_formulations": {s: u.to_dict() for s, u in usual.items()},
            "seconds": {"fit": fit_seconds, "ope": ope_seconds, "truth": truth_seconds}, "rows": rows}


def label(estimator: str) -> str:
    return {"dr_lower_bound_off_support": "DR, model's lower bound off support",
            "dr_no_credit_off_support": "DR, no credit off support", "plain_dr": "plain DR"}[estimator]


def print_rows(rows: list[dict]) -> None:
    print("| seed | candidate | estimator | off support | estimate [95 % interval] | truth (estimand) | covered | "
          "truth (experiment.py) | covered | passed | error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['candidate']} | {label(r['estimator'])} | {r['off_support_share']:.0%} | "
              f"{r['estimate']:+.4f} [{r['lower']:+.4f}, {r['upper']:+.4f}] | "
              f"{r['true_difference']:+.4f} ± {r['true_difference_se']:.4f} | {'yes' if r['covered'] else 'no'} | "
              f"{r['true_difference_experiment']:+.4f} | {'yes' if r['covered_experiment'] else 'no'} | "
              f"{'yes' if r['passed'] else 'no'} | {r['error']:+.4f} |", flush=True)


def summarise(rows: list[dict]) -> dict:
    """Per estimator over the non-null rows: error, coverage, and the gate's decisions against the truth."""
    summary = {}
    for estimator in ESTIMATORS:
        mine = [r for r in rows if r["estimator"] == estimator and r["candidate"] != NULL]
        better = [r for r in mine if r["true_difference"] > 0]
        worse = [r for r in mine if r["true_difference"] < 0]
        summary[estimator] = {
            "rows": len(mine),
            "mean_absolute_error": float(np.mean([abs(r["error"]) for r in mine])),
            "mean_absolute_error_experiment": float(np.mean([abs(r["estimate"] - r["true_difference_experiment"])
                                                             for r in mine])),
            "coverage": float(np.mean([r["covered"] for r in mine])),
            "coverage_experiment": float(np.mean([r["covered_experiment"] for r in mine])),
            "truly_better": len(better), "truly_better_passed": sum(r["passed"] for r in better),
            "truly_worse": len(worse), "truly_worse_stopped": sum(not r["passed"] for r in worse),
            "by_candidate": {
                name: {"mean_absolute_error": float(np.mean([abs(r["error"]) for r in part])),
                       "covered": sum(r["covered"] for r in part), "passed": sum(r["passed"] for r in part),
                       "truly_better": sum(r["true_difference"] > 0 for r in part), "seeds": len(part)}
                for name in CANDIDATES if name != NULL
                for part in [[r for r in mine if r["candidate"] == name]]}}
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinics", type=int, default=5)
    parser.add_argument("--seeds", default="0,1,2,3", help="world seeds, comma-separated")
    parser.add_argument("--patients", type=int, default=200, help="fresh patients per clinic for the truth")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for seed in seeds:
        results.append(run_seed(args.clinics, seed, args.patients))
        r = results[-1]
        print(f"\nseed {seed}: held-out first cycles {r['held_out_first_cycles']}; fit {r['seconds']['fit']:.0f} s, "
              f"estimates {r['seconds']['ope']:.0f} s, truth {r['seconds']['truth']:.0f} s")
        print_rows(r["rows"])
    rows = [row for r in results for row in r["rows"]]
    summary = summarise(rows)
    print(f"\nover seeds {seeds}, candidates other than {NULL}:")
    for estimator, s in summary.items():
        print(f"{label(estimator)}: mean |error| {s['mean_absolute_error']:.4f} (vs experiment.py's truth "
              f"{s['mean_absolute_error_experiment']:.4f}); coverage {s['coverage']:.0%} "
              f"(experiment.py's truth {s['coverage_experiment']:.0%}); truly better passed "
              f"{s['truly_better_passed']}/{s['truly_better']}; truly worse stopped "
              f"{s['truly_worse_stopped']}/{s['truly_worse']}")
        for name, c in s["by_candidate"].items():
            print(f"    {name:18s} mean |error| {c['mean_absolute_error']:.4f}, covered {c['covered']}/{c['seeds']}, "
                  f"passed {c['passed']}/{c['seeds']}, truly better at {c['truly_better']}/{c['seeds']} seeds")
    write_record(args.out, "python benchmarks/ope_coverage.py " + " ".join(argv or sys.argv[1:]),
                 {"summary": summary, "seeds": results}, patients_per_clinic=args.patients)
    return {"summary": summary, "seeds": results}


if __name__ == "__main__":
    main()
