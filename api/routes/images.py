"""``POST /v1/images/generations``: OpenAI Images API compatible; waits for the result."""

from __future__ import annotations

import base64
import time

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from api.deps import BaseURL, Caller, Service, charge_jobs
from nirvana.service.errors import FieldError, ServiceError
from nirvana.service.schemas import JobRequest, OpenAIImage, OpenAIImageRequest, OpenAIImageResponse

router = APIRouter(prefix="/v1/images", tags=["openai"])
# JobRequest fields that this API spells differently
_OPENAI_FIELD = {"width": "size", "height": "size"}


class GenerationTimeout(ServiceError):
    status = 504


class GenerationFailed(ServiceError):
    status = 500


@router.post("/generations", response_model=OpenAIImageResponse, response_model_exclude_none=True)
async def generations(
    request: Request, body: OpenAIImageRequest, svc: Service, caller: Caller, base: BaseURL
) -> OpenAIImageResponse:
    """``n`` images (seeds ``seed``, ``seed+1``, ... when ``seed`` is given). ``url`` links point at
    ``/v1/jobs/{id}/image`` (same API key)."""
    width = height = None
    if body.size:
        w, h = (int(v) for v in body.size.split("x"))
        limit = svc.settings.max_image_size
        if not (1 <= w <= limit and 1 <= h <= limit):
            raise FieldError("size", f"must be WIDTHxHEIGHT with each side in 1..{limit}")
        width, height = w, h
    charge_jobs(request, caller, body.n)
    reqs = []
    for i in range(body.n):  # validate all n requests before creating any job
        try:
            req = JobRequest(
                prompt=body.prompt,
                negative_prompt=body.negative_prompt,
                steps=body.steps,
                guidance=body.guidance,
                seed=None if body.seed is None else body.seed + i,
                width=width,
                height=height,
                model=body.model,
                cache=body.cache,
            )
        except ValidationError as e:
            err = e.errors()[0]
            name = str(err["loc"][0]) if err["loc"] else "body"
            raise FieldError(_OPENAI_FIELD.get(name, name), f"{err['msg']} ({name})") from e
        reqs.append(req)
    job_ids = []
    for req in reqs:
        try:
            job, _ = await run_in_threadpool(svc.create_job, caller, req, None, base)
        except FieldError as e:
            if e.field in _OPENAI_FIELD:  # the service names width/height; this API calls them size
                raise FieldError(_OPENAI_FIELD[e.field], f"{e.field} {e.detail}") from e
            raise
        job_ids.append(job.id)
    rows = await run_in_threadpool(svc.wait, caller, job_ids, svc.settings.openai_wait_s)
    pending = [r["id"] for r in rows if r["status"] != "done"]
    failed = [r for r in rows if r["status"] in ("failed", "cancelled")]
    if failed:
        raise GenerationFailed(f"generation {failed[0]['status']}: {failed[0]['error'] or ''} (job {failed[0]['id']})")
    if pending:
        raise GenerationTimeout(f"not finished within {svc.settings.openai_wait_s:.0f}s; poll /v1/jobs/{pending[0]}")
    data = []
    for r in rows:
        if body.response_format == "url":
            data.append(OpenAIImage(url=f"{base}/v1/jobs/{r['id']}/image"))
        else:
            png = await run_in_threadpool(svc.job_image, caller, r["id"])
            data.append(OpenAIImage(b64_json=base64.b64encode(png).decode()))
    return OpenAIImageResponse(created=int(time.time()), data=data)
