"""The renderer: runs a planned job on the process's engine loop (resuming a cached state when the plan has
one), writes the image, finishes the job, then records the cache best-effort (see :class:`Renderer`)."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nirvana.cache.core import ApproximateCache, LookupResult
from nirvana.config import Settings
from nirvana.pipeline.plan import RenderPlan
from nirvana.service.jobs import JobStore
from nirvana.service.liveness import worker_name
from nirvana.service.models import ServedModel
from nirvana.service.service import TaskSender, image_key

if TYPE_CHECKING:
    from nirvana.engine.core import RenderRequest, RowResult
    from nirvana.engine.state import CapturedState

log = logging.getLogger(__name__)


def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class _Progress:
    step: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)


class Renderer:
    """Renders jobs of one served model through the process's engine loop (``EngineLoop``: one thread owns the
    model and batches every job in flight; ``engine`` is anything with its ``run(RenderRequest) -> RowResult``).
    """

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        cache: ApproximateCache,
        engine: Any,
        model: ServedModel,
        sender: TaskSender,
        name: str | None = None,
        fault_hook: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.cache = cache
        self.engine = engine
        self.model = model
        self.sender = sender
        self.name = name or worker_name("render")
        # Test-only fault injection (tests/faults/hooks.py, passed only by the fault suite's worker entry point):
        # called as fault_hook(point, job) at "step", "rendered", "stored" and "recorded".
        self.fault_hook = fault_hook
        self.record_retry_delays_s: tuple[float, ...] = (0.2, 1.0, 3.0)  # a transient record error gets retries

    def _heartbeat(self, job_id: str, attempts: int, prog: _Progress) -> None:
        while not prog.stop.wait(self.settings.progress_interval_s):
            try:
                if self.store.heartbeat(job_id, attempts, prog.step):
                    prog.cancelled.set()
            except Exception as e:  # a DB blip must not kill the render; the reaper has the final word
                log.warning("heartbeat of %s failed: %s", job_id, e)

    def _load_start(self, job_id: str, hit: LookupResult) -> tuple[CapturedState | None, str | None]:
        """The planned source state, or (None, reason) when it cannot be used: never an exception (a cache
        that fails to load a state costs the job its shortcut, not its image)."""
        try:
            state = self.cache.load_state(hit)
        except Exception as e:
            log.warning("job %s: loading state %s failed (%s: %s): rendering from noise", job_id, hit.state_id,
                        type(e).__name__, e)  # fmt: skip
            return None, "error"
        return (state, None) if state is not None else (None, "missing")

    def _try_record(self, plan: RenderPlan, res: RowResult, png: bytes, hit: LookupResult | None) -> str | None:
        """One cache record attempt; the error text, or None when recorded. Never raises."""
        try:
            self.cache.record(plan.job_id, plan.request, res.states, png, hit, attempt=plan.attempts)
            return None
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    def _record_retries(
        self, plan: RenderPlan, res: RowResult, png: bytes, hit: LookupResult | None, error: str
    ) -> None:
        """After the job is done: retry a failed record on its own (never re-rendering), then give up and note
        it (``cache_record_error``, /metrics). A check that failed (ValueError) fails every time: no retry."""
        for delay in () if error.startswith("ValueError") else self.record_retry_delays_s:
            log.warning("job %s: cache record failed (%s), retrying in %.1f s", plan.job_id, error, delay)
            time.sleep(delay)
            again = self._try_record(plan, res, png, hit)
            if again is None:
                return
            error = again
        log.error("job %s: not recorded in the cache (%s); the job stays done", plan.job_id, error)
        try:
            self.store.record_failed(plan.job_id, error)
        except Exception as e:  # the count is best-effort too
            log.warning("job %s: could not note the record failure: %s", plan.job_id, e)

    def render(self, job_id: str, attempt: int) -> str:
        """Render one job for the message of ``attempt``; returns ``done``, ``cancelled``, ``failed``,
        ``retry`` or ``skipped``. Thread-safe: with a batching engine loop several render at once.

        Order: claim → source state (any failure to load or resume it: render from noise, ``cache_fallback``)
        → render → image object → one cache record attempt (errors caught) → job ``done`` (the row makes the
        image visible) → if the record failed, its retries (never a re-render). A cache fault never fails or
        re-renders a job; in the normal case a job is in the cache by the time it is done.
        """
        from nirvana.engine.core import GenerationCancelled, StateRejected
        from nirvana.engine.engine import to_pil

        plan = self.store.claim_render(job_id, attempt, self.name, self.settings.cache_shared_pool)
        if plan is None:
            return "skipped"
        attempts = plan.attempts
        hit = plan.lookup()
        start: CapturedState | None = None
        if hit is not None and plan.tier == "approximate":
            start, reason = self._load_start(job_id, hit)
            if start is None:
                self.store.downgrade_to_miss(job_id, attempts, reason or "missing")
                plan, hit = plan.as_miss(), None
        caps = plan.plan.capture_steps
        if plan.cache_mode == "off":
            caps = ()
        elif caps is None:  # routed before the plan carried its capture steps
            caps = tuple(self.cache.policy.cached_steps(plan.request.steps))
        prog = _Progress()
        beat = threading.Thread(target=self._heartbeat, args=(job_id, attempts, prog), daemon=True)
        beat.start()
        hook = self.fault_hook
        info = {"id": job_id, "prompt": plan.request.prompt, "attempts": attempts}

        def callback(i: int, n: int) -> None:
            prog.step = i
            if hook is not None:
                hook("step", info)
            if prog.cancelled.is_set():
                raise GenerationCancelled(job_id)

        try:
            res = self.engine.run(self._request(plan, start, caps, callback))
            if isinstance(res.error, StateRejected):
                log.warning("job %s: the engine refused state %s (%s): rendering from noise", job_id,
                            hit.state_id if hit else None, res.error)  # fmt: skip
                self.store.downgrade_to_miss(job_id, attempts, "rejected")
                plan, hit = plan.as_miss(), None
                res = self.engine.run(self._request(plan, None, caps, callback))
            if res.error is not None:
                raise res.error
            assert res.image is not None
            if hook is not None:
                hook("rendered", info)
            png = png_bytes(to_pil(res.image.unsqueeze(0))[0])
            ref = self.cache.store.put_bytes(image_key(plan.tenant, job_id, attempts), png, "png")
            if hook is not None:
                hook("stored", info)
            # One record attempt before the row: a user who refines a prompt as soon as the last one is done
            # must find it in the cache. It cannot fail the job; a failure is retried after the row.
            record_error = None if plan.cache_mode == "off" else self._try_record(plan, res, png, hit)
            if hook is not None:
                hook("recorded", info)
            ok = self.store.finish(job_id, attempts, ref.uri, len(png), res.start_step, res.steps_run, res.seconds)
        except GenerationCancelled:
            self.store.mark_cancelled(job_id, attempts)
            return "cancelled"
        except ValueError as e:  # a request the engine rejects will never succeed
            log.warning("job %s failed: %s", job_id, e)
            self.store.fail(job_id, f"invalid request: {e}", attempts)
            return "failed"
        except Exception as e:
            log.exception("job %s attempt %d failed", job_id, attempts)
            if attempts >= self.settings.max_attempts:
                self.store.fail(job_id, f"{type(e).__name__}: {e}", attempts)
                return "failed"
            if self.store.release_for_retry(job_id, attempts):
                self.sender.send_render(job_id, plan.render_queue, attempts)
            return "retry"
        finally:
            prog.stop.set()
            beat.join(timeout=5)
        if not ok:
            return "skipped"  # another attempt owns the job now
        if record_error is not None:
            self._record_retries(plan, res, png, hit, record_error)
        return "done"

    @staticmethod
    def _request(plan: RenderPlan, start: CapturedState | None, caps: Any, callback: Any) -> RenderRequest:
        from nirvana.engine.core import RenderRequest

        r = plan.request
        return RenderRequest(
            prompt=r.prompt,
            seed=r.seed,
            negative_prompt=r.negative_prompt,
            steps=r.steps,
            guidance=r.guidance,
            height=r.height,
            width=r.width,
            start=start,
            capture=caps,
            callback=callback,
            tag=plan.job_id,
            # A rerun renders alone: if a job in its last batch killed the worker, it now takes only itself down
            # (and a job that does so every time fails after max_attempts without failing its batch mates).
            solo=plan.attempts > 1,
        )
