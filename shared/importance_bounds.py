"""Feasible ranges of the permutation importance's loss sums: a poisoned site's pull on the importances bounded.

A site returns, per outcome, its test rows' count n, their summed loss and their summed loss with each feature
shuffled (``client.importance.permutation_sums``; ``server.importance_phase`` adds them, in the clear or masked).
Every row's loss has a public range (``client.importance.row_losses``): log loss of a probability clipped to
[ε, 1 − ε] lies in [0, −log ε] for a binary or multiclass outcome (ε = ``EPS``), squared error is ≥ 0 for a
regression outcome (its prediction is the model's, so no upper limit is public). So, with N the declared row
counts of the sites in the sum (site check; DP sites are not asked):

- ``0 ≤ n ≤ N`` per outcome (test rows are rows of the episode table);
- ``0 ≤ Σ loss ≤ n · (−log ε)`` for every loss sum of a class outcome, ``Σ loss ≥ 0`` for a regression one.

So a site moves an importance (a mean loss increase over the union's rows) of a class outcome by at most its
share of the rows times −log ε (16.1 nats); a regression outcome's only from below. Nothing here catches a
modest scaling of honest sums (none sits at a limit): this bounds, it does not detect. The check, and its
refusal naming the outcome, entry and bound (never a value), are ``shared.sum_bounds.check_bounds``.
"""

from __future__ import annotations

import math

import numpy as np

from shared.encoding import FeatureEncoder
from shared.importance import EPS, feature_groups
from shared.sum_bounds import Bound, Contributors, check_bounds

LOG_LOSS_MAX = -math.log(EPS)


def importance_bounds(encoder: FeatureEncoder, sums: dict, who: Contributors) -> list[Bound]:
    """The constraints of one release of importance sums (``shared.importance.sum_keys`` keys; module docstring)."""
    out = []
    features = list(feature_groups(encoder))
    for outcome in encoder.task.outcomes:
        name = outcome.name
        n = float(np.asarray(sums.get(f"{name}/n", 0.0)).ravel()[0])
        losses = np.array([float(np.asarray(sums.get(f"{name}/{k}", 0.0)).ravel()[0]) for k in ["base", *features]])
        out.append(Bound(f"{name!r} row count", np.array([n]), 0.0, who.row_cap, 0.0,
                         "0 ≤ n ≤ the sum of the sites' declared row counts (site check)"))
        if outcome.kind == "regression":
            out.append(Bound(f"{name!r} loss sums", losses, 0.0, np.inf, 0.0, "every squared-error sum ≥ 0"))
        else:
            out.append(Bound(f"{name!r} loss sums", losses, 0.0, n * LOG_LOSS_MAX, 0.0,
                             f"0 ≤ every log-loss sum ≤ n · {LOG_LOSS_MAX:.4g} (probabilities clipped to "
                             f"[{EPS:g}, 1 − {EPS:g}])"))
    return out


def check_importance(phase: str, encoder: FeatureEncoder, sums: dict, who: Contributors) -> None:
    """Raise :class:`shared.sum_bounds.InfeasibleSum` if ``sums`` breaks :func:`importance_bounds`."""
    check_bounds(phase, importance_bounds(encoder, sums, who), who)
