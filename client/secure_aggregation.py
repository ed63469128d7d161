"""A site's side of the one secure-sum protocol (``server.secure_aggregation``): masking and the key rounds.

Every summed release of histogram boosting, the federated statistics, the analytics and the masked ANN rounds
(``client.training_handlers.masked_weights``) leaves the site through
:func:`masked`: as it is with ``secure-sum = "off"``; with pairwise masks (``shared.secure_sum``, Bonawitz et al.,
CCS 2017, §4) under the session's key and the release's label, never one label twice; with the recovering
protocol (``shared.secagg_plus``) as round 2 of the release's aggregation, whose rounds 0, 1 and 3 are the
handlers :func:`keys`, :func:`shares` and :func:`unmask`:

- keys (``query.hist_keys`` / ``query.secure_keys``): pairwise, a fresh X25519 key pair for the session (the
  private key stays in the node's context state); recovering, fresh channel and mask key pairs and a self-mask
  seed for this release;
- shares (``query.hist_shares`` / ``query.secure_shares``): the site's Shamir shares of its mask key and seed,
  encrypted to each peer of the roster the server relays;
- unmask (``query.hist_unmask`` / ``query.secure_unmask``): shares of the seeds of the sites whose input arrived,
  of the mask keys of those whose input did not (never both for one site).

Noise (a DP site) is added before masking, so the server sees only the sum of noised values.

Floats go in two-lane fixed point (:func:`to_fixed`): ``round(v · 2^s)`` with the scale ``s`` the request names
(``server.secure_aggregation.FIXED_POINT_BITS``), split into a high and a low 32-bit lane, refused when a high
lane reaches ``2^63 / n`` for the ``n`` sites summed, so no sum can wrap and the server decodes it exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.site import error_reply
from shared import secagg_plus, secure_sum, wire_ints
from shared.protocol import ErrorCode, messages
from shared.protocol import hist as h
from shared.protocol import records as r
from shared.protocol.errors import ShareableError

STATE_KEY = "secure-sum-recovering"
"""Context state of the recovering secure sum: this release's side of ``shared.secagg_plus``."""
PAIRWISE_STATE_KEY = "secure-sum-pairwise"
"""Context state of the pairwise secure sum: the session's private key and the last mask label used."""
SECURE_SCALE, SECURE_SITES = h.SECURE_SCALE, h.SECURE_SITES
LANE_BITS = 32
"""Bits of the low lane of a two-lane fixed-point entry (:func:`to_fixed`)."""
MAX_SCALE_BITS = 62


def to_fixed(values: np.ndarray, config: ConfigRecord) -> np.ndarray:
    """Floats as two-lane int64 fixed point at the request's scale ``s`` (``server.secure_aggregation``): for
    ``q = v · 2^s``, the high lanes ``⌊q / 2^32⌋`` then the low lanes ``q − 2^32 ⌊q / 2^32⌋`` in [0, 2^32], so
    ``2 · len(values)`` words. A ShareableError (naming entries, never values) when an entry is not finite or its
    high lane reaches ``2^63 / n`` for the ``n`` sites summed (the sum of high lanes could wrap)."""
    scale = int(config[SECURE_SCALE])
    if not LANE_BITS <= scale <= MAX_SCALE_BITS:
        raise ShareableError(f"the request's fixed-point scale {scale} bits is outside {LANE_BITS} .. {MAX_SCALE_BITS}")
    n_sites = max(int(config.get(SECURE_SITES, 1)), 1)
    limit = float((2 ** 63 - 1) // n_sites)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    high = np.floor(np.ldexp(values, scale - LANE_BITS))  # exact: a power-of-two scaling, then floor
    bad = ~np.isfinite(high) | (np.abs(high) >= limit)
    if np.any(bad):
        bound = limit * 2.0 ** (LANE_BITS - scale)
        raise ShareableError(f"{int(bad.sum())} of {bad.size} entries are not finite or reach the fixed-point bound "
                             f"2^63 / {n_sites} sites of the high lane at scale 2^-{scale} (|value| < {bound:.3g}): "
                             "the secure sum would overflow")
    low = np.rint(np.ldexp(values - np.ldexp(high, LANE_BITS - scale), scale))  # the remainder's bits, in [0, 2^32]
    return np.concatenate([high, low]).astype(np.int64)


def masked_floats(values: np.ndarray, config: ConfigRecord, context: Context) -> Array:
    """A float vector as sent for a secure sum: in fixed point (:func:`to_fixed`, two words per entry), masked."""
    return masked(to_fixed(values, config), config, context)


def masked(values: np.ndarray, config: ConfigRecord, context: Context, bits: np.ndarray | None = None) -> Array:
    """``values`` as sent: masked for the secure sum when the run asks for it, else as they are; with ``bits``
    (every entry's width, ``shared.wire_ints``), as residues modulo 2^bits packed into bytes."""
    if bits is not None:
        if bool(config[h.SECURE_SUM]):
            words = secure_mask(values, config, context, bits)
        else:
            words = wire_ints.residues(values, bits)
        return Array(wire_ints.pack(words, bits))
    if not bool(config[h.SECURE_SUM]):
        return Array(values)
    return Array(secure_mask(values, config, context, 64))


def recovering(config: ConfigRecord) -> bool:
    """Whether the request belongs to the recovering secure sum (``shared.secagg_plus``), not the pairwise one."""
    return bool(config.get(h.SECURE_RECOVERING, False))


def secure_mask(values: np.ndarray, config: ConfigRecord, context: Context, bits: np.ndarray | int) -> np.ndarray:
    """``values`` masked modulo 2^bits for the secure sum the request belongs to."""
    if recovering(config):
        return recovering_mask(values, config, context, bits)
    return pairwise_mask(values, config, context, bits)


def pairwise_mask(values: np.ndarray, config: ConfigRecord, context: Context, bits: np.ndarray | int) -> np.ndarray:
    """``values`` masked modulo 2^bits under this session's next mask label (never one used before)."""
    state = context.state.get(PAIRWISE_STATE_KEY)
    if state is None or str(state["session"]) != str(config[h.SECURE_SESSION]):
        raise secure_sum.SecureSumError("no secure-sum key for this session at this site (the keys round first)")
    sequence = int(config[h.SECURE_SEQUENCE])
    if sequence <= int(state["last-sequence"]):
        raise secure_sum.SecureSumError(f"mask label {sequence} was already used: refusing to reuse a mask")
    state["last-sequence"] = sequence
    session = str(config[h.SECURE_SESSION])
    nodes = [int(n) for n in config[h.SECURE_NODES]]
    masking = secure_sum.mask_peers(nodes, context.node_id, session)  # the session's graph: all, or k neighbours
    peers = dict(zip((int(n) for n in config[h.SECURE_PEERS]), map(bytes, config[h.SECURE_KEYS]), strict=True))
    if sorted(peers) != masking:  # masks with other sites than the graph's could leave this site's value exposed
        raise secure_sum.SecureSumError(f"the request carries keys of {len(peers)} sites, not of this site's "
                                        f"{len(masking)} mask peers in the session's graph")
    label = f"{session}/{sequence}"
    return secure_sum.mask(values, bytes(state["private-key"]), context.node_id, peers, label, bits)


def recovering_mask(values: np.ndarray, config: ConfigRecord, context: Context, bits: np.ndarray | int
                    ) -> np.ndarray:
    """Round 2 of the release's secure aggregation: ``values`` masked modulo 2^bits with the keys this site drew
    for the release (``query.hist_keys``), after taking the shares its peers sent it."""
    site = kept_aggregation(config, context)
    site.receive(dict(zip((int(n) for n in config[h.SHARE_PEERS]), map(bytes, config[h.SHARE_CIPHERTEXTS]),
                          strict=True)))
    words = site.masked_input(values, bits, [int(n) for n in config[h.SECURE_PARTICIPANTS]])
    keep_aggregation(site, context)
    return words


def release_label(config: ConfigRecord) -> str:
    """The label of one release's secure aggregation: the session and the release's sequence number."""
    return f"{config[h.SECURE_SESSION]}/{int(config[h.SECURE_SEQUENCE])}"


def kept_aggregation(config: ConfigRecord, context: Context) -> secagg_plus.SecAggSite:
    """This site's side of the request's aggregation, as kept between its rounds (refused if it has none)."""
    state = context.state.get(STATE_KEY)
    if state is None or str(state["session"]) != str(config[h.SECURE_SESSION]) or \
            str(state["label"]) != release_label(config):
        raise secagg_plus.SecAggError("this site drew no secure-aggregation keys for this release (the keys "
                                      "round first)")
    return secagg_plus.SecAggSite.from_state(dict(state))


def keep_aggregation(site: secagg_plus.SecAggSite, context: Context) -> None:
    """Keep this site's side of the aggregation in the node's context state for its next round."""
    state = context.state[STATE_KEY]
    state.update(site.to_state())



def refusing(handler: Any, code: ErrorCode = ErrorCode.HIST_REQUEST) -> Any:
    """A secure-aggregation handler whose refusals (ShareableError, text without values) become error replies
    (``code``: the phase's request error)."""

    def handle(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except (ShareableError, KeyError) as err:
            reason = str(err) if isinstance(err, ShareableError) else "the request misses a key"
            return error_reply(msg, code, f"{msg.metadata.message_type}: {reason}")

    return handle


def keys(msg: Message, context: Context) -> Message:
    """``query.hist_keys``: the session's pairwise key, or round 0 of a release's recovering aggregation."""
    if recovering(msg.content[r.CONFIG]):
        return release_keys(msg, context)
    return session_key(msg, context)


def session_key(msg: Message, context: Context) -> Message:
    """Pairwise masks: a fresh key pair for the session; the private key stays in this node's context state."""
    private_key = secure_sum.new_private_key()
    session = str(msg.content[r.CONFIG][h.SECURE_SESSION])
    context.state[PAIRWISE_STATE_KEY] = ConfigRecord({"session": session, "private-key": private_key,
                                                      "last-sequence": -1})
    reply = ConfigRecord({h.PUBLIC_KEY: secure_sum.public_key(private_key)})
    return Message(RecordDict({r.KEYS: reply}), reply_to=msg)


def release_keys(msg: Message, context: Context) -> Message:
    """Round 0: fresh channel and mask key pairs and a self-mask seed for this release; the public keys go to the
    server. A release number not above every one this site has drawn keys for is refused (never one mask twice)."""
    config = msg.content[r.CONFIG]
    session, sequence = str(config[h.SECURE_SESSION]), int(config[h.SECURE_SEQUENCE])
    state = context.state.get(STATE_KEY)
    if state is not None and str(state["session"]) == session and sequence <= int(state["last-sequence"]):
        raise secagg_plus.SecAggError(f"mask label {sequence} was already used: refusing to reuse a mask")
    site = secagg_plus.SecAggSite(context.node_id, release_label(config))
    context.state[STATE_KEY] = ConfigRecord({"session": session, "last-sequence": sequence, **site.to_state()})
    channel_key, mask_key = site.advertise()
    return Message(RecordDict({r.KEYS: ConfigRecord({h.CHANNEL_KEY: channel_key, h.MASK_KEY: mask_key})}),
                   reply_to=msg)


def shares(msg: Message, context: Context) -> Message:
    """Round 1: this site's shares, encrypted to each peer of the roster the server relays."""
    config = msg.content[r.CONFIG]
    site = kept_aggregation(config, context)
    nodes = [int(n) for n in config[h.SECURE_NODES]]
    roster = secagg_plus.Roster(site.label, int(config[h.SECURE_THRESHOLD]),
                                dict(zip(nodes, map(bytes, config[h.SECURE_CHANNEL_KEYS]), strict=True)),
                                dict(zip(nodes, map(bytes, config[h.SECURE_KEYS]), strict=True)))
    outbox = site.share(roster)
    keep_aggregation(site, context)
    reply = ConfigRecord({h.SHARE_PEERS: list(outbox), h.SHARE_CIPHERTEXTS: list(outbox.values())})
    return Message(RecordDict({r.KEYS: reply}), reply_to=msg)


def unmask(msg: Message, context: Context) -> Message:
    """Round 3: shares of the self-mask seeds of the sites that sent, of the mask keys of those that did not
    (never both for one site: ``shared.secagg_plus.SecAggSite.unmask`` refuses)."""
    config = msg.content[r.CONFIG]
    site = kept_aggregation(config, context)
    answer = site.unmask([int(n) for n in config[h.SECURE_SENT]], [int(n) for n in config[h.SECURE_DROPPED]])
    keep_aggregation(site, context)
    reply = ConfigRecord({h.SEEDS_OF: list(answer.seeds), h.SEED_SHARES: list(answer.seeds.values()),
                          h.MASK_KEYS_OF: list(answer.mask_keys), h.MASK_KEY_SHARES: list(answer.mask_keys.values())})
    return Message(RecordDict({r.KEYS: reply}), reply_to=msg)


SECURE_AGGREGATION = {messages.HIST_KEYS: keys, messages.HIST_SHARES: shares, messages.HIST_UNMASK: unmask}
"""The rounds of a release's secure aggregation other than the masked input (which the request itself asks), as
histogram boosting names them."""
SECURE_ROUNDS = {messages.SECURE_KEYS: keys, messages.SECURE_SHARES: shares, messages.SECURE_UNMASK: unmask}
"""The same rounds, as the statistics and analytics phases name them (``server.secure_aggregation``)."""


def register_secure_aggregation(client: ClientApp) -> None:
    """Add the ``query.secure_*`` rounds to ``client`` (``query.hist_*`` rounds: ``client.hist_handlers``)."""
    for message, handler in SECURE_ROUNDS.items():
        client.query(message.action)(refusing(handler, ErrorCode.REQUEST))


