"""Personalised ANNs and boosters in the experiment's results and report (``fednano simulate --personalise``).

What a site chose and why, and each candidate's metrics, come from two places, as for the federated model
(``simulation.experiment.federated_entry``): what the sites released to the coordinator (the run record's
``personalisation``: noised, coarsely binned at a DP site) and, in a simulation, each site's own exact record of
the same figures in its folder (``client.personalisation_handlers``), which the simulation reads as it reads the
sites' data. The personalised models themselves stay in the sites' folders.

results.json:

- ``models.ann.personalised``: ``{"overall", "per_site"}`` of the model each site chose (the same shape as
  ``models.ann.federated``), with ``chosen`` (site → candidate), ``candidates`` (each candidate's own
  ``{"overall", "per_site"}``: the site's local-only model, the global model, each method), ``released`` and
  ``cost`` (the phase's seconds, bytes on the wire, ε per DP site);
- ``personalisation``: per site ``{chosen, reason, validation, dp_steps}`` (validation: candidate → outcome →
  metrics, as released), ``site_chosen`` (what the site's own rule chose) when the federation set the site's
  default (the default rule ``pooled-non-dp`` at a site without DP, or ``--personalise ...,pooled``), ``rule`` and
  ``decided_by`` (the pooled default with its gain ± margin, or the site's own rule and why) and ``evidence_dp``.
- ``models.xgboost.personalised`` and ``personalisation_xgboost``: the same for the boosters (``site-trees``;
  sites without DP only, a DP site under ``refused``).
"""

from __future__ import annotations

import json

from client.personalisation_handlers import BOOSTING_RECORD, ann_order, boosting_order, site_record_folder
from client.personalised.choice import HEADLINE
from client.site import SiteSource
from shared.protocol.personalisation import FINETUNE, GLOBAL, LOCAL, MIX, Personalisation
from shared.task import TaskSpec
from simulation.baselines import model_metrics

LABELS = {LOCAL: "local", GLOBAL: "global"}
FAMILIES = {"ann": ("personalisation", "Personalised ANNs", "personalised models"),
            "xgboost": ("personalisation_xgboost", "Personalised boosters", "site's trees")}
"""Family → (results.json key of the choices, report heading, what the site grew)."""
KEPT_WORDS = {"ann": {FINETUNE: "the fine-tuned model", GLOBAL: "the global model",
                      MIX: "the mix of the global and its local-only model's predictions"},
              "xgboost": {"site-trees": "the site's trees", GLOBAL: "the global boosters",
                          "mix-trees": "the mix of the global and its local-only boosters' predictions"}}
"""The report's words for the candidate a site keeps unless beaten (``ann_order`` / ``boosting_order``)."""


def site_records(sources: dict[str, SiteSource], run_id: str, family: str = "ann") -> dict[str, dict]:
    """Each site's own exact record of the ``family``'s phase (site name → record), where the site wrote one;
    ``sources``: site name → where its data live."""
    stem = run_id if family == "ann" else BOOSTING_RECORD.format(run=run_id)
    found = {}
    for name, source in sources.items():
        path = site_record_folder(source.folder, name) / f"{stem}.json"
        if path.is_file():
            found[name] = json.loads(path.read_text())
    return found


def personalised_entry(task: TaskSpec, phase: dict, exact: dict[str, dict], privacy: dict[str, dict]) -> dict:
    """``models.<family>.personalised`` (module docstring) from the run record's ``phase`` and the sites' exact
    records; ``privacy``: ``results["privacy"]`` (ε per phase per DP site, for the cost)."""
    chosen = {site: entry["chosen"] for site, entry in exact.items()}
    candidates = phase.get("candidates", [])
    entry = model_metrics(task, {site: e["summaries"]["test"][chosen[site]] for site, e in exact.items()})
    entry["chosen"] = chosen
    entry["candidates"] = {c: model_metrics(task, {site: e["summaries"]["test"][c] for site, e in exact.items()})
                           for c in candidates}
    entry["released"] = {"per_site": {site: e["test"][e["chosen"]] for site, e in phase.get("per_site", {}).items()}}
    entry.update(failures=phase.get("failures", {}), refused=phase.get("refused", {}), cost=cost(phase, privacy))
    return entry


def personalisation_results(phase: dict) -> dict:
    """``personalisation`` (or ``personalisation_xgboost``) of results.json from the run record's phase: per site
    its choice, reason and released validation metrics; what decided it (``rule``: ``pooled`` or ``own``,
    ``decided_by``: the pooled default with its gain ± margin, or the site's own rule and why) and whether its
    evidence was a DP release (``evidence_dp``), where the phase recorded them."""
    return {site: {"chosen": e["chosen"], "reason": e["reason"], "validation": e["validation"],
                   "dp_steps": e["dp_steps"],
                   **{k: e[k] for k in ("site_chosen", "rule", "decided_by", "evidence_dp") if k in e}}
            for site, e in phase.get("per_site", {}).items()}


def cost(phase: dict, privacy: dict[str, dict]) -> dict:
    """The phase's seconds, bytes on the wire and, per DP site, ε granted to it and ε spent after it and after
    the federated training."""
    epsilon = {site: {"granted": p["phases"].get("personalisation", {}).get("granted"),
                      "epsilon_after": p["phases"].get("personalisation", {}).get("epsilon_after"),
                      "epsilon_after_training": p["phases"].get("training", {}).get("epsilon_after")}
               for site, p in privacy.items()}
    return {"seconds": phase.get("seconds"), "bytes": phase.get("bytes"), "methods": phase.get("methods"),
            "epsilon": epsilon}


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def report_section(results: dict, family: str = "ann") -> list[str]:
    """The per-site table "local / global / personalised / chosen" on the test split, per outcome."""
    entry = results["models"].get(family, {}).get("personalised")
    if not entry:
        return []
    key, heading, grown = FAMILIES[family]
    candidates = list(entry["candidates"])
    labels = [LABELS.get(c, c) for c in candidates]
    plan = Personalisation(methods=tuple(c for c in candidates if c not in (GLOBAL, LOCAL)))
    default = (ann_order if family == "ann" else boosting_order)(plan)[0]  # what the sites kept unless beaten
    kept = KEPT_WORDS[family].get(default, default)
    parts = results.get(key, {})
    pooled = sorted(site for site, part in parts.items() if "site_chosen" in part)  # told the federation's default
    if pooled and len(pooled) == len(parts):
        kept = "the federation's default, pooled from every site's validation evidence (see each reason)"
    elif pooled:
        kept = (f"at {', '.join(pooled)} the federation's default, pooled from the validation evidence of the sites "
                f"without DP; at the DP sites {kept}, by their own rule (see each reason)")
    lines = [f"## {heading} (each site's choice)", "",
             f"Each site trained its local-only model and the {grown} from the final global model on its own "
             "training split, scored them with the global model on its validation split (mean of the outcomes' "
             f"AUC / R²), and kept its default ({kept}) unless another beat it by more than the split's "
             f"noise; the {grown} "
             "never left the site. Test split, each site's own exact figures (local: the site's own model in the "
             "choice, on the federated encoder).", ""]
    for name, kind in results["task"]["outcomes"]:
        main = HEADLINE[kind]
        lines += [f"### {name}: {main} on the test split", "",
                  "| site | " + " | ".join(labels) + " | chosen | chosen's " + main + " |",
                  "|---|" + "---|" * (len(labels) + 2)]
        for site in sorted(entry["chosen"]):
            cells = [_fmt(entry["candidates"][c]["per_site"].get(site, {}).get(name, {}).get(main))
                     for c in candidates]
            chosen = entry["chosen"][site]
            lines.append(f"| {site} | " + " | ".join(cells) + f" | {LABELS.get(chosen, chosen)} | "
                         + _fmt(entry["per_site"].get(site, {}).get(name, {}).get(main)) + " |")
        lines.append("")
    lines += ["Why each site chose as it did (its released validation figures):", ""]
    for site, part in sorted(results.get(key, {}).items()):
        decided = f"decided by {part['decided_by']}; " if part.get("decided_by") else ""
        lines.append(f"- {site}: {part['chosen']} — {decided}{part['reason']}")
    for site, why in sorted(entry.get("refused", {}).items()):
        lines.append(f"- {site}: not asked — {why}")
    spent = entry.get("cost", {})
    if spent.get("seconds") is not None:
        lines += ["", f"Cost of the phase: {spent['seconds']:.1f} s, {spent['bytes']['sent']} bytes sent, "
                      f"{spent['bytes']['received']} received."]
    return lines + [""]
