"""``query.site_check``: the server's run plan in, the site's verdict on its own data and its privacy terms out."""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from shared.protocol import records as r
from shared.protocol.privacy import RunPlan, SitePrivacy

RESUMES_RUN = "resumes-run"
"""Site-check config key of a resumed run: the id of the run it continues (``server.checkpoint``)."""


def request(plan: RunPlan, resumes: str | None = None) -> RecordDict:
    """The site check's content: the phases the run will ask for (so a DP site can plan its budget) and, for a
    resumed run, the id of the run it continues (so a site answers as that run: ``client.run_state``)."""
    config = plan.to_config()
    if resumes is not None:
        config[RESUMES_RUN] = str(resumes)
    return RecordDict({r.CONFIG: config})


def resumed_run(content: RecordDict) -> str | None:
    """The run a site-check request continues, or None for a new run."""
    if r.CONFIG not in content or RESUMES_RUN not in content[r.CONFIG]:
        return None
    return str(content[r.CONFIG][RESUMES_RUN])


def plan_of(content: RecordDict) -> RunPlan:
    """The run plan of a site-check request (an empty plan when the server sent none)."""
    return RunPlan.from_config(content[r.CONFIG]) if r.CONFIG in content else RunPlan(())


@dataclass(frozen=True)
class SiteCheckReply:
    """A site's answer: its name, whether its data validate, the problems in shareable form, counts.

    Parameters
    ----------
    site : str
        The site's name.
    ok : bool
        Whether its files pass validation.
    errors : list of str
        The first problems, each naming file, column, row numbers and rule, never a value.
    warnings : int
        How many warnings validation gave.
    summary : dict of str to float
        Counts and rates of the site's data; empty when the data fail or the site is under DP (they are
        derived from its rows).
    privacy : SitePrivacy
        The site's DP terms for this run.
    """

    site: str
    ok: bool
    errors: list[str] = field(default_factory=list)
    warnings: int = 0
    summary: dict[str, float] = field(default_factory=dict)
    privacy: SitePrivacy = field(default_factory=lambda: SitePrivacy(dp=False))

    def to_records(self) -> RecordDict:
        status = ConfigRecord({r.SITE_NAME: self.site, "ok": self.ok, "errors": list(self.errors) or [""],
                               "warnings": self.warnings})
        return RecordDict({r.STATUS: status, r.SUMMARY: MetricRecord(dict(self.summary)),
                           r.PRIVACY: self.privacy.to_config()})

    @classmethod
    def from_records(cls, content: RecordDict) -> SiteCheckReply:
        status = content[r.STATUS]
        privacy = SitePrivacy.from_config(content[r.PRIVACY]) if r.PRIVACY in content else SitePrivacy(dp=False)
        return cls(site=str(status[r.SITE_NAME]), ok=bool(status["ok"]),
                   errors=[str(e) for e in status["errors"] if e], warnings=int(status["warnings"]),
                   summary={k: float(v) for k, v in dict(content[r.SUMMARY]).items()}, privacy=privacy)
