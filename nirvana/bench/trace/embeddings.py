"""Prompt embeddings for ``bench trace``, computed once per distinct prompt and kept on disk.

Owns :class:`EmbeddingCache` (content-addressed by a hash of the text, under ``<data_dir>/bench/trace-emb``; never
in git) and :func:`embed_with_cache`, which embeds only the distinct texts the cache lacks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class EmbeddingCache:
    """Prompt embeddings on disk, content-addressed by a 128-bit hash of the text.

    Layout: ``<root>/<space>/part-<n>.npz`` with arrays ``keys`` (S16) and ``emb`` (n, dim) float32. New
    embeddings are appended as new parts (written to a temporary name, then renamed), so an interrupted run
    keeps what it finished and concurrent readers never see half a part.
    """

    def __init__(self, root: Path | str, space: str, dim: int) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", space):
            raise ValueError(f"embedding space must be a simple name, got {space!r}")
        self.dir = Path(root) / space
        self.dim = dim
        self._index: dict[bytes, tuple[int, int]] = {}
        self._parts: list[np.ndarray] = []
        self._load()

    def _load(self) -> None:
        if not self.dir.exists():
            return
        for p in sorted(self.dir.glob("part-*.npz")):
            try:
                with np.load(p, allow_pickle=False) as z:
                    keys, emb = z["keys"], np.asarray(z["emb"], dtype=np.float32)
            except (OSError, ValueError, KeyError) as e:
                log.warning("ignoring unreadable embedding part %s: %s", p, e)
                continue
            if emb.ndim != 2 or emb.shape[1] != self.dim or len(keys) != len(emb):
                log.warning("ignoring embedding part %s of shape %s", p, emb.shape)
                continue
            pi = len(self._parts)
            self._parts.append(emb)
            for j, k in enumerate(keys.tolist()):  # numpy drops trailing NUL bytes of "S" items: pad them back
                self._index[bytes(k).ljust(16, b"\0")] = (pi, j)

    def __len__(self) -> int:
        return len(self._index)

    def missing(self, texts: Iterable[str]) -> list[str]:
        """Distinct texts without a stored embedding (first-seen order)."""
        seen: set[bytes] = set()
        out = []
        for t in texts:
            k = _key(t)
            if k not in self._index and k not in seen:
                seen.add(k)
                out.append(t)
        return out

    def add(self, texts: Sequence[str], emb: np.ndarray) -> None:
        """Store embeddings of ``texts`` as a new part."""
        emb = np.asarray(emb, dtype=np.float32)
        if emb.shape != (len(texts), self.dim):
            raise ValueError(f"emb must be ({len(texts)}, {self.dim}), got {emb.shape}")
        if not len(texts):
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        raw = [_key(t) for t in texts]
        n = len(list(self.dir.glob("part-*.npz")))
        dest = self.dir / f"part-{n:05d}-{uuid.uuid4().hex[:8]}.npz"
        tmp = self.dir / f".tmp-{dest.name}"  # not matched by part-*.npz until renamed
        np.savez(tmp, keys=np.array(raw, dtype="S16"), emb=emb)
        os.replace(tmp, dest)
        pi = len(self._parts)
        self._parts.append(emb)
        for j, k in enumerate(raw):
            self._index[k] = (pi, j)

    def get(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) embeddings; every text must be present (KeyError otherwise)."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            pi, j = self._index[_key(t)]
            out[i] = self._parts[pi][j]
        return out


def embed_with_cache(
    texts: Sequence[str],
    embedder: Any,
    cache_dir: Path | str | None,
    chunk: int = 4096,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Embeddings of ``texts`` (row per text), computing only distinct texts missing from the disk cache.

    Returns the matrix and ``{"distinct_embedded", "embed_s", "embed_ms_per_prompt"}`` (the last None when
    nothing was embedded). ``cache_dir`` None keeps everything in memory.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    cache = (
        EmbeddingCache(cache_dir, embedder.space, embedder.dim)
        if cache_dir is not None
        else EmbeddingCache(Path("/nonexistent-nirvana-emb"), embedder.space, embedder.dim)
    )
    todo = cache.missing(texts)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(todo), chunk):
        part = todo[i : i + chunk]
        emb = embedder.embed(list(part))
        if cache_dir is None:
            pi = len(cache._parts)
            cache._parts.append(np.asarray(emb, dtype=np.float32))
            for j, t in enumerate(part):
                cache._index[_key(t)] = (pi, j)
        else:
            cache.add(part, emb)
        if progress is not None:
            progress(min(i + chunk, len(todo)), len(todo))
    dt = time.perf_counter() - t0
    info = {
        "distinct_embedded": len(todo),
        "embed_s": round(dt, 2),
        "embed_ms_per_prompt": round(1000 * dt / len(todo), 3) if todo else None,
        "embed_cpu_ms_per_prompt": round(1000 * (time.process_time() - c0) / len(todo), 3) if todo else None,
        "cached_embeddings": len(cache),
    }
    return cache.get(list(texts)), info
