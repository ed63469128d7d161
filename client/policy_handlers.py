"""The site's side of the policy phase: report its formulation catalogue, install the coordinator's policy.

- ``query.catalogue``: the properties of the formulations the site stocks (product specifications, one row
  per formulation id, averaged over its episodes — no patient value is in them). The policy builder chooses
  only among formulations some site stocks, and the recommender needs their properties to score them.
- ``query.install_policy``: the signed policy bundle, file by file, in a ConfigRecord of bytes. The site
  verifies it against the coordinator key of its own provisioning kit (node config ``trust-key``) and installs
  it in ``<site>/.fednano/policy`` (:class:`client.policy_store.PolicyStore`): an unsigned, altered, wrongly
  signed or older bundle is refused with the reason, and the current policy stays.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.policy_store import PolicyStore, PolicyStoreError
from shared.dosing_policy import FORMULATION_FEATURES
from shared.policy_bundle import BundleRejected, unpack_bundle
from shared.validation import SiteDataError

POLICY_FOLDER = Path(".fednano") / "policy"
ERROR_NO_TRUST_KEY = 4101
ERROR_BUNDLE_REJECTED = 4102
ERROR_SITE = 4103


def policy_root(site_path: Path) -> Path:
    """Where a site keeps its installed policies: beside its data."""
    folder = site_path if site_path.is_dir() else site_path.parent
    return folder / POLICY_FOLDER


def catalogue_records(episodes) -> RecordDict:
    """The formulation ids a site stocks and their properties (mean per id), as records."""
    table = episodes.groupby("formulation_id")[list(FORMULATION_FEATURES)].mean().sort_index()
    ids = ConfigRecord({"ids": [str(i) for i in table.index]})
    properties = MetricRecord({name: [float(v) for v in table[name]] for name in FORMULATION_FEATURES})
    return RecordDict({"catalogue": ids, "properties": properties})


def install_contents(contents: dict[str, bytes], site_path: Path, trust_key: Path) -> tuple[int, Path]:
    """Unpack a received bundle and install it in the site's store if it verifies and is newer; returns the
    installed version and folder. Raises ``BundleRejected`` (or ``PolicyStoreError``/``ValueError``) with the
    reason otherwise, leaving the current policy as it was."""
    store = PolicyStore(policy_root(site_path), trust_key)
    with tempfile.TemporaryDirectory(prefix="fednano-bundle-") as tmp:
        manifest = store.install(unpack_bundle(contents, Path(tmp) / "received"))
    return manifest.version, store.installed_path()


def install_from_message(msg: Message, site_path: Path, trust_key: Path) -> Message:
    """Install the bundle the message carries; reply with the installed version or an error naming why not."""
    contents = {name: bytes(data) for name, data in msg.content["bundle"].items()}
    try:
        version, folder = install_contents(contents, site_path, trust_key)
    except (BundleRejected, PolicyStoreError, ValueError) as err:
        return Message(_error(ERROR_BUNDLE_REJECTED, f"policy bundle refused: {err}"), reply_to=msg)
    return Message(RecordDict({"status": ConfigRecord({"version": version, "installed-path": str(folder)})}),
                   reply_to=msg)


def register_policy(client: ClientApp, site_source_fn: Callable[[Context], Any], load_fn: Callable[[Any], Any]
                    ) -> ClientApp:
    """Add the ``catalogue`` and ``install_policy`` query handlers to ``client``.

    ``site_source_fn(context)`` gives the node's :class:`client.app.SiteSource` (its ``trust_key`` from the
    node config ``trust-key``), ``load_fn(source)`` its validated data."""

    @client.query("catalogue")
    def catalogue(msg: Message, context: Context) -> Message:
        source = site_source_fn(context)
        try:
            site = load_fn(source)
        except SiteDataError as err:
            return Message(_error(ERROR_SITE, str(err)), reply_to=msg)
        return Message(catalogue_records(site.episodes), reply_to=msg)

    @client.query("install_policy")
    def install_policy(msg: Message, context: Context) -> Message:
        source = site_source_fn(context)
        if source.trust_key is None:
            return Message(_error(ERROR_NO_TRUST_KEY, "this site holds no coordinator key: start the SuperNode "
                                  "with --node-config 'trust-key=/path/to/policy_signing.pub'"), reply_to=msg)
        return install_from_message(msg, source.path, source.trust_key)

    return client


def _error(code: int, reason: str):
    from flwr.app import Error

    return Error(code=code, reason=reason)
