"""A tiny random-weight Stable-Diffusion pipeline built locally (no hub): CLIP tokenizer, text encoder, VAE, UNet.

Used by the tests and by ``nirvana bench engine``: it has SD 1.x's structure (CLIP text encoder, VAE with a
scaling factor, cross-attention UNet), so the same loading and denoising code runs on it as on real weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def build_tokenizer(path: Path) -> Any:
    """A byte-level CLIP BPE tokenizer with only single-character tokens (plus a few merges)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = ["r e", "re d</w>", "c a", "ca t</w>"]
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=16)


def build_tiny_sd(path: Path, scheduler: str = "ddim", seed: int = 0) -> Path:
    """Save a tiny SD-1.x-shaped pipeline to ``path`` and return it. Sample size 32 px (latents 4×8×8).

    ``scheduler``: "ddim", or "pndm" (SD 1.5's own default, which the loader must swap: it has no resume rule).
    """
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tok = build_tokenizer(path.parent / (path.name + "-tok"))
    text = _tiny_clip(tok, projection=False)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = _tiny_vae(4)
    sched: Any
    if scheduler == "ddim":
        sched = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,  # as in SD 1.5's scheduler_config.json
        )
    elif scheduler == "pndm":
        sched = PNDMScheduler(  # runwayml/stable-diffusion-v1-5's scheduler_config.json
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            set_alpha_to_one=False,
            skip_prk_steps=True,
            steps_offset=1,
        )
    else:
        raise ValueError(f"scheduler must be 'ddim' or 'pndm', got {scheduler!r}")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(path))
    return path


# -- other families: SDXL, SD3, Flux ----------------------------------------------------------------------------
# All of them are random-weight and built from configs in code (no hub). Sizes are chosen so that every
# invariant of the real model holds (e.g. SDXL's projection_class_embeddings_input_dim = 6 time ids × the time
# embedding dim + the pooled width) while a forward pass costs milliseconds on a CPU.

TINY_CLIP_WIDTH = 32  # hidden size (and projection size) of every tiny CLIP text encoder
TINY_T5_WIDTH = 80  # T5 d_model: wider than the two SD3 CLIPs together (64), so SD3's zero-padding is exercised
TINY_T5_LENGTH = 16  # T5 tokenizer model_max_length: the engine caps the sequence length to it


def _tiny_clip(tok: Any, projection: bool) -> Any:
    """A 2-layer CLIP text encoder (``CLIPTextModelWithProjection`` when ``projection``) for ``tok``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tok.get_vocab()),
        hidden_size=TINY_CLIP_WIDTH,
        intermediate_size=37,
        projection_dim=TINY_CLIP_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return (CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)).eval()


def _tiny_vae(latent_channels: int, **config: Any) -> Any:
    """A 3-level ``AutoencoderKL`` (factor 4) with ``latent_channels``; ``config`` adds scaling/shift settings."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 32),
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=32,
        **config,
    )


def build_t5_tokenizer(max_length: int = TINY_T5_LENGTH) -> Any:
    """A T5 (Unigram, SentencePiece-style ``▁`` word starts) tokenizer over printable ASCII, built in code.

    Saved by ``save_pretrained`` as ``tokenizer.json``, which ``T5TokenizerFast.from_pretrained`` loads offline.
    """
    from transformers import T5TokenizerFast

    printable = [chr(c) for c in range(33, 127)]
    # T5's layout: <pad>=0, </s>=1, <unk>=2, then pieces. Word-start pieces (▁x) score above bare characters.
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + c, -2.0) for c in printable] + [(c, -2.5) for c in printable]
    vocab += [("▁red", -1.0), ("▁cat", -1.0)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _tiny_t5(vocab_size: int) -> Any:
    """A 1-layer ``T5EncoderModel`` of width ``TINY_T5_WIDTH``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=TINY_T5_WIDTH,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def build_tiny_sdxl(path: Path, seed: int = 0) -> Path:
    """Save a tiny SDXL-shaped pipeline to ``path`` and return it. Sample size 32 px (latents 4×8×8).

    Two CLIP encoders (``CLIPTextModel`` and ``CLIPTextModelWithProjection``, penultimate states concatenated:
    cross-attention width 64), a ``text_time`` UNet (6 time ids × 8 + 32 pooled = 80 added-embedding inputs),
    SDXL's Euler scheduler config and a VAE with ``force_upcast`` (decoded in float32 when served in float16).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tok = build_tokenizer(path.parent / (path.name + "-tok"))
    text = _tiny_clip(tok, projection=False)
    text_2 = _tiny_clip(tok, projection=True)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=2 * TINY_CLIP_WIDTH,
        attention_head_dim=8,
        norm_num_groups=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + TINY_CLIP_WIDTH,
        transformer_layers_per_block=1,
    )
    vae = _tiny_vae(4, scaling_factor=0.13025, force_upcast=True)
    sched = EulerDiscreteScheduler(  # stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
        interpolation_type="linear",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text,
        text_encoder_2=text_2,
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=sched,
        add_watermarker=False,
    )
    pipe.save_pretrained(str(path))
    return path


def build_tiny_sd3(path: Path, seed: int = 0, t5: bool = True) -> Path:
    """Save a tiny SD3-shaped pipeline to ``path`` and return it. Sample size 32 px (latents 16×8×8, 16 tokens).

    Two ``CLIPTextModelWithProjection`` (penultimate states 32 + 32 wide, zero-padded to T5's 80), a tiny T5
    (or none when ``t5`` is false: the stock pipeline then feeds zeros), an ``SD3Transformer2DModel`` with
    patch size 2 and pooled width 64, a 16-channel VAE with SD3's scaling/shift, and SD3's flow-matching scheduler.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tok = build_tokenizer(path.parent / (path.name + "-tok"))
    t5_tok = build_t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=TINY_T5_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=2 * TINY_CLIP_WIDTH,
        out_channels=16,
        pos_embed_max_size=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # stable-diffusion-3-medium's config
        vae=_tiny_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_tiny_clip(tok, projection=True),
        tokenizer=tok,
        text_encoder_2=_tiny_clip(tok, projection=True),
        tokenizer_2=tok,
        text_encoder_3=_tiny_t5(len(t5_tok.get_vocab())) if t5 else None,
        tokenizer_3=t5_tok if t5 else None,
    )
    pipe.save_pretrained(str(path))
    return path


def build_tiny_flux(path: Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Save a tiny Flux-shaped pipeline to ``path`` and return it. Sample size 32 px (latents 16×8×8, packed
    into 4×4 = 16 tokens of 64 features).

    A ``CLIPTextModel`` (pooled output, width 32), a tiny T5 (states, width 80), a ``FluxTransformer2DModel``
    (one double and one single block, RoPE axes 4 + 6 + 6 = head dim 16; guidance embedding as in FLUX.1-dev
    unless ``guidance_embeds`` is false, as in schnell), a 16-channel VAE with Flux's scaling/shift and FLUX.1-dev's
    scheduler config (dynamic resolution shifting).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    tok = build_tokenizer(path.parent / (path.name + "-tok"))
    t5_tok = build_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TINY_T5_WIDTH,
        pooled_projection_dim=TINY_CLIP_WIDTH,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    sched = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=sched,
        vae=_tiny_vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_tiny_clip(tok, projection=False),
        tokenizer=tok,
        text_encoder_2=_tiny_t5(len(t5_tok.get_vocab())),
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    pipe.save_pretrained(str(path))
    return path
