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
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.policy_store import PolicyStore, PolicyStoreError, site_store_root
from client.site import SiteHandlers, SiteRequest, error_reply
from shared.dosing_policy import FORMULATION_FEATURES
from shared.policy_bundle import BundleRejected, unpack_bundle
from shared.protocol import ErrorCode, messages
from shared.protocol.policy import Installed, bundle_files, catalogue_reply


def catalogue_records(episodes) -> RecordDict:
    """The formulation ids a site stocks and their properties (mean per id: product specifications), as records."""
    table = episodes.groupby("formulation_id")[list(FORMULATION_FEATURES)].mean().sort_index()
    properties = {str(fid): {name: float(row[name]) for name in FORMULATION_FEATURES} for fid, row in table.iterrows()}
    return catalogue_reply(properties, FORMULATION_FEATURES)


def install_contents(contents: dict[str, bytes], site_path: Path, trust_key: Path) -> tuple[int, Path]:
    """Unpack a received bundle and install it in the site's store if it verifies and is newer; returns the
    installed version and folder. Raises ``BundleRejected`` (or ``PolicyStoreError``/``ValueError``) with the
    reason otherwise, leaving the current policy as it was."""
    store = PolicyStore(site_store_root(site_path), trust_key)
    with tempfile.TemporaryDirectory(prefix="fednano-bundle-") as tmp:
        manifest = store.install(unpack_bundle(contents, Path(tmp) / "received"))
    return manifest.version, store.installed_path()


def install_from_message(msg: Message, site_path: Path, trust_key: Path) -> Message:
    """Install the bundle the message carries; reply with the installed version or an error naming why not."""
    try:
        version, folder = install_contents(bundle_files(msg.content), site_path, trust_key)
    except (BundleRejected, PolicyStoreError, ValueError) as err:
        return error_reply(msg, ErrorCode.BUNDLE_REJECTED, f"policy bundle refused: {err}")
    return Message(Installed(version, str(folder)).to_records(), reply_to=msg)


def register_policy(client: ClientApp, handlers: SiteHandlers) -> None:
    """Add the ``catalogue`` and ``install_policy`` query handlers to ``client``."""

    def catalogue(msg: Message, request: SiteRequest) -> RecordDict:
        return catalogue_records(request.site.episodes)

    client.query(messages.CATALOGUE.action)(handlers(catalogue, ErrorCode.SITE))

    @client.query(messages.INSTALL_POLICY.action)
    def install_policy(msg: Message, context: Context) -> Message:
        source = handlers.source(context)
        if source.trust_key is None:
            return error_reply(msg, ErrorCode.NO_TRUST_KEY, "this site holds no coordinator key: start the "
                               "SuperNode with --node-config 'trust-key=/path/to/policy_signing.pub'")
        return install_from_message(msg, source.path, source.trust_key)
