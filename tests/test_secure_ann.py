"""Pairwise-masked ANN rounds (strategies.pairwise_masked_mean, client.training_handlers.masked_weights): the masked
mean equals Flower's plain one within the fixed-point rounding for FedAvg, FedProx, FedAdam and FedYogi; one site's
words look uniform; a mask label is never used twice; what needs each site's update refuses masking; a lost site
fails its round and the next one exchanges keys again; and a Flower simulation ends on the same model masked or not."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi
from scipy import stats

from client.training_handlers import masked_weights, session_key
from server.settings import DEFAULTS, RunSettings
from shared import ann_fixed_point as fp
from shared import secure_sum as ss
from shared.protocol import messages
from shared.protocol import training as t
from strategies.choice import make_strategy
from strategies.pairwise_masked_mean import PairwiseMaskedMean, SecureAnnError

NODES = (11, 12, 13)


class Sites:
    """Three sites' contexts and a grid that answers ``query.ann_keys`` with the real site handler."""

    def __init__(self, nodes=NODES, silent=()):
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in nodes}
        self.silent = set(silent)
        self.key_requests = 0

    def get_node_ids(self):
        return list(self.contexts)

    def request(self, node, config):
        return SimpleNamespace(config=config, context=self.contexts[node])

    def send_and_receive(self, sent, timeout=None):
        self.key_requests += 1
        replies = []
        for msg in sent:
            assert msg.metadata.message_type == messages.ANN_KEYS.type
            node = msg.metadata.dst_node_id
            if node in self.silent:
                continue
            replies.append(Message(session_key(msg, self.request(node, msg.content["config"])), reply_to=msg))
        return replies

    def answer(self, msg, weights, n):
        """The site's training reply: ``weights`` as masked words, ``n`` as num-examples."""
        node, config = msg.metadata.dst_node_id, msg.content["config"]
        trained = ArrayRecord({k: Array(v) for k, v in weights.items()})
        words = masked_weights(self.request(node, config), msg.content["arrays"], trained, n,
                               int(config["server-round"]))
        return Message(RecordDict({"arrays": words, "metrics": MetricRecord({"num-examples": n})}), reply_to=msg)


def to_node(sent, node):
    """The message of ``sent`` for ``node`` (Flower samples nodes in random order)."""
    return next(m for m in sent if m.metadata.dst_node_id == node)


def plain_reply(weights, n, node):
    message = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
                                  "metrics": MetricRecord({"num-examples": n})}), dst_node_id=0, message_type="train")
    message.metadata.__dict__["_src_node_id"] = node
    return message


def site_weights(seed):
    rng = np.random.default_rng(seed)
    return {"layer.weight": rng.normal(0, 0.5, (8, 5)).astype(np.float32),
            "layer.bias": rng.normal(0, 0.1, 8).astype(np.float32)}


STRATEGIES = {"fedavg": FedAvg, "fedprox": lambda: FedProx(proximal_mu=0.1),
              "fedadam": lambda: FedAdam(eta=0.05, eta_l=0.05), "fedyogi": lambda: FedYogi(eta=0.05, eta_l=0.05)}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_masked_aggregate_equals_flowers_plain_aggregate_within_fixed_point_rounding(task_identity, name):
    sites = Sites()
    global_ = site_weights(0)
    arrays = ArrayRecord({k: Array(v) for k, v in global_.items()})
    counts = {11: 120, 12: 37.6, 13: 301}  # a DP site weights itself by its noised (fractional) row count
    trained = {node: site_weights(node) for node in NODES}
    masked, plain = PairwiseMaskedMean(STRATEGIES[name](), NODES), STRATEGIES[name]()
    for server_round in (1, 2):  # FedAdam / FedYogi keep moments across rounds
        sent = list(masked.configure_train(server_round, arrays, ConfigRecord(), sites))
        plain.configure_train(server_round, arrays, ConfigRecord(), sites)
        replies = [sites.answer(m, trained[m.metadata.dst_node_id], counts[m.metadata.dst_node_id]) for m in sent]
        got, metrics = masked.aggregate_train(server_round, replies)
        want, want_metrics = plain.aggregate_train(server_round, [plain_reply(trained[n], counts[n], n) for n in NODES])
        for key in global_:
            diff = np.max(np.abs(got[key].numpy().astype(np.float64) - want[key].numpy()))
            assert diff <= 1e-6, (key, diff)  # float32 rounding of Flower's own float32 sum dominates
            assert got[key].numpy().dtype == want[key].numpy().dtype
        assert dict(metrics) == dict(want_metrics)  # the sites' metrics, aggregated as Flower does
        arrays = got
    assert masked.key_exchanges == 1 and sites.key_requests == 1  # one key exchange for the phase


def test_unmasked_fixed_point_mean_is_within_the_stated_rounding_bound():
    layout = fp.layout_of(site_weights(0))
    counts = [120.0, 37.6, 301.0]
    words = [fp.encode(site_weights(s), n, layout, 3) for s, n in zip((1, 2, 3), counts, strict=True)]
    mean, weight = fp.decode(np.sum(words, axis=0), layout)
    exact = {k: sum(n * site_weights(s)[k].astype(np.float64) for s, n in zip((1, 2, 3), counts, strict=True))
             / sum(counts) for k in mean}
    bound = 3 * 2.0 ** -(fp.SCALE_BITS + 1) * (1 + 2.0) / sum(counts)  # K/2 units × (1 + |mean|) / Σn
    for key in mean:
        assert np.max(np.abs(mean[key].astype(np.float64) - exact[key])) <= bound + 6e-8 * np.abs(exact[key]).max()
    assert weight == pytest.approx(sum(counts), abs=1e-9)


def test_one_sites_masked_words_are_indistinguishable_from_uniform(task_identity):
    sites = Sites()
    weights = {"w": np.full(6000, 0.25, dtype=np.float32)}  # every word the same before masking
    arrays = ArrayRecord({"w": Array(np.zeros(6000, dtype=np.float32))})
    strategy = PairwiseMaskedMean(FedAvg(), NODES)
    msg = next(iter(strategy.configure_train(1, arrays, ConfigRecord(), sites)))
    words = sites.answer(msg, weights, 100).content["arrays"][t.MASKED].numpy()
    assert words.dtype == np.uint64 and words.shape == (6001,)
    assert stats.kstest(words.astype(np.float64) / 2.0 ** 64, "uniform").pvalue > 0.01
    assert stats.chisquare(np.bincount((words >> np.uint64(56)).astype(int), minlength=256)).pvalue > 0.01
    plain = fp.encode(weights, 100, fp.layout_of(weights), 3)
    assert stats.kstest(plain.view(np.uint64).astype(np.float64) / 2.0 ** 64, "uniform").pvalue < 1e-6


def test_a_site_refuses_a_mask_label_it_has_used_and_a_round_without_its_key(task_identity):
    sites = Sites()
    arrays = ArrayRecord({k: Array(v) for k, v in site_weights(0).items()})
    strategy = PairwiseMaskedMean(FedAvg(), NODES)
    msg = to_node(strategy.configure_train(3, arrays, ConfigRecord(), sites), 11)
    sites.answer(msg, site_weights(1), 10)
    with pytest.raises(ss.SecureSumError, match="refusing to reuse a mask"):
        sites.answer(msg, site_weights(1), 10)  # the same round again
    earlier = to_node(strategy.configure_train(2, arrays, ConfigRecord(), sites), 11)
    with pytest.raises(ss.SecureSumError, match="refusing to reuse a mask"):
        sites.answer(earlier, site_weights(1), 10)
    stranger = Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
        {**dict(msg.content["config"]), t.SECURE_SESSION: "another-session"})}), dst_node_id=11, message_type="train")
    with pytest.raises(ss.SecureSumError, match="query.ann_keys first"):
        sites.answer(stranger, site_weights(1), 10)


def test_a_round_asked_again_among_other_sites_is_refused_so_two_sums_cannot_be_subtracted(task_identity):
    """A resumed run asks its interrupted round again, under a new key exchange: with the same sites the sum is the
    same; with one site fewer, the difference of the two sums would be that site's weights."""
    sites = Sites()
    arrays = ArrayRecord({k: Array(v) for k, v in site_weights(0).items()})
    first = PairwiseMaskedMean(FedAvg(), NODES)
    sites.answer(to_node(first.configure_train(2, arrays, ConfigRecord(), sites), 11), site_weights(1), 10)
    again = PairwiseMaskedMean(FedAvg(), NODES)  # the resumed coordinator: a new session, the same roster
    sites.answer(to_node(again.configure_train(2, arrays, ConfigRecord(), sites), 11), site_weights(1), 10)
    fewer = PairwiseMaskedMean(FedAvg(), (11, 12))
    with pytest.raises(ss.SecureSumError, match="round 2 was masked before among other sites"):
        sites.answer(to_node(fewer.configure_train(2, arrays, ConfigRecord(), sites), 11), site_weights(1), 10)
    sites.answer(to_node(fewer.configure_train(3, arrays, ConfigRecord(), sites), 11), site_weights(1), 10)


def test_a_repeated_round_is_compared_by_site_name_since_a_resumed_run_has_new_node_ids(task_identity):
    sites = Sites()
    arrays = ArrayRecord({k: Array(v) for k, v in site_weights(0).items()})
    names = {11: "clinic_00", 12: "clinic_01", 13: "clinic_02"}
    first = PairwiseMaskedMean(FedAvg(), NODES, names)
    sites.answer(to_node(first.configure_train(2, arrays, ConfigRecord(), sites), 11), site_weights(1), 10)
    resumed = PairwiseMaskedMean(FedAvg(), NODES, {11: "clinic_00", 12: "clinic_02", 13: "clinic_01"})
    sites.answer(to_node(resumed.configure_train(2, arrays, ConfigRecord(), sites), 11), site_weights(1), 10)
    other = PairwiseMaskedMean(FedAvg(), NODES, {**names, 13: "clinic_07"})
    with pytest.raises(ss.SecureSumError, match="masked before among other sites"):
        sites.answer(to_node(other.configure_train(2, arrays, ConfigRecord(), sites), 11), site_weights(1), 10)


def test_when_every_site_of_the_roster_is_lost_the_next_round_stops_with_the_reason(task_identity):
    sites = Sites()
    arrays = ArrayRecord({k: Array(v) for k, v in site_weights(0).items()})
    strategy = PairwiseMaskedMean(FedAvg(), NODES)
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(), sites))
    assert strategy.aggregate_train(1, [Message(Error(code=0, reason="refused"), reply_to=m) for m in sent]) == \
        (None, None)
    with pytest.raises(SecureAnnError, match="0 answered the key exchange"):
        list(strategy.configure_train(2, arrays, ConfigRecord(), sites))


def test_weights_past_the_fixed_point_bound_are_refused_without_naming_a_value():
    layout = fp.layout_of({"w": np.zeros(3)})
    huge = {"w": np.array([0.5, 81_234.5, -2.0])}
    with pytest.raises(fp.FixedPointError) as refused:
        fp.encode(huge, 3000.0, layout, 10)  # 3000 × 81234.5 > 2^31 / 10
    assert "81234" not in str(refused.value) and "3000" not in str(refused.value) and "2.147e+08" in str(refused.value)
    fp.encode(huge, 2000.0, layout, 10)  # 1.6e8: inside the bound
    with pytest.raises(fp.FixedPointError, match="not finite"):
        fp.encode({"w": np.array([0.0, np.nan, 1.0])}, 10.0, layout, 10)
    assert fp.largest_weighted_value(1000) == pytest.approx(2.0 ** 31 / 1000, rel=1e-12)


@pytest.mark.parametrize("options, needs", [
    ({"strategy": "krum"}, "krum ranks, scores or trims each site's update"),
    ({"strategy": "fedmedian"}, "fedmedian"),
    ({"strategy": "fedtrimmedavg"}, "fedtrimmedavg"),
    ({"clip_norm": 1.0}, "update-norm clipping"),
    ({"clip_median_factor": 2.0}, "update-norm clipping"),
    ({"central_dp": "fixed"}, "central DP"),
])
def test_what_needs_each_sites_update_refuses_pairwise_masking_at_settings_time(options, needs):
    with pytest.raises(ValueError, match=f"ann-secure-sum pairwise: .*{needs}"):
        dataclasses.replace(DEFAULTS, ann_secure_sum="pairwise", **options)
    auto = dataclasses.replace(DEFAULTS, **options)  # auto: plain rounds, and the reason says why
    masked, why = auto.ann_masking(5)
    assert not masked and needs in why
    with pytest.raises(ValueError, match="needs them one by one"):
        make_strategy("bulyan", n_sites=10, masked=True)


def test_simulate_refuses_pairwise_ann_masking_with_a_robust_strategy_before_anything_runs(tmp_path):
    from typer.testing import CliRunner

    from fednano.cli import app

    result = CliRunner().invoke(app, ["simulate", "--strategy", "multikrum", "--ann-secure-sum", "pairwise",
                                      "--out", str(tmp_path / "out")])
    words = " ".join(result.output.replace("│", " ").split())  # rich's error box, unwrapped
    assert result.exit_code == 2 and "multikrum ranks, scores or trims each site's update" in words
    assert not (tmp_path / "out").exists()


def test_masking_follows_secure_sum_by_default_and_needs_two_sites():
    assert DEFAULTS.ann_secure_sum == "auto" and DEFAULTS.ann_masking(3)[0]
    assert DEFAULTS.ann_masking(1) == (False, "1 site trains: a masked sum needs at least 2 to hide each site "
                                              "among the others")
    assert dataclasses.replace(DEFAULTS, secure_sum="off").ann_masking(3)[0] is False
    assert dataclasses.replace(DEFAULTS, secure_sum="off", ann_secure_sum="pairwise").ann_masking(3)[0]
    assert dataclasses.replace(DEFAULTS, ann_secure_sum="off").ann_masking(3) == (False, "ann-secure-sum is off")
    with pytest.raises(ValueError, match="ann-secure-sum pairwise: 1 site trains"):
        dataclasses.replace(DEFAULTS, ann_secure_sum="pairwise").ann_masking(1)
    with pytest.raises(ValueError, match="ann-secure-sum: expected one of auto, pairwise, off"):
        RunSettings.from_run_config({"ann-secure-sum": "on"})


def test_a_lost_site_fails_the_round_and_the_next_round_keys_the_survivors(task_identity):
    sites = Sites()
    global_ = site_weights(0)
    arrays = ArrayRecord({k: Array(v) for k, v in global_.items()})
    strategy = PairwiseMaskedMean(FedAvg(), NODES)
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(), sites))
    replies = [sites.answer(to_node(sent, n), site_weights(n), 50) for n in (11, 12)]
    replies.append(Message(Error(code=0, reason="node lost"), reply_to=to_node(sent, 13)))
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert "1 of the 3 sites" in strategy.failed_rounds[1] and "node 13: node lost" in strategy.failed_rounds[1]
    assert "dropout recovery is not built" in strategy.failed_rounds[1]
    sent = list(strategy.configure_train(2, arrays, ConfigRecord(), sites))
    assert strategy.key_exchanges == 2 and sorted(strategy.roster) == [11, 12]
    assert sorted(m.metadata.dst_node_id for m in sent) == [11, 12]
    got, _ = strategy.aggregate_train(2, [sites.answer(m, site_weights(m.metadata.dst_node_id), 50) for m in sent])
    for key in global_:
        want = (site_weights(11)[key].astype(np.float64) + site_weights(12)[key]) / 2
        assert np.max(np.abs(got[key].numpy() - want)) <= 1e-7


def test_a_lone_site_at_the_key_exchange_stops_the_masked_phase_with_the_reason(task_identity):
    sites = Sites(silent={12, 13})
    arrays = ArrayRecord({k: Array(v) for k, v in site_weights(0).items()})
    with pytest.raises(SecureAnnError, match="at least 2 sites .* 1 answered the key exchange"):
        list(PairwiseMaskedMean(FedAvg(), NODES).configure_train(1, arrays, ConfigRecord(), sites))


@pytest.mark.slow
def test_a_flower_simulation_ends_on_the_same_model_masked_or_plain(tmp_path, shared_ray):
    """3 clinics through the whole ServerApp and ClientApp, FedAvg, with and without masks. After one round (the
    same site replies, aggregated two ways) the models agree to float32 rounding; after two, the second round's
    local Adam starts from globals that differ by that rounding, and Adam's m/√v step (≈ ±lr wherever a gradient
    is near zero) can grow a rounding-sized difference at such a coordinate: measured 1.8e-6 at one weight of
    4,000 (seed 4), every other weight within 5e-8."""
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
        for mode in ("pairwise", "off"):
            cfg = dataclasses.replace(base, rounds=rounds, ann_secure_sum=mode, out=tmp_path / f"{mode}-{rounds}")
            record = run_federation(cfg, sources)
            assert record.models["ann"].secure_sum.startswith(f"{mode}: ann-secure-sum")
            assert not record.models["ann"].failures
            state = RunArtifacts.open(cfg.out / "federated", run_id=record.run_id).ann().state_dict()
            finals[mode] = np.concatenate([v.numpy().astype(np.float64).ravel() for v in state.values()])
        diffs[rounds] = np.abs(finals["pairwise"] - finals["off"])
        print(f"{rounds} round(s): max abs diff masked vs plain {diffs[rounds].max():.3g}, 99.9th percentile "
              f"{np.quantile(diffs[rounds], 0.999):.3g}, max |w| {np.abs(finals['off']).max():.3g}")
        assert np.abs(finals["off"]).max() > 0.05  # trained weights, not two empty models
    assert diffs[1].max() <= 1e-7  # float32 rounding of Flower's float32 weighted sum (weights < 0.3)
    assert np.quantile(diffs[2], 0.999) <= 1e-7 and diffs[2].max() <= 1e-5


def test_auto_masks_up_to_a_hundred_sites_and_pairwise_at_any_size():
    """Masking costs each site a mask stream per peer (K² per round): auto stops at AUTO_MASKED_MAX_SITES."""
    from server.settings import AUTO_MASKED_MAX_SITES

    assert AUTO_MASKED_MAX_SITES == 100
    assert DEFAULTS.ann_masking(100)[0] is True
    masked, why = DEFAULTS.ann_masking(101)
    assert masked is False and "101 sites train" in why and "at most 100" in why
    assert dataclasses.replace(DEFAULTS, ann_secure_sum="pairwise").ann_masking(1000)[0] is True
