"""The multi-task MLP: one head per outcome, missing outcomes masked, weights round-trip through records, inputs
clamped to ±INPUT_BOUND (issue 17: a DP encoder's too-small scale must not make the output swing with the noise)."""

import dataclasses

import numpy as np
import torch

from shared.ann import INPUT_BOUND, AnnSpec, MultiTaskMLP, load_arrays, per_row_loss, predict, to_arrays
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


def test_an_input_beyond_the_bound_counts_as_the_bound_and_one_within_is_untouched():
    model = _model()
    x = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
    at_bound, far = x.copy(), x.copy()
    at_bound[:, 2], far[:, 2] = INPUT_BOUND, 180.0  # release_tau_h reached 180 "sds" under a DP encoder
    for name, values in predict(model, far).items():
        np.testing.assert_array_equal(values, predict(model, at_bound)[name])
    with torch.no_grad():  # within the bound the model is the plain trunk and heads
        direct = model.heads["efficacy_pct"](model.trunk(torch.as_tensor(x)))[:, 0].numpy()
    np.testing.assert_allclose(predict(model, x)["efficacy_pct"], direct, rtol=1e-6)


def _output_shift(model, x, noise):
    """How far the regression output moves when the first layer's weights take ``noise`` (a DP-SGD step's)."""
    before = predict(model, x)["efficacy_pct"]
    with torch.no_grad():
        model.trunk[0].weight.add_(noise)
    after = predict(model, x)["efficacy_pct"]
    with torch.no_grad():
        model.trunk[0].weight.sub_(noise)
    return np.abs(after - before).mean()


def test_first_layer_noise_moves_an_outlying_row_no_more_than_a_bounded_one():
    """The cause of issue 17 in isolation: the same weight noise moves the output of a row whose feature sits at
    180 (standardised by a DP encoder's too-small scale) ~80x as far as that of a typical row; clamped, under 2x."""
    rng = np.random.default_rng(0)
    typical = rng.normal(size=(200, 5)).astype(np.float32)
    outlying = typical.copy()
    outlying[:, 2] = 180.0
    ratios = {}
    for bound in (INPUT_BOUND, None):
        torch.manual_seed(0)
        model = MultiTaskMLP(dataclasses.replace(AnnSpec.for_task(NANOPARTICLE_TASK, 5, {}), input_bound=bound))
        noise = torch.randn(model.trunk[0].weight.shape, generator=torch.Generator().manual_seed(3)) * 0.01
        ratios[bound] = _output_shift(model, outlying, noise) / _output_shift(model, typical, noise)
    assert ratios[INPUT_BOUND] < 3.0
    assert ratios[None] > 10.0
