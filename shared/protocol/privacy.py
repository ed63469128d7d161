"""What a run tells the sites about their privacy budget, and what a DP site says back about each release.

The site decides its differential privacy (``site.toml`` ``[privacy]``: on or off, its lifetime (ε, δ) and
the share of ε each phase may spend); the server only says which phases this run will ask for, in order, so
each site can split what is left of its budget before anything is released (:class:`RunPlan`, sent with the
site check). The site answers with its terms for the run (:class:`SitePrivacy`), and every DP release
carries its facts (:class:`ReleaseFacts`): the phase, the noise and the ε spent after it. The mechanism and
the rule live at the site (``client.dp``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord

PHASES = ("statistics", "training", "evaluation", "personalisation", "boosting", "importance", "adjuster",
          "dose_response", "policy", "analytics")
"""Every phase that releases something derived from a site's rows; ``site.toml [privacy.shares]`` keys."""

PUBLIC_RELEASES = {
    "site_check": "whether the files validate, and the problems by file, column, row number and rule",
    "catalogue": "the formulations the site stocks and their product specifications (no patient value)",
    "install_policy": "the version the site installed",
    "hist_keys": "fresh public keys for the secure sum",
    "hist_shares": "Shamir shares of fresh random secrets, encrypted to each peer",
    "hist_unmask": "shares of other sites' random secrets, as the secure sum's unmasking needs",
    "secure_keys": "fresh public keys for the secure sum of the statistics and analytics",
    "secure_shares": "Shamir shares of fresh random secrets, encrypted to each peer",
    "secure_unmask": "shares of other sites' random secrets, as the secure sum's unmasking needs",
    "ann_keys": "fresh public keys for the secure sum of the ANN rounds",
    "ann_shares": "Shamir shares of fresh random secrets, encrypted to each peer",
    "ann_unmask": "shares of other sites' random secrets, as the secure sum's unmasking needs",
    "statistics_layout": "a DP site's declared category values and declared numeric ranges (the task file's)",
}
"""Messages a DP site answers without noise, and why that answer is not derived from patient rows."""

# Request keys (ConfigRecord) of the DP plan
PLAN_PHASES = "dp-plan-phases"
RELEASES = "dp-releases"
"""How many releases the server plans for this phase in this run (the site's σ is set for that many)."""
RELEASE_INDEX = "dp-release-index"
"""This request's position among the phase's planned releases (0-based)."""
RELEASE_WEIGHTS = "dp-release-weights"
"""Optional: each planned release's share of the phase's privacy loss, in release order (one per release,
positive; absent: equal shares). The site normalises them and sets release ``i``'s noise multiplier to
``σ₁ / sqrt(wᵢ)``, σ₁ being the noise of one release spending the phase's whole ε, so the planned releases
compose to the phase's ε whatever the weights (``client.dp.PhaseRelease``)."""


@dataclass(frozen=True)
class RunPlan:
    """The phases this run will ask every site for, in order (a site splits its remaining ε over them).

    Parameters
    ----------
    phases : tuple of str
        Members of :data:`PHASES`, in the order the ServerApp runs them.
    """

    phases: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = sorted(set(self.phases) - set(PHASES))
        if unknown:
            raise ValueError(f"unknown phase(s) {unknown}: expected some of {', '.join(PHASES)}")

    def to_config(self) -> ConfigRecord:
        return ConfigRecord({PLAN_PHASES: list(self.phases) or [""]})

    @classmethod
    def from_config(cls, config: ConfigRecord | dict) -> RunPlan:
        return cls(tuple(p for p in config.get(PLAN_PHASES, []) if p))


@dataclass(frozen=True)
class SitePrivacy:
    """A site's privacy terms for this run, as its site check reports them (no patient value).

    Parameters
    ----------
    dp : bool
        Whether the site releases everything under DP.
    epsilon_budget, delta : float
        Its lifetime budget (0 without DP).
    epsilon_spent : float
        ε spent before this run.
    epsilon : dict of str to float
        ε this run may spend per phase (only phases of the run's plan that the site grants).
    refused : dict of str to str
        Phases of the plan the site will not answer under DP, and why.
    """

    dp: bool
    epsilon_budget: float = 0.0
    delta: float = 0.0
    epsilon_spent: float = 0.0
    epsilon: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def to_config(self) -> ConfigRecord:
        return ConfigRecord({"dp": self.dp, "epsilon-budget": self.epsilon_budget, "delta": self.delta,
                             "epsilon-spent": self.epsilon_spent,
                             "phases": list(self.epsilon) or [""], "epsilon": list(self.epsilon.values()) or [0.0],
                             "refused-phases": list(self.refused) or [""],
                             "refused-reasons": list(self.refused.values()) or [""]})

    @classmethod
    def from_config(cls, config: ConfigRecord | dict) -> SitePrivacy:
        phases = [p for p in config.get("phases", []) if p]
        refused = [p for p in config.get("refused-phases", []) if p]
        return cls(dp=bool(config.get("dp", False)), epsilon_budget=float(config.get("epsilon-budget", 0.0)),
                   delta=float(config.get("delta", 0.0)), epsilon_spent=float(config.get("epsilon-spent", 0.0)),
                   epsilon=dict(zip(phases, [float(e) for e in config.get("epsilon", [])], strict=False)),
                   refused=dict(zip(refused, [str(r) for r in config.get("refused-reasons", [])], strict=False)))


@dataclass(frozen=True)
class ReleaseFacts:
    """What a DP site says about one noised release (a ``privacy`` ConfigRecord in its reply: a ConfigRecord,
    because Flower's strategies expect exactly one MetricRecord in a reply).

    ``noise_sd`` is the sd of the noise on an entry whose per-row bound is 1 (σ × the release's L2
    sensitivity); multiply by an entry's bound for its own sd.
    """

    phase: str
    index: int
    sigma: float
    noise_sd: float
    epsilon_spent: float
    epsilon_budget: float
    delta: float

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"phase": self.phase, "release-index": self.index, "sigma": self.sigma,
                             "noise-sd": self.noise_sd, "epsilon-spent": self.epsilon_spent,
                             "epsilon-budget": self.epsilon_budget, "delta": self.delta})

    @classmethod
    def from_record(cls, record: ConfigRecord | dict[str, Any]) -> ReleaseFacts:
        return cls(phase=str(record["phase"]), index=int(record["release-index"]),
                   sigma=float(record["sigma"]), noise_sd=float(record["noise-sd"]),
                   epsilon_spent=float(record["epsilon-spent"]), epsilon_budget=float(record["epsilon-budget"]),
                   delta=float(record["delta"]))
