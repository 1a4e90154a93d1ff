"""Denoiser adapters: one per model family, each turning a batch of rows into one forward pass.

The engine core (``nirvana/engine/core.py``) owns the loop and the per-row schedulers; an adapter only knows how
its family's network is called. Every adapter takes and returns *unpacked* latents (B, C, H, W) — the shape the
cache stores — so a family that packs its input (Flux: 2×2 patches as tokens) packs and unpacks inside.

Invariants:
    * ``predict`` is a pure function of its inputs: row ``b`` of the output depends only on row ``b`` of the
      inputs (no batch statistics), which is what makes a batched image equal the same request rendered alone.
    * ``timesteps`` carries one value per row: rows of one batch may sit at different steps of different
      schedules (a cache hit joins at its own K).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from nirvana.engine.latents import coordinate_channels
from nirvana.engine.text import Conditioning


class Denoiser(Protocol):
    """One model family's network behind the engine core.

    Attributes:
        family: ``unet`` (SD 1.x/2.x, SDXL, the bundled model), ``sd3`` or ``flux``.
        size_multiple: height and width must be multiples of this (latent factor × the network's down-sampling).
    """

    family: str
    size_multiple: int

    def uses_cfg(self, guidance: float) -> bool:
        """Whether a row with this guidance runs an unconditional twin (classifier-free guidance)."""
        ...

    def prepare(self, cond: Conditioning, height: int, width: int) -> Conditioning:
        """Per-row conditioning completed with what depends on the image size (SDXL's ``time_ids``)."""
        ...

    def timestep_kwargs(self, height: int, width: int) -> dict[str, Any]:
        """Extra ``scheduler.set_timesteps`` arguments for this size (Flux's resolution shift ``mu``)."""
        ...

    def predict(
        self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, guidance: torch.Tensor
    ) -> torch.Tensor:
        """Model output for each row (same shape as ``latents``, float32).

        Args:
            latents: (B, C, H, W) scheduler-scaled model input, in the model's dtype.
            timesteps: (B,) the scheduler's timestep of each row.
            cond: B rows of conditioning (unconditional twins included as their own rows).
            guidance: (B,) guidance of each row (used only by guidance-distilled models such as Flux-dev).
        """
        ...


class UNetDenoiser:
    """``UNet2DConditionModel``: SD 1.x/2.x, SDXL (``added_cond_kwargs``) and the bundled pixel model
    (coordinate channels appended to the input, never part of the latent)."""

    family = "unet"

    def __init__(self, unet: Any, latent_factor: int, sdxl: bool = False, coord_channels: int = 0) -> None:
        self.unet = unet
        self.sdxl = sdxl
        self.coord_channels = coord_channels
        downs = len(unet.config.block_out_channels) - 1
        self.size_multiple = int(latent_factor * 2**downs)

    def uses_cfg(self, guidance: float) -> bool:
        return guidance > 1.0

    def prepare(self, cond: Conditioning, height: int, width: int) -> Conditioning:
        if not self.sdxl:
            return cond
        n = cond.hidden_states.shape[0]
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(n, 1)
        return Conditioning(cond.hidden_states, {**cond.added, "time_ids": time_ids.to(cond.hidden_states)})

    def timestep_kwargs(self, height: int, width: int) -> dict[str, Any]:
        return {}

    def predict(
        self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, guidance: torch.Tensor
    ) -> torch.Tensor:
        x = latents
        if self.coord_channels:
            coords = coordinate_channels(x.shape[0], x.shape[2], x.shape[3], device=x.device).to(x.dtype)
            x = torch.cat([x, coords], dim=1)
        out = self.unet(
            x,
            timesteps,
            encoder_hidden_states=cond.hidden_states,
            added_cond_kwargs=cond.added or None,
        ).sample
        return out.float()
