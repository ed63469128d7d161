"""Local gradient boosting (XGBoost) at a site, for Flower's FedXgbBagging and FedXgbCyclic.

The model itself (heads, parameters, prediction) is :mod:`shared.boosting`; this is the training.

- Bagging (FedXgbBagging): each round every site loads the global booster, boosts ``local_rounds`` more
  trees on its own rows and sends back only the new trees; the server appends them (Flower's
  ``aggregate_bagging``). XGBoost: Chen & Guestrin, KDD 2016; bagging of site trees as in Flower's
  XGBoost examples (Gao et al., "FedXGBoost", and Flower's ``xgboost-comprehensive`` baseline).
- Cyclic (FedXgbCyclic): one site per round boosts on top of the whole model and passes it on.

Features are the federated encoder's (the same columns as the ANN), so the comparison is like for like.
"""

from __future__ import annotations

import numpy as np
import xgboost as xgb

from shared.boosting import BoostingConfig, dmatrix, head_labels, heads
from shared.encoding import FeatureEncoder


def boost(global_model: bytes, data: xgb.DMatrix, params: dict, rounds: int) -> xgb.Booster:
    """``rounds`` more trees on top of ``global_model`` (empty bytes: start from scratch)."""
    if not global_model:
        return xgb.train(params, data, num_boost_round=rounds)
    booster = xgb.Booster(params=params, model_file=bytearray(global_model))
    for _ in range(rounds):
        booster.update(data, booster.num_boosted_rounds())
    return booster


def new_trees(booster: xgb.Booster, before: int) -> bytes:
    """The trees added after iteration ``before`` (what a bagging site sends), as JSON bytes."""
    return bytes(booster[before:booster.num_boosted_rounds()].save_raw("json"))


def train_pooled_heads(encoder: FeatureEncoder, x: np.ndarray, targets: dict[str, np.ndarray],
                       config: BoostingConfig, rounds: int) -> dict[str, bytes]:
    """Boosters trained centrally (local-only and pooled baselines), one per head."""
    models = {}
    for head in heads(encoder):
        booster = boost(b"", dmatrix(x, head_labels(head, targets)), config.params(head.kind), rounds)
        models[head.key] = bytes(booster.save_raw("json"))
    return models
