"""Pairwise-masked secure summation: exact sums, and one site's masked array looks like uniform noise."""

import numpy as np
import pytest
from scipy import stats

from shared import secure_sum as ss
from shared.hist_boosting import from_fixed, to_fixed


def exchange(n_sites):
    keys = {node: ss.new_private_key() for node in range(10, 10 + n_sites)}
    return keys, {node: ss.public_key(k) for node, k in keys.items()}


def test_both_sites_of_a_pair_derive_the_same_mask_key_and_strangers_do_not():
    keys, public = exchange(3)
    assert ss.pair_key(keys[10], public[11]) == ss.pair_key(keys[11], public[10])
    assert ss.pair_key(keys[10], public[11]) != ss.pair_key(keys[10], public[12])


def test_masked_sum_equals_plain_sum_to_fixed_point_precision():
    rng = np.random.default_rng(0)
    keys, public = exchange(4)
    values = {node: rng.normal(0, 50, size=(3, 7, 2)) for node in keys}
    masked = [ss.mask(to_fixed(v), keys[node], node, public, "run/1/level/0") for node, v in values.items()]
    total = from_fixed(ss.unmask_sum(masked))
    assert np.array_equal(ss.unmask_sum(masked), sum(to_fixed(v) for v in values.values()))
    assert np.abs(total - sum(values.values())).max() < 4 * 2.0 ** -32


def test_one_sites_masked_histogram_is_indistinguishable_from_uniform_noise():
    keys, public = exchange(3)
    histogram = np.zeros(4000, dtype=np.int64)
    histogram[:40] = to_fixed(np.arange(40.0))  # a very structured array: mostly zeros, then a ramp
    masked = ss.mask(histogram, keys[10], 10, public, "label-7")
    unit = masked.astype(np.float64) / 2.0 ** 64
    assert stats.kstest(unit, "uniform").pvalue > 0.01
    top_bytes = (masked >> np.uint64(56)).astype(int)
    assert stats.chisquare(np.bincount(top_bytes, minlength=256)).pvalue > 0.01
    # The unmasked words fail the same test badly: the test can tell structure from noise.
    assert stats.kstest(histogram.view(np.uint64).astype(np.float64) / 2.0 ** 64, "uniform").pvalue < 1e-6


def test_masks_differ_between_labels_so_two_releases_do_not_share_a_pad():
    keys, public = exchange(2)
    zeros = np.zeros(64, dtype=np.int64)
    assert not np.array_equal(ss.mask(zeros, keys[10], 10, public, "a"), ss.mask(zeros, keys[10], 10, public, "b"))


def test_a_missing_site_leaves_the_sum_masked():
    keys, public = exchange(3)
    masked = [ss.mask(np.ones(100, np.int64), keys[n], n, public, "x") for n in (10, 11)]
    assert not np.array_equal(ss.unmask_sum(masked), np.full(100, 2))


def test_a_lone_site_refuses_to_mask():
    keys, public = exchange(1)
    with pytest.raises(ss.SecureSumError, match="at least 2 sites"):
        ss.mask(np.ones(3, np.int64), keys[10], 10, public, "x")


def test_a_large_session_masks_with_k_neighbours_on_a_symmetric_ring_and_a_small_one_with_everyone():
    nodes = list(range(100, 140))
    peers = {n: ss.mask_peers(nodes, n, "session-3", degree=6) for n in nodes}
    assert all(len(p) == 6 and n not in p for n, p in peers.items())
    assert all(i in peers[j] for i in nodes for j in peers[i])  # symmetric: every mask cancels in the sum
    assert peers != {n: ss.mask_peers(nodes, n, "session-4", degree=6) for n in nodes}  # a session's own ring
    assert ss.mask_peers(nodes[:7], 100, "session-3", degree=6) == nodes[1:7]  # ≤ k + 1 sites: the complete graph
    assert len(ss.mask_peers(list(range(1000)), 5, "s")) == ss.PAIRWISE_DEGREE
    with pytest.raises(ss.SecureSumError):
        ss.mask_peers(nodes, 7, "session-3")
    with pytest.raises(ValueError):
        ss.mask_peers(nodes, 100, "session-3", degree=5)


def test_sparse_masks_sum_exactly_and_hide_each_site():
    rng = np.random.default_rng(3)
    keys, public = exchange(40)
    values = {node: rng.normal(0, 50, size=64) for node in keys}
    masked = {}
    for node, v in values.items():
        mine = {n: public[n] for n in ss.mask_peers(list(public), node, "s-1", degree=4)} | {node: public[node]}
        masked[node] = ss.mask(to_fixed(v), keys[node], node, mine, "s-1/1")
    assert np.array_equal(ss.unmask_sum(list(masked.values())), sum(to_fixed(v) for v in values.values()))
    assert not np.array_equal(ss.unmask_sum([masked[n] for n in list(masked)[:39]]),
                              sum(to_fixed(values[n]) for n in list(values)[:39]))  # a site's masks stay in a part
    histogram = np.zeros(4000, dtype=np.int64)
    mine = {n: public[n] for n in ss.mask_peers(list(public), 10, "s-1", degree=4)} | {10: public[10]}
    unit = ss.mask(histogram, keys[10], 10, mine, "s-1/2").astype(np.float64) / 2.0 ** 64
    assert stats.kstest(unit, "uniform").pvalue > 0.01


def test_a_site_masks_with_its_neighbours_only_in_a_session_of_more_than_k_plus_one_sites(monkeypatch):
    from flwr.app import ConfigRecord, Context, RecordDict

    from client import secure_aggregation as sa
    from shared.protocol import hist as h

    keys, public = exchange(40)
    seen = {}

    def spy(values, private_key, own_id, peers, label, bits=64):
        seen[own_id] = sorted(peers)
        return np.zeros_like(values).view(np.uint64)

    monkeypatch.setattr(sa.secure_sum, "mask", spy)

    def context(node):
        state = ConfigRecord({"session": "run-9", "last-sequence": 0, "private-key": keys[node]})
        return Context(run_id=1, node_id=node, node_config={}, state=RecordDict({sa.PAIRWISE_STATE_KEY: state}),
                       run_config={})

    def request(peers):
        return ConfigRecord({h.SECURE_SESSION: "run-9", h.SECURE_SEQUENCE: 1, h.SECURE_NODES: list(public),
                             h.SECURE_PEERS: list(peers), h.SECURE_KEYS: [public[p] for p in peers]})

    for node in (10, 31):
        ring = ss.mask_peers(list(public), node, "run-9")
        sa.pairwise_mask(np.zeros(3, dtype=np.int64), request(ring), context(node), 64)
        assert seen[node] == ring
    assert len(seen[10]) == ss.PAIRWISE_DEGREE
    # keys of other sites than the graph's (all of them, or one swapped) are refused, nothing is masked
    ring = ss.mask_peers(list(public), 10, "run-9")
    outsider = next(n for n in public if n not in ring and n != 10)
    for peers in ([n for n in public if n != 10], [*ring[:-1], outsider]):
        seen.clear()
        with pytest.raises(ss.SecureSumError, match="not of this site's 26 mask peers"):
            sa.pairwise_mask(np.zeros(3, dtype=np.int64), request(peers), context(10), 64)
        assert not seen


def test_the_server_sends_each_site_only_its_mask_peers_keys(monkeypatch):
    """At 1,000 sites a request carried 999 public keys (32 kB) to every site; now the site's 26 peers'."""
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, ConfigRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from server.secure_aggregation import SecureSession
    from shared.protocol import hist as h
    from shared.protocol import records as r

    _, public = exchange(40)
    sent = []

    class Grid:
        def send_and_receive(self, messages):
            sent.extend(messages)
            return [SimpleNamespace(metadata=SimpleNamespace(src_node_id=m.metadata.dst_node_id),
                                    has_error=lambda: False,
                                    content=RecordDict({r.KEYS: ConfigRecord({h.PUBLIC_KEY: public[
                                        m.metadata.dst_node_id]})})) for m in messages]

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # what Message() needs, as a ServerApp
        monkeypatch.setattr(TaskIdentity, name, value)
    session = SecureSession(Grid(), list(public), "pairwise")
    session.exchange_keys()
    sent.clear()
    session.ask_all(session.keys_message, {}, ArrayRecord())
    assert len(sent) == 40
    for message in sent:
        config = message.content[r.CONFIG]
        node = message.metadata.dst_node_id
        ring = ss.mask_peers(list(public), node, session.base[h.SECURE_SESSION])
        assert list(config[h.SECURE_PEERS]) == ring and len(ring) == ss.PAIRWISE_DEGREE
        assert [bytes(k) for k in config[h.SECURE_KEYS]] == [public[p] for p in ring]
        assert list(config[h.SECURE_NODES]) == list(public)  # the roster, so the site can check its ring
        own = session.release_config(session.open_release({}), node)
        assert list(own[h.SECURE_PEERS]) == ring


def test_the_whole_graph_from_one_ring_equals_each_sites_own_peers():
    for n_sites in (10, 40):
        nodes = list(range(100, 100 + n_sites))
        graph = ss.mask_graph(nodes, "run-3")
        assert graph == {node: ss.mask_peers(nodes, node, "run-3") for node in nodes}
        assert all(node in graph[peer] for node, peers in graph.items() for peer in peers)  # symmetric
