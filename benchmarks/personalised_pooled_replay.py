"""Replay of the ANN choice's rules on a finished ``benchmarks/personalised.py`` run with a pooled rule (issue 18).

    python benchmarks/personalised_pooled_replay.py runs/bench_pooled/personalised-0 [...] [--out FILE.json]

Each folder is one seed's federation (``--work``'s ``personalised-<seed>``). With a pooled rule each site recorded
its validation evidence (``client.personalisation_handlers``: its scores and their covariance, the figures it
replied) beside every candidate's exact test summaries, so the choice of every rule can be recomputed from the
same models with the same functions the coordinator and the site run (``shared.selection``): the site's own rule
(``site_chosen``), the pooled default weighted equally and by precision (else global), each followed by the site's
own margin, ``pooled-site`` (the precision-weighted default if significant, else the site's own choice) and
``pooled-non-dp``, the default rule (the precision-weighted default pooled over the sites without DP for those
sites, each DP site its own choice; which sites were under DP: the run record's ``privacy``).
Per rule and seed: the chosen model's response AUC minus max(local-only, global) on each site's test split (sites
with ≥ 30 test rows), its mean, and the sites worse by more than the chosen AUC's Hanley-McNeil SE.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from personalised import MIN_TEST_ROWS, OUTCOME, _auc, hanley_mcneil_se

from client.personalisation_handlers import evidence_from_record
from shared import metrics
from shared.protocol.personalisation import GLOBAL, LOCAL, POOLED_NON_DP, SITE_DEFAULT
from shared.selection import EQUAL, PRECISION, choice_with_default, non_dp_pooled_choices, pooled_default

RULES = ("site", f"pooled-{EQUAL}", f"pooled-{PRECISION}", "pooled-site", POOLED_NON_DP)


def site_records(run: Path) -> dict[str, dict]:
    """Each site's record of the run (``sites/<site>/personalisation/<site>/<run id>.json``)."""
    return {path.parent.name: json.loads(path.read_text())
            for path in sorted(run.glob("sites/*/personalisation/*/*.json"))}


def dp_sites(run: Path) -> dict[str, bool]:
    """Site → whether it ran under DP, from the run record (``federated/federation.json``'s ``privacy``)."""
    path = run / "federated" / "federation.json"
    if not path.is_file():
        raise SystemExit(f"{run}: expected the run record {path} (which sites were under DP)")
    return {site: bool(p.get("dp")) for site, p in json.loads(path.read_text()).get("privacy", {}).items()}


def replay(run: Path) -> dict:
    records = site_records(run)
    under_dp = dp_sites(run)
    if not records or any("evidence" not in r for r in records.values()):
        raise SystemExit(f"{run}: expected site records with evidence (a run with --choice pooled or pooled-equal)")
    evidence = {site: evidence_from_record(r["evidence"]) for site, r in records.items()}
    order = tuple(next(iter(records.values()))["evidence"]["order"])
    candidates = (GLOBAL, *(c for c in order if c not in (GLOBAL, LOCAL)), LOCAL)
    defaults = {f"pooled-{w}": pooled_default(evidence, candidates, GLOBAL, w) for w in (EQUAL, PRECISION)}
    precision, why = defaults[f"pooled-{PRECISION}"]
    site_default = (precision, why) if precision != GLOBAL else (SITE_DEFAULT, why)
    own = {site: (r.get("site_chosen", r["chosen"]), r.get("site_reason", r["reason"])) for site, r in records.items()}
    non_dp_default, non_dp_why, non_dp = non_dp_pooled_choices(evidence, under_dp, order, GLOBAL, own)
    sites = {}
    for site, record in records.items():
        test = {c: _auc(record["summaries"]["test"][c][OUTCOME]) for c in order}
        if test[GLOBAL]["n"] < MIN_TEST_ROWS:
            continue
        best = max(test[LOCAL]["auc"], test[GLOBAL]["auc"])
        own_choice = own[site][0]
        chosen = {"site": own_choice,
                  **{rule: choice_with_default(evidence[site], order, d)[0] for rule, (d, _) in defaults.items()}}
        # pooled-site: the precision-weighted default if significant, else the site's own choice
        chosen["pooled-site"] = own_choice if precision == GLOBAL else chosen[f"pooled-{PRECISION}"]
        chosen[POOLED_NON_DP] = non_dp[site][0]
        sites[site] = {"n_test": test[GLOBAL]["n"], "max_local_global": best, "dp": under_dp.get(site),
                       "decided_by": non_dp[site][2], **{
            rule: {"chosen": c, "difference": test[c]["auc"] - best,
                   "se": hanley_mcneil_se(test[c]["auc"], test[c]["n_pos"], test[c]["n_neg"])}
            for rule, c in chosen.items()}}
    summary = {rule: {"mean_difference": statistics.fmean(s[rule]["difference"] for s in sites.values()),
                      "worse_by_more_than_1se": sorted(s for s, f in sites.items()
                                                       if f[rule]["difference"] < -f[rule]["se"])}
               for rule in RULES}
    defaults["pooled-site"] = site_default
    defaults[POOLED_NON_DP] = (non_dp_default or "(each site's own)", non_dp_why)
    return {"run": str(run), "defaults": {rule: {"default": d, "reason": why} for rule, (d, why) in defaults.items()},
            "sites": sites, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = [replay(run) for run in args.runs]
    print("| run | rule | default | mean chosen − max(local, global) | worse by > 1 SE | chosen |")
    print("|---|---|---|---|---|---|")
    for result in results:
        for rule in RULES:
            default = result["defaults"].get(rule, {}).get("default", "(the site's)")
            chosen = [f["chosen"] for f in (s[rule] for s in result["sites"].values())]
            tally = ", ".join(f"{c} {chosen.count(c)}" for c in dict.fromkeys(chosen))
            s = result["summary"][rule]
            run = Path(result["run"])
            print(f"| {run.parent.name}/{run.name} | {rule} | {default} | {s['mean_difference']:+.4f} | "
                  f"{', '.join(s['worse_by_more_than_1se']) or 'none'} | {tally} |")
    for rule in RULES:
        means = [r["summary"][rule]["mean_difference"] for r in results]
        print(f"{rule}: mean over runs {statistics.fmean(means):+.4f}; runs with a site worse by > 1 SE: "
              f"{sum(bool(r['summary'][rule]['worse_by_more_than_1se']) for r in results)} of {len(results)}")
    if args.out:
        args.out.write_text(json.dumps(metrics.json_safe({"runs": results}), indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
