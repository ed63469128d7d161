"""The site's side of the policy phase: report its formulation catalogue, value a candidate, install the policy.

- ``query.catalogue``: the properties of the formulations the site stocks (product specifications, one row
  per formulation id, averaged over its episodes — no patient value is in them). The policy builder chooses
  only among formulations some site stocks, and the recommender needs their properties to score them.
- ``query.policy_value``: a candidate policy's files (not signed: only evaluated, never served); the site
  answers doubly-robust value sums of the candidate and of its standard of care on its own held-out first
  cycles (:mod:`client.ope`), noised under DP — what the coordinator's release gate decides on.
- ``query.install_policy``: the signed policy bundle, file by file, in a ConfigRecord of bytes. The site
  verifies it against the coordinator key of its own provisioning kit (node config ``trust-key``) and installs
  it in ``<site>/.fednano/policy`` (:class:`client.policy_store.PolicyStore`): an unsigned, altered, wrongly
  signed or older bundle is refused with the reason, and the current policy stays. The message may carry the
  release gate's verdict on this site's own logs (:class:`shared.protocol.policy.SiteVerdict`); the site stores
  it with the version, and its usual formulations read from its own logs (the standard of care the verdict
  was measured against), so that a site whose logs find the policy worse serves standard of care
  (:mod:`client.site_gate`).
"""

from __future__ import annotations

import tempfile
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from client.decision_log import own_practice
from client.dp import PhaseRelease
from client.ope import first_cycles, private_value_sums, site_value_sums
from client.policy_store import PolicyStore, PolicyStoreError, site_store_root
from client.site import SiteHandlers, SiteRequest, SiteSource, error_reply, load
from client.site_gate import UsualFormulations
from shared.dosing_policy import FORMULATION_FEATURES
from shared.policy_bundle import BundleRejected, unpack_bundle
from shared.policy_loader import policy_from_folder
from shared.protocol import ErrorCode, messages
from shared.protocol.errors import ShareableError
from shared.protocol.policy import Installed, SiteVerdict, bundle_files, catalogue_reply, value_reply, verdict_of
from shared.protocol.privacy import RELEASE_INDEX, RELEASES
from shared.protocol.records import PRIVACY, SPLIT_SEED
from shared.validation import SiteDataError


def catalogue_records(episodes) -> RecordDict:
    """The formulation ids a site stocks and their properties (mean per id: product specifications), as records."""
    table = episodes.groupby("formulation_id")[list(FORMULATION_FEATURES)].mean().sort_index()
    properties = {str(fid): {name: float(row[name]) for name in FORMULATION_FEATURES} for fid, row in table.iterrows()}
    return catalogue_reply(properties, FORMULATION_FEATURES)


def install_contents(contents: dict[str, bytes], site_path: Path, trust_key: Path,
                     verdict: SiteVerdict | None = None, usual: UsualFormulations | None = None) -> tuple[int, Path]:
    """Unpack a received bundle and install it in the site's store if it verifies and is newer, with the site's
    own gate verdict and usual formulations if given (:meth:`PolicyStore.install`); returns the installed
    version and folder. Raises ``BundleRejected`` (or ``PolicyStoreError``/``ValueError``) with the reason
    otherwise, leaving the current policy as it was."""
    store = PolicyStore(site_store_root(site_path), trust_key)
    with tempfile.TemporaryDirectory(prefix="fednano-bundle-") as tmp:
        manifest = store.install(unpack_bundle(contents, Path(tmp) / "received"), verdict, usual)
    return manifest.version, store.installed_path()


def usual_formulations(source: SiteSource) -> UsualFormulations | None:
    """The site's usual formulations from the first cycles it logged by its own practice (what its standard of
    care gives, as the gate measured it: ``client.ope``); None if its data cannot be read or hold no first cycle
    with outcomes."""
    try:
        site = load(source)
        logged = own_practice(first_cycles(site.episodes), site.decisions)
        return UsualFormulations.of(logged) if len(logged) else None
    except (SiteDataError, OSError, ValueError, KeyError) as err:
        log(WARNING, "site gate: the usual formulations could not be read from the site's logs: %s", err)
        return None


def install_from_message(msg: Message, source: SiteSource) -> Message:
    """Install the bundle the message carries, with the site's own verdict if it carries one; reply with the
    installed version or an error naming why not."""
    try:
        verdict = verdict_of(msg.content)
        usual = usual_formulations(source) if verdict is not None else None
        version, folder = install_contents(bundle_files(msg.content), source.path, source.trust_key, verdict, usual)
    except (BundleRejected, PolicyStoreError, ValueError) as err:
        return error_reply(msg, ErrorCode.BUNDLE_REJECTED, f"policy bundle refused: {err}")
    if verdict is not None:
        log(INFO, "policy v%s installed; release gate on this site's logs: %s (%s)", version,
            "worse than standard of care: standard of care served" if verdict.worse else "policy served",
            verdict.describe())
    return Message(Installed(version, str(folder)).to_records(), reply_to=msg)


def policy_value(msg: Message, request: SiteRequest) -> RecordDict:
    """The candidate's and standard of care's value sums on the site's held-out first cycles (``client.ope``),
    through the ``policy`` release under DP."""
    with tempfile.TemporaryDirectory(prefix="fednano-candidate-") as tmp:
        folder = Path(tmp)
        for name, data in bundle_files(msg.content).items():
            if Path(name).name != name or name.startswith("."):
                raise ShareableError(f"candidate file name {name!r} is not a plain file name")
            (folder / name).write_bytes(data)
        candidate = policy_from_folder(folder)  # either policy kind
        sums = site_value_sums(candidate, request.site.episodes, request.site.task, int(request.config[SPLIT_SEED]),
                               request.site.decisions)
    content = RecordDict()
    if request.dp is not None:
        release = PhaseRelease.for_phase(request.context, request.dp, "policy", releases=int(request.config[RELEASES]))
        sums, facts = private_value_sums(sums, release, int(request.config[RELEASE_INDEX]))
        content[PRIVACY] = facts.to_record()
    content.update(value_reply(sums))
    return content


def register_policy(client: ClientApp, handlers: SiteHandlers) -> None:
    """Add the ``catalogue``, ``policy_value`` and ``install_policy`` query handlers to ``client``."""

    def catalogue(msg: Message, request: SiteRequest) -> RecordDict:
        return catalogue_records(request.site.episodes)

    client.query(messages.CATALOGUE.action)(handlers(catalogue, ErrorCode.SITE))
    client.query(messages.POLICY_VALUE.action)(handlers(policy_value))

    @client.query(messages.INSTALL_POLICY.action)
    def install_policy(msg: Message, context: Context) -> Message:
        source = handlers.source(context)
        if source.trust_key is None:
            return error_reply(msg, ErrorCode.NO_TRUST_KEY, "this site holds no coordinator key: start the "
                               "SuperNode with --node-config 'trust-key=/path/to/policy_signing.pub'")
        return install_from_message(msg, source)
