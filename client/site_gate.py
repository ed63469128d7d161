"""A site's own release-gate verdict on its installed policy, and standard of care when the verdict is ``worse``.

The coordinator ships a policy when the sites' logs *together* show it beats standard of care; each site's own
logs may still find it significantly worse than that site's standard of care (``shared.off_policy.gate``'s
``per_site[site].worse``). The coordinator sends each site its own figures with the bundle
(:class:`shared.protocol.policy.SiteVerdict`); the site installs the bundle and stores the verdict with that
version (:meth:`client.policy_store.PolicyStore.site_gate`). A site whose verdict is ``worse`` installs the
policy but serves its standard of care, and says so (issue 12 item 3).

**Standard of care** is the one the verdict was measured against (:mod:`client.ope`): per tumour type the
formulation the site logs most at first cycles (its most used overall where it logged none of the type) —
recorded from the site's own logs when it installs (:class:`UsualFormulations`, never sent) — at the label dose
for the tumour type with the label hepatic reduction, rounded to the dose step, at the label interval, under
the policy's own hard rules: its caps, holds and stops (``safety_limits``) and its BSA cap (the policy's
recommendation table is assembled by the policy's own code). :func:`shared.dosing_policy.label_actions`
computes it for the gate, for serving and for the structured policy's own fallback alike, for either policy
kind. A record whose usual formulation is not in its catalogue gets no dose (:class:`StandardOfCareRefused`,
naming the record and why), never another formulation silently.

:class:`GatedPolicy` wraps a loaded policy of either kind with the site's verdict: it recommends as the policy
does, or standard of care with the rule ``site-gate`` when the verdict is ``worse``; ``site_gate`` says which.
Serving the policy, it gives each record the site's usual formulation (:meth:`UsualFormulations.annotate`), so
a structured policy that leaves standard of care only where it is confidently better (``reference =
"standard_of_care"``) measures against *this* site's standard of care, the one its gate judged it against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from shared.dosing_policy import RESPONSE, TOXICITY, Recommendation, RuleApplied, label_actions, recommendation_of
from shared.patient_record import PatientRecord, records_frame
from shared.protocol.policy import SiteVerdict
from shared.structured_policy import USUAL_FORMULATION

SITE_GATE_RULE = "site-gate"


@dataclass(frozen=True)
class UsualFormulations:
    """The formulation a site uses at first cycles, per tumour type, and overall (its standard of care's)."""

    by_tumour_type: dict[str, str]
    overall: str

    @classmethod
    def of(cls, logged: pd.DataFrame) -> UsualFormulations:
        """From a site's logged first cycles (``formulation_id``, ``tumour_type``): the most frequent ones."""
        ids = logged["formulation_id"].astype(str)
        usual = ids.groupby(logged["tumour_type"].astype(str)).agg(lambda f: f.mode().iloc[0])
        return cls({str(k): str(v) for k, v in usual.items()}, str(ids.mode().iloc[0]))

    def for_records(self, tumour_type: pd.Series) -> np.ndarray:
        """Each record's usual formulation (by its tumour type, else the overall one)."""
        return np.array([self.by_tumour_type.get(t, self.overall) for t in tumour_type.astype(str)], dtype=object)

    def annotate(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame`` (flat records) with each record's usual formulation in the column the structured policy
        reads as its standard of care (:data:`shared.structured_policy.USUAL_FORMULATION`); a column already
        there is kept."""
        if USUAL_FORMULATION in frame:
            return frame
        return frame.assign(**{USUAL_FORMULATION: self.for_records(frame["tumour_type"])})

    def to_dict(self) -> dict:
        return {"by_tumour_type": dict(sorted(self.by_tumour_type.items())), "overall": self.overall}

    @classmethod
    def from_dict(cls, values: Any) -> UsualFormulations:
        """From :meth:`to_dict`'s form; ``ValueError`` for anything else."""
        by_type = values.get("by_tumour_type") if isinstance(values, dict) else None
        if (set(values or ()) != {"by_tumour_type", "overall"} or not isinstance(values["overall"], str)
                or not isinstance(by_type, dict)
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in by_type.items())):
            raise ValueError("usual formulations: expected {by_tumour_type: {tumour type: id}, overall: id}")
        return cls(dict(by_type), values["overall"])


@dataclass(frozen=True)
class SiteGate:
    """The verdict a site stored with one installed version, and its usual formulations (None if the site
    could not read its logs when it installed: then it cannot name its standard of care)."""

    version: int
    verdict: SiteVerdict
    usual: UsualFormulations | None

    @property
    def worse(self) -> bool:
        return self.verdict.worse

    def describe(self) -> str:
        """One line for the answer's rules, ``fednano serve`` and the health endpoint."""
        if not self.worse:
            return (f"policy v{self.version} installed; this site's own logs do not find it worse than standard "
                    f"of care ({self.verdict.describe()}): the policy is served")
        return (f"policy v{self.version} installed; this site's own logs find it worse than standard of care "
                f"({self.verdict.describe()}): standard of care served")

    def to_dict(self) -> dict:
        return {"version": self.version, "worse": self.worse, "verdict": self.verdict.to_dict(),
                "usual_formulations": None if self.usual is None else self.usual.to_dict(),
                "serving": "standard of care" if self.worse else "policy", "summary": self.describe()}


class StandardOfCareRefused(ValueError):
    """Standard of care cannot be named for some records; ``problems``: (record index, why) per record."""

    def __init__(self, problems: list[tuple[int, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"record {i}: {why}" for i, why in problems))


class StandardOfCareUnknown(RuntimeError):
    """The verdict is ``worse`` but the site recorded no usual formulations: no record can get standard of care."""


class GatedPolicy:
    """A loaded policy (either kind) with the site's verdict on it (``gate``, None if it has none).

    Offers the recommender's interface (``recommend``, ``recommend_frame``, ``formulations``, ``manifest``,
    ``version``, ``safety_limits``, ...: the policy's own except the two ``recommend`` methods) and ``site_gate``.
    """

    def __init__(self, policy, gate: SiteGate | None) -> None:
        if gate is not None and gate.version != policy.version:
            raise ValueError(f"the verdict is for version {gate.version}, the policy is version {policy.version}")
        if gate is not None and gate.worse and gate.usual is None:
            raise StandardOfCareUnknown(
                f"{SITE_GATE_RULE}: {gate.describe()}, but the site recorded no usual formulation when it installed "
                "the policy (its logs could not be read), so standard of care cannot be named: no dose is "
                "recommended; install the policy again from the site's data")
        self.policy, self.site_gate = policy, gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)

    @property
    def serves_standard_of_care(self) -> bool:
        return self.site_gate is not None and self.site_gate.worse

    def recommend(self, records: Sequence[PatientRecord], adjust: bool = True) -> list[Recommendation]:
        """The policy's recommendations, or standard of care's when the site's verdict is ``worse`` (no
        outcome estimates then: the policy's models are not what is served)."""
        if not records:
            return []
        table = self.recommend_frame(records_frame(list(records)), adjust=adjust)
        answers = [recommendation_of(row, self.policy.version) for row in table.itertuples(index=False)]
        if self.serves_standard_of_care:
            answers = [dataclasses.replace(a, response=None, toxicity=None) for a in answers]
        return answers

    def recommend_frame(self, frame: pd.DataFrame, adjust: bool = True) -> pd.DataFrame:
        """``recommend_frame``'s table of the policy, or of standard of care (NaN outcome estimates) with the
        rule ``site-gate`` first on every row. Raises :class:`StandardOfCareRefused` for records whose usual
        formulation is not in their catalogue (a site that cannot name its standard of care at all is refused
        when the policy is wrapped: :class:`StandardOfCareUnknown`)."""
        if not self.serves_standard_of_care:
            usual = None if self.site_gate is None else self.site_gate.usual
            return self.policy.recommend_frame(frame if usual is None else usual.annotate(frame), adjust=adjust)
        gate = self.site_gate
        frame = frame.reset_index(drop=True)
        formulation = gate.usual.for_records(frame["tumour_type"])
        refused = [(i, f"{SITE_GATE_RULE}: standard of care is {f}, the site's usual formulation for "
                       f"{tumour}, and it is not in the record's catalogue: no dose is recommended")
                   for i, (f, tumour, catalogue) in enumerate(zip(formulation, frame["tumour_type"],
                                                                  frame["catalogue"], strict=True))
                   if f not in catalogue]
        if refused:
            raise StandardOfCareRefused(refused)
        rules: list[list[RuleApplied]] = [[RuleApplied(SITE_GATE_RULE, f"standard of care: {f} at the label dose",
                                                       gate.describe())] for f in formulation]
        actions = label_actions(self.policy, frame, formulation, rules)
        chosen = actions.drop(columns="action").rename_axis("row")
        for outcome in (RESPONSE, TOXICITY):
            for bound in ("mean", "low", "high"):
                chosen[f"{outcome}_{bound}"] = np.nan
        # the policy's own assembly: zero dose unless given, hold interval, the BSA cap and its rule
        return self.policy._assemble(frame, actions["action"].to_numpy(dtype=object), chosen, rules)
