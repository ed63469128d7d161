"""FedPer: a body shared by the federation, the heads personal to the site.

Arivazhagan, Aggarwal, Singh & Choudhary, "Federated Learning with Personalization Layers", arXiv:1912.00818
(2019). The model is split into base layers, trained by the federation, and personalisation layers, which stay
at the site. Here the base is the multi-task MLP's trunk (``shared.ann.MultiTaskMLP.trunk``) and the
personalisation layers its outcome heads: the site freezes the global trunk and trains the heads, starting from
the global heads, on its own rows. The heads never leave the site.

FedPer proper keeps the heads local during the rounds too (the federation averages the trunk only); here the
federation trains the whole model and the heads are personalised after its last round.
"""

from __future__ import annotations

from client.personalised.base import PersonalisedANN
from shared.ann import MultiTaskMLP


class FedPer(PersonalisedANN):
    """The global trunk, frozen, under heads trained at the site (parameters: :class:`PersonalisedANN`).

    Example
    -------
    >>> FedPer(epochs=5).fit(global_model, train_split).predict(x)  # doctest: +SKIP
    """

    def start(self, global_model: MultiTaskMLP) -> MultiTaskMLP:
        model = super().start(global_model)
        for p in model.trunk.parameters():
            p.requires_grad_(False)
        return model
