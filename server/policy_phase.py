"""The server's policy phase: build the global dosing policy, sign it, send it to every site.

1. **catalogue** — each site reports the formulations it stocks and their properties (product specs);
   the policy may choose only among those.
2. **dose adjustment** — if the run asks for it, the fitted-Q adjuster is learned federated from the sites'
   multi-cycle trajectories (:mod:`server.adjustment_phase`).
3. **bundle** — ``policy.json`` (:class:`shared.dosing_policy.DosingPolicy`'s document: formulations, action
   space, safety rules, objective, adjuster) plus the federated models (``encoder.json``,
   ``ann_federated.pt``, ``xgb_*.json``), signed with the coordinator's Ed25519 key into ``OUT/policy/v<N>``
   (run config ``policy-dir``; :func:`shared.policy_bundle.build_bundle`). The manifest carries each site's
   ε spent, the validation metrics and the safety bounds.
4. **distribution** — ``query.install_policy`` to every usable site; each verifies and installs it, or says
   why not (:mod:`client.policy_handlers`). Which sites hold which version goes into the run record.

The version comes from the coordinator's own counter, ``policy_version`` in the policy folder, so each
run's bundle is newer than every earlier one written there and sites can refuse rollbacks.
"""

from __future__ import annotations

import json
import tempfile
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from shared.dosing_policy import FORMULATION_FEATURES, POLICY_FILE, DosingPolicy
from shared.durable import write_json_atomically
from shared.encoding import FeatureEncoder
from shared.policy_bundle import build_bundle, bundle_contents

CATALOGUE = "query.catalogue"
INSTALL_POLICY = "query.install_policy"
VERSION_FILE = "policy_version"


def collect_catalogue(grid: Grid, nodes: list[int]) -> dict[str, dict[str, float]]:
    """Formulation id → properties, over every site that answered (ids seen at several sites: mean)."""
    messages = [Message(RecordDict(), dst_node_id=n, message_type=CATALOGUE) for n in nodes]
    seen: dict[str, list[list[float]]] = {}
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            log(INFO, "catalogue: node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        ids = list(reply.content["catalogue"]["ids"])
        props = reply.content["properties"]
        for j, fid in enumerate(ids):
            seen.setdefault(fid, []).append([float(props[name][j]) for name in FORMULATION_FEATURES])
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


def model_files(out: Path, record: dict, hidden: tuple[int, ...]) -> tuple[dict[str, dict], dict[str, Path]]:
    """The outcome models of the run for ``policy.json`` and the files they live in."""
    models, files = {}, {"encoder.json": out / "encoder.json"}
    if (out / "ann_federated.pt").exists():
        models["ann"] = {"kind": "ann", "weights": "ann_federated.pt", "hidden": list(hidden)}
        files["ann_federated.pt"] = out / "ann_federated.pt"
    heads = {p.stem.removeprefix("xgb_"): p.name for p in sorted(out.glob("xgb_*.json"))}
    if heads and record.get("xgboost"):
        models["xgboost"] = {"kind": "xgboost", "heads": heads}
        files.update({name: out / name for name in heads.values()})
    if not models:
        raise RuntimeError(f"no federated model in {out}: nothing to build a policy from")
    return models, files


def validation_metrics(record: dict) -> dict:
    """The federated models' overall test metrics (AUC, balanced accuracy, ...) for the manifest."""
    result = {}
    for family, final in (("ann", record.get("final")), ("xgboost", (record.get("xgboost") or {}).get("final"))):
        if final:
            result[family] = {outcome: {k: v for k, v in values.items() if isinstance(v, int | float)}
                              for outcome, values in final["overall"].items()}
    return result


def build_policy(out: Path, record: dict, encoder: FeatureEncoder, formulations: dict, hidden: tuple[int, ...],
                 signing_key: Path, run_id: str, policy_dir: Path, adjuster=None) -> Path:
    """Write ``policy.json`` and sign the bundle (models from ``out``) into ``policy_dir/v<N>``; returns the
    bundle folder."""
    models, files = model_files(out, record, hidden)
    policy = DosingPolicy(encoder=encoder, members={}, formulations=formulations, adjuster=adjuster)
    version = next_version(policy_dir)
    privacy = {site: {"epsilon": p.get("epsilon"), "delta": p.get("delta"), "budget": p.get("budget")}
               for site, p in record.get("privacy", {}).items()}
    document = policy.document(models, "encoder.json")
    bounds = json.loads(json.dumps({k: document[k] for k in ("action_space", "safety", "objective")}))
    with tempfile.TemporaryDirectory(prefix="fednano-policy-") as tmp:
        path = Path(tmp) / POLICY_FILE
        path.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")
        return build_bundle(policy_dir / f"v{version}", {**files, POLICY_FILE: path}, version=version,
                            run_id=run_id, privacy=privacy, metrics=validation_metrics(record),
                            safety_bounds=bounds, signing_key_path=signing_key)


def distribute(grid: Grid, nodes: list[int], names: dict[int, str], bundle: Path) -> dict[str, dict]:
    """Send the bundle to every site; per site: the installed version, or the reason it was refused."""
    contents = ConfigRecord(bundle_contents(bundle))
    messages = [Message(RecordDict({"bundle": contents}), dst_node_id=n, message_type=INSTALL_POLICY)
                for n in nodes]
    result = {names.get(n, f"node {n}"): {"installed": False, "reason": "no reply"} for n in nodes}
    for reply in grid.send_and_receive(messages):
        name = names.get(reply.metadata.src_node_id, f"node {reply.metadata.src_node_id}")
        if reply.has_error():
            result[name] = {"installed": False, "reason": reply.error.reason}
        else:
            result[name] = {"installed": True, "version": int(reply.content["status"]["version"])}
        log(INFO, "policy at %s: %s", name, result[name])
    return result
