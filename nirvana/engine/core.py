"""The engine core: one loop that denoises every active request together, step by step.

Each request is a *row* with its own schedule (steps), step index, scheduler instance, guidance, capture list,
cancel flag and progress. One iteration of :meth:`EngineCore.step`:

1. admits waiting requests while fewer than ``max_batch`` rows are active — a miss joins at step 0 from its
   seeded noise, a cache hit at its own K from the stored latent; a ``solo`` request only into an empty batch,
   and nothing after it until it is done;
2. picks one group of rows that share a latent shape (the group stepped least recently; a render process serves
   one model, so shape = size) and runs **one** batched denoiser forward over them, with an unconditional twin
   only for rows whose guidance asks for one;
3. steps each row's own scheduler (diffusers schedulers keep a step index and, for DPM-Solver++, a history of
   model outputs: one instance per row keeps rows independent), captures the latents the row asked for and
   calls its progress callback (raising ``GenerationCancelled`` there drops that row only);
4. decodes the rows that ran their last timestep and hands them back; the others continue.

Invariants:
    * A row's result does not depend on which other rows shared its batches: the denoiser is row-independent,
      initial noise comes from one CPU generator per request, and the scheduler state is per row. Batched and
      solo renders agree to float rounding (tested ≤ 1e-4 on CPU fp32).
    * The loop runs over ``len(timesteps)``, not ``steps``: a scheduler whose schedule has another length
      (PNDM: N + 1) is refused at load time rather than silently cut short.
    * Not thread-safe: one thread owns a core (``EngineLoop`` in ``nirvana/engine/loop.py`` for the service).
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from nirvana.engine.state import CapturedState
from nirvana.engine.text import Conditioning

if TYPE_CHECKING:
    from nirvana.engine.loader import ModelComponents

MAX_STEPS = 1000
ProgressCallback = Callable[[int, int], None]


class GenerationCancelled(Exception):
    """Raised by a progress callback to stop a run between denoising steps."""


class StateRejected(ValueError):
    """A request's start state cannot be resumed here (another model_key, shape or step count, non-finite
    values). The request itself is fine: a caller may rerun it from noise."""


def resume_index(state: CapturedState, timesteps: Sequence[float], num_steps: int) -> int:
    """Index into a ``num_steps`` schedule at which ``state`` resumes: the step it was captured at.

    A state resumes only a schedule of its own step count. The cache never offers another (its lookup takes
    only states of the request's ``num_steps``), so a rule for other step counts would serve no request.

    Raises:
        StateRejected: the state comes from a schedule of another step count, or its step is not inside this one.
    """
    if state.num_steps != num_steps:
        raise StateRejected(
            f"start: the state was captured in a {state.num_steps}-step schedule, the request has steps={num_steps} "
            "(a state resumes only a schedule of its own step count)"
        )
    idx = state.step
    if not 0 < idx < len(timesteps):
        raise StateRejected(f"start: resume step K={idx} must satisfy 0 < K < steps={num_steps}")
    return idx


@dataclass
class RenderRequest:
    """One image to render: what a row of the core is made from.

    Attributes:
        prompt, negative_prompt: text ("" negative = unconditional).
        seed: initial noise (ignored when resuming: the state *is* the noise).
        steps: N, total steps of the schedule (1..1000).
        guidance: classifier-free guidance scale (>= 0); the model's default when None.
        height, width: pixels; the model's default when None.
        start: a cached state to resume from (a hit), or None (a miss from noise).
        capture: steps k whose latents to return; only k > K are produced when resuming at K.
        callback: ``callback(i, n)`` after each step (i = steps done); raise ``GenerationCancelled`` to stop.
        tag: caller's identifier (job id), carried to the result.
        solo: run in a batch of its own — no other row is admitted while it runs, and it waits for the rows
            before it to finish. The service renders a job alone after a worker died under it, so a request
            that kills its process takes only itself down on the next attempt.
    """

    prompt: str
    seed: int = 0
    negative_prompt: str = ""
    steps: int = 50
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    start: CapturedState | None = None
    capture: Iterable[int] = ()
    callback: ProgressCallback | None = None
    tag: str = ""
    solo: bool = False


@dataclass
class RowResult:
    """A finished row.

    Attributes:
        image: (3, H, W) float in [-1, 1] on CPU; None when the row was cancelled or failed.
        states: captured states in ascending step order (only steps actually run: k > K).
        start_step: K the row resumed at (0 for a miss); steps_run = len(timesteps) − K.
        seconds: wall time from admission to decoded image; ``timings`` splits it (encode, denoise incl.
            waiting for the batch, decode) and ``batch_rows`` is the mean number of rows its forwards carried.
        error: ``GenerationCancelled`` or the exception that failed its batch.
    """

    request: RenderRequest
    image: torch.Tensor | None
    states: list[CapturedState]
    start_step: int
    steps_run: int
    num_steps: int
    model_key: str
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    batch_rows: float = 1.0
    error: BaseException | None = None


@dataclass
class _Row:
    req: RenderRequest
    key: str
    shape: tuple[int, ...]
    scheduler: Any
    timesteps: list[float]
    t_tensor: torch.Tensor
    index: int
    begin: int
    latents: torch.Tensor
    guidance: float
    cfg: bool
    capture: set[int]
    t_admit: float
    cond: Conditioning | None = None
    uncond: Conditioning | None = None
    states: list[CapturedState] = field(default_factory=list)
    t_encoded: float = 0.0
    forwards: int = 0
    rows_seen: int = 0

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)


class EngineCore:
    """Owns a loaded model and a set of active rows; see the module docstring for one iteration.

    Args:
        components: the loaded model.
        max_batch: most rows active at once (requests beyond wait, first come first served).
    """

    def __init__(self, components: ModelComponents, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.c = components
        self.max_batch = max_batch
        self.waiting: deque[RenderRequest] = deque()
        self.active: list[_Row] = []
        self._templates: dict[tuple[int, int, int], Any] = {}
        self._last_run: dict[tuple[int, ...], int] = {}
        self._iteration = 0

    # -- admission --------------------------------------------------------------------------------------------
    def validate(self, req: RenderRequest) -> None:
        """Raise ``ValueError`` naming the field and its limit if ``req`` can never run on this model."""
        if not isinstance(req.prompt, str) or not req.prompt.strip():
            raise ValueError("prompt: must be a non-empty string")
        if not isinstance(req.negative_prompt, str):
            raise ValueError("negative_prompt: must be a string")
        steps = req.steps
        if not isinstance(steps, int) or steps <= 0 or steps > MAX_STEPS:
            raise ValueError(f"steps: must be an integer in 1..{MAX_STEPS}, got {steps!r}")
        g = self.c.default_guidance if req.guidance is None else req.guidance
        if not isinstance(g, (int, float)) or math.isnan(g) or g < 0:
            raise ValueError(f"guidance: must be a number >= 0, got {g!r}")
        m = self.c.size_multiple
        for name, v in (("height", req.height), ("width", req.width)):
            if v is not None and (not isinstance(v, int) or v <= 0 or v % m or v > 4096):
                raise ValueError(f"{name}: must be a positive multiple of {m} and <= 4096 for this model, got {v!r}")
        bad = [k for k in req.capture if not isinstance(k, int) or not 0 < k < steps]
        if bad:
            raise ValueError(f"capture: steps must be integers in 1..{steps - 1}, got {sorted(bad)}")

    def submit(self, req: RenderRequest) -> None:
        """Queue ``req``; it joins the batch at the next iteration with a free row. Raises ``ValueError`` now
        for input that can never run."""
        self.validate(req)
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.active)

    def _schedule(self, steps: int, height: int, width: int) -> Any:
        """A scheduler with ``set_timesteps(steps)`` done, to be copied per row (one template per schedule)."""
        key = (steps, height, width)
        tpl = self._templates.get(key)
        if tpl is None:
            tpl = copy.deepcopy(self.c.scheduler)
            tpl.set_timesteps(steps, device=self.c.device, **self.c.denoiser.timestep_kwargs(height, width, steps))
            ts = tpl.timesteps
            n_train = int(tpl.config.num_train_timesteps)
            if ts.numel() and self.c.denoiser.family == "unet" and float(ts.max()) >= n_train:
                # SD-style configs (steps_offset=1, "leading" spacing) put the first of N=num_train_timesteps
                # steps at t=N, past the end of the noise table: diffusers then fails deep inside step().
                usable = int((ts < n_train).sum())
                raise ValueError(
                    f"steps: {steps} is more than this scheduler supports ({type(tpl).__name__} with "
                    f"steps_offset={tpl.config.get('steps_offset', 0)} and {n_train} training timesteps: "
                    f"at most {usable})"
                )
            if len(self._templates) > 64:  # many distinct (steps, size): keep the cache bounded
                self._templates.clear()
            self._templates[key] = tpl
        return copy.deepcopy(tpl)

    def _check_state(self, state: CapturedState, key: str, shape: tuple[int, ...]) -> None:
        if state.model_key != key:
            raise StateRejected(f"start: state belongs to model_key {state.model_key!r}, this run is {key!r}")
        if tuple(state.latent.shape) != shape:
            raise StateRejected(f"start: state latent shape {tuple(state.latent.shape)} != expected {shape}")
        if not torch.isfinite(state.latent).all():
            raise StateRejected("start: state latent contains NaN or Inf")

    def _make_row(self, req: RenderRequest) -> _Row:
        h = req.height or self.c.sample_size[0]
        w = req.width or self.c.sample_size[1]
        g = float(self.c.default_guidance if req.guidance is None else req.guidance)
        key = self.c.model_key(h, w)
        f = self.c.space.factor
        shape = (self.c.space.channels, h // f, w // f)
        sched = self._schedule(req.steps, h, w)
        timesteps = [float(t) for t in sched.timesteps.cpu()]
        begin = 0
        if req.start is not None:
            self._check_state(req.start, key, shape)
            begin = resume_index(req.start, timesteps, req.steps)
            latents = req.start.latent.unsqueeze(0).to(self.c.device, torch.float32)
        else:
            # One CPU generator per request: a seed gives the same image on every device and in any batch.
            noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(req.seed)))
            # Flow matching starts from unit-variance noise as is: FlowMatchEuler has no init_noise_sigma.
            latents = noise.unsqueeze(0).to(self.c.device) * getattr(sched, "init_noise_sigma", 1.0)
        if hasattr(sched, "set_begin_index"):
            # Euler / flow-matching index their sigmas by step: a resumed row starts at K. The latent is never
            # re-multiplied by init_noise_sigma (wrong mid-trajectory).
            sched.set_begin_index(begin)
        return _Row(
            req=req,
            key=key,
            shape=shape,
            scheduler=sched,
            timesteps=timesteps,
            t_tensor=sched.timesteps,
            index=begin,
            begin=begin,
            latents=latents,
            guidance=g,
            cfg=self.c.denoiser.uses_cfg(g),
            capture={k for k in req.capture if k > begin},
            t_admit=time.perf_counter(),
        )

    def _admit(self) -> list[RowResult]:
        """Move waiting requests into the batch while rows are free; encode their prompts in one call."""
        new: list[_Row] = []
        failed: list[RowResult] = []
        while self.waiting and len(self.active) + len(new) < self.max_batch:
            batch = [*self.active, *new]
            if any(r.req.solo for r in batch) or (self.waiting[0].solo and batch):
                break  # a solo request runs alone; first come first served, so the rest wait behind it
            req = self.waiting.popleft()
            try:
                new.append(self._make_row(req))
            except ValueError as e:
                failed.append(self._result(None, req=req, error=e))
        if new:
            texts = [r.req.prompt for r in new] + [r.req.negative_prompt for r in new if r.cfg]
            enc = self.c.encoder.encode(texts)
            neg = len(new)
            for i, r in enumerate(new):
                h, w = r.shape[1] * self.c.space.factor, r.shape[2] * self.c.space.factor
                r.cond = self.c.denoiser.prepare(enc.rows(i, i + 1), h, w).to(self.c.device, self.c.dtype)
                if r.cfg:
                    r.uncond = self.c.denoiser.prepare(enc.rows(neg, neg + 1), h, w).to(self.c.device, self.c.dtype)
                    neg += 1
                r.t_encoded = time.perf_counter()
            self.active.extend(new)
        return failed

    # -- one iteration ----------------------------------------------------------------------------------------
    def _pick_group(self) -> list[_Row]:
        groups: dict[tuple[int, ...], list[_Row]] = {}
        for r in self.active:
            groups.setdefault(r.shape, []).append(r)
        shape = min(groups, key=lambda s: self._last_run.get(s, -1))
        self._last_run[shape] = self._iteration
        return groups[shape]

    def _forward(self, rows: list[_Row]) -> torch.Tensor:
        """One batched forward over ``rows``: [unconditional twins of CFG rows] + [every row]; returns the
        guided model output per row (float32)."""
        scaled = []
        for r in rows:
            t = r.t_tensor[r.index]
            x = r.latents
            if hasattr(r.scheduler, "scale_model_input"):
                x = r.scheduler.scale_model_input(x, t)
            scaled.append(x)
        twins = [i for i, r in enumerate(rows) if r.cfg]
        order = twins + list(range(len(rows)))
        model_in = torch.cat([scaled[i] for i in order]).to(self.c.dtype)
        ts = torch.tensor([rows[i].timesteps[rows[i].index] for i in order], device=self.c.device)
        conds = [rows[i].uncond for i in twins] + [r.cond for r in rows]
        cond = Conditioning.cat([c for c in conds if c is not None])
        gs = torch.tensor([rows[i].guidance for i in order], device=self.c.device)
        pred = self.c.denoiser.predict(model_in, ts, cond, gs)
        n_twins = len(twins)
        out = pred[n_twins:].clone()
        for j, i in enumerate(twins):
            uncond, text = pred[j], pred[n_twins + i]
            out[i] = uncond + rows[i].guidance * (text - uncond)
        return out

    @torch.no_grad()
    def step(self) -> list[RowResult]:
        """Admit, run one iteration for one group of rows, return the rows that finished (or failed)."""
        finished = self._admit()
        if not self.active:
            return finished
        self._iteration += 1
        rows = self._pick_group()
        try:
            pred = self._forward(rows)
        except Exception as e:  # the whole batch failed (e.g. out of memory): each row reports it
            for r in rows:
                self.active.remove(r)
                finished.append(self._result(r, error=e))
            return finished
        n_rows = len(rows)
        for b, r in enumerate(rows):
            t = r.t_tensor[r.index]
            r.latents = r.scheduler.step(pred[b : b + 1], t, r.latents).prev_sample
            r.index += 1
            r.forwards += 1
            r.rows_seen += n_rows
            if r.index in r.capture and not r.done:
                r.states.append(self._capture(r))
            if r.req.callback is not None:
                try:
                    r.req.callback(r.index, len(r.timesteps))
                except GenerationCancelled as e:
                    self.active.remove(r)
                    finished.append(self._result(r, error=e))
        done = [r for r in rows if r.done and r in self.active]
        if done:
            finished.extend(self._decode(done))
        return finished

    def _capture(self, r: _Row) -> CapturedState:
        sigmas = getattr(r.scheduler, "sigmas", None)
        i = r.index
        return CapturedState(
            latent=r.latents[0].detach().float().cpu().clone(),
            step=i,
            num_steps=r.req.steps,
            timestep=r.timesteps[i],
            scheduler_family=self.c.scheduler_family,
            model_key=r.key,
            sigma=float(sigmas[i]) if sigmas is not None and len(sigmas) > i else None,
        )

    def _decode(self, rows: list[_Row]) -> list[RowResult]:
        t0 = time.perf_counter()
        for r in rows:
            self.active.remove(r)
        try:
            images = self.c.space.decode(torch.cat([r.latents for r in rows]).to(self.c.dtype)).float().cpu()
        except Exception as e:
            return [self._result(r, error=e) for r in rows]
        t1 = time.perf_counter()
        return [self._result(r, image=images[i], decode_s=t1 - t0) for i, r in enumerate(rows)]

    def _result(
        self,
        row: _Row | None,
        *,
        req: RenderRequest | None = None,
        image: torch.Tensor | None = None,
        error: BaseException | None = None,
        decode_s: float = 0.0,
    ) -> RowResult:
        now = time.perf_counter()
        if row is None:
            assert req is not None
            return RowResult(req, None, [], 0, 0, req.steps, "", 0.0, error=error)
        return RowResult(
            request=row.req,
            image=image,
            states=row.states,
            start_step=row.begin,
            steps_run=len(row.timesteps) - row.begin,
            num_steps=row.req.steps,
            model_key=row.key,
            seconds=now - row.t_admit,
            timings={
                "encode": row.t_encoded - row.t_admit,
                "denoise": now - decode_s - row.t_encoded,
                "decode": decode_s,
            },
            batch_rows=row.rows_seen / max(row.forwards, 1),
            error=error,
        )

    # -- convenience ------------------------------------------------------------------------------------------
    def run(self, requests: Sequence[RenderRequest]) -> list[RowResult]:
        """Render ``requests`` to completion (in at most ``max_batch``-row batches); results in request order."""
        for req in requests:
            self.submit(req)
        out: dict[int, RowResult] = {}
        while self.has_work:
            for res in self.step():
                out[id(res.request)] = res
        return [out[id(r)] for r in requests]
