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
    scheduler: Literal["default", "ddim", "euler", "dpmsolver++"] = "default"
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
    cache_min_states_per_prompt: int = Field(2, ge=0, le=10)
    cache_codec: Literal["fp32", "fp16", "fp16-zstd", "int8-zstd"] = "fp16-zstd"
    cache_policy_table: Path | None = None
    cache_ef_search: int = Field(100, ge=1, le=1000)
    cache_novelty_gate: bool = True
    cache_exact_tier: bool = True
    cache_shared_pool: bool = False

    # Workers
    visibility_timeout_s: int = Field(3600, ge=60)
    max_attempts: int = Field(3, ge=1, le=20)

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
