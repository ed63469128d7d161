"""Every message the ServerApp sends and the ClientApp answers, named once for both sides.

Flower routes a message by its type: ``@app.query("site_check")`` answers ``query.site_check``,
``@app.train()`` answers ``train`` and ``@app.train("xgboost")`` answers ``train.xgboost``. A
:class:`MessageName` holds both halves, so the server sends ``SITE_CHECK.type`` and the client registers
``SITE_CHECK.action``; neither writes the string.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MessageName:
    """One message type: Flower's category (``query``, ``train``, ``evaluate``) and the action, if any."""

    category: str
    action: str = ""

    @property
    def type(self) -> str:
        """The ``message_type`` on the wire, e.g. ``query.site_check``."""
        return f"{self.category}.{self.action}" if self.action else self.category


def query(action: str) -> MessageName:
    """A ``query.<action>`` message (Flower requires ``action`` to be a Python identifier)."""
    if not action.isidentifier():
        raise ValueError(f"a query action must be a Python identifier; got {action!r}")
    return MessageName("query", action)


# --- phases of a federated run (server.app) --------------------------------------------------------------
SITE_CHECK = query("site_check")
"""Validate the site's data and say its DP terms; reply :class:`shared.protocol.site_check.SiteCheckReply`."""
STATISTICS = query("statistics")
"""Aggregates of the training split for the federated encoder (``shared.encoding.SiteStatistics``)."""
TRAIN = MessageName("train")
"""One round of local ANN training (Flower strategies send it)."""
EVALUATE = MessageName("evaluate")
"""Evaluation summaries of the global ANN (Flower strategies send it)."""
PERSONALISE = query("personalise")
"""Train the site's personalised ANNs from the final global one, choose on the validation split, reply metrics
only (``shared.protocol.personalisation``); the personalised models stay at the site."""
PERSONALISE_KEEP = query("personalise_keep")
"""The federation's default for the ANN choice (``shared.protocol.personalisation.POOLED_RULES``; under the default
rule only to the sites without DP): the site chooses again with it in place of its own
(``shared.selection.choice_with_default``), keeps that model, replies its choice."""
XGBOOST_ACTION = "xgboost"
"""Action of the boosting strategies' messages (``strategies.per_site.PerSiteRecord(action=...)``)."""
TRAIN_XGBOOST = MessageName("train", XGBOOST_ACTION)
EVALUATE_XGBOOST = MessageName("evaluate", XGBOOST_ACTION)
XGB_EVALUATE = query("xgb_evaluate")
"""Evaluation summaries of every finished booster at once."""
PERSONALISE_BOOSTING = query("personalise_boosting")
"""Grow the site's trees on top of the finished boosters and train its local-only boosters, choose on the
validation split, reply metrics only (``shared.protocol.personalisation``); the site's boosters stay at the site."""
IMPORTANCE = query("importance")
"""Permutation-importance loss sums of a final model."""

# --- secure sums of the statistics and analytics phases and the masked ANN rounds (server.secure_aggregation,
# client.secure_aggregation):
# the same rounds as HIST_KEYS / HIST_SHARES / HIST_UNMASK below, answered by the same site handlers
SECURE_KEYS = query("secure_keys")
"""Pairwise masks: the site's session key; recovering: round 0 of one release (``shared.secagg_plus``)."""
SECURE_SHARES = query("secure_shares")
"""Recovering: round 1, the site's Shamir shares encrypted per peer."""
SECURE_UNMASK = query("secure_unmask")
"""Recovering: round 3, the shares that unmask the sum over the sites whose masked input arrived."""
ANN_KEYS = query("ann_keys")
ANN_SHARES = query("ann_shares")
ANN_UNMASK = query("ann_unmask")
"""The same rounds for the masked ANN rounds (``strategies.pairwise_masked_mean``), whose masked request is the
training message: their own names, because the site checks a repeated round's unmasking against the sites it was
summed over before (``client.training_handlers.ann_unmask``)."""
STATISTICS_LAYOUT = query("statistics_layout")
"""Masked statistics, step 1: the names a site's statistics vector is laid out by (category and class values),
and its min and max (not sums: they travel in the clear)."""
STATISTICS_MASKED = query("statistics_masked")
"""Masked statistics, step 2: the site's statistics as one fixed-point vector in the server's layout, masked."""

# --- histogram boosting (server.hist_phase, client.hist_handlers) -----------------------------------------
HIST_KEYS = query("hist_keys")
"""Secure aggregation round 0, per release: the site's channel and mask public keys (``shared.secagg_plus``)."""
HIST_SHARES = query("hist_shares")
"""Secure aggregation round 1: the site's Shamir shares of its mask key and self-mask seed, encrypted per peer."""
HIST_UNMASK = query("hist_unmask")
"""Secure aggregation round 3: shares of the seeds of sites that sent, of the mask keys of sites that did not."""
HIST_RANGES = query("hist_ranges")
HIST_BINS = query("hist_bins")
HIST_CELLS = query("hist_cells")
HIST_LEVEL = query("hist_level")

# --- dose adjuster (server.adjustment_phase, client.adjustment_handlers) ----------------------------------
FQI_SCALING = query("fqi_scaling")
FQI_RIDGE = query("fqi_ridge")

# --- structured dose-response models (server.dose_response_phase, client.dose_response_handlers) ----------
DOSE_RESPONSE_SUMS = query("dose_response_sums")
"""At the server's coefficients of one outcome model: the site's gradient, information, log-likelihood, count."""
DOSE_RESPONSE_SUPPORT = query("dose_response_support")
"""The site's first cycles counted by formulation × tumour type × dose bin (the policy's support)."""

# --- dosing policy (server.policy_phase, client.policy_handlers) ------------------------------------------
CATALOGUE = query("catalogue")
POLICY_VALUE = query("policy_value")
"""A candidate policy's and standard of care's doubly-robust value sums on the site's logs (the release gate)."""
INSTALL_POLICY = query("install_policy")

# --- federated analytics (server.analytics_phase, client.analytics_handlers) ------------------------------
ANALYTICS_DESCRIBE = query("analytics_describe")
ANALYTICS_LINEAR = query("analytics_linear")
ANALYTICS_LOGISTIC = query("analytics_logistic")
ANALYTICS_ANOVA = query("analytics_anova")
ANALYTICS_PCA = query("analytics_pca")
ANALYTICS_LLOYD = query("analytics_lloyd")
ANALYTICS_PROFILES = query("analytics_profiles")
ANALYTICS = (ANALYTICS_DESCRIBE, ANALYTICS_LINEAR, ANALYTICS_LOGISTIC, ANALYTICS_ANOVA, ANALYTICS_PCA,
             ANALYTICS_LLOYD, ANALYTICS_PROFILES)
