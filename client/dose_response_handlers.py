"""What a hospital computes for the structured dose-response models: sums over its own first cycles, never rows.

Two query messages (:mod:`shared.protocol.dose_response`):

- ``query.dose_response_sums`` — at the server's coefficients of one outcome model (tumour response,
  neutropenia, other toxicity; :mod:`shared.structured_policy`): the gradient, information, log-likelihood
  and row count of :meth:`shared.dose_response.DoseResponseModel.site_sums`, one Newton–Raphson step's share;
- ``query.dose_response_support`` — the site's first cycles counted by formulation × tumour type × dose bin
  (:func:`shared.structured_policy.site_support_counts`), so the policy acts only where the logs reach.

Both use the site's training split (``shared.task.assign_split`` with the run's ``split-seed``, as every other
phase), so the release gate values the policy on rows its models never saw.

Differential privacy: none, on measurement. A site under DP refuses both
(``client.dp.NO_DP_FORM["dose_response"]``). The per-row bounds of every sum are declared
(``DoseResponseModel.sum_bounds``, tested), and a DP release of them was measured before being built
(``benchmarks/structured_dp.py``; BENCHMARKS.md "Structured policy under DP"): per-site Gaussian noise at those
bounds leaves the dose coefficients' noise 3–50 times their size even with the whole ε = 3 on one gradient
release, so no design gave a policy worth releasing. The federation fits over the sites without DP, or falls
back to the ensemble policy if none is left (``server.dose_response_phase``).

Secure sum. When the run sums through the secure-sum protocol (the request names a session), both answers leave
the site as one masked vector (``client.secure_aggregation``): the sums laid out by
``shared.protocol.dose_response.sums_layout`` in fixed point, the support counts as int64 words; the server
learns only their sums over the sites.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.clientapp import ClientApp

from client.dp import NO_DP_FORM, PrivacyRefused
from client.secure_aggregation import masked, masked_floats
from client.site import SiteHandlers, SiteRequest
from shared.protocol import messages
from shared.protocol import records as r
from shared.protocol.dose_response import (
    sums_from_request,
    sums_layout,
    sums_reply,
    support_from_request,
    support_reply,
)
from shared.protocol.errors import ShareableError
from shared.protocol.hist import SECURE_SESSION
from shared.structured_policy import site_support_counts
from shared.sum_vector import VALUES
from shared.task import assign_split


def _training_episodes(request: SiteRequest, split_seed: int):
    if request.dp is not None:
        raise PrivacyRefused(NO_DP_FORM["dose_response"])
    episodes = request.site.episodes
    return episodes[assign_split(episodes, request.site.task, split_seed) == "train"]


def model_sums(msg: Message, request: SiteRequest) -> RecordDict:
    """The sums of the requested model at the requested coefficients over the site's training first cycles."""
    model, coef, split_seed = sums_from_request(msg.content)
    sums = model.site_sums(_training_episodes(request, split_seed), coef)
    if SECURE_SESSION not in request.config:
        return sums_reply(sums)
    try:
        vector = sums_layout(model).vector(sums)
    except ValueError as err:
        raise ShareableError(str(err)) from None
    return RecordDict({r.ARRAYS: ArrayRecord({VALUES: masked_floats(vector, request.config, request.context)})})


def support_counts(msg: Message, request: SiteRequest) -> RecordDict:
    """The site's training first cycles counted by formulation (in the requested order), tumour type, dose bin."""
    formulations, split_seed = support_from_request(msg.content)
    counts = site_support_counts(_training_episodes(request, split_seed), formulations)
    if SECURE_SESSION not in request.config:
        return support_reply(counts)
    words = np.rint(counts).astype(np.int64).ravel()
    return RecordDict({r.ARRAYS: ArrayRecord({VALUES: masked(words, request.config, request.context)})})


def register_dose_response(client: ClientApp, handlers: SiteHandlers) -> None:
    """Add the ``dose_response_sums`` and ``dose_response_support`` query handlers to ``client``."""
    client.query(messages.DOSE_RESPONSE_SUMS.action)(handlers(model_sums))
    client.query(messages.DOSE_RESPONSE_SUPPORT.action)(handlers(support_counts))
