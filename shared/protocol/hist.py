"""``query.hist_*``: the request keys of federated histogram boosting (``server.hist_phase``).

Every request carries the boosting config (:class:`shared.protocol.boosting.BoostingRound`) plus the keys
below, except the encoder, which only the session's first request carries (a site keeps it, with the session
id, in its context state); arrays (bins, thresholds, trees, frontier) travel in the ``arrays`` record
(``shared.hist_records``): the thresholds with the session's first level request only, a finished round's
trees with the next round's first level request only. Histograms and counts are fixed-point int64
(``shared.hist_boosting``); when every site reported its training rows (no DP site), they travel as packed
residues of the widths the server announces (``shared.hist_wire``, ``shared.wire_ints``), counts as whole
numbers.
"""

from __future__ import annotations

SECURE_SUM = "secure-sum"
SECURE_SESSION = "secure-session"
SECURE_SEQUENCE = "secure-sequence"
SECURE_NODES = "secure-nodes"
SECURE_KEYS = "secure-keys"
PUBLIC_KEY = "public-key"
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
