"""``query.hist_*``: the request keys of federated histogram boosting (``server.hist_phase``).

Every request carries the boosting config (:class:`shared.protocol.boosting.BoostingRound`) plus the keys below,
except the encoder, which only the session's first request carries (a site keeps it, with the session id, in its
context state); arrays (bins, thresholds, trees, frontier) travel in the ``arrays`` record
(``shared.hist_records``): the thresholds with the session's first level request only, a finished round's trees
with the next round's first level request only. A level request grows the round of several heads at once
(:data:`HEADS`): each head's keys and arrays under :func:`head_key`. Histograms and counts are fixed-point int64
(``shared.hist_boosting``); when every site reported its training rows (no DP site), they travel as packed
residues of the widths the server announces (``shared.hist_wire``, ``shared.wire_ints``), counts as whole
numbers.
"""

from __future__ import annotations

# The secure-sum keys below are those of every summing phase's secure sum (``server.secure_aggregation``):
# histogram boosting's, the statistics' and the analytics'.
SECURE_SUM = "secure-sum"
"""True when the sites mask their summed releases (pairwise or recovering mode below)."""
SECURE_RECOVERING = "secure-recovering"
"""True with the recovering mode: every summed release runs the four rounds of ``shared.secagg_plus``; absent or
False with the pairwise mode: one ``query.hist_keys`` per session, masks of ``shared.secure_sum``."""
SECURE_SUM_MODES = ("off", "pairwise", "recovering")
"""How the phase sums the sites' counts and histograms: plain sums; pairwise masks (``shared.secure_sum``: one
key exchange per phase, one exchange per release, a site lost after the key exchange stops the head); or
Bonawitz et al.'s secure aggregation with dropout recovery (``shared.secagg_plus``: four exchanges per release,
lost sites recovered and the tree regrown on the survivors)."""
SECURE_SCALE = "secure-scale-bits"
"""Request key of a float release: the fixed-point scale s the site encodes it with (two lanes,
``client.secure_aggregation.to_fixed``)."""
SECURE_SITES = "secure-sites"
"""Request key: how many sites the release is summed over, so a site can check its entries cannot overflow."""
SECURE_SESSION = "secure-session"
SECURE_SEQUENCE = "secure-sequence"
SECURE_NODES = "secure-nodes"
SECURE_KEYS = "secure-keys"
"""The roster's mask public keys: recovering, in the order of SECURE_NODES; pairwise, in the order of
SECURE_PEERS (only the receiving site's mask peers, in every request)."""
SECURE_PEERS = "secure-peers"
"""Pairwise mode: the sites whose public keys follow in SECURE_KEYS, which must be exactly the receiving site's
mask peers in the session's graph over SECURE_NODES (``shared.secure_sum.mask_peers``)."""
PUBLIC_KEY = "public-key"
"""Pairwise mode, ``query.hist_keys`` reply: the site's X25519 public key for the session."""
# secure aggregation with dropout recovery (shared.secagg_plus): request and reply keys of its rounds
SECURE_THRESHOLD = "secure-threshold"
SECURE_CHANNEL_KEYS = "secure-channel-keys"
"""With SECURE_NODES and SECURE_KEYS (the mask keys): the roster of round 1."""
SECURE_PARTICIPANTS = "secure-participants"
"""Round 2: the sites whose shares reached the server (the site masks with exactly these)."""
SECURE_SENT, SECURE_DROPPED = "secure-sent", "secure-dropped"
"""Round 3: the sites whose masked input arrived, and the participants whose did not."""
CHANNEL_KEY, MASK_KEY = "channel-key", "mask-key"
SHARE_PEERS, SHARE_CIPHERTEXTS = "share-peers", "share-ciphertexts"
"""Round 1 reply: receivers and their ciphertexts; round 2 request: senders and theirs, for this site."""
SEEDS_OF, SEED_SHARES = "seeds-of", "seed-shares"
MASK_KEYS_OF, MASK_KEY_SHARES = "mask-keys-of", "mask-key-shares"


def secure_sum_mode(value: str | bool) -> str:
    """A secure-sum mode from :data:`SECURE_SUM_MODES`, or from a bool as older callers set it (True: pairwise,
    False: off); ``ValueError`` naming the setting otherwise."""
    if isinstance(value, bool):
        return "pairwise" if value else "off"
    if value not in SECURE_SUM_MODES:
        raise ValueError(f"secure-sum: expected one of {', '.join(SECURE_SUM_MODES)}; got {value!r}")
    return value
GRADIENT_BOUND = "gradient-bound"
"""With compact histograms: the |gradient| no row may exceed (the widths are proven from it; a site refuses
if one of its rows does)."""
GRADIENT_CLIP = "dp-gradient-clip"
"""Clip of squared-error gradients under DP (standardised target)."""
OBJECTIVE = "objective"
N_OUTPUTS = "n-outputs"
BASE_MARGIN = "base-margin"
HEAD = "head-key"
"""The model being grown (a site keeps one head's finished trees at a time)."""
SCALE_BITS = "scale-bits"
"""The fixed-point scale of the histograms (``TreeParams.scale_bits``): a row's g and h enter as
``round(v · 2^scale-bits)``."""
ROUND = "round"
"""The boosting round being grown: the site's kept model must hold exactly this many rounds."""
HEADS = "heads"
"""How many heads a level request grows together (one boosting round of each, level by level): every head's
config keys and arrays travel under its :func:`head_key`, the arrays shared by all (the thresholds) and the
session's keys without one; the reply is one summed release, every head's packed histograms one after the other
in the request's order. Under DP, head i's histograms are the phase's release ``dp-release-index + i`` (one
release per head and level, as many as growing the heads one at a time: the ε is the same), its facts under
:func:`privacy_key`."""
HEAD_PREFIX = "head-"


def head_key(index: int, key: str) -> str:
    """The name of a level request's config key or array ``key`` for its ``index``-th head (:data:`HEADS`)."""
    return f"{HEAD_PREFIX}{int(index)}/{key}"


def privacy_key(index: int) -> str:
    """The reply record of the DP facts of a level reply's ``index``-th head (``shared.protocol.privacy``)."""
    return f"privacy/{HEAD_PREFIX}{int(index)}"


# array names
LO, HI = "lo", "hi"
CELL_BOUNDS, CELL_OFFSETS = "cell-bounds", "cell-offsets"
FRONTIER = "frontier"
MODEL, GROWING = "model", "growing"
COUNTS = "counts"
HISTOGRAMS = "histograms"
RANGE_MIN, RANGE_MAX = "min", "max"
ROWS = "rows"
"""A site's training rows (sites without DP): bounds every sum, so entries travel in fewer bits."""
WIDTHS = "widths"
"""Bits of every requested node's feature's gradient and hessian entries (``shared.hist_wire``)."""
SENT = "sent-bins"
"""Which bins of every requested node the sites send (bits, little-endian; ``shared.hist_wire.sent_bins``)."""
COUNT_BITS = "count-bits"
"""Bits of every count entry (with ``rows``); counts are then whole numbers, not fixed point."""
