"""What every personalised model of a site shares: its hyper-parameters, its DP-SGD hook and its prediction.

A method is a small estimator in scikit-learn's manner: hyper-parameters in ``__init__``, ``fit`` learns from
the final global model and the site's own training split and returns ``self``; learned state ends in ``_``
(``model_``, ``steps_``, ``history_``). ``fit`` trains with :func:`client.training.train`, so under DP it is
the same Opacus DP-SGD and the same accountant history (``history`` in, ``history_`` out) as the site's
federated rounds; the caller charges the site's ledger with it (``client.personalisation_handlers``).
"""

from __future__ import annotations

import copy

import numpy as np

from client.split import EncodedSplit
from client.training import DPConfig, TrainConfig, steps_per_epoch, train
from shared.ann import MultiTaskMLP, predict


class PersonalisedANN:
    """Base of the methods: a copy of the global model trained further on the site's rows.

    Parameters
    ----------
    epochs : int, default 5
        Passes over the site's training split.
    lr : float, default 0.002
        Adam's learning rate.
    batch_size : int, default 32
        Rows per step (the expected batch under DP-SGD's Poisson sampling).
    seed : int, default 0
        Seed of the data order.
    """

    def __init__(self, epochs: int = 5, lr: float = 0.002, batch_size: int = 32, seed: int = 0) -> None:
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.seed = seed

    def planned_steps(self, n_rows: int) -> int:
        """DP-SGD steps ``fit`` will take on ``n_rows`` rows (a DP site sets its noise for all of them first)."""
        return self.epochs * steps_per_epoch(n_rows, self.batch_size)

    def start(self, global_model: MultiTaskMLP) -> MultiTaskMLP:
        """The model training starts from: a copy of the global one (a method may change it)."""
        return copy.deepcopy(global_model)

    def config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed)

    def fit(self, global_model: MultiTaskMLP, data: EncodedSplit, dp: DPConfig | None = None,
            history: list | None = None) -> PersonalisedANN:
        """Train on ``data`` from :meth:`start`; with ``dp``, by DP-SGD continuing the accountant's ``history``."""
        self.model_ = self.start(global_model)
        result = train(self.model_, data, self.config(), dp, history)
        self.steps_, self.history_ = result.steps, result.history
        for p in self.model_.parameters():
            p.requires_grad_(True)
        return self

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return predict(self.model_, x)
