"""A site's personalised ANNs: each trained from the final global model on the site's own rows, never sent.

| name | method | module |
|---|---|---|
| ``finetune`` | global-then-local fine-tuning of all layers | :mod:`client.personalised.finetune` |
| ``ditto`` | personal model pulled toward the global one (Li et al., ICML 2021) | :mod:`client.personalised.ditto` |
| ``fedper`` | global body, heads trained at the site (Arivazhagan et al. 2019) | :mod:`client.personalised.fedper` |

With the local-only model (:mod:`client.personalised.local`) and the global model, they are the candidates a
site chooses among on its validation split (:mod:`client.personalised.choice`). Personalised boosting (the
federation's trees plus trees grown at the site) is :mod:`client.personalised.site_trees`; it is not yet a
candidate of the ``query.personalise`` phase.
"""

from __future__ import annotations

from client.personalised.base import PersonalisedANN
from client.personalised.ditto import Ditto
from client.personalised.fedper import FedPer
from client.personalised.finetune import FineTune
from client.personalised.local import LocalOnly
from shared.protocol.personalisation import LOCAL, Personalisation

METHODS = {"finetune": FineTune, "ditto": Ditto, "fedper": FedPer}
"""Method name (``shared.protocol.personalisation.METHODS``) → its class."""


def trainers(plan: Personalisation, batch_size: int, seed: int, local_epochs: int,
             local_lr: float) -> dict[str, PersonalisedANN]:
    """The models a site trains for ``plan``: the local-only one (``local_epochs`` at ``local_lr``, the
    federation's rounds × local epochs and learning rate) and each method."""
    made: dict[str, PersonalisedANN] = {LOCAL: LocalOnly(epochs=local_epochs, lr=local_lr, batch_size=batch_size,
                                                         seed=seed)}
    for name in plan.methods:
        kwargs = {"lam": plan.ditto_lambda} if name == "ditto" else {}
        made[name] = METHODS[name](epochs=plan.epochs, lr=plan.lr, batch_size=batch_size, seed=seed, **kwargs)
    return made


__all__ = ["METHODS", "Ditto", "FedPer", "FineTune", "LocalOnly", "PersonalisedANN", "trainers"]
