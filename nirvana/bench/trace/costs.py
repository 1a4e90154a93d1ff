"""The size and cost models of ``bench trace``: what a stored state or image takes, and what a step costs.

Owns the byte sizes (an fp32 state is 16 bytes per latent pixel, 64 KiB at 512²; other codecs are measured with the
store's real encoder on SD-like mid-trajectory latents, :func:`measure_state_bytes`; an exact-tier PNG is accounted
at ``image_bytes_per_pixel``, an assumption), :class:`SizeModel` over them, and the step cost at 512² measured from
the trace's own "Dreamt in Xs" times (:func:`step_cost_512`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nirvana.bench.trace.load import DEFAULT_SAMPLER, DEFAULT_SIZE, TraceRequest

FP32_BYTES_PER_LATENT_PIXEL = 16  # 4 channels × 4 bytes, per latent pixel (1/8 of the image side)
STATES_PER_PROMPT = 5  # the paper's K ∈ {5, 10, 15, 20, 25}
DEFAULT_IMAGE_BYTES_PER_PIXEL = 1.5  # PNG of a 512² SD image ≈ 384 KiB (assumption, see docs/BENCHMARKS.md)


def _sd_alphas_cumprod() -> np.ndarray:
    """ᾱ_t of Stable Diffusion 1.x's training schedule (scaled_linear, 0.00085 → 0.012, 1000 steps)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def sd_like_states(
    ks: Sequence[int] = (5, 10, 15, 20, 25), num_steps: int = 50, size: int = 512, seed: int = 0
) -> dict[int, np.ndarray]:
    """Mid-trajectory latents shaped like SD 1.x's at ``size``² under DDIM: ``x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε``.

    No SD weights exist here, so ``x₀`` is a proxy for a VAE latent (×0.18215): low-pass filtered noise with a
    little white detail, unit variance per channel. At the cached steps (t ≥ 481 of 1000) the noise term
    carries ≥ 70% of the variance, so the codec's size is governed by ``ε`` and barely by the proxy.
    """
    rng = np.random.default_rng(seed)
    h = w = size // 8
    white = rng.normal(size=(4, h, w))
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    low = np.real(np.fft.ifft2(np.fft.fft2(white) * np.exp(-((fx**2 + fy**2) * (2 * math.pi * 2.0) ** 2) / 2)))
    x0 = low / low.std(axis=(1, 2), keepdims=True) + 0.3 * rng.normal(size=(4, h, w))
    x0 = x0 / x0.std(axis=(1, 2), keepdims=True)
    ac = _sd_alphas_cumprod()
    step = 1000 // num_steps
    timesteps = np.arange(num_steps)[::-1] * step + 1  # SD's "leading" spacing with steps_offset=1
    out = {}
    for k in ks:
        t = int(timesteps[k])
        eps = rng.normal(size=(4, h, w))
        out[int(k)] = (math.sqrt(ac[t]) * x0 + math.sqrt(1 - ac[t]) * eps).astype(np.float32)
    return out


def measure_state_bytes(codecs: Sequence[str] = ("fp32", "fp16", "fp16-zstd", "int8-zstd")) -> dict[str, Any]:
    """Stored object size per codec of SD-like 512² states at K = 5…25 (the store's real encoder).

    Returns ``{codec: {"by_k": {k: bytes}, "mean_bytes": b, "bytes_per_latent_pixel": b / 4096,
    "ratio_to_fp32": b / 65536}}``.
    """
    from nirvana.cache.store import encode_latent

    states = sd_like_states()
    out: dict[str, Any] = {}
    for c in codecs:
        by_k = {k: len(encode_latent(x, c)) for k, x in states.items()}
        mean = statistics.fmean(by_k.values())
        out[c] = {
            "by_k": by_k,
            "mean_bytes": round(mean, 1),
            "bytes_per_latent_pixel": round(mean / 4096, 4),
            "ratio_to_fp32": round(mean / 65536, 4),
        }
    return out


@dataclass(frozen=True)
class SizeModel:
    """Bytes stored per state (by codec) and per final image, as functions of the request's size.

    Invariants: fp32 is exactly 16 bytes per latent pixel (64 KiB at 512²); other codecs scale their measured
    512² size by latent pixels; images cost ``image_bytes_per_pixel`` per image pixel.
    """

    bytes_per_latent_pixel: dict[str, float]
    image_bytes_per_pixel: float = DEFAULT_IMAGE_BYTES_PER_PIXEL

    def state_bytes(self, codec: str, req: TraceRequest) -> int:
        return max(1, round(self.bytes_per_latent_pixel[codec] * req.latent_pixels))

    def image_bytes(self, req: TraceRequest) -> int:
        return max(1, round(self.image_bytes_per_pixel * req.width * req.height))

    def prompt_bytes_fp32_512(self) -> int:
        """What one 512² prompt's five fp32 states take: the unit of ``--budget-prompts``."""
        return STATES_PER_PROMPT * FP32_BYTES_PER_LATENT_PIXEL * (DEFAULT_SIZE // 8) ** 2


def step_cost_512(reqs: Iterable[TraceRequest]) -> float | None:
    """Median seconds per denoising step of 512² requests with the default sampler, from the bot's "Dreamt in"
    times (per request: the beta's times do not grow with ``n_images``). None without such requests."""
    xs = [
        r.gen_seconds / r.steps
        for r in reqs
        if r.gen_seconds and r.gen_seconds > 0 and r.width == r.height == DEFAULT_SIZE
        and r.sampler == DEFAULT_SAMPLER and r.steps >= 10
    ]  # fmt: skip
    return statistics.median(xs) if xs else None
