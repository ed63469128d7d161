"""What a hospital computes for the federated dose adjuster: sums over its own logged transitions, never rows.

Two query messages (``shared.dose_adjustment``):

- ``query.fqi_scaling`` — per state column and the dose: count, sum and centred sum of squares of the
  site's training-split transitions, for the federated feature scaling;
- ``query.fqi_ridge`` — at the server's current Q-function: the ridge-regression sufficient statistics
  ``A = Σ φφᵀ``, ``b = Σ φ y`` and ``n`` of one fitted-Q iteration (Ernst, Geurts & Wehenkel, JMLR 2005).

The transitions (``shared.dose_adjustment.site_transitions``) come from the site's ``episodes.csv`` and
``vitals.csv``, training split only (``shared.task.assign_split`` with the run's ``split-seed``, by patient,
as every other phase splits), and are kept in memory while the site's files are unchanged.

Differential privacy is not applied to these sums yet: a site whose ``site.toml`` enables DP refuses them
(error ``ERROR_DP_NOT_SUPPORTED``) rather than release exact sums; the server leaves it out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from shared.dose_adjustment import (
    QUERY_RIDGE,
    QUERY_SCALING,
    Transitions,
    adjuster_from_request,
    scaling_sums,
    site_transitions,
    sums_to_records,
)
from shared.task import assign_split
from shared.validation import SiteData, SiteDataError

ERROR_DP_NOT_SUPPORTED = 4011
ERROR_ADJUSTMENT_REQUEST = 4012
_CACHE: dict[tuple[int, int], tuple[SiteData, Transitions]] = {}


def training_transitions(site: SiteData, split_seed: int) -> Transitions:
    """The site's logged transitions of its training-split patients (cached per loaded site and seed)."""
    key = (id(site), split_seed)
    cached = _CACHE.get(key)
    if cached is not None and cached[0] is site:
        return cached[1]
    train = site.episodes[assign_split(site.episodes, site.task, split_seed) == "train"]
    vitals = site.vitals
    if vitals is not None:
        vitals = vitals[vitals["episode_id"].astype(str).isin(set(train["episode_id"].astype(str)))]
    transitions = site_transitions(train.reset_index(drop=True), vitals)
    if len(_CACHE) > 32:
        _CACHE.clear()
    _CACHE[key] = (site, transitions)
    return transitions


def register_adjustment(client: ClientApp, site_source_fn: Callable[[Context], Any],
                        load_fn: Callable[[Any], SiteData]) -> ClientApp:
    """Add the ``fqi_scaling`` and ``fqi_ridge`` query handlers to ``client``; returns it.

    ``site_source_fn(context)`` gives the node's site source and ``load_fn(source)`` its validated data
    (raising ``SiteDataError``) — e.g. ``client.app.site_source`` and ``client.app.load``."""

    def answer(msg: Message, context: Context, compute: Callable) -> Message:
        from client.app import ERROR_SITE_DATA, error_reply, site_name

        source = site_source_fn(context)
        try:
            site = load_fn(source)
        except SiteDataError as err:
            return error_reply(msg, ERROR_SITE_DATA, f"{site_name(source)}: {err}")
        who = site_name(source, site)
        if site.config.get("privacy", {}).get("dp", False):
            return Message(Error(code=ERROR_DP_NOT_SUPPORTED, reason=f"{who}: DP is on for this site and the dose "
                                 "adjuster's sums have no DP release yet; not sending exact sums"), reply_to=msg)
        try:
            adjuster, split_seed = adjuster_from_request(msg.content)
            sums = compute(adjuster, training_transitions(site, split_seed))
        except (KeyError, ValueError) as err:
            return error_reply(msg, ERROR_ADJUSTMENT_REQUEST, f"{who} cannot answer: {err}")
        return Message(sums_to_records(sums), reply_to=msg)

    @client.query(QUERY_SCALING)
    def fqi_scaling(msg: Message, context: Context) -> Message:
        return answer(msg, context, lambda adjuster, transitions: scaling_sums(transitions))

    @client.query(QUERY_RIDGE)
    def fqi_ridge(msg: Message, context: Context) -> Message:
        return answer(msg, context, lambda adjuster, transitions: adjuster.ridge_sums(transitions))

    return client
