"""The coordinator's side of the structured dose-response models: Newton–Raphson over the sites' summed sums.

For each outcome model of :class:`shared.structured_policy.StructuredDosingPolicy` (tumour response,
neutropenia, other toxicity), the server drives :class:`shared.dose_response.NewtonRaphson`: it sends the
model and the coefficients the solver asks for (``query.dose_response_sums``), adds the sites' gradient,
information, log-likelihood and count (:func:`shared.dose_response.add_sums`) and takes the next penalised
Newton step, until the Newton decrement is below the model's tolerance. Then one ``query.dose_response_support``
collects the sites' support counts. This is :func:`shared.structured_policy.fit_structured_policy` with the
sums computed at the sites, so the federated policy equals the pooled one up to rounding (Karr et al., JCGS
2005; Wu et al., JAMIA 2012 "GLORE"). Every evaluation is one message round: ~10–25 per model.

A site that fails the first request of a model is left out of the fit and named in the log; a site that fails
later would make the sums inconsistent, so the fit stops with :class:`DoseResponseFailed`. Sites under DP
refuse the phase (``client.dose_response_handlers``) and are not asked: per-site noise on these sums was
measured to swamp them (``benchmarks/structured_dp.py``), so there is no DP form and no planned release count.

Secure sum. With the run's ``secure-sum`` pairwise or recovering (and two sites or more), every request goes
through the one secure-sum protocol (``server.secure_fit.FitSums``): each Newton evaluation as one masked vector
of gradient, information (upper triangle), log-likelihood and count (``shared.protocol.dose_response.
sums_layout``), the support as one masked vector of counts; the server sees only the sums over the sites, the
plain fit's within the fixed-point rounding. Nothing but the request (the model's public specification and the
coefficients; the formulation ids) travels in the clear. Lost sites:

- pairwise: a site that fails the first evaluation of a model is left out (keys exchanged anew without it), as
  without the secure sum; a site lost later stops the fit with :class:`DoseResponseFailed`, as today; a key
  exchange that leaves one site (``server.secure_fit.TooFewSites``) stops the fit before any sum is asked, with a
  :class:`DoseResponseFailed` naming the lost sites: the policy phase then builds the ensemble candidate instead
  and the record's ``structured.reason`` says why (``server.policy_phase.run_policy_phase``);
- recovering: the sum survives the site, and the model's Newton–Raphson starts again from its start over the
  sites whose input arrived: step halving compares the objective across evaluations, and a sum over other sites
  is another objective, so an evaluation over fewer sites cannot continue the old path. The model is then exactly
  the plain fit over the survivors (no site is under DP here, so a second path costs no privacy budget, only its
  rounds); models fitted before the loss keep their sites, as a site failing a later model's first request
  leaves them today, and the support is summed over the sites of the last model whose counts arrived.

Feasibility (``shared.fit_bounds``). Every Newton evaluation's sums are checked against what is public: the
model's per-row bounds at the coefficients sent and the sites' declared row counts (the site check). In the clear
a site whose own sums are infeasible is dropped and named (``info["infeasible"]``; a model it is dropped from
after its first evaluation starts again over the others, and the models fitted before with it are fitted
again); a masked sum that is infeasible refuses the fit
(:class:`DoseResponseFailed` naming the model, the entry and the bound, never a value: the policy phase then builds
the ensemble candidate). The support counts are checked too (≥ 0, adding to at most the declared rows): a site
whose counts are not is dropped from every model as above; a masked sum that is not refuses the fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from server.secure_aggregation import SecureProtocolError
from server.secure_fit import FitSums, TooFewSites
from shared.dose_response import DoseResponseModel, NewtonRaphson, add_sums
from shared.dosing_policy import FORMULATION_FEATURES
from shared.fit_bounds import check_dose_response, check_support
from shared.protocol import messages
from shared.protocol import records as r
from shared.protocol.dose_response import (
    summed_sums,
    sums_layout,
    sums_of,
    sums_request,
    support_of,
    support_request,
)
from shared.protocol.hist import secure_sum_mode
from shared.schema import TUMOUR_TYPES
from shared.secure_sum import MIN_SITES
from shared.structured_policy import DOSE_BIN_CENTRES_MG_M2, StructuredDosingPolicy, StructuredObjective, Support
from shared.sum_bounds import Contributors, InfeasibleSum
from shared.toxicity_model import NeutropeniaModel, OtherToxicityModel
from shared.tumour_response import TumourResponseModel


class DoseResponseFailed(RuntimeError):
    """The federated fit could not be completed (no site answered, or a site failed mid-fit)."""


def _ask(grid: Grid, nodes: list[int], content: RecordDict, message_type: str, strict: bool
         ) -> tuple[list[RecordDict], list[int]]:
    """Send ``content`` to ``nodes``; the replies' contents and the nodes that answered. ``strict``: a node
    that fails is a :class:`DoseResponseFailed`."""
    sent = [Message(content, dst_node_id=node, message_type=message_type) for node in nodes]
    replies, answered = [], []
    for reply in grid.send_and_receive(sent):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(INFO, "dose-response: node %s did not answer %s: %s", node, message_type, reply.error.reason)
            continue
        replies.append(reply.content)
        answered.append(node)
    missing = sorted(set(nodes) - set(answered))
    if missing and strict:
        raise DoseResponseFailed(f"node(s) {missing} failed during the fit; the sums would be partial")
    if not replies:
        raise DoseResponseFailed(f"no site answered {message_type}")
    return replies, answered


def infeasible_sites(model: DoseResponseModel, coef: np.ndarray, replies: list[RecordDict], answered: list[int],
                     declared: Mapping[int, float | None], infeasible: dict) -> set[int]:
    """The sites of ``answered`` whose own sums (``secure-sum = off``) break ``shared.fit_bounds`` with their
    declared row count; each named in ``infeasible`` (site → the bound) and the log."""
    dropped = set()
    for content, node in zip(replies, answered, strict=True):
        try:
            check_dose_response(f"dose-response: {type(model).__name__}", model, coef, sums_of(content),
                                Contributors(1, declared.get(node)))
        except InfeasibleSum as err:
            infeasible[node] = f"dropped: {err}"
            dropped.add(node)
            log(INFO, "dose-response: node %s dropped: %s", node, err)
    return dropped


def fit_model(grid: Grid, nodes: list[int], model: DoseResponseModel, split_seed: int,
              declared: Mapping[int, float | None] | None = None, infeasible: dict | None = None
              ) -> tuple[DoseResponseModel, list[int]]:
    """Fit ``model`` by Newton–Raphson on the summed sums of ``nodes``; returns it fitted and the nodes in it.

    Every site's sums are checked alone (``shared.fit_bounds``, ``declared``: site → its site-check row count); a
    site whose sums are infeasible is dropped and named in ``infeasible``, and a model it was dropped from after
    its first evaluation starts again over the others (step halving compares objectives over one set of sites)."""
    declared = declared or {}
    infeasible = infeasible if infeasible is not None else {}
    answering = list(nodes)
    while True:
        solver = NewtonRaphson.for_model(model)
        coef, restart = solver.start, False
        while coef is not None:
            replies, answered = _ask(grid, answering, sums_request(model, coef, split_seed),
                                     messages.DOSE_RESPONSE_SUMS.type, strict=solver.best_coef is not None)
            dropped = infeasible_sites(model, coef, replies, answered, declared, infeasible)
            answering = [node for node in answered if node not in dropped]
            if not answering:
                raise DoseResponseFailed(f"{type(model).__name__}: every site's sums were infeasible (dropped)")
            if dropped and solver.best_coef is not None:
                restart = True
                break
            try:
                coef = solver.update(coef, add_sums([sums_of(content) for content, node in
                                                     zip(replies, answered, strict=True) if node not in dropped]))
            except np.linalg.LinAlgError as err:
                raise DoseResponseFailed(f"{type(model).__name__}: Newton step failed: {err}") from err
        if not restart:
            break
    model.adopt(solver)
    log(INFO, "dose-response: %s over %d site(s), %d rows, %d Newton iterations, converged %s",
        type(model).__name__, len(answering), model.n_, model.n_iter_, model.converged_)
    return model, answering


def feasibility(model: DoseResponseModel, coef: np.ndarray):
    """The check of one masked Newton evaluation's sum (``shared.fit_bounds``, at the coefficients sent)."""
    return lambda total, who: check_dose_response(f"dose-response: {type(model).__name__}", model, coef, total, who)


def fit_model_secure(sums: FitSums, model: DoseResponseModel, split_seed: int) -> tuple[DoseResponseModel, list[int]]:
    """Fit ``model`` by Newton–Raphson on secure sums (module docstring: a site lost in recovering mode starts the
    model again over the survivors); returns it fitted and the nodes in its sums."""
    layout = sums_layout(model)
    while True:
        solver = NewtonRaphson.for_model(model)
        coef, members = solver.start, None
        while coef is not None:
            request = sums_request(model, coef, split_seed)
            total = sums.summed(messages.DOSE_RESPONSE_SUMS, dict(request[r.CONFIG]), request[r.ARRAYS], layout,
                                fresh=members is None, check=feasibility(model, coef))
            if members is not None and sums.summed_nodes != members:
                break
            members = sums.summed_nodes
            try:
                coef = solver.update(coef, summed_sums(total))
            except np.linalg.LinAlgError as err:
                raise DoseResponseFailed(f"{type(model).__name__}: Newton step failed: {err}") from err
        else:
            model.adopt(solver)
            log(INFO, "dose-response: %s over %d site(s), secure sum (%s), %d rows, %d Newton iterations, "
                "converged %s", type(model).__name__, len(members), sums.mode, model.n_, model.n_iter_,
                model.converged_)
            return model, members
        gone = sorted(set(members) - set(sums.summed_nodes))
        sums.restarts += 1
        log(INFO, "dose-response: %s: node(s) %s lost after %d Newton iterations; starting again over %d site(s)",
            type(model).__name__, gone, solver.iterations, len(sums.summed_nodes))


def fit_structured_policy_federated(grid: Grid, nodes: list[int], formulations: Mapping[str, Mapping[str, float]],
                                    split_seed: int, objective: StructuredObjective | None = None,
                                    secure_sum: str | bool = "off", secure_threshold: int = 0,
                                    declared: Mapping[int, float | None] | None = None
                                    ) -> tuple[StructuredDosingPolicy, dict]:
    """The structured policy from the sites' sums: three models fitted by federated Newton–Raphson and the
    support from summed counts; returns the policy and what the run record keeps (sites, iterations, and the
    secure sum's mode, bytes and lost sites). With ``secure_sum`` pairwise or recovering and two sites or more,
    every sum goes through the secure-sum protocol (module docstring). ``declared`` (site → its site-check row
    count) caps the row counts of the feasibility checks (``shared.fit_bounds``): an infeasible masked sum refuses
    the fit (DoseResponseFailed naming the model, the entry and the bound), an infeasible site in the clear is
    dropped (``info["infeasible"]``)."""
    catalogue = {str(k): {name: float(v[name]) for name in FORMULATION_FEATURES} for k, v in formulations.items()}
    if not nodes:
        raise DoseResponseFailed("no site without DP to fit the structured models over (DP sites refuse it)")
    fitted, info = {}, {"iterations": {}, "rows": {}, "infeasible": {}}
    declared = dict(declared or {})
    mode = secure_sum_mode(secure_sum)
    answering = list(nodes)
    ids = tuple(sorted(catalogue))
    models = (("response", TumourResponseModel), ("neutropenia", NeutropeniaModel),
              ("other_toxicity", OtherToxicityModel))
    if mode != "off" and len(nodes) >= MIN_SITES:
        try:
            sums = FitSums(grid, answering, mode, secure_threshold, phase="dose-response", declared=declared)
            for key, cls in models:
                fitted[key], answering = fit_model_secure(sums, cls(catalogue), split_seed)
                info["iterations"][key], info["rows"][key] = fitted[key].n_iter_, fitted[key].n_
            request = dict(support_request(ids, split_seed)[r.CONFIG])
            counts = sums.summed_counts(messages.DOSE_RESPONSE_SUPPORT, request, ArrayRecord())
            check_support("dose-response: support", counts, sums.contributors())
        except TooFewSites as err:
            raise DoseResponseFailed(f"the dose-response fit was stopped: {err.reason}") from None
        except InfeasibleSum as err:
            raise DoseResponseFailed(f"the dose-response fit was refused: {err}") from None
        except SecureProtocolError as err:
            hint = (" (pairwise masks: a site lost after the key exchange leaves its masks in the sum; secure-sum = "
                    "recovering survives it)" if mode == "pairwise" else "")
            raise DoseResponseFailed(f"the secure sum of the dose-response fit failed at node {err.node}: "
                                     f"{err.reason}{hint}") from None
        answering = sums.summed_nodes
        support = Support(ids, counts.astype(float).reshape(len(ids), len(TUMOUR_TYPES),
                                                            len(DOSE_BIN_CENTRES_MG_M2)))
        info["secure_sum"] = sums.record()
    else:
        while True:  # a site dropped as infeasible is dropped from every model: those before it are fitted again
            dropped = len(info["infeasible"])
            for key, cls in models:
                fitted[key], answering = fit_model(grid, answering, cls(catalogue), split_seed, declared,
                                                   info["infeasible"])
                info["iterations"][key], info["rows"][key] = fitted[key].n_iter_, fitted[key].n_
            replies, answering = _ask(grid, answering, support_request(ids, split_seed),
                                      messages.DOSE_RESPONSE_SUPPORT.type, strict=True)
            own = dict(zip(answering, (support_of(content) for content in replies), strict=True))
            for node, counts in own.items():
                try:
                    check_support("dose-response: support", counts, Contributors(1, declared.get(node)))
                except InfeasibleSum as err:
                    info["infeasible"][node] = f"dropped: {err}"
                    log(INFO, "dose-response: node %s dropped: %s", node, err)
            answering = [node for node in answering if node not in info["infeasible"]]
            if not answering:
                raise DoseResponseFailed("every site's support counts were infeasible (dropped)")
            if len(info["infeasible"]) == dropped:
                break
        support = Support(ids, sum(own[node] for node in answering))
        info["secure_sum"] = {"mode": "off"}
    policy = StructuredDosingPolicy(response=fitted["response"], neutropenia=fitted["neutropenia"],
                                    other_toxicity=fitted["other_toxicity"], support=support, formulations=catalogue,
                                    objective=objective or StructuredObjective())
    info["nodes"] = answering
    return policy, info
