"""Compact integer encodings for summed arrays: every entry as its residue modulo 2^w, packed in w bits.

The sites' arrays (counts, fixed-point histograms) are only ever summed, and the server knows, before it
asks, a range every SUM must lie in: ``[0, bound]`` for counts and hessians, ``[−bound, bound]`` for
gradients (``shared.hist_wire`` derives the bounds). Residues modulo 2^w add like the integers
(Σ (x_i mod 2^w) ≡ Σ x_i, mod 2^w), and an integer of a known range of fewer than 2^w values is fixed by its
residue, so when

    unsigned: 0 ≤ S ≤ bound < 2^w           (w = :func:`unsigned_bits`)
    signed:   −bound ≤ S ≤ bound < 2^(w−1)   (w = :func:`signed_bits`)

the server recovers S exactly from the sum of the w-bit residues (:func:`decode`), whatever the individual
sites' values were. Pairwise masks work modulo 2^w just as modulo 2^64 (``shared.secure_sum.mask`` with
``bits``): the low w bits of a uniform 64-bit word are uniform on [0, 2^w), so a masked residue is still a
one-time pad. A width of 0 sends nothing and decodes as 0 (for an entry whose range is {0}); 64 is the
uncompressed int64. Entries are packed little-endian, each in its own width, one after another
(:func:`pack`); the receiver knows the widths, so nothing else travels.
"""

from __future__ import annotations

import numpy as np

ALL_ONES = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def unsigned_bits(bound: int) -> int:
    """Bits for a sum known to lie in [0, bound]."""
    if bound < 0:
        raise ValueError(f"unsigned_bits: bound must be >= 0, got {bound}")
    return min(64, int(bound).bit_length())


def signed_bits(bound: int) -> int:
    """Bits for a sum known to lie in [−bound, bound] (two's complement)."""
    if bound < 0:
        raise ValueError(f"signed_bits: bound must be >= 0, got {bound}")
    return min(64, int(bound).bit_length() + 1) if bound else 0


def width_mask(bits: np.ndarray | int) -> np.ndarray:
    """2^bits − 1 per entry (uint64), for 0 <= bits <= 64."""
    bits = np.asarray(bits, dtype=np.int64)
    if np.any((bits < 0) | (bits > 64)):
        raise ValueError("width_mask: widths must be between 0 and 64 bits")
    shift = np.where(bits > 0, 64 - bits, 0).astype(np.uint64)
    return np.where(bits > 0, ALL_ONES >> shift, np.uint64(0)).astype(np.uint64)


def residues(values: np.ndarray, bits: np.ndarray | int) -> np.ndarray:
    """int64 values modulo 2^bits (two's complement), as uint64."""
    words = np.ascontiguousarray(values, dtype=np.int64).view(np.uint64)
    return words & width_mask(np.broadcast_to(bits, words.shape))


def summed(parts: list[np.ndarray], bits: np.ndarray | int) -> np.ndarray:
    """The sum of the sites' residues (or masked residues), modulo 2^bits: uint64."""
    total = np.zeros(np.shape(parts[0]), dtype=np.uint64)
    for part in parts:
        total += np.asarray(part, dtype=np.uint64)  # wraps modulo 2^64, a multiple of every 2^bits
    return total & width_mask(np.broadcast_to(bits, total.shape))


def decode(total: np.ndarray, bits: np.ndarray | int, signed: np.ndarray | bool) -> np.ndarray:
    """The integer sums (int64) from their residues modulo 2^bits: in [0, 2^bits) where not ``signed``, in
    [−2^(bits−1), 2^(bits−1)) where ``signed``."""
    total = np.asarray(total, dtype=np.uint64)
    bits = np.broadcast_to(np.asarray(bits, dtype=np.int64), total.shape)
    half = np.where(bits > 0, np.uint64(1) << np.maximum(bits - 1, 0).astype(np.uint64), np.uint64(0))
    half = np.where(np.broadcast_to(signed, total.shape), half, np.uint64(0)).astype(np.uint64)
    return ((total ^ half) - half).view(np.int64)


def pack(words: np.ndarray, bits: np.ndarray | int) -> np.ndarray:
    """The low ``bits`` of every word, concatenated little-endian: uint8, ⌈Σ bits / 8⌉ bytes."""
    words = np.ascontiguousarray(words, dtype="<u8")
    bits = np.broadcast_to(np.asarray(bits, dtype=np.int64), words.shape).reshape(-1)
    words = words.reshape(-1)
    planes = np.unpackbits(words.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    return np.packbits(planes[np.arange(64) < bits[:, None]], bitorder="little")


def unpack(packed: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """The inverse of :func:`pack`: uint64 words of the shape of ``bits``."""
    bits = np.asarray(bits, dtype=np.int64)
    flat = bits.reshape(-1)
    needed = int(flat.sum())
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if len(packed) != (needed + 7) // 8:
        raise ValueError(f"unpack: {len(packed)} bytes for {needed} bits")
    planes = np.zeros((len(flat), 64), dtype=np.uint8)
    planes[np.arange(64) < flat[:, None]] = np.unpackbits(packed, count=needed, bitorder="little")
    return np.packbits(planes, axis=1, bitorder="little").reshape(-1).view("<u8").astype(np.uint64).reshape(bits.shape)
