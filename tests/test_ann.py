"""The multi-task MLP: one head per outcome, missing outcomes masked, weights round-trip through records."""

import numpy as np
import torch

from shared.ann import AnnSpec, MultiTaskMLP, load_arrays, per_row_loss, predict, to_arrays
from shared.task import NANOPARTICLE_TASK


def _model(seed=0):
    torch.manual_seed(seed)
    return MultiTaskMLP(AnnSpec.for_task(NANOPARTICLE_TASK, n_inputs=5, n_classes={}))


def test_one_head_per_outcome_with_its_kind():
    model = _model()
    assert [(n, k) for n, k, _ in model.spec.outcomes] == [
        ("response", "binary"), ("toxicity_grade3", "binary"), ("efficacy_pct", "regression")]
    out = predict(model, np.zeros((3, 5), np.float32))
    assert all(v.shape == (3,) for v in out.values())
    assert np.all((out["response"] > 0) & (out["response"] < 1))


def test_a_missing_outcome_adds_nothing_to_the_loss():
    model = _model()
    x = torch.randn(4, 5)
    targets = {"response": torch.tensor([1.0, 0.0, 1.0, 0.0]), "toxicity_grade3": torch.tensor([0.0, 1.0, 0.0, 1.0]),
               "efficacy_pct": torch.tensor([0.5, -0.2, 0.1, 0.3])}
    shares = {"response": 1.0, "toxicity_grade3": 1.0, "efficacy_pct": 1.0}
    full = per_row_loss(model.spec, model(x), targets, shares)
    targets["efficacy_pct"] = torch.tensor([0.5, float("nan"), 0.1, 0.3])
    masked = per_row_loss(model.spec, model(x), targets, shares)
    assert torch.isfinite(masked).all()
    assert masked[1] < full[1] and torch.allclose(masked[[0, 2, 3]], full[[0, 2, 3]])


def test_weights_round_trip_through_an_array_record():
    a, b = _model(0), _model(1)
    load_arrays(b, to_arrays(a))
    x = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    for name, values in predict(a, x).items():
        np.testing.assert_array_equal(values, predict(b, x)[name])
