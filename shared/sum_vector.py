"""Several named sums as the one float vector a secure sum adds (``server.secure_aggregation``), and back.

The model fits (the dose adjuster's fitted-Q iteration, ``server.adjustment_phase``; the structured dose–response
Newton steps, ``server.dose_response_phase``) release a few arrays of sums per request: a Gram or information
matrix, a gradient or moment vector, a log-likelihood, a count. A :class:`SumsLayout` fixes their order and
shapes, so every site lays its sums out alike and the server cuts the summed vector back into them. A symmetric
matrix travels as its upper triangle, row by row (``d (d + 1) / 2`` entries for ``d²``), and comes back mirrored:
the sum of symmetric matrices is symmetric, so nothing is lost but half the words.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

VALUES = "values"
"""Array name of a site's masked vector of sums in a model fit's reply."""


@dataclass(frozen=True)
class SumsLayout:
    """The named arrays of one release, in order, each with its shape; ``symmetric`` names square matrices sent as
    their upper triangle."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    symmetric: frozenset[str] = frozenset()

    @classmethod
    def of(cls, shapes: Mapping[str, tuple[int, ...]], symmetric: tuple[str, ...] = ()) -> SumsLayout:
        return cls(tuple((name, tuple(int(s) for s in shape)) for name, shape in shapes.items()), frozenset(symmetric))

    def width(self, name: str, shape: tuple[int, ...]) -> int:
        """Entries ``name`` takes in the vector."""
        if name in self.symmetric:
            return shape[0] * (shape[0] + 1) // 2
        return int(np.prod(shape)) if shape else 1

    @property
    def size(self) -> int:
        return sum(self.width(name, shape) for name, shape in self.shapes)

    def vector(self, sums: Mapping[str, np.ndarray | float]) -> np.ndarray:
        """``sums`` as one float64 vector; ValueError naming the array whose shape is not the layout's."""
        parts = []
        for name, shape in self.shapes:
            if name not in sums:
                expected = ", ".join(n for n, _ in self.shapes)
                raise ValueError(f"the sums have no {name!r}; the layout expects {expected}")
            value = np.asarray(sums[name], dtype=np.float64)
            if value.shape != shape and not (value.size == 1 and int(np.prod(shape)) == 1):
                raise ValueError(f"{name}: expected shape {shape}, got {value.shape}")
            value = value.reshape(shape)
            parts.append(value[np.triu_indices(shape[0])] if name in self.symmetric else value.ravel())
        return np.concatenate(parts) if parts else np.zeros(0)

    def sums(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """The named arrays of a (summed) vector; symmetric ones mirrored from their upper triangle."""
        vector = np.asarray(vector, dtype=np.float64).ravel()
        if vector.size != self.size:
            raise ValueError(f"a vector of {vector.size} sums for a layout of {self.size}")
        out, at = {}, 0
        for name, shape in self.shapes:
            width = self.width(name, shape)
            part = vector[at:at + width]
            at += width
            if name in self.symmetric:
                square = np.zeros(shape)
                square[np.triu_indices(shape[0])] = part
                out[name] = square + np.triu(square, 1).T
            else:
                out[name] = part.reshape(shape)
        return out
