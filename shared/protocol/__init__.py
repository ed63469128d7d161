"""The wire protocol between the ServerApp and the ClientApp: every message, record key and error code.

Both sides import this package and nothing of each other. What crosses the wire is Flower records only
(``ConfigRecord``, ``MetricRecord``, ``ArrayRecord`` in a ``Message``), and never a row of data:

| message (``messages``) | request | reply | module |
|---|---|---|---|
| ``query.site_check`` | the run's phases (``RunPlan``) | verdict, shareable problems, DP terms | ``site_check`` |
| ``query.statistics`` | split seed, plan | ``shared.encoding.SiteStatistics`` (noised under DP) | ``training`` |
| ``train`` / ``evaluate`` | weights + encoder + ``AnnTraining`` | weights + ``TrainReply`` / summaries | ``training`` |
| ``train.xgboost`` / ``evaluate.xgboost`` | booster + ``BoostingRound`` + head | trees / summaries | ``boosting`` |
| ``query.xgb_evaluate`` / ``query.importance`` | final models | summaries / loss sums | ``boosting`` |
| ``query.hist_*`` | bins, trees, frontier | counts, histograms (masked, noised) | ``hist`` |
| ``query.fqi_*`` | the dose adjuster | ridge sums | ``adjustment`` |
| ``query.catalogue`` / ``query.install_policy`` | – / the signed bundle | product specs / version | ``policy`` |
| ``query.analytics_*`` | columns, ranges, coefficients | released sums, labels, meta | ``analytics`` |

Error replies carry an :class:`errors.ErrorCode`; a DP release carries :class:`privacy.ReleaseFacts`.
"""

from shared.protocol import messages, records
from shared.protocol.errors import ErrorCode

__all__ = ["ErrorCode", "messages", "records"]
