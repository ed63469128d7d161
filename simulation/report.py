"""The experiment's report: ``report.md`` with tables, and PNG plots (learning curves, ROC per site, ε).

Every number in the report is read from the results the run produced (``results.json``) or from the
evaluation summaries the sites returned; nothing is typed in.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shared import metrics  # noqa: E402
from simulation.personalisation import report_section as personalisation_section  # noqa: E402

HEADLINE = {"binary": ("auc", "accuracy", "balanced_accuracy"),
            "multiclass": ("auc", "accuracy", "balanced_accuracy"),
            "regression": ("mae", "rmse", "r2")}
MODEL_LABELS = {"federated": "federated", "local": "local-only", "pooled": "pooled",
                "pooled_no_dp": "pooled, no DP"}
FAMILY_LABELS = {"ann": "ANN", "xgboost": "XGBoost", "random_forest": "Random forest", "svm": "SVM",
                 "gradient_boosting": "Gradient boosting"}
FEDERATED_FAMILIES = ("ann", "xgboost")
# The seed paper's Table 2 columns: accuracy, MAE, RMSE, AUC (MAE/RMSE of the probability for a class).
COMPARISON = {"binary": ("accuracy", "mae", "rmse", "auc"), "multiclass": ("accuracy", "balanced_accuracy", "auc"),
              "regression": ("mae", "rmse", "r2")}
IMPORTANCE_TOP = 8


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _model_table(results: dict, family: str) -> list[str]:
    lines = []
    models = results["models"][family]
    for name, kind in results["task"]["outcomes"]:
        keys = HEADLINE[kind]
        lines += [f"### {FAMILY_LABELS[family]}: {name} ({kind})", "", "| model | " + " | ".join(keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for model, label in MODEL_LABELS.items():
            if model in models:
                m = models[model]["overall"][name]
                lines.append(f"| {label} | " + " | ".join(_fmt(m.get(k)) for k in keys) + " |")
        released = models.get("federated", {}).get("released", {}).get("overall", {}).get(name)
        if results["privacy"] and released:
            lines.append("| federated, as the sites released it (DP: noised, coarse bins, final round) | "
                         + " | ".join(_fmt(released.get(k)) for k in keys) + " |")
        lines.append("")
        main = keys[0]
        lines += [f"Per site, {main}:", "", "| site | n test | " + " | ".join(
            MODEL_LABELS[m] for m in MODEL_LABELS if m in models) + " |",
            "|---|---|" + "---|" * sum(m in models for m in MODEL_LABELS)]
        for site in results["sites"]:
            n = models["federated"]["per_site"].get(site, {}).get(name, {}).get("n")
            cells = [_fmt(models[m]["per_site"].get(site, {}).get(name, {}).get(main)) for m in MODEL_LABELS
                     if m in models]
            lines.append(f"| {site} | {int(n) if n is not None else '–'} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _comparison_table(results: dict) -> list[str]:
    """The seed paper's comparison (its Tables 2 and 6): every model and mode on the union of test sets."""
    lines = ["Random forest, SVM and gradient boosting have no federated form here (they do not average); the "
             "ANN and XGBoost add their federated rows. SVM trains on at most 3,000 rows (seeded subsample).", ""]
    for name, kind in results["task"]["outcomes"]:
        keys = COMPARISON[kind]
        lines += [f"### {name} ({kind})", "", "| model | mode | " + " | ".join(keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for family, models in results["models"].items():
            for mode, label in MODEL_LABELS.items():
                if mode in models:
                    m = models[mode]["overall"][name]
                    lines.append(f"| {FAMILY_LABELS[family]} | {label} | " + " | ".join(_fmt(m.get(k)) for k in keys)
                                 + " |")
        lines.append("")
    return lines


def _importance_table(results: dict) -> list[str]:
    """Permutation importance (mean loss increase) of the federated models, computed at the sites, beside the
    pooled model's."""
    lines = []
    for family, by_mode in results.get("importance", {}).items():
        federated, pooled = by_mode.get("federated", {}), by_mode.get("pooled", {})
        for outcome in federated:
            top = list(federated[outcome])[:IMPORTANCE_TOP]
            lines += [f"### {FAMILY_LABELS[family]}: {outcome}", "", "| feature | federated | pooled |",
                      "|---|---|---|"]
            lines += [f"| {f} | {federated[outcome][f]:.4f} | {_fmt(pooled.get(outcome, {}).get(f))} |" for f in top]
            lines.append("")
    return lines or ["No importance was computed.", ""]


def _privacy_table(results: dict) -> list[str]:
    if not results["privacy"]:
        return ["No site trained with differential privacy.", ""]
    lines = ["Every release a DP site made in this run, by phase (ε granted at the site check → ε spent after the "
             "phase's last release; a site under DP releases nothing else, and refuses what has no DP form):", "",
             "| site | ε spent | budget ε | δ | per phase: granted → after (releases) | refused |",
             "|---|---|---|---|---|---|"]
    for site, p in sorted(results["privacy"].items()):
        phases = "; ".join(f"{phase} {_fmt(v['granted'])} → {_fmt(v['epsilon_after'])} ({v['releases']})"
                           for phase, v in p.get("phases", {}).items())
        refused = "; ".join(f"{phase}: {why}" for phase, why in p.get("refused", {}).items())
        lines.append(f"| {site} | {_fmt(p['epsilon'])} | {_fmt(p['budget'])} | {p['delta']:g} | {phases or '–'} "
                     f"| {refused or '–'} |")
    sites = sorted(results["privacy"])
    lines += ["", "ε spent after each round (cumulative, from each site's ledger; – = did not train):", "",
              "| round | " + " | ".join(sites) + " |", "|---|" + "---|" * len(sites)]
    for r in results["rounds"]:
        cells = [_fmt(r["per_site"].get(site, {}).get("train", {}).get("epsilon")) for site in sites]
        lines.append(f"| {r['round']} | " + " | ".join(cells) + " |")
    failures = [(r["round"], site, reason) for r in results["rounds"] for site, reason in r["failures"].items()]
    if failures:
        lines += ["", "Failed replies:", ""] + [f"- round {n}, {site}: {reason}" for n, site, reason in failures]
    return lines + [""]


def central_dp_lines(central: dict | None) -> list[str]:
    """Central DP's own account (``RunRecord.central_dp``): user-level ε of the ANN's global models, apart from the
    sites' own DP above."""
    if not central:
        return []
    eps = "∞ (no noise: no guarantee)" if central["epsilon"] is None else f"{central['epsilon']:.2f}"
    lines = [f"**Central DP** ({central['mechanism']} clipping, server side): the ANN's global models after every "
             f"round are (ε = {eps}, δ = {central['delta']:g})-DP for each site's whole contribution "
             f"({central['adjacency']}), {central['accountant'].upper()} accountant, {central['rounds']} rounds, "
             f"noise multiplier {central['noise_multiplier']:g}, sample rate {central['sample_rate']:g}, average over "
             f"{central['denominator']} sites. The coordinator is trusted (it sees each update). Not covered: "
             f"{', '.join(central['not_covered']) or 'nothing else'}. "
             + (f"Sites also under their own DP-SGD (ε above, a different unit, never added): "
                f"{', '.join(central['local_dp_sites'])}." if central["local_dp_sites"]
                else "No site trained under its own DP."), "",
             "| round | updates | clip norm | noise sd | noise multiplier | ε after |", "|---|---|---|---|---|---|"]
    for r, row in central["per_round"].items():
        lines.append(f"| {r} | {row['updates']} | {row['clip_norm']:.4g} | {row['noise_sd']:.4g} | "
                     f"{row['noise_multiplier']:.3g} | {_fmt(row['epsilon'])} |")
    return lines + [""]


POLICY_COLUMNS = (("value", "value"), ("value_ratio", "value / oracle"), ("regret", "regret"),
                  ("response_rate", "response"), ("toxicity_rate", "toxicity ≥ 3"), ("chf_rate", "heart failure"),
                  ("mean_dose_mg_m2", "mean dose mg/m²"), ("treated_share", "treated"))


def policy_rows(evaluation: dict) -> list[tuple[str, dict]]:
    """The policy table's rows (oracle first, then standard of care, federated, the ensemble judged beside a
    structured candidate, pooled, local)."""
    order = ("oracle", "standard_of_care", "site_standard_of_care", "federated", "ensemble", "pooled", "local",
             "random")
    overall = evaluation["overall"]
    return [(name, overall[name]) for name in order if name in overall] + \
        [(name, m) for name, m in overall.items() if name not in order]


def _policy_section(results: dict) -> list[str]:
    policy = results.get("policy")
    if not policy:
        return ["No policy was built in this run.", ""]
    gate = policy["gate"]
    lines = [f"**Release gate**: {gate['reason']}."]
    if gate.get("true_difference") is not None:
        covers = "covers" if gate.get("covered") else "misses"
        lines[-1] += (f" The simulator's true difference (candidate − each site's own standard of care on new "
                      f"patients, sites weighted as the gate weights them): {gate['true_difference']:+.3f}; the "
                      f"interval {covers} it.")
    lines += ["", "| site | estimate | 95 % interval | n | true difference |", "|---|---|---|---|---|"]
    for site, entry in sorted(gate["per_site"].items()):
        if "estimate" in entry:
            lines.append(f"| {site} | {_fmt(entry['estimate'])} | [{_fmt(entry['lower'])}, {_fmt(entry['upper'])}] "
                         f"| {_fmt(entry['n'])} | {_fmt(entry.get('true_difference'))} |")
        else:
            lines.append(f"| {site} | {entry.get('refused') or entry.get('failed')} | | | |")
    lines.append("")
    if policy["shipped"]:
        installed = ", ".join(f"{site} v{s['version']}" if s["installed"] else f"{site}: refused ({s['reason']})"
                              for site, s in sorted(policy["sites"].items()))
        lines += [f"Signed bundle `{policy['bundle']}` (version {policy['version']}), verified with "
                  f"`{policy['trust_key']}`; formulations: {', '.join(policy['formulations'])}. "
                  f"Installed: {installed}.", ""]
    else:
        lines += [f"Not signed, not sent: the candidate stays in `{policy['candidate']}`; the sites keep what they "
                  "had installed. It is judged below all the same.", ""]
    evaluation = policy.get("evaluation")
    if not evaluation:
        return lines + ["No ground truth for these sites: the policy is not evaluated.", ""]
    kind = policy.get("policy_model", "ensemble")
    lines += [f"The candidate (`federated`, `pooled`, `local` below) is the **{kind}** policy"
              + (f" (structured not fitted: {policy['structured']['reason']})"
                 if kind == "ensemble" and (policy.get("structured") or {}).get("reason") else "")
              + ("; `ensemble` is this run's ANN + XGBoost policy judged beside it, never sent"
                 if "ensemble" in evaluation["overall"] else "") + ".",
              "", f"Judged by the simulator's oracle on {evaluation['patients_per_site']} new first-cycle patients per "
              "site (true expected utility of the chosen action; oracle = best action within the same limits):", "",
              "| policy | " + " | ".join(label for _, label in POLICY_COLUMNS) + " |",
              "|---|" + "---|" * len(POLICY_COLUMNS)]
    for name, m in policy_rows(evaluation):
        lines.append(f"| {name} | " + " | ".join(_fmt(m[key]) for key, _ in POLICY_COLUMNS) + " |")
    sites = sorted(evaluation["per_site"])
    names = [name for name, _ in policy_rows(evaluation)]
    lines += ["", "Value per site:", "", "| site | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for site in sites:
        lines.append(f"| {site} | " + " | ".join(_fmt(evaluation["per_site"][site][n]["value"]) for n in names) + " |")
    return lines + [""] + _versions_section(policy)


def _versions_section(policy: dict) -> list[str]:
    """The closed loop: each version's true value / oracle and what each deployment period cost against SOC."""
    versions, periods = policy.get("versions") or [], policy.get("deployment") or []
    if len(versions) < 2:
        return []
    lines = ["### Closed loop: policy versions", "",
             "Each period the clinics treat new patients with the version they serve, the outcomes are appended "
             "to their own site data and the federation refits (`--deploy-cycles`).", "",
             "| version | shipped | value / oracle | SOC value / oracle | grade ≥ 3 toxicity | gate lower bound "
             "| sites worse than SOC (true) | ε spent (max over sites) |", "|---|---|---|---|---|---|---|---|"]
    for v in versions:
        worse = sorted(site for site, e in v["per_site"].items() if e["value"] < e["soc_value"])
        eps = max(v["epsilon_spent"].values()) if v["epsilon_spent"] else None
        lines.append(f"| {v['version'] or '(refused)'} | {'yes' if v['shipped'] else 'no'} | "
                     f"{_fmt(v['value_oracle'])} | {_fmt(v['soc_value_oracle'])} | {_fmt(v['toxicity_rate'])} | "
                     f"{_fmt(v['gate'].get('lower'))} | {', '.join(worse) or 'none'} | {_fmt(eps)} |")
    lines += ["", "| period | patients | cycles | first cycles explored: trial arm / equipoise / dose spread "
              "| value per cycle "
              "| SOC value per cycle | cost vs SOC | cost vs SOC under the hard rules | treat s | refit s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for p in periods:
        e = p.get("exploration") or {}
        explored = (f"{e['trial_arm']} / {e.get('equipoise', 0)} / {e['dose_spread']} of {e['first_cycles']}"
                    + ("" if e.get("trial") else " (no trial arm)")) if e.get("explore") else "none"
        lines.append(f"| {p['period']} | {p['patients']} | {p['cycles']} | {explored} | {_fmt(p['value_per_cycle'])} "
                     f"| {_fmt(p['soc_value_per_cycle'])} | {_fmt(p['cost_vs_soc'])} "
                     f"| {_fmt(p.get('cost_vs_soc_under_rules'))} | {p['treat_s']:.0f} | "
                     f"{p['refit_s']:.0f} |")
    if any((p.get("exploration") or {}).get("explore") for p in periods):
        lines += ["", "Exploration (`--explore`, `shared/exploration.py`): first cycles randomised inside the hard "
                  "rules — a one-step dose spread, formulations in equipoise with the served one (20 % of the "
                  "served arm), and a 1:1 trial arm of a candidate the gate stopped in equipoise — each option "
                  "logged with its probability in the site's `decisions.csv`, which the next gate divides by. "
                  "Cost vs SOC includes the explored cycles."]
    lines += ["", "SOC is the clinics' practice, which gives every cycle; the policy applies the label's hard rules "
              "(no dose without a pre-cycle blood count, holds, caps). Cost vs SOC under the hard rules compares "
              "with the same practice under those rules: what the policy's own choices cost (negative: gain)."]
    return lines + [""]


def learning_curves(results: dict, path: Path) -> None:
    """The federated ANN's overall metric per round, with the baselines' final values as lines."""
    outcomes = results["task"]["outcomes"]
    fig, axes = plt.subplots(1, len(outcomes), figsize=(4.5 * len(outcomes), 3.6), squeeze=False)
    models = results["models"]["ann"]
    for ax, (name, kind) in zip(axes[0], outcomes, strict=True):
        key = HEADLINE[kind][0]
        rounds = [r["round"] for r in results["rounds"] if "overall" in r]
        values = [r["overall"][name].get(key) for r in results["rounds"] if "overall" in r]
        ax.plot(rounds, values, marker="o", label="federated")
        shown = [v for v in values if v is not None]
        for model, style in (("local", ":"), ("pooled", "--"), ("pooled_no_dp", "-.")):
            if model in models and models[model]["overall"][name].get(key) is not None:
                level = models[model]["overall"][name][key]
                ax.axhline(level, linestyle=style, color="grey", label=MODEL_LABELS[model])
                shown.append(level)
        if shown:  # keep every baseline in view (axhline alone does not widen the axis)
            pad = 0.05 * (max(shown) - min(shown) or 1.0)
            ax.set_ylim(min(shown) - pad, max(shown) + pad)
        ax.set(title=f"ANN {name}: {key} (all test sets)", xlabel="round", ylabel=key)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


MAX_ROC_SITES = 24
"""Panels of the per-site ROC figure (:func:`roc_per_site`)."""


def roc_per_site(results: dict, summaries: dict[str, dict[str, dict[str, dict[str, dict]]]], outcome: str,
                 path: Path) -> None:
    """ROC of each model at each site for one binary outcome, from the sites' summaries: at most
    :data:`MAX_ROC_SITES` panels, the sites with the most test rows (every site's AUC is in the report's
    tables; a figure of 1,000 panels is past what matplotlib draws)."""
    def test_rows(site: str) -> float:
        return max((per_site.get(site, {}).get(outcome, {}).get("n", 0) for by_model in summaries.values()
                    for per_site in by_model.values()), default=0)

    sites = results["sites"]
    shown_of = ""
    if len(sites) > MAX_ROC_SITES:
        largest = set(sorted(sites, key=lambda site: (-test_rows(site), site))[:MAX_ROC_SITES])
        shown_of = f" (the {MAX_ROC_SITES} of {len(sites)} sites with the most test rows)"
        sites = [site for site in sites if site in largest]
    cols = min(len(sites), 4)
    rows = (len(sites) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(sites):]:
        ax.axis("off")
    for ax, site in zip(axes.flat, sites, strict=False):
        for family, by_model in summaries.items():
            if family not in FEDERATED_FAMILIES:
                continue
            for model, per_site in by_model.items():
                summary = per_site.get(site, {}).get(outcome)
                if summary is None or summary["n"] == 0:
                    continue
                fpr, tpr = metrics.roc_curve_points(summary)
                auc = metrics.binary_metrics(summary)["auc"]
                style = "-" if family == "ann" else "--"
                ax.plot(fpr, tpr, style, label=f"{FAMILY_LABELS[family]} {MODEL_LABELS[model]} {_fmt(auc)}")
        ax.plot([0, 1], [0, 1], color="lightgrey", linewidth=0.8)
        ax.set(title=site, xlabel="1 − specificity", ylabel="sensitivity")
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"ROC per site: {outcome}{shown_of}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def roc_overall(results: dict, summaries: dict, outcome: str, path: Path) -> None:
    """ROC of every model and mode on the union of the sites' test sets (summed summaries)."""
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for family, by_model in summaries.items():
        for model, per_site in by_model.items():
            parts = [outcomes[outcome] for outcomes in per_site.values() if outcome in outcomes]
            if not parts:
                continue
            summary = metrics.combine(parts)
            fpr, tpr = metrics.roc_curve_points(summary)
            style = "-" if model == "federated" else (":" if model == "local" else "--")
            ax.plot(fpr, tpr, style, label=f"{FAMILY_LABELS[family]} {MODEL_LABELS[model]} "
                                           f"{_fmt(metrics.binary_metrics(summary)['auc'])}")
    ax.plot([0, 1], [0, 1], color="lightgrey", linewidth=0.8)
    ax.set(title=f"ROC, all test sets: {outcome}", xlabel="1 − specificity", ylabel="sensitivity")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def epsilon_per_round(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for r in results["rounds"]:
        r.setdefault("per_site", {})
    sites = sorted(results["privacy"])
    for site in sites:
        points = [(r["round"], r["per_site"][site]["train"]["epsilon"]) for r in results["rounds"]
                  if "epsilon" in r["per_site"].get(site, {}).get("train", {})]
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", label=site)
    if sites:
        ax.axhline(results["privacy"][sites[0]]["budget"], color="grey", linestyle="--", label="budget")
    ax.set(title="ε spent per site (RDP accountant, cumulative)", xlabel="round", ylabel="ε")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, results: dict, summaries: dict[str, dict[str, dict[str, dict]]]) -> None:
    """``report.md`` and its plots in ``out``."""
    cfg = results["config"]
    plots = []
    if "ann" in results["models"]:
        learning_curves(results, out / "learning_curves.png")
        plots.append("learning_curves.png")
    for name, kind in results["task"]["outcomes"]:
        if kind == "binary":
            roc_per_site(results, summaries, name, out / f"roc_{name}.png")
            roc_overall(results, summaries, name, out / f"roc_all_{name}.png")
            plots += [f"roc_{name}.png", f"roc_all_{name}.png"]
    if results["privacy"]:
        epsilon_per_round(results, out / "epsilon.png")
        plots.append("epsilon.png")
    lines = [
        "# fednano simulate — report", "",
        f"{len(results['sites'])} sites, {cfg['rounds']} rounds, strategy {cfg['strategy']}, "
        f"DP {'on' if results['privacy'] else 'off'}"
        + (f", central DP {results['central_dp']['mechanism']}" if results.get("central_dp") else "")
        + f", seed {cfg['seed']}. "
        f"Federation {results['timing']['federation_s']:.1f} s, baselines {results['timing']['baselines_s']:.1f} s. "
        f"Federated XGBoost: {results['models'].get('xgboost', {}).get('federated', {}).get('mode', 'not run')}.",
        "",
        "Every model is evaluated on the same per-site test splits (80:10:10 per site, seeded; by patient for "
        "the built-in task). Overall = metrics of the union of the sites' test sets, computed from the sum "
        "of per-site summaries.", "",
    ]
    for family, why in results.get("not_trained", {}).items():
        reasons = sorted(set(why["refused"].values()) | set(why["failures"].values()))
        lines += [f"No federated {FAMILY_LABELS.get(family, family)}: no site trained it "
                  f"({'; '.join(reasons) or 'no reason given'}).", ""]
    if results.get("attacks"):
        lines += ["**Attacked run** (an experiment, `simulation.attacks`): " + "; ".join(
            f"{a['site']} {a['kind']}" + (f" ×{a['factor']:g}" if a["factor"] else "") for a in results["attacks"])
            + ". The models below are judged on every site's true test split; the released metrics are what the "
            "sites reported.", ""]
    if results["rejected"]:
        lines += ["Sites left out (their data failed validation):", ""]
        lines += [f"- {site}: {'; '.join(errors)}" for site, errors in results["rejected"].items()] + [""]
    for family in results["models"]:
        if family in FEDERATED_FAMILIES:
            lines += [f"## Outcome models ({FAMILY_LABELS[family]})", ""] + _model_table(results, family)
    lines += personalisation_section(results) + personalisation_section(results, "xgboost")
    lines += ["## The seed paper's comparison", ""] + _comparison_table(results)
    lines += ["## Feature importance (permutation, computed at the sites)", ""] + _importance_table(results)
    lines += ["## Privacy", ""] + _privacy_table(results) + central_dp_lines(results.get("central_dp"))
    lines += ["## Dosing policy", ""] + _policy_section(results)
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    (out / "report.md").write_text("\n".join(lines))
