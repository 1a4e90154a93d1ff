"""One text-to-image generation request: its fields, their hard limits and their check, defined once.

A :class:`GenerationRequest` is a generation with every field concrete (the seed assigned, the served model's
defaults applied), checked on construction. Everything that carries a request goes through it:

* the API's bodies (``nirvana.service.schemas.JobRequest``, ``OpenAIImageRequest``) declare its fields with these
  limits (left out there, a field takes the served model's default); the service resolves a body into one;
* a job row stores one in the columns of the same names (``nirvana.service.jobs.NewJob.request``);
  :meth:`GenerationRequest.from_row` reads it back (the render plan, the API's job response);
* the cache's request is one (``nirvana.cache.request.CacheRequest`` adds the namespace and the embedding), and its
  exact key is :meth:`GenerationRequest.digest` of the namespace's model_key.

Which model is not a field: the API names one (``model``), a job stores the name and its ``model_key``, the cache
keys on the namespace's ``model_key``.

The limits here are hard ceilings; a deployment's own (``max_prompt_chars``, ``max_steps``, ``max_guidance``,
``max_image_size``, the model's size multiple) are checked by the service, and the cache checks
``max_prompt_chars`` again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_TEXT_CHARS = 100_000  # prompt, negative prompt
MAX_STEPS = 1000
MAX_GUIDANCE = 100
MAX_SEED = 2**63 - 1
MAX_SIDE = 16384  # width, height
MAX_MODEL_CHARS = 200  # a served model's name (API bodies only)


def storable(v: str) -> str:
    """Text Postgres can store: no NUL characters and no unpaired surrogates (JSON allows both)."""
    if "\x00" in v:
        raise ValueError(f"must not contain NUL characters (position {v.index(chr(0))})")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode (unpaired surrogate at position {e.start})") from e
    return v


@dataclass(frozen=True)
class GenerationRequest:
    """What one generation asks for; equal requests (on one model) mean the same image.

    Raises:
        ValueError: a field outside its limits, naming the field.
    """

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int

    def __post_init__(self) -> None:
        for name in ("prompt", "negative_prompt"):
            v = getattr(self, name)
            if not isinstance(v, str) or len(v) > MAX_TEXT_CHARS:
                raise ValueError(f"{name} must be a string of at most {MAX_TEXT_CHARS} chars")
            try:
                storable(v)
            except ValueError as e:
                raise ValueError(f"{name} {e}") from None
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be in 1..{MAX_STEPS}, got {self.steps}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in 0..2**63-1, got {self.seed}")
        if not (math.isfinite(self.guidance) and 0 <= self.guidance <= MAX_GUIDANCE):
            raise ValueError(f"guidance must be in 0..{MAX_GUIDANCE}, got {self.guidance}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if not 1 <= v <= MAX_SIDE:
                raise ValueError(f"{name} must be in 1..{MAX_SIDE}, got {v}")

    @staticmethod
    def from_row(row: Mapping[str, Any]) -> GenerationRequest:
        """The request stored in a row (a job's columns of the same names)."""
        return GenerationRequest(
            prompt=row["prompt"],
            negative_prompt=row["negative_prompt"],
            seed=int(row["seed"]),
            steps=int(row["steps"]),
            guidance=float(row["guidance"]),
            width=int(row["width"]),
            height=int(row["height"]),
        )

    def fields(self) -> dict[str, Any]:
        """The request's fields by name (a subclass's own fields left out): a row's columns, a response's."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(GenerationRequest)}

    def digest(self, model_key: str) -> str:
        """Digest of every field and ``model_key``: the cache's exact key (equal digests, the same image)."""
        blob = json.dumps(
            [
                self.prompt,
                self.negative_prompt,
                int(self.seed),
                int(self.steps),
                round(float(self.guidance), 6),
                int(self.width),
                int(self.height),
                model_key,
            ],
            ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode()).hexdigest()


__all__ = [
    "MAX_GUIDANCE",
    "MAX_MODEL_CHARS",
    "MAX_SEED",
    "MAX_SIDE",
    "MAX_STEPS",
    "MAX_TEXT_CHARS",
    "GenerationRequest",
    "storable",
]
