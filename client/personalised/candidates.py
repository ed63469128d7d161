"""The candidates a site makes for a personalisation plan: its local-only model and each requested method
(the package docstring, :mod:`client.personalised`, lists them) — :func:`trainers` those it trains, then
:func:`mixes` those made of trained ones without training (``mix``)."""

from __future__ import annotations

from client.personalised.base import PersonalisedANN
from client.personalised.ditto import Ditto
from client.personalised.fedper import FedPer
from client.personalised.finetune import FineTune
from client.personalised.local import LocalOnly
from client.personalised.mix import Mix
from shared.ann import MultiTaskMLP
from shared.protocol.personalisation import LOCAL, MIX, Personalisation

METHODS = {"finetune": FineTune, "ditto": Ditto, "fedper": FedPer}
"""Trained method name (``shared.protocol.personalisation.METHODS``) → its class."""
MIXES = {MIX: Mix}
"""Method name → its class, for the methods made of the global and the local-only model without training."""


def trainers(plan: Personalisation, batch_size: int, seed: int, local_epochs: int,
             local_lr: float) -> dict[str, PersonalisedANN]:
    """The models a site trains for ``plan``: the local-only one (``local_epochs`` at ``local_lr``, the
    federation's rounds × local epochs and learning rate) and each method."""
    made: dict[str, PersonalisedANN] = {LOCAL: LocalOnly(epochs=local_epochs, lr=local_lr, batch_size=batch_size,
                                                         seed=seed)}
    for name in (m for m in plan.methods if m in METHODS):
        kwargs = {"lam": plan.ditto_lambda} if name == "ditto" else {}
        made[name] = METHODS[name](epochs=plan.epochs, lr=plan.lr, batch_size=batch_size, seed=seed, **kwargs)
    return made



def mixes(plan: Personalisation, trained: dict[str, PersonalisedANN], global_model: MultiTaskMLP) -> dict[str, Mix]:
    """The plan's mixed candidates (:data:`MIXES`), each of ``global_model`` and the local-only model in
    ``trained`` (:func:`trainers`, fitted), at the plan's α and space; nothing is trained."""
    return {name: MIXES[name](alpha=plan.mix_alpha, space=plan.mix_space).fit(global_model, trained[LOCAL].model_)
            for name in plan.methods if name in MIXES}
