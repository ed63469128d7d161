"""The hospital's side of every message: which site this node is, its validated data, and one reply shape.

The site is the folder (or CSV file) at ``node_config["data-path"]``; its name comes from
``node_config["site-name"]``, else ``site.toml``, else the folder name; a generic tabular task comes with
``node_config["task-path"]``, the coordinator's policy key with ``node_config["trust-key"]`` and the folder
holding the copy of the privacy ledger's head kept apart from the site (``client.ledger``) with
``node_config["state-dir"]`` (default ``$FEDNANO_STATE_DIR``, else ``~/.local/state/fednano``). In an
in-process simulation the runner gives the ClientApp the list of sites, indexed by the node's
``partition-id``.

Every handler that answers from the site's data is wrapped by :class:`SiteHandlers`: it loads the site
(validated, cached while its files are unchanged), calls the handler with a :class:`SiteRequest`, and turns
what can go wrong into an error reply that names the site and why — never a patient value:

- the site's data fail validation → ``ErrorCode.SITE_DATA`` with the shareable problems (file, column, row
  numbers, rule);
- the site's privacy terms refuse (no share, no DP form, budget exhausted, ledger unreadable) →
  ``ErrorCode.PRIVACY``, "<site> refuses <message>: <why>";
- the request is malformed (a missing key, a wrong shape) → the handler's request error code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, wraps
from pathlib import Path
from threading import Lock
from typing import TYPE_CHECKING

from cachetools import LRUCache, cached
from cachetools.keys import hashkey
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from client.dp import PrivacyRefused, SiteDP
from client.ledger import BudgetExhausted, LedgerError
from client.run_state import keep, run_context
from client.split import EncodedSplit, encode, split_site
from shared.encoding import ENCODER_CONFIG_KEY, FeatureEncoder
from shared.protocol import ErrorCode
from shared.protocol import records as r
from shared.protocol.errors import ShareableError
from shared.protocol.training import hidden_of
from shared.task import TaskSpec
from shared.validation import SiteData, SiteDataError, load_site

if TYPE_CHECKING:
    from shared.ann import MultiTaskMLP

LOG = logging.getLogger("fednano.site")

SITE_CACHE_BYTES = 2 * 2**30
"""Bytes of validated sites one process keeps loaded (least recently used first out). A simulation actor serves
many sites, and re-validating a site's files costs ~0.5 ms per episode row: each message re-validating made a
10-site federation 9.4× slower than a plain loop, and a cache of 64 sites made every message of a 100-site
federation re-validate (BENCHMARKS.md). A deployed SuperNode's process serves one site and one message."""


@dataclass(frozen=True)
class SiteSource:
    """Where a site's data live and, for a generic task, its task spec."""

    path: Path
    task_path: Path | None = None
    name: str | None = None
    trust_key: Path | None = None  # the coordinator's policy_signing.pub from this site's kit
    state_dir: Path | None = None  # where the privacy ledger's head copy lives (client.ledger); None: the default

    @property
    def folder(self) -> Path:
        """The site's folder (a CSV file's folder): its ledger and installed policies live here."""
        return self.path if self.path.is_dir() else self.path.parent

    def task(self) -> TaskSpec | None:
        return TaskSpec.from_toml(self.task_path) if self.task_path else None


def site_source(context: Context, sites: list[SiteSource] | None = None) -> SiteSource:
    """This node's data: ``data-path`` (and ``task-path``) in the node config, else the simulation's list."""
    config = context.node_config
    if "data-path" in config:
        task, trust, state = config.get("task-path"), config.get("trust-key"), config.get("state-dir")
        return SiteSource(Path(str(config["data-path"])), Path(str(task)) if task else None,
                          str(config["site-name"]) if config.get("site-name") else None,
                          Path(str(trust)) if trust else None, Path(str(state)) if state else None)
    if sites is not None and "partition-id" in config:
        return sites[int(config["partition-id"])]
    raise ValueError("this SuperNode has no data: start it with --node-config 'data-path=/path/to/site'")


def _mtimes(path: Path) -> tuple[tuple[int, int], ...]:
    """Each file's modification time and size: a site rewritten between two simulations of one Ray session
    (a closed loop's new patients) is loaded again."""
    files = sorted(path.glob("*")) if path.is_dir() else [path]
    return tuple((s.st_mtime_ns, s.st_size) for s in (f.stat() for f in files if f.is_file()))


def site_bytes(site: SiteData) -> int:
    """Memory held by a validated site's tables (its cache weight)."""
    tables = (site.episodes, site.vitals, site.decisions)
    return int(sum(t.memory_usage(index=True, deep=True).sum() for t in tables if t is not None))


_SITES: LRUCache = LRUCache(maxsize=SITE_CACHE_BYTES, getsizeof=site_bytes)


def _encoded_bytes(kept: tuple[SiteData, EncodedSplit]) -> int:
    data = kept[1]
    return int(data.x.nbytes + sum(t.nbytes for t in data.targets.values()))


ENCODED_CACHE_BYTES = 2**30
"""Bytes of encoded splits one process keeps (:meth:`SiteRequest.encoded`)."""
_ENCODED: LRUCache = LRUCache(maxsize=ENCODED_CACHE_BYTES, getsizeof=_encoded_bytes)


def _encoded_key(request: SiteRequest, split: str) -> tuple:
    return hashkey(id(request.site), split, int(request.config[r.SPLIT_SEED]), str(request.config[ENCODER_CONFIG_KEY]))


@cached(_ENCODED, key=_encoded_key, lock=Lock())
def _encoded(request: SiteRequest, split: str) -> tuple[SiteData, EncodedSplit]:
    """The split encoded, kept with the site object itself: while the entry lives, no other site can have its id."""
    return request.site, encode(request.encoder, request.rows(split))


@cached(_SITES, lock=Lock())
def _load(path: Path, task_path: Path | None, _stamp: tuple[tuple[int, int], ...]) -> SiteData:
    task = TaskSpec.from_toml(task_path) if task_path else None
    return load_site(path, task)


def load(source: SiteSource) -> SiteData:
    """The site's validated data (cached while its files are unchanged); raises SiteDataError."""
    return _load(source.path, source.task_path, _mtimes(source.path))


def site_name(source: SiteSource, site: SiteData | None = None) -> str:
    return source.name or (site.name if site is not None else source.path.stem)


def site_dp(source: SiteSource, site: SiteData) -> SiteDP | None:
    """The site's DP terms if its ``site.toml`` enables DP (``[privacy] dp = true``), else None."""
    return SiteDP.of(source.folder, site.config, state_dir=source.state_dir)


def error_reply(msg: Message, code: int, reason: str) -> Message:
    return Message(Error(code=int(code), reason=reason), reply_to=msg)


@dataclass
class SiteRequest:
    """What a handler works on: this node's site, its validated data, the message's config and context."""

    source: SiteSource
    site: SiteData
    config: ConfigRecord
    context: Context

    @property
    def name(self) -> str:
        return site_name(self.source, self.site)

    @cached_property
    def dp(self) -> SiteDP | None:
        """The site's DP terms (None without DP); opened once per message."""
        return site_dp(self.source, self.site)

    @cached_property
    def encoder(self) -> FeatureEncoder:
        return FeatureEncoder.from_config_record(self.config)

    def rows(self, split: str):
        """The site's rows of ``split`` (train / val / test), split as every phase splits them."""
        return split_site(self.site.episodes, self.site.task, int(self.config[r.SPLIT_SEED]))[split]

    def encoded(self, split: str) -> EncodedSplit:
        """The split's rows encoded with the message's encoder; kept for later messages of the same site, split
        and encoder (a simulation actor serves every site's rounds: splitting and encoding at each message was a
        third of its time at 1,000 clinics). Handlers treat it as read-only."""
        return _encoded(self, split)[1]

    def ann(self, arrays: ArrayRecord) -> MultiTaskMLP:
        """The ANN of the config's architecture with the weights the message carries (imports torch: only the
        messages that use the ANN load it; see :mod:`client.app`)."""
        from shared.ann import build_model, load_arrays

        model = build_model(self.encoder, self.site.task, hidden_of(self.config), seed=0)
        load_arrays(model, arrays)
        return model


Answer = Callable[[Message, SiteRequest], RecordDict]
"""A handler: the message and the site's request → the reply's content."""


class SiteHandlers:
    """Wraps answers into Flower handlers that load this node's site and reply errors as the module says.

    Parameters
    ----------
    sites : list of SiteSource, optional
        The simulation's sites by ``partition-id`` (deployed nodes have ``data-path`` instead).
    """

    def __init__(self, sites: list[SiteSource] | None = None) -> None:
        self.sites = sites

    def source(self, context: Context) -> SiteSource:
        return site_source(context, self.sites)

    def __call__(self, answer: Answer, request_error: ErrorCode = ErrorCode.REQUEST
                 ) -> Callable[[Message, Context], Message]:
        @wraps(answer)
        def handle(msg: Message, context: Context) -> Message:
            source = self.source(context)
            what = msg.metadata.message_type
            try:
                site = load(source)
            except SiteDataError as err:
                return error_reply(msg, ErrorCode.SITE_DATA, f"{site_name(source)}: {err.shareable}")
            config = msg.content[r.CONFIG] if r.CONFIG in msg.content else ConfigRecord()
            run = run_context(context)  # a resumed run answers as the run it continues (client.run_state)
            request = SiteRequest(source, site, config, run)
            try:
                content = answer(msg, request)
                keep(run, source.folder)
            except (PrivacyRefused, BudgetExhausted, LedgerError) as err:
                return error_reply(msg, ErrorCode.PRIVACY, f"{request.name} refuses {what}: {err}")
            except KeyError as err:
                return error_reply(msg, request_error, f"{request.name} cannot answer {what}: the request has no "
                                   f"key {err.args[0]!r}" if err.args else "")
            except ShareableError as err:
                return error_reply(msg, request_error, f"{request.name} cannot answer {what}: {err}")
            except Exception as err:  # noqa: BLE001 - whatever it is, its text may quote data: it stays here
                LOG.error("%s could not answer %s", request.name, what, exc_info=True)
                return error_reply(msg, request_error, f"{request.name} could not answer {what}: "
                                   f"{type(err).__name__} (the details are in the site's own log)")
            return Message(content, reply_to=msg)

        return handle
