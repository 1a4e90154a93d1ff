"""Training of the bundled scene model (``nirvana train-model``).

The model is a diffusers ``UNet2DConditionModel`` on pixel-unshuffled 32×32 images (12×16×16 "latents":
each latent cell is a 2×2 pixel patch), conditioned on MiniLM token states, trained with ε-prediction
(v-prediction selectable), a cosine noise schedule and 10% classifier-free-guidance dropout. Cross-attention
only at 4×4 (and the mid block): on 2 cores the step time follows attention resolution, and this shape trains
at ~1.75 s per batch of 64. The committed model is ``v4`` (the defaults): that shape plus a global text path and
coordinate channels, trained from scratch on multi-resolution noise (``pyramid_noise``, discount 0.8) for 2,300
steps at ~1.9 s each.

Why this shape (measured side by side, 150 s of training each, docs/MODEL.md): v0 unshuffled ×4 into 48
channels and opened with a 64-channel block. Through SiLU an identity map of c channels needs about 2c
channels, so v0 could not even pass the noise through at t≈950 (ε-MSE 0.42 where predicting x_t gives
0.005). ×2 unshuffle (12 channels) into 64 channels removes that bottleneck: loss 0.20 vs 0.48 at equal time.

The output directory is a diffusers-style pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) that
``nirvana.engine.load_model`` reads exactly like a Stable Diffusion checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nirvana.engine.latents import PixelUnshuffleSpace, coordinate_channels
from nirvana.engine.text import MiniLMTokenEncoder
from nirvana.scene.world import IMAGE_SIZE, Scene, render, split_scenes, to_array, write_prompt

log = logging.getLogger(__name__)

BUNDLED_CLASS = "NirvanaPixelPipeline"
MAX_TOKENS = 32
UNSHUFFLE = 2


ARCHITECTURES = ("v1", "v3", "v4")
COORD_CHANNELS = 2  # v4: row/column coordinates appended to the UNet input


def unet_config(arch: str = "v1") -> dict[str, Any]:
    """UNet architecture of the bundled model.

    * ``v1`` (≈5.2M parameters; 1.75 s per batch-64 step on 2 cores): text reaches the image only through
      cross-attention at 4×4 and in the mid block.
    * ``v3``: v1 plus a global text path: an attention-pooled MiniLM summary added to the timestep embedding,
      applied FiLM-style (scale and shift) in every ResNet at 16×16, 8×8 and 4×4. v1 learnt the object but
      barely the background (0.41) and position (0.33), global facts that cross-attention at 4×4 alone conveys
      badly. Costs ≈ 4% step time (1.84 vs 1.78 s per batch of 64, measured side by side); cross-attention at
      8×8 as well would cost +50% (2.65 s), i.e. a third fewer steps in the budget. The forward pass still
      takes only ``encoder_hidden_states``, so the engine loads it like any Stable Diffusion UNet.
    * ``v4``: v3 whose input also carries ``coordinate_channels`` (CoordConv; ``nirvana.coord_channels`` in
      ``model_index.json`` tells the engine). v1 and v3 never learnt position even on training combinations
      (0.23, chance 0.2) while shape, colour and size were learnt: convolutions are translation-equivariant, so
      nothing but zero padding tells a cell where it is.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    cfg: dict[str, Any] = {
        "sample_size": IMAGE_SIZE // UNSHUFFLE,
        "in_channels": 3 * UNSHUFFLE * UNSHUFFLE,
        "out_channels": 3 * UNSHUFFLE * UNSHUFFLE,
        "layers_per_block": 1,
        "block_out_channels": (64, 96, 128),
        "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": 384,
        "attention_head_dim": 32,
        "norm_num_groups": 16,
    }
    if arch == "v4":
        cfg["in_channels"] += COORD_CHANNELS
    if arch in ("v3", "v4"):
        cfg |= {
            "addition_embed_type": "text",
            "addition_embed_type_num_heads": 6,
            "resnet_time_scale_shift": "scale_shift",
        }
    return cfg


PREDICTION_TYPES = ("epsilon", "v_prediction")


def scheduler_config(prediction_type: str = "epsilon") -> dict[str, Any]:
    """Noise schedule shared by training (DDPM) and inference (DDIM by default)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": prediction_type,
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": False,
        "steps_offset": 0,
        "timestep_spacing": "trailing",
    }


def model_index(name: str, coord_channels: int = 0) -> dict[str, Any]:
    return {
        "_class_name": BUNDLED_CLASS,
        "_diffusers_version": "0.35.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "nirvana": {
            "name": name,
            "text_encoder": "minilm-tokens",
            "max_length": MAX_TOKENS,
            "latent_space": "pixel_unshuffle",
            "factor": UNSHUFFLE,
            "image_size": IMAGE_SIZE,
            # Measured on v4 (docs/MODEL.md): adherence 0.875 at 1.25, 0.80 at 1 (no CFG), 0.52 at 2, 0.34 at 3.
            "default_guidance": 1.25,
            "coord_channels": coord_channels,
        },
    }


def _save(ema: Any, out_dir: Path, name: str, scheduler_cls: Any, prediction_type: str) -> None:
    ema.to(torch.float16).save_pretrained(out_dir / "unet", safe_serialization=True)
    scheduler_cls(**scheduler_config(prediction_type)).save_pretrained(out_dir / "scheduler")
    coords = ema.config.in_channels - 3 * UNSHUFFLE * UNSHUFFLE
    (out_dir / "model_index.json").write_text(json.dumps(model_index(name, coords), indent=2) + "\n")


def build_dataset(
    scenes: list[Scene], renders_per_scene: int, prompts_per_scene: int, seed: int
) -> tuple[torch.Tensor, list[list[str]]]:
    """Renders (S, R, 3, 32, 32) uint8-valued float16 in [-1,1] and ``prompts_per_scene`` paraphrases per scene."""
    rng = random.Random(seed)
    images = np.stack(
        [
            to_array([render(s, seed=rng.randrange(2**31)) for _ in range(renders_per_scene)])
            for s in tqdm(scenes, desc="render", leave=False)
        ]
    )
    prompts = [[write_prompt(s, rng) for _ in range(prompts_per_scene)] for s in scenes]
    return torch.from_numpy(images).half(), prompts


def pyramid_noise(shape: tuple[int, ...], discount: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise plus coarser Gaussian noise upsampled from 1/2, 1/4, … down to 1×1, weighted
    ``discount**i``, rescaled to unit variance per sample (multi-resolution / offset noise).

    Why: with plain white noise the low frequencies of an image (background colour, where the object sits)
    stay readable in x_t down to high noise, so an ε-model learns to read them from x_t instead of the prompt;
    sampling starts from noise with no such content and the model reads "grey, anywhere" (v1: background 0.41,
    position 0.33). Noise with low-frequency energy hides them, so the prompt must supply them. ``discount`` 0
    is plain noise. Shape is (B, C, H, W) in pixel space.
    """
    b, c, h, w = shape
    noise = torch.randn(shape, generator=generator)
    if discount <= 0:
        return noise
    size, i = min(h, w) // 2, 1
    while size >= 1:
        coarse = torch.randn((b, c, size, size), generator=generator)
        noise = noise + F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        size, i = size // 2, i + 1
    return noise / noise.flatten(1).std(dim=1).view(b, 1, 1, 1)


def encode_prompts(encoder: MiniLMTokenEncoder, prompts: list[str], batch: int = 256) -> torch.Tensor:
    out = [
        encoder.encode(prompts[i : i + batch]).hidden_states.half()
        for i in tqdm(range(0, len(prompts), batch), desc="encode prompts", leave=False)
    ]
    return torch.cat(out)


def train_model(
    out_dir: Path,
    steps: int = 2300,
    batch_size: int = 64,
    lr: float = 5e-4,
    seed: int = 0,
    renders_per_scene: int = 16,
    prompts_per_scene: int = 8,
    cfg_dropout: float = 0.1,
    ema_decay: float = 0.999,
    threads: int | None = None,
    name: str = "nirvana-scenes-32",
    checkpoint_every: int = 500,
    init_from: Path | None = None,
    high_t_fraction: float = 0.0,
    high_t_min: int = 400,
    warmup_steps: int = 200,
    prediction_type: str = "epsilon",
    arch: str = "v4",
    pyramid_discount: float = 0.8,
) -> dict[str, Any]:
    """Train the bundled model and write it to ``out_dir``. Deterministic for a given seed/threads.

    Args:
        init_from: a pipeline directory whose UNet (and EMA) to start from (fine-tuning) instead of random init.
        high_t_fraction: share of each batch whose timestep is drawn from ``[high_t_min, 1000)`` instead of
            uniformly: with ε-prediction the loss barely rewards getting the global layout (background,
            position) right at high noise, where the sampler decides it.
        prediction_type: "epsilon" (default; v0/v1) or "v_prediction". The ε-loss equals an x0-loss weighted
            by SNR(t), which vanishes at the near-pure-noise steps where the sampler decides the global layout;
            the v-loss weights x0 by SNR(t)+1 ≥ 1. Measured at the 75-minute budget (docs/MODEL.md, v2): v
            learnt backgrounds slightly better and the object much worse, so ε stays the default.
        arch: UNet shape for a fresh model, one of ``ARCHITECTURES`` (see ``unet_config``).
        pyramid_discount: training noise is ``pyramid_noise`` with this discount, drawn in pixel space (0:
            plain Gaussian noise). Sampling still starts from plain noise.
    """
    scheduler_config(prediction_type)  # validates before minutes of rendering
    unet_config(arch)
    if not 0.0 <= high_t_fraction <= 1.0:
        raise ValueError(f"high_t_fraction must be in [0, 1], got {high_t_fraction}")
    if not 0.0 <= pyramid_discount < 1.0:
        raise ValueError(f"pyramid_discount must be in [0, 1), got {pyramid_discount}")
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logfile = out_dir / "train.log"
    fh = logging.FileHandler(logfile, mode="w")
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(fh)
    log.setLevel(logging.INFO)

    train_scenes, held = split_scenes()
    log.info("scenes: %d train, %d held out", len(train_scenes), len(held))
    images, prompts = build_dataset(train_scenes, renders_per_scene, prompts_per_scene, seed)
    encoder = MiniLMTokenEncoder(max_length=MAX_TOKENS)
    flat_prompts = [p for ps in prompts for p in ps]
    states = encode_prompts(encoder, flat_prompts).view(len(train_scenes), prompts_per_scene, MAX_TOKENS, -1)
    uncond = encoder.encode([""]).hidden_states.half()[0]
    space = PixelUnshuffleSpace(UNSHUFFLE)

    if init_from is not None:
        unet = UNet2DConditionModel.from_pretrained(Path(init_from) / "unet").float()
        log.info("initialised from %s", init_from)
    else:
        unet = UNet2DConditionModel(**unet_config(arch))
    n_coords = unet.config.in_channels - space.channels
    if n_coords not in (0, COORD_CHANNELS):
        raise ValueError(f"unet in_channels {unet.config.in_channels}: expected {space.channels} or +{COORD_CHANNELS}")
    coords = coordinate_channels(batch_size, IMAGE_SIZE // UNSHUFFLE, IMAGE_SIZE // UNSHUFFLE) if n_coords else None
    n_params = sum(p.numel() for p in unet.parameters())
    log.info("unet parameters: %d", n_params)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    noise_sched = DDPMScheduler(
        **{k: v for k, v in scheduler_config(prediction_type).items() if k != "set_alpha_to_one"}
    )
    alphas = noise_sched.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-4)
    warmup = min(warmup_steps, steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(seed)
    n_scenes = len(train_scenes)
    t0 = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(steps), desc="train", unit="step")
    unet.train()
    for step in bar:
        si = torch.randint(0, n_scenes, (batch_size,), generator=gen)
        ri = torch.randint(0, renders_per_scene, (batch_size,), generator=gen)
        pi = torch.randint(0, prompts_per_scene, (batch_size,), generator=gen)
        x0 = space.encode(images[si, ri].float())
        cond = states[si, pi].float()
        drop = torch.rand(batch_size, generator=gen) < cfg_dropout
        cond[drop] = uncond.float()
        if pyramid_discount > 0:
            # Plain noise keeps its own draw below so seeded plain-noise runs (v1) reproduce bit for bit.
            pix_shape = (batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)
            noise = space.encode(pyramid_noise(pix_shape, pyramid_discount, gen))
        else:
            noise = torch.randn(x0.shape, generator=gen)
        n_t = noise_sched.config.num_train_timesteps
        t = torch.randint(0, n_t, (batch_size,), generator=gen)
        if high_t_fraction > 0:
            high = torch.rand(batch_size, generator=gen) < high_t_fraction
            t = torch.where(high, torch.randint(high_t_min, n_t, (batch_size,), generator=gen), t)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        unet_in = xt if coords is None else torch.cat([xt, coords], dim=1)
        pred = unet(unet_in, t, encoder_hidden_states=cond).sample
        # v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022), the target diffusers' schedulers invert for "v_prediction".
        target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        loss = F.mse_loss(pred, target)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = ema_decay if init_from is not None else min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            recent = float(np.mean(losses[-50:]))
            bar.set_postfix(loss=f"{recent:.4f}")
            log.info("step %d loss %.5f lr %.2e elapsed %.0fs", step, recent, lr_at(step), time.perf_counter() - t0)
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            # A usable pipeline directory at every checkpoint: a stopped run still leaves weights behind.
            _save(copy.deepcopy(ema), out_dir, name, DDIMScheduler, prediction_type)
            log.info("checkpoint at step %d", step + 1)
    elapsed = time.perf_counter() - t0

    _save(ema, out_dir, name, DDIMScheduler, prediction_type)
    summary = {
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "lr": lr,
        "init_from": str(init_from) if init_from is not None else None,
        "high_t_fraction": high_t_fraction,
        "high_t_min": high_t_min,
        "prediction_type": prediction_type,
        "arch": arch if init_from is None else None,
        "pyramid_discount": pyramid_discount,
        "renders_per_scene": renders_per_scene,
        "prompts_per_scene": prompts_per_scene,
        "ema_decay": ema_decay,
        "parameters": n_params,
        "train_seconds": round(elapsed, 1),
        "final_loss": float(np.mean(losses[-200:])),
        "train_scenes": len(train_scenes),
        "held_out_scenes": len(held),
    }
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("done: %s", summary)
    log.removeHandler(fh)
    return summary
