"""The diffusion engine: an explicit denoising loop that captures intermediate latents and resumes from them.

Resume rules (see docs/ENGINE.md for the derivations and measured tolerances):
    * A state captured after ``k`` of ``N`` steps holds the latent *before* ``timesteps[k]`` runs. Resuming it in
      an ``N``-step run starts the loop at index ``k``; the latent is used as is — never re-multiplied by
      ``init_noise_sigma`` (stock pipelines do that, which is wrong for a mid-trajectory Euler latent).
    * DDIM and Euler resume exactly (stateless steps; Euler's step index is set with ``set_begin_index``).
    * DPM-Solver++ is multistep: its history of model outputs is not in the state, so it restarts at first order
      at the resume point. Measured deviation is documented and tested.
    * A state resumes only a run of its own step count ``N``; one of another step count is refused (the cache
      looks up only states of the request's ``N``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from nirvana.cache.policy import KPolicy
from nirvana.engine.core import (
    MAX_STEPS,
    EngineCore,
    GenerationCancelled,
    ProgressCallback,
    RenderRequest,
    resume_index,
)
from nirvana.engine.loader import ModelComponents
from nirvana.engine.state import CapturedState

__all__ = [
    "MAX_STEPS",
    "DiffusionEngine",
    "GenerationCancelled",
    "GenerationOutput",
    "ProgressCallback",
    "default_capture_steps",
    "resume_index",
    "to_pil",
]


@functools.cache
def _paper_policy() -> KPolicy:
    return KPolicy.paper()  # immutable; read from its JSON file once per process, not once per generate()


def default_capture_steps(num_steps: int) -> list[int]:
    """The steps the cache looks up with the paper's table at ``num_steps`` (``KPolicy.cached_steps``: floor
    scaling) — the same function the lookup uses, so every captured state can be asked for."""
    return _paper_policy().cached_steps(num_steps)


@dataclass
class GenerationOutput:
    """Result of one batched run.

    Attributes:
        images: (B, 3, H, W) float in [-1, 1] on CPU.
        states: per prompt, the captured states in ascending step order (only steps actually run: k > K).
        start_step: K the run resumed at (0 for a full run).
        steps_run: denoising steps executed (N − K).
        model_key: namespace of every state produced.
        seconds: wall time of the loop (encoding + denoising + decoding).
    """

    images: torch.Tensor
    states: list[list[CapturedState]]
    start_step: int
    steps_run: int
    num_steps: int
    model_key: str
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    def pil_images(self) -> list[Image.Image]:
        return to_pil(self.images)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


class DiffusionEngine:
    """A batch of prompts rendered to completion through an :class:`EngineCore` (library and benchmark use; the
    render worker feeds a long-lived core through ``EngineLoop`` instead). Not thread-safe."""

    def __init__(self, components: ModelComponents) -> None:
        self.c = components

    @property
    def scheduler_family(self) -> str:
        return self.c.scheduler_family

    def model_key(self, height: int | None = None, width: int | None = None) -> str:
        return self.c.model_key(height, width)

    def generate(
        self,
        prompts: list[str],
        *,
        seeds: list[int],
        negative_prompts: list[str] | None = None,
        steps: int = 50,
        guidance: float | None = None,
        height: int | None = None,
        width: int | None = None,
        start: CapturedState | Sequence[CapturedState] | None = None,
        capture: Iterable[int] | None = None,
        callback: ProgressCallback | None = None,
    ) -> GenerationOutput:
        """Generate one image per prompt, optionally resuming from cached states and capturing new ones.

        Args:
            prompts: batch of prompts (non-empty strings), rendered as one batch.
            seeds: one seed per prompt (initial noise; ignored when resuming, the state *is* the noise).
            negative_prompts: per prompt; "" means unconditional.
            steps: N, total steps of the schedule (1..1000).
            guidance: classifier-free guidance scale (>= 0; CFG runs when > 1). Model default if None.
            height, width: pixels; multiples of ``components.size_multiple``.
            start: a state for the whole batch or one per prompt; all must resume at the same index.
            capture: steps k (1..N-1) whose latents to return; default ``default_capture_steps(N)``. Only
                k > K are produced when resuming at K.
            callback: called as ``callback(i, n)`` after each step; raise ``GenerationCancelled`` to stop.

        Raises:
            ValueError: bad input, naming the field and its limit.
            GenerationCancelled: re-raised from the callback.
        """
        t0 = time.perf_counter()
        n = len(prompts)
        if not prompts:
            raise ValueError("prompts: at least one prompt is required")
        negative = negative_prompts if negative_prompts is not None else [""] * n
        if len(negative) != n:
            raise ValueError(f"negative_prompt: expected {n} entries, got {len(negative)}")
        if len(seeds) != n:
            raise ValueError(f"seeds: expected {n} seeds, got {len(seeds)}")
        states: list[CapturedState | None] = [None] * n
        if start is not None:
            states = [start] * n if isinstance(start, CapturedState) else list(start)
            if len(states) != n:
                raise ValueError(f"start: expected 1 or {n} states, got {len(states)}")
        caps = tuple(default_capture_steps(steps) if capture is None else capture)
        core = EngineCore(self.c, max_batch=n)
        reqs = []
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt[{i}]: must be a non-empty string")
            reqs.append(
                RenderRequest(
                    prompt=p,
                    seed=int(seeds[i]),
                    negative_prompt=negative[i],
                    steps=steps,
                    guidance=guidance,
                    height=height,
                    width=width,
                    start=states[i],
                    capture=caps,
                    callback=callback if i == 0 else None,
                )
            )
        results = core.run(reqs)
        for r in results:
            if r.error is not None:
                raise r.error
        begins = {r.start_step for r in results}
        if len(begins) != 1:
            raise ValueError(f"start: all states must resume at the same step, got {sorted(begins)}")
        images = torch.stack([r.image for r in results if r.image is not None])
        timings = {k: max(r.timings.get(k, 0.0) for r in results) for k in ("encode", "denoise", "decode")}
        return GenerationOutput(
            images=images,
            states=[r.states for r in results],
            start_step=results[0].start_step,
            steps_run=results[0].steps_run,
            num_steps=steps,
            model_key=results[0].model_key,
            seconds=time.perf_counter() - t0,
            timings=timings,
        )
