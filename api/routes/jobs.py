"""``/v1/jobs``: submit, poll, fetch the PNG, cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Request, Response
from fastapi.concurrency import run_in_threadpool

from api.deps import ID_PATTERN, BaseURL, Caller, Service, charge_jobs
from nirvana.service.schemas import Job, JobRequest

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
ID = Annotated[str, Path(pattern=ID_PATTERN, description="a job id")]


@router.post("", status_code=202, response_model=Job)
def create_job(
    request: Request,
    body: JobRequest,
    svc: Service,
    caller: Caller,
    base: BaseURL,
    response: Response,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Job:
    """Queue a generation. With ``Idempotency-Key``: the same key and body return the original job (header
    ``Idempotent-Replayed: true``); the same key with another body is 422; 409 while the original is still
    being created."""
    charge_jobs(request, caller, 1)
    job, created = svc.create_job(caller, body, idempotency_key, base)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job


@router.get("/{job_id}", response_model=Job)
def get_job(job_id: ID, svc: Service, caller: Caller, base: BaseURL) -> Job:
    return svc.get_job(caller, job_id, base)


@router.get("/{job_id}/image", response_class=Response, responses={200: {"content": {"image/png": {}}}})
async def get_image(job_id: ID, svc: Service, caller: Caller) -> Response:
    data = await run_in_threadpool(svc.job_image, caller, job_id)
    return Response(content=data, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})


@router.delete("/{job_id}", response_model=Job)
def cancel_job(job_id: ID, svc: Service, caller: Caller, base: BaseURL) -> Job:
    """Cancel: at once when not yet rendering, else between denoising steps (poll for ``cancelled``)."""
    return svc.cancel_job(caller, job_id, base)
