"""A site's statistics for the federated encoder through the secure sum (``server.statistics_phase``).

With ``secure-sum`` on (pairwise or recovering), the statistics phase asks in two steps instead of one
``query.statistics``:

1. ``query.statistics_layout`` — the names the site's statistics are laid out by
   (``shared.statistics_vector.StatisticsLayout``: its category and class values; under DP the declared ones)
   and each numeric column's min and max (under DP its declared range, as ``client.statistics`` releases them):
   not sums, so they travel in the clear, as they do without masking;
2. ``query.statistics_masked`` — the site's statistics, computed as ``query.statistics`` computes them (exact,
   or noised once through the ``statistics`` DP release, noise before masking), laid out in the server's
   union layout as one float vector of sums, sent in fixed point and masked (``client.secure_aggregation``): the
   server learns only the sum over sites.

The key, share and unmask rounds are ``client.secure_aggregation``'s ``query.secure_*`` handlers.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secure_aggregation import masked_floats, register_secure_aggregation
from client.site import SiteHandlers, SiteRequest
from client.training_handlers import statistics
from shared.bounds import declared_categories, declared_classes, declared_range
from shared.encoding import SiteStatistics, statistics_grids
from shared.protocol import ErrorCode, messages
from shared.protocol import records as r
from shared.protocol.errors import ShareableError
from shared.statistics_vector import MAXIMA, MINIMA, VALUES, StatisticsLayout
from shared.task import TaskSpec


def layout(msg: Message, request: SiteRequest) -> RecordDict:
    """Step 1: the site's layout and its numeric columns' min and max (declared ones under DP)."""
    task = request.site.task
    exact = SiteStatistics.from_frame(request.rows("train"), task)
    if request.dp is None:
        own = StatisticsLayout.of(exact)
        minima = [float(exact.numeric[c].min) for c in own.numeric]
        maxima = [float(exact.numeric[c].max) for c in own.numeric]
    else:
        own = declared_layout(exact, task)
        minima = [float(declared_range(task, c)[0]) for c in own.numeric]
        maxima = [float(declared_range(task, c)[1]) for c in own.numeric]
    return RecordDict({r.NAMES: own.to_config(), r.STATISTICS: MetricRecord({MINIMA: minima, MAXIMA: maxima})})


def declared_layout(exact: SiteStatistics, task: TaskSpec) -> StatisticsLayout:
    """The layout a DP site's statistics have (``client.statistics.private_statistics``): declared values only;
    a ShareableError naming the columns without a declared range or values (the DP release refuses them too)."""
    columns = list(task.numeric) + [o.name for o in task.outcomes if o.kind == "regression"]
    grids = statistics_grids(task)
    categories = {c: declared_categories(task, c) for c in task.categorical}
    classes = {o.name: declared_classes(task, o.name) for o in task.outcomes if o.kind != "regression"}
    missing = [c for c in columns if c not in grids] + [c for c, v in {**categories, **classes}.items() if v is None]
    if missing:
        raise ShareableError(f"statistics under DP need declared ranges and values; missing: {', '.join(missing)}")
    return StatisticsLayout(tuple(exact.numeric), {c: tuple(sorted(v)) for c, v in categories.items()},
                            tuple(exact.regression), {c: tuple(sorted(v)) for c, v in classes.items()},
                            tuple(columns))


def masked_statistics(msg: Message, request: SiteRequest) -> RecordDict:
    """Step 2: the statistics of ``query.statistics`` (one DP release at a DP site) as one masked vector."""
    plain = statistics(msg, request)
    stats = SiteStatistics.from_records(plain[r.STATISTICS], plain[r.NAMES])
    try:
        vector = StatisticsLayout.from_config(request.config).vector(stats)
    except ValueError as err:
        raise ShareableError(str(err)) from None
    content = RecordDict({r.ARRAYS: ArrayRecord({VALUES: masked_floats(vector, request.config, request.context)})})
    if r.PRIVACY in plain:
        content[r.PRIVACY] = plain[r.PRIVACY]
    return content


def register_secure_statistics(client: ClientApp, handlers: SiteHandlers) -> None:
    """Add ``query.statistics_layout``, ``query.statistics_masked`` and the ``query.secure_*`` rounds."""
    client.query(messages.STATISTICS_LAYOUT.action)(handlers(layout, ErrorCode.REQUEST))
    client.query(messages.STATISTICS_MASKED.action)(handlers(masked_statistics, ErrorCode.REQUEST))
    register_secure_aggregation(client)
