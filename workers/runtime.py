"""Per-process resources of a worker (settings, job store, cache, the loaded engine), built once.

Entry points (``workers.router``, ``workers.render``) build them eagerly before consuming; a worker started
with plain ``celery -A workers.app worker`` builds them lazily on its first task. Nothing is built before a
fork: render workers use the solo pool (one process, the model loaded once in it).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from nirvana.config import Settings, get_settings

log = logging.getLogger(__name__)
_lock = threading.RLock()
_state: dict[str, Any] = {}


def settings() -> Settings:
    with _lock:
        if "settings" not in _state:
            _state["settings"] = get_settings()
        return _state["settings"]  # type: ignore[no-any-return]


def set_app(app: Any) -> None:
    _state["app"] = app


def sender() -> Any:
    from workers.celery_app import CelerySender

    if "app" not in _state:
        from workers.app import app

        _state["app"] = app
    return CelerySender(_state["app"])


def store() -> Any:
    from nirvana.service.jobs import JobStore

    with _lock:
        if "store" not in _state:
            s = settings()
            if not s.database_url:
                raise ValueError("database_url must be set (NIRVANA_DATABASE_URL)")
            # A render worker has up to render_max_batch jobs in flight, each claiming, heart-beating, finishing.
            _state["store"] = JobStore.connect(
                s.database_url, max_size=max(4, s.render_max_batch // 2 + 2, s.route_max_batch // 4 + 2)
            )
        return _state["store"]


def cache(embedder: Any = None) -> Any:
    from nirvana.cache.core import ApproximateCache

    with _lock:
        if "cache" not in _state:
            pool = max(4, settings().route_max_batch // 4 + 2)  # a router's task threads look up concurrently
            _state["cache"] = ApproximateCache.from_settings(settings(), embedder=embedder, pool_size=pool)
        return _state["cache"]


def router() -> Any:
    from nirvana.service.pipeline import Router

    if "router" not in _state:
        if settings().router_threads:
            import torch

            torch.set_num_threads(settings().router_threads)
        # Route tasks run on threads; their prompts are embedded together (one model call per micro-batch).
        _state["router"] = Router(settings(), store(), cache(), sender(), batched=True)
    return _state["router"]


def maintenance() -> Any:
    from nirvana.service.pipeline import Maintenance

    if "maintenance" not in _state:
        _state["maintenance"] = Maintenance(settings(), store(), cache(), sender())
    return _state["maintenance"]


def load_renderer(fault_hooks: Any = None) -> Any:
    """Load the configured model once (this process) and build the renderer; returns it.

    ``fault_hooks``: only the fault suite's test entry point (``tests/faults/render_worker.py``) passes them."""
    from nirvana.cache.embedder import MiniLMEmbedder
    from nirvana.engine.core import EngineCore
    from nirvana.engine.loader import load_model
    from nirvana.engine.loop import EngineLoop
    from nirvana.service.models import ServedModel, served_name
    from nirvana.service.pipeline import Renderer

    if "renderer" in _state:
        return _state["renderer"]
    s = settings()
    if s.render_threads:
        import torch

        torch.set_num_threads(s.render_threads)
    comps = load_model(s.model, device=s.device, scheduler=s.scheduler)
    shared = getattr(comps.encoder, "sentence_transformer", None)
    embedder = MiniLMEmbedder(model=shared) if shared is not None else MiniLMEmbedder()
    model = ServedModel.from_components(served_name(s), s.model, comps)
    from nirvana.cache.policy import KPolicy

    KPolicy.load(s.cache_policy_table, model_key=comps.model_key())  # refuse a table of another model at start
    # One loop thread owns the model and batches every job in flight (the Celery pool runs one thread per job).
    engine: Any = EngineLoop(EngineCore(comps, max_batch=s.render_max_batch), s.render_max_wait_ms).start()
    if fault_hooks is not None:
        log.warning("FAULT INJECTION ENABLED: test-only hooks active in this render worker")
        engine = fault_hooks.wrap_engine(engine)
    _state["renderer"] = Renderer(s, store(), cache(embedder), engine, model, sender(), fault_hook=fault_hooks)
    return _state["renderer"]


def renderer() -> Any:
    return _state["renderer"] if "renderer" in _state else load_renderer()


def serve(app: Any, queue: str, role: str, pool: list[str], args: list[str]) -> None:
    """Consume ``queue`` with Celery ``pool`` options (e.g. ``["--pool=solo"]``) until stopped; the worker's
    heartbeat (role ``role``) starts once its consumer is up. ``--beat`` in ``args`` also runs the beat scheduler
    in this process (exactly one per deployment)."""
    from celery.signals import worker_ready

    from nirvana.service.liveness import start_heartbeat
    from nirvana.service.pipeline import worker_name

    s = settings()
    pool_ = store().pool

    @worker_ready.connect(weak=False)
    def _alive(**_: object) -> None:
        start_heartbeat(pool_, worker_name(role), role, queue)

    argv = ["worker", "-Q", queue, *pool, "--prefetch-multiplier=1", "-n", f"{role}@%h", "-l", "INFO"]
    if "--beat" in args:
        s.data_dir.mkdir(parents=True, exist_ok=True)
        argv += ["--beat", "--schedule", str(s.data_dir / "celerybeat-schedule")]
    app.worker_main([*argv, *(a for a in args if a != "--beat")])
