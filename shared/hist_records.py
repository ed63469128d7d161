"""Histogram-boosting state as Flower records: bin thresholds and trees as a few flat arrays.

What crosses the wire between the server (``server.hist_phase``) and the sites (``client.hist_handlers``)
besides the histograms themselves: the bin thresholds of every feature, and the trees grown so far (node
arrays concatenated, with each tree's start offset). Never a row of data. Conversion written once, here,
for both sides (Flower's habit: one currency, ``ArrayRecord``).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from shared.hist_boosting import Tree, pack_thresholds, unpack_thresholds

TREE_FIELDS = {"feature": np.int32, "split_bin": np.int32, "left": np.int32, "right": np.int32,
               "leaf_value": np.float64}
"""What a site needs of a tree: routing rows (feature, bin, children) and adding leaf values."""


def thresholds_record(thresholds: list[np.ndarray]) -> ArrayRecord:
    values, offsets = pack_thresholds(thresholds)
    return ArrayRecord({"thresholds": Array(values), "threshold-offsets": Array(offsets)})


def thresholds_from_record(record: ArrayRecord) -> list[np.ndarray]:
    return unpack_thresholds(record["thresholds"].numpy(), record["threshold-offsets"].numpy())


def trees_record(trees: list[Tree], prefix: str) -> ArrayRecord:
    """Trees as ``<prefix>.<field>`` arrays plus ``<prefix>.offsets`` (each tree's first node, and the end)."""
    offsets = np.concatenate([[0], np.cumsum([tree.n_nodes for tree in trees])]).astype(np.int64)
    record = ArrayRecord({f"{prefix}.offsets": Array(offsets)})
    for name, dtype in TREE_FIELDS.items():
        values = np.concatenate([np.asarray(getattr(tree, name), dtype=dtype) for tree in trees]) if trees \
            else np.zeros(0, dtype=dtype)
        record[f"{prefix}.{name}"] = Array(values)
    return record


def trees_from_record(record: ArrayRecord, prefix: str) -> list[Tree]:
    """The inverse of :func:`trees_record` (fields a site does not need keep their defaults)."""
    offsets = record[f"{prefix}.offsets"].numpy()
    columns = {name: record[f"{prefix}.{name}"].numpy() for name in TREE_FIELDS}
    trees = []
    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        tree = Tree()
        n = int(end - start)
        for name in Tree.__dataclass_fields__:
            setattr(tree, name, [0] * n)
        for name, values in columns.items():
            setattr(tree, name, values[start:end].tolist())
        trees.append(tree)
    return trees


def merge(*records: ArrayRecord) -> ArrayRecord:
    """One ArrayRecord holding the arrays of all ``records``."""
    merged = ArrayRecord()
    for record in records:
        for key, array in record.items():
            merged[key] = array
    return merged
