"""Fixed-point words of a site's weighted ANN weights, for the pairwise-masked sum of a training round.

FedAvg's mean (McMahan et al. 2017) is ``Σ n_i w_i / Σ n_i``: a sum of the sites' weighted weights over a sum of
their weights. Under pairwise masks (``shared.secure_sum``; Bonawitz et al., CCS 2017, §4) both sums must be
exact modulo 2^64, so a site sends integers: every entry of ``n_i · w_i`` and ``n_i`` itself (the last word),
each times 2^:data:`SCALE_BITS` and rounded to the nearest integer (int64). The server unmasks the two sums and
divides: the scale cancels, and the mean is the weighted mean of the weights as the sites hold them, up to
rounding.

Scale and bounds (all stated, nothing measured):

- Scale 2^-32 on ``n_i · w_i``: each word is off by at most half a unit, 2^-33 (or by 2^-53 of its value where
  that is larger: float64 has 53 bits). Over K sites the mean is off by at most
  ``K · 2^-33 · (1 + |mean|) / Σ n_i`` plus float64 rounding: below 1e-10 for 10 sites of 100 rows and weights
  below 10, far under the float32 resolution (6e-8 relative) the model keeps.
- No wrap: the unmasked sum is read as a signed int64, correct while ``|Σ_i q_i| < 2^63``. A site of a K-site
  roster therefore refuses to send a word above ``(2^63 − 1) / K`` in magnitude, i.e. ``n_i · |w| ≤ 2^31 / K``
  (:func:`largest_weighted_value`: 2.1e8 for 10 sites, 2.1e6 for 1,000): the sum of K such words cannot wrap.
  A non-finite weight, or a weight ``n_i`` not above zero, is refused too. The refusal names the bound and the
  roster size, never a weight.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from shared.protocol.errors import ShareableError

SCALE_BITS = 32
"""Fractional bits of every word: ``q = round(v · 2^32)``."""
INT64_MAX = 2 ** 63 - 1

Layout = list[tuple[str, tuple[int, ...], np.dtype]]
"""The arrays a vector of words stands for: name, shape and dtype, in sorted name order (both sides)."""


class FixedPointError(ShareableError):
    """Weights that cannot be sent as words of the masked sum without wrapping (no value in the text)."""


def layout_of(arrays: Mapping[str, np.ndarray]) -> Layout:
    """The layout of ``arrays``: names sorted, so the site and the server agree without sending it."""
    return [(name, tuple(np.shape(arrays[name])), np.asarray(arrays[name]).dtype) for name in sorted(arrays)]


def word_limit(n_sites: int) -> int:
    """The largest magnitude of one site's word in a ``n_sites`` roster: their sum cannot pass 2^63 − 1."""
    if n_sites < 1:
        raise ValueError(f"n_sites: expected at least 1; got {n_sites}")
    return INT64_MAX // n_sites


def largest_weighted_value(n_sites: int) -> float:
    """The largest ``n_i · |w|`` (and ``n_i``) a site of a ``n_sites`` roster may send: ``2^31 / n_sites``."""
    return word_limit(n_sites) / 2.0 ** SCALE_BITS


def encode(arrays: Mapping[str, np.ndarray], weight: float, layout: Layout, n_sites: int) -> np.ndarray:
    """int64 words of ``weight · arrays`` (in ``layout``'s order) and of ``weight`` last, at scale 2^-32.

    ``FixedPointError`` (naming the bound and ``n_sites``, no value) if the arrays do not match ``layout``, a
    value is not finite, ``weight`` is not above zero, or a word would pass :func:`word_limit`."""
    if set(arrays) != {name for name, _, _ in layout}:
        raise FixedPointError("the trained weights do not have the arrays of the model the round sent")
    for name, shape, _ in layout:
        if tuple(np.shape(arrays[name])) != shape:
            raise FixedPointError(f"array {name!r}: shape {tuple(np.shape(arrays[name]))}, the round sent {shape}")
    if not (np.isfinite(weight) and weight > 0):
        raise FixedPointError("the site's weight (num-examples) must be a finite number above zero to be masked")
    flat = np.concatenate([np.asarray(arrays[name], dtype=np.float64).reshape(-1) for name, _, _ in layout])
    if not np.all(np.isfinite(flat)):
        raise FixedPointError("a trained weight is not finite: it has no fixed-point word")
    scaled = np.append(flat * float(weight), float(weight)) * 2.0 ** SCALE_BITS
    limit = word_limit(n_sites)
    if np.max(np.abs(scaled)) >= float(limit):  # float(limit) rounds up to 2^63 / K: '>=' keeps rint below it
        bound = largest_weighted_value(n_sites)
        raise FixedPointError(f"num-examples × |weight| passes the fixed-point bound {bound:.4g} "
                              f"(2^{63 - SCALE_BITS} / {n_sites} sites, scale 2^-{SCALE_BITS}): its masked sum "
                              "could wrap; refusing to send it")
    return np.rint(scaled).astype(np.int64)


def decode(total: np.ndarray, layout: Layout) -> tuple[dict[str, np.ndarray], float]:
    """The weighted mean arrays (each in its layout dtype) and the summed weight from the unmasked int64 sum
    of every site's :func:`encode` words. ``ValueError`` if the length does not match or the weight is not
    positive (a sum that is not of these sites' words)."""
    total = np.asarray(total, dtype=np.int64)
    size = sum(int(np.prod(shape, dtype=np.int64)) for _, shape, _ in layout)
    if total.shape != (size + 1,):
        raise ValueError(f"masked sum: expected {size + 1} words (the model's {size} weights and the weight), "
                         f"got {total.shape}")
    weight = int(total[-1])
    if weight <= 0:
        raise ValueError("masked sum: the summed weight is not positive; the words are not the sites' encodings")
    mean = total[:-1].astype(np.float64) / float(weight)
    arrays, start = {}, 0
    for name, shape, dtype in layout:
        count = int(np.prod(shape, dtype=np.int64))
        arrays[name] = mean[start:start + count].reshape(shape).astype(dtype)
        start += count
    return arrays, weight / 2.0 ** SCALE_BITS
