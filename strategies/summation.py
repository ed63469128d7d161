"""Aggregation of metric records by summation, for metrics that are sums by construction.

Flower's default ``aggregate_metricrecords`` averages metrics weighted by ``num-examples``. Evaluation
summaries (``shared.metrics``: score histograms, confusion counts, error sums) must instead be *added* so
that the metrics of the union of the sites' test sets can be computed exactly.
"""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict

from shared.metrics import combine


def sum_metricrecords(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Element-wise sum of the MetricRecords in ``records`` (the weighting key is summed too)."""
    return MetricRecord(combine([dict(m) for record in records for m in record.metric_records.values()]))
