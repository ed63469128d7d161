"""Feasible ranges of a site's release-gate value sums: a poisoned site's pull on the gate bounded by what is public.

The release gate (``server.policy_phase.value_at_sites``, ``shared.off_policy.gate``) ships a candidate policy
only if the sites' summed doubly-robust differences put the lower 95 % bound of (candidate − standard of care)
above 0; each site sends :class:`shared.off_policy.ValueSums` in the clear (n, Σ Γ(candidate), Σ Γ(standard),
Σ d, Σ d² with d = Γ(candidate) − Γ(standard)). What every honest site's release satisfies
(``client.ope.site_value_sums``), with N the site's declared row count (site check; none for a DP site) and
G = ``G_MAX``:

- ``0 ≤ n ≤ N`` (n counts held-out first cycles, rows of its episode table);
- ``|Σ Γ(standard)| ≤ n · G`` (every Γ is clipped to ±G, ``shared.off_policy.dr_terms``);
- ``Σ Γ(candidate) ≤ n · G``: a cycle on the logs' support has the clipped Γ; off the support it has
  ``Γ(standard) + min(lower, Γ(candidate) − Γ(standard)) ≤ Γ(candidate) ≤ G`` (``client.ope.off_support_credit``);
- ``Σ d = Σ Γ(candidate) − Σ Γ(standard)`` (the same rows' difference) and ``Σ d ≤ n · 2G``;
- ``Σ d² ≥ 0`` and, without DP, ``Σ d² ≥ (Σ d)² / n`` (Cauchy–Schwarz).

The lower limits a cycle off the support could reach are not public (the models' lower confidence bound), so
nothing bounds a site's release from below but ``Σ d² ≥ 0``: a site can pull the gate towards refusing, but
towards passing at most by its rows' share of ``2G`` per cycle — which is what matters for a release.

DP allowance: ``shared.sum_bounds.check_bounds``, with each entry's per-row scale (``ValueSums.BOUNDS``: 1, G,
G, 2G, 4G²) times the site's stated noise sd, root-sum-squared over the entries a bound is made of.

The check and its refusal (:class:`shared.sum_bounds.InfeasibleSum`, naming the entry and the bound, never a
value) run on each site's own release, which is in the clear: ``server.policy_phase`` drops an infeasible site
from the gate and names it (its ``per_site`` entry ``dropped``; it gets no verdict).
"""

from __future__ import annotations

import math

import numpy as np

from shared.off_policy import G_MAX, ValueSums
from shared.sum_bounds import RELATIVE_TOLERANCE, Bound, Contributors, check_bounds


def value_bounds(sums: ValueSums, who: Contributors) -> list[Bound]:
    """The constraints of one site's :class:`ValueSums` (module docstring)."""
    s = ValueSums.BOUNDS
    n, g = float(sums.n), G_MAX
    out = [Bound("cycle count n", np.array([n]), 0.0, who.row_cap, s["n"],
                 "0 ≤ n ≤ the site's declared row count (site check)"),
           Bound("standard-of-care sum", np.array([abs(sums.standard) - n * g]), -np.inf, 0.0,
                 math.hypot(s["standard"], g * s["n"]), f"|Σ Γ(standard)| ≤ n · {g:g} (every Γ clipped)"),
           Bound("candidate sum", np.array([sums.candidate - n * g]), -np.inf, 0.0,
                 math.hypot(s["candidate"], g * s["n"]),
                 f"Σ Γ(candidate) ≤ n · {g:g} (clipped on the support, at most it off the support)"),
           Bound("difference sum", np.array([sums.difference - (sums.candidate - sums.standard)]),
                 -RELATIVE_TOLERANCE * (abs(sums.candidate) + abs(sums.standard)),
                 RELATIVE_TOLERANCE * (abs(sums.candidate) + abs(sums.standard)),
                 math.sqrt(s["difference"] ** 2 + s["candidate"] ** 2 + s["standard"] ** 2),
                 "Σ d = Σ Γ(candidate) − Σ Γ(standard)"),
           Bound("difference sum", np.array([sums.difference - n * 2 * g]), -np.inf, 0.0,
                 math.hypot(s["difference"], 2 * g * s["n"]), f"Σ d ≤ n · {2 * g:g}"),
           Bound("sum of squared differences", np.array([sums.difference_sq]), 0.0, np.inf, s["difference_sq"],
                 "Σ d² ≥ 0")]
    if not who.noise_sd and n > 0:
        floor = sums.difference ** 2 / n
        out.append(Bound("sum of squared differences", np.array([sums.difference_sq - floor]),
                         -RELATIVE_TOLERANCE * floor, np.inf, 0.0, "Σ d² ≥ (Σ d)² / n (Cauchy–Schwarz)"))
    return out


def check_value_sums(phase: str, sums: ValueSums, who: Contributors) -> None:
    """Raise :class:`shared.sum_bounds.InfeasibleSum` if ``sums`` breaks :func:`value_bounds`; None if feasible."""
    check_bounds(phase, value_bounds(sums, who), who)
