"""Image ↔ latent mappings: a VAE for Stable Diffusion, pixel-unshuffle for the bundled pixel-space model."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F


class LatentSpace(Protocol):
    """Maps images in [-1, 1] of shape (B, 3, H, W) to latents (B, C, H/f, W/f) and back.

    Attributes:
        channels: latent channels C.
        factor: spatial down-sampling factor f.
    """

    channels: int
    factor: int

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


def coordinate_channels(n: int, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """(n, 2, height, width): each cell's row and column coordinate, evenly spaced in [-1, 1].

    Appended to the UNet's input (CoordConv) by a model whose ``nirvana.coord_channels`` is 2. Why: a
    convolutional UNet is translation-equivariant, so from noise alone no cell "knows" it is top left, and
    prompts' position words cannot be mapped to places (the bundled v1/v3 models: position accuracy 0.21–0.33
    of 5, chance 0.2, while shape, colour and size were learnt). Fixed, not noised, not part of the latent.
    """
    rows = torch.linspace(-1.0, 1.0, height, device=device).view(1, 1, height, 1).expand(n, 1, height, width)
    cols = torch.linspace(-1.0, 1.0, width, device=device).view(1, 1, 1, width).expand(n, 1, height, width)
    return torch.cat([rows, cols], dim=1)


class PixelUnshuffleSpace:
    """Lossless, parameter-free: a (3, H, W) image becomes (3·f², H/f, W/f) so the UNet runs at lower resolution.

    Invariant: ``decode(encode(x)) == x`` exactly.
    """

    def __init__(self, factor: int = 2) -> None:
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.factor = factor
        self.channels = 3 * factor * factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, self.factor) if self.factor > 1 else images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        out = F.pixel_shuffle(latents, self.factor) if self.factor > 1 else latents
        return out.clamp(-1, 1)


class VaeSpace:
    """An ``AutoencoderKL`` with its ``scaling_factor`` (and SD3/Flux's ``shift_factor``).

    Invariant: a float16 VAE whose config sets ``force_upcast`` (SDXL's: it overflows to NaN/Inf in half
    precision) encodes and decodes in float32, as the stock SDXL pipeline does; the result is float32 either way.
    The upcast is done once and kept (the stock pipeline casts back to save ~80 MB; converting the weights on
    every decode would cost more than it saves here).
    """

    def __init__(self, vae: Any) -> None:
        self.vae = vae
        self.channels = int(vae.config.latent_channels)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @property
    def needs_upcast(self) -> bool:
        """Whether the VAE is float16 but its config asks to run it in float32."""
        return self.vae.dtype == torch.float16 and bool(getattr(self.vae.config, "force_upcast", False))

    def _dtype(self) -> torch.dtype:
        if self.needs_upcast:
            self.vae.to(torch.float32)
        dtype: torch.dtype = self.vae.dtype
        return dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(images.to(self._dtype())).latent_dist
        return (dist.mean - self.shift) * self.scaling

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = latents.to(self._dtype()) / self.scaling + self.shift
        return self.vae.decode(x).sample.float().clamp(-1, 1)
