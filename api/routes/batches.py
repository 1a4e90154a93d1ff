"""``/v1/batches``: many jobs in one request (JSON list, ``{"jobs": [...]}``, or a JSONL upload)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from api.deps import BaseURL, Caller, Service
from nirvana.service.errors import FieldError
from nirvana.service.schemas import Batch, JobRequest

router = APIRouter(prefix="/v1/batches", tags=["batches"])


def _parse_jsonl(text: str) -> list[Any]:
    items = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise FieldError(f"jobs[{len(items)}]", f"line {i + 1} is not JSON: {e.msg}") from e
    return items


async def _items(request: Request) -> list[Any]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise FieldError("file", "a JSONL file upload named 'file' is required")
        return _parse_jsonl((await upload.read()).decode("utf-8"))
    raw = (await request.body()).decode("utf-8")
    if ctype in ("application/jsonl", "application/x-ndjson", "application/x-jsonlines", "text/plain"):
        return _parse_jsonl(raw)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise FieldError("body", f"not JSON: {e.msg}") from e
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


@router.post("", status_code=202, response_model=Batch)
async def create_batch(request: Request, svc: Service, caller: Caller, base: BaseURL) -> Batch:
    """Up to ``max_batch_jobs`` jobs (default 1000). Returns the batch id; poll ``GET /v1/batches/{id}``."""
    reqs = _validate(await _items(request), svc.settings.max_batch_jobs)
    return await run_in_threadpool(svc.create_batch, caller, reqs, base)


@router.get("/{batch_id}", response_model=Batch)
def get_batch(batch_id: str, svc: Service, caller: Caller, base: BaseURL) -> Batch:
    return svc.get_batch(caller, batch_id, base)


@router.delete("/{batch_id}", response_model=Batch)
def cancel_batch(batch_id: str, svc: Service, caller: Caller, base: BaseURL) -> Batch:
    return svc.cancel_batch(caller, batch_id, base)
