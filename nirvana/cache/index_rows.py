"""Value types that cross between the cache facade and its SQL: a namespace's embedding space, a stored state's
row, and the rows one recorded generation adds.

Invariants:
    * Every type is frozen: a row read or about to be written is a value, never updated in place.
    * A ``Space`` is the unit of comparability: vectors are only ever compared within one (model_key, tenant,
      embed_space, dim).
    * ``uri`` None marks a virtual blob (a trace replay's byte size with no object behind it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Space:
    """Where vectors are comparable: a (model_key, tenant) namespace in one embedding space."""

    model_key: str
    tenant: str
    embed_space: str
    dim: int


@dataclass(frozen=True)
class StateRow:
    state_id: int
    prompt_id: int
    k: int
    num_steps: int
    timestep: float
    sigma: float | None
    scheduler_family: str
    shape: list[int]
    model_key: str
    blob_id: int
    uri: str | None
    codec: str
    bytes: int
    checksum: str | None


@dataclass(frozen=True)
class NewState:
    """A state row to insert: its own blob (``uri`` None for a virtual blob)."""

    k: int
    num_steps: int
    timestep: float
    sigma: float | None
    scheduler_family: str
    shape: list[int]
    uri: str | None
    codec: str
    bytes: int
    checksum: str | None


@dataclass(frozen=True)
class NewImage:
    uri: str | None
    bytes: int
    checksum: str | None
    codec: str = "png"


@dataclass(frozen=True)
class NewPrompt:
    prompt: str
    negative_prompt: str
    embedding: np.ndarray
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    exact_key: str
