"""Personalised boosting: the federation's histogram trees as the base, a few more trees grown at the site.

The federation's model (``shared.hist_learner`` / the federated histogram protocol, exported by
``shared.xgboost_json`` as an XGBoost JSON booster) is loaded into XGBoost and boosting simply continues on the
site's own training rows (``xgboost.train(..., xgb_model=base)``): the new trees fit the residual of the federated
ensemble on this site's case mix, the base trees stay as they are. This is "global model then local fine-tuning"
for boosting, as in the federated-boosting literature's site adaptation (e.g. Li, Wen & He, "Practical Federated
Gradient Boosting Decision Trees", AAAI 2020, whose SimFL trees are likewise grown at a party on top of shared ones).
The added trees never leave the site.

Without DP only: under DP the site's released validation and test summaries are private only if every model
they score was trained privately (a training row changes the trees, hence every validation prediction), and
XGBoost's trees are not; a DP site declines this candidate
(:data:`shared.protocol.personalisation.BOOSTING_DP_REFUSAL`). A candidate of ``query.personalise_boosting``
(``client.personalisation_handlers.personalise_boosting``), with the site's local-only boosters and the global ones.

Example
-------
>>> SiteTrees(n_trees=5).fit(federated_json, x_train, y_train).predict(x_test)  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import xgboost as xgb


class SiteTrees:
    """A site's personalised booster: the federated trees plus ``n_trees`` grown on the site's rows.

    Parameters
    ----------
    n_trees : int, default 5
        Trees the site adds (one per boosting round).
    eta : float, default 0.1
        Shrinkage of the added trees (the federation's default).
    max_depth : int, default 3
        Depth of the added trees (shallower than the federation's 4: fewer rows).
    reg_lambda : float, default 1.0
        L2 penalty on leaf weights.
    min_child_weight : float, default 1.0
    objective : str, default "binary:logistic"
        The base model's objective (``reg:squarederror`` for a regression head).
    seed : int, default 0

    Attributes
    ----------
    booster_ : xgboost.Booster
        Base trees then the site's trees.
    base_rounds_ : int
        Boosting rounds in the federated model (the first ``base_rounds_`` trees of ``booster_``).
    """

    def __init__(self, n_trees: int = 5, eta: float = 0.1, max_depth: int = 3, reg_lambda: float = 1.0,
                 min_child_weight: float = 1.0, objective: str = "binary:logistic", seed: int = 0) -> None:
        self.n_trees = n_trees
        self.eta = eta
        self.max_depth = max_depth
        self.reg_lambda = reg_lambda
        self.min_child_weight = min_child_weight
        self.objective = objective
        self.seed = seed

    def params(self) -> dict:
        return {"objective": self.objective, "eta": self.eta, "max_depth": self.max_depth, "lambda": self.reg_lambda,
                "min_child_weight": self.min_child_weight, "tree_method": "hist", "nthread": 1, "seed": self.seed}

    def fit(self, base_model: bytes, x: np.ndarray, y: np.ndarray) -> SiteTrees:
        """Load the federated trees from their XGBoost JSON bytes and add :attr:`n_trees` on ``(x, y)`` (rows whose
        label is NaN are left out). ``ValueError`` naming the parameter if ``n_trees`` < 0."""
        if self.n_trees < 0:
            raise ValueError(f"n_trees must be ≥ 0, got {self.n_trees!r}")
        base = xgb.Booster(model_file=bytearray(base_model))
        self.base_rounds_ = base.num_boosted_rounds()
        keep = ~np.isnan(np.asarray(y, dtype=float))
        data = xgb.DMatrix(np.asarray(x, dtype=np.float32)[keep], label=np.asarray(y, dtype=float)[keep])
        self.booster_ = xgb.train(self.params(), data, num_boost_round=self.n_trees, xgb_model=base) \
            if self.n_trees else base
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """P(positive) for ``binary:logistic``, the value for ``reg:squarederror``."""
        return self.booster_.predict(xgb.DMatrix(np.asarray(x, dtype=np.float32)))
