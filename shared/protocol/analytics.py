"""``query.analytics_*``: the request keys of federated analytics and the reply's records.

A request's ``config`` names columns and sizes, its ``arrays`` carry numbers (ranges, standardisation,
coefficients, centroids); a site replies the released arrays (``release``), public group labels
(``labels``) and its privacy facts (``meta``: ``dp`` and, under DP, ``noise-sd`` and ε spent).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from shared.protocol import records as r

QUERY_INDEX = "query-index"
"""This query's position in the run (0-based); a DP site counts its releases by it."""
PLANNED_QUERIES = "dp-queries"
"""How many queries the run plans: a DP site sets its noise for that many."""
MIN_CELL_COUNT = 5
"""Cells of the k-means plot's 2-D histogram with fewer rows at a site are sent as 0 (threshold rule of
statistical disclosure control: Hundepool et al. 2012, "Statistical Disclosure Control", Wiley, §5.2)."""


def request(config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> RecordDict:
    return RecordDict({r.CONFIG: ConfigRecord(dict(config)), r.ARRAYS: r.to_array_record(arrays)})


def request_parts(content: RecordDict) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A request's config (names, sizes, DP plan) and arrays (numbers)."""
    config = dict(content[r.CONFIG]) if r.CONFIG in content else {}
    arrays = r.from_array_record(content[r.ARRAYS]) if r.ARRAYS in content else {}
    return config, arrays


def reply(arrays: Mapping[str, np.ndarray], labels: Mapping[str, list[str]], meta: Mapping[str, Any],
          site: str) -> RecordDict:
    return RecordDict({r.RELEASE: r.to_array_record(arrays),
                       r.LABELS: ConfigRecord({k: list(v) for k, v in labels.items()}),
                       r.META: ConfigRecord({r.SITE_NAME: site, **meta})})


def reply_parts(content: RecordDict) -> tuple[dict[str, np.ndarray], dict[str, list[str]], dict[str, Any]]:
    """Released arrays, labels and meta of a site's reply."""
    return (r.from_array_record(content[r.RELEASE]),
            {k: [str(x) for x in v] for k, v in content[r.LABELS].items()}, dict(content[r.META]))


SECURE_VALUES = "secure-values"
"""A reply's arrays record under a secure sum: every released array, flattened in the order of its names, as one
masked fixed-point vector (``client.secure_aggregation``)."""
SECURE_LAYOUT = "secure-layout"
"""A reply's meta under a secure sum: the released arrays' names and shapes (JSON), in the vector's order."""


def layout_text(shapes: Mapping[str, list[int]]) -> str:
    """Names and shapes of a secure reply's arrays as JSON (names in the vector's order)."""
    return json.dumps([[name, list(shape)] for name, shape in shapes.items()])


def layout_of(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """Inverse of :func:`layout_text`."""
    return [(str(name), tuple(int(d) for d in shape)) for name, shape in json.loads(text)]
