"""Wire schemas of the job service (pydantic), shared by the API and the HTTP client.

The request bodies declare the fields of ``nirvana.generation.GenerationRequest`` with its limits (the types
below); the service resolves a body into one. Static bounds here are hard ceilings; the deployment's own limits
(``max_prompt_chars``, ``max_steps``, ``max_image_size``, ``max_batch_jobs``, the model's size multiple) are
enforced by the service and reported the same way: HTTP 422 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from nirvana.generation import MAX_GUIDANCE, MAX_MODEL_CHARS, MAX_SEED, MAX_SIDE, MAX_STEPS, MAX_TEXT_CHARS, storable

CacheMode = Literal["auto", "exact", "off"]
JobStatus = Literal["queued", "routing", "routed", "rendering", "done", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"done", "failed", "cancelled"})

Text = Annotated[str, AfterValidator(storable)]
# The generation request's fields, as request bodies take them (GenerationRequest's limits). Where a length
# limit stands relative to the storable check decides pydantic's message, part of the API's 4xx texts: before it,
# "String should have at most N characters" (prompts); after it, "Value should have at most N items after
# validation" (the model name, as it always answered).
Prompt = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS), AfterValidator(storable)]
NegativePrompt = Annotated[str, Field(max_length=MAX_TEXT_CHARS), AfterValidator(storable)]
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
Guidance = Annotated[float, Field(ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Side = Annotated[int, Field(ge=1, le=MAX_SIDE)]
ModelName = Annotated[Text, Field(max_length=MAX_MODEL_CHARS)]


class JobRequest(BaseModel):
    """One text-to-image request. Fields left out take the served model's defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    negative_prompt: NegativePrompt = ""
    steps: Steps | None = None
    guidance: Guidance | None = None
    seed: Seed | None = Field(None, description="assigned when absent, always echoed")
    width: Side | None = None
    height: Side | None = None
    model: ModelName | None = Field(None, description="a served model name (default: the first)")
    cache: CacheMode = "auto"


class BatchRequest(BaseModel):
    """A batch of jobs (JSON body); JSONL uploads carry one ``JobRequest`` per line."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[JobRequest] = Field(min_length=1, max_length=100_000)


class JobProgress(BaseModel):
    step: int
    total: int
    fraction: float


class JobTimings(BaseModel):
    """Timestamps (ISO 8601) of each stage and the durations between them, in seconds."""

    queued_at: str
    routed_at: str | None = None
    rendering_at: str | None = None
    done_at: str | None = None
    queue_s: float | None = None
    wait_render_s: float | None = None
    render_s: float | None = None
    total_s: float | None = None
    engine_s: float | None = None


class JobCache(BaseModel):
    """The cache outcome. Never names another tenant's prompt: ``source_job_id`` is only set when the
    source is the caller's own job."""

    mode: CacheMode
    tier: Literal["exact", "approximate", "miss"] | None = None
    k: int | None = None
    similarity: float | None = None
    steps_saved: int | None = None
    source_job_id: str | None = None


class Job(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    batch_id: str | None = None
    # The request as it was resolved (defaults filled in), in the request bodies' types.
    prompt: Prompt
    negative_prompt: NegativePrompt
    seed: Seed
    steps: Steps
    guidance: Guidance
    width: Side
    height: Side
    model: str
    progress: JobProgress
    timings: JobTimings
    cache: JobCache
    attempts: int
    steps_run: int | None = None
    image_url: str | None = None
    error: str | None = None


class BatchJobResult(BaseModel):
    id: str
    index: int
    status: JobStatus
    tier: str | None = None
    k: int | None = None
    image_url: str | None = None
    error: str | None = None


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    total: int
    counts: dict[str, int]
    completed: int
    done: bool
    cancel_requested: bool
    created_at: str
    jobs: list[BatchJobResult] = []


class OpenAIImageRequest(BaseModel):
    """OpenAI Images API ``POST /v1/images/generations`` (plus nirvana's ``seed``/``steps``/``cache``)."""

    model_config = ConfigDict(extra="ignore")

    prompt: Prompt
    model: ModelName | None = None
    n: int = Field(1, ge=1, le=10)
    size: str | None = Field(None, pattern=r"^\d{1,5}x\d{1,5}$")
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = None
    quality: str | None = None
    style: str | None = None
    negative_prompt: NegativePrompt = ""
    seed: Seed | None = None
    steps: Steps | None = None
    guidance: Guidance | None = None
    cache: CacheMode = "auto"


class OpenAIImage(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class OpenAIImageResponse(BaseModel):
    created: int
    data: list[OpenAIImage]


def job_to_dict(job: Job) -> dict[str, Any]:
    return job.model_dump(mode="json")
