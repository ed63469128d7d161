"""Record names and the keys every phase shares, and the array ↔ record conversions both sides use.

A message's content is a ``RecordDict`` of named records: numbers a strategy may aggregate in a
``MetricRecord``, names and settings in a ``ConfigRecord``, arrays in an ``ArrayRecord``. Keys are
hyphenated, as Flower's own (``num-examples``, ``server-round``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

# --- record names in a RecordDict ------------------------------------------------------------------------
CONFIG = "config"
"""The request's settings (ConfigRecord); Flower's strategies put their ``train_config`` here."""
ARRAYS = "arrays"
"""Model weights or released arrays (ArrayRecord); Flower's strategies put the global model here."""
METRICS = "metrics"
"""A reply's numbers (MetricRecord); Flower's strategies aggregate this record."""
PRIVACY = "privacy"
"""What a DP site says: its terms in the site check (``SitePrivacy``), a release's facts in a reply
(``ReleaseFacts``); ConfigRecords."""
STATUS = "status"
SUMMARY = "summary"
STATISTICS = "statistics"
NAMES = "names"
BOOSTERS = "boosters"
KEYS = "keys"
SUMS = "sums"
RELEASE = "release"
LABELS = "labels"
META = "meta"
BUNDLE = "bundle"
CATALOGUE = "catalogue"
PROPERTIES = "properties"
VERDICT = "verdict"
"""The release gate's figures on the receiving site's own logs, sent with the policy it installs."""

# --- keys of several phases --------------------------------------------------------------------------------
SPLIT_SEED = "split-seed"
"""Seed of the sites' train/val/test split: every phase splits identically (``shared.task.assign_split``)."""
SEED = "seed"
NUM_EXAMPLES = "num-examples"
"""Rows behind a reply; Flower's FedAvg weights by it."""
SERVER_ROUND = "server-round"
"""Set by Flower's strategies in every train and evaluate config."""
PROXIMAL_MU = "proximal-mu"
"""Set by Flower's FedProx in its train config."""
SITE_NAME = "site-name"


def to_array_record(arrays: Mapping[str, np.ndarray], dtype=np.float64) -> ArrayRecord:
    """Named numpy arrays as an ArrayRecord (contiguous, ``dtype``)."""
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v, dtype=dtype)) for k, v in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as named numpy arrays."""
    return {k: v.numpy() for k, v in record.items()}
