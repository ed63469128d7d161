"""The feasibility check of a site's release-gate value sums (``shared.value_bounds``): honest sums pass, with DP
noise too; sums no honest site could send are dropped from the gate and named."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import Message

from client.dp import Block, gaussian_release, sensitivity
from server.site_check import SiteCheck
from shared.off_policy import G_MAX, ValueSums, dr_terms
from shared.protocol.policy import value_reply
from shared.sum_bounds import Contributors, InfeasibleSum
from shared.value_bounds import check_value_sums, value_bounds
from simulation.attacks import Attack, inflate_value_sums


def honest_sums(rng: np.random.Generator, n: int) -> ValueSums:
    """A site's sums as ``client.ope.site_value_sums`` makes them: clipped Γ per cycle, and off the logs' support
    standard of care's Γ plus min(the models' lower bound, the plain difference), the lower bound anywhere."""
    weight = rng.uniform(0, 30, n)
    candidate = dr_terms(rng.uniform(-3.5, 1, n), rng.uniform(-3.5, 1, n), rng.uniform(-3.5, 1, n), weight, True)
    standard = dr_terms(rng.uniform(-3.5, 1, n), rng.uniform(-3.5, 1, n), rng.uniform(-3.5, 1, n), weight, True)
    supported = rng.random(n) < 0.7
    lower = rng.normal(0, 3, n)
    return ValueSums.of(np.where(supported, candidate, standard + np.minimum(lower, candidate - standard)), standard)


def noised(sums: ValueSums, noise_sd: float, rng) -> ValueSums:
    """``client.ope.private_value_sums``' Gaussian release at noise sd ``noise_sd`` per unit bound."""
    blocks = {k: Block(v, ValueSums.BOUNDS[k], 1) for k, v in sums.arrays().items()}
    values = gaussian_release(blocks, noise_sd / sensitivity(blocks), rng)
    return ValueSums(**{k: float(v[0]) for k, v in values.items()}, noise_sd=noise_sd)


def test_honest_sums_pass_exact_and_under_dp_noise():
    rng = np.random.default_rng(0)
    refused = 0
    for _ in range(300):
        n = int(rng.integers(0, 400))
        sums = honest_sums(rng, n)
        check_value_sums("release gate", sums, Contributors(1, float(n + rng.integers(0, 50))))
        for noise_sd in (1.0, 5.0, 20.0):
            try:
                check_value_sums("release gate", noised(sums, noise_sd, rng), Contributors(1, None, (noise_sd,)))
            except InfeasibleSum:
                refused += 1
    assert refused == 0


@pytest.mark.parametrize(("change", "entry"), [
    (lambda s: dataclasses.replace(s, n=s.n + 1000), "cycle count n"),
    (lambda s: dataclasses.replace(s, difference=s.difference + 0.5), "difference sum"),
    (lambda s: dataclasses.replace(s, difference=2 * G_MAX * s.n + 1, candidate=2 * G_MAX * s.n + 1 + s.standard),
     "candidate sum"),
    (lambda s: dataclasses.replace(s, difference_sq=s.difference ** 2 / s.n * 0.99), "sum of squared differences"),
])
def test_sums_no_honest_site_could_send_are_refused_naming_entry_and_bound(change, entry):
    sums = honest_sums(np.random.default_rng(1), 200)
    who = Contributors(1, 300.0)
    check_value_sums("release gate", sums, who)
    with pytest.raises(InfeasibleSum, match=f"release gate: the summed {entry} is infeasible: it must satisfy"):
        check_value_sums("release gate", change(sums), who)
    assert all(b.text for b in value_bounds(sums, who))


def test_the_largest_pull_towards_passing_is_capped_at_the_sites_share_of_2g_per_cycle():
    sums = honest_sums(np.random.default_rng(2), 100)
    top = dataclasses.replace(sums, candidate=G_MAX * 100, standard=-G_MAX * 100, difference=2 * G_MAX * 100,
                              difference_sq=(2 * G_MAX) ** 2 * 100)
    check_value_sums("release gate", top, Contributors(1, 100.0))  # the extreme is feasible: the cap, not a catch
    with pytest.raises(InfeasibleSum, match="standard-of-care sum|candidate sum"):
        check_value_sums("release gate", inflate_value_sums(top, 1.02), Contributors(1, 100.0))


class ValueGrid:
    """Every site answers ``query.policy_value`` with the sums it is given."""

    def __init__(self, sums: dict[int, ValueSums]):
        self.sums = sums

    def send_and_receive(self, sent):
        return [Message(value_reply(self.sums[m.metadata.dst_node_id]), reply_to=m) for m in sent]


def test_the_gate_drops_and_names_an_infeasible_site_and_judges_the_others(tmp_path, task_identity):
    from types import SimpleNamespace

    from server.policy_phase import value_at_sites
    from server.run_record import RunRecord

    rng = np.random.default_rng(3)
    sums = {1: honest_sums(rng, 120), 2: honest_sums(rng, 90), 3: honest_sums(rng, 100)}
    sums[3] = dataclasses.replace(sums[3], n=5000.0)  # more cycles than its 150 declared rows
    check = SiteCheck(usable={1: "alpha", 2: "beta", 3: "gamma"},
                      summaries={1: {"n_episodes": 150.0}, 2: {"n_episodes": 150.0}, 3: {"n_episodes": 150.0}})
    (tmp_path / "policy.json").write_text("{}")
    settings = SimpleNamespace(split_seed=0)
    result = value_at_sites(ValueGrid(sums), check, {"policy.json": tmp_path / "policy.json"}, settings,
                            RunRecord.__new__(RunRecord))
    assert result.n == 210.0 and set(result.per_site) == {"alpha", "beta", "gamma"}
    assert result.per_site["gamma"] == {"dropped": "dropped: release gate: the summed cycle count n is infeasible: "
                                                   "it must satisfy 0 ≤ n ≤ the site's declared row count (site "
                                                   "check) (refused: a site sent more than its declared rows and "
                                                   "the task's declared ranges allow)"}
    assert "5000" not in result.per_site["gamma"]["dropped"]


def test_the_attack_kind_parses():
    assert Attack.parse("clinic_03:inflate-gate") == Attack("clinic_03", "inflate-gate", 2.0)
