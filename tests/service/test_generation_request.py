"""One generation request type (``nirvana.generation.GenerationRequest``): the API bodies take its fields with its
limits, a job row stores it, the cache's request is one and keys on its digest, the plan reads it back."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from nirvana.cache.request import CacheRequest, Namespace
from nirvana.generation import MAX_SEED, GenerationRequest
from nirvana.pipeline.plan import cache_request
from nirvana.service.jobs import _INSERT_COLS, NewJob
from nirvana.service.schemas import JobRequest, OpenAIImageRequest

BASE: dict[str, Any] = dict(prompt="a cat", negative_prompt="", seed=1, steps=50, guidance=7.0, width=32, height=32)


def test_exact_key_is_unchanged() -> None:
    """Digests of the key before the request type existed: cached exact entries keep matching."""
    assert CacheRequest("a cat", "", 1, 50, 7.0, 32, 32, Namespace("mk-32x32", "t")).exact_key() == (
        "e1fee1bb558fb6512b78edeb56a386fa8cefedba727ea107e3e792ecd856927f"
    )
    req = CacheRequest("ünï \u2603", "neg", 2**40, 1000, 7.1234567, 16384, 8, Namespace("x", "y"))
    assert req.exact_key() == "590d2b7ceaeafba1cad1a4fa63fc0851914bd9b6c0ff154f58b71f421cc30cad"
    # not the tenant, not the embedding; every field of the request and the model_key
    same = CacheRequest.of(GenerationRequest(**req.fields()), Namespace("x", "other"))
    assert dataclasses.replace(same, embedding=np.ones(3, np.float32)).exact_key() == req.exact_key()
    changes: dict[str, Any] = dict(prompt="b", negative_prompt="n", seed=2, steps=51, guidance=7.5, width=64, height=64)
    for name, value in changes.items():
        assert dataclasses.replace(req, **{name: value}).exact_key() != req.exact_key(), name
    assert CacheRequest.of(GenerationRequest(**req.fields()), Namespace("z", "y")).exact_key() != req.exact_key()


def test_the_cache_request_is_a_generation_request() -> None:
    ns = Namespace("mk", "t")
    g = GenerationRequest(**BASE)
    c = CacheRequest.of(g, ns)
    assert isinstance(c, GenerationRequest) and c.fields() == g.fields() == BASE
    assert CacheRequest("a cat", "", 1, 50, 7.0, 32, 32, ns) == c  # positional: the fields, then the namespace
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.embedding = np.zeros(3)  # type: ignore[misc]
    with pytest.raises(ValueError, match="steps"):
        CacheRequest(**{**BASE, "steps": 0}, namespace=ns)


@pytest.mark.parametrize(
    "field,bad,ok",
    [
        ("steps", 0, 1),
        ("steps", 1001, 1000),
        ("seed", -1, 0),
        ("seed", MAX_SEED + 1, MAX_SEED),
        ("guidance", -0.1, 0.0),
        ("guidance", 100.5, 100.0),
        ("guidance", float("nan"), 1.0),
        ("guidance", float("inf"), 1.0),
        ("width", 0, 1),
        ("height", 16385, 16384),
        ("prompt", "x" * 100_001, "x" * 100_000),
        ("negative_prompt", "x" * 100_001, "x" * 100_000),
        ("prompt", "a\x00b", "ab"),
        ("negative_prompt", "a\ud800", "a"),
    ],
)
def test_one_set_of_limits(field: str, bad: Any, ok: Any) -> None:
    """The dataclass and the API body refuse and accept the same values (the body's other checks aside)."""
    with pytest.raises(ValueError, match=field):
        GenerationRequest(**{**BASE, field: bad})
    GenerationRequest(**{**BASE, field: ok})
    body = {"prompt": "a cat", field: bad}
    with pytest.raises(ValidationError):
        JobRequest.model_validate(body)
    JobRequest.model_validate({**body, field: ok})
    if field not in ("width", "height"):  # the OpenAI body takes a size string instead
        with pytest.raises(ValidationError):
            OpenAIImageRequest.model_validate(body)
        OpenAIImageRequest.model_validate({**body, field: ok})


def test_job_columns_and_the_plan_read_back_the_request() -> None:
    g = GenerationRequest(**{**BASE, "prompt": "a red cube", "guidance": 1.25})
    job = NewJob("j1", "alice", g, "tiny", "mk-32x32", "render.mk", "auto", "hash", batch_index=3, cache_tenant="alice")
    cols = job.columns()
    assert sorted(cols) == sorted(_INSERT_COLS)
    assert {k: cols[k] for k in BASE} == g.fields()
    row = {**cols, "embedding": np.arange(4, dtype=np.float32).tobytes()}
    assert GenerationRequest.from_row(row) == g
    req = cache_request(row, shared_pool=False)
    assert req.fields() == g.fields()
    assert req.namespace == Namespace("mk-32x32", "alice")
    assert req.embedding is not None and req.embedding.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert req.exact_key() == g.digest("mk-32x32")
