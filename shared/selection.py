"""Choosing among candidate models on noisy validation scores: a site's own rule and the federation's pooled one.

A site's rule (:func:`choose_by_margin`) keeps a default unless another candidate beats it on the site's own
validation split by more than the comparison's noise. On a small split (or a noised DP release of it) nothing
passes that margin, so the default decides, and whichever default is fixed loses at the sites where it is not
the best (BENCHMARKS.md, "Personalisation without DP under the current rule"). The pooled rule
(:func:`pooled_default`, :func:`pooled_choices`) lets the sites' evidence decide the default instead: the
coordinator pools each site's paired validation gain of every candidate over the global model — weighted by its
precision, from the site's own covariance of its scores (sampling and, at a DP site, the release's noise), or
equally (:data:`WEIGHTINGS`) — and takes the federation's best candidate as every site's default only if its
pooled gain is significantly positive (a one-sided Bonferroni test over the candidates), else the global model;
each site then keeps that default
unless its own split shows another beating it by its own margin. It is the pooling step of empirical-Bayes
selection (Efron & Morris, JASA 1975;70:311: shrink each unit's estimate toward the pooled one, by the unit's own
noise) reduced to a choice: a site with little evidence gets the federation's answer, one with strong evidence
keeps its own. Everything it reads is what the sites reply (released scores and their covariance: post-processing
of a DP site's release), so it runs at the coordinator and no row leaves a site. The federation's default rule
(:func:`non_dp_pooled_default`, :func:`non_dp_pooled_choices`) pools only the sites without DP and leaves each DP
site its own rule: a DP release's scores carry a bias the sites share, which pooling would turn into significance.

Shared by the site (``client.personalised.choice``) and the coordinator (``server.personalisation_phase``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

TIE_MARGIN = 1e-9
"""Scores closer than this are a tie (float noise only: a small validation split's own noise is the site's to
judge, the rule does not guess it)."""


def choose(scores: Mapping[str, float], order: Sequence[str]) -> tuple[str, str]:
    """The best-scoring candidate (``order`` breaks ties and ranks NaN last) and the reason in words.

    Example
    -------
    >>> choose({"global": 0.70, "ditto": 0.74, "local": 0.66}, ("global", "ditto", "local"))
    ('ditto', 'best validation score 0.740 (global 0.700, local 0.660)')
    """
    finite = {name: scores[name] for name in order if math.isfinite(scores.get(name, math.nan))}
    if not finite:
        return order[0], f"no candidate has a validation score (too few rows or one class only): kept {order[0]}"
    best = max(finite.values())
    chosen = next(name for name in order if name in finite and finite[name] >= best - TIE_MARGIN)
    others = ", ".join(f"{name} {scores[name]:.3f}" if math.isfinite(scores.get(name, math.nan)) else f"{name} n/a"
                       for name in order if name != chosen and name in scores)
    return chosen, f"best validation score {finite[chosen]:.3f} ({others})"


ALPHA = 0.05
"""Family-wise level of the one-sided test that moves a site off the global model (:func:`choose_by_margin`)."""


def one_sided_z(alternatives: int) -> float:
    """z of the one-sided Bonferroni test at :data:`ALPHA` over ``alternatives`` comparisons with the default:
    ``Φ⁻¹(1 − α/m)`` (2.24 for the four alternatives of global + three methods + local)."""
    return NormalDist().inv_cdf(1 - ALPHA / max(alternatives, 1))


def choose_by_margin(scores: Mapping[str, float], difference_sd: Mapping[str, float],
                     order: Sequence[str]) -> tuple[str, str]:
    """Keep the default (``order[0]``) unless a candidate beats it on validation by more than
    the noise of the comparison: a one-sided test per alternative, Bonferroni over them (:func:`one_sided_z`).

    ``difference_sd[c]`` is the standard deviation of ``score[c] − score[default]`` under the validation split's
    sampling and, at a DP site, the release's Gaussian noise. A candidate passes when its gain exceeds
    ``z · difference_sd[c]``; among those that pass, the largest lower bound ``gain − z·sd`` wins (``order`` breaks
    ties). Choosing the best raw score instead (:func:`choose`) picks whichever candidate the noise favoured: with
    five candidates, a noise sd of 0.1 and no true difference the expected maximum is ≈ 0.12 above the rest
    (Blom's approximation), so an untrained local model wins whenever the noise says so. The test is the standard
    guard against that winner's curse in model selection (Cawley & Talbot, JMLR 2010;11:2079, on selection bias
    from a noisy validation estimate; Hanley & McNeil 1983, Radiology 148:839, for the SE of a difference of
    AUCs); it only loses to the best candidate by a gain the split could not tell from noise.

    Every input is computed from what the site releases (or, without DP, from its own exact rows, which a site
    without DP may use), so under DP the choice stays post-processing of the validation release.

    Example
    -------
    >>> choose_by_margin({"global": 0.70, "ditto": 0.74, "local": 0.90}, {"ditto": 0.01, "local": 0.2},
    ...                  ("global", "ditto", "local"))[0]
    'ditto'
    """
    default = order[0]
    if not math.isfinite(scores.get(default, math.nan)):
        return choose(scores, order)
    z = one_sided_z(len(order) - 1)
    bounds = {}
    for name in order[1:]:
        gain, sd = scores.get(name, math.nan) - scores[default], difference_sd.get(name, math.nan)
        if math.isfinite(gain) and math.isfinite(sd) and gain - z * sd > TIE_MARGIN:
            bounds[name] = gain - z * sd
    tests = ", ".join(f"{name} {scores.get(name, math.nan) - scores[default]:+.3f} vs "
                      f"{z * difference_sd.get(name, math.nan):.3f}" for name in order[1:])
    if not bounds:
        return default, (f"kept {default} (validation score {scores[default]:.3f}): no candidate beat it by more "
                         f"than z·sd at z = {z:.2f} (gain, margin: {tests})")
    chosen = max(bounds, key=lambda name: (bounds[name], -order.index(name)))
    return chosen, (f"{chosen} beat {default} ({scores[default]:.3f}) on validation by "
                    f"{scores[chosen] - scores[default]:.3f}, more than z·sd at z = {z:.2f} (gain, margin: {tests})")


@dataclass(frozen=True)
class SiteEvidence:
    """One site's validation evidence as it replied it.

    Parameters
    ----------
    scores : dict
        Candidate → validation score (``client.personalised.choice.validation_score``; NaN if none).
    covariance : dict
        ``(a, b)`` → covariance of the scores of candidates ``a`` and ``b`` over the split's sampling (a paired
        bootstrap of the site's rows without DP) and, at a DP site, the release's noise (independent between
        candidates, so ``(a, b)`` with ``a != b`` is 0 there). Missing pairs count as 0.
    """

    scores: Mapping[str, float]
    covariance: Mapping[tuple[str, str], float]

    def difference_variance(self, a: str, b: str) -> float:
        """Variance of ``score[a] − score[b]``."""
        cov = self.covariance
        return (cov.get((a, a), math.nan) + cov.get((b, b), math.nan)
                - cov.get((a, b), cov.get((b, a), 0.0)) - cov.get((b, a), cov.get((a, b), 0.0)))

    def difference_sd(self, reference: str) -> dict[str, float]:
        """SD of ``score[c] − score[reference]`` for every other candidate (what :func:`choose_by_margin` reads)."""
        return {c: math.sqrt(max(self.difference_variance(c, reference), 0.0))
                for c in self.scores if c != reference and math.isfinite(self.difference_variance(c, reference))}


@dataclass(frozen=True)
class PooledGain:
    """A candidate's pooled validation gain over the baseline per site (a weighted mean over the sites that scored
    both), its SD, and the number of those sites."""

    gain: float
    sd: float
    sites: int


PRECISION, EQUAL = "precision", "equal"
"""How :func:`pooled_gains` weights the sites: by the precision of each site's paired difference (``1/var``: the
fixed-effect meta-analytic mean; Borenstein et al., Introduction to Meta-Analysis, 2009, ch. 11), or equally
(the plain sum of the sites' gains, whose SD is the root of the summed variances: a small noisy site weighs as much
as a large one)."""
WEIGHTINGS = (PRECISION, EQUAL)


def pooled_gains(evidence: Mapping[str, SiteEvidence], candidates: Sequence[str], baseline: str,
                 weighting: str = PRECISION) -> dict[str, PooledGain]:
    """Each candidate's paired validation gain over ``baseline`` (candidate minus baseline on the same site's rows)
    pooled over the sites, with its SD (the sites' splits and noise are independent): ``precision``, the
    inverse-variance weighted mean ``Σ(g/v) / Σ(1/v)`` with SD ``1/sqrt(Σ 1/v)``; ``equal``, the mean ``Σg / n``
    with SD ``sqrt(Σv) / n`` (the same test as the plain sum). Sites where either score or the difference's
    variance is not finite (or, weighted by precision, not positive) are left out."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"pooled_gains: weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
    out = {}
    for name in candidates:
        if name == baseline:
            continue
        pairs = []
        for site in evidence.values():
            g = site.scores.get(name, math.nan) - site.scores.get(baseline, math.nan)
            v = site.difference_variance(name, baseline)
            if math.isfinite(g) and math.isfinite(v) and (v > 0 or weighting == EQUAL):
                pairs.append((g, max(v, 0.0)))
        if not pairs:
            out[name] = PooledGain(gain=math.nan, sd=math.nan, sites=0)
        elif weighting == PRECISION:
            total = sum(1 / v for _, v in pairs)
            out[name] = PooledGain(gain=sum(g / v for g, v in pairs) / total, sd=1 / math.sqrt(total),
                                   sites=len(pairs))
        else:
            out[name] = PooledGain(gain=sum(g for g, _ in pairs) / len(pairs),
                                   sd=math.sqrt(sum(v for _, v in pairs)) / len(pairs), sites=len(pairs))
    return out


def pooled_default(evidence: Mapping[str, SiteEvidence], candidates: Sequence[str],
                   baseline: str, weighting: str = PRECISION) -> tuple[str, str]:
    """The federation's default: the candidate whose pooled gain over ``baseline`` (:func:`pooled_gains`) has the
    largest lower bound ``gain − z·sd`` above 0 (one-sided, Bonferroni over the alternatives:
    :func:`one_sided_z`), else ``baseline``; and why, in words.

    Example
    -------
    >>> sites = {s: SiteEvidence({"global": 0.70, "ditto": 0.72}, {("global", "global"): 1e-4,
    ...                                                             ("ditto", "ditto"): 1e-4})
    ...          for s in ("a", "b", "c", "d")}
    >>> pooled_default(sites, ("global", "ditto"), "global")[0]
    'ditto'
    """
    return default_from_gains(pooled_gains(evidence, candidates, baseline, weighting), candidates, baseline,
                              weighting)


def default_from_gains(gains: Mapping[str, PooledGain], candidates: Sequence[str], baseline: str,
                       weighting: str = PRECISION) -> tuple[str, str]:
    """:func:`pooled_default` from gains :func:`pooled_gains` already computed (``weighting`` names them in the
    reason)."""
    z = one_sided_z(len(gains))
    bounds = {name: g.gain - z * g.sd for name, g in gains.items() if g.sites and math.isfinite(g.sd)}
    tests = ", ".join(f"{name} {g.gain:+.4f} vs {z * g.sd:.4f} over {g.sites} sites" for name, g in gains.items())
    passed = {name: b for name, b in bounds.items() if b > TIE_MARGIN}
    if not passed:
        return baseline, (f"pooled over the sites ({weighting} weights) no candidate's validation gain over "
                          f"{baseline} exceeded z·sd at z = {z:.2f} (gain per site, margin: {tests})")
    best = max(passed, key=lambda name: (passed[name], -list(candidates).index(name)))
    return best, (f"pooled over the sites ({weighting} weights) {best} beat {baseline} on validation by "
                  f"{gains[best].gain:+.4f} per site, more than z·sd at z = {z:.2f} (gain per site, margin: {tests})")


def pooled_choices(evidence: Mapping[str, SiteEvidence], order: Sequence[str], baseline: str,
                   weighting: str = PRECISION) -> tuple[str, str, dict[str, tuple[str, str]]]:
    """The federation's default (:func:`pooled_default` over ``order``'s candidates) and each site's choice with
    that default in place of its own: :func:`choose_by_margin` on the site's scores and the SDs of their
    differences from the default, the other candidates in ``order``'s order. Returns the default, why, and
    site → (chosen, reason)."""
    default, why = pooled_default(evidence, order, baseline, weighting)
    return default, why, {name: choice_with_default(site, order, default) for name, site in evidence.items()}


def choice_with_default(site: SiteEvidence, order: Sequence[str], default: str) -> tuple[str, str]:
    """A site's choice with the federation's ``default`` in place of its own: :func:`choose_by_margin` on its
    scores and the SDs of their differences from ``default``, the other candidates in ``order``'s order."""
    site_order = (default, *(c for c in order if c != default))
    chosen, reason = choose_by_margin(site.scores, site.difference_sd(default), site_order)
    return chosen, f"federation default {default}; {reason}"


OWN_RULE = ("its own rule: its validation evidence is a DP release, left out of the pool (the release's bias, "
            "shared by the DP sites, would pool into significance)")
"""Why a DP site's choice is its own under :func:`non_dp_pooled_default` (the run record's ``decided_by``)."""


NO_GAIN_FALLBACK = "fedper"
"""The default :func:`non_dp_pooled_default` sends the sites without DP when no candidate's pooled gain over the
global model passes its margin, if FedPer is a candidate and its pooled gain is not significantly negative (else
the global model). Chosen by measurement against the truth, not a site's small test split (BENCHMARKS.md,
"Personalisation against fresh patients": 2,000 fresh patients per clinic, no DP): there the global model is
max(local-only, global) at all 100 site-seeds, and FedPer (the global trunk, heads trained at the site) is the one
candidate above it on average, +0.0010 ± 0.0004 AUC at seeds 0-4 and +0.0008 ± 0.0005 at seeds 5-9, no site worse
by more than its test split's SE; its gain is too small for any validation split to show, so the pooled test keeps
failing to pass it and the fallback is where the measurement enters."""


def non_dp_pooled_default(evidence: Mapping[str, SiteEvidence], under_dp: Mapping[str, bool],
                          candidates: Sequence[str], baseline: str,
                          fallback: str | None = NO_GAIN_FALLBACK) -> tuple[str | None, str, dict[str, PooledGain]]:
    """The federation's default pooled (by precision, :func:`pooled_default`) over the evidence of the sites
    without DP only, for those sites; a DP site keeps its own rule's choice. Returns the default (None when no
    site without DP gave evidence: nothing is pooled), why, and the pooled gains over ``baseline``.

    Why DP sites are left out: a DP site's scores come from a noised release, and a score computed from noised
    histograms and sums is biased (at DP seed 5 of BENCHMARKS.md's "Personalisation: the federation's pooled
    default" the released gain of local-only over global was +0.112 per site against −0.21 on the exact rows).
    Each site's SD measures the noise's spread, not that bias; pooled over the sites the SD shrinks by √m and the
    shared bias does not, so pooling the DP sites turned their bias into a "significant" default (−0.0218 AUC
    against the site rule's −0.0063 over 6 seeds), while without DP pooling beat the site rule (−0.0035 against
    −0.0193 over 5). ``under_dp``: site → whether its evidence is a DP release; a site missing from it counts as
    DP (its evidence is not pooled)."""
    exact = {site: e for site, e in evidence.items() if not under_dp.get(site, True)}
    gains = pooled_gains(exact, candidates, baseline, PRECISION)
    if not exact:
        return None, ("no site without DP replied validation evidence: nothing pooled, every site kept its own "
                      "rule"), gains
    default, why = default_from_gains(gains, candidates, baseline, PRECISION)
    why = why.replace("pooled over the sites", f"pooled over the {len(exact)} sites without DP", 1)
    if default == baseline and fallback in gains and gains[fallback].sites and math.isfinite(gains[fallback].sd):
        g, z = gains[fallback], one_sided_z(len(gains))
        if g.gain + z * g.sd >= 0:  # not significantly worse than the baseline on the sites' own evidence
            return fallback, why + f"; {fallback}, the measured fallback (NO_GAIN_FALLBACK), in its place", gains
        why += f"; not the fallback {fallback}: its pooled gain {g.gain:+.4f} is below −z·sd ({-z * g.sd:.4f})"
    return default, why, gains


def decided_by(default: str, gains: Mapping[str, PooledGain], baseline: str) -> str:
    """What decided a site's choice under a pooled rule, in words, for the run record: the pooled default with
    its gain ± margin (``z·sd``, the test :func:`pooled_default` made), or, when nothing passed, the best
    candidate's gain and margin."""
    z = one_sided_z(len(gains))
    if default in gains and gains[default].gain - z * gains[default].sd <= TIE_MARGIN:  # the fallback
        g = gains[default]
        return (f"fallback default {default}: no pooled gain over {baseline} passed its margin ({default} "
                f"{g.gain:+.4f} ± {z * g.sd:.4f} (z·sd) per site, {g.sites} sites); {default} is the measured "
                "fallback (shared.selection.NO_GAIN_FALLBACK)")
    if default in gains:
        g = gains[default]
        return (f"pooled default {default}: gain {g.gain:+.4f} ± {z * g.sd:.4f} (z·sd) over {baseline} per site, "
                f"{g.sites} sites")
    scored = {name: g for name, g in gains.items() if g.sites and math.isfinite(g.gain)}
    if not scored:
        return f"pooled default {default}: no candidate had pooled evidence"
    best = max(scored, key=lambda name: scored[name].gain - z * scored[name].sd)
    g = scored[best]
    return (f"pooled default {default}: no pooled gain over {baseline} passed its margin (best {best} "
            f"{g.gain:+.4f} ± {z * g.sd:.4f} (z·sd) per site, {g.sites} sites)")


def non_dp_pooled_choices(evidence: Mapping[str, SiteEvidence], under_dp: Mapping[str, bool],
                          order: Sequence[str], baseline: str,
                          own: Mapping[str, tuple[str, str]]
                          ) -> tuple[str | None, str, dict[str, tuple[str, str, str]]]:
    """Every site's choice under :func:`non_dp_pooled_default`, as the coordinator and the sites make it between
    them: a site without DP chooses with the pooled default in its own rule's place (:func:`choice_with_default`,
    ``order``: the candidates in the site's order), a DP site keeps ``own[site]`` (its own rule's choice and
    reason). Returns the default, why, and site → (chosen, reason, what decided: :func:`decided_by` or
    :data:`OWN_RULE`)."""
    candidates = (baseline, *(c for c in order if c != baseline))
    default, why, gains = non_dp_pooled_default(evidence, under_dp, candidates, baseline)
    out = {}
    for site, site_evidence in evidence.items():
        if default is None or under_dp.get(site, True):
            chosen, reason = own[site]
            out[site] = (chosen, reason, OWN_RULE if under_dp.get(site, True) else "its own rule: nothing pooled")
        else:
            chosen, reason = choice_with_default(site_evidence, order, default)
            out[site] = (chosen, reason, decided_by(default, gains, baseline))
    return default, why, out
