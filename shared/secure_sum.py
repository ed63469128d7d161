"""Secure summation by pairwise masking: the server learns the sum of the sites' arrays and nothing else.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017, §4
(the pairwise-mask core, without its dropout recovery). Each site ``i`` draws an X25519 key pair for the run
and sends its public key; the server relays every public key to every site. Sites ``i`` and ``j`` then share
the secret ``s_ij = X25519(sk_i, pk_j) = X25519(sk_j, pk_i)`` (RFC 7748), which the server does not know.
For each release (a ``label`` the server numbers), the pair expands ``HKDF-SHA256(s_ij)`` into a ChaCha20
key stream (RFC 8439) of 64-bit words ``m_ij``. Values are fixed-point integers (``shared.hist_boosting``),
so arithmetic is exact modulo 2^64; site ``i`` sends::

    y_i = x_i + Σ_{j > i} m_ij − Σ_{j < i} m_ij    (mod 2^64)

and ``Σ_i y_i = Σ_i x_i (mod 2^64)``: every mask appears once with + and once with −. Seen alone, ``y_i`` is
``x_i`` plus a pseudo-random word: uniform on [0, 2^64) whatever ``x_i`` is (one-time pad), as long as
another honest site takes part. Order ``i < j`` is the order of the sites' node ids.

Whom a site masks with. Up to ``PAIRWISE_DEGREE + 1`` sites, every pair shares a mask (the complete graph
above). In a larger session each site masks with its ``PAIRWISE_DEGREE`` nearest sites on a ring of the session's
sites, ordered by SHA-256 of the session and node id: the Harary graph H_{k,n} that Bell et al. ("Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020) put in place of the complete graph, and
that Flower's SecAgg+ builds (``num_shares`` neighbours on a shuffled ring). Every mask still appears once with +
and once with −, so the sum is exact; the graph is k-connected, so the server alone learns only the total, and a
site's value is exposed only if all k of its neighbours collude with the server (:func:`mask_peers`). The cost
per site and release is k key agreements and k key streams instead of n − 1: at 1,000 clinics the statistics
phase's masking went from 999 pair keys per site (82 µs each) to 26.

Limits. Every site of the key exchange must answer each release: a missing reply leaves its masks in the
sum, and the server must give up that sum. ``shared.secagg_plus`` adds Bonawitz et al.'s recovery
(self-masks and Shamir-shared keys) on top of these masks, at four exchanges per release; every summing phase
(``server.secure_aggregation``: histograms, statistics, analytics, and the ANN rounds through
``strategies.pairwise_masked_mean``) uses these masks by default (``secure-sum = "pairwise"``) and that protocol
when asked (``"recovering"``), floats in the session's two-lane fixed point. The
server is trusted to relay keys faithfully (honest-but-curious, no man-in-the-middle), and a site refuses a
label it has already masked, since two releases under one mask would give away their difference.
"""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from shared.protocol.errors import ShareableError
from shared.wire_ints import width_mask

HKDF_INFO = b"fednano secure sum v1"
MIN_SITES = 2
"""With one site the sum is that site's value: there is nothing to hide it among."""


PAIRWISE_DEGREE = 26
"""Sites each site masks with in a session of more than ``PAIRWISE_DEGREE + 1`` sites (even: ±13 on the ring).
Chosen so that, with up to a third of the sites colluding with the server, all of a site's neighbours are
colluders with probability about (1/3)^26 < 2^-41 (Bell et al. 2020 choose k = O(log n) for the same event);
federations of up to 27 sites keep the complete graph."""


def mask_peers(nodes: list[int], own_id: int, session: str, degree: int = PAIRWISE_DEGREE) -> list[int]:
    """The sites ``own_id`` shares masks with in ``session`` (module docstring): every other site of ``nodes``
    when there are at most ``degree + 1``, else the ``degree // 2`` sites on either side of ``own_id`` on the
    ring of ``nodes`` ordered by SHA-256 of ``session`` and node id. Symmetric (``j`` is ``i``'s peer exactly when
    ``i`` is ``j``'s), and the same at every site and at the server, from public values only."""
    ordered = _ring(nodes, session, degree)
    if own_id not in ordered:
        raise SecureSumError(f"node {own_id} is not in this session's exchange")
    return _peers_on(ordered, ordered.index(own_id), degree)


def mask_graph(nodes: list[int], session: str, degree: int = PAIRWISE_DEGREE) -> dict[int, list[int]]:
    """Every site's :func:`mask_peers` in ``session``, from one ordering of the ring (the coordinator's view: at
    1,000 sites, ordering the ring once per site took 0.67 s a session)."""
    ordered = _ring(nodes, session, degree)
    return {node: _peers_on(ordered, at, degree) for at, node in enumerate(ordered)}


def _ring(nodes: list[int], session: str, degree: int) -> list[int]:
    """``nodes`` (each once) in the session's ring order: by SHA-256 of the session and the node id."""
    if degree < 2 or degree % 2:
        raise ValueError(f"the mask graph's degree must be even and at least 2; got {degree}")
    return sorted(set(int(n) for n in nodes), key=lambda n: hashlib.sha256(f"{session}/{n}".encode()).digest())


def _peers_on(ordered: list[int], at: int, degree: int) -> list[int]:
    """The peers of the site at position ``at`` of the ring ``ordered`` (:func:`mask_peers`)."""
    if len(ordered) <= degree + 1:
        return sorted(n for i, n in enumerate(ordered) if i != at)
    half = degree // 2
    return sorted(ordered[(at + step) % len(ordered)] for step in range(-half, half + 1) if step)


class SecureSumError(ShareableError):
    """A masking request that would not keep the site's value hidden, or a sum that cannot be unmasked."""


class SecureProtocolError(RuntimeError):
    """The server's side: a site did not answer a summed request, or the secure sum cannot be recovered (no sum
    to give). Raised by ``server.secure_aggregation.SecureSession``; here so that the strategies, which may not
    import the server, can catch it (``strategies.pairwise_masked_mean``)."""

    def __init__(self, node: int, reason: str) -> None:
        super().__init__(f"node {node}: {reason}")
        self.node, self.reason = node, reason


def new_private_key() -> bytes:
    """A fresh X25519 private key (32 raw bytes); it never leaves the site."""
    return X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_key(private_key: bytes) -> bytes:
    """The public key (32 raw bytes) of a private key, to send to the server."""
    key = X25519PrivateKey.from_private_bytes(private_key)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def pair_key(private_key: bytes | X25519PrivateKey, peer_public_key: bytes) -> bytes:
    """The 32-byte mask key two sites share: HKDF-SHA256 of their X25519 shared secret. ``private_key`` may be
    the key already parsed: a site masking against 999 peers parsed its own key 999 times, 37 of the 82 µs a
    pair took (2026-12-04)."""
    own = (private_key if isinstance(private_key, X25519PrivateKey)
           else X25519PrivateKey.from_private_bytes(private_key))
    secret = own.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO).derive(secret)


def mask_words(key: bytes, label: str, n: int) -> np.ndarray:
    """``n`` pseudo-random uint64 words from a pair key and a release label (ChaCha20 key stream)."""
    nonce = hashlib.sha256(label.encode()).digest()[:16]
    stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(8 * n))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def mask(values: np.ndarray, private_key: bytes, own_id: int, peers: dict[int, bytes], label: str,
         bits: np.ndarray | int = 64) -> np.ndarray:
    """``values`` (int64 fixed point) masked for the sum over ``own_id`` and ``peers`` (id → public key).

    Returns uint64 words of the same shape; only the sum over all sites of the exchange unmasks them. With
    ``bits`` (per entry, or one for all) below 64, every word is reduced modulo 2^bits: the masks cancel
    modulo 2^bits as they do modulo 2^64, and the low bits of a uniform word are uniform
    (``shared.wire_ints`` packs and decodes such residues).
    """
    others = {i: key for i, key in peers.items() if i != own_id}
    if len(others) + 1 < MIN_SITES:
        raise SecureSumError(f"secure sum needs at least {MIN_SITES} sites, this exchange has {len(others) + 1}")
    flat = np.ascontiguousarray(values, dtype=np.int64).reshape(-1).view(np.uint64).copy()
    own = X25519PrivateKey.from_private_bytes(private_key)
    for peer, peer_key in sorted(others.items()):
        words = mask_words(pair_key(own, peer_key), label, flat.size)
        if own_id < peer:
            flat += words
        else:
            flat -= words
    return (flat & width_mask(np.broadcast_to(bits, np.shape(values)).reshape(-1))).reshape(np.shape(values))


def unmask_sum(masked: list[np.ndarray]) -> np.ndarray:
    """The int64 sum of all sites' masked arrays (each site of the exchange exactly once)."""
    if len(masked) < MIN_SITES:
        raise SecureSumError(f"secure sum needs the masked arrays of at least {MIN_SITES} sites, got {len(masked)}")
    total = np.zeros(np.shape(masked[0]), dtype=np.uint64)
    for words in masked:
        total += np.asarray(words, dtype=np.uint64)
    return total.view(np.int64)
