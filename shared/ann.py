"""The neural outcome model: a multi-task MLP with one head per outcome, and its records conversions.

A shared trunk (Linear → ReLU blocks) feeds one head per outcome of the task: a logit for a binary
outcome, K logits for a multiclass one, a value for a (standardised) regression outcome. Multi-task
learning with hard parameter sharing (Caruana, Machine Learning 1997;28:41) lets the small response,
toxicity and efficacy signals share what they have in common. Only layers Opacus supports for per-sample
gradients are used (Linear, ReLU; no batch norm), so the same module trains with and without DP-SGD.

The inputs are bounded: every standardised feature is clamped to ``±INPUT_BOUND`` before the trunk (a winsorised
input: Dixon, Ann Math Stat 1960;31:385; Tukey, Ann Math Stat 1962;33:1). Under DP the encoder reads a feature's
scale off a coarse, noised histogram (``shared.encoding``), and a heavy-tailed feature whose upper bins drown in
the noise gets a scale far too small: in a default DP run ``release_tau_h``'s scale came out 8 h against 282 h
exactly, so 9 % of the training rows reached 20 to 180 "sds". Such inputs make the output tens of times more
sensitive (80× in ``tests/test_ann.py``) to the DP-SGD noise in the first layer's weights of that feature, and the
regression head's R² swung from round to round (0.52 → 0.16 → 0.55 → 0.30 in rounds 7-10 of one run; 0.53 with the
exact encoder and the same noise). Over 10 DP runs (``benchmarks/dp_ann_spread.py``, BENCHMARKS.md) the final R²
went from mean 0.26, sd 0.50, min −0.94 to mean 0.54, sd 0.03, min 0.49 clamped, the AUCs unchanged. Without DP
0.03 % of the standardised entries lie beyond ±5 and the clamp moves R² from 0.565 to 0.568.

The loss is the sum over outcomes of each outcome's mean loss over the rows where that outcome is
recorded (a missing outcome is masked, never imputed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from shared.encoding import FeatureEncoder
from shared.task import TaskSpec

INPUT_BOUND = 5.0
"""Standardised inputs are clamped to ±this many (encoder) sds before the trunk (module docstring); a value that
far out is 1 row in 1.7 million of a normal feature, and at most 4 % of any feature's rows (Chebyshev)."""


@dataclass(frozen=True)
class AnnSpec:
    """Architecture of the MLP: input width, hidden widths, and the outcomes with their head widths."""

    n_inputs: int
    outcomes: tuple[tuple[str, str, int], ...]  # (name, kind, head width)
    hidden: tuple[int, ...] = (64, 32)
    input_bound: float | None = INPUT_BOUND
    """Clamp of the standardised inputs (``None``: none, the model before 2026-12-04)."""

    @classmethod
    def for_task(cls, task: TaskSpec, n_inputs: int, n_classes: dict[str, int],
                 hidden: tuple[int, ...] = (64, 32)) -> AnnSpec:
        """Heads from the task's outcomes; ``n_classes`` gives the class count of multiclass outcomes."""
        heads = tuple((o.name, o.kind, n_classes.get(o.name, 2) if o.kind == "multiclass" else 1)
                      for o in task.outcomes)
        return cls(n_inputs=n_inputs, outcomes=heads, hidden=tuple(hidden))


class MultiTaskMLP(nn.Module):
    """Shared trunk and one linear head per outcome; ``forward`` returns a dict of head outputs."""

    def __init__(self, spec: AnnSpec) -> None:
        super().__init__()
        self.spec = spec
        layers: list[nn.Module] = []
        width = spec.n_inputs
        for h in spec.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(width, k) for name, _, k in spec.outcomes})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.spec.input_bound is not None:
            x = torch.clamp(x, -self.spec.input_bound, self.spec.input_bound)
        z = self.trunk(x)
        return {name: head(z) for name, head in self.heads.items()}


def build_model(encoder: FeatureEncoder, task: TaskSpec, hidden: tuple[int, ...], seed: int) -> MultiTaskMLP:
    """A freshly initialised model for the encoder's features; the seed fixes the initial weights."""
    torch.manual_seed(seed)
    n_classes = {name: len(classes) for name, classes in encoder.classes_.items()}
    return MultiTaskMLP(AnnSpec.for_task(task, encoder.n_features_out_, n_classes, hidden))


def per_row_loss(spec: AnnSpec, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                 outcome_rows: dict[str, float]) -> torch.Tensor:
    """Loss per row (for DP-SGD's per-sample clipping): Σ_outcomes mask · loss / recorded-share.

    Dividing by the share of rows where the outcome is recorded (``outcome_rows``, fixed per data set)
    makes the batch mean of this loss equal the sum of each outcome's mean loss, without any term that
    depends on which rows happen to be in the batch.
    """
    total = torch.zeros(next(iter(outputs.values())).shape[0])
    for name, kind, _ in spec.outcomes:
        y = targets[name]
        recorded = ~torch.isnan(y)
        safe = torch.where(recorded, y, torch.zeros_like(y))
        out = outputs[name]
        if kind == "binary":
            loss = nn.functional.binary_cross_entropy_with_logits(out[:, 0], safe, reduction="none")
        elif kind == "multiclass":
            loss = nn.functional.cross_entropy(out, safe.long(), reduction="none")
        else:
            loss = (out[:, 0] - safe) ** 2
        total = total + torch.where(recorded, loss, torch.zeros_like(loss)) / max(outcome_rows[name], 1e-9)
    return total


@torch.no_grad()
def predict(model: MultiTaskMLP, x: np.ndarray) -> dict[str, np.ndarray]:
    """Predictions per outcome: P(positive) for binary, class probabilities for multiclass, the
    standardised value for regression."""
    model.eval()
    outputs = model(torch.as_tensor(x, dtype=torch.float32))
    result = {}
    for name, kind, _ in model.spec.outcomes:
        out = outputs[name]
        if kind == "binary":
            result[name] = torch.sigmoid(out[:, 0]).numpy()
        elif kind == "multiclass":
            result[name] = torch.softmax(out, dim=1).numpy()
        else:
            result[name] = out[:, 0].numpy()
    return result


def to_arrays(model: nn.Module) -> ArrayRecord:
    """The model's weights as a Flower ArrayRecord (what crosses the wire)."""
    return ArrayRecord(_plain_state_dict(model))


def load_arrays(model: nn.Module, arrays: ArrayRecord) -> None:
    """Load weights received as an ArrayRecord into ``model`` (or an Opacus-wrapped copy of it)."""
    _unwrapped(model).load_state_dict(arrays.to_torch_state_dict())


def _unwrapped(model: nn.Module) -> nn.Module:
    """The user's module inside an Opacus GradSampleModule (whose state-dict keys are prefixed)."""
    return getattr(model, "_module", model)


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _unwrapped(model).state_dict().items()}
