"""Output mixing: the site's prediction is a fixed mix of the global model's and its local-only model's.

APFL (Deng, Kamani & Mahdavi, "Adaptive Personalized Federated Learning", arXiv:2003.13461, 2020) gives each
site the mixture ``h = α·v + (1 − α)·w`` of a local model ``v`` and the global one ``w`` (eq. 3; APFL mixes
the weights of models trained jointly and learns α). Here the two models are trained apart — the federation's
final model and the site's local-only candidate (:mod:`client.personalised.local`), which the phase trains
anyway — so their weights do not share a basis and the mix is taken in prediction space instead: a two-member
ensemble averaged with weight α on the global model (Dietterich, "Ensemble Methods in Machine Learning", MCS
2000; Hansen & Salamon, IEEE TPAMI 12(10), 1990): the average of two models whose errors are not perfectly
correlated has a lower squared error than their mean error, and can beat both — which is what "better than
max(local-only, global)" asks of a single model at a site.

Per outcome, with ``α`` the global model's weight:

- binary and multiclass, ``space="probability"``: ``p = α·p_global + (1 − α)·p_local``;
- binary and multiclass, ``space="logit"``: ``p = σ(α·z_global + (1 − α)·z_local)`` (softmax for several
  classes: a normalised geometric mean of the two models' probabilities);
- regression: ``ŷ = α·ŷ_global + (1 − α)·ŷ_local`` in either space.

Nothing is trained: under DP the mix costs no ε beyond its two members' (the global model is public to the site,
the local-only model is a candidate the site's ledger has already paid for), only its share of the phase's
summary releases (one more candidate's summaries).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from shared.ann import MultiTaskMLP, predict
from shared.protocol.personalisation import MIX_SPACES


class MixedMLP(nn.Module):
    """Two multi-task MLPs of one architecture whose head outputs are mixed (module docstring); ``forward``
    returns head outputs as :class:`shared.ann.MultiTaskMLP` does (logits: :func:`shared.ann.predict` reads it
    as it reads one model). Its state dict holds both members' weights and α, so a site saves it as one model.
    """

    def __init__(self, first: MultiTaskMLP, second: MultiTaskMLP, alpha: float, space: str) -> None:
        super().__init__()
        if first.spec != second.spec:
            raise ValueError("mix: the two models differ in architecture (shared.ann.AnnSpec): "
                             f"{first.spec} against {second.spec}")
        self.spec = first.spec
        self.first, self.second, self.space = first, second, space
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a, b = self.first(x), self.second(x)
        alpha = float(self.alpha)
        out = {}
        for name, kind, _ in self.spec.outcomes:
            if kind == "regression" or self.space == "logit":
                out[name] = alpha * a[name] + (1 - alpha) * b[name]
            elif kind == "binary":  # the logit of α·σ(a) + (1 − α)·σ(b), in log space (no overflow at large |a|)
                pos = _log_mix(nn.functional.logsigmoid(a[name]), nn.functional.logsigmoid(b[name]), alpha)
                neg = _log_mix(nn.functional.logsigmoid(-a[name]), nn.functional.logsigmoid(-b[name]), alpha)
                out[name] = pos - neg
            else:  # multiclass: the log of the mixed probabilities (softmax of it gives them back)
                out[name] = _log_mix(torch.log_softmax(a[name], dim=1), torch.log_softmax(b[name], dim=1), alpha)
        return out


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float) -> torch.Tensor:
    """``log(α·p + (1 − α)·q)`` from ``log p`` and ``log q``."""
    weight_p = math.log(alpha) if alpha > 0 else -math.inf
    weight_q = math.log(1 - alpha) if alpha < 1 else -math.inf
    return torch.logaddexp(log_p + weight_p, log_q + weight_q)


class Mix:
    """A site's mix of the global model and its local-only model (module docstring).

    Parameters
    ----------
    alpha : float, default 0.75
        The global model's weight, in [0, 1] (0: the local-only model; 1: the global model); the plan's
        ``shared.protocol.personalisation.Personalisation.mix_alpha`` says why 0.75.
    space : {"probability", "logit"}, default "probability"
        Where the classification heads are mixed (regression heads are mixed as values in both).

    Attributes
    ----------
    model_ : MixedMLP
        The two models with α: what the site predicts with and keeps.

    Example
    -------
    >>> Mix(alpha=0.75).fit(global_model, local.model_).predict(x)  # doctest: +SKIP
    """

    def __init__(self, alpha: float = 0.75, space: str = "probability") -> None:
        self.alpha = alpha
        self.space = space

    def fit(self, global_model: MultiTaskMLP, local_model: MultiTaskMLP) -> Mix:
        """Hold the two trained models (copies are not made: neither is trained further); nothing is learned."""
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"mix: alpha (the global model's weight) must be in [0, 1]; got {self.alpha!r}")
        if self.space not in MIX_SPACES:
            raise ValueError(f"mix: space must be one of {', '.join(MIX_SPACES)}; got {self.space!r}")
        self.model_ = MixedMLP(global_model, local_model, self.alpha, self.space)
        return self

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return predict(self.model_, x)
