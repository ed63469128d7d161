"""The telemedicine recommender over HTTP: a FastAPI app around one loaded, verified dosing policy.

Endpoints (OpenAPI schema at ``/openapi.json``, interactive docs at ``/docs``):

- ``GET /health``: status, policy version and the signed manifest's metadata;
- ``POST /recommend``: one patient record (``shared.patient_record.PatientRecord``) → recommendation JSON;
- ``POST /recommend/batch``: a list of 1 to ``MAX_BATCH`` records → a list of recommendations (one batched
  call);
- ``POST /recommend/fhir``: one record → a FHIR R4 MedicationRequest (or an OperationOutcome saying why
  treatment stops; :mod:`client.fhir`).

Bodies are read by the CLI's own strict reader (:func:`client.recommender.json_document`, then
:func:`~client.recommender.validate_record`): a repeated key, ``NaN``, ``Infinity``, ``1e400``, ``true`` for
an integer or ``"66"`` for a number is refused over HTTP exactly as in a patient file. Requests are bounded
before any work is done: a body above ``MAX_RECORD_BYTES`` (one record) or ``MAX_BATCH_BYTES`` (a batch) gets
a 413 without being read further, a batch of more than ``MAX_BATCH`` records a 422 before any record is
validated, and a record's lists and strings have maximum lengths (:mod:`shared.patient_record`).

A request the service cannot use gets a 422 (413 for its size) whose ``detail`` lists each problem with
``loc`` (the path of the field, FastAPI's convention) and ``msg`` (the rule), and whose ``errors`` says the
same in one line per problem, at most ``shared.patient_record.MAX_ERROR_LINES`` of them. No answer repeats
the input back: errors name the field and the rule, never the value.

The policy is verified and loaded before the app is made (:func:`client.recommender.load_policy`); a site's
installed policy (``fednano serve --site``) is followed in its store (:class:`client.recommender.InstalledPolicy`):
a newer install is verified, loaded and served, and while the store cannot vouch for a policy every
recommendation gets a 503. Where the release gate's verdict on the site's own logs, stored with the installed
version, is ``worse``, every answer is the site's standard of care under the policy's safety rules, with the
rule ``site-gate`` saying so (:mod:`client.site_gate`; ``/health`` reports the verdict); a record whose
standard of care cannot be named (its usual formulation is not in the record's catalogue) gets a 422 naming
the reason, never another answer. :func:`serve` runs the app with uvicorn, on 127.0.0.1 unless told otherwise
(elsewhere only with an access token and TLS: :mod:`shared.web.access`).

The clinician's page (``GET``/``POST /``, :mod:`client.clinician_page`) is served by the same app: a form for
the patient, and the same recommendation as ``/recommend`` with its reasons, standard of care and a dose chart.

A service serving a site (``fednano serve --site``) records every dose it recommends in the site's decision log
(``decisions.csv``, :class:`client.decision_log.DecisionLog`), which the site's next release-gate estimate reads.

Example
-------
>>> app = make_app(load_policy(bundle, trust_key))                   # doctest: +SKIP
>>> TestClient(app).post("/recommend", json=record).json()["dose_mg"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from client.clinician_page import add_clinician_page
from client.decision_log import DecisionLog
from client.recommender import (
    InputProblem,
    InstalledPolicy,
    PolicyUnavailable,
    RecommenderInputError,
    json_document,
    recommend_many,
    recommendation_json,
    validate_batch,
    validate_record,
)
from shared import strict_json
from shared.dosing_policy import DosingPolicy, Recommendation
from shared.patient_record import PatientRecord

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
MAX_BATCH = 200
"""Most records in one batch request. With the monotone guard, 200 ordinary records (generated, half of them
later cycles) take about 0.8 s on a busy 2-core machine, and 200 records each at the guard's bound
(``shared.dosing_policy.MAX_GUARD_CANDIDATES`` scored actions) about 12 s; a larger job is several requests."""
MAX_RECORD_BYTES = 64 * 1024
"""Largest body of a one-record request: a record is about 1 kB, and 50 catalogue ids of 64 characters fit
many times over."""
MAX_BATCH_BYTES = 512 * 1024
"""Largest body of a batch request: ``MAX_BATCH`` records of about 1 kB, pretty-printed, with room to spare."""

FHIR_JSON = "application/fhir+json"


class BodyTooLarge(Exception):
    """A request body above the endpoint's limit (answered 413, the rest of the body unread)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


def make_app(served: DosingPolicy | InstalledPolicy, log: DecisionLog | None = None) -> FastAPI:
    """The HTTP app serving a loaded policy, or the one a site's store holds (:class:`InstalledPolicy`: a newer
    install is served once installed, and nothing is while the store cannot vouch for its policy: 503).
    ``log``: the site's decision log (``decisions.csv``), where every dose recommended is recorded."""
    current = served.current if isinstance(served, InstalledPolicy) else lambda: served

    def recommended(records: list[PatientRecord]) -> list:
        """The policy's recommendations for the records, each dose recorded in ``log``."""
        results = recommend_many(current(), records, "body")
        if log is not None:
            log.record(records, results)
        return results

    policy = current()
    version = policy.manifest.version if policy.manifest is not None else None
    app = FastAPI(title="fednano telemedicine recommender", version=str(version),
                  description="Dose recommendations of the federated liposomal-doxorubicin dosing policy "
                              "(decision support: a clinician decides).")
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(RecommenderInputError, _input_error)
    app.add_exception_handler(BodyTooLarge, _too_large)
    app.add_exception_handler(PolicyUnavailable, _unavailable)
    app.openapi = lambda: _openapi(app)
    add_clinician_page(app, current, recommended)  # the page at /, beside the JSON API (client.clinician_page)

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Service status, the policy version and its signed manifest's metadata (503 if no policy may be
        served)."""
        report = health_report(current())
        if log is not None:
            report["decision_log"] = {"file": log.path.name, "problem": log.problem}
        return report

    @app.post("/recommend", response_model=Recommendation, openapi_extra=_body_schema("PatientRecord"))
    async def recommend_one(request: Request) -> dict[str, Any]:
        """The recommendation for one patient record."""
        record = validate_record(await _json_body(request, MAX_RECORD_BYTES), "body")
        result = await run_in_threadpool(recommended, [record])
        return recommendation_json(result[0])

    @app.post("/recommend/batch", response_model=list[Recommendation],
              openapi_extra=_body_schema("PatientRecord", many=True))
    async def recommend_batch(request: Request) -> list[dict[str, Any]]:
        """Recommendations for a list of 1 to ``MAX_BATCH`` records, in order (one vectorised call of the
        policy)."""
        records = validate_batch(await _json_body(request, MAX_BATCH_BYTES), MAX_BATCH)
        results = await run_in_threadpool(recommended, records)
        return [recommendation_json(r) for r in results]

    @app.post("/recommend/fhir", response_class=JSONResponse,
              responses={200: {"description": "A FHIR R4 MedicationRequest (status active or on-hold, intent "
                                              "proposal), or an OperationOutcome when treatment is to stop",
                               "content": {FHIR_JSON: {}}}},
              openapi_extra=_body_schema("PatientRecord"))
    async def recommend_fhir(request: Request) -> JSONResponse:
        """The recommendation for one record as FHIR R4 JSON."""
        from client.fhir import fhir_resource

        record = validate_record(await _json_body(request, MAX_RECORD_BYTES), "body")
        result = await run_in_threadpool(recommended, [record])
        return JSONResponse(fhir_resource(result[0]), media_type=FHIR_JSON)

    return app


def health_report(policy) -> dict[str, Any]:
    """What ``GET /health`` returns: status, version, what is served (``serving``: the policy, or standard of
    care where the site's own logs find the installed version worse), the site's verdict on the version
    (``site_gate``, None without one: :meth:`client.site_gate.SiteGate.to_dict`), the formulations known and
    the manifest metadata."""
    manifest = policy.manifest
    gate = getattr(policy, "site_gate", None)
    return {
        "status": "ok",
        "policy_version": manifest.version if manifest is not None else None,
        "serving": "standard of care" if gate is not None and gate.worse else "policy",
        "site_gate": None if gate is None else gate.to_dict(),
        "formulations": sorted(policy.formulations),
        "manifest": None if manifest is None else {
            key: value for key, value in manifest.to_dict().items() if key != "files"
        } | {"files": sorted(manifest.files)},
    }


# ---------------------------------------------------------------------------------------------------------
# Reading a body: bounded, then the recommender's strict reader


async def _json_body(request: Request, limit: int) -> Any:
    """The request body parsed as strict JSON; ``BodyTooLarge`` past ``limit`` bytes (announced or read)."""
    announced = request.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > limit:
        raise BodyTooLarge(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise RecommenderInputError([InputProblem("body", (), "empty; expected JSON")])
    try:
        return json_document(raw)
    except UnicodeDecodeError as err:
        raise RecommenderInputError([InputProblem("body", (), f"not UTF-8 text (at byte {err.start})")]) from None
    except json.JSONDecodeError as err:
        raise RecommenderInputError([InputProblem("body", (), f"not valid JSON at character {err.pos}: "
                                                              f"{err.msg}")]) from None
    except strict_json.StrictJsonError as err:
        raise RecommenderInputError([InputProblem("body", (), str(err))]) from None


# ---------------------------------------------------------------------------------------------------------
# Errors: the field and the rule, never the input


def _detail(problems: list[InputProblem]) -> list[dict[str, Any]]:
    """FastAPI's shape of an error list (``loc``, ``msg``, ``type``), without ``input``."""
    detail = []
    for problem in problems:
        head: list[str | int] = ["body"]
        if problem.source.startswith("body["):
            head.append(int(problem.source[5:-1]))
        detail.append({"loc": [*head, *problem.field], "msg": problem.rule, "type": "value_error"})
    return detail


async def _input_error(request: Request, exc: RecommenderInputError) -> JSONResponse:
    """422 for a request the recommender cannot use: one entry and one line per problem."""
    return JSONResponse(status_code=422, content={"detail": _detail(exc.problems), "errors": exc.lines})


async def _unavailable(request: Request, exc: PolicyUnavailable) -> JSONResponse:
    """503 while the site's store cannot vouch for a policy (the reason is the store's, on the site's disk)."""
    line = f"no policy can be served: {exc}"
    return JSONResponse(status_code=503, content={"detail": [{"loc": [], "msg": line, "type": "unavailable"}],
                                                  "errors": [line]})


async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
    line = f"body: larger than {exc.limit} bytes, the limit of {request.url.path}"
    return JSONResponse(status_code=413, content={"detail": [{"loc": ["body"], "msg": line, "type": "too_large"}],
                                                  "errors": [line]})


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 for FastAPI's own checks (path or query parameters), with no input values in it."""
    detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg")), "type": str(e.get("type"))}
              for e in exc.errors()]
    lines = [f"{'.'.join(str(part) for part in d['loc']) or 'request'}: {d['msg']}" for d in detail]
    return JSONResponse(status_code=422, content={"detail": detail, "errors": lines})


# ---------------------------------------------------------------------------------------------------------
# OpenAPI: the bodies are read by hand, so their schema is declared here


def _body_schema(model: str, many: bool = False) -> dict[str, Any]:
    reference: dict[str, Any] = {"$ref": f"#/components/schemas/{model}"}
    schema = {"type": "array", "items": reference, "minItems": 1, "maxItems": MAX_BATCH} if many else reference
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the patient record's (and the models it holds), once per app."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        record = PatientRecord.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(record.pop("$defs", {}))
        components["PatientRecord"] = record
        app.openapi_schema = schema
    return app.openapi_schema


def serve(served: DosingPolicy | InstalledPolicy, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          log: DecisionLog | None = None, token: str | None = None, tls=None) -> None:
    """Serve the policy (or the one a site's store holds) over HTTP with uvicorn until interrupted, recording
    each dose recommended in ``log`` if given. ``token``: every request must present it
    (:func:`shared.web.access.protect`); ``tls``: a :class:`shared.web.access.TLSFiles` to serve HTTPS with.
    Off 127.0.0.1 both are required (:func:`shared.web.access.check_binding` raises ``WebAccessError``)."""
    import uvicorn

    from shared.web.access import check_binding, protect, uvicorn_tls_kwargs

    check_binding(host, token, tls)
    app = make_app(served, log)
    protect(app, token)
    uvicorn.run(app, host=host, port=port, log_level="info", **uvicorn_tls_kwargs(tls))
