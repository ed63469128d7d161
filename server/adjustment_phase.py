"""The coordinator's side of the federated dose adjuster: fitted-Q iteration over the sites' summed statistics.

One ``query.fqi_scaling`` round (per-column counts, sums and centred sums of squares → the feature scaling),
then ``iterations`` rounds of ``query.fqi_ridge``: the server sends the current Q-function, every site
returns ``A = Σ φφᵀ``, ``b = Σ φ y`` and ``n`` over its training-split transitions, the server adds them and
solves ``(A + αI) w = b`` (:func:`shared.dose_adjustment.fitted_q_iteration`, the same loop as a pooled fit,
so the federated Q-function equals the pooled one up to rounding). Fitted-Q iteration: Ernst, Geurts &
Wehenkel, JMLR 6:503-556 (2005).

A site that fails or refuses the scaling query is left out of the fit and named in the log; a site that
fails later would make the sums inconsistent, so the fit stops with an error instead.

Sites under differential privacy send noised sums (``client.adjustment_handlers``: clipped rows, Gaussian
noise, each release charged to the site's privacy ledger) and say so in a ``privacy`` ConfigRecord; the ε
each has spent is logged and kept in the fitted adjuster's ``privacy_`` (node id → the site's last
``epsilon-spent``, ``epsilon-adjuster``, ``sigma``). The server adds noised and exact sums alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from shared.dose_adjustment import (
    DoseAdjuster,
    fitted_q_iteration,
)
from shared.protocol import messages
from shared.protocol import records as r
from shared.protocol.adjustment import request_records, sums_from_records
from shared.protocol.messages import MessageName


class AdjustmentFailed(RuntimeError):
    """The federated fit could not be completed (no site answered, or a site failed mid-way)."""


def adjuster_from_config(config: Mapping[str, Any]) -> DoseAdjuster:
    """A fresh adjuster from run-config keys ``fqi-alpha``, ``fqi-gamma``, ``fqi-iterations``,
    ``fqi-max-change`` (defaults: :class:`shared.dose_adjustment.DoseAdjuster`'s)."""
    defaults = DoseAdjuster()
    return DoseAdjuster(alpha=float(config.get("fqi-alpha", defaults.alpha)),
                        gamma=float(config.get("fqi-gamma", defaults.gamma)),
                        iterations=int(config.get("fqi-iterations", defaults.iterations)),
                        max_change=float(config.get("fqi-max-change", defaults.max_change)))


def fit_adjuster(grid: Grid, nodes: list[int], config: Mapping[str, Any],
                 adjuster: DoseAdjuster | None = None) -> DoseAdjuster:
    """Fit the dose adjuster by federated fitted-Q iteration over the sites ``nodes``; returns it fitted.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The ServerApp's grid.
    nodes : list of int
        Node ids of the sites to ask (the usable ones of the site check).
    config : mapping
        ``split-seed`` (the run's, so training rows are the other phases' training rows; default 0) and
        optionally ``fqi-alpha``, ``fqi-gamma``, ``fqi-iterations``, ``fqi-max-change``.
    adjuster : DoseAdjuster, optional
        An unfitted adjuster whose parameters to use instead of the ``fqi-*`` keys.

    Raises
    ------
    AdjustmentFailed
        No site answered the scaling query, a site stopped answering during the iterations, or the
        iteration diverged (possible when DP noise dominates the sums).
    """
    adjuster = adjuster if adjuster is not None else adjuster_from_config(config)
    split_seed = int(config.get("split-seed", 0))
    answering = list(nodes)
    privacy: dict[int, dict[str, float]] = {}
    releases: list[tuple[int, dict]] = []

    def ask(name: MessageName, current: DoseAdjuster, drop_failures: bool) -> list[dict]:
        sent = [Message(request_records(current, split_seed), dst_node_id=node, message_type=name.type)
                for node in answering]
        sums, answered = [], []
        for reply in grid.send_and_receive(sent):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(INFO, "dose adjustment: node %s did not answer %s: %s", node, name, reply.error.reason)
                continue
            sums.append(sums_from_records(reply.content))
            answered.append(node)
            if r.PRIVACY in reply.content:
                privacy[node] = dict(reply.content[r.PRIVACY])
                releases.append((node, privacy[node]))
        missing = sorted(set(answering) - set(answered))
        if missing and not drop_failures:
            raise AdjustmentFailed(f"node(s) {missing} failed during fitted-Q iteration; the sums would be partial")
        answering[:] = [node for node in answering if node in answered]
        if not sums:
            raise AdjustmentFailed("no site sent statistics for the dose adjuster")
        return sums

    try:
        fitted = fitted_q_iteration(adjuster, lambda: ask(messages.FQI_SCALING, adjuster, drop_failures=True),
                                    lambda current: ask(messages.FQI_RIDGE, current, drop_failures=False))
    except (FloatingPointError, np.linalg.LinAlgError) as err:
        raise AdjustmentFailed(f"fitted-Q iteration failed: {err}") from err
    fitted.privacy_ = {node: privacy[node] for node in answering if node in privacy}
    fitted.releases_ = releases
    log(INFO, "dose adjustment: fitted-Q over %d site(s) (%d under DP), %d transitions, last change %.2e",
        len(answering), len(fitted.privacy_), fitted.n_transitions_,
        fitted.history_[-1] if fitted.history_ else float("nan"))
    for node, spent in fitted.privacy_.items():
        log(INFO, "dose adjustment: node %s under DP: sigma %.3g, epsilon spent %.3f of %.3g",
            node, float(spent["sigma"]), float(spent["epsilon-spent"]), float(spent["epsilon-budget"]))
    return fitted
