"""The clinician's recommendation page, served by ``fednano serve`` at ``/`` beside the JSON API.

- ``GET /``: the patient form (:mod:`client.patient_form`: every field of the record with its unit and allowed
  range from the site-data contract, blank), an optional wearable CSV upload (the last cycle's daily readings,
  summarised as ``fednano recommend --vitals`` does: :func:`client.recommender.with_vitals`) and an optional
  patient JSON upload (``examples/patient.json``), which replaces the typed fields and is shown in them;
- ``POST /``: the same page with the answer (:mod:`client.clinician_view`), or, for an input the recommender
  cannot use, with each problem next to its field in words (status 422; 413 for an upload over the limit).

The form is posted (``multipart/form-data``), never sent as a query, so no patient value is in a URL or an
access log line; nothing here logs. Problems name the field and the rule, never the value typed, and no input
gets a traceback or a 500: the readers are the JSON API's own (strict JSON, the record's validator, the
vitals checks), their :class:`client.recommender.RecommenderInputError` rendered on the page. A recommendation
made here is recorded in a site's decision log like one made through the API (``recommended``).

Server-rendered with Jinja2 templates shipped in the package (``client/templates``); the stylesheet is the
project's (``shared.web.STATIC_DIR`` at ``/static``). No script, no asset from the network.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from client.clinician_view import answer_view, policy_view
from client.patient_form import form_groups, form_values, problems_by_field, validated_form
from client.recommender import (
    InputProblem,
    PolicyUnavailable,
    RecommenderInputError,
    json_document,
    validate_record,
    with_vitals,
)
from shared import strict_json
from shared.patient_record import PatientRecord

TEMPLATES = Path(__file__).parent / "templates"
PATIENT_JSON_FIELD, VITALS_FIELD = "patient_json", "vitals_csv"
"""Names of the two file inputs."""
PATIENT_JSON_SOURCE, VITALS_SOURCE = "patient JSON", "wearable CSV"
"""How problems name the two uploads."""
MAX_PATIENT_JSON_BYTES = 64 * 1024
"""Largest patient JSON upload: ``client.service.MAX_RECORD_BYTES``, the limit of one record over the API."""
MAX_VITALS_BYTES = 1 << 20
"""Largest wearable CSV: one patient's readings of one cycle (at most 43 days) are a few kB."""
MAX_FORM_BYTES = MAX_PATIENT_JSON_BYTES + MAX_VITALS_BYTES + 64 * 1024
"""Largest form post: both uploads and the typed fields."""
MAX_FORM_FIELDS = 100
"""Most parts of a form post: the record has 30 fields."""


def _environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def add_clinician_page(app: FastAPI, current: Callable[[], Any],
                       recommended: Callable[[list[PatientRecord]], list]) -> None:
    """Add the page's two routes to ``app`` (the recommender's) and mount the project's stylesheet at
    ``/static``. ``current()`` is the policy to serve now; ``recommended(records)`` recommends and records the
    doses in the site's decision log, as the JSON API does."""
    from fastapi.staticfiles import StaticFiles

    from shared.web import STATIC_DIR

    environment = _environment()
    template = environment.get_template("clinician.html")

    def page(status: int = 200, **context: Any) -> HTMLResponse:
        policy_error = None
        try:
            policy = current()
        except PolicyUnavailable as err:
            policy, policy_error, status = None, f"no policy can be served: {err}", 503
        context = {"groups": form_groups(), "values": {}, "field_errors": {}, "page_errors": [], "answer": None,
                   "policy": policy_view(policy) if policy is not None else None, "policy_error": policy_error,
                   "limits": {"json_kb": MAX_PATIENT_JSON_BYTES // 1024, "csv_kb": MAX_VITALS_BYTES // 1024},
                   "upload_names": {"json": PATIENT_JSON_FIELD, "csv": VITALS_FIELD}} | context
        return HTMLResponse(template.render(**context), status_code=status)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def clinician_form() -> HTMLResponse:
        """The empty patient form."""
        return page()

    @app.post("/", response_class=HTMLResponse, include_in_schema=False)
    async def clinician_answer(request: Request) -> HTMLResponse:
        """The recommendation for the submitted patient, or the form with each problem next to its field."""
        announced = request.headers.get("content-length", "")
        if announced.isdigit() and int(announced) > MAX_FORM_BYTES:
            return page(413, page_errors=[f"the form is larger than {MAX_FORM_BYTES // 1024} kB; a patient JSON "
                                          f"is at most {MAX_PATIENT_JSON_BYTES // 1024} kB and a wearable CSV at "
                                          f"most {MAX_VITALS_BYTES // 1024} kB"])
        try:
            form = await request.form(max_files=2, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FORM_BYTES)
        except (MultiPartException, HTTPException, ValueError, KeyError):
            return page(400, page_errors=["the form could not be read (not a form post, or a broken upload); "
                                          "reload the page and submit again"])
        typed = {key: value for key, value in form.items() if isinstance(value, str)}
        patient_json, vitals = form.get(PATIENT_JSON_FIELD), form.get(VITALS_FIELD)
        values = typed
        try:
            uploaded = await _upload(patient_json, MAX_PATIENT_JSON_BYTES, PATIENT_JSON_SOURCE)
            if uploaded is not None:
                record = _record_from_json(uploaded)
                values = form_values(record)
            else:
                record = validated_form(typed)
            warnings: list[str] = []
            readings = await _upload(vitals, MAX_VITALS_BYTES, VITALS_SOURCE)
            if readings is not None:
                record, warnings = await run_in_threadpool(_with_readings, record, readings)
                values = form_values(record)
            answer = await run_in_threadpool(_answer, current, recommended, record, warnings)
        except PolicyUnavailable:
            return page(503, values=values)  # page() says why: the policy is looked up again
        except RecommenderInputError as err:
            by_field, rest = problems_by_field([_located(p) for p in err.problems], (PATIENT_JSON_FIELD, VITALS_FIELD))
            return page(422, values=values, field_errors=by_field, page_errors=rest)
        return page(values=values, answer=answer)

    if not any(getattr(route, "path", None) == "/static" for route in app.routes):
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def _located(problem: InputProblem) -> InputProblem:
    """A problem of an upload as a whole (not of one of its fields) located at the upload's input."""
    uploads = {PATIENT_JSON_SOURCE: PATIENT_JSON_FIELD, VITALS_SOURCE: VITALS_FIELD}
    if problem.field or problem.source not in uploads:
        return problem
    return InputProblem(problem.source, (uploads[problem.source],), problem.rule)


async def _upload(part: Any, limit: int, source: str) -> bytes | None:
    """The bytes of an uploaded file (None when none was chosen); ``RecommenderInputError`` over ``limit``."""
    if not isinstance(part, UploadFile):
        return None
    raw = await part.read(limit + 1)
    if not raw and not part.filename:
        return None
    if len(raw) > limit:
        raise RecommenderInputError([InputProblem(source, (), f"larger than {limit // 1024} kB")])
    if not raw.strip():
        raise RecommenderInputError([InputProblem(source, (), "the file is empty")])
    return raw


def _record_from_json(raw: bytes) -> PatientRecord:
    """A record from an uploaded patient JSON, read as the API and ``fednano recommend`` read one."""
    import json

    try:
        data = json_document(raw)
    except UnicodeDecodeError as err:
        raise RecommenderInputError([InputProblem(PATIENT_JSON_SOURCE, (), f"not UTF-8 text (at byte {err.start}); "
                                                                           "save the record as UTF-8 JSON")]) from None
    except json.JSONDecodeError as err:
        raise RecommenderInputError([InputProblem(PATIENT_JSON_SOURCE, (), f"not valid JSON at line {err.lineno} "
                                                                           f"column {err.colno}: {err.msg}")]) from None
    except strict_json.StrictJsonError as err:
        raise RecommenderInputError([InputProblem(PATIENT_JSON_SOURCE, (), str(err))]) from None
    return validate_record(data, PATIENT_JSON_SOURCE)


def _with_readings(record: PatientRecord, raw: bytes) -> tuple[PatientRecord, list[str]]:
    """The record with its wearable summary from the uploaded readings (a temporary copy, deleted after;
    problems name the upload, not the copy)."""
    with tempfile.TemporaryDirectory(prefix="fednano-vitals-") as folder:
        path = Path(folder) / "vitals.csv"
        path.write_bytes(raw)
        try:
            return with_vitals(record, path, VITALS_SOURCE)
        except RecommenderInputError as err:
            raise RecommenderInputError([InputProblem(VITALS_SOURCE, (), line) for line in err.lines]) from None


def _answer(current: Callable[[], Any], recommended: Callable[[list[PatientRecord]], list], record: PatientRecord,
            warnings: list[str]):
    """The recommendation's view (:func:`client.clinician_view.answer_view`)."""
    policy = current()
    recommendation = recommended([record])[0]
    return answer_view(policy, record, recommendation, tuple(warnings))
