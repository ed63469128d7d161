"""Ditto: a personal model regularised toward the global one.

Li, Hu, Beirami & Smith, "Ditto: Fair and Robust Federated Learning Through Personalization", ICML 2021
(arXiv:2012.04221). Each site solves ``min_v F_k(v) + λ/2 ‖v − w*‖²``: its own loss ``F_k`` plus a pull of
strength λ toward the global model ``w*``; λ = 0 is fine-tuning, λ → ∞ the global model. The proximal term
is applied as a step on the parameters after each optimizer step, ``v ← v − lr·λ·(v − w*)``
(:func:`client.training.proximal_step`, the same step as FedProx's): it uses no row, so under DP it costs no
privacy (``w*`` is public to the site).

Here ``v`` starts at ``w*`` and is trained after the federation's rounds against its final model (Algorithm 1
of the paper interleaves the personal steps with the rounds; with the global model fixed the personal
objective is the same).
"""

from __future__ import annotations

from client.personalised.base import PersonalisedANN
from client.training import TrainConfig


class Ditto(PersonalisedANN):
    """The site's personal model ``v`` with Ditto's pull toward the global weights.

    Parameters
    ----------
    lam : float, default 0.5
        λ, the weight of ``λ/2 ‖v − w*‖²``.
    epochs, lr, batch_size, seed
        As :class:`client.personalised.base.PersonalisedANN`.

    Example
    -------
    >>> Ditto(lam=0.5).fit(global_model, train_split).predict(x)  # doctest: +SKIP
    """

    def __init__(self, lam: float = 0.5, epochs: int = 5, lr: float = 0.002, batch_size: int = 32,
                 seed: int = 0) -> None:
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
        self.lam = lam

    def config(self) -> TrainConfig:
        # client.training.train anchors the proximal term at the weights it starts from: w*
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed,
                           proximal_mu=self.lam)
