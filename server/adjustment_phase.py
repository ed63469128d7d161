"""The coordinator's side of the federated dose adjuster: fitted-Q iteration over the sites' summed statistics.

One ``query.fqi_scaling`` round (per-column counts, sums and centred sums of squares → the feature scaling),
then ``iterations`` rounds of ``query.fqi_ridge``: the server sends the current Q-function, every site
returns ``A = Σ φφᵀ``, ``b = Σ φ y`` and ``n`` over its training-split transitions, the server adds them and
solves ``(A + αI) w = b`` (:func:`shared.dose_adjustment.fitted_q_iteration`, the same loop as a pooled fit,
so the federated Q-function equals the pooled one up to rounding). Fitted-Q iteration: Ernst, Geurts &
Wehenkel, JMLR 6:503-556 (2005).

A site that fails or refuses the scaling query is left out of the fit and named in the log; a site that
fails later would make the sums inconsistent, so the fit stops with an error instead.

Secure sum. With the run's ``secure-sum`` pairwise or recovering (and two sites or more), every release goes
through the one secure-sum protocol (:func:`secure_fitted_q`, ``server.secure_fit.FitSums``): the scaling as one
masked vector of counts and sums about the columns' public midpoints
(``shared.dose_adjustment.centred_scaling_sums``), each iteration as one masked vector of ``A`` (upper
triangle), ``b`` and ``n`` (``shared.protocol.adjustment``); the server sees only their sums over the sites,
which give the plain fit's Q-function within the fixed-point rounding. Nothing travels in the clear but the
request (the adjuster's public parameters, scaling and coefficients) and a DP site's release facts. Lost sites:

- pairwise: a site that fails the scaling release is left out (keys exchanged anew without it, as a failure of
  the scaling query leaves it out without the secure sum); a site lost in an iteration stops the fit, as today;
  a key exchange that leaves one site (``server.secure_fit.TooFewSites``) stops the fit before any release is
  asked, with an :class:`AdjustmentFailed` naming the lost sites: the policy phase then builds its candidate
  without an adjuster and the record's ``adjustment.reason`` says why
  (``server.policy_phase.fit_adjuster_if_asked``);
- recovering: the sum survives the site, and the fit goes on with consistent sums: ``A``, ``b`` and ``n`` travel
  in every iteration, so each iteration's ridge regression is over the transitions of one set of sites (those
  whose masked input arrived). Iterations after the loss regress over the survivors' transitions only, with
  targets from the Q-function the iterations before fitted (fitted-Q's iterations share nothing else: each
  is a regression of the current targets, Ernst et al. 2005, Alg. 1); the feature scaling, a fixed affine map
  fitted once, stays the one of every site that answered it. The Q-function is then that of fitted-Q iteration
  over all sites up to the loss and over the survivors after it (tested equal to that computation), and the
  adjuster's ``secure_sum_`` names the lost sites and the iteration. Restarting the iterations over the survivors
  instead would ask every DP survivor for new releases beyond its planned ``1 + iterations``, which its ledger
  refuses. A lost DP site's releases until the loss are charged and recorded; it is not asked again.

Sites under differential privacy send noised sums (``client.adjustment_handlers``: clipped rows, Gaussian
noise, each release charged to the site's privacy ledger) and say so in a ``privacy`` ConfigRecord; the ε
each has spent is logged and kept in the fitted adjuster's ``privacy_`` (node id → the site's last
``epsilon-spent``, ``epsilon-adjuster``, ``sigma``). The server adds noised and exact sums alike.

Feasibility (``shared.fit_bounds``). The scaling and every ridge release are checked against what is public: the
columns' public ranges, the feature scaling and coefficients the server sent, the sites' declared row counts (site
check) and the DP sites' stated noise sd. In the clear a site whose own release is infeasible is dropped and named
(``infeasible_``); the iterations after it regress over the others, as after a site lost in recovering mode. A
masked sum that is infeasible refuses the fit (:class:`AdjustmentFailed` naming the release, the entry and the
bound, never a value: the policy's candidate is built without an adjuster).
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from server.secure_aggregation import SecureProtocolError
from server.secure_fit import FitSums, TooFewSites
from shared.dose_adjustment import (
    DoseAdjuster,
    centred_scaling_sums,
    fitted_q_iteration,
    scaling_from_centred,
)
from shared.fit_bounds import check_ridge, check_scaling
from shared.protocol import messages
from shared.protocol import records as r
from shared.protocol.adjustment import request_records, ridge_layout, scaling_layout, sums_from_records
from shared.protocol.hist import secure_sum_mode
from shared.protocol.messages import MessageName
from shared.secure_sum import MIN_SITES
from shared.sum_bounds import Contributors, InfeasibleSum


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


def fit_adjuster(grid: Grid, nodes: list[int], config: Mapping[str, Any], adjuster: DoseAdjuster | None = None,
                 secure_sum: str | bool = "off", secure_threshold: int = 0,
                 declared: Mapping[int, float | None] | None = None) -> DoseAdjuster:
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
    secure_sum : str, default "off"
        The run's secure-sum mode (off | pairwise | recovering): with pairwise or recovering and two sites or
        more, through :func:`secure_fitted_q` (module docstring).
    secure_threshold : int, default 0
        Recovering: the Shamir threshold (0: ⌊n/2⌋ + 1).
    declared : mapping, optional
        Site → its site-check row count (None: declared none), the cap of the feasibility checks' counts.

    Raises
    ------
    AdjustmentFailed
        No site answered the scaling query, a site stopped answering during the iterations (off, pairwise), the
        secure sum could not be recovered (recovering: more than n − t sites lost), or the iteration diverged
        (possible when DP noise dominates the sums), or a masked sum was infeasible (refused).
    """
    adjuster = adjuster if adjuster is not None else adjuster_from_config(config)
    split_seed = int(config.get("split-seed", 0))
    mode = secure_sum_mode(secure_sum)
    if mode != "off" and len(nodes) >= MIN_SITES:
        return secure_fitted_q(grid, nodes, adjuster, split_seed, mode, secure_threshold, declared)
    declared = dict(declared or {})
    infeasible: dict[int, str] = {}
    answering = list(nodes)
    privacy: dict[int, dict[str, float]] = {}
    releases: list[tuple[int, dict]] = []

    def ask(name: MessageName, current: DoseAdjuster, drop_failures: bool) -> list[dict]:
        sent = [Message(request_records(current, split_seed), dst_node_id=node, message_type=name.type)
                for node in answering]
        sums, answered, dropped = [], [], []
        for reply in grid.send_and_receive(sent):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(INFO, "dose adjustment: node %s did not answer %s: %s", node, name, reply.error.reason)
                continue
            own = sums_from_records(reply.content)
            answered.append(node)
            if r.PRIVACY in reply.content:
                privacy[node] = dict(reply.content[r.PRIVACY])
                releases.append((node, privacy[node]))
            who = Contributors(1, declared.get(node), (float(privacy[node]["noise-sd"]),)
                               if r.PRIVACY in reply.content else ())
            try:
                if name == messages.FQI_SCALING:
                    check_scaling(f"fitted-Q: {name.action}", centred_scaling_sums(own), who)
                else:
                    check_ridge(f"fitted-Q: {name.action}", current, own, who)
            except InfeasibleSum as err:
                infeasible[node] = f"dropped: {err}"
                dropped.append(node)
                log(INFO, "dose adjustment: node %s dropped: %s", node, err)
                continue
            sums.append(own)
        missing = sorted(set(answering) - set(answered))
        if missing and not drop_failures:
            raise AdjustmentFailed(f"node(s) {missing} failed during fitted-Q iteration; the sums would be partial")
        answering[:] = [node for node in answering if node in answered and node not in dropped]
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
    fitted.nodes_ = list(answering)
    fitted.secure_sum_ = {"mode": "off"}
    fitted.infeasible_ = {str(n): why for n, why in infeasible.items()}
    log_fit(fitted)
    return fitted


def secure_fitted_q(grid: Grid, nodes: list[int], adjuster: DoseAdjuster, split_seed: int, mode: str,
                    threshold: int = 0, declared: Mapping[int, float | None] | None = None) -> DoseAdjuster:
    """Fitted-Q iteration with every release summed through the secure-sum protocol (module docstring)."""
    privacy: dict[int, dict] = {}
    releases: list[tuple[int, dict]] = []
    members: list[int] = []
    lost_at: dict[int, int] = {}

    def ask(name: MessageName, current: DoseAdjuster, layout, fresh: bool = False) -> dict[str, np.ndarray]:
        content = request_records(current, split_seed)
        phase = f"fitted-Q: {name.action}"
        if name == messages.FQI_SCALING:
            def check(total, who):
                check_scaling(phase, total, who)
        else:
            def check(total, who):
                check_ridge(phase, current, total, who)
        total = sums.summed(name, dict(content[r.CONFIG]), content[r.ARRAYS], layout, fresh=fresh, check=check)
        for node, facts in sums.privacy:
            privacy[node] = facts
            releases.append((node, facts))
        iteration = len(getattr(current, "history_", []))
        for node in set(members) - set(sums.summed_nodes):
            lost_at[node] = iteration
            log(INFO, "dose adjustment: node %s lost at iteration %d (%s); the fit goes on over %d site(s)",
                node, iteration, sums.lost.get(node, "its input is not in the sum"), len(sums.summed_nodes))
        members[:] = sums.summed_nodes
        return total

    def ridge(current: DoseAdjuster) -> list[dict]:
        total = ask(messages.FQI_RIDGE, current, ridge_layout(current))
        total["n"] = np.round(total["n"], 6)  # a sum of counts (exact sites): free of the fixed-point rounding
        return [total]

    try:
        sums = FitSums(grid, nodes, mode, threshold, phase="fitted-Q", declared=dict(declared or {}))
        fitted = fitted_q_iteration(
            adjuster, lambda: [scaling_from_centred(ask(messages.FQI_SCALING, adjuster, scaling_layout(), True))],
            ridge)
    except TooFewSites as err:
        raise AdjustmentFailed(f"the dose adjuster's fit was stopped: {err.reason}") from None
    except InfeasibleSum as err:
        raise AdjustmentFailed(f"the dose adjuster's fit was refused: {err}") from None
    except SecureProtocolError as err:
        hint = (" (pairwise masks: a site lost after the key exchange leaves its masks in the sum; secure-sum = "
                "recovering survives it)" if mode == "pairwise" else "")
        raise AdjustmentFailed(f"the secure sum of fitted-Q iteration failed at node {err.node}: {err.reason}"
                               f"{hint}") from None
    except (FloatingPointError, np.linalg.LinAlgError) as err:
        raise AdjustmentFailed(f"fitted-Q iteration failed: {err}") from err
    fitted.privacy_ = {node: privacy[node] for node in members if node in privacy}
    fitted.releases_ = releases
    fitted.nodes_ = list(members)
    fitted.secure_sum_ = {**sums.record(), "lost-at-iteration": {str(n): k for n, k in lost_at.items()}}
    fitted.infeasible_ = {}
    log_fit(fitted)
    return fitted


def log_fit(fitted: DoseAdjuster) -> None:
    """Log the fit: sites, DP sites and their ε, transitions, last change."""
    log(INFO, "dose adjustment: fitted-Q over %d site(s) (%d under DP, secure sum %s), %d transitions, last change "
        "%.2e", len(fitted.nodes_), len(fitted.privacy_), fitted.secure_sum_["mode"], fitted.n_transitions_,
        fitted.history_[-1] if fitted.history_ else float("nan"))
    for node, spent in fitted.privacy_.items():
        log(INFO, "dose adjustment: node %s under DP: sigma %.3g, epsilon spent %.3f of %.3g",
            node, float(spent["sigma"]), float(spent["epsilon-spent"]), float(spent["epsilon-budget"]))
