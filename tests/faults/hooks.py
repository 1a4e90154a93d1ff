"""Fault-injection hooks for the reliability suite (``tests/faults``, docs/RELIABILITY.md). TEST-ONLY.

This module is not part of the installed package: only the test entry point ``python -m
tests.faults.render_worker`` loads it (the fault suite's stack runs its render workers with it); the production
worker (``python -m workers.render``) never imports it, so no prompt text can trigger anything in production.
Behaviour is selected per job by markers in the prompt text, so one deployment can serve faulty and healthy jobs
side by side:

* ``[fault:crash@step]`` — the worker kills itself with SIGKILL (as ``kill -9``) at the first denoising step of
  every attempt: a poison job, which must end ``failed`` after ``max_attempts`` renders.
* ``[fault:crash-once@step]`` — the same, on the job's first attempt only.
* ``[fault:crash-once@image]`` — SIGKILL on the first attempt after the job's image object was written and before
  the job row is finished (the window where a redelivery renders again: one visible result, one cache record).
* ``[fake-engine]`` — the job is rendered by :class:`FakeEngine` (a seeded noise image, no model call, no cached
  states) instead of the loaded model: the load test measures the service, not the model.

Other settings (environment): ``NIRVANA_FAULT_STATE_DIR`` (where "crash once" remembers which jobs already
crashed; default ``<tmp>/nirvana-faults``), ``NIRVANA_FAULT_LEDGER`` (a file: one line per engine run and per
injected crash, ``point<TAB>job_id<TAB>attempt<TAB>pid``, appended atomically, so a test can count how often each
job was rendered), ``NIRVANA_FAULT_FAKE_STEP_S`` (seconds per fake denoising step, default 0).
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_DIR_ENV = "NIRVANA_FAULT_STATE_DIR"
LEDGER_ENV = "NIRVANA_FAULT_LEDGER"
FAKE_STEP_ENV = "NIRVANA_FAULT_FAKE_STEP_S"

FAKE_ENGINE_MARKER = "[fake-engine]"
_CRASH = re.compile(r"\[fault:crash(-once)?@(step|image)\]")
# Renderer hook points: "step" (after each denoising step), "rendered" (the engine returned), "stored" (the image
# object is written; the job row is not finished yet), "recorded" (the job is done and the cache record made).
_POINT_OF = {"step": "step", "image": "stored"}


def crash_marker(point: str = "step", once: bool = False) -> str:
    """The prompt marker that crashes a render worker at ``point`` (``step`` or ``image``)."""
    if point not in _POINT_OF:
        raise ValueError(f"point must be one of {sorted(_POINT_OF)}, got {point!r}")
    return f"[fault:crash{'-once' if once else ''}@{point}]"


@dataclass
class FaultHooks:
    """Called by ``Renderer.render`` as ``hooks(point, job_row)``; see the module docstring."""

    state_dir: Path
    ledger: Path | None = None
    fake_step_s: float = 0.0

    def _log(self, point: str, job: dict[str, Any]) -> None:
        if self.ledger is None:
            return
        line = f"{point}\t{job['id']}\t{job.get('attempts')}\t{os.getpid()}\n".encode()
        fd = os.open(self.ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write < PIPE_BUF with O_APPEND: lines from several workers never interleave
        finally:
            os.close(fd)

    def __call__(self, point: str, job: dict[str, Any]) -> None:
        if point == "rendered":
            self._log("rendered", job)
        m = _CRASH.search(str(job.get("prompt", "")))
        if m is None or _POINT_OF[m.group(2)] != point:
            return
        if m.group(1):  # crash once per job
            self.state_dir.mkdir(parents=True, exist_ok=True)
            flag = self.state_dir / f"{job['id']}.crashed"
            try:
                flag.open("x").close()
            except FileExistsError:
                return
        self._log("crash", job)
        os.kill(os.getpid(), signal.SIGKILL)

    def wrap_engine(self, engine: Any) -> Any:
        """The engine the worker uses: ``[fake-engine]`` prompts go to :class:`FakeEngine`, others to
        ``engine``."""
        return FakeEngine(engine, self.fake_step_s)


def from_env(env: dict[str, str] | None = None) -> FaultHooks:
    """The hooks, configured by the environment (state dir, ledger, fake step time)."""
    env = dict(os.environ if env is None else env)
    state = Path(env.get(STATE_DIR_ENV) or Path(tempfile.gettempdir()) / "nirvana-faults")
    ledger = env.get(LEDGER_ENV)
    return FaultHooks(state, Path(ledger) if ledger else None, float(env.get(FAKE_STEP_ENV) or 0.0))


class FakeEngine:
    """TEST-ONLY stand-in for ``EngineLoop.run`` on prompts carrying ``[fake-engine]``: a seeded noise
    image of the requested size, no captured states, the callback called once per step. Other prompts are
    rendered by the wrapped engine."""

    def __init__(self, engine: Any, step_s: float = 0.0) -> None:
        self.engine = engine
        self.step_s = step_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def run(self, req: Any) -> Any:
        if FAKE_ENGINE_MARKER not in req.prompt:
            return self.engine.run(req)
        import torch

        from nirvana.engine.core import GenerationCancelled, RowResult

        t0 = time.perf_counter()
        begin = 0 if req.start is None else int(req.start.step)
        for i in range(begin + 1, req.steps + 1):
            if self.step_s:
                time.sleep(self.step_s)
            if req.callback is not None:
                try:
                    req.callback(i, req.steps)
                except GenerationCancelled as e:
                    return RowResult(req, None, [], begin, req.steps - begin, req.steps, "", 0.0, error=e)
        h, w = int(req.height or 32), int(req.width or 32)
        g = torch.Generator().manual_seed(int(req.seed))
        image = torch.rand(3, h, w, generator=g) * 2 - 1
        key = str(self.engine.core.c.model_key(h, w)) if hasattr(self.engine, "core") else ""
        return RowResult(req, image, [], begin, req.steps - begin, req.steps, key, time.perf_counter() - t0)
