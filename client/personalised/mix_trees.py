"""Mixed boosters: the site's prediction is a fixed mix of the federation's boosters' and its local-only boosters'.

The boosting counterpart of :mod:`client.personalised.mix` (APFL's mixture of a local and the global model, Deng,
Kamani & Mahdavi, arXiv:2003.13461, 2020, taken in prediction space as a two-member ensemble: Dietterich, MCS 2000).
Per head (``shared.boosting.heads``: one booster per binary or regression outcome, one-vs-rest boosters per class of
a multiclass one), with ``α`` the federation's weight:

- ``space="logit"``: ``α·m_global + (1 − α)·m_local`` of the boosters' raw margins (XGBoost's
  ``output_margin``: the log-odds of a logistic head, the value of a squared-error one), then the head's link
  (the sigmoid), as one booster of the two ensembles' trees with their leaf values scaled by α and 1 − α would;
- ``space="probability"``: ``α·p_global + (1 − α)·p_local`` of the predictions.

Multiclass outcomes are renormalised over their one-vs-rest heads as :func:`shared.boosting.predict_heads` does.
Nothing is trained: the two members are the federation's boosters and the local-only boosters the site trains
for the choice anyway. Without DP only, as every personalised booster (``client.personalised.site_trees``).

Example
-------
>>> MixTrees(alpha=0.5).fit(global_boosters, local_boosters).predict(encoder, x)  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np

from shared.protocol.personalisation import MIX_SPACES


class MixTrees:
    """A site's mix of two sets of boosters, one per head (module docstring).

    Parameters
    ----------
    alpha : float, default 0.5
        The federation's boosters' weight, in [0, 1].
    space : {"probability", "logit"}, default "probability"
        Where the two are mixed (``logit``: the margins).

    Attributes
    ----------
    boosters_ : dict
        ``{"global": {head key: booster JSON}, "local": {...}}``: what the site keeps.
    """

    MEMBERS = ("global", "local")

    def __init__(self, alpha: float = 0.5, space: str = "probability") -> None:
        self.alpha = alpha
        self.space = space

    def fit(self, global_boosters: dict[str, bytes], local_boosters: dict[str, bytes]) -> MixTrees:
        """Hold the two sets of boosters (nothing is learned); ``ValueError`` if their heads differ."""
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"mix-trees: alpha (the federation's weight) must be in [0, 1]; got {self.alpha!r}")
        if self.space not in MIX_SPACES:
            raise ValueError(f"mix-trees: space must be one of {', '.join(MIX_SPACES)}; got {self.space!r}")
        if set(global_boosters) != set(local_boosters):
            raise ValueError(f"mix-trees: the boosters' heads differ: {sorted(global_boosters)} against "
                             f"{sorted(local_boosters)}")
        self.boosters_ = {"global": dict(global_boosters), "local": dict(local_boosters)}
        return self

    def files(self) -> dict[str, bytes]:
        """What a site saves: each member's boosters as ``<member>/<head>`` and the mix's settings as ``mix``."""
        import json

        settings = json.dumps({"alpha": self.alpha, "space": self.space, "members": list(self.MEMBERS)}).encode()
        return {f"{member}/{head}": model for member in self.MEMBERS
                for head, model in self.boosters_[member].items()} | {"mix": settings}

    def predict(self, encoder, x: np.ndarray) -> dict[str, np.ndarray]:
        """Predictions per outcome in :func:`shared.boosting.predict_heads`' conventions."""
        from shared import boosting

        first, second = self.boosters_["global"], self.boosters_["local"]
        if self.space == "probability":
            a, b = boosting.predict_heads(first, encoder, x), boosting.predict_heads(second, encoder, x)
            return {k: self.alpha * a[k] + (1 - self.alpha) * b[k] for k in a}
        data = boosting.dmatrix(x)
        by_head = {}
        for head in boosting.heads(encoder):
            margin = (self.alpha * boosting.load(first[head.key]).predict(data, output_margin=True)
                      + (1 - self.alpha) * boosting.load(second[head.key]).predict(data, output_margin=True))
            by_head[head.key] = margin if head.kind == "regression" else 1 / (1 + np.exp(-margin))
        return boosting.per_outcome(encoder, len(x), by_head)
