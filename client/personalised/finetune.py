"""Global-then-local fine-tuning: the federation's model trained further on the site's own rows, all layers.

The plainest personalisation, the baseline every personalised-FL paper reports (e.g. Wang et al. 2019,
"Federated Evaluation of On-device Personalization", arXiv:1910.10252): start from the global weights, take a
few local epochs, nothing holds the model near where it started.
"""

from __future__ import annotations

from client.personalised.base import PersonalisedANN


class FineTune(PersonalisedANN):
    """All layers of the global model trained on the site's rows (parameters: :class:`PersonalisedANN`).

    Example
    -------
    >>> FineTune(epochs=5).fit(global_model, train_split).predict(x)  # doctest: +SKIP
    """
