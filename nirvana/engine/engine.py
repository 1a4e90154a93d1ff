"""The diffusion engine: an explicit denoising loop that captures intermediate latents and resumes from them.

Resume rules (see docs/ENGINE.md for the derivations and measured tolerances):
    * A state captured after ``k`` of ``N`` steps holds the latent *before* ``timesteps[k]`` runs. Resuming it in
      an ``N``-step run starts the loop at index ``k``; the latent is used as is — never re-multiplied by
      ``init_noise_sigma`` (stock pipelines do that, which is wrong for a mid-trajectory Euler latent).
    * DDIM and Euler resume exactly (stateless steps; Euler's step index is set with ``set_begin_index``).
    * DPM-Solver++ is multistep: its history of model outputs is not in the state, so it restarts at first order
      at the resume point. Measured deviation is documented and tested.
    * A state from an ``N``-step run serving an ``M``-step request resumes at the first index ``j`` of the
      ``M``-step schedule whose timestep is ≤ the captured timestep (the nearest at or below it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from nirvana.engine.latents import coordinate_channels
from nirvana.engine.loader import ModelComponents
from nirvana.engine.state import CapturedState, make_model_key
from nirvana.engine.text import Conditioning

MAX_STEPS = 1000
PAPER_CAPTURE_STEPS = (5, 10, 15, 20, 25)
PAPER_N = 50


class GenerationCancelled(Exception):
    """Raised by a progress callback to stop a run between denoising steps."""


ProgressCallback = Callable[[int, int], None]


def default_capture_steps(num_steps: int) -> list[int]:
    """The paper's K ∈ {5,10,15,20,25} of 50, scaled to ``num_steps`` (deduplicated, each in 1..N-1)."""
    scaled = {round(k * num_steps / PAPER_N) for k in PAPER_CAPTURE_STEPS}
    return sorted(k for k in scaled if 0 < k < num_steps)


def resume_index(state: CapturedState, timesteps: Sequence[float], num_steps: int) -> int:
    """Index into an ``num_steps`` schedule at which ``state`` resumes.

    Same step count: the captured step. Otherwise the first index whose timestep is ≤ the captured timestep
    (timesteps descend), i.e. the nearest timestep at or below it: the resumed run never treats a latent as
    *less* noisy than the schedule point it is fed to by more than one step.

    Raises:
        ValueError: no timestep of the schedule lies at or below the captured one, or the index is the end.
    """
    if state.num_steps == num_steps:
        idx = state.step
    else:
        below = [i for i, t in enumerate(timesteps) if float(t) <= state.timestep + 1e-6]
        if not below:
            raise ValueError(
                f"start: no timestep of the {num_steps}-step schedule is at or below the captured timestep "
                f"{state.timestep}"
            )
        idx = below[0]
    if not 0 < idx < num_steps:
        raise ValueError(f"start: resume step K={idx} must satisfy 0 < K < steps={num_steps}")
    return idx


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
    """Runs a loaded model's denoising loop with capture and resume. Not thread-safe (one scheduler instance)."""

    def __init__(self, components: ModelComponents) -> None:
        self.c = components

    @property
    def scheduler_family(self) -> str:
        return self.c.scheduler_family

    def model_key(self, height: int | None = None, width: int | None = None) -> str:
        h, w = height or self.c.sample_size[0], width or self.c.sample_size[1]
        return make_model_key(self.c.checkpoint_id, h, w, self.scheduler_family)

    # -- validation -------------------------------------------------------------------------------------------
    def _validate(
        self,
        prompts: list[str],
        negative: list[str],
        seeds: list[int],
        steps: int,
        guidance: float,
        height: int,
        width: int,
    ) -> None:
        if not prompts:
            raise ValueError("prompts: at least one prompt is required")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt[{i}]: must be a non-empty string")
        if len(negative) != len(prompts):
            raise ValueError(f"negative_prompt: expected {len(prompts)} entries, got {len(negative)}")
        if len(seeds) != len(prompts):
            raise ValueError(f"seeds: expected {len(prompts)} seeds, got {len(seeds)}")
        if not isinstance(steps, int) or steps <= 0 or steps > MAX_STEPS:
            raise ValueError(f"steps: must be an integer in 1..{MAX_STEPS}, got {steps!r}")
        if not isinstance(guidance, (int, float)) or math.isnan(guidance) or guidance < 0:
            raise ValueError(f"guidance: must be a number >= 0, got {guidance!r}")
        m = self.c.size_multiple
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % m or v > 4096:
                raise ValueError(f"{name}: must be a positive multiple of {m} and <= 4096 for this model, got {v!r}")

    def _check_state(self, state: CapturedState, key: str, shape: tuple[int, ...]) -> None:
        if state.model_key != key:
            raise ValueError(f"start: state belongs to model_key {state.model_key!r}, this run is {key!r}")
        if tuple(state.latent.shape) != shape:
            raise ValueError(f"start: state latent shape {tuple(state.latent.shape)} != expected {shape}")
        if not torch.isfinite(state.latent).all():
            raise ValueError("start: state latent contains NaN or Inf")

    # -- the loop ---------------------------------------------------------------------------------------------
    def _conditioning(self, prompts: list[str], negative: list[str], cfg: bool, h: int, w: int) -> Conditioning:
        cond = self.c.encoder.encode(prompts)
        if cfg:
            cond = Conditioning.cat([self.c.encoder.encode(negative), cond])
        if self.c.sdxl:
            n = cond.hidden_states.shape[0]
            cond.added["time_ids"] = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).repeat(n, 1)
        return cond.to(self.c.device, self.c.dtype)

    def _initial_noise(self, seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
        # One CPU generator per prompt: a seed gives the same image on every device and in any batch.
        noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
        return torch.stack(noise)

    @torch.no_grad()
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
            prompts: batch of prompts (non-empty strings).
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
        t_start = time.perf_counter()
        n = len(prompts)
        negative = negative_prompts if negative_prompts is not None else [""] * n
        g = self.c.default_guidance if guidance is None else guidance
        h = height or self.c.sample_size[0]
        w = width or self.c.sample_size[1]
        self._validate(prompts, negative, seeds, steps, g, h, w)
        key = self.model_key(h, w)
        f = self.c.space.factor
        lat_shape = (self.c.space.channels, h // f, w // f)

        capture_set = set(default_capture_steps(steps) if capture is None else capture)
        bad = [k for k in capture_set if not isinstance(k, int) or not 0 < k < steps]
        if bad:
            raise ValueError(f"capture: steps must be integers in 1..{steps - 1}, got {sorted(bad)}")

        sched = self.c.scheduler
        sched.set_timesteps(steps, device=self.c.device)
        timesteps = sched.timesteps
        n_train = int(sched.config.num_train_timesteps)
        if timesteps.numel() and float(timesteps.max()) >= n_train:
            # SD-style configs (steps_offset=1, "leading" spacing) put the first of N=num_train_timesteps
            # steps at t=N, past the end of the noise table: diffusers then fails deep inside step().
            usable = int((timesteps < n_train).sum())
            raise ValueError(
                f"steps: {steps} is more than this scheduler supports ({type(sched).__name__} with "
                f"steps_offset={sched.config.get('steps_offset', 0)} and {n_train} training timesteps: "
                f"at most {usable})"
            )
        begin = 0
        if start is not None:
            states = [start] * n if isinstance(start, CapturedState) else list(start)
            if len(states) != n:
                raise ValueError(f"start: expected 1 or {n} states, got {len(states)}")
            for s in states:
                self._check_state(s, key, lat_shape)
            idxs = {resume_index(s, [float(t) for t in timesteps.cpu()], steps) for s in states}
            if len(idxs) != 1:
                raise ValueError(f"start: all states must resume at the same step, got {sorted(idxs)}")
            begin = idxs.pop()
            latents = torch.stack([s.latent for s in states]).to(self.c.device, torch.float32)
        else:
            latents = self._initial_noise(seeds, lat_shape).to(self.c.device) * sched.init_noise_sigma
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(begin)

        cfg = g > 1.0
        t_enc = time.perf_counter()
        cond = self._conditioning(prompts, negative, cfg, h, w)
        t_loop = time.perf_counter()
        captured: list[list[CapturedState]] = [[] for _ in range(n)]
        sigmas = getattr(sched, "sigmas", None)
        rows = 2 * n if cfg else n
        coords = (
            coordinate_channels(rows, *lat_shape[1:], device=self.c.device).to(self.c.dtype)
            if self.c.coord_channels
            else None
        )
        for i in range(begin, steps):
            t = timesteps[i]
            if i in capture_set and i > begin:
                sigma = float(sigmas[i]) if sigmas is not None and len(sigmas) > i else None
                for b in range(n):
                    captured[b].append(
                        CapturedState(
                            latent=latents[b].detach().float().cpu().clone(),
                            step=i,
                            num_steps=steps,
                            timestep=float(t),
                            scheduler_family=self.scheduler_family,
                            model_key=key,
                            sigma=sigma,
                        )
                    )
            model_in = torch.cat([latents, latents]) if cfg else latents
            model_in = sched.scale_model_input(model_in, t).to(self.c.dtype)
            if coords is not None:
                model_in = torch.cat([model_in, coords], dim=1)
            pred = self.c.unet(
                model_in,
                t,
                encoder_hidden_states=cond.hidden_states,
                added_cond_kwargs=cond.added or None,
            ).sample.float()
            if cfg:
                uncond, text = pred.chunk(2)
                pred = uncond + g * (text - uncond)
            latents = sched.step(pred, t, latents).prev_sample
            if callback is not None:
                callback(i + 1, steps)
        t_dec = time.perf_counter()
        images = self.c.space.decode(latents.to(self.c.dtype)).float().cpu()
        t_end = time.perf_counter()
        return GenerationOutput(
            images=images,
            states=captured,
            start_step=begin,
            steps_run=steps - begin,
            num_steps=steps,
            model_key=key,
            seconds=t_end - t_start,
            timings={"encode": t_loop - t_enc, "denoise": t_dec - t_loop, "decode": t_end - t_dec},
        )
