"""The server's side of the one secure-sum protocol every summing phase uses (histograms, statistics, analytics).

A :class:`SecureSession` asks a fixed set of sites for one array per release and returns only their sum, in the
run's ``secure-sum`` mode (``shared.protocol.hist.SECURE_SUM_MODES``):

- ``off`` — plain sums of the sites' int64 arrays;
- ``pairwise`` — Bonawitz et al., CCS 2017, §4 pairwise masks without recovery (``shared.secure_sum``): one key
  exchange (:meth:`SecureSession.exchange_keys`) per session, then one exchange per release; a site lost
  after the key exchange leaves its masks in the sum, so the sum fails with :class:`SecureProtocolError`;
- ``recovering`` — the same paper's full protocol with dropout recovery (``shared.secagg_plus``: X25519 key
  agreement, ChaCha20-Poly1305 channels, Shamir-shared mask keys and self-mask seeds): keys, shares, the masked input,
  unmasking, four exchanges per release; the sum survives up to n − t sites lost in any round (t the Shamir
  threshold, ⌊n/2⌋ + 1 by default) and is that of the sites whose masked input arrived.

The site side is ``client.secure_aggregation`` (the handlers of the key, share and unmask rounds, and
:func:`client.secure_aggregation.masked` for the input). ``server.hist_phase`` derives its session from this one;
the statistics phase (``server.statistics_phase``) and the analytics phase (``server.analytics_phase``) use it
directly, each release batching all the arrays of one answer into one vector. The masked ANN rounds
(``strategies.pairwise_masked_mean``, sessions made by ``server.training_phase.ann_sessions``) send each release's
masked request themselves, as Flower's training message: :meth:`SecureSession.open_release` (numbering, pairwise
check, recovering keys and shares), :meth:`SecureSession.release_config` per node, then
:meth:`SecureSession.close_release` with the replies (recovering: the unmask round), which :meth:`summed` chains.

Floats are summed in two-lane fixed point (:data:`FIXED_POINT_BITS` ``s = 40``): a site writes
``q = round(v · 2^s) = high · 2^32 + low`` with ``0 ≤ low < 2^32`` and sends the high lanes, then the low lanes, as
int64 words (``client.secure_aggregation.to_fixed``): two words per entry. Low lanes sum exactly for any
n < 2^31 sites; a site refuses any entry with ``|high| ≥ 2^63 / n`` (n the sites the request names,
:data:`SECURE_SITES`), so no sum of high lanes leaves the int64 range: every sum decodes exactly, and the
server gets the plain float sum within n · 2^−41 per entry (each site's rounding; ≈ 5e−13 · n) and the float64
rounding of the decoded sum. The bound is ``|v| < 2^(95 − s) / n = 2^55 / n ≈ 3.6e16 / n`` per entry (a sum of
squares of values up to 10^4 over 10^6 rows is 10^14). One lane at 2^−16 was tried first: Newton's
convergence test at 1e−9 and a near-aliased Gram matrix amplified its rounding (a t statistic moved by 1e−4).

Threat model: an honest-but-curious server that relays keys faithfully; the sum stays hidden from the server
as long as two honest sites take part (pairwise), or against the server colluding with fewer than t sites
(recovering). What is not a sum (minima, maxima, category names, DP facts) travels in the clear.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from shared import secagg_plus, wire_ints
from shared.protocol import hist as h
from shared.protocol import messages
from shared.protocol import records as r
from shared.secure_sum import SecureProtocolError, mask_graph, unmask_sum

FIXED_POINT_BITS = 40
"""Fractional bits of floats summed in fixed point (resolution 2^−40 ≈ 9e−13; see the module docstring)."""
LANE_BITS = 32
"""Bits of an entry's low lane: the site sends ``q = round(v · 2^s)`` as ``q = high · 2^32 + low``."""
SECURE_SCALE, SECURE_SITES = h.SECURE_SCALE, h.SECURE_SITES


def from_fixed(total: np.ndarray, scale_bits: int = FIXED_POINT_BITS) -> np.ndarray:
    """The float64 sums of a two-lane fixed-point sum (high lanes, then low lanes: module docstring)."""
    total = np.asarray(total, dtype=np.int64).reshape(-1)
    if total.size % 2:
        raise ValueError(f"a two-lane fixed-point sum has an even number of words; got {total.size}")
    high, low = np.split(total, 2)
    return np.ldexp(high.astype(np.float64), LANE_BITS - scale_bits) + np.ldexp(low.astype(np.float64), -scale_bits)


def value_bytes(value: object) -> int:
    """Payload bytes of a config value: text and bytes by length, a number as 8, a list item by item."""
    if isinstance(value, bytes | str):
        return len(value)
    if isinstance(value, list):
        return sum(value_bytes(v) for v in value)
    return 8


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of a message: array data and config and metric values (no framing)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
        else:
            total += sum(value_bytes(v) for v in record.values())
    return total


@dataclass
class Release:
    """One summed release between :meth:`SecureSession.open_release` and :meth:`SecureSession.close_release`.

    Attributes
    ----------
    extra : dict                 what every masked request of the release carries besides the base config
    per_node : dict of int to dict   what each node's request adds (recovering: the shares sent to it)
    roster : Roster or None      recovering: round 1's roster (``shared.secagg_plus``)
    participants : list of int   recovering: the sites whose shares reached the server (they mask with each other)
    """

    extra: dict
    per_node: dict[int, dict] = field(default_factory=dict)
    roster: secagg_plus.Roster | None = None
    participants: list[int] = field(default_factory=list)


class SecureSession:
    """One run of the secure-sum protocol with a fixed set of sites: requests, sums, keys, lost sites, bytes.

    Parameters
    ----------
    grid : Grid                 Flower's Grid (or an in-process stand-in with ``send_and_receive``)
    nodes : list of int         the sites of the session
    mode : str                  off | pairwise | recovering (``shared.protocol.hist.secure_sum_mode``)
    base : ConfigRecord         keys every request of the session carries (the session id and mode are added)
    threshold : int, default 0  recovering: the Shamir threshold (0: ⌊n/2⌋ + 1 of the sites at the first sum)
    rounds : tuple of MessageName, default (SECURE_KEYS, SECURE_SHARES, SECURE_UNMASK)
                                the messages of the key, share and unmask rounds
    """

    def __init__(self, grid: Grid, nodes: list[int], mode: str | bool, base: ConfigRecord | None = None,
                 threshold: int = 0, rounds: tuple[messages.MessageName, ...] = (
                     messages.SECURE_KEYS, messages.SECURE_SHARES, messages.SECURE_UNMASK)) -> None:
        self.grid, self.nodes = grid, list(nodes)
        self.mode = h.secure_sum_mode(mode)
        self.keys_message, self.shares_message, self.unmask_message = rounds
        self.settings_threshold = int(threshold)
        self.base = base if base is not None else ConfigRecord()
        self.base.update({h.SECURE_SUM: self.mode != "off", h.SECURE_SESSION: uuid.uuid4().hex})
        if self.mode == "recovering":
            self.base[h.SECURE_RECOVERING] = True
        self.sequence = 0  # the next release's number: a mask label is never used twice
        self.bytes_down = self.bytes_up = 0
        self.mask_keys: dict[int, bytes] = {}  # pairwise: every site's public key; each site gets its peers' only
        self.mask_graph: dict[int, list[int]] = {}  # pairwise: each site's mask peers, fixed at the key exchange
        self.privacy: list[tuple[int, dict]] = []  # (node, a DP release's facts)
        self.lost: dict[int, str] = {}  # sites lost after the session began, and why
        self.threshold = 0  # the secure sums' Shamir threshold, fixed at the first one
        self.summed_nodes: list[int] = []  # the sites whose input is in the last sum
        self.replies: dict[int, RecordDict] = {}  # their replies to the last summed request (facts, labels)

    def request_config(self, with_base: bool) -> ConfigRecord:
        """The config every request carries: the base config, or (rounds of the protocol) the session id only."""
        if with_base:
            return ConfigRecord(dict(self.base))
        return ConfigRecord({h.SECURE_SESSION: self.base[h.SECURE_SESSION]})

    def ask_all(self, message_type: messages.MessageName, extra: dict, arrays: ArrayRecord,
                per_node: dict[int, dict] | None = None, with_base: bool = True) -> tuple[dict, dict[int, str]]:
        """Send one request to every site (the base config unless not ``with_base``, ``extra``, and the node's
        own ``per_node`` keys); replies by node, and failures (error or no reply) by node."""
        config = self.request_config(with_base)
        config.update(extra)
        sent = []
        for node in self.nodes:
            own = config
            if per_node or (with_base and self.mask_keys):
                own = ConfigRecord(dict(config))
                own.update(per_node.get(node, {}) if per_node else {})
                if with_base:
                    own.update(self.peer_keys(node))
            content = RecordDict({r.CONFIG: own, r.ARRAYS: arrays})
            self.bytes_down += record_bytes(content)
            sent.append(Message(content, dst_node_id=node, message_type=message_type.type))
        replies, failures = {}, {}
        for reply in self.grid.send_and_receive(sent):
            node = reply.metadata.src_node_id
            if reply.has_error():
                failures[node] = reply.error.reason
                continue
            self.bytes_up += record_bytes(reply.content)
            replies[node] = reply.content
            if r.PRIVACY in reply.content:
                self.privacy.append((node, dict(reply.content[r.PRIVACY])))
        for node in set(self.nodes) - set(replies) - set(failures):
            failures[node] = "no reply"
        return replies, failures

    def exchange_keys(self) -> None:
        """Pairwise masks: collect every site's public key and put the table in every later request. A site that
        fails this is left out of the session (SecureProtocolError when none is left)."""
        replies, failures = self.ask_all(self.keys_message, {}, ArrayRecord())
        self.lose(failures)
        self.base[h.SECURE_NODES] = [int(n) for n in self.nodes]
        self.mask_keys = {int(n): bytes(replies[n][r.KEYS][h.PUBLIC_KEY]) for n in self.nodes}
        self.mask_graph = mask_graph(list(self.mask_keys), str(self.base[h.SECURE_SESSION]))

    def peer_keys(self, node: int) -> dict:
        """The public keys ``node`` masks with (its peers in the session's graph, ``shared.secure_sum.mask_peers``),
        none before the key exchange. A site is sent only its peers' keys: 26 at a thousand sites, not 999 (32 kB
        per request); it checks that they are the graph's, which every site computes from public values."""
        if not self.mask_keys:
            return {}
        peers = self.mask_graph[int(node)]
        return {h.SECURE_PEERS: peers, h.SECURE_KEYS: [self.mask_keys[p] for p in peers]}

    def lose(self, failures: dict[int, str]) -> None:
        """Leave out, for the rest of the session, the sites that failed a request (SecureProtocolError when none
        is left to sum over)."""
        for node, reason in failures.items():
            self.lost[node] = reason
        self.nodes = [n for n in self.nodes if n not in failures]
        if failures and not self.nodes:
            node, reason = next(iter(self.lost.items()))
            raise SecureProtocolError(node, f"{reason} (and no site is left to sum over)")

    def secure_threshold(self) -> int:
        """The Shamir threshold, fixed at the first secure sum from the sites then in the session."""
        if not self.threshold:
            self.threshold = self.settings_threshold or secagg_plus.default_threshold(len(self.nodes))
        return self.threshold

    def summed(self, message_type: messages.MessageName, extra: dict, arrays: ArrayRecord, name: str,
               bits: np.ndarray | None = None, signed: np.ndarray | bool = False) -> np.ndarray:
        """The int64 sum over sites of one released array (``name`` in the replies' arrays), masked by the mode.

        With ``bits`` (the width of every entry, ``shared.wire_ints``), the sites send packed residues and the
        sum is decoded from them (``signed`` where an entry's sum may be negative); else int64 words. Every
        request carries :data:`SECURE_SITES` (the sites asked) and the release's sequence number.
        """
        release = self.open_release(extra)
        replies, failures = self.ask_all(message_type, release.extra, arrays, release.per_node)
        return self.close_release(release, replies, failures, name, bits, signed)

    def open_release(self, extra: dict) -> Release:
        """Number the next release and run the rounds before its masked request (recovering: keys and shares;
        pairwise: check that every site of the key table is still in the session). The caller sends the request
        itself, to every node of :attr:`nodes`, with :meth:`release_config`, and gives the replies to
        :meth:`close_release`: :meth:`summed` does both; the ANN rounds (``strategies.pairwise_masked_mean``) send
        the request as Flower's training message."""
        extra = {**extra, h.SECURE_SEQUENCE: self.sequence, SECURE_SITES: len(self.nodes)}
        self.sequence += 1
        keyed = [int(n) for n in self.base.get(h.SECURE_NODES, [])]
        if self.mode == "pairwise" and keyed != self.nodes:  # every site of the key table must answer
            node = next((n for n in keyed if n not in self.nodes), -1)
            reason = self.lost.get(node, "not in the session") if node >= 0 else "no key exchange before the sum"
            raise SecureProtocolError(node, f"{reason}; lost after the pairwise key exchange, its masks would stay "
                                            "in the sum")
        if self.mode != "recovering":
            return Release(extra)
        try:
            return self.shared_release(extra)
        except secagg_plus.SecAggError as err:
            raise self.unrecoverable(err) from None

    def shared_release(self, extra: dict) -> Release:
        """Rounds 0 and 1 of Bonawitz et al.'s protocol for one release (``shared.secagg_plus``): every site's
        keys, then its Shamir shares, relayed so that each site's masked request carries those sent to it."""
        round_keys = self.round_keys(extra)
        threshold = self.secure_threshold()
        replies, failures = self.ask_all(self.keys_message, round_keys, ArrayRecord(), with_base=False)
        self.lose(failures)
        secagg_plus.validate_threshold(threshold, len(self.nodes))
        roster_config = {h.SECURE_THRESHOLD: threshold, h.SECURE_NODES: list(self.nodes),
                         h.SECURE_CHANNEL_KEYS: [bytes(replies[n][r.KEYS][h.CHANNEL_KEY]) for n in self.nodes],
                         h.SECURE_KEYS: [bytes(replies[n][r.KEYS][h.MASK_KEY]) for n in self.nodes]}
        roster = secagg_plus.Roster(self.label(extra), threshold,
                                    dict(zip(self.nodes, roster_config[h.SECURE_CHANNEL_KEYS], strict=True)),
                                    dict(zip(self.nodes, roster_config[h.SECURE_KEYS], strict=True)))
        replies, failures = self.ask_all(self.shares_message, {**round_keys, **roster_config}, ArrayRecord(),
                                         with_base=False)
        self.lose(failures)
        participants = list(self.nodes)
        inboxes = secagg_plus.route_shares({n: dict(zip((int(p) for p in replies[n][r.KEYS][h.SHARE_PEERS]),
                                                        map(bytes, replies[n][r.KEYS][h.SHARE_CIPHERTEXTS]),
                                                        strict=True)) for n in participants})
        per_node = {n: {h.SHARE_PEERS: [p for p in inboxes.get(n, {}) if p in participants],
                        h.SHARE_CIPHERTEXTS: [c for p, c in inboxes.get(n, {}).items() if p in participants]}
                    for n in participants}
        return Release({**extra, **roster_config, h.SECURE_PARTICIPANTS: participants}, per_node, roster,
                       participants)

    def release_config(self, release: Release, node: int) -> ConfigRecord:
        """The config of ``node``'s masked request of ``release`` (for a caller that sends it itself): the base
        config, the release's keys and the node's own (recovering: the shares sent to it)."""
        config = self.request_config(True)
        config.update(self.peer_keys(node))
        config.update(release.extra)
        config.update(release.per_node.get(node, {}))
        return config

    def close_release(self, release: Release, replies: dict[int, RecordDict], failures: dict[int, str], name: str,
                      bits: np.ndarray | None = None, signed: np.ndarray | bool = False) -> np.ndarray:
        """The sum of ``release`` from its replies by node (``name`` in their arrays) and the nodes that failed
        it: pairwise, SecureProtocolError naming a failed node (its masks stay in the sum); off, the failed nodes
        are lost; recovering, round 3 (unmasking) over the nodes whose masked reply arrived."""
        if self.mode == "pairwise":
            for node, reason in failures.items():  # a missing site's masks would stay in the sum
                raise SecureProtocolError(node, reason)
        self.lose(failures)
        self.replies = replies
        if self.mode == "recovering":
            try:
                return self.unmasked(release, replies, name, bits, signed)
            except secagg_plus.SecAggError as err:
                raise self.unrecoverable(err) from None
        self.summed_nodes = list(self.nodes)
        parts = [replies[n][r.ARRAYS][name].numpy() for n in self.nodes]
        if bits is not None:
            parts = [wire_ints.unpack(part, bits) for part in parts]
            return wire_ints.decode(wire_ints.summed(parts, bits), bits, signed)
        if self.mode == "pairwise":
            return unmask_sum(parts)
        return np.sum(np.stack(parts), axis=0, dtype=np.int64)

    def unmasked(self, release: Release, replies: dict[int, RecordDict], name: str, bits: np.ndarray | None,
                 signed: np.ndarray | bool) -> np.ndarray:
        """Round 3: the shares that remove the self-masks of the sites that sent and the pairwise masks of those
        that did not; the sum over the senders (``shared.secagg_plus.unmask_sum``)."""
        masked = {n: replies[n][r.ARRAYS][name].numpy() for n in self.nodes}
        if bits is not None:
            masked = {n: wire_ints.unpack(part, bits) for n, part in masked.items()}
        dropped = [n for n in release.participants if n not in masked]
        answers_to = {**self.round_keys(release.extra), h.SECURE_SENT: sorted(masked), h.SECURE_DROPPED: dropped}
        replies, failures = self.ask_all(self.unmask_message, answers_to, ArrayRecord(), with_base=False)
        self.lose(failures)
        answers = {n: secagg_plus.UnmaskShares(
            seeds=dict(zip((int(j) for j in reply[r.KEYS][h.SEEDS_OF]), map(bytes, reply[r.KEYS][h.SEED_SHARES]),
                           strict=True)),
            mask_keys=dict(zip((int(j) for j in reply[r.KEYS][h.MASK_KEYS_OF]),
                               map(bytes, reply[r.KEYS][h.MASK_KEY_SHARES]), strict=True)))
            for n, reply in replies.items()}
        total = secagg_plus.unmask_sum(release.roster, masked, answers, 64 if bits is None else bits,
                                       release.participants)
        self.summed_nodes = sorted(masked)
        if bits is not None:
            return wire_ints.decode(total, bits, signed)
        return total.view(np.int64)

    def label(self, extra: dict) -> str:
        """The label of a release's recovering aggregation: the session and the release's sequence number."""
        return f"{self.base[h.SECURE_SESSION]}/{extra[h.SECURE_SEQUENCE]}"

    @staticmethod
    def round_keys(extra: dict) -> dict:
        """What the key, share and unmask rounds of a release carry besides the session id."""
        return {h.SECURE_SEQUENCE: extra[h.SECURE_SEQUENCE], h.SECURE_RECOVERING: True}

    def unrecoverable(self, err: Exception) -> SecureProtocolError:
        """The SecureProtocolError of a recovering sum that cannot be had, naming the first site lost."""
        node, reason = next(iter(self.lost.items()), (-1, "no site lost"))
        return SecureProtocolError(node, f"{reason}; the secure sum cannot be recovered: {err}")

    def summed_floats(self, message_type: messages.MessageName, extra: dict, arrays: ArrayRecord, name: str,
                      scale_bits: int = FIXED_POINT_BITS) -> np.ndarray:
        """The float64 sum of one released float vector, sent in fixed point at ``scale_bits``."""
        total = self.summed(message_type, {**extra, SECURE_SCALE: scale_bits}, arrays, name)
        return from_fixed(total, scale_bits)

    def open_floats(self, extra: dict, scale_bits: int = FIXED_POINT_BITS) -> Release:
        """:meth:`open_release` of a float vector the sites send in fixed point at ``scale_bits``
        (``client.secure_aggregation.masked_floats``)."""
        return self.open_release({**extra, SECURE_SCALE: scale_bits})

    def close_floats(self, release: Release, replies: dict[int, RecordDict], failures: dict[int, str],
                     name: str) -> np.ndarray:
        """The float64 sum of a release :meth:`open_floats` opened (:meth:`close_release`, then :func:`from_fixed`)."""
        return from_fixed(self.close_release(release, replies, failures, name), int(release.extra[SECURE_SCALE]))
