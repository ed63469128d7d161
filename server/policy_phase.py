"""The server's policy phase: build the global dosing policy, sign it, send it to every site.

1. **catalogue** — each site reports the formulations it stocks and their properties (product specs);
   the policy may choose only among those.
2. **candidate** — with ``policy-model = structured`` (the default) the structured dose-response policy, its
   models fitted by Newton–Raphson on the sites' sums (:mod:`server.dose_response_phase`); if no site can take
   part (all under DP) the run says so and falls back to the ensemble candidate, the policy on this run's
   models, with — if the run asks for it — the fitted-Q dose adjuster learned federated from the sites'
   multi-cycle trajectories (:mod:`server.adjustment_phase`; fitted only for an ensemble candidate, the only
   one that uses it). Steps 3–5 are the same for both.
3. **release gate** — the candidate (unsigned, ``OUT/candidate``) goes to every site, which values it and its
   own standard of care on its held-out logged first cycles (doubly robust, :mod:`client.ope`) and sends sums
   only; the server signs and sends the candidate only if the lower 95 % bound of (candidate − standard of
   care) is above 0 (:func:`shared.off_policy.gate`), otherwise it keeps the sites' installed version and
   the record says why.
4. **bundle** — ``policy.json`` (:class:`shared.dosing_policy.DosingPolicy`'s document: formulations, action
   space, safety rules, objective, adjuster) plus the federated models (``encoder.json``,
   ``ann_federated.pt``, ``xgb_*.json``), signed with the coordinator's Ed25519 key into ``OUT/policy/v<N>``
   (run config ``policy-dir``; :func:`shared.policy_bundle.build_bundle`). The manifest carries each site's
   ε spent, the validation metrics and the safety bounds.
5. **distribution** — ``query.install_policy`` to every usable site, each with its own gate verdict (the
   figures of its own logs; :class:`shared.protocol.policy.SiteVerdict`); each verifies and installs it, or says
   why not (:mod:`client.policy_handlers`), and a site its logs find the policy worse for serves its standard
   of care (:mod:`client.site_gate`). Which sites hold which version goes into the run record.

The version comes from the coordinator's own counter, ``policy_version`` in the policy folder, so each
run's bundle is newer than every earlier one written there and sites can refuse rollbacks.
"""

from __future__ import annotations

import json
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from server.adjustment_phase import AdjustmentFailed, fit_adjuster
from server.dose_response_phase import DoseResponseFailed, fit_structured_policy_federated
from server.run_record import RunRecord, add_privacy
from server.settings import RunSettings
from server.site_check import SiteCheck
from shared.artifacts import RunArtifacts
from shared.dose_adjustment import DoseAdjuster
from shared.dosing_policy import FORMULATION_FEATURES, POLICY_FILE, DosingPolicy
from shared.durable import write_json_atomically
from shared.off_policy import GateResult, gate
from shared.policy_bundle import build_bundle, bundle_contents
from shared.protocol import messages
from shared.protocol import records as r
from shared.protocol.policy import (
    Installed,
    SiteVerdict,
    catalogue_of,
    install_request,
    value_of,
    value_request,
)
from shared.structured_policy import StructuredObjective
from shared.sum_bounds import Contributors, InfeasibleSum
from shared.value_bounds import check_value_sums

VERSION_FILE = "policy_version"


def collect_catalogue(grid: Grid, nodes: list[int]) -> dict[str, dict[str, float]]:
    """Formulation id → properties, over every site that answered (ids seen at several sites: mean)."""
    sent = [Message(RecordDict(), dst_node_id=n, message_type=messages.CATALOGUE.type) for n in nodes]
    seen: dict[str, list[list[float]]] = {}
    for reply in grid.send_and_receive(sent):
        if reply.has_error():
            log(INFO, "catalogue: node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        for fid, props in catalogue_of(reply.content, FORMULATION_FEATURES).items():
            seen.setdefault(fid, []).append([props[name] for name in FORMULATION_FEATURES])
    return {fid: dict(zip(FORMULATION_FEATURES, np.mean(rows, axis=0).round(6).tolist(), strict=True))
            for fid, rows in sorted(seen.items())}


def next_version(policy_dir: Path) -> int:
    """The coordinator's next policy version: its counter ``policy_version`` in the policy folder (created at
    1; kept there, not beside the signing key, which may be mounted read-only). Keep one policy folder across
    runs so versions keep increasing; sites refuse a version that is not newer than theirs."""
    counter = Path(policy_dir) / VERSION_FILE
    last = json.loads(counter.read_text())["version"] if counter.exists() else 0
    write_json_atomically(counter, {"version": last + 1})
    return last + 1


def model_files(artifacts: RunArtifacts, record: RunRecord) -> tuple[dict[str, dict], dict[str, Path]]:
    """This run's outcome models for ``policy.json`` and the files they live in (``shared.artifacts``: a file
    another run left in the folder is not among them)."""
    models, files = {}, {"encoder.json": artifacts.path("encoder")}
    if artifacts.has_ann:
        models["ann"] = {"kind": "ann", "weights": artifacts.files["ann"], "hidden": list(artifacts.hidden)}
    keys = artifacts.booster_keys
    if keys and "xgboost" in record.models:
        models["xgboost"] = {"kind": "xgboost", "heads": {key: artifacts.files[f"xgb:{key}"] for key in keys}}
    if not models:
        raise RuntimeError(f"run {artifacts.run_id} left no model in {artifacts.folder}: no policy to build")
    for spec in models.values():
        names = [spec["weights"]] if spec["kind"] == "ann" else list(spec["heads"].values())
        files.update({name: artifacts.folder / name for name in names})
    return models, files


def validation_metrics(record: RunRecord) -> dict:
    """The federated models' overall test metrics (AUC, balanced accuracy, ...) for the manifest."""
    return {family: {outcome: {k: v for k, v in values.items() if isinstance(v, int | float)}
                     for outcome, values in model.final["overall"].items()}
            for family, model in record.models.items() if model.final.get("overall")}


CANDIDATE_FOLDER = "candidate"
"""Where the run's candidate policy is written, unsigned, beside its models (``OUT/federated/candidate``)."""


def write_candidate(artifacts: RunArtifacts, record: RunRecord, formulations: dict, folder: Path,
                    adjuster=None) -> dict[str, Path]:
    """Write the candidate's ``policy.json`` and copy this run's models into ``folder``; returns the files."""
    models, files = model_files(artifacts, record)
    policy = DosingPolicy(encoder=artifacts.encoder(), members={}, formulations=formulations, adjuster=adjuster)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / POLICY_FILE).write_text(json.dumps(policy.document(models, "encoder.json"), indent=1,
                                                 allow_nan=False) + "\n")
    for name, source in files.items():
        (folder / name).write_bytes(source.read_bytes())
    return {name: folder / name for name in [*files, POLICY_FILE]}


def write_structured_candidate(grid: Grid, sites: SiteCheck, formulations: dict, settings: RunSettings,
                               folder: Path) -> tuple[dict[str, Path], dict]:
    """Fit the structured policy over the sites that grant ``dose_response`` and write its ``policy.json`` (the
    whole policy: models, covariances, support) into ``folder``; returns the files and the record's entry."""
    nodes = sites.granting("dose_response")
    policy, info = fit_structured_policy_federated(grid, nodes, formulations, settings.split_seed,
                                                   StructuredObjective.for_reference(settings.policy_reference),
                                                   secure_sum=settings.secure_sum,
                                                   declared=sites.declared_rows())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / POLICY_FILE).write_text(json.dumps(policy.document(), indent=1, allow_nan=False) + "\n")
    entry = {"fitted": True, "sites": [sites.usable[n] for n in info["nodes"]], "iterations": info["iterations"],
             "rows": info["rows"], "refused": sites.refusing("dose_response"), "secure_sum": info["secure_sum"],
             "infeasible": {sites.usable.get(n, f"node {n}"): why for n, why in info["infeasible"].items()}}
    return {POLICY_FILE: folder / POLICY_FILE}, entry


def value_at_sites(grid: Grid, sites: SiteCheck, files: dict[str, Path], settings: RunSettings,
                   record: RunRecord) -> GateResult:
    """Ask every site that grants the ``policy`` phase for its doubly-robust value sums of the candidate and of
    its standard of care (``query.policy_value``), and gate on their sum (``shared.off_policy.gate``). A site whose
    sums no honest site could send (``shared.value_bounds``: its declared row count, the Γ clip, its stated DP
    noise) is left out of the gate and named in ``per_site`` (``dropped``; it gets no verdict)."""
    content = value_request({name: path.read_bytes() for name, path in files.items()}, settings.split_seed,
                            releases=1, index=0)
    nodes = sites.granting("policy")
    sent = [Message(content, dst_node_id=n, message_type=messages.POLICY_VALUE.type) for n in nodes]
    by_site, failures, dropped = {}, {}, {}
    declared = sites.declared_rows()
    for reply in grid.send_and_receive(sent):
        name = sites.usable.get(reply.metadata.src_node_id, f"node {reply.metadata.src_node_id}")
        if reply.has_error():
            failures[name] = reply.error.reason
            continue
        sums = value_of(reply.content)
        if r.PRIVACY in reply.content:
            add_privacy(record, sites.usable, reply.metadata.src_node_id, dict(reply.content[r.PRIVACY]))
        node = reply.metadata.src_node_id
        try:  # each site's sums are in the clear: an infeasible site is dropped from the gate and named
            check_value_sums("release gate", sums, Contributors(1, declared.get(node),
                                                                (sums.noise_sd,) if sums.noise_sd > 0 else ()))
        except InfeasibleSum as err:
            dropped[name] = f"dropped: {err}"
            log(INFO, "release gate: %s dropped: %s", name, err)
            continue
        by_site[name] = sums
    result = gate(by_site)
    result.per_site.update({name: {"dropped": why} for name, why in dropped.items()})
    result.per_site.update({name: {"failed": why} for name, why in failures.items()})
    result.per_site.update({name: {"refused": why} for name, why in sites.refusing("policy").items()})
    log(INFO, "release gate: %s", result.reason)
    return result


def sign(files: dict[str, Path], record: RunRecord, gate_result: GateResult, signing_key: Path,
         policy_dir: Path) -> Path:
    """Sign the candidate into ``policy_dir/v<N>`` (the coordinator's next version), the gate's figures in its
    manifest; returns the bundle folder."""
    version = next_version(policy_dir)
    privacy = {site: {"epsilon": p.epsilon_spent, "delta": p.delta, "budget": p.epsilon_budget}
               for site, p in record.privacy.items() if p.dp}
    document = json.loads(files[POLICY_FILE].read_text())
    bounds = {k: document[k] for k in ("action_space", "safety", "objective")}
    metrics = {**validation_metrics(record), "gate": {k: v for k, v in gate_result.to_dict().items()
                                                     if k != "per_site"}}
    return build_bundle(policy_dir / f"v{version}", files, version=version, run_id=record.run_id, privacy=privacy,
                        metrics=metrics, safety_bounds=bounds, signing_key_path=signing_key)


def distribute(grid: Grid, nodes: list[int], names: dict[int, str], bundle: Path,
               verdicts: dict[str, dict] | None = None) -> dict[str, dict]:
    """Send the bundle to every site, each with its own release-gate verdict (``verdicts``: the gate's
    ``per_site``; a site gets only its own entry, and none if the gate did not judge it); per site: the installed
    version, or the reason it was refused."""
    files = bundle_contents(bundle)
    sent = [Message(install_request(files, SiteVerdict.of_gate((verdicts or {}).get(names.get(n, "")))),
                    dst_node_id=n, message_type=messages.INSTALL_POLICY.type) for n in nodes]
    result = {names.get(n, f"node {n}"): {"installed": False, "reason": "no reply"} for n in nodes}
    for reply in grid.send_and_receive(sent):
        name = names.get(reply.metadata.src_node_id, f"node {reply.metadata.src_node_id}")
        if reply.has_error():
            result[name] = {"installed": False, "reason": reply.error.reason}
        else:
            result[name] = {"installed": True, "version": Installed.from_records(reply.content).version}
        log(INFO, "policy at %s: %s", name, result[name])
    return result


def fit_adjuster_if_asked(grid: Grid, sites: SiteCheck, record: RunRecord, settings: RunSettings
                          ) -> tuple[DoseAdjuster | None, dict]:
    """The ensemble policy's fitted-Q dose adjuster over the sites that grant ``adjuster`` when
    ``fqi-iterations`` > 0 (else None), and the record's ``adjustment`` entry; its DP releases are added to the
    record."""
    if settings.fqi_iterations <= 0:
        return None, {"fitted": False, "reason": "fqi-iterations = 0"}
    nodes = sites.granting("adjuster")
    try:
        adjuster = fit_adjuster(grid, nodes, {"split-seed": settings.split_seed,
                                              "fqi-iterations": settings.fqi_iterations},
                                secure_sum=settings.secure_sum, declared=sites.declared_rows())
    except AdjustmentFailed as err:
        log(INFO, "dose adjuster not fitted: %s", err)
        return None, {"fitted": False, "reason": str(err), "refused": sites.refusing("adjuster")}
    for node, facts in getattr(adjuster, "releases_", []):
        add_privacy(record, sites.usable, node, facts)
    return adjuster, {"fitted": True, "iterations": settings.fqi_iterations,
                      "sites": [sites.usable.get(n, f"node {n}") for n in adjuster.nodes_],
                      "refused": sites.refusing("adjuster"), "secure_sum": adjuster.secure_sum_,
                      "infeasible": {sites.usable.get(int(n), f"node {n}"): why
                                     for n, why in adjuster.infeasible_.items()}}


def run_policy_phase(grid: Grid, sites: SiteCheck, artifacts: RunArtifacts, record: RunRecord,
                     settings: RunSettings) -> dict:
    """Build the candidate dosing policy — the structured one if asked and any site can fit it, else the
    ensemble of this run's models (with the dose adjuster if asked: it is fitted only for this one) — have the
    sites value it against their standard of care on their own logs, and sign and send it only if the release
    gate passes; returns the record's ``policy`` entry (what shipped, or why not)."""
    formulations = collect_catalogue(grid, sites.nodes)
    candidate_folder = artifacts.folder / CANDIDATE_FOLDER
    structured = {"fitted": False, "reason": "policy-model = ensemble"}
    files = None
    if settings.policy_model == "structured":
        try:
            files, structured = write_structured_candidate(grid, sites, formulations, settings, candidate_folder)
        except DoseResponseFailed as err:
            log(INFO, "structured policy not fitted, the candidate is the ensemble policy: %s", err)
            structured = {"fitted": False, "reason": str(err), "refused": sites.refusing("dose_response")}
    if files is not None:
        adjustment = {"fitted": False, "reason": "the structured policy has no cycle-to-cycle adjuster (the safety "
                                                 "rules' dose-change limits apply); not fitted"}
    else:
        adjuster, adjustment = fit_adjuster_if_asked(grid, sites, record, settings)
        files = write_candidate(artifacts, record, formulations, candidate_folder, adjuster)
    verdict = value_at_sites(grid, sites, files, settings, record)
    if not settings.release_gate:
        verdict.reason = f"gate skipped (run config release-gate = false); the estimate: {verdict.reason}"
    ship = verdict.passed or not settings.release_gate
    entry = {"candidate": str(artifacts.folder / CANDIDATE_FOLDER), "formulations": sorted(formulations),
             "adjustment": adjustment, "policy_model": "structured" if structured["fitted"] else "ensemble",
             "structured": structured, "gate": verdict.to_dict(), "shipped": ship,
             "bundle": None, "version": None, "sites": {}}
    if ship:
        bundle = sign(files, record, verdict, Path(settings.signing_key),
                      Path(settings.policy_dir or Path(settings.out_dir) / "policy"))
        entry.update(bundle=str(bundle), version=int(bundle.name.removeprefix("v")),
                     sites=distribute(grid, sites.nodes, sites.usable, bundle, verdict.per_site))
    return entry
