"""Boosting and model-evaluation messages: which head a request is about, its settings, boosters on the wire.

``train.xgboost`` / ``evaluate.xgboost`` (Flower's FedXgbBagging / FedXgbCyclic), ``query.xgb_evaluate``,
``query.importance`` and the ``query.hist_*`` messages name a head (``shared.boosting.Head``) in their
config with :func:`head_to_config`; finished boosters travel as XGBoost JSON bytes in a ConfigRecord, except in
``query.importance``, whose model always travels in ``arrays`` (:func:`importance_request`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from shared.boosting import Head
from shared.encoding import FeatureEncoder
from shared.protocol import records as r

MODES = ("bagging", "cyclic", "hist")
"""Federated boosting modes: Flower's FedXgbBagging and FedXgbCyclic, and our histogram protocol."""
FAMILY = "family"
"""``query.importance``: which model the request's ``arrays`` carry, ``ann`` (its weights) or ``xgboost`` (the
boosters, :func:`boosters_arrays`)."""
FAMILIES = ("ann", "xgboost")


def head_to_config(head: Head) -> dict[str, str | int]:
    """A head as config entries (``positive-class`` −1 when the head is not one-vs-rest)."""
    return {"outcome": head.outcome, "kind": head.kind,
            "positive-class": -1 if head.positive_class is None else int(head.positive_class)}


def head_from_config(config: ConfigRecord | dict) -> Head:
    positive = int(config["positive-class"])
    return Head(str(config["outcome"]), str(config["kind"]), positive if positive >= 0 else None)


@dataclass(frozen=True)
class BoostingRound:
    """The settings a boosting request carries, with the encoder (hyphenated keys on the wire).

    Parameters
    ----------
    eta : float
        Learning rate.
    max_depth : int
    local_rounds : int
        Trees a site adds per round (bagging and cyclic).
    seed, split_seed : int
    mode : str
        One of :data:`MODES`.
    """

    eta: float
    max_depth: int
    local_rounds: int
    seed: int
    split_seed: int
    mode: str

    def to_config(self, encoder: FeatureEncoder, head: Head | None = None) -> ConfigRecord:
        config = encoder.to_config_record()
        config.update({"eta": self.eta, "max-depth": self.max_depth, "local-rounds": self.local_rounds,
                       r.SEED: self.seed, r.SPLIT_SEED: self.split_seed, "mode": self.mode})
        if head is not None:
            config.update(head_to_config(head))
        return config

    @classmethod
    def from_config(cls, config: ConfigRecord) -> BoostingRound:
        return cls(eta=float(config["eta"]), max_depth=int(config["max-depth"]),
                   local_rounds=int(config["local-rounds"]), seed=int(config[r.SEED]),
                   split_seed=int(config[r.SPLIT_SEED]), mode=str(config["mode"]))


def boosters_record(models: dict[str, bytes]) -> ConfigRecord:
    """Finished boosters by head key, as XGBoost JSON bytes."""
    return ConfigRecord({key: model for key, model in models.items()})


def boosters_of(content: RecordDict) -> dict[str, bytes]:
    return {key: bytes(value) for key, value in content[r.BOOSTERS].items()}


def evaluation_request(config: ConfigRecord, models: dict[str, bytes]) -> RecordDict:
    """``query.xgb_evaluate``: every finished booster at once."""
    return RecordDict({r.CONFIG: config, r.BOOSTERS: boosters_record(models)})


def boosters_arrays(models: dict[str, bytes]) -> ArrayRecord:
    """Finished boosters by head key as uint8 arrays of their XGBoost JSON bytes."""
    return ArrayRecord({key: Array(np.frombuffer(model, dtype=np.uint8)) for key, model in models.items()})


def boosters_from_arrays(arrays: ArrayRecord) -> dict[str, bytes]:
    return {key: array.numpy().tobytes() for key, array in arrays.items()}


def importance_request(config: ConfigRecord, family: str, model: ArrayRecord | dict[str, bytes]) -> RecordDict:
    """``query.importance`` of a final ANN (its weights) or of the boosters (:func:`boosters_arrays`): the model in
    ``arrays`` either way, so the request is one a secure sum can send (``server.secure_aggregation``: config and
    arrays)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}: expected one of {', '.join(FAMILIES)}")
    config = ConfigRecord(dict(config))
    config[FAMILY] = family
    return RecordDict({r.CONFIG: config, r.ARRAYS: model if family == "ann" else boosters_arrays(model)})
