"""The telemedicine recommender over HTTP: a FastAPI app around one loaded, verified dosing policy.

Endpoints (OpenAPI schema at ``/openapi.json``, interactive docs at ``/docs``):

- ``GET /health``: status, policy version and the signed manifest's metadata;
- ``POST /recommend``: one patient record (``shared.patient_record.PatientRecord``) → recommendation JSON;
- ``POST /recommend/batch``: a non-empty list of records → a list of recommendations (one batched call);
- ``POST /recommend/fhir``: one record → a FHIR R4 MedicationRequest (or an OperationOutcome saying why
  treatment stops; :mod:`client.fhir`).

A request the service cannot use — broken JSON, a wrong type, an out-of-range value, an unknown field, an
empty list, a catalogue the policy does not know — gets a 422 whose ``detail`` is FastAPI's list of errors
(each with ``loc``, the path of the field) and whose ``errors`` says the same in one line per problem.

The policy is verified and loaded once, before the app is made (:func:`client.recommender.load_policy`);
:func:`serve` runs the app with uvicorn, on 127.0.0.1 unless told otherwise.

Example
-------
>>> app = make_app(load_policy(bundle, trust_key))                   # doctest: +SKIP
>>> TestClient(app).post("/recommend", json=record).json()["dose_mg"]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import Field

from client.recommender import RecommenderInputError, recommend_many, recommendation_json
from shared.dosing_policy import Recommendation
from shared.patient_record import PatientRecord

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
MAX_BATCH = 10_000
"""Most records in one batch request: a few seconds of work at the measured throughput."""

FHIR_JSON = "application/fhir+json"

Batch = Annotated[list[PatientRecord], Field(min_length=1, max_length=MAX_BATCH)]


def make_app(policy) -> FastAPI:
    """The HTTP app serving ``policy`` (a loaded ``shared.dosing_policy.DosingPolicy``)."""
    version = policy.manifest.version if policy.manifest is not None else None
    app = FastAPI(title="fednano telemedicine recommender", version=str(version),
                  description="Dose recommendations of the federated liposomal-doxorubicin dosing policy "
                              "(decision support: a clinician decides).")
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(RecommenderInputError, _input_error)

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Service status, the policy version and its signed manifest's metadata."""
        return health_report(policy)

    @app.post("/recommend", response_model=Recommendation)
    def recommend_one(record: PatientRecord) -> dict[str, Any]:
        """The recommendation for one patient record."""
        return recommendation_json(recommend_many(policy, [record], "body")[0])

    @app.post("/recommend/batch", response_model=list[Recommendation])
    def recommend_batch(records: Annotated[Batch, Body()]) -> list[dict[str, Any]]:
        """Recommendations for a list of records, in order (one vectorised call of the policy)."""
        return [recommendation_json(r) for r in recommend_many(policy, records, "body")]

    @app.post("/recommend/fhir", response_class=JSONResponse,
              responses={200: {"description": "A FHIR R4 MedicationRequest (status active or on-hold, intent "
                                              "proposal), or an OperationOutcome when treatment is to stop",
                               "content": {FHIR_JSON: {}}}})
    def recommend_fhir(record: PatientRecord) -> JSONResponse:
        """The recommendation for one record as FHIR R4 JSON."""
        from client.fhir import fhir_resource

        resource = fhir_resource(recommend_many(policy, [record], "body")[0])
        return JSONResponse(resource, media_type=FHIR_JSON)

    return app


def health_report(policy) -> dict[str, Any]:
    """What ``GET /health`` returns: status, version, the formulations known and the manifest metadata."""
    manifest = policy.manifest
    return {
        "status": "ok",
        "policy_version": manifest.version if manifest is not None else None,
        "formulations": sorted(policy.formulations),
        "manifest": None if manifest is None else {
            key: value for key, value in manifest.to_dict().items() if key != "files"
        } | {"files": sorted(manifest.files)},
    }


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with FastAPI's error list and one readable line per problem naming the field."""
    problems = exc.errors()
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(problems),
                                                  "errors": [_error_line(p) for p in problems]})


async def _input_error(request: Request, exc: RecommenderInputError) -> JSONResponse:
    """422 for a request that is well-formed but cannot be answered (e.g. an unknown catalogue)."""
    return JSONResponse(status_code=422, content={"detail": exc.lines, "errors": exc.lines})


def _error_line(problem: dict[str, Any]) -> str:
    """``body.age_years (got 300): Input should be less than or equal to 110``."""
    where = ".".join(str(part) for part in problem.get("loc", ())) or "request"
    value = problem.get("input")
    shown = "" if isinstance(value, dict | list) or value is None else f" (got {value!r})"
    if problem.get("type") == "json_invalid":
        loc = problem.get("loc", ())
        at = f" at character {loc[1]}" if len(loc) > 1 else ""
        reason = (problem.get("ctx") or {}).get("error", problem.get("msg"))
        return f"body: not valid JSON{at}: {reason}"
    return f"{where}{shown}: {problem.get('msg')}"


def serve(policy, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Serve the policy over HTTP with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(make_app(policy), host=host, port=port, log_level="info")
