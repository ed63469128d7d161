"""The candidates a site trains for a personalisation plan: its local-only model and each requested method
(the package docstring, :mod:`client.personalised`, lists them)."""

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

