"""The models a federated run left in its output folder, loaded back for predictions in experiments.

``server.app.run_federation`` writes ``encoder.json``, ``ann_federated.pt`` (the final ANN weights) and
``xgb_<head>.json`` (one XGBoost model per head). Here they become predictors over a data frame, with the
same conventions as training: P(positive) for binary outcomes, class probabilities for multiclass ones,
values on the original scale for regression.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from shared import boosting
from shared.ann import build_model, predict
from shared.encoding import FeatureEncoder


def load_encoder(out_dir: Path) -> FeatureEncoder:
    return FeatureEncoder.from_dict(json.loads((Path(out_dir) / "encoder.json").read_text()))


def _decoded(encoder: FeatureEncoder, predictions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {o.name: (encoder.decode_regression(o.name, predictions[o.name]) if o.kind == "regression"
                     else predictions[o.name]) for o in encoder.task.outcomes}


def predict_ann(out_dir: Path, frame: pd.DataFrame, hidden: tuple[int, ...] = (64, 32)) -> dict[str, np.ndarray]:
    """Predictions of the federated ANN saved in ``out_dir`` for the rows of ``frame``."""
    encoder = load_encoder(out_dir)
    model = build_model(encoder, encoder.task, hidden, seed=0)
    model.load_state_dict(torch.load(Path(out_dir) / "ann_federated.pt"))
    return _decoded(encoder, predict(model, encoder.transform(frame)))


def predict_xgboost(out_dir: Path, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Predictions of the federated boosters saved in ``out_dir`` for the rows of ``frame``."""
    encoder = load_encoder(out_dir)
    models = {h.key: (Path(out_dir) / f"xgb_{h.key}.json").read_bytes() for h in boosting.heads(encoder)}
    return _decoded(encoder, boosting.predict_heads(models, encoder, encoder.transform(frame)))
