"""simulation.report at many sites: the per-site ROC figure shows the sites with the most test rows."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from shared import metrics
from simulation import report


def test_the_per_site_roc_shows_the_sites_with_the_most_test_rows_and_says_so(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    sites = [f"clinic_{i:03d}" for i in range(30)]

    def summary(n: int) -> dict:
        labels = rng.integers(0, 2, n)
        return metrics.summarise("binary", labels, np.clip(0.3 * labels + 0.7 * rng.random(n), 0, 1))

    summaries = {"ann": {"federated": {site: {"response": summary(10 + i)} for i, site in enumerate(sites)}}}
    drawn = {}
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, path, **_: drawn.update(figure=fig))
    report.roc_per_site({"sites": sites}, summaries, "response", tmp_path / "roc.png")
    figure = drawn["figure"]
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles == sites[-report.MAX_ROC_SITES:]  # the 24 with the most rows, in the sites' order
    assert "(the 24 of 30 sites with the most test rows)" in figure._suptitle.get_text()
