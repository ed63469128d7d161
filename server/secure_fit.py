"""A model fit's summed releases through the one secure-sum protocol (``server.secure_aggregation``).

The dose adjuster's fitted-Q iteration (``server.adjustment_phase``) and the structured dose–response Newton steps
(``server.dose_response_phase``) ask the same sites for sums again and again, each time at new coefficients. A
:class:`FitSums` asks every such request through one :class:`~server.secure_aggregation.SecureSession` in the
run's mode, each release one float vector laid out by a :class:`shared.sum_vector.SumsLayout` and sent in
fixed point, masked (``client.secure_aggregation.masked_floats``), so the server learns only the sum over sites. The
permutation importance (``server.importance_phase``) asks its one release of loss sums through a
:class:`FitSums` too.

Sites lost, by mode:

- ``pairwise``: one key exchange, then every site of the key table must answer every release (a lost site's masks
  would stay in the sum): a failure is :class:`~server.secure_aggregation.SecureProtocolError`. Only at a
  release the caller marks ``fresh`` (before anything was summed that later sums must match: the first request
  of a fit) is a failing site left out: the keys are exchanged anew without it and the release asked again.
  A key exchange that leaves fewer than :data:`shared.secure_sum.MIN_SITES` sites (one site's sum is its own
  values: nothing hides them) is :class:`TooFewSites`, raised by :meth:`FitSums.start` before any release is
  asked, whoever the caller (so no fit depends on the lone site refusing to mask without peers).
- ``recovering``: the session survives up to n − t sites lost in any round; :attr:`FitSums.summed_nodes` says
  whose input is in the last sum, and the caller decides what a changed set means for its fit.

:attr:`FitSums.privacy` gives the DP facts of the sites in the last sum (a DP site adds noise before masking and
says so in its reply's ``privacy`` record, as in the statistics and analytics phases).

Feasibility (``shared.fit_bounds``). A release may carry a ``check``: it gets the summed arrays and
:meth:`FitSums.contributors` (the declared row counts of the sites in the sum, from ``declared``, and the noise sd
each DP site among them stated) and raises :class:`shared.sum_bounds.InfeasibleSum` for a sum no honest sites could
send; :meth:`FitSums.summed` records it in :attr:`FitSums.infeasible` (kept by :meth:`FitSums.record`) and lets it
propagate, so the fit refuses the release (the caller names phase, entry and bound, never a value). This is the
shared hook of the model fits on the secure session: it lives here, not in ``server.secure_aggregation``.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from server.secure_aggregation import SecureProtocolError, SecureSession
from shared.protocol import records as r
from shared.protocol.messages import MessageName
from shared.secure_sum import MIN_SITES
from shared.sum_bounds import Contributors, InfeasibleSum
from shared.sum_vector import VALUES, SumsLayout

SumCheck = Callable[[dict[str, np.ndarray], Contributors], None]
"""A summed release's feasibility check (``shared.fit_bounds``): raises InfeasibleSum."""


class TooFewSites(SecureProtocolError):
    """A secure-sum session left with fewer than :data:`~shared.secure_sum.MIN_SITES` sites: nothing may be summed.

    Attributes
    ----------
    phase : str                 the fit whose session it is (``dose-response``, ``fitted-Q``, ``importance``)
    left : list of int          the sites still in the session
    lost : dict of int to str   every site lost or left out so far, and why
    """

    def __init__(self, phase: str, left: list[int], lost: dict[int, str], when: str) -> None:
        self.phase, self.left, self.lost = phase, list(left), dict(lost)
        gone = "; ".join(f"node {n}: {why}" for n, why in self.lost.items()) or "none"
        super().__init__(next(iter(self.lost), -1), f"{phase}: {len(self.left)} site(s) left {when} (lost: {gone}), "
                                                    f"fewer than {MIN_SITES} to hide a sum among; nothing is summed")


class FitSums:
    """One fit's secure sums over ``nodes`` in ``mode`` (pairwise | recovering; module docstring).

    Parameters
    ----------
    grid : Grid
    nodes : list of int
    mode : str                  pairwise | recovering
    threshold : int, default 0  recovering: the Shamir threshold (0: ⌊n/2⌋ + 1)
    phase : str, default "fit"  the fit's name in errors and logs (``dose-response``, ``fitted-Q``, ``importance``)
    declared : dict, optional   site → its site-check row count (None: it declared none, a DP site), for
                                :meth:`contributors`; a site missing from it declared none

    Raises
    ------
    TooFewSites
        Fewer than ``MIN_SITES`` sites to start with, or left after the pairwise key exchange (:meth:`start`).
    """

    def __init__(self, grid: Grid, nodes: list[int], mode: str, threshold: int = 0, phase: str = "fit",
                 declared: dict[int, float | None] | None = None) -> None:
        if mode not in ("pairwise", "recovering"):
            raise ValueError(f"a fit's secure sums are pairwise or recovering; got {mode!r}")
        self.grid, self.mode, self.threshold, self.phase = grid, mode, int(threshold), phase
        self.left_out: dict[int, str] = {}  # pairwise: sites left out at a fresh release (keys exchanged anew)
        self.releases = 0
        self.restarts = 0  # fits started again over the survivors of a lost site (the caller counts them)
        self.retired_bytes = (0, 0)
        self.declared = dict(declared or {})
        self.infeasible: dict[str, str] = {}  # "sum" → the bound the refused release broke
        self.session = self.start(list(nodes))

    def start(self, nodes: list[int]) -> SecureSession:
        """A new session over ``nodes`` (pairwise: keys exchanged; a site that fails it is left out). Raises
        :class:`TooFewSites` when fewer than ``MIN_SITES`` sites are there to begin with or are left after the key
        exchange: one site's "sum" would be its own values, so no release may be asked of it."""
        if len(nodes) < MIN_SITES:
            raise TooFewSites(self.phase, nodes, self.left_out, "to ask")
        session = SecureSession(self.grid, nodes, self.mode, threshold=self.threshold)
        if self.mode == "pairwise":
            session.exchange_keys()  # a site that fails it is left out (session.lost)
            if len(session.nodes) < MIN_SITES:
                self.left_out.update(session.lost)
                log(INFO, "secure fit: %s: %d site(s) left after the pairwise key exchange: no sum asked",
                    self.phase, len(session.nodes))
                raise TooFewSites(self.phase, session.nodes, self.left_out, "after the pairwise key exchange")
        return session

    @property
    def nodes(self) -> list[int]:
        """The sites the next release asks."""
        return list(self.session.nodes)

    @property
    def summed_nodes(self) -> list[int]:
        """The sites whose input is in the last sum."""
        return sorted(self.session.summed_nodes)

    @property
    def lost(self) -> dict[int, str]:
        """Every site lost or left out so far, and why."""
        return {**self.left_out, **self.session.lost}

    @property
    def bytes(self) -> dict[str, int]:
        """Payload bytes sent to the sites (down) and back (up), every round of the protocol included."""
        return {"down": self.retired_bytes[0] + self.session.bytes_down,
                "up": self.retired_bytes[1] + self.session.bytes_up}

    @property
    def privacy(self) -> list[tuple[int, dict]]:
        """(node, DP facts) of the sites in the last sum that released under DP."""
        return [(n, dict(self.session.replies[n][r.PRIVACY])) for n in self.summed_nodes
                if n in self.session.replies and r.PRIVACY in self.session.replies[n]]

    def contributors(self) -> Contributors:
        """What is public about the sites of the last sum (``shared.sum_bounds``): their declared row counts
        (None if one declared none) and the noise sd each DP site among them stated."""
        nodes = self.summed_nodes
        rows = [self.declared.get(n) for n in nodes]
        noise = tuple(float(facts["noise-sd"]) for _, facts in self.privacy if "noise-sd" in facts)
        return Contributors(len(nodes), None if any(v is None for v in rows) else float(sum(rows)), noise)

    def summed(self, message: MessageName, config: dict, arrays: ArrayRecord, layout: SumsLayout,
               fresh: bool = False, check: SumCheck | None = None) -> dict[str, np.ndarray]:
        """The sum over the sites of one release of float sums, cut into ``layout``'s arrays. ``fresh``: a pairwise
        failure leaves the failing site out and asks again under new keys (module docstring). ``check``: the
        release's feasibility check; an infeasible sum is recorded and its InfeasibleSum raised."""
        while True:
            try:
                total = self.session.summed_floats(message, config, arrays, VALUES)
                break
            except SecureProtocolError as err:
                if self.mode != "pairwise" or not fresh or err.node not in self.session.nodes:
                    raise
                self.left_out.update(self.session.lost)
                self.left_out[err.node] = err.reason
                rest = [n for n in self.session.nodes if n != err.node]
                self.retired_bytes = (self.bytes["down"], self.bytes["up"])
                self.session = self.start(rest)  # TooFewSites when fewer than MIN_SITES are left
                log(INFO, "secure fit: %s: node %s left out (%s); keys exchanged anew over %d sites",
                    message.action, err.node, err.reason, len(self.session.nodes))
        self.releases += 1
        sums = layout.sums(total)
        if check is not None:
            try:
                check(sums, self.contributors())
            except InfeasibleSum as err:
                self.infeasible["sum"] = str(err)
                raise
        return sums

    def summed_counts(self, message: MessageName, config: dict, arrays: ArrayRecord) -> np.ndarray:
        """The int64 sum over the sites of one release of integer counts (no fixed point)."""
        self.releases += 1
        return self.session.summed(message, config, arrays, VALUES)

    def record(self) -> dict:
        """What the run record keeps of the fit's secure sums."""
        return {"mode": self.mode, "releases": self.releases, "restarts": self.restarts, "bytes": self.bytes,
                "lost": {str(n): why for n, why in self.lost.items()}, "infeasible": dict(self.infeasible)}
