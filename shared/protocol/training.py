"""``train`` / ``evaluate`` of the neural network, ``query.statistics``: what a round asks and a site answers.

Flower's strategies send ``train`` and ``evaluate`` with the global weights in ``arrays`` and the run's
``train_config`` in ``config``, adding ``server-round`` (and FedProx ``proximal-mu``). The config carries
the federated encoder (``shared.encoding.FeatureEncoder.to_config_record``) and :class:`AnnTraining`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from shared.encoding import FeatureEncoder
from shared.protocol import records as r
from shared.protocol.errors import ShareableError
from shared.protocol.privacy import RunPlan


@dataclass(frozen=True)
class AnnTraining:
    """How every site trains a round, identically.

    Parameters
    ----------
    local_epochs, batch_size : int
    lr : float
    seed : int
        Seed of the local data order (plus the round number) and of the initial weights.
    split_seed : int
        Seed of the sites' train/val/test split.
    max_grad_norm : float
        DP-SGD's per-sample clipping norm (a DP site's own noise is set for its budget).
    num_rounds : int
        Rounds planned: a DP site sets its noise at the first round for all of them.
    hidden : tuple of int
        Hidden layer widths of the MLP.
    plan : RunPlan
        The phases of the run, so a DP site knows which later phases to keep budget for.
    """

    local_epochs: int
    batch_size: int
    lr: float
    seed: int
    split_seed: int
    max_grad_norm: float
    num_rounds: int
    hidden: tuple[int, ...]
    plan: RunPlan = RunPlan(())

    def to_config(self, encoder: FeatureEncoder) -> ConfigRecord:
        """The encoder and these settings as one ConfigRecord (Flower adds ``server-round``)."""
        config = encoder.to_config_record()
        config.update({"local-epochs": self.local_epochs, "batch-size": self.batch_size, "lr": self.lr,
                       r.SEED: self.seed, r.SPLIT_SEED: self.split_seed, "max-grad-norm": self.max_grad_norm,
                       "num-rounds": self.num_rounds, "hidden": list(self.hidden)})
        config.update(self.plan.to_config())
        return config

    @classmethod
    def from_config(cls, config: ConfigRecord) -> AnnTraining:
        return cls(local_epochs=int(config["local-epochs"]), batch_size=int(config["batch-size"]),
                   lr=float(config["lr"]), seed=int(config[r.SEED]), split_seed=int(config[r.SPLIT_SEED]),
                   max_grad_norm=float(config["max-grad-norm"]), num_rounds=int(config["num-rounds"]),
                   hidden=tuple(int(h) for h in config["hidden"]), plan=RunPlan.from_config(config))


EVAL_BINS = "eval-bins"
"""Evaluate config: score histogram bins every site uses (``shared.metrics.COARSE_N_BINS`` in a run with DP
sites)."""
EVALUATE_RECEIVED = "evaluate-received"
"""Train config of a one-message round (``RunSettings.one_message_rounds``): the round whose global model the
message carries. A site without DP evaluates that model on its test split before training and adds the
summaries to its reply as the ConfigRecord :data:`RECEIVED_EVALUATION` (a ConfigRecord, because Flower's
strategies expect exactly one MetricRecord in a reply); a DP site ignores it (its evaluation is a release,
made at the final round only)."""
RECEIVED_EVALUATION = "received-evaluation"
"""Reply key of the evaluation summaries of the received model (:data:`EVALUATE_RECEIVED`)."""

# Masked ANN rounds (strategies.pairwise_masked_mean, client.training_handlers.masked_weights): the train config
# carries the secure-sum keys of ``shared.protocol.hist`` (``server.secure_aggregation.SecureSession``) and these.
ROSTER_NAMES = "ann-roster-names"
"""Train config of a masked round: the names of the sites the round is masked among, so a site can compare the
roster of a round it is asked again by name (node ids change when a run resumes)."""
MASKED = "masked-weights"
"""The one array of a masked training reply: the two-lane fixed-point words (``client.secure_aggregation.to_fixed``)
of :func:`weighted_vector`, masked."""

Layout = list[tuple[str, tuple[int, ...], str]]
"""The arrays a masked vector stands for: name, shape and dtype, in sorted name order (both sides)."""


def layout_of(arrays: Mapping[str, np.ndarray]) -> Layout:
    """The layout of ``arrays`` (the round's global model): names sorted, so site and server agree unsent."""
    return [(name, tuple(np.shape(arrays[name])), str(np.asarray(arrays[name]).dtype)) for name in sorted(arrays)]


def weighted_vector(arrays: Mapping[str, np.ndarray], weight: float, layout: Layout) -> np.ndarray:
    """FedAvg's summands (McMahan et al. 2017) of one site as one float64 vector: every entry of
    ``weight · arrays`` in ``layout``'s order, then ``weight``. A ShareableError (no value in the text) if the
    arrays are not the layout's or ``weight`` is not a finite number above zero."""
    if set(arrays) != {name for name, _, _ in layout}:
        raise ShareableError("the trained weights do not have the arrays of the model the round sent")
    for name, shape, _ in layout:
        if tuple(np.shape(arrays[name])) != shape:
            raise ShareableError(f"array {name!r}: shape {tuple(np.shape(arrays[name]))}, the round sent {shape}")
    if not (np.isfinite(weight) and weight > 0):
        raise ShareableError("the site's weight (num-examples) must be a finite number above zero to be masked")
    flat = np.concatenate([np.asarray(arrays[name], dtype=np.float64).reshape(-1) for name, _, _ in layout])
    return np.append(flat * float(weight), float(weight))


def weighted_mean(total: np.ndarray, layout: Layout) -> tuple[dict[str, np.ndarray], float]:
    """The weighted mean arrays (each in its layout dtype) and the summed weight from the sum over sites of
    :func:`weighted_vector`. ``ValueError`` if the length does not match or the summed weight is not positive."""
    total = np.asarray(total, dtype=np.float64).reshape(-1)
    size = sum(int(np.prod(shape, dtype=np.int64)) for _, shape, _ in layout)
    if total.shape != (size + 1,):
        raise ValueError(f"masked sum: expected {size + 1} entries (the model's {size} weights and the weight), "
                         f"got {total.size}")
    weight = float(total[-1])
    if not weight > 0:
        raise ValueError("masked sum: the summed weight is not positive; the entries are not the sites' vectors")
    arrays, start = {}, 0
    for name, shape, dtype in layout:
        count = int(np.prod(shape, dtype=np.int64))
        arrays[name] = (total[start:start + count] / weight).reshape(shape).astype(dtype)
        start += count
    return arrays, weight


def hidden_of(config: ConfigRecord) -> tuple[int, ...]:
    """The MLP's hidden widths from any request that carries a model."""
    return tuple(int(h) for h in config["hidden"])


def server_round(config: ConfigRecord) -> int:
    return int(config[r.SERVER_ROUND])


def proximal_mu(config: ConfigRecord) -> float:
    """FedProx's μ (0 for every other strategy)."""
    return float(config.get(r.PROXIMAL_MU, 0.0))


@dataclass(frozen=True)
class TrainReply:
    """What a site reports after a round, besides the weights.

    ``num_examples`` weights the site in FedAvg: a DP site sends its noised training-row count from the
    statistics release (post-processing costs no privacy); ``train_loss`` is None for a DP site (the mean
    loss over its rows is not a DP release); ``epsilon`` … ``noise_multiplier`` only for a DP site.
    """

    num_examples: float
    server_round: int
    steps: int
    train_loss: float | None = None
    epsilon: float | None = None
    epsilon_budget: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None

    KEYS = {"train_loss": "train-loss", "epsilon": "epsilon", "epsilon_budget": "epsilon-budget",
            "delta": "delta", "noise_multiplier": "noise-multiplier"}

    def to_metric_record(self) -> MetricRecord:
        record = {r.NUM_EXAMPLES: self.num_examples, r.SERVER_ROUND: self.server_round, "steps": self.steps}
        record.update({key: getattr(self, name) for name, key in self.KEYS.items() if getattr(self, name) is not None})
        return MetricRecord(record)

    @classmethod
    def from_metrics(cls, metrics: dict) -> TrainReply:
        optional = {name: float(metrics[key]) for name, key in cls.KEYS.items() if key in metrics}
        return cls(num_examples=float(metrics[r.NUM_EXAMPLES]), server_round=int(metrics[r.SERVER_ROUND]),
                   steps=int(metrics.get("steps", 0)), **optional)


def statistics_request(split_seed: int, plan: RunPlan) -> RecordDict:
    config = ConfigRecord({r.SPLIT_SEED: split_seed})
    config.update(plan.to_config())
    return RecordDict({r.CONFIG: config})
