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

import numpy as np
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

    def timestep_kwargs(self, height: int, width: int, steps: int | None = None) -> dict[str, Any]:
        """Extra ``scheduler.set_timesteps(steps, ...)`` arguments for this size and step count (Flux: the
        resolution shift ``mu`` and the stock ``sigmas`` list, which depends on ``steps``)."""
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

    def timestep_kwargs(self, height: int, width: int, steps: int | None = None) -> dict[str, Any]:
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


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Resolution-dependent shift ``mu`` of a flow-matching schedule: linear in the image token count between
    (base_seq_len, base_shift) and (max_seq_len, max_shift). Same formula as diffusers' Flux/SD3 pipelines."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def _shift_mu(config: Any, image_seq_len: int, default_max_shift: float) -> float:
    return calculate_shift(
        image_seq_len,
        int(config.get("base_image_seq_len", 256)),
        int(config.get("max_image_seq_len", 4096)),
        float(config.get("base_shift", 0.5)),
        float(config.get("max_shift", default_max_shift)),
    )


class SD3Denoiser:
    """``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5): patchifies internally, so latents go in unpacked.

    Conditioning: ``SD3PromptEncoder`` (``hidden_states`` + ``added["pooled_projections"]``). The timestep is the
    flow-matching scheduler's ``sigma × 1000`` as is. Classifier-free guidance where guidance > 1.

    Args:
        transformer: the network.
        latent_factor: the VAE's spatial factor.
        scheduler_config: the served scheduler's config (``use_dynamic_shifting`` checkpoints get a ``mu``).
    """

    family = "sd3"

    def __init__(self, transformer: Any, latent_factor: int, scheduler_config: Any) -> None:
        self.transformer = transformer
        self.latent_factor = latent_factor
        self.patch_size = int(transformer.config.patch_size)
        self.size_multiple = int(latent_factor * self.patch_size)
        self.scheduler_config = scheduler_config

    def uses_cfg(self, guidance: float) -> bool:
        return guidance > 1.0

    def prepare(self, cond: Conditioning, height: int, width: int) -> Conditioning:
        return cond

    def timestep_kwargs(self, height: int, width: int, steps: int | None = None) -> dict[str, Any]:
        if not self.scheduler_config.get("use_dynamic_shifting", False):
            return {}
        p = self.latent_factor * self.patch_size
        # The stock pipeline's fallback max_shift for SD3 is 1.16 (Flux's is 1.15).
        return {"mu": _shift_mu(self.scheduler_config, (height // p) * (width // p), 1.16)}

    def predict(
        self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, guidance: torch.Tensor
    ) -> torch.Tensor:
        out = self.transformer(
            hidden_states=latents,
            timestep=timesteps,
            encoder_hidden_states=cond.hidden_states,
            pooled_projections=cond.added["pooled_projections"],
            return_dict=False,
        )[0]
        return out.float()


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2 · W/2, 4C): each 2×2 patch becomes one token (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` for a latent of ``height`` × ``width`` (latent cells, both even)."""
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(height · width, 3) RoPE positions of the packed tokens: (0, row, column), as ``FluxPipeline`` builds them."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)


class FluxDenoiser:
    """``FluxTransformer2DModel`` (FLUX.1 dev/schnell): latents are packed into 2×2-patch tokens here and the
    output unpacked, so the engine (and the cache) only ever sees (B, C, H, W).

    Matches ``FluxPipeline``: timestep = scheduler timestep / 1000; ``img_ids`` = (0, row, col) of each token;
    ``txt_ids`` = zeros; a per-row ``guidance`` tensor when ``transformer.config.guidance_embeds`` (dev; schnell
    has none); no classifier-free twin (guidance-distilled; the stock ``true_cfg_scale`` is not offered). Schedule:
    the stock ``sigmas = linspace(1, 1/N, N)`` and, with ``use_dynamic_shifting``, the resolution shift ``mu`` of
    the packed token count.
    """

    family = "flux"

    def __init__(self, transformer: Any, latent_factor: int, scheduler_config: Any) -> None:
        self.transformer = transformer
        self.latent_factor = latent_factor
        self.size_multiple = int(latent_factor * 2)
        self.scheduler_config = scheduler_config
        self.guidance_embeds = bool(transformer.config.guidance_embeds)

    def uses_cfg(self, guidance: float) -> bool:
        return False

    def prepare(self, cond: Conditioning, height: int, width: int) -> Conditioning:
        return cond

    def timestep_kwargs(self, height: int, width: int, steps: int | None = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if steps is not None:
            # Why: without sigmas, set_timesteps spaces sigmas from 1 to 1/num_train_timesteps; FluxPipeline
            # passes linspace(1, 1/N, N), a different schedule (and so other states at the same step).
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        if self.scheduler_config.get("use_dynamic_shifting", False):
            seq = (height // self.size_multiple) * (width // self.size_multiple)
            kwargs["mu"] = _shift_mu(self.scheduler_config, seq, 1.15)
        return kwargs

    def predict(
        self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, guidance: torch.Tensor
    ) -> torch.Tensor:
        h, w = latents.shape[2], latents.shape[3]
        text_len = cond.hidden_states.shape[1]
        out = self.transformer(
            hidden_states=pack_latents(latents),
            # The stock pipeline casts the timestep to the latents' dtype before dividing.
            timestep=timesteps.to(latents.dtype) / 1000,
            guidance=guidance.float() if self.guidance_embeds else None,
            pooled_projections=cond.added["pooled_projections"],
            encoder_hidden_states=cond.hidden_states,
            txt_ids=torch.zeros(text_len, 3, device=latents.device, dtype=latents.dtype),
            img_ids=latent_image_ids(h // 2, w // 2, latents.device, latents.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w).float()
