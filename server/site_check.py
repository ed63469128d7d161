"""Phase 1 of every run: which sites take part, and on what privacy terms.

Every connected site validates its own files against the data contract and reports the verdict (problems by
file, column, row number and rule, never a value), counts (sites not under DP) and its privacy terms for the
phases the run announces (``shared.protocol.privacy``: ε per phase, phases it refuses and why). Sites whose
data fail are named with their problems and left out. Two sites reporting the same name are both left out:
their records would merge into one entry (and one site's ε would disappear from the record).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import INFO

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from shared.protocol import messages, site_check
from shared.protocol.privacy import RunPlan, SitePrivacy
from shared.protocol.site_check import SiteCheckReply
from shared.sum_bounds import declared_rows

NODE_WAIT_S = 120.0
"""How long the site check waits for ``min_nodes`` SuperNodes to connect before it asks those it has."""


class NoUsableSite(RuntimeError):
    """No connected site has usable data: there is nothing to run on."""


@dataclass
class SiteCheck:
    """What each site said about its data and its privacy, by node id."""

    usable: dict[int, str] = field(default_factory=dict)  # node id -> site name
    rejected: dict[int, tuple[str, list[str]]] = field(default_factory=dict)  # node id -> (site, problems)
    summaries: dict[int, dict[str, float]] = field(default_factory=dict)
    privacy: dict[int, SitePrivacy] = field(default_factory=dict)

    @property
    def nodes(self) -> list[int]:
        """Node ids of the usable sites, in order."""
        return sorted(self.usable)

    def declared_rows(self) -> dict[int, float | None]:
        """Usable node → the row count its site check declared (None: it declared none, a DP site): the cap of the
        feasibility checks of what it sends (``shared.sum_bounds.declared_rows``)."""
        return {node: declared_rows(self.summaries.get(node, {})) for node in self.nodes}

    def dp_nodes(self) -> set[int]:
        """Usable nodes under DP."""
        return {node for node in self.usable if self.privacy.get(node, SitePrivacy(dp=False)).dp}

    def granting(self, phase: str) -> list[int]:
        """Usable nodes that will answer ``phase``: every site without DP, DP sites that granted it ε."""
        return [node for node in self.nodes
                if not self.privacy.get(node, SitePrivacy(dp=False)).dp or phase in self.privacy[node].epsilon]

    def refusing(self, phase: str) -> dict[str, str]:
        """Site name → why it refuses ``phase`` (DP sites that did not grant it)."""
        result = {}
        for node in self.nodes:
            privacy = self.privacy.get(node, SitePrivacy(dp=False))
            if privacy.dp and phase not in privacy.epsilon:
                result[self.usable[node]] = privacy.refused.get(phase, f"{phase} was not in the run's plan")
        return result


def wait_for_nodes(grid: Grid, min_nodes: int, timeout_s: float = NODE_WAIT_S, poll_s: float = 0.5) -> list[int]:
    """Node ids once at least ``min_nodes`` are connected (or whatever is connected at the timeout)."""
    deadline = time.monotonic() + timeout_s
    nodes = list(grid.get_node_ids())
    while len(nodes) < min_nodes and time.monotonic() < deadline:
        time.sleep(poll_s)
        nodes = list(grid.get_node_ids())
    return nodes


def check_sites(grid: Grid, plan: RunPlan, min_nodes: int = 1, timeout: float | None = None,
                resumes: str | None = None) -> SiteCheck:
    """Ask every node to validate its site and plan its budget for ``plan`` (or, for a run that ``resumes`` an
    earlier one, keep that run's plan); sort them into usable and rejected."""
    nodes = wait_for_nodes(grid, min_nodes)
    sent = [Message(site_check.request(plan, resumes), dst_node_id=n, message_type=messages.SITE_CHECK.type)
            for n in nodes]
    result = SiteCheck()
    for reply in grid.send_and_receive(sent, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            result.rejected[node] = (f"node {node}", [reply.error.reason])
            continue
        answer = SiteCheckReply.from_records(reply.content)
        if answer.ok:
            result.usable[node] = answer.site
            result.summaries[node] = answer.summary
            result.privacy[node] = answer.privacy
        else:
            result.rejected[node] = (answer.site, answer.errors)
    for node in set(nodes) - set(result.usable) - set(result.rejected):
        result.rejected[node] = (f"node {node}", ["no reply to the site check"])
    _reject_duplicate_names(result)
    return result


def _reject_duplicate_names(result: SiteCheck) -> None:
    names = list(result.usable.values())
    for node, name in list(result.usable.items()):
        if names.count(name) > 1:
            del result.usable[node]
            result.summaries.pop(node, None)
            result.privacy.pop(node, None)
            result.rejected[node] = (name, [f"another site also calls itself {name!r}: site names must be unique "
                                            "(set [site] name in site.toml or node-config site-name)"])


def usable_sites(grid: Grid, min_nodes: int, plan: RunPlan, resumes: str | None = None
                 ) -> tuple[SiteCheck, list[int]]:
    """The site check, logged; the node ids of the sites with usable data (:class:`NoUsableSite` if none)."""
    sites = check_sites(grid, plan, min_nodes=min_nodes, resumes=resumes)
    for name, errors in sites.rejected.values():
        log(INFO, "site %s rejected: %s", name, "; ".join(errors))
    nodes = sites.nodes
    if not nodes:
        raise NoUsableSite("no site has usable data")
    log(INFO, "sites usable: %s", ", ".join(sites.usable[n] for n in nodes))
    for node in sorted(sites.dp_nodes()):
        terms = sites.privacy[node]
        granted = ", ".join(f"{phase} {eps:.3g}" for phase, eps in terms.epsilon.items())
        log(INFO, "site %s under DP (spent %.3f of %g): ε per phase %s; refuses %s", sites.usable[node],
            terms.epsilon_spent, terms.epsilon_budget, granted or "none", ", ".join(terms.refused) or "nothing")
    return sites, nodes
