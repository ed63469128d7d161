"""The hospital's Flower ClientApp: answers the server from the site's own data, sending aggregates only.

Which site this node is, and the one shape of every answer (load, validate, reply or name the error), is
:mod:`client.site`; what the site may release under differential privacy is :mod:`client.dp`. The messages
(:mod:`shared.protocol.messages`) and who answers them:

| messages | module |
|---|---|
| ``query.site_check``, ``query.statistics``, ``train``, ``evaluate`` | :mod:`client.training_handlers` |
| ``query.ann_*`` (the masked ANN rounds' key, share and unmask rounds) | :mod:`client.training_handlers` |
| ``query.personalise`` (personalised ANNs, metrics only) | :mod:`client.personalisation_handlers` |
| ``train.xgboost``, ``evaluate.xgboost``, ``query.xgb_evaluate``, ``query.importance`` | ``client.boosting_handlers`` |
| ``query.hist_*`` (histogram boosting) | :mod:`client.hist_handlers` |
| ``query.fqi_*`` (dose adjuster) | :mod:`client.adjustment_handlers` |
| ``query.dose_response_*`` (structured dose-response models) | :mod:`client.dose_response_handlers` |
| ``query.catalogue``, ``query.install_policy`` | :mod:`client.policy_handlers` |
| ``query.analytics_*`` | :mod:`client.analytics` |
| ``query.statistics_layout``, ``query.statistics_masked`` (masked statistics) | :mod:`client.secure_statistics` |
| ``query.secure_*`` (the secure sum's key, share and unmask rounds) | :mod:`client.secure_aggregation` |

Never a row of data leaves: only weights, counts, sums and histograms (noised where the site is under DP),
and error replies that name the site, file, column, row numbers and rule.
"""

from __future__ import annotations

import pickle
import uuid

from flwr.clientapp import ClientApp

from client.adjustment_handlers import register_adjustment
from client.analytics import register_analytics
from client.boosting_handlers import register_boosting
from client.dose_response_handlers import register_dose_response
from client.hist_handlers import register_hist
from client.personalisation_handlers import register_personalisation
from client.policy_handlers import register_policy
from client.secure_statistics import register_secure_statistics
from client.site import SiteHandlers, SiteSource
from client.training_handlers import register_training


class SimulatedClientApp(ClientApp):
    """The ClientApp of an in-process simulation: it pickles as its recipe (a token, the sites as one pickled
    blob, the mods), and the recipe unpickles to one app per process, the blob opened only the first time.

    Flower 1.42's Ray backend pickles the ClientApp with every message it sends an actor, by value (its handlers
    are closures): ~20 ms of the driver's time per message at 100 clinics, most of it cloudpickle scanning
    ``sys.modules`` once per closure; and at 1,000 clinics unpickling the sites' 1,000 paths with every message
    cost more than the message (BENCHMARKS.md, "Scale").
    """

    def __init__(self, sites: list[SiteSource], mods: list | None, token: str) -> None:
        super().__init__(mods=mods)
        self.recipe = (token, pickle.dumps(sites), mods)

    def __reduce__(self):
        return _rebuilt, self.recipe


_REBUILT: dict[str, ClientApp] = {}


def _rebuilt(token: str, sites: bytes, mods: list | None) -> ClientApp:
    """The simulation's app of ``token`` in this process (built at its first message)."""
    if token not in _REBUILT:
        _REBUILT[token] = make_client_app(pickle.loads(sites), mods, token=token)  # our own blob, from the driver
    return _REBUILT[token]


def make_client_app(sites: list[SiteSource] | None = None, mods: list | None = None,
                    token: str | None = None) -> ClientApp:
    """A ClientApp answering every message of the protocol; ``sites`` serves in-process simulations where
    nodes have no ``data-path`` (indexed by ``partition-id``), as a :class:`SimulatedClientApp` (``token`` names
    it across processes; a new one by default); ``mods`` are Flower client mods around every handler (tests use
    one to see every reply a site sends)."""
    client = (ClientApp(mods=mods) if sites is None
              else SimulatedClientApp(sites, mods, token or uuid.uuid4().hex))
    handlers = SiteHandlers(sites)
    for register in (register_training, register_personalisation, register_boosting, register_hist,
                     register_adjustment, register_dose_response, register_policy, register_analytics,
                     register_secure_statistics):
        register(client, handlers)
    return client


app = make_client_app()
