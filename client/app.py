"""The hospital's Flower ClientApp: answers the server from the site's own data, sending aggregates only.

The site is the folder (or CSV file) at ``node_config["data-path"]``; its name comes from
``node_config["site-name"]``, else ``site.toml``, else the folder name. In an in-process simulation the
runner builds the app with :func:`make_client_app` and the list of site paths, indexed by the node's
``partition-id``.

Message types answered (records in, records out):

- ``query.site_check``: validate the site with the shared contract; reply with counts and rates
  (``MetricRecord``) and the site name and status (``ConfigRecord``). A site whose data fail validation
  replies with the first errors and nothing else; no row of data is ever sent.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shared.validation import validate_site

MAX_ERRORS_REPORTED = 5


def site_path(context: Context, site_paths: list[str] | None = None) -> Path:
    """Where this node's data lives: ``data-path`` in the node config, else the simulation's list."""
    if "data-path" in context.node_config:
        return Path(str(context.node_config["data-path"]))
    if site_paths is not None and "partition-id" in context.node_config:
        return Path(site_paths[int(context.node_config["partition-id"])])
    raise ValueError("this SuperNode has no data: start it with --node-config 'data-path=/path/to/site'")


def site_check_reply(path: Path, site_name: str | None) -> RecordDict:
    """Validation outcome as records: numbers as metrics, names and messages as config."""
    report = validate_site(path)
    name = site_name or str(report.summary.get("site") or path.name)
    status = ConfigRecord({"site-name": name, "ok": report.ok,
                           "errors": [str(p) for p in report.errors[:MAX_ERRORS_REPORTED]] or [""],
                           "warnings": len(report.warnings)})
    numbers = {k: float(v) for k, v in report.summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return RecordDict({"status": status, "summary": MetricRecord(numbers if report.ok else {})})


def make_client_app(site_paths: list[str] | None = None) -> ClientApp:
    """A ClientApp; ``site_paths`` serves in-process simulations where nodes have no ``data-path``."""
    client = ClientApp()

    @client.query("site_check")
    def site_check(msg: Message, context: Context) -> Message:
        name = context.node_config.get("site-name")
        return Message(site_check_reply(site_path(context, site_paths), str(name) if name else None), reply_to=msg)

    return client


app = make_client_app()
