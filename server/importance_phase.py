"""Phase 5: federated permutation importance of a final model.

Sites shuffle each feature among their own test rows and return loss sums (``client.importance``); the server
adds them into the mean loss increase per feature over the union of the test sets
(``shared.importance.importance_from_sums``). Permutation importance has no DP form here, so sites under DP
are not asked (``client.dp.NO_DP_FORM``); the importance is then that of the other sites' test rows. No site's
privacy ledger is charged by this phase, with or without the secure sum.

Secure sum. With the run's ``secure-sum`` pairwise or recovering and two sites or more to ask, the one request
goes through the one secure-sum protocol (``server.secure_fit.FitSums``, one session): every site answers its sums
as one float vector (``shared.importance.sums_layout``: per outcome the row count, the summed loss and the summed
loss with each feature shuffled) in fixed point, masked (``client.boosting_handlers.importance``), so the server
learns only their sum over the sites, which gives the plain importance within the fixed-point rounding (the row
counts, integers, exactly). In the clear, as without it: the request (the model, the encoder, the seed), the
layout's length (outcomes × (features + 2)) and which sites answered. Lost sites:

- ``pairwise``: a site that fails the key exchange or the masked request is left out, and the keys are exchanged
  anew without it (``FitSums``' ``fresh`` release: nothing was summed before), as a failing site is left out
  of the plain sum; the phase has no result if fewer than two sites are left (one site's sums cannot be hidden);
- ``recovering``: the sum survives up to n − t sites lost in any round and is that of the sites whose masked
  answer arrived; more lost, the phase has no result.

Either way the lost sites are named in ``failures`` and the session's record (releases, bytes, lost sites) is
kept as ``secure_sum``. With ``off``, or one site to ask, the sites' sums travel in the clear, as before.

Feasibility (``shared.importance_bounds``): each site's sums in the clear, or the masked sum, are checked against
the declared row counts and the loss's public range; an infeasible site is dropped and named (``infeasible``),
an infeasible masked sum gives no result (the refusal, naming outcome, entry and bound, in ``secure_sum``'s
``error`` and ``infeasible``).
"""

from __future__ import annotations

from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from server.secure_aggregation import SecureProtocolError
from server.secure_fit import FitSums, TooFewSites
from server.site_check import SiteCheck
from shared import metrics
from shared.encoding import FeatureEncoder
from shared.importance import importance_from_sums, sums_layout
from shared.importance_bounds import check_importance
from shared.protocol import messages
from shared.protocol import records as r
from shared.protocol.boosting import importance_request
from shared.protocol.hist import secure_sum_mode
from shared.secure_sum import MIN_SITES
from shared.sum_bounds import Contributors, InfeasibleSum


def federated_importance(grid: Grid, sites: SiteCheck, encoder: FeatureEncoder, config: ConfigRecord,
                         family: str, model: ArrayRecord | dict[str, bytes], secure_sum: str | bool = "off",
                         secure_threshold: int = 0) -> dict:
    """Permutation importance per outcome and feature of a final model, with the sites that did not answer.

    Parameters
    ----------
    grid : Grid
    sites : SiteCheck           the usable sites; those under DP are not asked
    encoder : FeatureEncoder
    config : ConfigRecord       the training config (encoder, seeds, ANN architecture)
    family : str                ``ann`` (``model`` its weights) or ``xgboost`` (``model`` the boosters by head key)
    model : ArrayRecord or dict of bytes
    secure_sum : str, default "off"
        The run's secure-sum mode (off | pairwise | recovering): masked with two sites or more (module docstring).
    secure_threshold : int, default 0
        Recovering: the Shamir threshold (0: ⌊n/2⌋ + 1).

    Returns
    -------
    dict
        ``features`` (outcome → feature → mean loss increase; empty when no sum was had), ``failures`` (site →
        why), ``refused`` (site → why, the DP sites), ``secure_sum`` (``{"mode": "off"}`` or the session's
        record, ``server.secure_fit.FitSums.record``) and ``infeasible`` (site → the bound its sums broke, in
        the clear: dropped).
    """
    nodes = [n for n in sites.nodes if n not in sites.dp_nodes()]
    request = importance_request(config, family, model)
    mode = secure_sum_mode(secure_sum)
    declared = sites.declared_rows()
    infeasible: dict[int, str] = {}
    if mode != "off" and len(nodes) >= MIN_SITES:
        summed, lost, secure = secure_sums(grid, nodes, encoder, request, mode, secure_threshold, declared)
    else:
        summed, lost = plain_sums(grid, nodes, request, encoder, declared, infeasible)
        secure = {"mode": "off"}
    failures = {sites.usable.get(node, str(node)): why for node, why in lost.items()}
    for name, why in failures.items():
        log(INFO, "importance: %s failed: %s", name, why)
    return {"features": importance_from_sums(encoder, summed) if summed else {}, "failures": failures,
            "refused": sites.refusing("importance"), "secure_sum": secure,
            "infeasible": {sites.usable.get(n, str(n)): why for n, why in infeasible.items()}}


def plain_sums(grid: Grid, nodes: list[int], request: RecordDict, encoder: FeatureEncoder,
               declared: dict[int, float | None], infeasible: dict[int, str]
               ) -> tuple[dict[str, float], dict[int, str]]:
    """The sites' sums asked in the clear and added here; the sites that failed, and why. A site whose sums break
    ``shared.importance_bounds`` (with its declared row count) is left out and named in ``infeasible``."""
    sent = [Message(request, dst_node_id=n, message_type=messages.IMPORTANCE.type) for n in nodes]
    sums, failures = [], {}
    for reply in grid.send_and_receive(sent):
        node = reply.metadata.src_node_id
        if reply.has_error():
            failures[node] = reply.error.reason
            continue
        own = dict(reply.content[r.METRICS])
        try:
            check_importance("importance", encoder, own, Contributors(1, declared.get(node)))
        except InfeasibleSum as err:
            infeasible[node] = f"dropped: {err}"
            log(INFO, "importance: node %s dropped: %s", node, err)
            continue
        sums.append(own)
    return (metrics.combine(sums) if sums else {}), failures


def secure_sums(grid: Grid, nodes: list[int], encoder: FeatureEncoder, request: RecordDict, mode: str,
                threshold: int, declared: dict[int, float | None] | None = None
                ) -> tuple[dict[str, float], dict[int, str], dict]:
    """The sum of the sites' sums through one secure-sum session (module docstring); the sites lost, and the
    session's record. No sum (an empty dict) when the protocol could not give one."""
    sums = None
    try:  # FitSums raises TooFewSites when the key exchange leaves one site: its sums cannot be hidden
        sums = FitSums(grid, nodes, mode, threshold, phase="importance", declared=declared)
        total = sums.summed(messages.IMPORTANCE, dict(request[r.CONFIG]), request[r.ARRAYS], sums_layout(encoder),
                            fresh=True, check=lambda total, who: check_importance("importance", encoder, total, who))
    except InfeasibleSum as err:
        log(INFO, "importance: the summed loss sums were refused: %s", err)
        return {}, dict(sums.lost), {**sums.record(), "error": str(err)}
    except SecureProtocolError as err:
        log(INFO, "importance: the secure sum failed at node %s: %s", err.node, err.reason)
        lost = dict(err.lost) if isinstance(err, TooFewSites) else dict(sums.lost) if sums is not None else {}
        if err.node in nodes:
            lost.setdefault(err.node, err.reason)
        record = sums.record() if sums is not None else {"mode": mode}
        return {}, lost, {**record, "lost": {str(n): why for n, why in lost.items()}, "error": str(err)}
    return {key: float(value) for key, value in total.items()}, sums.lost, sums.record()
