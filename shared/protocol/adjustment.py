"""``query.fqi_scaling`` / ``query.fqi_ridge``: the server's dose adjuster in, a site's sums out.

The server sends the adjuster's parameters, the split seed and how many iterations are done (a DP site
counts its releases by it) and, once set, the feature scaling and current coefficients; a site answers
sums over its logged transitions (``shared.dose_adjustment``), noised when it is under DP.

Under the run's secure sum (a request carrying ``shared.protocol.hist.SECURE_SESSION``: ``server.adjustment_phase``)
a site answers instead one float vector of sums, masked (``client.secure_aggregation.masked_floats``), in the
layout :func:`scaling_layout` (count, ``Σ(x − c)``, ``Σ(x − c)²`` per column: ``shared.dose_adjustment.
centred_scaling_sums``) or :func:`ridge_layout` (``A`` as its upper triangle, ``b``, ``n``).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from shared.dose_adjustment import PUBLIC_RANGES, DoseAdjuster
from shared.protocol import records as r
from shared.sum_vector import SumsLayout


def request_records(adjuster: DoseAdjuster, split_seed: int) -> RecordDict:
    """A query's content: the adjuster's parameters, split seed and iteration (config: iterations done so
    far, which a DP site uses to count its releases) and, once set, its scaling and current coefficients."""
    params = adjuster.get_params()
    config = ConfigRecord({r.SPLIT_SEED: int(split_seed), "iteration": len(getattr(adjuster, "history_", [])),
                           "alpha": float(params["alpha"]),
                           "gamma": float(params["gamma"]), "iterations": int(params["iterations"]),
                           "doses": [float(d) for d in params["doses"]], "max-change": float(params["max_change"])})
    arrays = {name: getattr(adjuster, name + "_", None) for name in ("mean", "scale", "coef")}
    record = ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float64)) for k, v in arrays.items()
                          if v is not None})
    return RecordDict({r.CONFIG: config, r.ARRAYS: record})


def adjuster_from_request(content: RecordDict) -> tuple[DoseAdjuster, int]:
    """The server's adjuster (parameters, scaling and coefficients when sent) and the split seed."""
    config = content[r.CONFIG]
    adjuster = DoseAdjuster(alpha=float(config["alpha"]), gamma=float(config["gamma"]),
                            iterations=int(config["iterations"]), doses=tuple(float(d) for d in config["doses"]),
                            max_change=float(config["max-change"]))
    arrays = content[r.ARRAYS]
    for name in ("mean", "scale", "coef"):
        setattr(adjuster, name + "_", arrays[name].numpy() if name in arrays else None)
    return adjuster, int(config[r.SPLIT_SEED])


def sums_to_records(sums: dict[str, np.ndarray]) -> RecordDict:
    """A site's sums as an ArrayRecord (float64)."""
    return RecordDict({r.SUMS: r.to_array_record(sums)})


def sums_from_records(content: RecordDict) -> dict[str, np.ndarray]:
    return r.from_array_record(content[r.SUMS])


def scaling_layout() -> SumsLayout:
    """The secure scaling release: per column (``PUBLIC_RANGES`` order) count, ``Σ(x − c)`` and ``Σ(x − c)²``."""
    width = (len(PUBLIC_RANGES),)
    return SumsLayout.of({"count": width, "shifted_sum": width, "shifted_square": width})


def ridge_layout(adjuster: DoseAdjuster) -> SumsLayout:
    """The secure ridge release of one iteration: ``A = Σ φφᵀ`` (upper triangle), ``b = Σ φ y`` and ``n``."""
    p = adjuster.n_features_
    return SumsLayout.of({"gram": (p, p), "moment": (p,), "n": (1,)}, symmetric=("gram",))
