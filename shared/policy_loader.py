"""Load whichever dosing policy a bundle holds: ``policy.json``'s ``kind`` says which class reads it.

Two policies share the bundle format (:mod:`shared.policy_bundle`) and the recommender's interface
(``recommend``, ``recommend_frame``, ``safety_limits``, ``formulations``, ``manifest``, ``version``):

- ``fednano-dosing-policy/1``: :class:`shared.dosing_policy.DosingPolicy` (federated ANN + XGBoost ensemble);
- ``fednano-structured-dosing-policy/1``: :class:`shared.structured_policy.StructuredDosingPolicy` (structured
  dose–response models with confidence bounds, restricted to the federation's support).
"""

from __future__ import annotations

import json
from pathlib import Path

from shared.dosing_policy import KIND as ENSEMBLE_KIND
from shared.dosing_policy import POLICY_FILE, DosingPolicy
from shared.policy_bundle import Manifest, verify_bundle
from shared.structured_policy import KIND as STRUCTURED_KIND
from shared.structured_policy import StructuredDosingPolicy

AnyPolicy = DosingPolicy | StructuredDosingPolicy
KINDS = {ENSEMBLE_KIND: DosingPolicy, STRUCTURED_KIND: StructuredDosingPolicy}


def policy_from_folder(folder: Path, manifest: Manifest | None = None) -> AnyPolicy:
    """The policy in ``folder`` (no verification: use :func:`policy_from_bundle` for anything received).
    Raises ``ValueError`` naming the file for an unknown kind."""
    kind = json.loads((Path(folder) / POLICY_FILE).read_text()).get("kind")
    if kind not in KINDS:
        raise ValueError(f"{Path(folder) / POLICY_FILE}: kind {kind!r}, expected one of {', '.join(sorted(KINDS))}")
    return KINDS[kind].from_folder(Path(folder), manifest)


def policy_from_bundle(bundle_dir: Path, trust_key: Path) -> AnyPolicy:
    """Verify the signed bundle against the coordinator key, then load its policy (either kind).

    Raises ``shared.policy_bundle.BundleRejected`` if the bundle does not verify."""
    manifest = verify_bundle(Path(bundle_dir), Path(trust_key))
    return policy_from_folder(Path(bundle_dir), manifest)
