"""What a hospital computes for the federated dose adjuster: sums over its own logged transitions, never rows.

Two query messages (``shared.dose_adjustment``):

- ``query.fqi_scaling`` — per state column and the dose: count, sum and centred sum of squares of the
  site's training-split transitions, for the federated feature scaling;
- ``query.fqi_ridge`` — at the server's current Q-function: the ridge-regression sufficient statistics
  ``A = Σ φφᵀ``, ``b = Σ φ y`` and ``n`` of one fitted-Q iteration (Ernst, Geurts & Wehenkel, JMLR 2005).

The transitions (``shared.dose_adjustment.site_transitions``) come from the site's ``episodes.csv`` and
``vitals.csv``, training split only (``shared.task.assign_split`` with the run's ``split-seed``, by patient,
as every other phase splits), and are kept in memory while the site's files are unchanged.

Differential privacy. A site whose ``site.toml`` enables DP releases these sums by sufficient-statistics
perturbation (Sheffet, "Differentially private ordinary least squares", ICML 2017; Wang, "Revisiting
differentially private linear regression: optimal and adaptive prediction & estimation in unbounded
domain", NeurIPS 2018), under add/remove-one-transition neighbouring (one row of the transition table, as
DP-SGD and analytics protect one episode row; a patient with k transitions is protected at k times the ε):

1. every transition's contribution is bounded (``shared.dose_adjustment``): the scaling sums clip each
   column to its public range; ``φ`` is scaled to norm ≤ ``C_φ = FEATURE_NORM_CLIP`` and ``|y|`` clipped to
   ``C_y = max|r| / (1 − γ)``;
2. each release is one Gaussian mechanism (Dwork & Roth 2014, App. A): every block divided by its per-row
   bound changes by at most 1 in L2 norm, so the release has L2 sensitivity ``Δ = sqrt(blocks)``, and noise
   of sd ``σ · Δ · bound`` makes it ``(α, α / 2σ²)``-RDP (Mironov 2017): the one DP release of the site
   (``client.dp``, phase ``adjuster``), charged to its privacy ledger. ``A`` gets symmetric noise (the upper
   triangle, mirrored) and is then projected onto
   the positive semi-definite cone (post-processing, free), so ``A + αI`` stays invertible at the server;
3. ``A`` and ``n`` do not depend on the iteration: they are released once, with the first iteration's
   ``b``, and the noisy values are kept in the node's context state for the run (keyed by run id, split
   seed and scaling), so later iterations release only ``b``. A fit is ``1 + iterations`` releases.

Budget split. The adjuster is the run's ``adjuster`` phase: it may spend ``[privacy.shares] adjuster`` of
what is left of the site's ε (``client.dp``; default 0, so a DP site refuses the adjuster unless it opts in),
for the fit's ``1 + iterations`` releases; before each release the site checks that the fit's remaining
releases still fit its budget and refuses (``ErrorCode.PRIVACY``) if not.

Utility (measured, not a guarantee). On the simulated clinics (5 clinics, seed 0, 115-2,881 transitions per
site) at ε = 3 × 0.2 = 0.6, δ = 1e-5: σ = 33.0 for 25 iterations (15.9 for 5); the noise dominates the sums
(correlation of the DP and exact coefficients −0.10 at 25 iterations, 0.23 at 5; the same best dose for 57 %
of the transitions, mostly because the ±25 % band leaves few doses). A useful DP adjuster needs more ε, fewer
iterations or larger sites.

Secure sum. When the run sums through the secure-sum protocol (the request carries a session:
``server.adjustment_phase``), the same sums — exact, or the very DP release above, charged once as above — leave
the site as one vector masked after the noise (``shared.protocol.adjustment.scaling_layout`` /
``ridge_layout``): the server learns only their sum over the sites. The scaling sums go as count and sums
about the columns' public midpoints (``shared.dose_adjustment.centred_scaling_sums``), which add; ``A``, ``b`` and
``n`` go with every iteration (a DP site's ``A`` and ``n`` the ones it noised once), so each iteration's sum is
over one set of sites.
"""

from __future__ import annotations

import hashlib

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.dp import Block, PhaseRelease, SiteDP
from client.secure_aggregation import masked_floats
from client.site import SiteHandlers, SiteRequest
from shared.dose_adjustment import (
    FEATURE_NORM_CLIP,
    DoseAdjuster,
    Transitions,
    bounded_scaling_sums,
    centred_scaling_sums,
    scaling_bounds,
    scaling_from_bounded,
    scaling_sums,
    site_transitions,
    target_bound,
)
from shared.protocol import ErrorCode, messages
from shared.protocol import records as r
from shared.protocol.adjustment import adjuster_from_request, ridge_layout, scaling_layout, sums_to_records
from shared.protocol.errors import ShareableError
from shared.protocol.hist import SECURE_SESSION
from shared.sum_vector import VALUES, SumsLayout
from shared.task import assign_split
from shared.validation import SiteData

STATE_KEY = "fqi-dp-gram"
"""The node's context-state entries holding this run's noisy ``A`` and ``n`` (ArrayRecord) and what they were
computed for (ConfigRecord ``STATE_KEY + "-for"``, see :func:`gram_key`)."""

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


# ---------------------------------------------------------------------------------------------------------
# The DP budget of the adjuster


def nearest_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric matrix's projection onto the positive semi-definite cone (negative eigenvalues → 0;
    Higham 1988, "Computing a nearest symmetric positive semidefinite matrix", Linear Algebra Appl. 103)."""
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.maximum(eigenvalues, 0.0)) @ vectors.T


def adjuster_release(context: Context, dp: SiteDP, iterations: int) -> PhaseRelease:
    """The fit's releases at a DP site: 1 (scaling) + ``iterations`` (ridge sums)."""
    return PhaseRelease.for_phase(context, dp, "adjuster", releases=1 + int(iterations))


# ---------------------------------------------------------------------------------------------------------
# DP releases


def private_scaling_sums(transitions: Transitions, release: PhaseRelease) -> tuple[dict[str, np.ndarray], object]:
    """Release 0: the noised :func:`~shared.dose_adjustment.bounded_scaling_sums` as count, sum and M2, and
    the release's facts.

    Each of the three blocks (``w`` columns) changes by at most ``sqrt(w)`` once divided by its per-entry
    bound, so each is scaled by ``sqrt(w)`` to the unit bound a :class:`client.dp.Block` of ``touched`` 1
    means."""
    sums, bounds = bounded_scaling_sums(transitions), scaling_bounds()
    width = float(np.sqrt(len(bounds["count"])))
    noised, facts = release.release({k: Block(v, bounds[k] * width) for k, v in sums.items()}, 0)
    return scaling_from_bounded(noised), facts


def gram_key(run_id: object, split_seed: int, adjuster: DoseAdjuster) -> str:
    """What the cached noisy ``A`` depends on: the run, the split and the server's feature scaling."""
    scaling = np.concatenate([adjuster.mean_, adjuster.scale_]).astype(np.float64).tobytes()
    return f"{run_id}/{split_seed}/{hashlib.sha256(scaling).hexdigest()}"


def private_ridge_sums(adjuster: DoseAdjuster, transitions: Transitions, iteration: int, split_seed: int,
                       release: PhaseRelease, context: Context) -> tuple[dict[str, np.ndarray], object]:
    """Release ``1 + iteration``: noised ``b``, with ``A`` and ``n`` noised once per run and then reused;
    and the release's facts.

    Bounds (:meth:`~shared.dose_adjustment.DoseAdjuster.clipped_ridge_sums`): ``‖ΔA‖_F ≤ C_φ²``,
    ``‖Δb‖ ≤ C_φ C_y``, ``|Δn| ≤ 1``."""
    sums = adjuster.clipped_ridge_sums(transitions)
    b_scale = FEATURE_NORM_CLIP * target_bound(adjuster.gamma)
    key = gram_key(context.run_id, split_seed, adjuster)
    cached_for = context.state.get(STATE_KEY + "-for")
    if cached_for is not None and str(cached_for["key"]) == key:
        cached = context.state[STATE_KEY]
        noised, facts = release.release({"moment": Block(sums["moment"], b_scale)}, 1 + iteration)
        return {"gram": cached["gram"].numpy(), "moment": noised["moment"], "n": cached["n"].numpy()}, facts
    noised, facts = release.release({"gram": Block(sums["gram"], FEATURE_NORM_CLIP**2, symmetric=True),
                                     "n": Block(sums["n"], 1.0), "moment": Block(sums["moment"], b_scale)},
                                    1 + iteration)
    gram, n = nearest_psd(noised["gram"]), np.maximum(noised["n"], 0.0)
    context.state[STATE_KEY] = ArrayRecord({"gram": Array(gram), "n": Array(n)})
    context.state[STATE_KEY + "-for"] = ConfigRecord({"key": key})
    return {"gram": gram, "moment": noised["moment"], "n": n}, facts


# ---------------------------------------------------------------------------------------------------------
# Registration


def masked_sums(sums: dict[str, np.ndarray], layout: SumsLayout, request: SiteRequest) -> RecordDict:
    """A secure request's answer: ``sums`` laid out as one vector (``shared.protocol.adjustment``), in fixed
    point and masked (``client.secure_aggregation.masked_floats``); the noise of a DP site is already in them."""
    try:
        vector = layout.vector(sums)
    except ValueError as err:
        raise ShareableError(str(err)) from None
    return RecordDict({r.ARRAYS: ArrayRecord({VALUES: masked_floats(vector, request.config, request.context)})})


def answer_sums(name: str):
    """The handler of ``query.fqi_scaling`` or ``query.fqi_ridge``: exact sums, or noised under DP; under the
    secure sum (the request names a session) as one masked vector (:func:`masked_sums`)."""

    def sums(msg: Message, request: SiteRequest) -> RecordDict:
        adjuster, split_seed = adjuster_from_request(msg.content)
        transitions = training_transitions(request.site, split_seed)
        scaling = name == messages.FQI_SCALING.action
        facts = None
        if request.dp is None:
            released = scaling_sums(transitions) if scaling else adjuster.ridge_sums(transitions)
        else:
            release = adjuster_release(request.context, request.dp, adjuster.iterations)
            if scaling:
                released, facts = private_scaling_sums(transitions, release)
            else:
                iteration = int(msg.content[r.CONFIG]["iteration"])
                released, facts = private_ridge_sums(adjuster, transitions, iteration, split_seed, release,
                                                     request.context)
        if SECURE_SESSION in request.config:
            content = (masked_sums(centred_scaling_sums(released), scaling_layout(), request) if scaling
                       else masked_sums(released, ridge_layout(adjuster), request))
        else:
            content = sums_to_records(released)
        if facts is not None:
            content[r.PRIVACY] = facts.to_record()
        return content

    return sums


def register_adjustment(client: ClientApp, handlers: SiteHandlers) -> None:
    """Add the ``fqi_scaling`` and ``fqi_ridge`` query handlers to ``client``."""
    for message in (messages.FQI_SCALING, messages.FQI_RIDGE):
        client.query(message.action)(handlers(answer_sums(message.action), ErrorCode.ADJUSTMENT_REQUEST))
