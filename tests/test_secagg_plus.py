"""Secure aggregation with dropout recovery (shared.secagg_plus): exact sums, uniform masked inputs, sites lost
before and after sending recovered, and the refusals that keep a site's value hidden."""

import numpy as np
import pytest
from scipy import stats

from shared import secagg_plus as sp
from shared import wire_ints
from shared.hist_boosting import from_fixed, to_fixed


def setup(nodes, threshold, label="run/7", rng=None):
    entropy = None if rng is None else (lambda n: rng.bytes(n))
    sites = {node: sp.SecAggSite(node, label, *([entropy] if entropy else [])) for node in nodes}
    keys = {node: site.advertise() for node, site in sites.items()}
    roster = sp.Roster(label, threshold, {n: k[0] for n, k in keys.items()}, {n: k[1] for n, k in keys.items()})
    inboxes = sp.route_shares({node: site.share(roster) for node, site in sites.items()})
    return sites, roster, inboxes


def aggregate(values, threshold, drop_before=(), drop_after=(), bits=64, label="run/7"):
    """One aggregation in-process: sites in ``drop_before`` never send their input (they did share), sites in
    ``drop_after`` send it and are gone for the unmask round."""
    sites, roster, inboxes = setup(list(values), threshold, label)
    masked = {}
    for node, site in sites.items():
        site.receive(inboxes.get(node, {}))
        if node not in drop_before:
            masked[node] = site.masked_input(values[node], bits)
    dropped = [n for n in roster.nodes if n not in masked]
    answers = {node: site.unmask(sorted(masked), dropped) for node, site in sites.items()
               if node not in drop_before and node not in drop_after}
    return sp.unmask_sum(roster, masked, answers, bits), masked


def test_threshold_must_be_a_majority_and_at_least_two():
    sp.validate_threshold(3, 4)
    sp.validate_threshold(2, 3)
    for t, n in ((2, 4), (5, 4), (1, 1), (1, 2)):
        with pytest.raises(sp.ThresholdError):
            sp.validate_threshold(t, n)
    assert [sp.default_threshold(n) for n in (2, 3, 4, 10)] == [2, 2, 3, 6]


def test_shamir_halves_rebuild_a_32_byte_secret_from_any_threshold_shares_and_not_fewer():
    secret = bytes(range(32))
    shares = sp.split_secret(secret, 3, 5)
    assert sp.combine_secret({1: shares[0], 3: shares[2], 5: shares[4]}) == secret
    assert sp.combine_secret({2: shares[1], 3: shares[2], 4: shares[3]}) == secret
    assert sp.combine_secret({1: shares[0], 2: shares[1]}) != secret


@pytest.mark.parametrize("bits", [64, 40, 17])
def test_the_sum_is_exact_modulo_2_to_the_width_for_fixed_point_arrays(bits):
    rng = np.random.default_rng(bits)
    nodes = [3, 8, 11, 20, 21]
    floats = {n: rng.normal(0, 50.0, size=(6, 9)) if bits == 64 else None for n in nodes}
    if bits == 64:
        values = {n: to_fixed(v) for n, v in floats.items()}
    else:
        values = {n: rng.integers(-2 ** (bits - 4), 2 ** (bits - 4), size=(6, 9)) for n in nodes}
    total, masked = aggregate(values, threshold=3, bits=bits)
    expected = sum(values.values())
    assert np.array_equal(wire_ints.decode(total, bits, True), expected)
    assert all(m.max() < 2 ** bits for m in masked.values()) or bits == 64
    if bits == 64:
        assert np.abs(from_fixed(total.view(np.int64)) - sum(floats.values())).max() < 8 * 2.0 ** -32


def test_per_entry_widths_as_the_histogram_wire_uses_them():
    rng = np.random.default_rng(1)
    bits = rng.integers(8, 50, size=300)
    values = {n: rng.integers(0, 2 ** (bits - 3)) for n in (1, 2, 3)}
    total, _ = aggregate(values, threshold=2, bits=bits)
    assert np.array_equal(wire_ints.decode(total, bits, False), sum(values.values()))


def test_one_masked_input_is_uniform_whatever_the_value():
    """All zeros and all ones (20 bits) masked: both uniform on [0, 2^20) and alike. The sites' keys and seeds
    come from a seeded generator here, so the p-values are fixed numbers, not a chance of flaking."""
    n_words = 20000
    samples = {}
    rng = np.random.default_rng(2026)
    for fill in (0, 2 ** 20 - 1):
        sites, roster, inboxes = setup([1, 2, 3], 2, rng=rng)
        for node, site in sites.items():
            site.receive(inboxes[node])
        samples[fill] = sites[1].masked_input(np.full(n_words, fill, dtype=np.int64), 20)
    for words in samples.values():
        assert stats.kstest(words / 2.0 ** 20, "uniform").pvalue > 1e-3
        assert stats.chisquare(np.bincount(words >> np.uint64(12), minlength=256)).pvalue > 1e-3
    assert stats.ks_2samp(samples[0].astype(float), samples[2 ** 20 - 1].astype(float)).pvalue > 1e-3
    # the same tests tell structure from noise: values confined to the lower half of the range fail both
    plain = np.arange(n_words, dtype=np.uint64) % np.uint64(2 ** 19)
    assert stats.kstest(plain / 2.0 ** 20, "uniform").pvalue < 1e-6
    assert stats.ks_2samp(samples[0].astype(float), plain.astype(float)).pvalue < 1e-6


def test_a_site_dropped_after_sending_its_masked_input_is_recovered_and_counted():
    values = {n: np.full(50, n, dtype=np.int64) for n in (1, 2, 3, 4, 5)}
    total, _ = aggregate(values, threshold=3, drop_after=[4])
    assert np.array_equal(total.view(np.int64), np.full(50, 15))


def test_sites_dropped_before_sending_are_recovered_and_left_out_of_the_sum():
    values = {n: np.full(50, n, dtype=np.int64) for n in (1, 2, 3, 4, 5)}
    total, _ = aggregate(values, threshold=3, drop_before=[2, 5])
    assert np.array_equal(total.view(np.int64), np.full(50, 1 + 3 + 4))
    total, _ = aggregate(values, threshold=3, drop_before=[2], drop_after=[5])
    assert np.array_equal(total.view(np.int64), np.full(50, 1 + 3 + 4 + 5))


def test_more_sites_lost_than_the_threshold_allows_is_a_clear_error():
    values = {n: np.ones(4, dtype=np.int64) for n in (1, 2, 3, 4, 5)}
    with pytest.raises(sp.ThresholdError, match="fewer than the threshold 3"):
        aggregate(values, threshold=3, drop_before=[1], drop_after=[2, 3])
    with pytest.raises(sp.ThresholdError, match="tolerates at most 2 lost"):
        sites, roster, inboxes = setup([1, 2, 3, 4, 5], 3)
        masked = {}
        for node, site in sites.items():
            site.receive(inboxes[node])
            if node in (1, 2):
                masked[node] = site.masked_input(values[node])
        sp.unmask_sum(roster, masked, {})


def test_a_site_refuses_both_kinds_of_share_for_one_peer_and_the_mask_key_of_a_site_that_sent():
    sites, roster, inboxes = setup([1, 2, 3], 2)
    for node, site in sites.items():
        site.receive(inboxes[node])
    sites[1].masked_input(np.zeros(3, dtype=np.int64))
    with pytest.raises(sp.ShareRefused, match="both as sent and as dropped"):
        sites[2].unmask([1, 2, 3], [3])
    with pytest.raises(sp.ShareRefused, match="sent its masked input but is named dropped"):
        sites[1].unmask([2, 3], [1])
    answer = sites[2].unmask([1, 2], [3])
    assert set(answer.seeds) == {1, 2} and set(answer.mask_keys) == {3}
    with pytest.raises(sp.ShareRefused, match="already given"):  # a second question could ask for the other kind
        sites[2].unmask([1, 3], [2])


def test_a_site_refuses_to_mask_twice_under_one_aggregation():
    sites, roster, inboxes = setup([1, 2], 2)
    sites[1].receive(inboxes[1])
    sites[1].masked_input(np.zeros(3, dtype=np.int64))
    with pytest.raises(sp.SecAggError, match="already sent"):
        sites[1].masked_input(np.ones(3, dtype=np.int64))


def test_a_tampered_or_misrouted_share_ciphertext_is_rejected():
    sites, roster, inboxes = setup([1, 2, 3], 2)
    blob = bytearray(inboxes[2][1])
    blob[20] ^= 1
    with pytest.raises(sp.TamperedShare, match="does not authenticate"):
        sites[2].receive({1: bytes(blob)})
    with pytest.raises(sp.TamperedShare):  # site 1's share for site 3, handed to site 2
        sites[2].receive({1: inboxes[3][1]})
    with pytest.raises(sp.TamperedShare):  # site 1's share for site 2, claimed to come from site 3
        sites[2].receive({3: inboxes[2][1]})
    other_label, _, other_inboxes = setup([1, 2, 3], 2, label="run/8")
    with pytest.raises(sp.TamperedShare):  # a ciphertext bound to another label
        sites[2].receive({1: other_inboxes[2][1]})


def test_a_roster_that_alters_the_sites_own_keys_or_label_is_refused():
    site = sp.SecAggSite(1, "a")
    other = sp.SecAggSite(2, "a")
    good = sp.Roster("a", 2, {1: site.advertise()[0], 2: other.advertise()[0]},
                     {1: site.advertise()[1], 2: other.advertise()[1]})
    with pytest.raises(sp.SecAggError, match="own keys"):
        site.share(sp.Roster("a", 2, good.channel_keys, {1: other.advertise()[1], 2: other.advertise()[1]}))
    with pytest.raises(sp.SecAggError, match="label"):
        site.share(sp.Roster("b", 2, good.channel_keys, good.mask_keys))


def test_the_server_alone_cannot_unmask_one_site_from_its_masked_input():
    values = {n: np.full(8, 1000 * n, dtype=np.int64) for n in (1, 2, 3)}
    sites, roster, inboxes = setup(list(values), 2)
    for node, site in sites.items():
        site.receive(inboxes[node])
    masked = {n: sites[n].masked_input(values[n]) for n in values}
    answers = {n: sites[n].unmask(sorted(masked), []) for n in (2, 3)}
    # with every self-mask seed the server can remove the self-masks, but the pairwise masks stay on y_1
    seed = sp.combine_secret({roster.x_of(a): ans.seeds[1] for a, ans in answers.items()})
    unselfed = masked[1] - sp.self_mask(seed, roster.label, 8)
    assert not np.array_equal(unselfed.view(np.int64), values[1])
    assert np.array_equal(sp.unmask_sum(roster, masked, answers).view(np.int64), np.full(8, 6000))


def test_a_site_lost_in_the_share_round_is_left_out_of_the_masks_and_the_sum():
    values = {n: np.full(5, n, dtype=np.int64) for n in (1, 2, 3, 4)}
    sites, roster, inboxes = setup(list(values), 3)
    participants = [1, 2, 4]  # site 3's shares never reached the server
    masked = {}
    for node in participants:
        sites[node].receive({s: c for s, c in inboxes[node].items() if s in participants})
        masked[node] = sites[node].masked_input(values[node], participants=participants)
    answers = {n: sites[n].unmask(sorted(masked), []) for n in participants}
    total = sp.unmask_sum(roster, masked, answers, participants=participants)
    assert np.array_equal(total.view(np.int64), np.full(5, 7))


def test_a_site_kept_in_its_context_state_between_rounds_carries_on_exactly():
    from flwr.app import ConfigRecord

    values = {n: np.full(5, n, dtype=np.int64) for n in (1, 2, 3)}
    sites, roster, inboxes = setup(list(values), 2)
    masked = {}
    for node, site in sites.items():
        site.receive(inboxes[node])
        kept = sp.SecAggSite.from_state(dict(ConfigRecord(site.to_state())))
        masked[node] = kept.masked_input(values[node])
        sites[node] = sp.SecAggSite.from_state(dict(ConfigRecord(kept.to_state())))
    with pytest.raises(sp.SecAggError, match="already sent"):
        sites[1].masked_input(values[1])
    answers = {n: sites[n].unmask(sorted(masked), []) for n in (1, 2)}
    assert np.array_equal(sp.unmask_sum(roster, masked, answers).view(np.int64), np.full(5, 6))


def test_flower_node_ids_use_the_whole_unsigned_64_bit_range():
    nodes = [2 ** 64 - 5, 2 ** 63 + 1, 7]
    values = {n: np.full(3, k + 1, dtype=np.int64) for k, n in enumerate(nodes)}
    total, _ = aggregate(values, threshold=2, drop_before=[2 ** 63 + 1])
    assert np.array_equal(total.view(np.int64), np.full(3, 4))
