"""What the workers do, without Celery: route a job (cache lookup → plan), render it, and keep the system tidy.

``workers/`` wraps these in Celery tasks; tests can call them directly. One module per step: ``router``
(claim, embed, look up, plan, send), ``renderer`` (render a planned job, record the cache), ``maintenance``
(eviction, sweep, retention, gate refit, reaper); ``plan`` is the typed contract from router to renderer and
``batcher`` the micro-batching both the router and its tests use.

Invariants:
    * Every step starts with a guarded claim of the job row (``JobStore``), so a redelivered task is a no-op.
    * Render order: image object (keyed by the attempt) → one cache record attempt (its blobs, then its rows;
      errors caught) → the job row that makes the image visible → retries of a failed record. A crash before
      the row leaves nothing visible; a cache fault costs the cache an entry, never the job its image.
    * A planned source state that cannot be loaded or resumed is a miss for that job (``cache_fallback``).
    * The cache counts a hit once per job id (``ApproximateCache.record`` is idempotent per job).
    * Cancellation is honoured between denoising steps: a heartbeat thread polls ``cancel_requested`` and the
      progress callback raises ``GenerationCancelled``.
"""
