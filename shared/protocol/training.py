"""``train`` / ``evaluate`` of the neural network, ``query.statistics``: what a round asks and a site answers.

Flower's strategies send ``train`` and ``evaluate`` with the global weights in ``arrays`` and the run's
``train_config`` in ``config``, adding ``server-round`` (and FedProx ``proximal-mu``). The config carries
the federated encoder (``shared.encoding.FeatureEncoder.to_config_record``) and :class:`AnnTraining`.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from shared.encoding import FeatureEncoder
from shared.protocol import records as r
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

# Pairwise-masked rounds (strategies.pairwise_masked_mean, client.training_handlers.masked_weights)
SECURE_SESSION = "ann-secure-session"
"""Train config (and ``query.ann_keys`` request): the key exchange's session id. With it the site sends its
weights as masked fixed-point words (``shared.ann_fixed_point``) under the label ``<session>/<server-round>``."""
SECURE_NODES = "ann-secure-nodes"
SECURE_KEYS = "ann-secure-keys"
SECURE_SITES = "ann-secure-sites"
"""Train config: the roster's node ids, their X25519 public keys and their site names, in the same order (a site
compares a repeated round's roster by name: node ids change when a run resumes)."""
PUBLIC_KEY = "public-key"
"""``query.ann_keys`` reply (ConfigRecord ``keys``): the site's X25519 public key for the session."""
MASKED = "masked-weights"
"""The one array of a masked training reply: uint64 words of (n·w, n) in fixed point, masked."""


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
