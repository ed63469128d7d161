"""Checkpoint and resume, the fast parts: the coordinator's checkpoint round-trips bit for bit (global arrays,
FedAdam's moments, each site's replies by site name), a resumed strategy aggregates as an uninterrupted one,
and a site charges a release it is asked again in the same run once — and only when it is the same release."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client import run_state
from client.dp import DEFAULT_SHARES, Block, PhaseRelease, SiteDP, release_key, release_tag, start_run
from client.ledger import PrivacyLedger
from client.ledger_file import LedgerError
from server.checkpoint import (
    Checkpoint,
    CheckpointError,
    FromRound,
    record_arrays,
    remove,
    restore_strategy,
    strategy_state,
)
from server.settings import DEFAULTS
from shared.protocol.privacy import RunPlan
from strategies.choice import make_strategy
from strategies.per_site import PerSiteRecord

PLAN = RunPlan(("statistics", "training", "evaluation", "boosting"))


class TwoNodes:
    """The part of a Grid that Flower's node sampling reads."""

    def get_node_ids(self):
        return [11, 12]


def _reply(arrays: dict[str, np.ndarray], n: int, node: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5 * node})})
    message = Message(content, dst_node_id=0, message_type="train")
    message.metadata.__dict__["_src_node_id"] = node  # as if node ``node`` had sent it (no setter in Flower)
    return message


def _round(strategy, server_round: int, arrays: ArrayRecord, rng: np.random.Generator) -> ArrayRecord:
    """One training round of ``strategy`` from ``arrays`` with two sites' replies drawn from ``rng``."""
    list(strategy.configure_train(server_round, arrays, ConfigRecord(), TwoNodes()))
    replies = [_reply({k: a.numpy() + rng.normal(0, 0.1, a.numpy().shape).astype(np.float32)
                       for k, a in arrays.items()}, n, node) for node, n in ((11, 30), (12, 50))]
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    return aggregated


def test_a_resumed_fedadam_aggregates_as_an_uninterrupted_one_bit_for_bit(tmp_path, task_identity):
    start = ArrayRecord({"w": Array(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)),
                         "b": Array(np.zeros(4, dtype=np.float32))})
    names = {11: "clinic_a", 12: "clinic_b"}

    def new():
        return PerSiteRecord(make_strategy("fedadam", 2), train_nodes=[11, 12])

    uninterrupted, arrays = new(), start
    for server_round in (1, 2, 3):
        arrays = _round(uninterrupted, server_round, arrays, np.random.default_rng(server_round))

    first = new()
    resumed_arrays = _round(first, 1, start, np.random.default_rng(1))
    state, moments = strategy_state(first, names)
    assert {k.split("/")[0] for k in moments} == {"m_t", "v_t"}  # Adam's moments are saved
    Checkpoint(run_id="41", settings={}, stage="training", record={}, server_round=1,
               arrays=record_arrays(resumed_arrays) | moments, strategy=state).write(tmp_path)
    saved = Checkpoint.read(tmp_path)
    # a resumed run's sites have other node ids: the per-site record follows the site names
    elsewhere = new()
    restore_strategy(elsewhere, saved.strategy, saved.arrays, {"clinic_a": 21, "clinic_b": 22})
    assert elsewhere.rounds.train[1][22]["train-loss"] == pytest.approx(6.0)
    second = new()
    restore_strategy(second, saved.strategy, saved.arrays, {"clinic_a": 11, "clinic_b": 12})
    arrays2 = saved.global_arrays()
    for server_round in (2, 3):
        arrays2 = _round(second, server_round, arrays2, np.random.default_rng(server_round))
    for key in ("w", "b"):
        np.testing.assert_array_equal(arrays2[key].numpy(), arrays[key].numpy())
    # without the moments the resumed FedAdam would not be the same optimiser
    forgetful, arrays3 = new(), saved.global_arrays()
    for server_round in (2, 3):
        arrays3 = _round(forgetful, server_round, arrays3, np.random.default_rng(server_round))
    assert np.max(np.abs(arrays3["w"].numpy() - arrays["w"].numpy())) > 1e-4


def test_a_checkpoint_keeps_non_finite_metrics_and_refuses_other_settings(tmp_path):
    strategy = PerSiteRecord(make_strategy("fedavg", 1))
    strategy.rounds.train[1] = {5: {"train-loss": math.nan, "num-examples": 10}}
    state, _ = strategy_state(strategy, {5: "clinic_a"})
    settings = DEFAULTS.to_run_config()
    Checkpoint(run_id="7", settings=settings, stage="training", record={"x": 1}, server_round=1,
               arrays={"global/w": np.arange(3, dtype=np.float32)}, strategy=state).write(tmp_path)
    saved = Checkpoint.read(tmp_path)
    assert math.isnan(saved.strategy["per_site"]["train"]["1"]["clinic_a"]["train-loss"])
    assert saved.global_arrays()["w"].numpy().dtype == np.float32
    saved.check_settings({**settings, "resume": True})  # resume itself may differ
    with pytest.raises(CheckpointError, match="num-server-rounds: checkpoint 10, now 12"):
        saved.check_settings({**settings, "num-server-rounds": 12})
    assert len(list((tmp_path / "checkpoint").glob("arrays-*.npz"))) == 1


def test_settled_rounds_are_written_once_and_read_back_whole(tmp_path):
    strategy = PerSiteRecord(make_strategy("fedavg", 1))
    names = {5: "clinic_a", 6: "clinic_b"}

    def checkpoint(server_round):
        for node in names:
            strategy.rounds.train[server_round] = {**strategy.rounds.train.get(server_round, {}),
                                                   node: {"train-loss": server_round + node / 10, "num-examples": 9}}
        if server_round > 1:  # a one-message round brings the previous round's evaluation
            histogram = [0] * 200
            histogram[server_round] = 3
            strategy.rounds.evaluate[server_round - 1] = {5: {"n": server_round - 1, "hist": histogram,
                                                              "scores": [0.0] * 70 + [0.5, 1.5],
                                                              "dense": list(range(1, 80))}}
        state, _ = strategy_state(strategy, names)
        Checkpoint(run_id="run/9", settings={}, stage="training", record={}, server_round=server_round,
                   strategy=state).write(tmp_path)
        return state

    for server_round in (1, 2, 3, 4):
        state = checkpoint(server_round)
    rounds = tmp_path / "checkpoint" / "rounds-run_9"
    assert sorted(p.name for p in rounds.iterdir()) == ["round-00001.json", "round-00002.json", "round-00003.json"]
    inline = json.loads((tmp_path / "checkpoint" / "checkpoint.json").read_text())
    assert sorted(inline["strategy"]["per_site"]["train"]) == ["4"]  # only the round still open travels
    assert inline["settled_rounds"] == [1, 2, 3]
    kept = json.loads((rounds / "round-00002.json").read_text())["evaluate"]["clinic_a"]
    assert kept["hist"] == {"sparse": 200, "kind": "i", "at": [3], "values": [3]}  # the non-zero bins only
    written = (rounds / "round-00001.json").stat().st_mtime_ns
    state = checkpoint(5)
    assert (rounds / "round-00001.json").stat().st_mtime_ns == written  # a settled round is not rewritten
    read = Checkpoint.read(tmp_path).strategy
    assert read == state  # the same tables, in round order
    assert [type(v) for v in read["per_site"]["evaluate"]["2"]["clinic_a"]["scores"][-2:]] == [float, float]
    restored = PerSiteRecord(make_strategy("fedavg", 1))
    restore_strategy(restored, Checkpoint.read(tmp_path).strategy, {}, {"clinic_a": 5, "clinic_b": 6})
    assert restored.rounds.train == strategy.rounds.train and restored.rounds.evaluate == strategy.rounds.evaluate
    (rounds / "round-00002.json").write_text('{"evaluate": ')  # a torn settled round is named, not the state
    with pytest.raises(CheckpointError, match=r"round-00002\.json: a settled round's file is missing or damaged"):
        Checkpoint.read(tmp_path)
    (rounds / "round-00002.json").unlink()
    with pytest.raises(CheckpointError, match=r"round-00002\.json"):
        Checkpoint.read(tmp_path)
    (rounds / "round-00002.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"round-00002\.json: .*expected an object"):
        Checkpoint.read(tmp_path)
    # another run in the same folder starts afresh: the earlier run's rounds go
    Checkpoint(run_id="10", settings={}, stage="started", record={}).write(tmp_path)
    assert not rounds.exists()
    (tmp_path / "checkpoint" / "rounds-10").mkdir()
    remove(tmp_path)
    assert not (tmp_path / "checkpoint").exists()


def test_a_settled_round_with_long_ragged_lists_is_kept_as_it_is(tmp_path):
    """Only lists of numbers are kept sparse: 70 lists of unequal lengths are no array (numpy refuses them)."""
    ragged = [[0.0] * (i % 3) for i in range(70)]
    tables = {"per_site": {"evaluate": {"1": {"clinic_a": {"ragged": ragged, "hist": [0] * 69 + [2]}}}}}
    Checkpoint(run_id="8", settings={}, stage="training", record={}, server_round=3, strategy=tables).write(tmp_path)
    kept = Checkpoint.read(tmp_path).strategy["per_site"]["evaluate"]["1"]["clinic_a"]
    assert kept["ragged"] == ragged and kept["hist"] == [0] * 69 + [2]


def test_a_damaged_checkpoint_is_an_error_naming_the_file(tmp_path):
    Checkpoint(run_id="7", settings={}, stage="started", record={}).write(tmp_path)
    for npz in (tmp_path / "checkpoint").glob("arrays-*.npz"):
        npz.unlink()
    with pytest.raises(CheckpointError, match="checkpoint.json"):
        Checkpoint.read(tmp_path)
    (tmp_path / "checkpoint" / "checkpoint.json").write_text("{")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        Checkpoint.read(tmp_path)
    assert Checkpoint.read(tmp_path / "elsewhere") is None


def test_from_round_numbers_rounds_as_the_original_run_and_reports_each_with_its_arrays():
    seen = []

    class Recorder(PerSiteRecord):
        def configure_train(self, server_round, arrays, config, grid):
            seen.append(("train", server_round))
            return []

        def aggregate_train(self, server_round, replies):
            return None, None

        def configure_evaluate(self, server_round, arrays, config, grid):
            seen.append(("evaluate", server_round))
            return []

        def aggregate_evaluate(self, server_round, replies):
            return None

    ends = []
    wrapped = FromRound(Recorder(make_strategy("fedavg", 1)), done=3,
                        on_round_end=lambda r, arrays: ends.append((r, float(arrays["w"].numpy()[0]))))
    arrays = ArrayRecord({"w": Array(np.array([2.5]))})
    list(wrapped.configure_train(1, arrays, ConfigRecord(), None))
    wrapped.aggregate_train(1, [])
    list(wrapped.configure_evaluate(1, arrays, ConfigRecord(), None))
    wrapped.aggregate_evaluate(1, [])
    assert seen == [("train", 4), ("evaluate", 4)] and ends == [(4, 2.5)]


# --- the site's side ----------------------------------------------------------------------------------------------

def dp_site(tmp_path, budget: float = 3.0) -> SiteDP:
    folder = tmp_path / "site" / ".fednano"
    return SiteDP(PrivacyLedger.open(folder / "privacy_ledger.json", budget, 1e-5, state_dir=tmp_path / "heads"),
                  {**DEFAULT_SHARES, "boosting": 0.2})


def context(run_id: int = 7) -> Context:
    return Context(run_id=run_id, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_a_ledger_charge_with_a_release_tag_is_idempotent_per_run_phase_and_round(tmp_path):
    ledger = dp_site(tmp_path).ledger
    tag, other = "ab" * 16, "cd" * 16
    assert ledger.record(2.0, 1.0, 1, run_id="7", server_round=3, phase="boosting", release=tag) is not None
    spent = ledger.spent()
    assert ledger.record(2.0, 1.0, 1, run_id="7", server_round=3, phase="boosting", release=tag) is None
    assert ledger.spent() == spent and len(ledger.entries) == 1
    assert ledger.released("7", "boosting", 3, tag) and not ledger.released("8", "boosting", 3, tag)
    # another release of the same round, the same release in another run or round: each charged
    ledger.record(2.0, 1.0, 1, run_id="7", server_round=3, phase="boosting", release=other)
    ledger.record(2.0, 1.0, 1, run_id="8", server_round=3, phase="boosting", release=tag)
    ledger.record(2.0, 1.0, 1, run_id="7", server_round=4, phase="boosting", release=tag)
    assert len(ledger.entries) == 4 and ledger.spent() > spent
    assert ledger.charged_rounds("7", "boosting") == {3, 4}
    # the tag is part of the hash chain: the file verifies when opened again, and an edited tag does not
    again = PrivacyLedger.open(ledger.path, 3.0, 1e-5, state_dir=tmp_path / "heads")
    assert [e.get("release") for e in again.entries] == [tag, other, tag, tag]
    body = json.loads(ledger.path.read_text())
    body["entries"][0]["release"] = other
    ledger.path.write_text(json.dumps(body))
    with pytest.raises(LedgerError, match="entry 0 was edited"):
        PrivacyLedger.open(ledger.path, 3.0, 1e-5, state_dir=tmp_path / "heads")


def test_a_release_asked_again_in_the_same_run_is_the_same_numbers_charged_once(tmp_path):
    dp = dp_site(tmp_path)
    ctx = context()
    start_run(ctx, dp, PLAN)
    blocks = {"sums": Block(np.array([10.0, 20.0, 30.0]), scale=1.0)}
    release = PhaseRelease.for_phase(ctx, dp, "boosting", releases=3)
    first, _ = release.release(blocks, 0)
    spent = dp.ledger.spent()
    again, _ = PhaseRelease.for_phase(ctx, dp, "boosting", releases=3).release(blocks, 0)
    np.testing.assert_array_equal(first["sums"], again["sums"])
    assert dp.ledger.spent() == spent and len(dp.ledger.entries) == 1
    assert np.max(np.abs(first["sums"] - blocks["sums"].values)) > 0  # noised all the same
    # other values at the same place are another release: independent noise, charged
    changed = {"sums": Block(np.array([10.0, 20.0, 31.0]), scale=1.0)}
    other, _ = release.release(changed, 0)
    assert len(dp.ledger.entries) == 2 and dp.ledger.spent() > spent
    assert not np.allclose(other["sums"] - changed["sums"].values, first["sums"] - blocks["sums"].values)
    # the same values at another scale are another release too (the same draws would reveal the values)
    rescaled, _ = release.release({"sums": Block(np.array([10.0, 20.0, 30.0]), scale=2.0)}, 0)
    assert len(dp.ledger.entries) == 3
    assert not np.allclose((rescaled["sums"] - blocks["sums"].values) / 2, first["sums"] - blocks["sums"].values)
    # the next releases still fit: the ones charged twice are not counted against those left
    release.release(blocks, 1)
    release.release(blocks, 2)
    assert len(dp.ledger.entries) == 5


def test_the_release_key_stays_at_the_site_and_tags_say_nothing_without_it(tmp_path):
    dp = dp_site(tmp_path)
    key = release_key(dp.ledger)
    assert key == release_key(dp.ledger) and len(key) == 32
    assert (dp.ledger.path.parent / "release.key").stat().st_mode & 0o777 == 0o600
    values = {"w": np.ones(3)}
    assert release_tag(key, "7", "training", 1, values) == release_tag(key, "7", "training", 1, values)
    assert release_tag(key, "7", "training", 1, values) != release_tag(b"x" * 32, "7", "training", 1, values)
    assert release_tag(key, "7", "training", 1, values) != release_tag(key, "7", "training", 2, values)


def test_dp_sgd_takes_its_seed_from_the_sites_key_not_from_the_coordinator(tmp_path):
    """A DP-SGD round's batches and noise are seeded under the site's secret (the same round of the same run: the
    same seed, so a redone round trains the same weights), never by the seed in the coordinator's config, which
    would let the coordinator take the noise back out of the weights it receives."""
    from client.dp import training_seed

    ledger, other = dp_site(tmp_path).ledger, dp_site(tmp_path / "other").ledger
    seed = training_seed(ledger, "7", "training", 3)
    assert seed == training_seed(ledger, "7", "training", 3) and 0 <= seed < 2 ** 63
    assert len({seed, training_seed(ledger, "7", "training", 4), training_seed(ledger, "8", "training", 3),
                training_seed(ledger, "7", "personalisation", 3), training_seed(other, "7", "training", 3)}) == 5


def test_a_resumed_run_answers_as_the_run_it_continues_with_its_plan_from_the_sites_disk(tmp_path):
    dp = dp_site(tmp_path)
    folder = tmp_path / "site"
    original = context(run_id=41)
    budget = start_run(original, dp, PLAN)
    release = PhaseRelease.for_phase(original, dp, "statistics", releases=1)
    run_state.keep(original, folder)
    dp.ledger.record(1.5, 0.1, 30, run_id="41", server_round=1, phase="training")  # spent since the plan
    # the coordinator restarts: a new Flower run (another id, an empty node state) continuing run 41
    restarted = run_state.adopt(context(run_id=99), "41", folder)
    assert str(restarted.run_id) == "41"
    assert start_run(restarted, dp, PLAN).epsilon == budget.epsilon  # the plan of run 41, not a new split
    assert PhaseRelease.for_phase(restarted, dp, "statistics", releases=1).sigma == release.sigma
    # later messages of the new Flower run are answered as run 41 too
    later = Context(run_id=99, node_id=1, node_config={}, state=restarted.state, run_config={})
    assert str(run_state.run_context(later).run_id) == "41"
    # a new run (no resume) plans afresh from what is left
    assert start_run(context(run_id=100), dp, PLAN).epsilon != budget.epsilon


def test_simulate_resume_runs_the_stopped_experiments_own_options(tmp_path):
    from simulation.experiment import ExperimentConfig, ExperimentError

    cfg = ExperimentConfig(out=tmp_path, clinics=4, rounds=7, strategy="fedyogi", sites=[tmp_path / "a"],
                           task=tmp_path / "task.toml", attacks=["clinic_01:scale"])
    cfg.to_file()
    again = ExperimentConfig.resumed(tmp_path)
    assert again.resume and not cfg.resume
    assert dataclasses.replace(again, resume=False) == cfg
    assert again.run_settings(4, None).resume and not cfg.run_settings(4, None).resume
    with pytest.raises(ExperimentError, match="no experiment to resume"):
        ExperimentConfig.resumed(tmp_path / "elsewhere")
