"""Central DP of the ANN (strategies.central_dp on Flower's server-side clipping wrappers): each site's whole update
is clipped, the equal-weight average over a fixed number of sites is noised with sd z·C/n, adaptive clipping moves
its bound towards the median norm, and the accountant's ε agrees with the Gaussian mechanism's exact curve and
Opacus's own accountant."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg
from scipy.optimize import brentq
from scipy.stats import norm

from server.central_accounting import central_dp_record, central_epsilon
from server.run_record import RunRecord
from server.settings import RunSettings
from shared.protocol.privacy import RunPlan
from strategies.adaptive_clipping import CLIP_LR, AdaptiveClipping
from strategies.central_dp import COUNT_SHARE, CentralDP, CentralDPParameters, combined_noise_multiplier
from strategies.choice import make_strategy

pytestmark = pytest.mark.usefixtures("task_identity")


def _reply(w: np.ndarray, n: int = 10, node: int = 0) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.asarray(w, dtype=np.float64))}),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0})})
    message = Message(content, dst_node_id=0, message_type="train")
    message.metadata.__dict__["_src_node_id"] = node
    return message


def _failed(node: int) -> Message:
    from flwr.app import Error

    message = Message(Error(code=0, reason="lost"), reply_to=_reply(np.zeros(1)))
    message.metadata.__dict__["_src_node_id"] = node
    return message


def _round(strategy: CentralDP, global_w: np.ndarray, locals_: list, server_round: int = 1,
           sizes: list[int] | None = None) -> np.ndarray:
    """One round through the strategy: configure (to fix the global arrays; no grid needed), then aggregate."""
    strategy.mean.strategy.configure_train = lambda *args: []
    strategy.configure_train(server_round, ArrayRecord({"w": Array(global_w)}), None, None)
    sizes = sizes or [10] * len(locals_)
    replies = [w if isinstance(w, Message) else _reply(w, n, node)
               for node, (w, n) in enumerate(zip(locals_, sizes, strict=True), start=1)]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays["w"].numpy()


def fixed(z: float, clip: float, n: int) -> CentralDP:
    return CentralDP(FedAvg(), CentralDPParameters("fixed", z, clip), n)


def test_without_noise_each_site_moves_the_average_by_at_most_clip_over_n_whatever_its_rows():
    global_w = np.array([1.0, 1.0])
    updates = [np.array([0.3, 0.4]), np.array([30.0, 40.0]), np.array([0.0, -3.0]), np.array([0.06, 0.08])]
    out = _round(fixed(0.0, 1.0, 4), global_w, [global_w + u for u in updates], sizes=[10, 1000, 50, 5])
    # clipped to norm ≤ 1: (0.3,0.4), (0.6,0.8), (0,−1), (0.06,0.08); equal weights whatever the rows, over n = 4
    np.testing.assert_allclose(out, global_w + np.array([0.96, 0.28]) / 4)
    for i in range(4):  # leave one site out: the average moves by at most C / n
        rest = [global_w + u for j, u in enumerate(updates) if j != i]
        without = _round(fixed(0.0, 1.0, 4), global_w, rest)
        assert np.linalg.norm(out - without) <= 1.0 / 4 + 1e-12


def test_a_lost_site_is_a_zero_update_in_the_fixed_denominator_mean():
    global_w = np.zeros(2)
    strategy = fixed(0.0, 10.0, 4)
    out = _round(strategy, global_w, [np.array([1.0, 0.0]), np.array([0.0, 2.0]), np.array([3.0, 0.0]), _failed(4)])
    np.testing.assert_allclose(out, [1.0, 0.5])  # (4, 2) / 4, not / 3: the noise is calibrated for n = 4
    assert strategy.history.rounds[1].updates == 3


def test_the_noise_on_the_average_has_sd_z_clip_over_n():
    dim, n, z, clip = 40_000, 5, 2.0, 0.5
    np.random.seed(3)  # Flower draws its noise from numpy's global generator
    strategy = fixed(z, clip, n)
    out = _round(strategy, np.zeros(dim), [np.zeros(dim)] * n)
    assert out.std() == pytest.approx(z * clip / n, rel=0.02)  # 0.2
    assert abs(out.mean()) < 4 * 0.2 / math.sqrt(dim)
    assert strategy.history.rounds[1].noise_sd == pytest.approx(0.2)
    assert strategy.history.rounds[1].noise_multiplier == z


def test_flowers_adaptive_clipping_shrinks_the_bound_when_every_update_is_clipped_and_ours_grows_it():
    """Why strategies.adaptive_clipping corrects Flower 1.42: its rule takes the clipped fraction where Andrew et
    al. take the unclipped one."""
    global_w = np.zeros(2)
    flower = DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), 0.0, 4, initial_clipping_norm=0.1)
    flower.current_arrays = ArrayRecord({"w": Array(global_w)})
    flower.aggregate_train(1, [_reply(np.array([10.0, 0.0])) for _ in range(4)])
    assert flower.clipping_norm == pytest.approx(0.1 * math.exp(-CLIP_LR * 0.5))  # 0.0905: away from the norms

    ours = CentralDP(FedAvg(), CentralDPParameters("adaptive", 0.0, 0.1), 4)
    bounds = []
    for r in range(1, 4):
        _round(ours, global_w, [np.array([10.0, 0.0])] * 4, server_round=r)
        bounds.append(ours.history.rounds[r].clip_norm)
    assert bounds == pytest.approx([0.1, 0.1 * math.exp(0.1), 0.1 * math.exp(0.2)])  # towards the norms (10)
    assert ours.history.rounds[3].unclipped_fraction == 0.0
    _round(ours, global_w, [np.array([1e-4, 0.0])] * 4, server_round=4)  # none clipped: the bound comes down
    assert ours.dp.clipping_norm == pytest.approx(0.1 * math.exp(0.3) * math.exp(-0.1))


def test_adaptive_clipping_finds_the_median_update_norm():
    norms = np.array([0.5, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0, 4.0])  # median 1.35
    strategy = CentralDP(FedAvg(), CentralDPParameters("adaptive", 0.0, 0.1), len(norms))
    for r in range(1, 80):
        _round(strategy, np.zeros(2), [np.array([v, 0.0]) for v in norms], server_round=r)
    assert 1.2 <= strategy.dp.clipping_norm <= 1.5


def test_adaptive_noise_uses_the_bound_the_round_clipped_to_and_the_two_releases_compose_to_z():
    dim, n, z, clip = 40_000, 10, 1.0, 2.0
    np.random.seed(4)
    strategy = CentralDP(FedAvg(), CentralDPParameters("adaptive", z, clip), n)
    dp = strategy.dp
    assert isinstance(dp, AdaptiveClipping)
    assert dp.noise_multiplier == pytest.approx(z / math.sqrt(1 - COUNT_SHARE))  # z_Δ: the count takes 10 %
    assert dp.clipped_count_stddev == pytest.approx(z / (2 * math.sqrt(COUNT_SHARE)))
    out = _round(strategy, np.zeros(dim), [np.zeros(dim)] * n)  # nothing clipped: the bound shrinks after
    assert dp.clipping_norm < clip
    assert out.std() == pytest.approx(dp.noise_multiplier * clip / n, rel=0.02)  # C_t = 2, not C_{t+1}
    assert strategy.history.rounds[1].noise_multiplier == pytest.approx(z)
    assert combined_noise_multiplier(1.0, 0.0) == 0.0


def _exact_gaussian_epsilon(z: float, rounds: int, delta: float) -> float:
    """ε of ``rounds`` Gaussian mechanisms of noise multiplier z at δ, from the exact curve of Balle & Wang 2018
    (Theorem 8): their composition is one Gaussian of multiplier z / sqrt(rounds)."""
    mu = math.sqrt(rounds) / z
    return brentq(lambda e: norm.cdf(mu / 2 - e / mu) - math.exp(e) * norm.cdf(-mu / 2 - e / mu) - delta, 0, 500)


@pytest.mark.parametrize(("z", "rounds"), [(1.0, 5), (2.0, 10), (5.0, 3)])
def test_epsilon_agrees_with_the_gaussian_mechanisms_exact_curve(z, rounds):
    delta = 1e-5
    exact = _exact_gaussian_epsilon(z, rounds, delta)
    prv = central_epsilon([z] * rounds, 1.0, delta, "prv")
    rdp = central_epsilon([z] * rounds, 1.0, delta, "rdp")
    assert prv == pytest.approx(exact, abs=0.05)
    assert exact <= rdp <= exact * 1.15  # RDP is an upper bound, a little loose
    classic = min(rounds * a / (2 * z * z) + math.log(1 / delta) / (a - 1) for a in np.linspace(1.01, 200, 20000))
    assert rdp <= classic  # Opacus converts RDP more tightly than Mironov's ε = ρ + log(1/δ)/(α − 1)


def test_epsilon_grows_with_rounds_and_noise_and_sampling_buy_it_back():
    eps = [central_epsilon([1.0] * r, 1.0, 1e-5) for r in (1, 2, 5, 10, 20)]
    assert all(a < b for a, b in zip(eps, eps[1:], strict=False))
    assert central_epsilon([2.0] * 10, 1.0, 1e-5) < eps[3]
    assert central_epsilon([1.0] * 10, 0.3, 1e-5) < eps[3]
    assert central_epsilon([0.0, 1.0], 1.0, 1e-5) == math.inf and central_epsilon([], 1.0, 1e-5) == 0.0


def test_epsilon_is_opacus_rdp_accountants_for_the_same_history():
    from opacus.accountants import RDPAccountant

    history = [1.1, 1.1, 0.9, 1.3]  # per-round multipliers, as adaptive rounds may differ
    accountant = RDPAccountant()
    for z in history:
        accountant.step(noise_multiplier=z, sample_rate=0.25)
    assert central_epsilon(history, 0.25, 1e-6) == pytest.approx(accountant.get_epsilon(1e-6))


def test_the_record_holds_each_rounds_bound_noise_and_epsilon_and_reads_back():
    np.random.seed(0)
    strategy = CentralDP(FedAvg(), CentralDPParameters("adaptive", 1.5, 1.0), 4)
    for r in (1, 2, 3):
        _round(strategy, np.zeros(3), [np.full(3, v) for v in (0.1, 0.5, 1.0, 3.0)], server_round=r)
    plan = RunPlan(("statistics", "training", "evaluation", "importance"))
    central = central_dp_record(strategy, 1e-5, "rdp", plan, ["clinic_02"])
    assert central.rounds == 3 and central.denominator == 4 and central.sample_rate == 1.0
    assert central.epsilon == pytest.approx(central_epsilon([1.5] * 3, 1.0, 1e-5))
    assert [central.per_round[str(r)]["epsilon"] for r in (1, 2, 3)] == pytest.approx(
        [central_epsilon([1.5] * r, 1.0, 1e-5) for r in (1, 2, 3)])
    assert central.per_round["1"]["clip_norm"] == 1.0 and central.per_round["2"]["clip_norm"] != 1.0
    assert central.not_covered == ["statistics", "evaluation", "importance"]
    assert central.local_dp_sites == ["clinic_02"] and central.count_noise_sd > 0
    record = RunRecord(run_id="r", settings={}, central_dp=central)
    assert RunRecord.from_dict(record.to_dict()).central_dp == central
    assert RunRecord.from_dict(RunRecord(run_id="r", settings={}).to_dict()).central_dp is None


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi", "krum", "fedmedian", "fedtrimmedavg"])
def test_central_dp_refuses_a_strategy_whose_aggregate_is_not_a_mean(strategy):
    with pytest.raises(ValueError, match=f"runs with fedavg or fedprox, not {strategy}"):
        make_strategy(strategy, n_sites=10, central=CentralDPParameters("fixed", 1.0, 1.0))
    with pytest.raises(ValueError, match="central DP noises a mean"):
        RunSettings(central_dp="fixed", strategy=strategy)


def test_central_dp_settings_are_checked_and_reach_the_strategy():
    with pytest.raises(ValueError, match="drop --clip-norm"):
        RunSettings(central_dp="adaptive", clip_median_factor=1.5)
    with pytest.raises(ValueError, match="central-dp: expected one of fixed, adaptive"):
        RunSettings(central_dp="gaussian")
    with pytest.raises(ValueError, match="central-clip"):
        RunSettings(central_dp="fixed", central_clip=0.0)
    with pytest.raises(ValueError, match="central-accountant"):
        RunSettings(central_accountant="moments")
    settings = RunSettings.from_run_config({"central-dp": "fixed", "central-noise-multiplier": "0.7",
                                            "central-clip": "2", "strategy": "fedprox"})
    wrapped = make_strategy(settings.strategy, 6, central=settings.central_dp_parameters())
    assert isinstance(wrapped, CentralDP) and type(wrapped.mean.strategy).__name__ == "FedProx"
    assert (wrapped.dp.noise_multiplier, wrapped.dp.clipping_norm, wrapped.dp.num_sampled_clients) == (0.7, 2.0, 6)
    assert RunSettings().central_dp_parameters() is None


def test_the_cli_refuses_central_options_without_central_dp_and_a_non_mean_strategy():
    from typer.testing import CliRunner

    from fednano.cli import app

    result = CliRunner().invoke(app, ["simulate", "--central-clip", "2", "--out", "unused"])
    assert result.exit_code == 2 and "--central-clip without --central-dp" in result.output
    result = CliRunner().invoke(app, ["simulate", "--central-dp", "fixed", "--strategy", "krum", "--out", "unused"])
    assert result.exit_code == 2 and "not krum" in result.output


def test_a_round_without_any_update_still_releases_a_noised_model():
    """Else the released model would show, exactly, that no site answered."""
    np.random.seed(5)
    strategy = fixed(1.0, 1.0, 3)
    out = _round(strategy, np.zeros(5000), [_failed(1), _failed(2), np.zeros(5000)])
    assert out.std() == pytest.approx(1.0 / 3, rel=0.05)
    assert strategy.history.rounds[1].updates == 0


@pytest.mark.parametrize(("flags", "local_dp"), [([], False), (["--dp"], True), (["--no-dp"], False)])
def test_central_dp_runs_the_simulated_sites_without_dp_sgd_unless_dp_is_asked_for_too(flags, local_dp, monkeypatch,
                                                                                         tmp_path):
    from typer.testing import CliRunner

    import simulation.experiment
    from fednano.cli import app

    seen = {}

    def capture(cfg, **kwargs):
        seen["cfg"] = cfg
        raise simulation.experiment.ExperimentError("captured")

    monkeypatch.setattr(simulation.experiment, "run_experiment", capture)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    result = CliRunner().invoke(app, ["simulate", "--central-dp", "adaptive", "--central-noise-multiplier", "0.8",
                                      "--central-clip", "0.5", "--central-accountant", "prv", *flags,
                                      "--out", str(tmp_path / "out")])
    assert "captured" in result.output, result.output
    cfg = seen["cfg"]
    assert cfg.dp is local_dp
    settings = cfg.run_settings(n_sites=3, signing_key=None)
    assert settings.central_dp_parameters() == CentralDPParameters("adaptive", 0.8, 0.5)
    assert settings.central_accountant == "prv" and settings.central_delta == 1e-5
    CliRunner().invoke(app, ["simulate", "--out", str(tmp_path / "out")])
    assert seen["cfg"].dp is True and seen["cfg"].central_dp == ""  # without central DP: DP-SGD, as before


def test_the_report_states_central_epsilon_its_unit_and_what_it_leaves_out():
    from dataclasses import asdict

    from simulation.report import central_dp_lines

    np.random.seed(1)
    strategy = fixed(1.0, 1.0, 2)
    _round(strategy, np.zeros(2), [np.array([0.1, 0.0]), np.array([0.0, 0.2])])
    central = asdict(central_dp_record(strategy, 1e-5, "rdp", RunPlan(("statistics", "training", "evaluation")),
                                       ["clinic_01"]))
    text = "\n".join(central_dp_lines(central))
    assert f"ε = {central['epsilon']:.2f}, δ = 1e-05" in text and "one site's whole contribution" in text
    assert "Not covered: statistics, evaluation" in text and "own DP-SGD" in text and "clinic_01" in text
    assert "| 1 | 2 | 1 | 0.5 | 1 |" in text
    assert central_dp_lines(None) == []
