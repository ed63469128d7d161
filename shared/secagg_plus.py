"""Secure summation that survives sites lost mid-round: pairwise masks, self-masks and Shamir-shared keys.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017, §4 (the
full protocol, honest-but-curious variant: rounds 0–4 without signatures); Bell et al., CCS 2020 ("SecAgg+")
replace the complete graph by a sparse one — not done here: every pair of sites shares a mask. It extends
the pairwise-mask core of ``shared.secure_sum`` (same X25519 + HKDF + ChaCha20 masks, same arithmetic
modulo 2^w of ``shared.wire_ints``) with what makes a dropout recoverable.

One aggregation (one ``label``, i.e. one release) among ``n`` sites with threshold ``t``:

0. *Advertise*: site ``i`` draws two X25519 key pairs, ``(c_i, C_i)`` for its share channel and
   ``(s_i, S_i)`` for its masks, and a 32-byte self-mask seed ``b_i``; it sends ``C_i, S_i``.
1. *Share*: the server relays every ``(C_j, S_j)`` (a :class:`Roster`). Site ``i`` splits ``s_i`` and
   ``b_i`` into ``t``-of-``n`` Shamir shares (pycryptodome's ``Shamir`` over GF(2^128): 16-byte secrets, so
   each 32-byte secret is two halves shared alike) and sends share ``j`` to site ``j`` encrypted with
   ChaCha20-Poly1305 (RFC 8439) under ``HKDF(X25519(c_i, C_j))``, the associated data binding label, sender
   and receiver; the server routes the ciphertexts and cannot read them.
2. *Masked input*: site ``i`` sends, modulo 2^w,
   ``y_i = x_i + PRG(b_i) + Σ_{j>i} PRG(s_ij) − Σ_{j<i} PRG(s_ij)``, ``s_ij`` the X25519 secret of
   ``s_i, S_j`` (``shared.secure_sum.mask``).
3. *Unmask*: the server names the sites whose ``y`` arrived (``U``) and those that did not (``D``). Each
   answering site returns its share of ``b_j`` for every ``j ∈ U`` and its share of ``s_j`` for every
   ``j ∈ D``, and refuses to give both kinds for one peer, or ``s`` of itself or of any site it knows sent
   (its own ``y``). With ``t`` answers the server rebuilds every ``b_j`` (``j ∈ U``) and removes the
   self-masks, rebuilds every ``s_j`` (``j ∈ D``) and removes the pairwise masks between ``j`` and ``U``:
   ``Σ_{i∈U} x_i`` remains.

Threat model. The server is honest-but-curious: it follows the protocol (relays keys faithfully, tells every
site the same sets ``U`` and ``D``; no PKI or signature here, so no defence against a man-in-the-middle
server) and tries to learn from what it sees. It learns the sum over the sites that sent, which sites dropped,
and message sizes; a single ``y_i`` is uniform on [0, 2^w) whatever ``x_i`` is. Up to ``t − 1`` colluding
sites learn nothing about an honest site's value beyond the sum: they hold fewer than ``t`` shares of any
secret. A server colluding with ``k < t`` sites holds ``k`` shares of every secret, so ``t − k`` honest
answers complete either kind; but every honest site gives, for any peer, a seed share or a key share, never
both, so for a site that sent only its seed is rebuilt and for a site that did not only its key: the server
still learns sums over the senders only (Bonawitz et al., §6). With ``k ≥ t`` colluders nothing is hidden. An
actively malicious server (lying about ``U`` to different sites) is out of scope; ``t > n/2`` is kept as
Bonawitz et al.'s active-security variant needs. A label is used for one aggregation only: a second masked
input under the same keys is refused (two releases under one mask would give away their difference).

Costs (per site, per round): two public keys up, ``n`` of each down, ``n − 1`` ciphertexts of 108 bytes up and
down (4 × 16 bytes of shares, two ids, nonce, tag), the masked array, and ``|U| + |D|`` 32-byte shares in the
unmask round; the server's unmasking is ``|U|`` PRG expansions plus ``|D| × |U|`` key agreements and
expansions.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from shared import secure_sum
from shared.protocol.errors import ShareableError
from shared.wire_ints import width_mask

CHANNEL_INFO = b"fednano secagg+ share channel v1"
SEED_BYTES = 32
HALF = 16
"""pycryptodome's Shamir shares 16-byte secrets (GF(2^128)): a 32-byte secret is shared as two halves."""
NONCE_BYTES = 12
PAYLOAD = struct.Struct("<QQ32s32s")
"""sender, receiver (Flower node ids: unsigned 64-bit), share of the mask private key, share of the self-mask
seed (each two 16-byte halves)."""
SELF_MASK_SUFFIX = "/self-mask"


class SecAggError(ShareableError):
    """A secure-aggregation step refused or impossible; the text names rules and counts, never a value."""


class ThresholdError(SecAggError):
    """A threshold that would not keep values hidden, or more sites lost than the threshold allows."""


class ShareRefused(SecAggError):
    """A site asked for shares it must not give (both kinds for one peer, or a mask key of a site that sent)."""


class TamperedShare(SecAggError):
    """A share ciphertext that does not authenticate (altered, or not from the sender the roster names)."""


def validate_threshold(threshold: int, n_sites: int) -> None:
    """``t`` must satisfy ``n/2 < t <= n`` (a majority: two disjoint groups cannot both reach ``t``) and
    ``t >= 2`` (one share alone must not open a secret)."""
    if n_sites < secure_sum.MIN_SITES:
        raise ThresholdError(f"secure aggregation needs at least {secure_sum.MIN_SITES} sites, got {n_sites}")
    if not (2 * threshold > n_sites and 2 <= threshold <= n_sites):
        raise ThresholdError(f"threshold {threshold} for {n_sites} sites: need n/2 < t <= n and t >= 2")


def default_threshold(n_sites: int) -> int:
    """The smallest valid threshold, ``⌊n/2⌋ + 1``: the most dropouts (``n − t``) it survives."""
    return max(2, n_sites // 2 + 1)


def private_key_from(random_bytes: bytes) -> bytes:
    """An X25519 private key (32 raw bytes) from 32 random bytes (clamped by X25519 itself, RFC 7748 §5)."""
    return raw_private_bytes(X25519PrivateKey.from_private_bytes(random_bytes))


def raw_private_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of an X25519 private key."""
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def split_secret(secret: bytes, threshold: int, n_shares: int) -> list[bytes]:
    """``n_shares`` shares (32 bytes each, share ``k`` for x = k + 1) of a 32-byte secret, any ``threshold``
    of which rebuild it: each 16-byte half shared by ``Shamir.split``."""
    if len(secret) != SEED_BYTES:
        raise SecAggError(f"split_secret: secrets are {SEED_BYTES} bytes, got {len(secret)}")
    halves = [Shamir.split(threshold, n_shares, secret[k:k + HALF], ssss=False) for k in (0, HALF)]
    return [lo[1] + hi[1] for lo, hi in zip(*halves, strict=True)]


def combine_secret(shares: dict[int, bytes]) -> bytes:
    """The 32-byte secret from shares by x coordinate (1-based), at least the threshold of them."""
    points = sorted(shares.items())
    return b"".join(Shamir.combine([(x, s[k:k + HALF]) for x, s in points], ssss=False) for k in (0, HALF))


def channel_cipher(private_key: bytes, peer_public_key: bytes) -> ChaCha20Poly1305:
    """The AEAD two sites share: ChaCha20-Poly1305 keyed by HKDF-SHA256 of their channel X25519 secret."""
    own = X25519PrivateKey.from_private_bytes(private_key)
    secret = own.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
    return ChaCha20Poly1305(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=CHANNEL_INFO).derive(secret))


def associated_data(label: str, sender: int, receiver: int) -> bytes:
    """What a share ciphertext is bound to: the aggregation's label, its sender and its receiver."""
    return f"{label}|{sender}|{receiver}".encode()


def self_mask(seed: bytes, label: str, n: int) -> np.ndarray:
    """PRG(b_i): ``n`` uint64 words from a self-mask seed (ChaCha20, as the pairwise masks)."""
    return secure_sum.mask_words(seed, label + SELF_MASK_SUFFIX, n)


@dataclass(frozen=True)
class Roster:
    """What the server relays after round 0: the sites (sorted ids), the threshold and every public key."""

    label: str
    threshold: int
    channel_keys: dict[int, bytes]
    mask_keys: dict[int, bytes]

    def __post_init__(self) -> None:
        if set(self.channel_keys) != set(self.mask_keys):
            raise SecAggError("roster: channel and mask keys name different sites")
        validate_threshold(self.threshold, len(self.channel_keys))

    @property
    def nodes(self) -> list[int]:
        return sorted(self.channel_keys)

    def x_of(self, node: int) -> int:
        """The Shamir x coordinate of a site's shares: its 1-based position in the sorted roster."""
        return self.nodes.index(node) + 1


@dataclass
class UnmaskShares:
    """A site's answer to round 3: shares of self-mask seeds (sites that sent) and mask keys (sites that did not)."""

    seeds: dict[int, bytes] = field(default_factory=dict)
    mask_keys: dict[int, bytes] = field(default_factory=dict)


class SecAggSite:
    """One site's side of one aggregation: its secrets, the shares it received, what it has revealed.

    Parameters
    ----------
    node_id : int        this site's id in the roster
    label : str          the aggregation's label (one release); masks and ciphertexts are bound to it
    entropy : callable, default os.urandom   n → n random bytes, for the two private keys and the seed (a
                         seeded source only in tests, so a statistical test of the masks cannot flake)
    """

    def __init__(self, node_id: int, label: str, entropy: Callable[[int], bytes] = os.urandom) -> None:
        self.node_id, self.label = int(node_id), label
        self._channel = private_key_from(entropy(32))
        self._mask_private = private_key_from(entropy(32))
        self._seed = entropy(SEED_BYTES)
        self.roster_: Roster | None = None
        self.received_: dict[int, tuple[bytes, bytes]] = {}  # sender → (share of s_sender, share of b_sender)
        self.sent_input_ = False
        self.participants_: list[int] = []
        self.answered_ = False

    def advertise(self) -> tuple[bytes, bytes]:
        """Round 0: the public channel key and the public mask key."""
        return secure_sum.public_key(self._channel), secure_sum.public_key(self._mask_private)

    def share(self, roster: Roster) -> dict[int, bytes]:
        """Round 1: encrypted shares of the mask key and the self-mask seed, by receiving peer."""
        if roster.label != self.label:
            raise SecAggError("roster: its label is not this aggregation's")
        if roster.channel_keys.get(self.node_id) != self.advertise()[0] or \
                roster.mask_keys.get(self.node_id) != self.advertise()[1]:
            raise SecAggError("roster: this site's own keys are missing or altered")
        if self.roster_ is not None:
            raise SecAggError("this aggregation's shares were already made")
        self.roster_ = roster
        n, t = len(roster.nodes), roster.threshold
        key_shares = split_secret(self._mask_private, t, n)
        seed_shares = split_secret(self._seed, t, n)
        out = {}
        for k, peer in enumerate(roster.nodes):
            if peer == self.node_id:
                self.received_[peer] = (key_shares[k], seed_shares[k])
                continue
            plain = PAYLOAD.pack(self.node_id, peer, key_shares[k], seed_shares[k])
            nonce = os.urandom(NONCE_BYTES)
            cipher = channel_cipher(self._channel, roster.channel_keys[peer])
            out[peer] = nonce + cipher.encrypt(nonce, plain, associated_data(self.label, self.node_id, peer))
        return out

    def receive(self, ciphertexts: dict[int, bytes]) -> None:
        """Round 2, first half: decrypt and keep the shares peers sent this site (TamperedShare if one fails)."""
        roster = self._need_roster()
        for sender, blob in ciphertexts.items():
            if sender not in roster.channel_keys or sender == self.node_id:
                raise SecAggError("a share ciphertext from a site outside the roster")
            cipher = channel_cipher(self._channel, roster.channel_keys[sender])
            try:
                plain = cipher.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                                       associated_data(self.label, sender, self.node_id))
            except InvalidTag:
                raise TamperedShare(f"the share ciphertext from site {sender} does not authenticate") from None
            got_sender, got_receiver, key_share, seed_share = PAYLOAD.unpack(plain)
            if (got_sender, got_receiver) != (sender, self.node_id):
                raise TamperedShare(f"the share ciphertext from site {sender} names other parties")
            self.received_[sender] = (key_share, seed_share)

    def masked_input(self, values: np.ndarray, bits: np.ndarray | int = 64,
                     participants: list[int] | None = None) -> np.ndarray:
        """Round 2: ``values`` (int64) self-masked and pairwise-masked modulo 2^bits, once per aggregation.

        ``participants`` are the sites whose shares reached the server in round 1 (Bonawitz et al.'s U2,
        default the whole roster): the pairwise masks are those with them, and this site must hold a share
        from each, or their masks could not be removed should they drop."""
        roster = self._need_roster()
        peers_ids = sorted(roster.nodes if participants is None else {int(p) for p in participants})
        if self.sent_input_:
            raise SecAggError("this aggregation's masked input was already sent: refusing to reuse its masks")
        if self.node_id not in peers_ids or not set(peers_ids) <= set(roster.nodes):
            raise SecAggError("the participants must include this site and lie within the roster")
        if not set(peers_ids) <= set(self.received_):
            raise SecAggError("this site holds no shares from some participants: their masks could not be removed")
        if len(peers_ids) < roster.threshold:
            raise ThresholdError(f"{len(peers_ids)} participants, fewer than the threshold {roster.threshold}")
        self.sent_input_ = True
        self.participants_ = peers_ids
        peers = {node: roster.mask_keys[node] for node in peers_ids}
        words = secure_sum.mask(values, self._mask_private, self.node_id, peers, self.label, 64)
        flat = words.reshape(-1) + self_mask(self._seed, self.label, words.size)
        bits_flat = np.broadcast_to(bits, np.shape(values)).reshape(-1)
        return (flat & width_mask(bits_flat)).reshape(np.shape(values))

    def unmask(self, sent: list[int], dropped: list[int]) -> UnmaskShares:
        """Round 3: shares of ``b_j`` for the sites that ``sent``, of ``s_j`` for those ``dropped``.

        Refuses (ShareRefused) a site named in both lists, a second request, a mask-key share of itself when it
        sent, and fewer senders than the threshold (the sum would expose too few sites' values)."""
        roster = self._need_roster()
        sent_set, dropped_set = set(sent), set(dropped)
        if sent_set & dropped_set:
            raise ShareRefused("a site is named both as sent and as dropped: refusing both kinds of share for it")
        if self.answered_:
            raise ShareRefused("this aggregation's unmask shares were already given")
        if self.sent_input_ and self.node_id in dropped_set:
            raise ShareRefused("this site sent its masked input but is named dropped: refusing its mask key")
        if self.sent_input_ and sent_set | dropped_set != set(self.participants_):
            raise ShareRefused("the sent and dropped sites are not the participants this site masked with")
        if not (sent_set | dropped_set) <= set(roster.nodes):
            raise SecAggError("the unmask request names sites outside the roster")
        if len(sent_set) < roster.threshold:
            raise ThresholdError(f"{len(sent_set)} sites sent, fewer than the threshold {roster.threshold}")
        missing = (sent_set | dropped_set) - set(self.received_)
        if missing:
            raise SecAggError(f"this site holds no shares from {len(missing)} of the named sites")
        self.answered_ = True
        return UnmaskShares(seeds={j: self.received_[j][1] for j in sorted(sent_set)},
                            mask_keys={j: self.received_[j][0] for j in sorted(dropped_set)})

    def to_state(self) -> dict[str, object]:
        """Everything this site keeps between the rounds, as flat values (bytes, ints, lists of them) for a
        Flower ConfigRecord in the node's context state; it never leaves the site."""
        roster = self.roster_
        return {"node": self.node_id, "label": self.label, "channel-private": self._channel,
                "mask-private": self._mask_private, "seed": self._seed,
                "threshold": roster.threshold if roster else 0, "nodes": roster.nodes if roster else [],
                "channel-keys": [roster.channel_keys[n] for n in roster.nodes] if roster else [],
                "mask-keys": [roster.mask_keys[n] for n in roster.nodes] if roster else [],
                "received-from": sorted(self.received_),
                "key-shares": [self.received_[n][0] for n in sorted(self.received_)],
                "seed-shares": [self.received_[n][1] for n in sorted(self.received_)],
                "sent-input": self.sent_input_, "participants": list(self.participants_),
                "answered": self.answered_}

    @classmethod
    def from_state(cls, state: dict) -> SecAggSite:
        """The site as :meth:`to_state` kept it."""
        site = cls(int(state["node"]), str(state["label"]), entropy=lambda n: bytes(n))
        site._channel, site._mask_private = bytes(state["channel-private"]), bytes(state["mask-private"])
        site._seed = bytes(state["seed"])
        if int(state["threshold"]):
            nodes = [int(n) for n in state["nodes"]]
            site.roster_ = Roster(site.label, int(state["threshold"]),
                                  dict(zip(nodes, map(bytes, state["channel-keys"]), strict=True)),
                                  dict(zip(nodes, map(bytes, state["mask-keys"]), strict=True)))
        site.received_ = {int(n): (bytes(k), bytes(b)) for n, k, b in
                          zip(state["received-from"], state["key-shares"], state["seed-shares"], strict=True)}
        site.sent_input_, site.answered_ = bool(state["sent-input"]), bool(state["answered"])
        site.participants_ = [int(n) for n in state["participants"]]
        return site

    def _need_roster(self) -> Roster:
        if self.roster_ is None:
            raise SecAggError("this aggregation has no roster yet (round 1 first)")
        return self.roster_


def route_shares(outboxes: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
    """The server's relay of round 1: ``{sender: {receiver: c}}`` → ``{receiver: {sender: c}}``."""
    inboxes: dict[int, dict[int, bytes]] = {}
    for sender, outbox in outboxes.items():
        for receiver, blob in outbox.items():
            inboxes.setdefault(receiver, {})[sender] = blob
    return inboxes


def unmask_sum(roster: Roster, masked: dict[int, np.ndarray], answers: dict[int, UnmaskShares],
               bits: np.ndarray | int = 64, participants: list[int] | None = None) -> np.ndarray:
    """The server's round 3: ``Σ_{i∈U} x_i`` modulo 2^bits (uint64 words; ``wire_ints.decode`` or a view as
    int64 for 64 bits), from the masked inputs that arrived (``U``) and at least ``t`` sites' unmask shares;
    ``participants`` as given to the sites in round 2 (default the roster): those without an input dropped.

    Raises ThresholdError when fewer than ``t`` sites sent or answered (more than ``n − t`` lost)."""
    t = roster.threshold
    sent = sorted(masked)
    dropped = [node for node in (roster.nodes if participants is None else participants) if node not in masked]
    if len(sent) < t:
        raise ThresholdError(f"{len(sent)} of {len(roster.nodes)} sites sent their masked input; the threshold "
                             f"{t} tolerates at most {len(roster.nodes) - t} lost")
    if len(answers) < t:
        raise ThresholdError(f"{len(answers)} sites answered the unmask round, fewer than the threshold {t}")
    answering = sorted(answers)[:t]  # any t shares rebuild a secret; more would only cost time
    first = np.asarray(masked[sent[0]], dtype=np.uint64)
    shape, n = first.shape, first.size
    total = np.zeros(n, dtype=np.uint64)
    for node in sent:
        total += np.asarray(masked[node], dtype=np.uint64).reshape(-1)
    for j in sent:
        seed = combine_secret({roster.x_of(a): answers[a].seeds[j] for a in answering})
        total -= self_mask(seed, roster.label, n)
    for j in dropped:
        key = combine_secret({roster.x_of(a): answers[a].mask_keys[j] for a in answering})
        if secure_sum.public_key(key) != roster.mask_keys[j]:
            raise SecAggError("a rebuilt mask key does not match its public key: an unmask share is wrong")
        own = X25519PrivateKey.from_private_bytes(key)
        for i in sent:  # y_i holds +m_ij when i < j, −m_ij when i > j (shared.secure_sum.mask)
            words = secure_sum.mask_words(secure_sum.pair_key(own, roster.mask_keys[i]), roster.label, n)
            total = total - words if i < j else total + words
    bits_flat = np.broadcast_to(bits, shape).reshape(-1)
    return (total & width_mask(bits_flat)).reshape(shape)
