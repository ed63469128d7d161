"""The site's side of Flower's federated XGBoost, of the final boosters' evaluation and of permutation importance.

- ``train.xgboost``: boost one head's booster on the site's training rows (``client.boosting``): the new trees
  for FedXgbBagging, the whole model for FedXgbCyclic. Trees grown on a site's rows have no DP form here, so
  a DP site refuses (histogram boosting, ``client.hist_handlers``, is the boosting a DP site can join).
- ``evaluate.xgboost``: one head's booster on the test split (FedXgbCyclic asks after every round; refused
  under DP, like the training).
- ``query.xgb_evaluate``: summaries of every finished booster at once (``client.training_handlers``
  ``summaries_reply``: a release of the ``evaluation`` phase under DP).
- ``query.importance``: permutation-importance loss sums of a final model (``client.importance``); no DP form
  (``client.dp.NO_DP_FORM``), so a DP site refuses. Under the secure sum (the request names a session,
  ``server.importance_phase``) the same sums leave the site as one vector in fixed point, masked
  (``shared.importance.sums_layout``, ``client.secure_aggregation.masked_floats``): the server learns only their
  sum over the sites.
"""

from __future__ import annotations

from functools import partial

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.dp import NO_DP_FORM, PrivacyRefused
from client.importance import permutation_sums
from client.secure_aggregation import masked_floats
from client.site import SiteHandlers, SiteRequest
from client.training_handlers import summaries_reply
from shared import boosting, metrics
from shared.importance import sums_layout
from shared.protocol import messages
from shared.protocol import records as r
from shared.protocol.boosting import FAMILY, BoostingRound, boosters_from_arrays, boosters_of, head_from_config
from shared.protocol.hist import SECURE_SESSION
from shared.sum_vector import VALUES

NO_DP_TREES = "trees grown on the site's rows have no DP form here (use --boosting hist, whose histograms do)"


def _refuse_under_dp(request: SiteRequest, why: str) -> None:
    if request.dp is not None:
        raise PrivacyRefused(why)


def train_boosting(msg: Message, request: SiteRequest) -> RecordDict:
    from client.boosting import boost, new_trees  # XGBoost: loaded by the messages that use it (client.app)

    _refuse_under_dp(request, NO_DP_TREES)
    settings = BoostingRound.from_config(request.config)
    data = request.encoded("train")
    head = head_from_config(request.config)
    params = boosting.BoostingConfig(eta=settings.eta, max_depth=settings.max_depth,
                                     local_rounds=settings.local_rounds, seed=settings.seed).params(head.kind)
    global_model = msg.content[r.ARRAYS]["0"].numpy().tobytes()
    before = boosting.rounds_in(global_model)
    booster = boost(global_model, boosting.dmatrix(data.x, boosting.head_labels(head, data.targets)), params,
                    settings.local_rounds)
    model = new_trees(booster, before) if settings.mode == "bagging" else bytes(booster.save_raw("json"))
    reply = MetricRecord({r.NUM_EXAMPLES: len(data), r.SERVER_ROUND: int(request.config[r.SERVER_ROUND])})
    return RecordDict({r.ARRAYS: ArrayRecord([np.frombuffer(model, dtype=np.uint8)]), r.METRICS: reply})


def evaluate_head(msg: Message, request: SiteRequest) -> RecordDict:
    """One head's booster on the site's test split (FedXgbCyclic asks after every round)."""
    _refuse_under_dp(request, NO_DP_TREES)
    encoder = request.encoder
    data = request.encoded("test")
    head = head_from_config(request.config)
    labels = boosting.head_labels(head, data.targets)
    scores = boosting.load(msg.content[r.ARRAYS]["0"].numpy().tobytes()).predict(boosting.dmatrix(data.x))
    if head.kind == "regression":
        labels = encoder.decode_regression(head.outcome, labels)
        scores = encoder.decode_regression(head.outcome, scores)
    record = MetricRecord({r.NUM_EXAMPLES: len(data)})
    record.update(metrics.to_metric_record(metrics.summarise(head.kind, labels, scores), prefix=head.key))
    return RecordDict({r.METRICS: record})


def evaluate_boosters(msg: Message, request: SiteRequest) -> RecordDict:
    data = request.encoded("test")
    predictions = boosting.predict_heads(boosters_of(msg.content), request.encoder, data.x)
    return summaries_reply(request, predictions, data)


def importance(msg: Message, request: SiteRequest) -> RecordDict:
    """The permutation-importance loss sums of the model the request carries (``ann`` weights or boosters, in
    ``arrays``): plain metrics, or under the secure sum one masked vector."""
    _refuse_under_dp(request, NO_DP_FORM["importance"])
    encoder = request.encoder
    data = request.encoded("test")
    if request.config[FAMILY] == "ann":
        from shared.ann import predict  # torch: loaded by the messages that use it (client.app)

        predict_fn = partial(predict, request.ann(msg.content[r.ARRAYS]))
    else:
        predict_fn = partial(boosting.predict_heads, boosters_from_arrays(msg.content[r.ARRAYS]), encoder)
    sums = permutation_sums(predict_fn, encoder, data, seed=int(request.config[r.SEED]))
    if SECURE_SESSION not in request.config:
        return RecordDict({r.METRICS: MetricRecord(sums)})
    vector = sums_layout(encoder).vector(sums)  # the keys permutation_sums gives every site, in one order
    return RecordDict({r.ARRAYS: ArrayRecord({VALUES: masked_floats(vector, request.config, request.context)})})


def register_boosting(client: ClientApp, handlers: SiteHandlers) -> None:
    """Add the boosting, booster-evaluation and importance handlers to ``client``."""
    client.train(messages.TRAIN_XGBOOST.action)(handlers(train_boosting))
    client.evaluate(messages.EVALUATE_XGBOOST.action)(handlers(evaluate_head))
    client.query(messages.XGB_EVALUATE.action)(handlers(evaluate_boosters))
    client.query(messages.IMPORTANCE.action)(handlers(importance))
