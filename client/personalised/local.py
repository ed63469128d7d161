"""The site's local-only model, the candidate a personalising site compares everything with.

A fresh model of the global model's architecture (same encoder, seeded initial weights), trained on the site's
rows alone for as many epochs as the federation's rounds × local epochs, as the local-only baseline is
(``simulation.baselines``); it ignores the global weights.
"""

from __future__ import annotations

import torch

from client.personalised.base import PersonalisedANN
from shared.ann import MultiTaskMLP


class LocalOnly(PersonalisedANN):
    """A model trained from scratch on the site's rows (parameters: :class:`PersonalisedANN`; ``seed`` also
    seeds the initial weights)."""

    def start(self, global_model: MultiTaskMLP) -> MultiTaskMLP:
        torch.manual_seed(self.seed)
        return MultiTaskMLP(global_model.spec)
