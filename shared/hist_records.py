"""Histogram-boosting state as Flower records: bin thresholds and trees as a few flat arrays.

What crosses the wire between the server (``server.hist_phase``) and the sites (``client.hist_handlers``)
besides the histograms themselves: the bin thresholds of every feature (once per run: a site keeps them),
and trees — a finished round's trees once (a site keeps the head's model), the growing trees' routing with
every level. Never a row of data. Conversion written once, here, for both sides (Flower's habit: one
currency, ``ArrayRecord``). Every array costs its ``.npy`` header (128 bytes) on top of its data, so a tree
list travels as one int32 array of routing and, when its leaves matter, one float64 array of leaf values.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from shared.hist_boosting import LEAF, Tree, pack_thresholds, unpack_thresholds

ROUTING_FIELDS = ("feature", "split_bin", "left", "right")
"""What a site needs of a tree to route its rows (a row goes left when its bin <= ``split_bin``)."""


def thresholds_record(thresholds: list[np.ndarray]) -> ArrayRecord:
    values, offsets = pack_thresholds(thresholds)
    return ArrayRecord({"thresholds": Array(values), "threshold-offsets": Array(offsets)})


def thresholds_from_record(record: ArrayRecord) -> list[np.ndarray]:
    return unpack_thresholds(record["thresholds"].numpy(), record["threshold-offsets"].numpy())


def has_thresholds(record: ArrayRecord) -> bool:
    return "thresholds" in record


def routing_array(trees: list[Tree]) -> np.ndarray:
    """Trees' routing as one int32 array: the number of trees, each tree's node count, then every node's
    (feature, split_bin, left, right), trees one after the other."""
    counts = [tree.n_nodes for tree in trees]
    nodes = [np.column_stack([np.asarray(getattr(tree, name), dtype=np.int32) for name in ROUTING_FIELDS])
             for tree in trees]
    body = np.concatenate(nodes).reshape(-1) if nodes else np.zeros(0, dtype=np.int32)
    return np.concatenate([np.array([len(trees), *counts], dtype=np.int32), body]).astype(np.int32)


def trees_from_routing(routing: np.ndarray, leaf_values: np.ndarray | None = None) -> list[Tree]:
    """The inverse of :func:`routing_array`, with the leaf values when given and each node's parent (fields a
    site does not need keep their defaults)."""
    routing = np.asarray(routing, dtype=np.int64)
    n_trees = int(routing[0])
    counts = routing[1:1 + n_trees]
    nodes = routing[1 + n_trees:].reshape(-1, len(ROUTING_FIELDS))
    if len(nodes) != counts.sum() or (leaf_values is not None and len(leaf_values) != len(nodes)):
        raise ValueError(f"trees_from_routing: {counts.sum()} nodes announced, {len(nodes)} routed, "
                         f"{'no' if leaf_values is None else len(leaf_values)} leaf values")
    trees, start = [], 0
    for n in counts.tolist():
        tree = Tree()
        for name in Tree.__dataclass_fields__:
            setattr(tree, name, [0] * n)
        for column, name in enumerate(ROUTING_FIELDS):
            setattr(tree, name, nodes[start:start + n, column].tolist())
        tree.parent = [LEAF] * n  # from the children, which the routing carries
        for node in range(n):
            if tree.left[node] != LEAF:
                tree.parent[tree.left[node]] = tree.parent[tree.right[node]] = node
        if leaf_values is not None:
            tree.leaf_value = np.asarray(leaf_values[start:start + n], dtype=np.float64).tolist()
        trees.append(tree)
        start += n
    return trees


def trees_record(trees: list[Tree], prefix: str, leaf_values: bool = True) -> ArrayRecord:
    """Trees as ``<prefix>`` (:func:`routing_array`) plus ``<prefix>.leaf-value`` (float64) when asked."""
    record = ArrayRecord({prefix: Array(routing_array(trees))})
    if leaf_values:
        values = [np.asarray(tree.leaf_value, dtype=np.float64) for tree in trees]
        record[f"{prefix}.leaf-value"] = Array(np.concatenate(values) if values else np.zeros(0))
    return record


def trees_from_record(record: ArrayRecord, prefix: str) -> list[Tree]:
    """The inverse of :func:`trees_record` (leaf values 0 when the record has none)."""
    values = record[f"{prefix}.leaf-value"].numpy() if f"{prefix}.leaf-value" in record else None
    return trees_from_routing(record[prefix].numpy(), values)


def has_trees(record: ArrayRecord, prefix: str) -> bool:
    return prefix in record


def merge(*records: ArrayRecord) -> ArrayRecord:
    """One ArrayRecord holding the arrays of all ``records``."""
    merged = ArrayRecord()
    for record in records:
        for key, array in record.items():
            merged[key] = array
    return merged
