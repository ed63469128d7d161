"""Federated histogram boosting at each fixed-point scale (``TreeParams.scale_bits``): bytes per tree and accuracy.

    python benchmarks/federated_hist_scale.py [--clinics 3] [--rounds 10] [--scales 32,24,20,16,12,10,8]

The scale is a parameter of the algorithm (every row's g and h summed as ``round(v · 2^scale_bits)``): the
federation and the pooled reference learner (``shared.hist_learner``) at the same scale grow the same trees bit
for bit (tests/test_hist_wire.py, tests/test_federated_hist.py), while every summed entry on the wire is
(32 − scale_bits) bits narrower. What a coarser scale may cost is accuracy, measured here against 2^32:

1. Simulator: one federated hist run per scale (``fednano simulate``-equivalent, XGBoost only, secure sum on,
   no DP): kB per tree (counted on its messages), the run's overall metrics, and the metrics on all sites' test
   rows pooled with the paired bootstrap SD (over those rows, ``--bootstrap`` resamples) of each metric's
   difference from the 2^32 run's, and the plain bootstrap SD of the 2^32 metric itself.
2. Liposome (Yanes et al. 2025, the paper's 5 folds): the pooled reference learner, one-vs-rest, 30 trees per
   class, on each training fold (encoder fit on it, bins as a federation cuts them); balanced accuracy per fold,
   and the paired bootstrap SD over the 77 out-of-fold predictions.

Prints tables and writes ``benchmarks/results/federated_hist_scale.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from hist_grid import InProcessHistGrid
from record import write_record
from sklearn.metrics import balanced_accuracy_score, r2_score, roc_auc_score

from simulation.experiment import ExperimentConfig

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"response": roc_auc_score, "toxicity_grade3": roc_auc_score, "efficacy_pct": r2_score}


def simulator_sites(args, tmp: Path) -> dict[int, object]:
    """The simulated clinics of ``fednano simulate --clinics N --seed 0`` (generated once, shared by every scale)."""
    from shared.validation import load_site
    from simulation.experiment import prepare_sites

    cfg = ExperimentConfig(out=tmp / "world", clinics=args.clinics, dp=False, seed=0, models="xgboost",
                           boosting="hist", xgb_rounds=args.rounds, compare=False)
    cfg.out.mkdir(parents=True, exist_ok=True)
    sources, _ = prepare_sites(cfg)
    return {100 + i: load_site(source.path) for i, source in enumerate(sources)}


def simulator_run(args, sites: dict[int, object], scale: int
                  ) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """One federated hist run at ``scale`` (the real server phase over the real site handlers, secure sum on):
    its figures, and (labels, predictions) on all sites' test rows pooled."""
    from flwr.supercore.task_identity import TaskIdentity

    from client.split import split_site
    from server import hist_phase as hp
    from server.boosting_phase import boosting_round
    from server.settings import RunSettings
    from shared.boosting import predict_heads
    from shared.encoding import FeatureEncoder, SiteStatistics, combine
    from shared.task import NANOPARTICLE_TASK
    from shared.xgboost_json import export_model

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # what Message() needs, as a ServerApp
        setattr(TaskIdentity, name, value)
    settings = RunSettings(seed=0, split_seed=0, boosting="hist", xgb_rounds=args.rounds, xgb_scale_bits=scale)
    splits = {node: split_site(site.episodes, NANOPARTICLE_TASK, 0) for node, site in sites.items()}
    encoder = FeatureEncoder(NANOPARTICLE_TASK).fit_statistics(
        combine([SiteStatistics.from_frame(parts["train"], NANOPARTICLE_TASK) for parts in splits.values()]))
    hist = hp.HistSettings.from_run_settings(settings)
    specs = hp.head_specs(encoder, False)
    start = time.perf_counter()
    session = hp.HistSession(InProcessHistGrid(sites), list(sites), boosting_round(settings).to_config(encoder), hist,
                             len(specs))
    lo, hi = hp.global_ranges(session, {})
    session.exchange_keys()
    thresholds = hp.global_thresholds(session, lo, hi)
    models, trees = {}, 0
    failures: dict[int, str] = {}
    grown = hp.grow_all_heads(session, specs, thresholds, hist, failures)
    if failures:
        raise RuntimeError(f"the hist phase failed: {failures}")
    for spec in specs:
        rounds = grown[spec.key]
        trees += sum(len(t) for t in rounds)
        models[spec.key] = export_model(rounds, spec.objective, spec.base_score, encoder.n_features_out_)
    seconds = time.perf_counter() - start
    test = pd.concat([parts["test"] for parts in splits.values()], ignore_index=True)
    predicted = predict_heads(models, encoder, encoder.transform(test))
    pairs = {}
    for outcome in METRICS:
        y, p = test[outcome].to_numpy(dtype=float), np.asarray(predicted[outcome], dtype=float)
        if outcome == "efficacy_pct":
            p = encoder.decode_regression(outcome, p)
        keep = np.isfinite(y)
        pairs[outcome] = (y[keep], p[keep])
    figures = {"bytes_per_tree": (session.bytes_down + session.bytes_up) / max(trees, 1),
               "bytes_down": session.bytes_down, "bytes_up": session.bytes_up, "trees": trees,
               "boosting_phase_s": seconds, "test_rows": {o: len(pairs[o][0]) for o in METRICS},
               "pooled_test_rows": {o: float(METRICS[o](*pairs[o])) for o in METRICS}}
    return figures, pairs


def paired_sd(metric, y: np.ndarray, p: np.ndarray, p_ref: np.ndarray, resamples: int, seed: int = 0
              ) -> tuple[float, float]:
    """Bootstrap SD over rows of metric(y, p) − metric(y, p_ref) (paired: the same rows), and of metric(y, p_ref)."""
    rng = np.random.default_rng(seed)
    diffs, refs = [], []
    for _ in range(resamples):
        idx = rng.integers(0, len(y), len(y))
        if metric is roc_auc_score and len(np.unique(y[idx])) < 2:
            continue
        ref = metric(y[idx], p_ref[idx])
        diffs.append(metric(y[idx], p[idx]) - ref)
        refs.append(ref)
    return float(np.std(diffs, ddof=1)), float(np.std(refs, ddof=1))


def liposome_predictions(scale: int, trees: int) -> tuple[list[float], np.ndarray, np.ndarray]:
    """Balanced accuracy per fold of the pooled hist learner at ``scale``, and all out-of-fold labels / predictions."""
    from client.split import encode
    from shared.boosting import BASE_SCORES, head_labels, heads
    from shared.encoding import fit_local
    from shared.hist_learner import HistGradientBoosting
    from shared.task import TaskSpec
    from simulation import paper_liposome as pl

    table = pl.load_table()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "task.toml"
        path.write_text(pl.task_toml_text())
        task = TaskSpec.from_toml(path)
    frame = table.assign(split="train")
    per_fold, labels, preds = [], [], []
    for train_idx, test_idx in pl.folds(table):
        train_rows, test_rows = frame.iloc[train_idx], frame.iloc[test_idx]
        encoder = fit_local(train_rows, task)
        data = encode(encoder, train_rows)
        x_test = encoder.transform(test_rows)
        classes = encoder.classes_[pl.TARGET]
        proba = np.zeros((len(x_test), len(classes)))
        for head in heads(encoder):
            y = head_labels(head, data.targets)
            keep = np.isfinite(y)
            model = HistGradientBoosting("binary:logistic", n_estimators=trees, base_score=BASE_SCORES["binary"],
                                         scale_bits=scale).fit(data.x[keep], y[keep])
            proba[:, head.positive_class] = model.predict_proba(x_test)[:, 1]
        y_test = test_rows[pl.TARGET].to_numpy()
        predicted = pl._predicted_labels(classes, proba)
        per_fold.append(float(balanced_accuracy_score(y_test, predicted)))
        labels.append(y_test)
        preds.append(predicted)
    return per_fold, np.concatenate(labels), np.concatenate(preds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinics", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--scales", default="32,24,20,16,12,10,8")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--liposome-trees", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "federated_hist_scale.json")
    args = parser.parse_args()
    scales = [int(s) for s in args.scales.split(",")]
    if scales[0] != 32:
        parser.error("--scales must start with 32 (the reference every other scale is compared with)")
    np.seterr(all="ignore")
    results: dict = {"simulator": {}, "liposome": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        sites = simulator_sites(args, Path(tmp))
        reference = None
        for scale in scales:
            figures, pairs = simulator_run(args, sites, scale)
            reference = reference or pairs
            for outcome, metric in METRICS.items():
                y, p = pairs[outcome]
                y_ref, p_ref = reference[outcome]
                assert np.array_equal(y, y_ref), "every scale's run must see the same test rows"
                diff_sd, ref_sd = paired_sd(metric, y, p, p_ref, args.bootstrap)
                figures.setdefault("paired_bootstrap_sd", {})[outcome] = diff_sd
                figures.setdefault("bootstrap_sd_at_32", {})[outcome] = ref_sd
            results["simulator"][scale] = figures
            print(f"scale 2^{scale}: {figures['bytes_per_tree'] / 1e3:.1f} kB/tree, "
                  + ", ".join(f"{o} {figures['pooled_test_rows'][o]:.4f}" for o in METRICS), flush=True)
    lipo_ref = None
    for scale in scales:
        per_fold, y, p = liposome_predictions(scale, args.liposome_trees)
        lipo_ref = lipo_ref or (y, p)
        diff_sd, ref_sd = paired_sd(balanced_accuracy_score, y, p, lipo_ref[1], args.bootstrap)
        results["liposome"][scale] = {"per_fold": per_fold, "mean": float(np.mean(per_fold)),
                                      "out_of_fold": float(balanced_accuracy_score(y, p)),
                                      "paired_bootstrap_sd": diff_sd, "bootstrap_sd_at_32": ref_sd,
                                      "predictions_equal_32": bool(np.array_equal(p, lipo_ref[1]))}
    print(f"{'scale':>5s} {'kB/tree':>8s} {'resp AUC':>8s} {'tox AUC':>8s} {'eff R2':>8s} "
          f"{'dResp':>8s} {'sd':>6s} {'dTox':>8s} {'sd':>6s} {'dR2':>8s} {'sd':>6s} "
          f"{'lipo BA':>8s} {'dBA':>7s} {'sd':>6s}")
    sim32, lipo32 = results["simulator"][32], results["liposome"][32]
    for scale in scales:
        s, lp = results["simulator"][scale], results["liposome"][scale]
        row = f"{scale:5d} {s['bytes_per_tree'] / 1e3:8.1f}"
        row += "".join(f" {s['pooled_test_rows'][o]:8.4f}" for o in METRICS)
        for o in METRICS:
            diff = s["pooled_test_rows"][o] - sim32["pooled_test_rows"][o]
            row += f" {diff:+8.4f} {s['paired_bootstrap_sd'][o]:6.4f}"
        row += f" {lp['mean']:8.4f} {lp['out_of_fold'] - lipo32['out_of_fold']:+7.4f} {lp['paired_bootstrap_sd']:6.4f}"
        print(row)
    results["seconds"] = time.perf_counter() - start
    write_record(args.out, "python benchmarks/federated_hist_scale.py", results, clinics=args.clinics,
                 rounds=args.rounds, scales=scales, bootstrap=args.bootstrap)


if __name__ == "__main__":
    main()
