"""Captured denoising states: what the cache stores and what the engine resumes from."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

SCHEDULER_FAMILIES: dict[str, str] = {
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "DPMSolverMultistepScheduler": "dpmsolver++",
    "DDPMScheduler": "ddpm",
    "PNDMScheduler": "pndm",
    "LMSDiscreteScheduler": "lms",
    "UniPCMultistepScheduler": "unipc",
    "FlowMatchEulerDiscreteScheduler": "flowmatch-euler",
}

# Scheduler settings that change the timesteps or sigmas a schedule visits: two schedulers differing in one of
# these produce states at different noise levels for the same (step, N), so they get different model keys.
_SIGNATURE_FIELDS = (
    "timestep_spacing",
    "steps_offset",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "prediction_type",
    "shift",
    "use_dynamic_shifting",
    "base_shift",
    "max_shift",
    "final_sigmas_type",
    "solver_order",
    "rescale_betas_zero_snr",
)


def scheduler_family(scheduler: Any) -> str:
    """Short, stable family name of a diffusers scheduler instance (``type(s).__name__`` if unknown)."""
    name = type(scheduler).__name__
    return SCHEDULER_FAMILIES.get(name, name)


def scheduler_signature(scheduler: Any) -> str:
    """The scheduler settings that shape its schedule (``_SIGNATURE_FIELDS`` present in its config), as a
    stable string; part of ``make_model_key``."""
    cfg = dict(scheduler.config)
    picked = {k: cfg[k] for k in _SIGNATURE_FIELDS if k in cfg}
    return json.dumps(picked, sort_keys=True, default=str)


def make_model_key(checkpoint: str, height: int, width: int, family: str, scheduler_config: str = "") -> str:
    """Stable namespace of checkpoint + resolution + scheduler family and settings: states are only reusable
    within one key.

    ``checkpoint`` is a content identity (hub id + revision, or a hash of the local weights), never a path alone,
    so two copies of the same weights share a key and a retrained model does not. ``scheduler_config`` is
    ``scheduler_signature(...)``: karras sigmas or another spacing change the noise level of step k.
    """
    blob = json.dumps(
        {"ckpt": checkpoint, "h": height, "w": width, "sched": family, "sched_cfg": scheduler_config}, sort_keys=True
    )
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    short = checkpoint.rstrip("/").split("/")[-1].split("@")[0][:24]
    return f"{short}-{height}x{width}-{family}-{digest}"


@dataclass
class CapturedState:
    """The latent of one prompt after ``step`` of ``num_steps`` denoising steps.

    Invariants:
        * ``latent`` has no batch dim: (C, H, W), on CPU, float32.
        * Resuming at ``step`` of the same ``num_steps`` schedule runs ``timesteps[step:]``; ``timestep`` is
          ``timesteps[step]``, i.e. the first timestep still to run (and ``sigma`` its sigma, if the scheduler has
          sigmas).
        * ``model_key`` names the namespace; the engine refuses a state of another key.
    """

    latent: torch.Tensor
    step: int
    num_steps: int
    timestep: float
    scheduler_family: str
    model_key: str
    sigma: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.latent.dim() != 3:
            raise ValueError(f"latent must be (C, H, W), got shape {tuple(self.latent.shape)}")
        if not 0 < self.step < self.num_steps:
            raise ValueError(f"step must be in 1..num_steps-1 ({self.num_steps - 1}), got {self.step}")

    def describe(self) -> dict[str, Any]:
        """JSON-able metadata (everything but the tensor)."""
        return {
            "step": self.step,
            "num_steps": self.num_steps,
            "timestep": self.timestep,
            "sigma": self.sigma,
            "scheduler_family": self.scheduler_family,
            "model_key": self.model_key,
            "shape": list(self.latent.shape),
            **({"meta": self.meta} if self.meta else {}),
        }
