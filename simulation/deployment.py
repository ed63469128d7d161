"""The closed loop: a deployed policy treats new patients, their outcomes return to the sites, the federation refits.

Issue 12 item 4 (``fednano simulate --deploy-cycles K``). After the first federated run has installed version 1
at the simulated clinics, each deployment period:

1. every clinic treats ``patients`` new patients of its own population (:func:`simulation.policy_rollout.
   treat_clinic`, up to the clinic's ``max_cycles`` each) with the policy it *serves*: the version installed in
   its own store (:class:`client.policy_store.PolicyStore`, verified against its kit's trust key), with the
   dose adjustment of later cycles (``recommend_frame(adjust=True)``); standard of care where nothing is
   installed, or where the release gate found the installed version significantly worse than standard of
   care on that site's own logs: the verdict the coordinator sent the site with the bundle, read from the
   site's store as ``fednano serve`` reads it (:meth:`client.policy_store.PolicyStore.site_gate`);
2. the simulator produces the true outcomes and the wearable rows of those cycles, and the clinic appends
   them to its own ``episodes.csv`` and ``vitals.csv`` — then the site is validated again exactly as any site
   file (:func:`shared.validation.load_site`), so a period that wrote a bad row stops the loop;
3. the same patients (same seed) are treated under standard of care too, which only the simulator can do:
   the period's **cost against standard of care** is the difference of the mean true utilities per cycle;
4. the federation runs again on the grown data (same kit, so the next version number), gates and ships.

Each period's own figures use the rollout's *true expected* outcomes (``utility`` per cycle, as
:mod:`simulation.policy_rollout` defines it); each version's value / oracle is measured exactly as version 1's
(:func:`simulation.policy_evaluation.evaluate_policies`, fresh first-cycle patients of every clinic).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from client.policy_store import PolicyStore, site_store_root
from shared.policy_loader import AnyPolicy, policy_from_bundle
from shared.validation import load_site
from simulation.clinics import World
from simulation.policy_rollout import standard_of_care, treat_clinic


@dataclass(frozen=True)
class Served:
    """What a clinic serves in a period: ``version`` (None: standard of care) and why."""

    version: int | None
    reason: str


def served_policy(site: Path, trust_key: Path) -> tuple[AnyPolicy | None, Served]:
    """The policy a site serves: its store's installed version, unless the verdict stored with that version (the
    release gate on this site's own logs) finds it worse than standard of care — the product's rule
    (:mod:`client.site_gate`); the simulator's standard of care is then the clinic's own practice."""
    store = PolicyStore(site_store_root(site), trust_key)
    installed = store.installed_path()
    if installed is None:
        return None, Served(None, "no policy installed: standard of care")
    policy = policy_from_bundle(installed, trust_key)  # the ensemble or the structured policy
    gate = store.site_gate()
    if gate is not None and gate.version == policy.version and gate.worse:
        return None, Served(None, f"v{policy.version} installed, but the site's own logs find it worse than "
                                  f"standard of care ({gate.verdict.describe()}): standard of care served")
    return policy, Served(policy.version, f"v{policy.version} installed and served")


def append_rows(path: Path, rows: pd.DataFrame) -> None:
    """Append ``rows`` to the site CSV at ``path`` in the column order of its header."""
    header = pd.read_csv(path, nrows=0).columns.tolist()
    missing = sorted(set(header) - set(rows.columns))
    if missing:
        raise ValueError(f"{path}: the new rows lack the column(s) {missing}")
    rows[header].to_csv(path, mode="a", header=False, index=False)


def treat_period(world: World, sites: dict[str, tuple[Path, Path]], period: int, patients: int,
                 seed: int) -> dict[str, dict]:
    """One deployment period at every clinic of ``sites`` (name → (site folder, trust key)): treat, append,
    re-validate. Returns per site what was served, the patients and cycles treated, and the mean true utility
    per cycle under the served policy and under standard of care for the same patients."""
    result = {}
    for clinic in world.clinics:
        if clinic.name not in sites:
            continue
        folder, trust = sites[clinic.name]
        policy, served = served_policy(folder, trust)
        soc = standard_of_care(world, clinic)
        decide = soc if policy is None else (lambda frame, p=policy: p.recommend_frame(frame, adjust=True))
        period_seed = seed * 1000 + period
        treated = treat_clinic(world, clinic, decide, patients, period_seed, ids=f"D{period}")
        baseline = treat_clinic(world, clinic, soc, patients, period_seed, ids=f"D{period}").cycles
        append_rows(folder / "episodes.csv", treated.episodes)
        if (folder / "vitals.csv").exists():
            append_rows(folder / "vitals.csv", treated.vitals)
        load_site(folder)  # the grown site is validated as any site file; SiteDataError stops the loop
        value, soc_value = float(treated.cycles["utility"].mean()), float(baseline["utility"].mean())
        result[clinic.name] = {
            "served_version": served.version, "served": served.reason, "patients": patients,
            "cycles": len(treated.cycles), "value_per_cycle": value, "soc_value_per_cycle": soc_value,
            "cost_vs_soc": soc_value - value,
            "toxicity_rate": float(np.mean(treated.cycles["p_toxicity"])),
            "soc_toxicity_rate": float(np.mean(baseline["p_toxicity"]))}
    return result
