"""What a worker process's tasks run against: :class:`WorkerContext`.

The process entry point (``workers.router``, ``workers.render``, ``workers.maintenance``, ``workers.beat``, the
``celery -A workers.app`` target) builds one context (settings, the task sender, optionally the render engine it
loaded first) and passes it to ``workers.tasks.register(app, ctx)``. The context builds the job store, cache,
router, renderer and maintenance on first use, once, thread-safely; entry points build what they consume eagerly
before consuming, a plain ``celery -A workers.app worker`` builds it lazily on its first task. Nothing is built
before a fork: render workers use a thread pool in one process, the model loaded once in it.

This module knows neither Celery nor any other ``workers`` module: the sender is anything with the
``nirvana.service.service.TaskSender`` methods (``workers.celery_app.CelerySender`` in the workers).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from nirvana.cache.core import ApproximateCache
from nirvana.cache.embedder import MiniLMEmbedder
from nirvana.cache.policy import KPolicy
from nirvana.config import Settings
from nirvana.engine.core import EngineCore
from nirvana.engine.loader import load_model
from nirvana.engine.loop import EngineLoop
from nirvana.pipeline.maintenance import Maintenance
from nirvana.pipeline.renderer import Renderer
from nirvana.pipeline.router import Router
from nirvana.service.jobs import JobStore
from nirvana.service.models import ServedModel, served_name
from nirvana.service.service import TaskSender

log = logging.getLogger(__name__)
T = TypeVar("T")


class FaultHooks(Protocol):
    """Test-only fault injection (``tests/faults/hooks.py``; only the fault suite's entry point
    ``tests/faults/render_worker.py`` passes one): called as ``hooks(point, job)`` by the renderer, and wraps the
    engine."""

    def __call__(self, point: str, job: dict[str, Any]) -> None: ...

    def wrap_engine(self, engine: Any) -> Any: ...


@dataclass(frozen=True)
class RenderEngine:
    """A render process's loaded model: what it serves (its queue is ``model.queue``), the running engine loop
    (or the fault suite's wrapper around it) and the cache embedder sharing the model's text encoder."""

    model: ServedModel
    engine: Any
    embedder: MiniLMEmbedder


def load_render_engine(settings: Settings, fault_hooks: FaultHooks | None = None) -> RenderEngine:
    """Load the configured model (once per process: the caller keeps the result) and start its engine loop.

    Refuses a K-policy table measured on another model before anything is served."""
    s = settings
    if s.render_threads:
        torch.set_num_threads(s.render_threads)
    comps = load_model(s.model, device=s.device, scheduler=s.scheduler)
    shared = getattr(comps.encoder, "sentence_transformer", None)
    embedder = MiniLMEmbedder(model=shared) if shared is not None else MiniLMEmbedder()
    model = ServedModel.from_components(served_name(s), s.model, comps)
    KPolicy.load(s.cache_policy_table, model_key=comps.model_key())  # refuse a table of another model at start
    # One loop thread owns the model and batches every job in flight (the Celery pool runs one thread per job).
    engine: Any = EngineLoop(EngineCore(comps, max_batch=s.render_max_batch), s.render_max_wait_ms).start()
    if fault_hooks is not None:
        log.warning("FAULT INJECTION ENABLED: test-only hooks active in this render worker")
        engine = fault_hooks.wrap_engine(engine)
    return RenderEngine(model, engine, embedder)


class WorkerContext:
    """One worker process's settings, task sender and the resources built from them (each once, on first use).

    Args:
        settings: the process's settings (built once by the entry point).
        sender: hands route/render tasks on (the router's render sends, the renderer's retries, the reaper).
        render_engine: the model a render worker loaded before declaring its queue; loaded on first use otherwise.
        fault_hooks: test-only (see :class:`FaultHooks`).
    """

    def __init__(
        self,
        settings: Settings,
        sender: TaskSender,
        render_engine: RenderEngine | None = None,
        fault_hooks: FaultHooks | None = None,
    ) -> None:
        self.settings = settings
        self.sender = sender
        self.fault_hooks = fault_hooks
        self._render_engine = render_engine
        self._lock = threading.RLock()
        self._built: dict[str, Any] = {}

    def _once(self, name: str, build: Callable[[], T]) -> T:
        with self._lock:
            if name not in self._built:
                self._built[name] = build()
            return self._built[name]  # type: ignore[no-any-return]

    def store(self) -> JobStore:
        def build() -> JobStore:
            s = self.settings
            if not s.database_url:
                raise ValueError("database_url must be set (NIRVANA_DATABASE_URL)")
            # A render worker has up to render_max_batch jobs in flight, each claiming, heart-beating, finishing.
            size = max(4, s.render_max_batch // 2 + 2, s.route_max_batch // 4 + 2)
            return JobStore.connect(s.database_url, max_size=size)

        return self._once("store", build)

    def cache(self) -> ApproximateCache:
        """The cache; in a render worker its embedder shares the loaded model's text encoder."""

        def build() -> ApproximateCache:
            embedder = None if self._render_engine is None else self._render_engine.embedder
            pool = max(4, self.settings.route_max_batch // 4 + 2)  # a router's task threads look up concurrently
            return ApproximateCache.from_settings(self.settings, embedder=embedder, pool_size=pool)

        return self._once("cache", build)

    def router(self) -> Router:
        def build() -> Router:
            if self.settings.router_threads:
                torch.set_num_threads(self.settings.router_threads)
            # Route tasks run on threads; the jobs routed at once are claimed, embedded and planned together.
            return Router(self.settings, self.store(), self.cache(), self.sender, batched=True)

        return self._once("router", build)

    def maintenance(self) -> Maintenance:
        return self._once("maintenance", lambda: Maintenance(self.settings, self.store(), self.cache(), self.sender))

    def render_engine(self) -> RenderEngine:
        """The loaded model (loaded now if the entry point did not)."""
        with self._lock:
            if self._render_engine is None:
                self._render_engine = load_render_engine(self.settings, self.fault_hooks)
            return self._render_engine

    def renderer(self) -> Renderer:
        def build() -> Renderer:
            r = self.render_engine()
            s = self.settings
            return Renderer(s, self.store(), self.cache(), r.engine, r.model, self.sender, fault_hook=self.fault_hooks)

        return self._once("renderer", build)


__all__ = ["FaultHooks", "RenderEngine", "WorkerContext", "load_render_engine"]
