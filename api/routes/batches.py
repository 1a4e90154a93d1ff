"""``/v1/batches``: many jobs in one request (JSON list, ``{"jobs": [...]}``, or a JSONL upload)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from api.deps import ID_PATTERN, BaseURL, Caller, Service, charge_jobs
from nirvana.service.errors import FieldError
from nirvana.service.schemas import Batch, JobRequest

router = APIRouter(prefix="/v1/batches", tags=["batches"])


def _text(raw: bytes, field: str) -> str:
    """``raw`` as UTF-8 (a leading BOM is dropped); invalid bytes are a 422 naming ``field`` and the offset."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FieldError(field, f"not valid UTF-8 (byte {e.start}: {e.reason})") from e


def _loads(text: str, field: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FieldError(field, f"{what} is not JSON: {e.msg} at column {e.colno}") from e
    except RecursionError as e:
        raise FieldError(field, f"{what} is nested too deeply") from e


def _parse_jsonl(text: str, max_items: int) -> list[Any]:
    """One JSON value per non-blank line (at most ``max_items`` lines, else a 422 naming the limit)."""
    lines = [(i, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    if len(lines) > max_items:
        raise FieldError("jobs", f"at most {max_items} jobs per batch (got {len(lines)})")
    return [_loads(line, f"jobs[{n}]", f"line {i + 1}") for n, (i, line) in enumerate(lines)]


async def _items(request: Request, max_items: int) -> list[Any]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise FieldError("file", "a JSONL file upload named 'file' is required")
        return _parse_jsonl(_text(await upload.read(), "file"), max_items)
    raw = _text(await request.body(), "body")
    if ctype in ("application/jsonl", "application/x-ndjson", "application/x-jsonlines", "text/plain"):
        return _parse_jsonl(raw, max_items)
    data = _loads(raw, "body", "the body")
    if isinstance(data, dict) and "jobs" in data:
        data = data["jobs"]
    if not isinstance(data, list):
        raise FieldError("jobs", "expected a JSON list of jobs, {'jobs': [...]}, or a JSONL upload")
    return data


def _validate(items: list[Any], limit: int) -> list[JobRequest]:
    if not items:
        raise FieldError("jobs", "at least one job is required")
    if len(items) > limit:
        raise FieldError("jobs", f"at most {limit} jobs per batch (got {len(items)})")
    out = []
    for i, it in enumerate(items):
        try:
            out.append(JobRequest.model_validate(it))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise FieldError(f"jobs[{i}]" + (f".{loc}" if loc else ""), err["msg"]) from e
    return out


_JOB_REF = {"$ref": "#/components/schemas/JobRequest"}
_BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [
                        {"type": "array", "items": _JOB_REF},
                        {
                            "type": "object",
                            "properties": {"jobs": {"type": "array", "items": _JOB_REF}},
                            "required": ["jobs"],
                        },
                    ]
                }
            },
            "application/jsonl": {"schema": {"type": "string", "description": "one JobRequest per line"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    }
}
ID = Annotated[str, Path(pattern=ID_PATTERN, description="a batch id")]


@router.post("", status_code=202, response_model=Batch, openapi_extra=_BATCH_BODY)
async def create_batch(request: Request, svc: Service, caller: Caller, base: BaseURL) -> Batch:
    """Up to ``max_batch_jobs`` jobs (default 1000). Returns the batch id; poll ``GET /v1/batches/{id}``."""
    reqs = _validate(await _items(request, svc.settings.max_batch_jobs), svc.settings.max_batch_jobs)
    charge_jobs(request, caller, len(reqs))
    return await run_in_threadpool(svc.create_batch, caller, reqs, base)


@router.get("/{batch_id}", response_model=Batch)
def get_batch(batch_id: ID, svc: Service, caller: Caller, base: BaseURL) -> Batch:
    return svc.get_batch(caller, batch_id, base)


@router.delete("/{batch_id}", response_model=Batch)
def cancel_batch(batch_id: ID, svc: Service, caller: Caller, base: BaseURL) -> Batch:
    return svc.cancel_batch(caller, batch_id, base)
