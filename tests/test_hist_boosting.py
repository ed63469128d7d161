"""Histogram boosting: global bins, fixed-point histograms, XGBoost's gain, the pooled learner, the export."""

import json

import numpy as np
import pytest
import xgboost as xgb

from shared import hist_boosting as hb
from shared.hist_learner import HistGradientBoosting, pooled_thresholds
from shared.hist_records import thresholds_from_record, thresholds_record, trees_from_record, trees_record

OBJECTIVE_BASE = {"binary:logistic": 0.5, "reg:squarederror": 0.0, "multi:softprob": 0.5}


def table(n=120, seed=0):
    """Continuous features with one 0/1 column, and binary, 3-class and continuous labels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    x[:, 3] = rng.integers(0, 2, n)
    labels = {
        "binary:logistic": ((x[:, 0] + 0.5 * x[:, 1] ** 2 + rng.normal(0, 0.5, n)) > 0.5).astype(float),
        "multi:softprob": np.digitize(x[:, 0] + x[:, 2], [-0.5, 0.5]).astype(float),
        "reg:squarederror": 2 * x[:, 0] + np.sin(x[:, 1]) + rng.normal(0, 0.1, n),
    }
    return x, labels


def xgboost_reference(x, y, objective, rounds, **extra):
    params = {"objective": objective, "base_score": OBJECTIVE_BASE[objective], "eta": 0.1, "max_depth": 3,
              "lambda": 1.0, "min_child_weight": 1.0, "tree_method": "hist", "nthread": 1, **extra}
    return xgb.train(params, xgb.DMatrix(x, label=y), rounds)


# -- bins ------------------------------------------------------------------------------------------------


def test_summed_site_grid_counts_equal_the_pooled_grid_counts():
    x, _ = table()
    lo, hi = x.min(axis=0).astype(float), x.max(axis=0).astype(float)
    sites = np.array_split(x, 3)
    assert np.array_equal(sum(hb.grid_counts(s, lo, hi) for s in sites), hb.grid_counts(x, lo, hi))
    assert hb.grid_counts(x, lo, hi).sum(axis=1).tolist() == [len(x)] * x.shape[1]


def test_few_distinct_values_each_get_their_own_bin_and_bins_follow_xgboosts_split_rule():
    x, _ = table()
    thresholds = pooled_thresholds(x)
    bins = hb.bin_rows(x, thresholds)
    assert len(thresholds[3]) == 1 and 0.0 < thresholds[3][0] <= 1.0  # the 0/1 column: two bins
    for f in (0, 1, 2, 4):  # 120 distinct continuous values: (almost) 120 bins
        assert len(np.unique(bins[:, f])) >= 118
        for t, threshold in enumerate(thresholds[f]):
            assert np.array_equal(bins[:, f] <= t, x[:, f] < threshold)


def test_many_distinct_values_are_cut_into_max_bin_bins_of_similar_counts():
    x = np.random.default_rng(1).normal(size=(5000, 1)).astype(np.float32)
    thresholds = pooled_thresholds(x, max_bin=16)
    counts = np.bincount(hb.bin_rows(x, thresholds)[:, 0])
    assert len(counts) == 16
    assert counts.min() > 5000 / 16 * 0.7 and counts.max() < 5000 / 16 * 1.3


def test_a_constant_feature_has_one_bin():
    x = np.ones((10, 1), dtype=np.float32)
    assert len(pooled_thresholds(x)[0]) == 0
    assert hb.bin_rows(x, pooled_thresholds(x)).max() == 0


def federated_thresholds(sites, max_bin=hb.MAX_BIN):
    """What the server cuts from the sites' summed grid and cell counts (the protocol without Flower)."""
    lo = np.min([s.min(axis=0) for s in sites], axis=0).astype(float)
    hi = np.max([s.max(axis=0) for s in sites], axis=0).astype(float)
    grid = sum(hb.grid_counts(s, lo, hi) for s in sites)
    asked = []

    def summed_cell_counts(bounds):
        asked.append(bounds)
        per_site = [hb.cell_counts(s, bounds) for s in sites]
        return [sum(counts[f] for counts in per_site) for f in range(len(bounds))]

    return hb.global_thresholds(grid, lo, hi, summed_cell_counts, max_bin), asked


def skewed_column(n=60, seed=4):
    """A feature like the liposome table's worst: ~46 distinct values, most near 0, a few far out."""
    rng = np.random.default_rng(seed)
    values = np.unique(np.concatenate([np.round(rng.exponential(0.02, 42), 4), [3.0, 40.0, 350.0, 1000.0]]))
    return np.concatenate([values, rng.choice(values, n - len(values))]).astype(np.float32)[:, None]


def test_a_skewed_feature_gets_one_bin_per_distinct_value_after_refinement_like_xgboost():
    x = skewed_column()
    lo, hi = x.min(axis=0).astype(float), x.max(axis=0).astype(float)
    grid_only = hb.thresholds_from_counts(hb.grid_counts(x, lo, hi), lo, hi)[0]
    refined = pooled_thresholds(x)[0]
    distinct = np.unique(x[:, 0])
    assert len(grid_only) + 1 < len(distinct) - 10  # the uniform grid merges the crowded small values
    assert len(refined) + 1 == len(distinct)
    bins = hb.bin_rows(x, [refined])[:, 0]
    assert np.array_equal(bins, np.searchsorted(distinct, x[:, 0]))  # bin = rank of the value, as in XGBoost


def test_every_site_gets_the_same_edges_and_they_equal_the_pooled_edges_of_the_union():
    x = np.column_stack([skewed_column(90)[:, 0], table(90)[0][:, :3]])
    sites = [x[:20], x[20:55], x[55:]]
    federated, asked = federated_thresholds(sites)
    pooled = pooled_thresholds(x)
    assert 1 <= len(asked) <= hb.REFINE_PASSES  # the refinement passes were used, and no more than allowed
    for ours, theirs in zip(federated, pooled, strict=True):
        assert ours.dtype == np.float32 and np.array_equal(ours, theirs)
    site_bins = np.concatenate([hb.bin_rows(s, federated) for s in sites])
    assert np.array_equal(site_bins, hb.bin_rows(x, pooled))


def test_quantile_edges_of_many_values_are_within_the_sketchs_stated_rank_error():
    rng = np.random.default_rng(7)
    x = rng.lognormal(0, 2, (8000, 1)).astype(np.float32)  # skewed: most rows in the first grid cells
    sites, max_bin = np.array_split(x, 4), 32
    thresholds, _ = federated_thresholds(sites, max_bin)
    lo, hi = x.min(axis=0).astype(float), x.max(axis=0).astype(float)
    cells = hb.global_cells(hb.grid_counts(x, lo, hi), lo, hi, lambda b: hb.cell_counts(x, b), max_bin)[0]
    error = cells.counts.max()  # the stated bound: the largest final cell
    assert error <= len(x) / max_bin  # refined until no cell holds a quantile step; the first grid did not:
    assert hb.grid_counts(x, lo, hi).max() > len(x) / max_bin
    below = np.searchsorted(np.sort(x[:, 0]), thresholds[0], side="left")  # rows below each edge
    targets = np.arange(1, max_bin) * len(x) / max_bin
    assert len(thresholds[0]) == max_bin - 1
    assert np.all((below >= targets) & (below < targets + error))
    exact = np.quantile(x[:, 0], np.arange(1, max_bin) / max_bin, method="inverted_cdf")  # pooled quantiles
    assert np.all(np.abs(below - np.searchsorted(np.sort(x[:, 0]), exact, side="left")) <= error)


# -- histograms and splits -------------------------------------------------------------------------------


def test_fixed_point_histograms_of_site_parts_sum_to_the_pooled_histogram_exactly():
    x, labels = table()
    thresholds = pooled_thresholds(x)
    bins = hb.bin_rows(x, thresholds)
    g, h = hb.gradients("binary:logistic", labels["binary:logistic"], np.zeros((len(x), 1)))
    positions = np.zeros((1, len(x)), dtype=np.int64)
    pooled = hb.level_histograms(bins, positions, [(0, 0)], g, h, hb.n_bins(thresholds), hb.SCALE_BITS)
    parts = [slice(0, 7), slice(7, 80), slice(80, 120)]
    summed = sum(hb.level_histograms(bins[p], positions[:, p], [(0, 0)], g[p], h[p], hb.n_bins(thresholds),
                                     hb.SCALE_BITS)
                 for p in parts)
    assert np.array_equal(summed, pooled)
    assert hb.node_totals(pooled[0], hb.SCALE_BITS) == pytest.approx((g.sum(), h.sum()), abs=1e-7)


def test_the_servers_derived_sibling_histogram_equals_the_one_the_sites_would_send():
    x, labels = table()
    thresholds = pooled_thresholds(x)
    bins, width = hb.bin_rows(x, thresholds), hb.n_bins(thresholds)
    g, h = hb.gradients("binary:logistic", labels["binary:logistic"], np.zeros((len(x), 1)))
    sites = [slice(0, 30), slice(30, 75), slice(75, 120)]

    def summed(nodes, trees):  # what the server gets: the sum of the sites' histograms of ``nodes``
        positions = hb.frontier_positions(trees, bins)
        return sum(hb.level_histograms(bins[s], positions[:, s], nodes, g[s], h[s], width, hb.SCALE_BITS)
                   for s in sites)

    grower = hb.LevelGrower(1, thresholds, hb.TreeParams(max_depth=3))
    levels = 0
    while not grower.done:
        requested = grower.requested
        assert len(requested) == (1 if grower.depth == 0 else len(grower.frontier) // 2)
        sent = summed(requested, grower.trees)
        if grower.depth > 0:
            derived = grower.frontier_histograms(sent)
            assert all(np.array_equal(d, a) for d, a in zip(derived, summed(grower.frontier, grower.trees),
                                                            strict=True))
        grower.grow(sent)
        levels += 1
    assert levels == 3  # depth 3: the deepest level's leaves are summed from their parents, never asked for
    pooled = HistGradientBoosting(n_estimators=1, max_depth=3).fit(x, labels["binary:logistic"], thresholds)
    assert grower.trees[0].leaf_value == pooled.rounds_[0][0].leaf_value


def test_packed_histograms_drop_only_the_padding_bins():
    x, labels = table()
    thresholds = pooled_thresholds(x)
    bins = hb.bin_rows(x, thresholds)
    g, h = hb.gradients("binary:logistic", labels["binary:logistic"], np.zeros((len(x), 1)))
    full = hb.level_histograms(bins, np.zeros((1, len(x)), np.int64), [(0, 0)], g, h, hb.n_bins(thresholds),
                                 hb.SCALE_BITS)
    widths = hb.feature_widths(thresholds)
    packed = hb.pack_histograms(full, widths)
    assert packed.shape == (1, widths.sum(), 2) and widths[3] == 2  # the 0/1 column sends 2 bins, not ~120
    assert np.array_equal(hb.unpack_histograms(packed, widths), full)


def test_best_split_uses_xgboosts_gain_and_respects_min_child_weight():
    # One feature, 3 bins: G per bin (-4, 1, 3), H per bin (2, 2, 2); λ = 1.
    histogram = hb.to_fixed(np.array([[[-4.0, 2.0], [1.0, 2.0], [3.0, 2.0]]]), hb.SCALE_BITS)
    split = hb.best_split(histogram, hb.TreeParams(reg_lambda=1.0))
    assert (split.feature, split.split_bin) == (0, 0)
    assert split.gain == pytest.approx(16 / 3 + 16 / 5 - 0 / 7)
    assert hb.best_split(histogram, hb.TreeParams(min_child_weight=3.0)).feature == hb.LEAF
    assert hb.leaf_weight(-4.0, 2.0, hb.TreeParams(reg_lambda=1.0)) == pytest.approx(4 / 3)


def test_with_noised_totals_a_split_never_falls_after_a_features_last_bin():
    # feature 0: 3 bins; feature 1: 2 bins (padded to 3). DP noise made feature 1's totals differ from feature 0's
    # (G 0 vs −9, H 6 vs 3): read off feature 0, "right of feature 1's last bin" looks like a child with G 9, H 3.
    histogram = hb.to_fixed(np.array([[[-4.0, 2.0], [1.0, 2.0], [3.0, 2.0]],
                                      [[-5.0, 1.5], [-4.0, 1.5], [0.0, 0.0]]]), hb.SCALE_BITS)
    params = hb.TreeParams(reg_lambda=1.0)
    unguarded = hb.best_split(histogram, params)
    assert (unguarded.feature, unguarded.split_bin) == (1, 1)  # past feature 1's one threshold: no such split
    guarded = hb.best_split(histogram, params, np.array([3, 2]))
    assert (guarded.feature, guarded.split_bin) == (1, 0)  # feature 1's one real boundary
    exact = hb.to_fixed(np.array([[[-4.0, 2.0], [1.0, 2.0], [3.0, 2.0]], [[-3.0, 4.0], [3.0, 2.0], [0.0, 0.0]]]),
                        hb.SCALE_BITS)  # exact sums: every feature's totals agree, the guard changes nothing
    assert hb.best_split(exact, params) == hb.best_split(exact, params, np.array([3, 2]))


def test_gamma_prunes_splits_whose_gain_is_below_it():
    x, labels = table()
    y = labels["binary:logistic"]
    free = HistGradientBoosting(n_estimators=1, max_depth=3).fit(x, y).rounds_[0][0]
    pruned = HistGradientBoosting(n_estimators=1, max_depth=3, gamma=5.0).fit(x, y).rounds_[0][0]
    gains = [g for g, f in zip(free.gain, free.feature, strict=True) if f != hb.LEAF]
    kept = [g for g, f in zip(pruned.gain, pruned.feature, strict=True) if f != hb.LEAF]
    assert min(gains) < 5.0 and len(kept) < len(gains)


# -- the pooled learner against XGBoost ------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["binary:logistic", "reg:squarederror"])
def test_pooled_learner_grows_xgboosts_trees_when_every_value_has_its_own_bin(objective):
    x, labels = table()
    model = HistGradientBoosting(objective=objective, n_estimators=10, max_depth=3,  # XGBoost sums floats: 2^32
                                 base_score=OBJECTIVE_BASE[objective], scale_bits=32).fit(x, labels[objective])
    reference = xgboost_reference(x, labels[objective], objective, 10)
    ours = model.predict_proba(x)[:, 1] if objective == "binary:logistic" else model.predict(x)
    assert np.abs(ours - reference.predict(xgb.DMatrix(x))).max() < 1e-5


def test_softmax_learner_is_close_to_xgboost_and_as_accurate():
    x, labels = table()
    y = labels["multi:softprob"]
    model = HistGradientBoosting(objective="multi:softprob", n_estimators=10, max_depth=3).fit(x, y)
    reference = xgboost_reference(x, y, "multi:softprob", 10, num_class=3).predict(xgb.DMatrix(x))
    assert np.abs(model.predict_proba(x) - reference).max() < 0.05
    assert np.mean(model.predict(x) == y) == pytest.approx(np.mean(reference.argmax(axis=1) == y), abs=0.02)


# -- export ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["binary:logistic", "reg:squarederror", "multi:softprob"])
def test_exported_model_loads_in_xgboost_and_predicts_what_the_learner_predicts(objective):
    x, labels = table(seed=3)
    model = HistGradientBoosting(objective=objective, n_estimators=6, max_depth=3,
                                 base_score=OBJECTIVE_BASE[objective]).fit(x, labels[objective])
    booster = xgb.Booster(model_file=bytearray(model.to_xgboost_json()))
    theirs = booster.predict(xgb.DMatrix(x))
    ours = {"binary:logistic": lambda: model.predict_proba(x)[:, 1], "reg:squarederror": lambda: model.predict(x),
            "multi:softprob": lambda: model.predict_proba(x)}[objective]()
    assert np.abs(theirs - ours).max() < 1e-5
    assert booster.num_boosted_rounds() == 6
    gain = booster.get_score(importance_type="gain")
    used = {f for trees in model.rounds_ for t in trees for f in t.feature if f != hb.LEAF}
    assert set(gain) == {f"f{f}" for f in used} and all(v > 0 for v in gain.values())


def test_export_drops_pruned_nodes():
    x, labels = table()
    model = HistGradientBoosting(n_estimators=2, max_depth=3, gamma=5.0).fit(x, labels["binary:logistic"])
    trees = json.loads(model.to_xgboost_json())["learner"]["gradient_booster"]["model"]["trees"]
    for tree, ours in zip(trees, [r[0] for r in model.rounds_], strict=True):
        assert int(tree["tree_param"]["num_nodes"]) < ours.n_nodes or all(f != hb.LEAF for f in ours.feature[:1])
        assert all(c < len(tree["left_children"]) for c in tree["left_children"])


# -- records and input errors ----------------------------------------------------------------------------


def test_trees_and_thresholds_survive_the_record_round_trip():
    x, labels = table()
    model = HistGradientBoosting(n_estimators=2, max_depth=2).fit(x, labels["binary:logistic"])
    trees = [t for r in model.rounds_ for t in r]
    back = trees_from_record(trees_record(trees, "model"), "model")
    bins = hb.bin_rows(x, model.thresholds_)
    for ours, theirs in zip(trees, back, strict=True):
        assert np.array_equal(ours.predict_bins(bins), theirs.predict_bins(bins))
    restored = thresholds_from_record(thresholds_record(model.thresholds_))
    assert all(np.array_equal(a, b) for a, b in zip(restored, model.thresholds_, strict=True))


def test_a_missing_value_is_rejected_naming_the_row():
    x, labels = table()
    x[17, 2] = np.nan
    with pytest.raises(ValueError, match="row 17"):
        HistGradientBoosting().fit(x, labels["binary:logistic"])


def test_an_unknown_objective_is_rejected_naming_the_choices():
    x, labels = table()
    with pytest.raises(ValueError, match="binary:logistic, reg:squarederror, multi:softprob"):
        HistGradientBoosting(objective="rank:pairwise").fit(x, labels["binary:logistic"])


# -- differential privacy at the site --------------------------------------------------------------------


def test_a_dp_release_is_charged_to_the_sites_ledger_and_noised_at_the_calibrated_scale(tmp_path):
    from flwr.app import Array, ArrayRecord, Context, RecordDict

    from client.dp import Block, PhaseRelease, SiteDP
    from client.hist_handlers import bin_counts
    from client.ledger import PrivacyLedger

    site = SiteDP(PrivacyLedger.open(tmp_path / "ledger.json", 3.0, 1e-5), {"boosting": 1 / 3})
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    release = PhaseRelease.for_phase(context, site, "boosting", releases=10)
    assert release.sigma > 1.0
    x, _ = table()
    arrays = ArrayRecord({"lo": Array(x.min(axis=0).astype(float)), "hi": Array(x.max(axis=0).astype(float))})
    exact = bin_counts(x, arrays)
    noisy, facts = release.release({"counts": Block(exact, 1.0, x.shape[1])}, index=0)
    assert len(site.ledger.history) == 1 and 0 < site.ledger.spent() < 1.0  # one of the ten planned releases
    assert facts.phase == "boosting" and site.ledger.entries[0]["phase"] == "boosting"
    expected_sd = release.sigma * np.sqrt(x.shape[1])  # one row touches one cell per feature
    assert np.std(noisy["counts"] - exact) == pytest.approx(expected_sd, rel=0.05)
    assert facts.noise_sd == pytest.approx(expected_sd)
