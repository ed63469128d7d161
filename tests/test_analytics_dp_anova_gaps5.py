"""Issue 19, fifth pass: a DP ANOVA group carries the noise of the sites that released it, not of every site.

A site releases count, sum and sum of squares for the groups it has (``client.analytics.group_moments``), so a
group given at one of four sites has half the noise sd of one given at all four. Seeded noise draws on fixed
data: the reported noise sds of the group means and of F against the draws' own spread."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from client.analytics import group_moments
from server.analytics_phase import SiteAnswer, anova_phase, group_noise_sds

BOUNDS = (0.0, 100.0)
GROUPS_AT = {"s1": ["A", "B"], "s2": ["B", "C"], "s3": ["C"], "s4": ["D"]}
"""Group A at one site, B at two, C at two, D at one: each group's noise is that of 1 or 2 sites of 4."""


class NoisySites:
    """A session of DP sites answering the ANOVA query on their frames with Gaussian noise of sd ``tau`` per
    unit of scale, as ``client.dp.gaussian_release`` adds it."""

    def __init__(self, frames: dict[str, pd.DataFrame], tau: float, rng: np.random.Generator):
        self.frames, self.tau, self.rng = frames, tau, rng

    def ask(self, message, config, arrays):
        out = []
        for site, frame in self.frames.items():
            release = group_moments(frame, config["response"], config["factor"], arrays["bounds"])
            noised = {name: np.asarray(b.values, dtype=np.float64)
                      + self.rng.standard_normal(np.shape(b.values)) * self.tau * np.asarray(b.scale)
                      for name, b in release.blocks.items()}
            out.append(SiteAnswer(site, noised, labels=release.labels,
                                  meta={"dp": True, "noise-sd": self.tau, "epsilon-planned": 1.0}))
        return out


@pytest.fixture(scope="module")
def frames() -> dict[str, pd.DataFrame]:
    """60 rows per (site, group); group means 40, 45, 50, 55 with sd 10."""
    rng = np.random.default_rng(5)
    means = {"A": 40.0, "B": 45.0, "C": 50.0, "D": 55.0}
    return {site: pd.DataFrame({"y": np.concatenate([rng.normal(means[g], 10.0, 60) for g in groups]),
                                "g": np.repeat(groups, 60)})
            for site, groups in GROUPS_AT.items()}


def test_each_group_gets_the_noise_of_the_sites_that_released_it():
    answers = [SiteAnswer(s, {}, labels={"groups": g}, meta={"dp": True, "noise-sd": 2.0})
               for s, g in GROUPS_AT.items()]
    answers.append(SiteAnswer("exact", {}, labels={"groups": ["A"]}, meta={"dp": False}))
    assert group_noise_sds(answers, ["A", "B", "C", "D"]) == pytest.approx(
        {"A": 2.0, "B": 2.0 * np.sqrt(2), "C": 2.0 * np.sqrt(2), "D": 2.0})
    summed = SiteAnswer("secure sum of 4 sites", {}, labels={"groups": ["A", "B", "C", "D"]},
                        meta={"dp": True, "noise-sd": 4.0, "members": list(GROUPS_AT)})
    assert group_noise_sds([summed], ["A", "D"]) == {"A": 4.0, "D": 4.0}


def test_group_mean_and_f_noise_sds_match_the_spread_of_seeded_draws(frames):
    plan = SimpleNamespace(anova=("y", "g"), bounds_array=lambda columns: np.array([BOUNDS]))
    rng = np.random.default_rng(11)
    runs = [anova_phase(NoisySites(frames, 0.6, rng), plan) for _ in range(150)]
    for group in GROUPS_AT["s1"] + GROUPS_AT["s2"] + GROUPS_AT["s4"]:
        est = np.array([r["groups"][group]["noise"]["mean"]["estimate"] for r in runs])
        reported = np.median([r["groups"][group]["noise"]["mean"]["noise_sd"] for r in runs])
        # before: every group had the noise of all 4 sites: 2.0 x (A), 1.9 x (D), 1.5 x (B, C) the draws' sd
        assert 0.85 < reported / est.std(ddof=1) < 1.15, group
    f = np.array([r["f"] for r in runs])
    reported_f = np.median([r["f_noise_sd"] for r in runs])
    assert 0.8 < reported_f / f.std(ddof=1) < 1.25  # before: 1.88; after: 1.00
