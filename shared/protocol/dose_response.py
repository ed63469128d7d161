"""``query.dose_response_sums`` / ``query.dose_response_support``: a model and its coefficients in, a site's sums out.

The server sends one outcome model of :mod:`shared.structured_policy` — its kind and hyper-parameters
(:func:`model_spec`: the catalogue, covariates, prior precisions; public) — with the coefficients at which to
evaluate it and the split seed; a site answers the sums of :meth:`shared.dose_response.DoseResponseModel.
site_sums` over its training-split first cycles: ``gradient``, ``hessian``, ``loglik`` and ``n``, as arrays.
For the support the server sends the formulation ids; a site answers its counts by formulation × tumour
type × dose bin (:func:`shared.structured_policy.site_support_counts`). Nothing else crosses the wire: no row.

Under the run's secure sum (a request carrying ``shared.protocol.hist.SECURE_SESSION``: ``server.dose_response_phase``)
a site answers instead one masked vector (``client.secure_aggregation``): the sums in the layout
:func:`sums_layout` (gradient, the information matrix's upper triangle, log-likelihood, count) in fixed point, or
the support counts as int64 words.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from shared.dose_response import DoseResponseModel
from shared.protocol import records as r
from shared.protocol.errors import ShareableError
from shared.sum_vector import SumsLayout
from shared.toxicity_model import NeutropeniaModel, OtherToxicityModel
from shared.tumour_response import TumourResponseModel

MODEL_KINDS: dict[str, type[DoseResponseModel]] = {
    cls.kind: cls for cls in (TumourResponseModel, NeutropeniaModel, OtherToxicityModel)}
"""The outcome models a site computes sums for, by their ``kind``."""

MODEL_SPEC = "model-spec"
"""Config key: the model's kind and hyper-parameters as canonical JSON (:func:`model_spec`)."""
FORMULATIONS = "formulations"
"""Config key of the support request: the formulation ids to count, in order."""
COEF = "coef"
SUM_KEYS = ("gradient", "hessian", "loglik", "n")
COUNTS = "counts"


def model_spec(model: DoseResponseModel) -> str:
    """The model's kind and ``__init__`` parameters (scikit-learn's ``get_params``), as canonical JSON."""
    names = [p for p in inspect.signature(type(model).__init__).parameters if p != "self"]
    params = {name: getattr(model, name) for name in names}
    params["formulations"] = {str(k): {p: float(v) for p, v in props.items()}
                              for k, props in params["formulations"].items()}
    return json.dumps({"kind": model.kind, "params": params}, sort_keys=True, allow_nan=False)


def model_from_spec(spec: str) -> DoseResponseModel:
    """The unfitted model :func:`model_spec` describes; ``ShareableError`` naming the kind if unknown."""
    values = json.loads(spec)
    cls = MODEL_KINDS.get(values.get("kind"))
    if cls is None:
        raise ShareableError(f"{MODEL_SPEC}: unknown model kind {values.get('kind')!r}; expected one of "
                             f"{', '.join(sorted(MODEL_KINDS))}")
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in values["params"].items()}
    return cls(**params)


def sums_request(model: DoseResponseModel, coef: np.ndarray, split_seed: int) -> RecordDict:
    config = ConfigRecord({MODEL_SPEC: model_spec(model), r.SPLIT_SEED: int(split_seed)})
    arrays = ArrayRecord({COEF: Array(np.ascontiguousarray(coef, dtype=np.float64))})
    return RecordDict({r.CONFIG: config, r.ARRAYS: arrays})


def sums_from_request(content: RecordDict) -> tuple[DoseResponseModel, np.ndarray, int]:
    """The model, the coefficients (checked against the model's parameters) and the split seed."""
    model = model_from_spec(str(content[r.CONFIG][MODEL_SPEC]))
    coef = content[r.ARRAYS][COEF].numpy().astype(float)
    expected = len(model.parameter_names())
    if coef.shape != (expected,) or not np.all(np.isfinite(coef)):
        raise ShareableError(f"{COEF}: expected {expected} finite coefficients, got shape {coef.shape}")
    return model, coef, int(content[r.CONFIG][r.SPLIT_SEED])


def sums_reply(sums: Mapping[str, np.ndarray | float]) -> RecordDict:
    """A site's sums as arrays (``loglik`` and ``n`` as one-element arrays: a record holds no 0-d array)."""
    return RecordDict({r.SUMS: r.to_array_record({k: np.atleast_1d(np.asarray(sums[k], dtype=float))
                                                  for k in SUM_KEYS})})


def sums_of(content: RecordDict) -> dict[str, np.ndarray | float]:
    """A site's sums, ``loglik`` and ``n`` as floats."""
    arrays = r.from_array_record(content[r.SUMS])
    return {"gradient": arrays["gradient"], "hessian": arrays["hessian"], "loglik": float(arrays["loglik"][0]),
            "n": float(arrays["n"][0])}


def support_request(formulations: Sequence[str], split_seed: int) -> RecordDict:
    return RecordDict({r.CONFIG: ConfigRecord({FORMULATIONS: [str(f) for f in formulations] or [""],
                                               r.SPLIT_SEED: int(split_seed)})})


def support_from_request(content: RecordDict) -> tuple[list[str], int]:
    config = content[r.CONFIG]
    return [str(f) for f in config[FORMULATIONS] if f], int(config[r.SPLIT_SEED])


def support_reply(counts: np.ndarray) -> RecordDict:
    return RecordDict({r.SUMS: r.to_array_record({COUNTS: counts})})


def support_of(content: RecordDict) -> np.ndarray:
    return r.from_array_record(content[r.SUMS])[COUNTS]


def sums_layout(model: DoseResponseModel) -> SumsLayout:
    """The secure release of :data:`SUM_KEYS` for ``model``: gradient (p), information (p × p, upper triangle),
    log-likelihood and count."""
    p = len(model.parameter_names())
    return SumsLayout.of({"gradient": (p,), "hessian": (p, p), "loglik": (1,), "n": (1,)}, symmetric=("hessian",))


def summed_sums(total: Mapping[str, np.ndarray]) -> dict[str, np.ndarray | float]:
    """The sites' summed :func:`sums_layout` arrays as :func:`sums_of` gives one site's (the count, a sum of
    integers, rounded: the fixed-point rounding is far below 0.5)."""
    return {"gradient": total["gradient"], "hessian": total["hessian"], "loglik": float(total["loglik"][0]),
            "n": float(np.rint(total["n"][0]))}
