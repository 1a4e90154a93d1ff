"""Settings, from ``NIRVANA_*`` environment variables or an optional env file (``NIRVANA_CONFIG_FILE``).

Nothing is built at import time: call ``get_settings()`` (or construct ``Settings``) where a process starts, so
bad values fail loudly at start rather than on the first request.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_MODEL = "bundled"


def bundled_model_dir() -> Path:
    """Directory of the bundled scene model shipped inside the package."""
    return Path(__file__).parent / "models" / "scenes-32"


def bundled_probe_dir() -> Path:
    return Path(__file__).parent / "models" / "probe-32"


class Settings(BaseSettings):
    """All runtime configuration. Every field maps to ``NIRVANA_<FIELD>``.

    Invariants: URLs left empty mean "use the embedded component" (``nirvana up``); validation runs at start.
    """

    model_config = SettingsConfigDict(env_prefix="NIRVANA_", extra="ignore")

    # Engine
    model: str = Field(BUNDLED_MODEL, description="'bundled', a hub id, or a local diffusers directory")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    scheduler: Literal["default", "ddim", "euler", "dpmsolver++", "flowmatch-euler"] = "default"
    default_steps: int = Field(50, ge=1, le=1000)
    max_steps: int = Field(200, ge=1, le=1000)
    max_prompt_chars: int = Field(1000, ge=1)
    max_batch_jobs: int = Field(1000, ge=1)

    # Services (empty → embedded)
    data_dir: Path = Path(".nirvana")
    database_url: str = ""
    broker_url: str = ""
    storage_url: str = ""

    # Cache
    cache_policy: Literal["ours", "paper", "lru", "lfu", "fifo"] = "ours"
    cache_budget_bytes: int = Field(2 * 1024**3, ge=0)
    cache_min_states_per_prompt: int = Field(0, ge=0, le=10)  # see eviction.DEFAULT_MIN_STATES_PER_PROMPT
    cache_codec: Literal["fp32", "fp16", "fp16-zstd", "int8-zstd"] = "fp16-zstd"
    cache_policy_table: Path | None = None
    cache_ef_search: int = Field(100, ge=1, le=1000)
    cache_novelty_gate: bool = True
    cache_gate_enforce: bool = Field(
        False, description="skip the lookup when the gate says novel (off: shadow mode, the decision is only recorded)"
    )  # = nirvana.cache.gate.DEFAULT_GATE_ENFORCE
    cache_exact_tier: bool = True
    cache_image_budget_fraction: float = Field(
        0.1, ge=0, le=1, description="`ours`: share of the budget exact-tier images may keep when evicting"
    )  # = nirvana.cache.eviction.DEFAULT_IMAGE_BUDGET_FRACTION (config imports nothing of the cache)
    cache_half_life_s: float = Field(
        3600.0, gt=0, description="`ours`: half-life of a state's decayed use count (seconds)"
    )  # = nirvana.cache.eviction.DEFAULT_HALF_LIFE_S
    cache_shared_pool: bool = False
    # Per-tenant byte budgets and exact search of small namespaces (docs/CACHE.md).
    cache_tenant_budget_bytes: int = Field(
        0, ge=0, description="bytes each cache tenant may keep; its eviction touches only its own entries (0: none)"
    )
    cache_exact_scan_max_rows: int = Field(
        5000, ge=0, description="namespaces of at most this many prompts are searched exactly, not by HNSW (0: never)"
    )  # = nirvana.cache.index.DEFAULT_EXACT_SCAN_MAX_ROWS

    # Workers
    visibility_timeout_s: int = Field(3600, ge=60)
    max_attempts: int = Field(3, ge=1, le=20)
    max_route_attempts: int = Field(
        5, ge=1, le=50, description="route claims of a job before it fails with its last route error"
    )

    # Job service (api/, workers/, `nirvana up`; see docs/SERVICE.md)
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=0, le=65535)
    api_public_url: str = Field("", description="base URL put in image URLs (default: the request's base URL)")
    served_model_name: str = Field("", description="name clients use in `model` (default: derived from model)")
    max_image_size: int = Field(1024, ge=8, le=4096)
    max_guidance: float = Field(50.0, ge=0)
    openai_wait_s: float = Field(300.0, gt=0, description="longest POST /v1/images/generations waits")
    render_threads: int = Field(0, ge=0, description="torch threads per render worker (0: torch default)")
    render_max_batch: int = Field(
        16, ge=1, le=256, description="requests one render worker denoises together (jobs in flight per worker)"
    )  # 16: best images/s of `nirvana bench batching` on the bundled model (3.0x batch 1; docs/BENCHMARKS.md)
    render_max_wait_ms: float = Field(
        5.0, ge=0, le=10_000, description="an idle render worker waits this long for company before its first step"
    )
    router_threads: int = Field(
        0,
        ge=0,
        description="torch threads of a router (0: torch default, one per core; see docs/BENCHMARKS.md, bench router)",
    )  # 0: 90 prompts/s at batch 32 on 2 cores against 64 with 1 thread (bench router, session 14)
    route_max_batch: int = Field(
        32, ge=1, le=1024, description="route tasks one router runs at once; their prompts are embedded together"
    )
    route_embed_memo: int = Field(
        4096,
        ge=0,
        le=1_000_000,
        description="prompts whose embedding a router remembers (LRU; 1.5 KiB each; 0: none): a re-rolled prompt "
        "skips the embedding model",
    )
    route_max_wait_ms: float = Field(
        5.0, ge=0, le=10_000, description="the router's embedding batch waits this long for more prompts"
    )
    progress_interval_s: float = Field(0.25, gt=0, le=10, description="render progress/heartbeat/cancel poll")
    reaper_stale_s: float = Field(60.0, ge=5, description="a rendering job without heartbeat this long is stuck")
    reaper_requeue_s: float = Field(600.0, ge=10, description="re-send queued/routed jobs idle this long")
    beat_evict_s: float = Field(60.0, gt=0)
    evict_batch: int = Field(
        500, ge=1, le=100_000, description="cache entries one eviction transaction removes (shorter: smaller stalls)"
    )
    evict_duty: float = Field(
        0.1,
        gt=0,
        le=1,
        description="share of wall time eviction may be busy: after a batch of t s it sleeps t * (1 - duty) / duty "
        "(1: no pause), so a large eviction leaves the CPU to routing",
    )
    beat_gate_s: float = Field(300.0, gt=0)
    beat_reap_s: float = Field(15.0, gt=0)
    beat_sweep_s: float = Field(60.0, gt=0, description="orphan sweep period (each run: a slice of the store)")
    beat_retention_s: float = Field(3600.0, gt=0, description="retention period")
    sweep_shards_per_run: int = Field(
        16, ge=1, le=256, description="of the store's 256 key shards, how many one orphan sweep lists"
    )
    retention_ledger_s: float = Field(
        7 * 86400.0, ge=0, description="keep the cache's per-job ledger this long (0: forever)"
    )
    retention_jobs_s: float = Field(
        90 * 86400.0, ge=0, description="delete finished job rows (and their images) this long after (0: never)"
    )
    retention_images_s: float = Field(
        30 * 86400.0, ge=0, description="delete finished jobs' images this long after, keeping the rows (0: never)"
    )
    retention_batch: int = Field(1000, ge=1, description="most jobs one retention run touches per kind")
    api_key_cache_s: float = Field(10.0, ge=0, description="seconds a verified API key is cached per process")

    # Abuse limits (docs/SECURITY.md). Rate limits are token buckets per API key, kept in Redis so every API
    # process shares them; 0 turns a bucket off.
    max_body_bytes: int = Field(
        16 * 1024**2, ge=1024, description="largest request body (HTTP 413 above it); a 1000-job batch fits"
    )
    metrics_admin_only: bool = Field(
        False, description="/metrics (deployment-wide counters) for admin keys only (docs/SECURITY.md)"
    )
    rate_limit_url: str = Field("", description="Redis URL of the rate-limit buckets (default: broker_url)")
    rate_limit_requests_per_s: float = Field(50.0, ge=0, description="sustained requests per second per API key")
    rate_limit_requests_burst: int = Field(200, ge=1, description="requests a key may send at once")
    rate_limit_jobs_per_s: float = Field(10.0, ge=0, description="sustained jobs created per second per API key")
    rate_limit_jobs_burst: int = Field(1000, ge=1, description="jobs a key may create at once (≥ max_batch_jobs)")
    # Failed authentication is throttled per client address before the database is asked (a random key costs
    # a query otherwise): a lookup of a key this process has not seen valid costs one token; 0 turns it off.
    rate_limit_auth_failures_per_s: float = Field(
        1.0, ge=0, description="sustained lookups of unknown API keys per second per client address (then 429)"
    )
    rate_limit_auth_failures_burst: int = Field(
        20, ge=1, description="lookups of unknown API keys a client address may make at once"
    )
    api_key_negative_cache_s: float = Field(
        60.0, ge=0, description="seconds an unknown API key is answered 401 without a database query (0: off)"
    )

    @field_validator("model")
    @classmethod
    def _model_nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model must be 'bundled', a hub id or a directory")
        return v


def get_settings() -> Settings:
    """Build settings from the environment (and ``NIRVANA_CONFIG_FILE`` if set); raises on invalid values."""
    env_file = os.environ.get("NIRVANA_CONFIG_FILE")
    if env_file:
        return Settings(_env_file=env_file)  # type: ignore[call-arg]
    return Settings()
