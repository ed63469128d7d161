"""Masked ANN rounds (strategies.pairwise_masked_mean over server.secure_aggregation's sessions, the sites'
client.training_handlers.masked_weights over client.secure_aggregation): the masked mean equals Flower's plain one
within the fixed-point rounding for FedAvg, FedProx, FedAdam and FedYogi, pairwise or recovering; one site's words
look uniform; a mask label is never used twice; a resumed round among other sites is refused; what needs each
site's update refuses masking; pairwise, a lost site fails its round naming it and the next one re-keys;
recovering, a site lost before or after sending its masked weights is recovered; and a Flower simulation ends on
the same model masked or not."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi
from scipy import stats

from client import secure_aggregation as sa
from client.training_handlers import ann_unmask, masked_weights
from server.secure_aggregation import FIXED_POINT_BITS, SecureSession, from_fixed
from server.settings import DEFAULTS, RunSettings
from server.training_phase import ann_sessions
from shared import secagg_plus
from shared import secure_sum as ss
from shared.protocol import hist as h
from shared.protocol import messages
from shared.protocol import training as t
from shared.protocol.errors import ShareableError
from strategies.choice import make_strategy
from strategies.pairwise_masked_mean import PairwiseMaskedMean, SecureAnnError
from tests.handler_grid import HandlerGrid

NODES = (11, 12, 13)
MODES = ("pairwise", "recovering")


def site_weights(seed):
    rng = np.random.default_rng(seed)
    return {"layer.weight": rng.normal(0, 0.5, (8, 5)).astype(np.float32),
            "layer.bias": rng.normal(0, 0.1, 8).astype(np.float32)}


def train_reply(msg, request):
    """The site's training reply: its weights (``request.weights``) as masked words, ``request.n`` examples."""
    trained = ArrayRecord({k: Array(v) for k, v in request.weights.items()})
    words = masked_weights(request, msg.content["arrays"], trained, request.n, int(request.config["server-round"]))
    return RecordDict({"arrays": words, "metrics": MetricRecord({"num-examples": request.n})})


class Sites(HandlerGrid):
    """Three sites answering the secure sum's rounds and ``train`` with their real handlers, in-process."""

    answers = {messages.TRAIN.type: train_reply, messages.ANN_UNMASK.type: ann_unmask}

    def __init__(self, nodes=NODES, weights=None, counts=None):
        super().__init__(nodes)
        self.rounds = {messages.ANN_KEYS.type: sa.keys, messages.ANN_SHARES.type: sa.shares}
        self.weights = weights or {n: site_weights(n) for n in nodes}
        self.counts = counts or dict.fromkeys(nodes, 50)

    def get_node_ids(self):
        return list(self.contexts)

    def request(self, node, msg, context):
        return SimpleNamespace(config=msg.content["config"], context=context, weights=self.weights[node],
                               n=self.counts[node])

    def round(self, strategy, server_round, arrays):
        """One Flower round: the strategy's training messages sent through this grid, the replies aggregated."""
        sent = list(strategy.configure_train(server_round, arrays, ConfigRecord(), self))
        return strategy.aggregate_train(server_round, list(self.send_and_receive(sent)))


def masked_mean(mode, nodes=NODES, names=None, wrapped=None):
    return PairwiseMaskedMean(wrapped or FedAvg(), ann_sessions(mode), nodes, names)


def to_node(sent, node):
    """The message of ``sent`` for ``node`` (Flower samples nodes in random order)."""
    return next(m for m in sent if m.metadata.dst_node_id == node)


def plain_reply(weights, n, node):
    message = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
                                  "metrics": MetricRecord({"num-examples": n})}), dst_node_id=0, message_type="train")
    message.metadata.__dict__["_src_node_id"] = node
    return message


def mean_of(sites, nodes):
    """The exact (float64) weighted mean of ``nodes``' weights."""
    total = sum(sites.counts[n] for n in nodes)
    return {k: sum(sites.counts[n] * sites.weights[n][k].astype(np.float64) for n in nodes) / total
            for k in sites.weights[nodes[0]]}


def assert_mean(got, want, tolerance=1e-7):
    for key, value in want.items():
        assert np.max(np.abs(got[key].numpy().astype(np.float64) - value)) <= tolerance, key


def global_arrays():
    return ArrayRecord({k: Array(v) for k, v in site_weights(0).items()})


STRATEGIES = {"fedavg": FedAvg, "fedprox": lambda: FedProx(proximal_mu=0.1),
              "fedadam": lambda: FedAdam(eta=0.05, eta_l=0.05), "fedyogi": lambda: FedYogi(eta=0.05, eta_l=0.05)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_masked_aggregate_equals_flowers_plain_aggregate_within_fixed_point_rounding(task_identity, name, mode):
    counts = {11: 120, 12: 37.6, 13: 301}  # a DP site weights itself by its noised (fractional) row count
    sites = Sites(counts=counts)
    arrays = global_arrays()
    masked, plain = masked_mean(mode, wrapped=STRATEGIES[name]()), STRATEGIES[name]()
    for server_round in (1, 2):  # FedAdam / FedYogi keep moments across rounds
        got, metrics = sites.round(masked, server_round, arrays)
        plain.configure_train(server_round, arrays, ConfigRecord(), sites)
        want, want_metrics = plain.aggregate_train(server_round, [plain_reply(sites.weights[n], counts[n], n)
                                                                  for n in NODES])
        for key in want:
            diff = np.max(np.abs(got[key].numpy().astype(np.float64) - want[key].numpy()))
            assert diff <= 1e-6, (key, diff)  # float32 rounding of Flower's own float32 sum dominates
            assert got[key].numpy().dtype == want[key].numpy().dtype
        assert dict(metrics) == dict(want_metrics)  # the sites' metrics, aggregated as Flower does
        arrays = got
    assert masked.key_exchanges == 1  # one session for the phase
    keys = sites.calls.count(messages.ANN_KEYS.type)
    assert keys == (1 if mode == "pairwise" else 2)  # pairwise: one key exchange; recovering: fresh keys a round
    assert sites.calls.count(messages.ANN_UNMASK.type) == (0 if mode == "pairwise" else 2)


def test_the_unmasked_mean_is_within_the_two_lane_fixed_point_bound_of_the_exact_one():
    """Each site's entry is off by at most 2^-41 (two lanes at 2^-40, ``client.secure_aggregation.to_fixed``), so
    Σ n_i w_i by at most K · 2^-41 and the mean by K · 2^-41 · (1 + |mean|) / Σ n_i plus float64 rounding."""
    counts = [120.0, 37.6, 301.0]
    config = ConfigRecord({h.SECURE_SCALE: FIXED_POINT_BITS, h.SECURE_SITES: 3})
    layout = t.layout_of(site_weights(0))
    words = [sa.to_fixed(t.weighted_vector(site_weights(s), n, layout), config)
             for s, n in zip((1, 2, 3), counts, strict=True)]
    mean, weight = t.weighted_mean(from_fixed(np.sum(words, axis=0)), layout)
    exact = {k: sum(n * site_weights(s)[k].astype(np.float64) for s, n in zip((1, 2, 3), counts, strict=True))
             / sum(counts) for k in mean}
    for key in mean:
        bound = 3 * 2.0 ** -(FIXED_POINT_BITS + 1) * (1 + np.abs(exact[key]).max()) / sum(counts)
        float32 = 2.0 ** -24 * np.abs(exact[key]).max()  # the layout keeps the model's float32
        assert np.max(np.abs(mean[key].astype(np.float64) - exact[key])) <= bound + float32
    assert weight == pytest.approx(sum(counts), abs=3 * 2.0 ** -40)
    layout64 = t.layout_of({"w": np.zeros(4)})
    values = {"w": np.array([0.1, -2.5, 1e-9, 3.0])}
    total = np.sum([sa.to_fixed(t.weighted_vector(values, n, layout64), config) for n in counts], axis=0)
    mean64, _ = t.weighted_mean(from_fixed(total), layout64)
    assert np.max(np.abs(mean64["w"] - values["w"])) <= 3 * 2.0 ** -41 * 4 / sum(counts) + 1e-15


@pytest.mark.parametrize("mode", MODES)
def test_one_sites_masked_words_are_indistinguishable_from_uniform(task_identity, mode):
    sites = Sites(weights=dict.fromkeys(NODES, {"w": np.full(3000, 0.25, dtype=np.float32)}), counts=dict.fromkeys(
        NODES, 100))  # every entry the same before masking
    arrays = ArrayRecord({"w": Array(np.zeros(3000, dtype=np.float32))})
    strategy = masked_mean(mode)
    sites.round(strategy, 1, arrays)
    words = next(reply["arrays"][t.MASKED].numpy() for kind, node, reply in sites.replies
                 if kind == messages.TRAIN.type and node == 11)
    assert words.dtype == np.uint64 and words.shape == (2 * 3001,)  # two lanes per entry, and the weight
    # fresh random keys every run: at 1e-4 the two checks flake once in 5,000 runs; the unmasked words fail by far
    assert stats.kstest(words.astype(np.float64) / 2.0 ** 64, "uniform").pvalue > 1e-4
    assert stats.chisquare(np.bincount((words >> np.uint64(56)).astype(int), minlength=256)).pvalue > 1e-4
    plain = sa.to_fixed(np.full(3001, 25.0), ConfigRecord({h.SECURE_SCALE: FIXED_POINT_BITS, h.SECURE_SITES: 3}))
    assert stats.kstest(plain.view(np.uint64).astype(np.float64) / 2.0 ** 64, "uniform").pvalue < 1e-6


def test_a_site_refuses_a_pairwise_mask_label_it_has_used_and_a_session_without_its_key(task_identity):
    sites = Sites()
    strategy = masked_mean("pairwise")
    sent = list(strategy.configure_train(3, global_arrays(), ConfigRecord(), sites))
    msg = to_node(sent, 11)
    assert not sites.answer(msg, 11, "train").has_error()
    again = sites.answer(msg, 11, "train")  # the same request again: the same label
    assert again.has_error() and "refusing to reuse a mask" in again.error.reason
    stranger = Message(RecordDict({"arrays": global_arrays(), "config": ConfigRecord(
        {**dict(msg.content["config"]), h.SECURE_SESSION: "another-session"})}), dst_node_id=11, message_type="train")
    refused = sites.answer(stranger, 11, "train")
    assert refused.has_error() and "no secure-sum key for this session" in refused.error.reason


def test_a_site_refuses_to_mask_a_recovering_release_twice(task_identity):
    sites = Sites()
    strategy = masked_mean("recovering")
    msg = to_node(strategy.configure_train(1, global_arrays(), ConfigRecord(), sites), 11)
    assert not sites.answer(msg, 11, "train").has_error()
    again = sites.answer(msg, 11, "train")
    assert again.has_error() and "refusing to reuse its masks" in again.error.reason


@pytest.mark.parametrize("mode", MODES)
def test_a_round_asked_again_among_other_sites_is_refused_so_two_sums_cannot_be_subtracted(task_identity, mode):
    """A resumed run asks its interrupted round again, under a new session: with the same sites the sum is the same;
    with one site fewer, the difference of the two sums would be that site's weights."""
    sites = Sites()
    first = masked_mean(mode)
    assert sites.round(first, 2, global_arrays())[0] is not None
    again = masked_mean(mode)  # the resumed coordinator: a new session, the same roster
    assert sites.round(again, 2, global_arrays())[0] is not None
    fewer = masked_mean(mode, (11, 12))
    sites.round(fewer, 2, global_arrays())
    refusals = [reply for kind, node, reply in sites.replies[-2:] if kind == "train"]
    assert refusals == [None, None] and "round 2" in fewer.failed_rounds[2]
    later = masked_mean(mode, (11, 12))
    got, _ = sites.round(later, 3, global_arrays())  # a round not masked before: any roster
    assert_mean(got, mean_of(sites, [11, 12]))


def test_recovering_a_resumed_round_whose_senders_differ_is_refused_at_the_unmask_round(task_identity):
    """Masked among the same three sites both times, but summed over two the first time (a site lost before sending)
    and over three the second: the two sums would give away the third site's weights. The sites that unmasked the
    first sum refuse the second; too few shares are left, so the round fails."""
    sites = Sites()
    sites.lost_at[13] = (messages.TRAIN.type, 1, False)
    first = masked_mean("recovering")
    got, _ = sites.round(first, 2, global_arrays())
    assert_mean(got, mean_of(sites, [11, 12]))
    sites.lost_at.clear()
    sites.gone.clear()  # the resumed run: every site back
    resumed = masked_mean("recovering")
    assert sites.round(resumed, 2, global_arrays()) == (None, None)
    refusals = [reply for kind, node, reply in sites.replies[-3:] if kind == messages.ANN_UNMASK.type]
    assert len(refusals) == 3 and sum(reply is None for reply in refusals) == 2  # 11 and 12 refuse, 13 answers
    assert "summed before over other sites" in resumed.failed_rounds[2]
    again = masked_mean("recovering")  # site 13 lost before sending again: the first sum's senders, allowed
    sites.gone.clear()
    sites.lost_at[13] = (messages.TRAIN.type, 3, False)  # its third training message
    got, _ = sites.round(again, 2, global_arrays())
    assert_mean(got, mean_of(sites, [11, 12]))


def test_a_repeated_round_is_compared_by_site_name_since_a_resumed_run_has_new_node_ids(task_identity):
    sites = Sites()
    names = {11: "clinic_00", 12: "clinic_01", 13: "clinic_02"}
    assert sites.round(masked_mean("pairwise", names=names), 2, global_arrays())[0] is not None
    resumed = masked_mean("pairwise", names={11: "clinic_00", 12: "clinic_02", 13: "clinic_01"})
    assert sites.round(resumed, 2, global_arrays())[0] is not None
    other = masked_mean("pairwise", names={**names, 13: "clinic_07"})
    assert sites.round(other, 2, global_arrays()) == (None, None)
    assert "masked before among other sites" in other.failed_rounds[2]


def test_pairwise_a_site_lost_before_answering_fails_the_round_naming_it_and_the_next_round_rekeys(task_identity):
    sites = Sites()
    strategy = masked_mean("pairwise")
    sites.lost_at[13] = (messages.TRAIN.type, 1, False)
    assert sites.round(strategy, 1, global_arrays()) == (None, None)
    assert "1 of the 3 sites" in strategy.failed_rounds[1] and "node 13: no reply" in strategy.failed_rounds[1]
    assert "recovering recovers lost sites" in strategy.failed_rounds[1]
    got, _ = sites.round(strategy, 2, global_arrays())
    assert strategy.key_exchanges == 2 and sorted(strategy.roster) == [11, 12]
    assert_mean(got, mean_of(sites, [11, 12]))


def test_recovering_a_site_lost_after_sending_its_masked_weights_is_in_the_mean(task_identity):
    sites = Sites(counts={11: 30, 12: 70, 13: 55})
    strategy = masked_mean("recovering")
    sites.lost_at[13] = (messages.TRAIN.type, 1, True)  # its masked weights arrive, then it is gone (unmask)
    got, _ = sites.round(strategy, 1, global_arrays())
    assert_mean(got, mean_of(sites, [11, 12, 13]))
    assert strategy.recovered == {} and not strategy.failed_rounds
    assert 13 in strategy.excluded  # it did not answer the unmask round: left out of later rounds
    got, _ = sites.round(strategy, 2, global_arrays())
    assert_mean(got, mean_of(sites, [11, 12]))
    assert strategy.key_exchanges == 2 and strategy.session.threshold == 2  # a new session among the two left


def test_recovering_a_site_lost_before_sending_its_masked_weights_is_unmasked_away(task_identity):
    sites = Sites(counts={11: 30, 12: 70, 13: 55})
    strategy = masked_mean("recovering")
    sites.lost_at[12] = (messages.TRAIN.type, 1, False)  # it shared its keys, then never sent its weights
    got, _ = sites.round(strategy, 1, global_arrays())
    assert_mean(got, mean_of(sites, [11, 13]))
    assert strategy.recovered == {1: {12: "no reply"}} and not strategy.failed_rounds
    unmask = [reply for kind, node, reply in sites.replies if kind == messages.ANN_UNMASK.type]
    assert len(unmask) == 2 and all(len(reply["keys"][h.MASK_KEYS_OF]) == 1 for reply in unmask)


def test_recovering_a_site_lost_at_the_key_round_is_not_asked_to_train(task_identity):
    sites = Sites()
    strategy = masked_mean("recovering")
    sites.lost_at[11] = (messages.ANN_KEYS.type, 1, False)
    got, _ = sites.round(strategy, 1, global_arrays())
    assert_mean(got, mean_of(sites, [12, 13]))
    assert all(node != 11 for kind, node, _ in sites.replies if kind == messages.TRAIN.type)
    assert "no reply" in strategy.excluded[11]


def test_recovering_a_site_lost_in_each_round_is_recovered_every_round_the_threshold_set_from_the_sites_left(
        task_identity):
    """Five sites (t = 3), one lost in each of rounds 1 to 3: with a threshold kept from the first round, round 3's
    two senders would fall below it; the session started after each loss sets t from the sites left."""
    nodes = (11, 12, 13, 14, 15)
    sites = Sites(nodes, counts={n: 10 * n for n in nodes})
    strategy = masked_mean("recovering", nodes)
    for server_round, lost in ((1, 15), (2, 14), (3, 13)):
        sites.lost_at[lost] = (messages.TRAIN.type, server_round, False)  # its n-th training message
        got, _ = sites.round(strategy, server_round, global_arrays())
        left = [n for n in nodes if n < lost]
        assert_mean(got, mean_of(sites, left))
        assert strategy.recovered[server_round] == {lost: "no reply"}
        assert strategy.session.threshold == {1: 3, 2: 3, 3: 2}[server_round]  # ⌊n/2⌋ + 1 of the session's sites
    assert not strategy.failed_rounds and strategy.key_exchanges == 3


def test_recovering_more_sites_lost_than_the_threshold_allows_fails_the_round_with_the_reason(task_identity):
    sites = Sites()
    strategy = masked_mean("recovering")  # threshold 2 of 3: one site may be lost
    sites.lost_at[12] = (messages.TRAIN.type, 1, False)
    sites.lost_at[13] = (messages.TRAIN.type, 1, False)
    assert sites.round(strategy, 1, global_arrays()) == (None, None)
    assert "2 of the 3 sites" in strategy.failed_rounds[1] and "cannot be recovered" in strategy.failed_rounds[1]
    with pytest.raises(SecureAnnError, match="1 answered the key exchange"):
        sites.round(strategy, 2, global_arrays())


def test_a_lone_site_at_the_key_exchange_stops_the_masked_phase_with_the_reason(task_identity):
    sites = Sites()
    sites.lost_at.update({12: (messages.ANN_KEYS.type, 1, False), 13: (messages.ANN_KEYS.type, 1, False)})
    with pytest.raises(SecureAnnError, match="at least 2 sites .* 1 answered the key exchange"):
        sites.round(masked_mean("pairwise"), 1, global_arrays())


def test_a_site_refuses_weights_past_the_fixed_point_bound_without_naming_a_value():
    config = ConfigRecord({h.SECURE_SCALE: FIXED_POINT_BITS, h.SECURE_SITES: 10})
    layout = t.layout_of({"w": np.zeros(3)})
    huge = t.weighted_vector({"w": np.array([0.5, 4.1e11, -2.0])}, 10_000.0, layout)  # > 2^55 / 10 = 3.6e15
    with pytest.raises(ShareableError) as refused:
        sa.to_fixed(huge, config)
    assert "4.1" not in str(refused.value) and "10000" not in str(refused.value) and "3.6e+15" in str(refused.value)
    sa.to_fixed(t.weighted_vector({"w": np.array([0.5, 4.1e10, -2.0])}, 10_000.0, layout), config)
    with pytest.raises(ShareableError, match="above zero"):
        t.weighted_vector({"w": np.zeros(3)}, 0.0, layout)
    with pytest.raises(ShareableError, match="not finite"):
        sa.to_fixed(t.weighted_vector({"w": np.array([0.0, np.nan, 1.0])}, 10.0, layout), config)
    with pytest.raises(ShareableError, match="shape"):
        t.weighted_vector({"w": np.zeros(4)}, 10.0, layout)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("options, needs", [
    ({"strategy": "krum"}, "krum ranks, scores or trims each site's update"),
    ({"strategy": "fedmedian"}, "fedmedian"),
    ({"strategy": "fedtrimmedavg"}, "fedtrimmedavg"),
    ({"clip_norm": 1.0}, "update-norm clipping"),
    ({"clip_median_factor": 2.0}, "update-norm clipping"),
    ({"central_dp": "fixed"}, "central DP"),
])
def test_what_needs_each_sites_update_refuses_masking_at_settings_time(options, needs, mode):
    with pytest.raises(ValueError, match=f"ann-secure-sum {mode}: .*{needs}"):
        dataclasses.replace(DEFAULTS, ann_secure_sum=mode, **options)
    auto = dataclasses.replace(DEFAULTS, **options)  # auto: plain rounds, and the reason says why
    masked, why = auto.ann_masking(5)
    assert masked == "off" and needs in why
    with pytest.raises(ValueError, match="needs them one by one"):
        make_strategy("bulyan", n_sites=10, masked=True)


def test_simulate_refuses_recovering_ann_masking_with_a_robust_strategy_before_anything_runs(tmp_path):
    from typer.testing import CliRunner

    from fednano.cli import app

    result = CliRunner().invoke(app, ["simulate", "--strategy", "multikrum", "--ann-secure-sum", "recovering",
                                      "--out", str(tmp_path / "out")])
    words = " ".join(result.output.replace("│", " ").split())  # rich's error box, unwrapped
    assert result.exit_code == 2 and "multikrum ranks, scores or trims each site's update" in words
    assert not (tmp_path / "out").exists()


def test_auto_follows_secure_sum_and_masking_needs_two_sites():
    assert DEFAULTS.ann_secure_sum == "auto" and DEFAULTS.ann_masking(3)[0] == DEFAULTS.secure_sum == "pairwise"
    assert dataclasses.replace(DEFAULTS, secure_sum="recovering").ann_masking(3) == (
        "recovering", "ann-secure-sum auto (secure-sum recovering)")
    assert DEFAULTS.ann_masking(1) == ("off", "1 site trains: a masked sum needs at least 2 to hide each site "
                                              "among the others")
    assert dataclasses.replace(DEFAULTS, secure_sum="off").ann_masking(3)[0] == "off"
    assert dataclasses.replace(DEFAULTS, secure_sum="off", ann_secure_sum="pairwise").ann_masking(3)[0] == "pairwise"
    assert dataclasses.replace(DEFAULTS, secure_sum="pairwise",
                               ann_secure_sum="recovering").ann_masking(3)[0] == "recovering"
    assert dataclasses.replace(DEFAULTS, ann_secure_sum="off").ann_masking(3) == ("off", "ann-secure-sum is off")
    with pytest.raises(ValueError, match="ann-secure-sum recovering: 1 site trains"):
        dataclasses.replace(DEFAULTS, ann_secure_sum="recovering").ann_masking(1)
    with pytest.raises(ValueError, match="ann-secure-sum: expected one of auto, pairwise, recovering, off"):
        RunSettings.from_run_config({"ann-secure-sum": "on"})


def test_auto_masks_pairwise_rounds_at_any_size_and_recovering_ones_up_to_a_hundred_sites():
    """Pairwise masks cost 26 ring neighbours per site above 27 sites; the recovering protocol shares with every
    peer (K² per round): auto stops it at AUTO_MASKED_MAX_SITES. An explicit mode masks at any size."""
    from server.settings import AUTO_MASKED_MAX_SITES

    assert AUTO_MASKED_MAX_SITES == 100
    assert DEFAULTS.secure_sum == "pairwise"
    assert DEFAULTS.ann_masking(100)[0] == DEFAULTS.ann_masking(1000)[0] == "pairwise"
    recovering = dataclasses.replace(DEFAULTS, secure_sum="recovering")
    assert recovering.ann_masking(100)[0] == "recovering"
    masked, why = recovering.ann_masking(101)
    assert masked == "off" and "101 sites train" in why and "at most 100" in why
    for mode in MODES:
        assert dataclasses.replace(DEFAULTS, ann_secure_sum=mode).ann_masking(1000)[0] == mode


def test_the_strategy_uses_the_one_secure_sum_session(task_identity):
    """No second copy: the sessions are server.secure_aggregation's, their requests carry its keys and mode."""
    sites = Sites()
    strategy = masked_mean("recovering")
    sent = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), sites))
    assert isinstance(strategy.session, SecureSession) and strategy.session.mode == "recovering"
    config = to_node(sent, 12).content["config"]
    assert config[h.SECURE_SUM] and config[h.SECURE_RECOVERING] and config[h.SECURE_SCALE] == FIXED_POINT_BITS
    assert int(config[h.SECURE_SITES]) == 3 and list(config[t.ROSTER_NAMES]) == ["11", "12", "13"]
    assert list(config[h.SHARE_PEERS]) == [11, 13]  # the shares sent to node 12, relayed with its own request
    assert secagg_plus.default_threshold(3) == int(config[h.SECURE_THRESHOLD])
    assert issubclass(ss.SecureProtocolError, RuntimeError)


@pytest.mark.slow
def test_a_flower_simulation_ends_on_the_same_model_masked_or_plain(tmp_path, shared_ray):
    """3 clinics through the whole ServerApp and ClientApp, FedAvg, plain, pairwise-masked and recovering. After
    one round (the same site replies, aggregated two ways) the models agree to float32 rounding; after two, the
    second round's local Adam starts from globals that differ by that rounding, and Adam's m/√v step (≈ ±lr
    wherever a gradient is near zero) can grow a rounding-sized difference at such a coordinate: measured 1.8e-6
    at one weight of 4,000 (seed 4), every other weight within 5e-8."""
    from shared.artifacts import RunArtifacts
    from simulation.clinics import SitePrivacy, generate_sites
    from simulation.experiment import ExperimentConfig, flower_environment, prepare_sites, quiet_flower, run_federation

    flower_environment(tmp_path)
    quiet_flower()
    clinics = generate_sites(3, 4, tmp_path / "sites", patients_per_clinic=80, privacy=SitePrivacy(dp=False)).clinics
    base = ExperimentConfig(clinics=3, dp=False, seed=4, models="ann", compare=False, fqi_iterations=0,
                            policy=False, sites=[tmp_path / "sites" / c.name for c in clinics])
    sources, _ = prepare_sites(dataclasses.replace(base, out=tmp_path / "prep"))
    diffs = {}
    for rounds in (1, 2):
        finals = {}
        for mode in ("pairwise", "recovering", "off"):
            cfg = dataclasses.replace(base, rounds=rounds, ann_secure_sum=mode, out=tmp_path / f"{mode}-{rounds}")
            record = run_federation(cfg, sources)
            assert record.models["ann"].secure_sum.startswith(f"{mode}: ann-secure-sum")
            assert not record.models["ann"].failures
            state = RunArtifacts.open(cfg.out / "federated", run_id=record.run_id).ann().state_dict()
            finals[mode] = np.concatenate([v.numpy().astype(np.float64).ravel() for v in state.values()])
        for mode in MODES:
            diffs[rounds, mode] = np.abs(finals[mode] - finals["off"])
            diff = diffs[rounds, mode]
            print(f"{rounds} round(s), {mode}: max abs diff masked vs plain {diff.max():.3g}, 99.9th percentile "
                  f"{np.quantile(diff, 0.999):.3g}, max |w| {np.abs(finals['off']).max():.3g}")
        assert np.abs(finals["off"]).max() > 0.05  # trained weights, not two empty models
    for mode in MODES:
        assert diffs[1, mode].max() <= 1e-7  # float32 rounding of Flower's float32 weighted sum (weights < 0.3)
        assert np.quantile(diffs[2, mode], 0.999) <= 1e-7 and diffs[2, mode].max() <= 1e-5
