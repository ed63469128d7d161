"""The one differential-privacy release of a site: every noised number it sends goes through here.

A hospital decides its own privacy in ``site.toml``: whether it is under DP, its lifetime budget (ε, δ),
and which share of ε each phase of a run may spend. The server only announces which phases a run will ask
for (``shared.protocol.privacy.RunPlan``). One rule, applied at the site, for every phase:

1. **Split at the site check.** Of what is left of the budget (``ε_left = ε − spent``, from the site's
   privacy ledger, ``client.ledger``; at most ``[privacy] epsilon_per_run`` when the site declares one, so a
   budget can last several runs, e.g. the refits of a deployed policy), phase ``p`` of the run's plan gets
   ``ε_p = share_p · ε_left``; DP-SGD training gets the rest of the run's phases (``1 − Σ share_p``). A
   phase whose share is 0, that has no DP form here, or for which nothing is left, is *refused*, with
   the reason, and the server does not ask it.
2. **Noise set once per phase.** At a phase's first release the site sets one noise multiplier σ for all
   the releases the server announces for the phase: the smallest σ such that the ledger's history so far
   plus those releases compose to at most ``ε(history) + ε_p`` (Rényi DP, Mironov 2017; Opacus'
   ``RDPAccountant``, via :func:`client.ledger.calibrate_noise`). So each phase adds at most its ε_p and
   the run never spends more than ``ε_left``, whatever the order of the phases.
3. **Check, charge, add noise.** Before each release the ledger checks that the phase's remaining releases
   still fit the budget; after it, the release is recorded with its phase (one ``(σ, 1.0, 1)`` history
   entry: a Gaussian mechanism on the whole table is the subsampled Gaussian at sample rate 1).

The mechanism (:func:`gaussian_release`): every released array is a :class:`Block` with a per-entry bound
``scale`` on how much one row (add/remove-one-row neighbouring) can change it and the number of entries
``touched`` one row can change at most. Divided by its scale, the whole release then has L2 sensitivity
``Δ = sqrt(Σ touched)``, and Gaussian noise of sd ``σ · Δ · scale`` on every entry is the Gaussian
mechanism with noise multiplier σ (Dwork & Roth 2014, "The Algorithmic Foundations of Differential
Privacy", Thm A.1), whose RDP is ``α / 2σ²`` (Mironov 2017, Prop. 7). A symmetric matrix block gets its
noise on the upper triangle, mirrored (its change in the upper triangle is bounded by the Frobenius norm,
so the same ``Δ`` holds; Wang 2018, Alg. 1). The noise comes from numpy's generator seeded by an HMAC,
under a secret key the site keeps (:func:`release_key`), of the release's run, phase, index and exact values:
the same release asked again in a resumed run is the same numbers, charged once (``client.ledger`` keeps the
release's tag); floating-point side channels of textbook Gaussian sampling (Mironov 2012) are not addressed.

DP-SGD training (``client.training``) is the other mechanism; it takes its σ from :func:`training_noise`
by the same rule and charges the same ledger, and its noise and batches from a seed keyed the same way
(:func:`training_seed`), never from the seed the coordinator sends.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context

from client.ledger import SITE_LEDGER_FILE, BudgetExhausted, LedgerError, PrivacyLedger, calibrate_noise
from shared.protocol.errors import ShareableError
from shared.protocol.privacy import ReleaseFacts, RunPlan, SitePrivacy
from shared.validation import privacy_shares

GAUSSIAN_SAMPLE_RATE = 1.0
"""A Gaussian mechanism on the whole table is the subsampled Gaussian at sample rate 1 (Mironov 2017)."""

DEFAULT_SHARES = {"statistics": 0.05, "evaluation": 0.05, "personalisation": 0.2, "boosting": 0.0, "policy": 0.1,
                  "adjuster": 0.0, "dose_response": 0.0, "importance": 0.0, "analytics": 0.0}
"""Share of what is left of a DP site's ε each phase may spend in a run, where ``site.toml
[privacy.shares]`` says nothing; DP-SGD training gets the rest of the run's phases. The statistics for the
encoder and the final evaluation are single releases of counts and sums, 5 % each; the policy's outcome-model
fit and off-policy estimates, 10 %; the personalised ANNs, trained by DP-SGD with their figures released
(``client.personalisation_handlers``; only in a run that asks for them), 20 %. Opt-in only (0 by default):
histogram boosting, which releases hundreds of histograms (measured, ``make run`` world, 5 DP clinics at 0.2
of ε = 3 over 243 releases: response AUC 0.48, efficacy R² −4.9e5 — noise); the dose adjuster (its noise
swamped the sums of the simulated clinics at 0.2 of ε = 3: ``client.adjustment_handlers``); analytics, a run of
their own."""

EXHAUSTED_REMAINDER = 0.01
"""A site with less than this share of its budget left is exhausted: noise set to spend such a crumb would
drown any release (the noise calibration itself leaves up to 0.1 % of a phase's ε unspent)."""

NO_DP_FORM = {
    "importance": "permutation importance has no DP form here: shuffling a feature moves one patient's value "
                  "into other rows, so one row's influence on the loss sums is not bounded",
    "dose_response": "the structured dose-response fit has no useful DP release: noise on one site's sums, at "
                     "their declared per-row bounds, swamps them (measured, benchmarks/structured_dp.py: even "
                     "all of ε = 3 on one gradient release leaves the dose coefficients' noise 3-50 times their "
                     "size); the fit runs over the sites without DP",
}
"""Phases a DP site always refuses, and why.

``dose_response`` (issue 12, item 1) was measured before being built (``benchmarks/structured_dp.py``, BENCHMARKS.md
"Structured policy under DP"): on the ``make run`` world (5 clinics, 10–640 first cycles per site; also 10
clinics) the Gaussian mechanism on each site's gradient and information, with the models' own
:class:`shared.dose_response.SumBound` bounds, adds noise whose effect on the dose coefficients (the
neutropenia and other-toxicity dose slopes, the response's Emax scale) has an sd of 7–150 — against values of
0.3–6 and sampling sds of 0.3–1.4 — even when the whole ε = 3 goes to a single gradient-only release at the
exact optimum with the information known for free. The designs that can run (5 noisy Newton steps; a fixed
noised information and 3 more gradient releases, with or without a ridge scaled by the noise; smaller models;
shares 0.1–0.4 of ε = 3) gave value / oracle 0.21–0.60 against no DP 0.81, and the best of them (0.49–0.56
at share 0.2, two noise draws) no better than the same designs fitted from noise alone (0.50–0.59): above
standard of care (0.49) on average only as random is (0.50), not from the data. So the share stays 0 and the
phase has no DP form. What would change it: far larger sites, central
DP over securely aggregated sums (one noise draw for the federation instead of one per site), or much tighter
per-row bounds (norm clipping of each row's whole contribution instead of per-entry ranges)."""

_STATE_RUN = "dp-run-budget"
_STATE_PHASE = "dp-phase-"


class PrivacyRefused(RuntimeError):
    """The site will not release this under DP (no share, no DP form, budget exhausted); says why."""


def declared_shares(site_config: Mapping[str, Any]) -> dict[str, float]:
    """The site's shares per phase: what ``site.toml [privacy.shares]`` declares (checked by
    ``shared.validation.privacy_shares``; the legacy ``[privacy] adjuster_share`` counts as ``adjuster``) over
    :data:`DEFAULT_SHARES`. Raises ``shared.validation.SiteConfigError`` (a ``ValueError``) naming the key."""
    return {**DEFAULT_SHARES, **privacy_shares(dict(site_config))}


@dataclass
class SiteDP:
    """A DP site's standing terms: its ledger (budget, δ, history) and its declared shares."""

    ledger: PrivacyLedger
    shares: dict[str, float]
    per_run: float | None = None  # site.toml [privacy] epsilon_per_run: the most one run may spend

    @classmethod
    def of(cls, folder: Path, site_config: Mapping[str, Any], state_dir: Path | None = None) -> SiteDP | None:
        """The terms of the site in ``folder`` whose ``site.toml`` is ``site_config``; None without DP.
        ``state_dir``: where the ledger's head copy is kept apart (``client.ledger``; None: the default)."""
        privacy = site_config.get("privacy", {})
        if not privacy.get("dp", False):
            return None
        ledger = PrivacyLedger.open(folder / SITE_LEDGER_FILE, float(privacy["epsilon"]), float(privacy["delta"]),
                                    state_dir=state_dir)
        per_run = privacy.get("epsilon_per_run")
        return cls(ledger, declared_shares(site_config), float(per_run) if per_run is not None else None)


@dataclass
class RunBudget:
    """ε per phase for this run at one site, fixed when the run's plan arrives (kept in the node's state)."""

    run_id: str
    epsilon: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    @classmethod
    def plan(cls, run_id: str, dp: SiteDP, plan: RunPlan) -> RunBudget:
        """Split what is left of the budget over the plan's phases (rule 1 of the module docstring)."""
        remaining = dp.ledger.remaining()
        left = remaining if dp.per_run is None else min(remaining, dp.per_run)
        budget = cls(str(run_id))
        others = [p for p in plan.phases if p != "training"]
        for phase in plan.phases:
            share = (1.0 - sum(dp.shares[p] for p in others if p not in NO_DP_FORM)
                     if phase == "training" else dp.shares[phase])
            if phase in NO_DP_FORM:
                budget.refused[phase] = NO_DP_FORM[phase]
            elif remaining <= EXHAUSTED_REMAINDER * dp.ledger.epsilon_budget:
                budget.refused[phase] = (f"privacy budget exhausted: spent ε={dp.ledger.spent():.3f} of "
                                         f"{dp.ledger.epsilon_budget:g} ({dp.ledger.path})")
            elif share <= 0:
                budget.refused[phase] = (f"site.toml gives {phase} no share of ε ([privacy.shares] {phase} = 0)"
                                         if phase != "training" else
                                         "site.toml's shares of the other phases leave nothing for training")
            else:
                budget.epsilon[phase] = share * left
        return budget

    def terms(self, dp: SiteDP) -> SitePrivacy:
        """What the site check reports."""
        return SitePrivacy(dp=True, epsilon_budget=dp.ledger.epsilon_budget, delta=dp.ledger.delta,
                           epsilon_spent=dp.ledger.spent(), epsilon=dict(self.epsilon), refused=dict(self.refused))

    def to_state(self) -> ConfigRecord:
        return ConfigRecord({"run-id": self.run_id, "phases": list(self.epsilon) or [""],
                             "epsilon": list(self.epsilon.values()) or [0.0],
                             "refused": list(self.refused) or [""], "reasons": list(self.refused.values()) or [""]})

    @classmethod
    def from_state(cls, state: ConfigRecord) -> RunBudget:
        phases = [p for p in state["phases"] if p]
        refused = [p for p in state["refused"] if p]
        return cls(str(state["run-id"]), dict(zip(phases, [float(e) for e in state["epsilon"]], strict=False)),
                   dict(zip(refused, [str(r) for r in state["reasons"]], strict=False)))


def start_run(context: Context, dp: SiteDP, plan: RunPlan) -> RunBudget:
    """Plan this run's budget when the site check brings the run's plan; kept for the run's later messages. A
    run that already has its plan (a resumed run checking its sites again: ``client.run_state``) keeps it, so
    its phases get the ε and noise they had before the coordinator stopped."""
    state = context.state.get(_STATE_RUN)
    if state is not None and str(state["run-id"]) == str(context.run_id):
        return RunBudget.from_state(state)
    budget = RunBudget.plan(str(context.run_id), dp, plan)
    context.state[_STATE_RUN] = budget.to_state()
    return budget


def run_budget(context: Context, dp: SiteDP, phase: str) -> RunBudget:
    """This run's budget; a run that skipped the site check gets one planned for ``phase`` alone."""
    state = context.state.get(_STATE_RUN)
    if state is not None and str(state["run-id"]) == str(context.run_id):
        return RunBudget.from_state(state)
    return start_run(context, dp, RunPlan((phase,)))


def phase_epsilon(context: Context, dp: SiteDP, phase: str) -> float:
    """ε this run may spend on ``phase``; :class:`PrivacyRefused` with the reason if none."""
    budget = run_budget(context, dp, phase)
    if phase in budget.refused:
        raise PrivacyRefused(f"{phase} refused under DP: {budget.refused[phase]}")
    if phase not in budget.epsilon:
        raise PrivacyRefused(f"{phase} was not in this run's plan when the site split its budget; it has no "
                             "share of ε in this run")
    return budget.epsilon[phase]


def noise_for_phase(epsilon: float, ledger: PrivacyLedger, sample_rate: float, steps: int) -> float:
    """Smallest σ such that the ledger's history plus ``steps`` at (σ, ``sample_rate``) adds at most ``epsilon``
    to what it has spent, and stays within the budget (rule 2)."""
    target = min(ledger.spent() + epsilon, ledger.epsilon_budget)
    try:
        return calibrate_noise(target, ledger.delta, sample_rate, steps, history=ledger.history)
    except BudgetExhausted as err:
        raise PrivacyRefused(f"no noise level lets {steps} release(s) fit ε={epsilon:.4g} "
                             f"(spent {ledger.spent():.3f} of {ledger.epsilon_budget:g}): {err}") from err


# ---------------------------------------------------------------------------------------------------------
# The Gaussian mechanism on blocks


@dataclass(frozen=True)
class Block:
    """One named array of a release and how much one row can change it.

    Parameters
    ----------
    values : ndarray
        The aggregate (float64).
    scale : ndarray or float
        Bound on the change of each entry when one row is added or removed (broadcast to ``values``).
    touched : int, default 1
        How many entries one row changes at most, once each is divided by its scale (each by at most 1); a
        block whose normalised change is bounded by 1 in L2 norm counts 1.
    symmetric : bool, default False
        A symmetric matrix: noise its upper triangle and mirror it.
    """

    values: np.ndarray
    scale: np.ndarray | float
    touched: int = 1
    symmetric: bool = False


def sensitivity(blocks: Mapping[str, Block]) -> float:
    """L2 sensitivity of the release once each entry is divided by its scale: ``sqrt(Σ touched)``."""
    return math.sqrt(sum(block.touched for block in blocks.values()))


def gaussian_release(blocks: Mapping[str, Block], sigma: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every block with Gaussian noise of sd ``sigma · sensitivity · scale`` per entry (module docstring).

    Raises ``ValueError`` if an entry has no finite scale (a column without a declared range): such an
    aggregate cannot be released under DP.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    sd = sigma * sensitivity(blocks)
    noised = {}
    for name, block in blocks.items():
        values = np.asarray(block.values, dtype=np.float64)
        scale = np.broadcast_to(np.asarray(block.scale, dtype=np.float64), values.shape)
        if not np.all(np.isfinite(scale)):
            raise ShareableError(f"'{name}' has no finite bound per row (a column without a declared range); "
                                 "a DP site cannot release it")
        noise = rng.standard_normal(values.shape)
        if block.symmetric:
            noise = np.triu(noise) + np.triu(noise, 1).T
        noised[name] = values + noise * sd * scale
    return noised


@dataclass
class PhaseRelease:
    """A phase's releases at a DP site in this run: noise set at the first, each checked and charged.

    Use :meth:`for_phase`; then :meth:`release` once per release the server asks for. With equal weights
    (the default) every release has the same σ (rule 2); with weights, release ``i`` gets the share ``wᵢ``
    of the phase's Rényi privacy loss: ``σᵢ = σ₁ / sqrt(wᵢ)``, σ₁ the noise of one release spending the
    phase's whole ε. A Gaussian release of the whole table has RDP ``α / 2σ²`` (Mironov 2017, Prop. 7), so
    the planned releases compose to ``α Σ wᵢ / 2σ₁² = α / 2σ₁²``: exactly the phase's ε, whatever the
    weights; each release is charged to the ledger with its own σ.
    """

    dp: SiteDP
    phase: str
    releases: int
    sigmas: tuple[float, ...]
    run_id: str
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    epsilon: float = math.nan
    """ε this phase may spend in this run (what the noise was calibrated for)."""
    spent_at_start: float = math.nan
    """The ledger's ε spent when the noise was set, so spent-in-this-run = spent now − this."""

    @property
    def sigma(self) -> float:
        """σ of the first release (of every release when the weights are equal)."""
        return self.sigmas[0]

    def sigma_at(self, index: int) -> float:
        """σ of release ``index``."""
        return self.sigmas[index]

    @classmethod
    def for_phase(cls, context: Context, dp: SiteDP, phase: str, releases: int,
                  weights: Sequence[float] | None = None) -> PhaseRelease:
        """The phase's plan: the noise from the state if this run already set it, else set now for
        ``releases`` (with ``weights``, one per release: their shares of the phase's privacy loss)."""
        if releases < 1:
            raise ValueError(f"a phase plans at least one release; got {releases!r}")
        key = _STATE_PHASE + phase
        state = context.state.get(key)
        if state is not None and str(state["run-id"]) == str(context.run_id):
            sigmas = tuple(float(v) for v in state["sigmas"]) if "sigmas" in state else \
                (float(state["sigma"]),) * int(state["releases"])
            return cls(dp, phase, int(state["releases"]), sigmas, str(context.run_id),
                       epsilon=float(state["epsilon"]), spent_at_start=float(state.get("spent-at-start", math.nan)))
        epsilon = phase_epsilon(context, dp, phase)
        spent = dp.ledger.spent()
        if weights is None:
            sigmas = (noise_for_phase(epsilon, dp.ledger, GAUSSIAN_SAMPLE_RATE, releases),) * releases
        else:
            sigmas = weighted_noise(epsilon, dp.ledger, release_shares(weights, releases))
        context.state[key] = ConfigRecord({"run-id": str(context.run_id), "releases": releases,
                                           "sigma": sigmas[0], "sigmas": list(sigmas), "epsilon": epsilon,
                                           "spent-at-start": spent})
        return cls(dp, phase, releases, sigmas, str(context.run_id), epsilon=epsilon, spent_at_start=spent)

    def charge(self, index: int, tag: str | None = None) -> None:
        """Check that releases ``index`` … ``releases − 1`` still fit the budget, then record release
        ``index`` with its σ; :class:`PrivacyRefused` if they do not. With ``tag`` (:func:`release_tag`), a
        release this run already charged with the same tag is not charged again, and releases of this run
        already charged are not counted twice in the check (a resumed run asking a phase again)."""
        if not 0 <= index < self.releases:
            raise PrivacyRefused(f"{self.phase}: release {index} is beyond the {self.releases} announced for this "
                                 "run; the site set its noise for those only")
        ledger = self.dp.ledger
        if tag is not None and ledger.released(self.run_id, self.phase, index, tag):
            return
        charged = ledger.charged_rounds(self.run_id, self.phase) if tag is not None else set()
        pending = [s for i, s in enumerate(self.sigmas) if i == index or (i > index and i not in charged)]
        try:
            ledger.check_affordable_steps([(s, GAUSSIAN_SAMPLE_RATE, 1) for s in pending])
        except BudgetExhausted as err:
            raise PrivacyRefused(f"{self.phase} refused: {err}") from err
        ledger.record(self.sigmas[index], GAUSSIAN_SAMPLE_RATE, 1, run_id=self.run_id, server_round=index,
                      phase=self.phase, release=tag)

    def release(self, blocks: Mapping[str, Block], index: int) -> tuple[dict[str, np.ndarray], ReleaseFacts]:
        """Charge release ``index``, then return the noised blocks and the facts to send with them.

        The noise is drawn from a generator seeded by the site's secret key over (run, phase, index, the exact
        values): asked the same release again in the same run (a resumed run redoing a phase), the site sends
        the very same numbers, which tell nothing new, and is charged once (:meth:`charge` with the tag); any
        other values get independent noise and a charge of their own."""
        sigma = self.sigma_at(index)
        released = release_content(blocks, sigma)
        key = release_key(self.dp.ledger)
        self.charge(index, release_tag(key, self.run_id, self.phase, index, released))
        noised = gaussian_release(blocks, sigma, np.random.default_rng(noise_seed(key, self.run_id, self.phase,
                                                                                  index, released)))
        return noised, self.facts(index, sigma * sensitivity(blocks))

    def facts(self, index: int, noise_sd: float) -> ReleaseFacts:
        ledger = self.dp.ledger
        return ReleaseFacts(self.phase, index, self.sigma_at(index), noise_sd, ledger.spent(),
                            ledger.epsilon_budget, ledger.delta)


RELEASE_KEY_FILE = "release.key"
"""The site's secret for release tags and noise seeds, next to its ledger (``.fednano/``), mode 0600."""
RELEASE_KEY_BYTES = 32


def release_key(ledger: PrivacyLedger) -> bytes:
    """The site's secret key (made on first use, kept next to its ledger; it never leaves the site): the
    coordinator can neither predict a release's noise nor tell from a tag what was released."""
    path = ledger.path.parent / RELEASE_KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) != RELEASE_KEY_BYTES:
            raise LedgerError(f"{path}: the site's release key must be {RELEASE_KEY_BYTES} bytes, found {len(key)}; "
                              "it was edited or truncated") from None
        return key
    key = secrets.token_bytes(RELEASE_KEY_BYTES)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def training_seed(ledger: PrivacyLedger, run_id: str, phase: str, index: int) -> int:
    """Seed of one DP-SGD training call's Poisson sampling and Gaussian noise: an HMAC under the site's secret key
    (:func:`release_key`) of its run, phase and index (round, or candidate). The seed the coordinator sends makes
    training reproducible without DP; under DP it must not set the noise or the batches: knowing the noise, the
    coordinator could take it out of the weights it receives, and knowing which rows each step drew, undo the
    subsampling's amplification. Keyed, a redone round of a resumed run still trains the same weights."""
    digest = _keyed_digest(release_key(ledger), b"dp-sgd-seed", run_id, phase, index, {})
    return int.from_bytes(digest[:8], "big") >> 1  # torch.manual_seed takes up to 2**63 - 1 here


def _keyed_digest(key: bytes, purpose: bytes, run_id: str, phase: str, index: int,
                  arrays: Mapping[str, np.ndarray]) -> bytes:
    """HMAC-SHA256 under the site's key of ``purpose``, the release's place (run, phase, index) and the exact
    arrays (names, dtypes, shapes, bytes)."""
    mac = hmac.new(key, purpose, hashlib.sha256)
    mac.update(json.dumps([str(run_id), phase, int(index)]).encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        mac.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode())
        mac.update(array.tobytes())
    return mac.digest()


def release_content(blocks: Mapping[str, Block], sigma: float) -> dict[str, np.ndarray]:
    """Everything a Gaussian release's output depends on besides its noise draws: each block's values, scale,
    touched entries and symmetry, and σ. Two releases equal in all of it are the same numbers under the same
    seed; any difference (even of scale alone) makes another tag and another seed, so the same draws never
    come out under two different scalings (which would reveal them)."""
    content = {"sigma": np.array([float(sigma)])}
    for name, block in blocks.items():
        values = np.asarray(block.values, dtype=np.float64)
        content[f"{name}/values"] = values
        content[f"{name}/scale"] = np.broadcast_to(np.asarray(block.scale, dtype=np.float64), values.shape)
        content[f"{name}/form"] = np.array([int(block.touched), int(bool(block.symmetric))])
    return content


def release_tag(key: bytes, run_id: str, phase: str, index: int, arrays: Mapping[str, np.ndarray]) -> str:
    """What a ledger entry keeps of a release (``client.ledger.PrivacyLedger.record``'s ``release``): equal for
    the same arrays at the same place of the same run, else different; without the key it says nothing."""
    return _keyed_digest(key, b"fednano/release-tag", run_id, phase, index, arrays).hex()


def noise_seed(key: bytes, run_id: str, phase: str, index: int, arrays: Mapping[str, np.ndarray]) -> int:
    """The seed of a Gaussian release's noise (independent of :func:`release_tag`, which the ledger shows)."""
    return int.from_bytes(_keyed_digest(key, b"fednano/noise-seed", run_id, phase, index, arrays), "big")


def release_shares(weights: Sequence[float], releases: int) -> tuple[float, ...]:
    """The planned releases' shares of the phase's privacy loss: ``weights`` normalised to sum 1.
    ``ShareableError`` unless there is one positive, finite weight per release."""
    values = [float(w) for w in weights]
    if len(values) != releases or not all(math.isfinite(w) and w > 0 for w in values):
        raise ShareableError(f"release weights must be {releases} positive numbers, one per planned release; "
                             f"got {values!r}")
    total = math.fsum(values)
    return tuple(w / total for w in values)


def weighted_noise(epsilon: float, ledger: PrivacyLedger, shares: Sequence[float]) -> tuple[float, ...]:
    """σ of each planned release such that release ``i`` has the share ``shares[i]`` of the Rényi loss and all of
    them compose after the ledger's history to at most ``epsilon`` more (see :class:`PhaseRelease`)."""
    one = noise_for_phase(epsilon, ledger, GAUSSIAN_SAMPLE_RATE, 1)
    target = min(ledger.spent() + epsilon, ledger.epsilon_budget)
    sigmas = tuple(one / math.sqrt(share) for share in shares)
    for _ in range(WEIGHTED_FIT_TRIES):  # equal in exact arithmetic; rounding may leave ~1e-15 over the target
        if ledger.epsilon_after_steps([(s, GAUSSIAN_SAMPLE_RATE, 1) for s in sigmas]) <= target:
            return sigmas
        sigmas = tuple(s * (1 + 1e-9) for s in sigmas)
    raise PrivacyRefused(f"no weighted noise lets {len(shares)} release(s) fit ε={epsilon:.4g}")


WEIGHTED_FIT_TRIES = 8


def training_noise(context: Context, dp: SiteDP, sample_rate: float, steps: int) -> float:
    """DP-SGD's σ for this run's training: set at the first round for all ``steps`` of the run (rule 2), then
    kept in the node's state for the later rounds."""
    key = _STATE_PHASE + "training"
    state = context.state.get(key)
    if state is not None and str(state["run-id"]) == str(context.run_id):
        return float(state["sigma"])
    epsilon = phase_epsilon(context, dp, "training")
    sigma = noise_for_phase(epsilon, dp.ledger, sample_rate, steps)
    context.state[key] = ConfigRecord({"run-id": str(context.run_id), "sigma": sigma, "epsilon": epsilon})
    return sigma
