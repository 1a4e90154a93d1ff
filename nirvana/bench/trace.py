"""``nirvana bench trace``: replay the real dreambot trace through the real cache path with a cost model.

Each request of the ordered trace goes through :class:`nirvana.cache.core.ApproximateCache` exactly as the router
runs it — exact tier, novelty gate (shadow mode), pgvector nearest on PostgreSQL, similarity → K table — and is
then recorded with :meth:`~nirvana.cache.core.ApproximateCache.record_virtual` (rows with byte sizes, no
tensors), with eviction on PostgreSQL whenever the stored bytes exceed the budget. Rendering is replaced by a
cost model: a request of N steps at W×H costs ``N × c₅₁₂ × W·H/512²`` GPU seconds, ``c₅₁₂`` measured from the
trace's own "Dreamt in Xs" times; a hit at K skips K steps, an exact hit all N.

Replay model (stated in every report):
    * One cache (one database, one global byte budget) for all channels; each channel is its own tenant, so
      entries are never shared across channels. ``model_key`` = ``sd-v1-beta/<W>x<H>/<sampler>``; states are
      only reused by requests with the same number of steps (``CacheIndex.usable_states``).
    * Channel files are each replayed in their order and merged by an interpolated wall clock (the trace's
      sparse unix-time anchors, ``krea_time_anchors.csv``); the cache clock is that time, so decayed counters
      age as they did in the beta.
    * One trajectory per request (its first image); ``n_images`` is ignored for caching and bytes.
    * Bytes per state: a 4×(H/8)×(W/8) latent, fp32 = 16 bytes per latent pixel (64 KiB at 512²); other codecs
      use the compressed size measured on SD-like mid-trajectory latents (:func:`measure_state_bytes`).
      The exact tier stores the final image as PNG, accounted at ``image_bytes_per_pixel`` (an assumption).

Embeddings are computed once per distinct prompt and kept on disk (:class:`EmbeddingCache`, content-addressed
by a hash of the text, under ``<data_dir>/bench/trace-emb``; never in git).
"""

from __future__ import annotations

import bisect
import csv
import gzip
import hashlib
import heapq
import logging
import math
import os
import re
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from nirvana.cache.eviction import DEFAULT_HALF_LIFE_S, DEFAULT_IMAGE_BUDGET_FRACTION, DEFAULT_MIN_STATES_PER_PROMPT

log = logging.getLogger(__name__)

TRACE_COLUMNS = (
    "seq", "channel", "user_hash", "prompt", "seed", "cfg", "steps", "width", "height", "n_images", "sampler",
    "gen_seconds", "raw_flags",
)  # fmt: skip
DEFAULT_STEPS = 50
DEFAULT_CFG = 7.0
DEFAULT_SIZE = 512
DEFAULT_N_IMAGES = 1
DEFAULT_SAMPLER = "default"
MAX_PROMPT_CHARS = 1000
FP32_BYTES_PER_LATENT_PIXEL = 16  # 4 channels × 4 bytes, per latent pixel (1/8 of the image side)
STATES_PER_PROMPT = 5  # the paper's K ∈ {5, 10, 15, 20, 25}
DEFAULT_IMAGE_BYTES_PER_PIXEL = 1.5  # PNG of a 512² SD image ≈ 384 KiB (assumption, see docs/BENCHMARKS.md)
_FLAG_RE = re.compile(r"^-([A-Za-z]+)(-?\d+(?:\.\d+)?)?$")


# ---------------------------------------------------------------------- trace parsing
@dataclass(frozen=True)
class TraceRequest:
    """One request of a dreambot trace, with the bot's defaults filled in.

    Invariants: ``steps >= 1``; ``width``/``height`` >= 8; ``prompt`` non-empty and at most
    ``MAX_PROMPT_CHARS`` characters (longer ones are cut); ``seed`` None = the bot drew a random one (it can
    never repeat an earlier request's seed); ``ts`` is the interpolated unix time (0 until assigned).
    """

    seq: int
    channel: str
    user: str
    prompt: str
    seed: int | None
    cfg: float
    steps: int
    width: int
    height: int
    n_images: int
    sampler: str
    gen_seconds: float | None
    flags: dict[str, str | bool] = field(default_factory=dict, compare=False, hash=False)
    ts: float = 0.0

    @property
    def model_key(self) -> str:
        """Namespace key: model × resolution × sampler (the bot served one model)."""
        return f"sd-v1-beta/{self.width}x{self.height}/{self.sampler}"

    @property
    def latent_pixels(self) -> int:
        return (self.width // 8) * (self.height // 8)

    @property
    def pixel_ratio(self) -> float:
        """Pixels relative to 512² (the cost model's step cost scales with it)."""
        return self.width * self.height / float(DEFAULT_SIZE * DEFAULT_SIZE)


def parse_flags(raw: str) -> dict[str, str | bool]:
    """``-n 9 -i -S 123 -s150`` → ``{"n": "9", "i": True, "S": "123", "s": "150"}``.

    A token ``-X`` (letters) is a flag; the next token is its value unless it is itself a flag. Glued values
    (``-s150``, ``-C17``) are split. Later occurrences win. Other tokens are ignored.
    """
    out: dict[str, str | bool] = {}
    toks = (raw or "").split()
    i = 0
    while i < len(toks):
        m = _FLAG_RE.match(toks[i])
        if m is None:
            i += 1
            continue
        name, glued = m.group(1), m.group(2)
        if glued is not None:
            out[name] = glued
            i += 1
        elif i + 1 < len(toks) and _FLAG_RE.match(toks[i + 1]) is None:
            out[name] = toks[i + 1]
            i += 2
        else:
            out[name] = True
            i += 1
    return out


def _num(text: str | None, kind: type, default: Any) -> Any:
    t = (text or "").strip()
    if not t:
        return default
    return kind(float(t)) if kind is int else kind(t)


def parse_row(row: dict[str, str]) -> tuple[TraceRequest | None, str]:
    """One CSV row → (request, "") or (None, reason) for a row the cache would reject.

    Empty fields are the bot's defaults: 50 steps, cfg 7, 512×512, 1 image, default sampler.
    """
    try:
        prompt = (row.get("prompt") or "").strip()
        seed_s = (row.get("seed") or "").strip()
        seed = int(seed_s) if seed_s else None
        cfg = _num(row.get("cfg"), float, DEFAULT_CFG)
        steps = _num(row.get("steps"), int, DEFAULT_STEPS)
        width = _num(row.get("width"), int, DEFAULT_SIZE)
        height = _num(row.get("height"), int, DEFAULT_SIZE)
        n_images = _num(row.get("n_images"), int, DEFAULT_N_IMAGES)
        gen = _num(row.get("gen_seconds"), float, None)
        seq = int(row["seq"])
    except (KeyError, ValueError):
        return None, "unparsable"
    if not prompt:
        return None, "empty_prompt"
    if not 1 <= steps <= 1000:
        return None, "steps_out_of_range"
    if not (8 <= width <= 16384 and 8 <= height <= 16384):
        return None, "size_out_of_range"
    if not (math.isfinite(cfg) and 0 <= cfg <= 100):
        return None, "cfg_out_of_range"
    if seed is not None and not 0 <= seed < 2**63:
        seed = seed % (2**63)
    return (
        TraceRequest(
            seq=seq,
            channel=(row.get("channel") or "").strip() or "unknown",
            user=(row.get("user_hash") or "").strip(),
            prompt=prompt[:MAX_PROMPT_CHARS],
            seed=seed,
            cfg=float(cfg),
            steps=int(steps),
            width=int(width),
            height=int(height),
            n_images=max(1, int(n_images)),
            sampler=(row.get("sampler") or "").strip() or DEFAULT_SAMPLER,
            gen_seconds=gen,
            flags=parse_flags(row.get("raw_flags") or ""),
        ),
        "",
    )


def read_trace(path: Path | str, limit: int | None = None) -> tuple[list[TraceRequest], Counter[str]]:
    """The first ``limit`` usable requests of one (gzip) CSV trace file, in file order, and the skip reasons.

    Raises:
        ValueError: the file lacks the trace columns, or ``limit`` < 1.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    out: list[TraceRequest] = []
    skipped: Counter[str] = Counter()
    with opener(p, "rt", encoding="utf-8", errors="replace", newline="") as fh:  # type: ignore[operator]
        reader = csv.DictReader(fh)
        missing = {"seq", "prompt", "steps"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{p}: not a trace file (missing columns {sorted(missing)})")
        for row in reader:
            req, why = parse_row(row)
            if req is None:
                skipped[why] += 1
                continue
            out.append(req)
            if limit is not None and len(out) >= limit:
                break
    return out, skipped


def default_trace_files() -> list[Path]:
    """The six dreambot channel traces under the prompts directory."""
    from nirvana.bench.index import prompts_dir

    return sorted((prompts_dir() / "sd-discord-dreambot").glob("*.trace.csv.gz"))


def load_anchors(path: Path | str | None) -> dict[str, list[tuple[int, float]]]:
    """channel → [(seq, unix_ts)] sorted by seq: the longest subsequence whose times do not run backwards."""
    if path is None or not Path(path).exists():
        return {}
    raw: dict[str, list[tuple[int, float]]] = {}
    with Path(path).open(encoding="utf-8", errors="replace", newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                raw.setdefault(row["channel"], []).append((int(row["seq"]), float(row["unix_ts"])))
            except (KeyError, ValueError):
                continue
    out: dict[str, list[tuple[int, float]]] = {}
    for ch, pts in raw.items():
        pts.sort()
        # Keep the longest run of anchors whose times increase with seq (drops the few out-of-order ones).
        best: list[list[tuple[int, float]]] = []
        for j, (s, t) in enumerate(pts):
            prev = [best[i] for i in range(j) if pts[i][1] <= t and pts[i][0] < s]
            best.append([*max(prev, key=len, default=[]), (s, t)])
        kept = max(best, key=len, default=[])
        out[ch] = kept
    return out


def assign_times(
    reqs: Sequence[TraceRequest], anchors: Sequence[tuple[int, float]], gap_s: float = 30.0, t0: float = 0.0
) -> list[TraceRequest]:
    """Requests of one channel with ``ts`` interpolated linearly in ``seq`` between anchors.

    Beyond the first/last anchor (or without two anchors) time advances ``gap_s`` per request (the rate fitted
    across the anchors when there are two). The result is non-decreasing in file order.
    """
    if len(anchors) >= 2:
        seqs = [a[0] for a in anchors]
        tss = [a[1] for a in anchors]
        rate = (tss[-1] - tss[0]) / max(seqs[-1] - seqs[0], 1)
    else:
        seqs, tss, rate = [], [], gap_s
    out: list[TraceRequest] = []
    last = -math.inf
    for r in reqs:
        if len(seqs) >= 2:
            i = bisect.bisect_right(seqs, r.seq)
            if i == 0:
                t = tss[0] - (seqs[0] - r.seq) * rate
            elif i == len(seqs):
                t = tss[-1] + (r.seq - seqs[-1]) * rate
            else:
                s0, s1, a, b = seqs[i - 1], seqs[i], tss[i - 1], tss[i]
                t = a + (b - a) * (r.seq - s0) / max(s1 - s0, 1)
        else:
            t = t0 + r.seq * rate
        t = max(t, last)
        last = t
        out.append(replace(r, ts=t))
    return out


def merge_by_time(channels: Iterable[Sequence[TraceRequest]]) -> list[TraceRequest]:
    """One ordered stream: each channel keeps its order; channels interleave by ``ts`` (ties: channel order)."""
    streams = [[(r.ts, ci, i, r) for i, r in enumerate(ch)] for ci, ch in enumerate(channels)]
    return [x[3] for x in heapq.merge(*streams, key=lambda x: (x[0], x[1], x[2]))]


def load_replay(
    files: Sequence[Path | str], limit: int | None = None, anchors_path: Path | str | None = None
) -> tuple[list[TraceRequest], dict[str, Any]]:
    """Read, time and merge trace files; returns the merged stream and per-file stats."""
    if not files:
        raise ValueError("at least one trace file is needed")
    if anchors_path is None:
        cand = Path(files[0]).parent / "krea_time_anchors.csv"
        anchors_path = cand if cand.exists() else None
    anchors = load_anchors(anchors_path)
    chans: list[list[TraceRequest]] = []
    info: dict[str, Any] = {}
    for f in files:
        reqs, skipped = read_trace(f, limit)
        ch = reqs[0].channel if reqs else Path(f).name
        timed = assign_times(reqs, anchors.get(ch, []))
        chans.append(timed)
        info[ch] = {
            "file": Path(f).name,
            "requests": len(timed),
            "skipped": dict(skipped),
            "anchors": len(anchors.get(ch, [])),
            "span_h": round((timed[-1].ts - timed[0].ts) / 3600, 1) if timed else 0.0,
        }
    return merge_by_time(chans), info


# ---------------------------------------------------------------------- embeddings on disk
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


# ---------------------------------------------------------------------- cost and size models
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


# ---------------------------------------------------------------------- policies
@dataclass(frozen=True)
class PolicySpec:
    """One cache configuration replayed against the trace.

    Attributes:
        name: row name in reports.
        eviction: ``ours``, ``paper``, ``lru``, ``lfu`` or ``fifo``.
        codec: state codec whose measured size is accounted (``fp32`` = the paper's storage).
        admit_hits: record generations served from a hit as new entries (False = only after a miss).
        exact_tier: serve identical requests from the stored image (and store images, which cost bytes).
        approximate: store states and serve approximate hits (False = exact-match-only cache).
        gate: run the novelty gate in shadow mode (counts lookups it would skip and hits it would lose).
        bounded: evict to the budget (False = unbounded ceiling).
        table: ``paper`` or a path to a similarity → K table.
        note: one line for the report.
        image_budget_fraction: ``ours`` only: share of the budget exact-tier images keep when eviction runs
            (None: no cap, images leave with their prompt); the default is the service's
            (``NIRVANA_CACHE_IMAGE_BUDGET_FRACTION``).
        floor: ``ours`` only: states kept per prompt while unprotected ones remain (``min_states_per_prompt``).
        floor_keeps: ``ours`` only: ``low_k`` or ``high_k``, which states the floor keeps on ties.
        half_life_s: ``ours`` only: half-life of the decayed use counts, in seconds of the trace's clock; None
            (the default) is the service's default for ``ours`` and stays None for the others, which keep no
            decayed counts.
    """

    name: str
    eviction: str
    codec: str = "fp32"
    admit_hits: bool = True
    exact_tier: bool = False
    approximate: bool = True
    gate: bool = False
    bounded: bool = True
    table: str = "paper"
    note: str = ""
    image_budget_fraction: float | None = DEFAULT_IMAGE_BUDGET_FRACTION
    floor: int = DEFAULT_MIN_STATES_PER_PROMPT
    floor_keeps: str = "low_k"
    half_life_s: float | None = None

    def __post_init__(self) -> None:
        if self.half_life_s is None and self.eviction == "ours":
            object.__setattr__(self, "half_life_s", DEFAULT_HALF_LIFE_S)

    def k_policy(self) -> Any:
        from nirvana.cache.policy import KPolicy

        return KPolicy.paper() if self.table == "paper" else KPolicy.from_file(self.table)

    def eviction_policy(self) -> Any:
        from nirvana.cache.eviction import PaperLCBFU, make_policy

        if self.eviction == "paper":
            return PaperLCBFU(admit_hits=self.admit_hits)
        return make_policy(
            self.eviction,
            min_states_per_prompt=self.floor,
            image_budget_fraction=self.image_budget_fraction,
            floor_keeps=self.floor_keeps,
            **({} if self.half_life_s is None else {"half_life_s": self.half_life_s}),
        )


def calibrated_table_path() -> Path:
    from nirvana.cache.policy import policies_dir

    return policies_dir() / "calibrated-scenes-32.json"


def default_specs(
    calibrated: Path | None = None, image_budget_fraction: float | None = DEFAULT_IMAGE_BUDGET_FRACTION
) -> list[PolicySpec]:
    """The compared configurations; ``ours_calibrated`` only when the calibrated table exists.
    ``image_budget_fraction`` is the image cap of ``ours`` and ``ours_calibrated`` (``ours_nocap`` has none)."""
    cap = "no image cap" if image_budget_fraction is None else f"images <= {image_budget_fraction:g} of budget"
    specs = [
        PolicySpec("paper", "paper", admit_hits=False,
                   note="LCBFU, fp32, new entry only after a miss (the public re-implementation)"),
        PolicySpec("ours", "ours", codec="fp16-zstd", exact_tier=True, gate=True,
                   image_budget_fraction=image_budget_fraction,
                   note=f"k-weighted LRFU ({DEFAULT_HALF_LIFE_S / 3600:g} h half-life), no per-prompt floor, "
                        f"admission s>=0.99, fp16-zstd, exact tier (PNG, {cap}), gate"),
        PolicySpec("ours_nocap", "ours", codec="fp16-zstd", exact_tier=True, gate=True, image_budget_fraction=None,
                   note="ours without the image cap (an image leaves only with its prompt's last state)"),
        PolicySpec("ours_noexact", "ours", codec="fp16-zstd", gate=True,
                   note="ours without the exact tier (no PNG stored)"),
        PolicySpec("lru", "lru", note="fp32, every generation recorded"),
        PolicySpec("lfu", "lfu", note="fp32, every generation recorded"),
        PolicySpec("fifo", "fifo", note="fp32, every generation recorded"),
        PolicySpec("exact", "fifo", exact_tier=True, approximate=False,
                   note="exact-match tier only (PNG per request), FIFO by prompt"),
        PolicySpec("unbounded", "lru", exact_tier=True, bounded=False,
                   note="every generation, never evicted, exact tier (ceiling); bytes at fp32"),
    ]  # fmt: skip
    cal = calibrated if calibrated is not None else calibrated_table_path()
    if cal.exists():
        specs.append(
            PolicySpec(
                "ours_calibrated", "ours", codec="fp16-zstd", exact_tier=True, gate=True, table=str(cal),
                image_budget_fraction=image_budget_fraction,
                note=f"ours with {cal.name} (scene-world calibration: a different quality per hit)",
            )
        )  # fmt: skip
    return specs


def ablation_specs(image_budget_fraction: float | None = DEFAULT_IMAGE_BUDGET_FRACTION) -> list[PolicySpec]:
    """Variants of ``ours``'s per-prompt floor, replayed only when named in ``--policies``."""
    ours = next(s for s in default_specs(None, image_budget_fraction) if s.name == "ours")
    return [
        replace(ours, name="ours_floor2", floor=2, floor_keeps="low_k",
                note="ours with a floor of 2 states per prompt, lowest k on ties (the default before session 5)"),
        replace(ours, name="ours_floor2_high", floor=2, floor_keeps="high_k",
                note="ours, the floor keeps a prompt's two highest-k states on ties"),
        replace(ours, name="ours_floor1_high", floor=1, floor_keeps="high_k",
                note="ours, the floor keeps a prompt's highest-k state on ties"),
        replace(ours, name="ours_hl6h", half_life_s=6 * 3600.0,
                note="ours with a 6 h half-life of the use counts (the default before session 8)"),
        replace(ours, name="ours_hl10m", half_life_s=600.0, note="ours with a 10 min half-life of the use counts"),
        replace(ours, name="ours_int8", codec="int8-zstd",
                note="ours with int8-zstd states (0.23 x fp32; the same resumed images as fp16 on the bundled model)"),
    ]  # fmt: skip


class _GivenEmbeddings:
    """Embedder stand-in: every request carries its embedding, so ``embed`` is never called."""

    def __init__(self, space: str, dim: int) -> None:
        self.space = space
        self.dim = dim

    def embed(self, texts: list[str]) -> np.ndarray:  # pragma: no cover - a bug if reached
        raise RuntimeError("trace replay requests must carry embeddings")


# ---------------------------------------------------------------------- replay
def _k_ref(policy: Any, k: int, num_steps: int) -> int:
    """The table's K (at its reference N) whose scaled step is ``k`` for a ``num_steps`` run (largest on ties);
    ``k`` itself when no rule scales to it."""
    refs = [r.k for r in policy.rules if policy.scale(r.k, num_steps) == k]
    return max(refs) if refs else k


def _k_order(k: str) -> tuple[bool, int]:
    return (k == "exact", int(k) if k != "exact" else 0)


def _pct(xs: Sequence[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def replay(
    url: str,
    reqs: Sequence[TraceRequest],
    emb: np.ndarray,
    spec: PolicySpec,
    budget_bytes: int,
    sizes: SizeModel,
    *,
    embed_space: str = "minilm-l6-v2",
    step_cost_s: float = 0.1,
    slack: float = 0.02,
    refit_every: int = 500,
    progress: Callable[[int, int], None] | None = None,
    outcomes: list[tuple[str, int]] | None = None,
    snapshot_every: int = 0,
    on_snapshot: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Replay ``reqs`` (in order) through a fresh cache on the migrated, empty database ``url``.

    Per request: ``lookup`` (exact tier → gate in shadow mode → pgvector → K), account the skipped steps,
    ``record_virtual`` (rows with the codec's byte sizes), and — when the stored bytes exceed ``budget_bytes``
    — ``evict_to_budget`` down to ``(1 − slack) × budget_bytes`` with the spec's policy, so every lookup sees
    at most ``budget_bytes`` stored. The gate is refitted every ``refit_every`` requests (the beat's job).

    Returns the policy's row (hit rates by tier, K histogram, steps and GPU seconds saved, bytes, gate counts,
    timings, per-channel steps saved). ``outcomes``, if given, receives ``(tier, k)`` per request.
    ``on_snapshot``, if given, receives the same row for the first ``snapshot_every`` × j requests as the replay
    passes them: a prefix of the ordered trace is itself a valid replay, so a run stopped part-way still leaves
    comparable rows (every policy at the same prefix).

    Raises:
        ValueError: ``emb`` does not have one row per request, or ``budget_bytes`` < 0, or ``slack`` ∉ [0, 0.5].
    """
    from psycopg_pool import ConnectionPool

    from nirvana.cache.core import ApproximateCache, CacheRequest, Namespace
    from nirvana.cache.gate import NoveltyGate
    from nirvana.cache.index import configure_connection
    from nirvana.cache.store import LatentStore

    if len(emb) != len(reqs):
        raise ValueError(f"emb must have one row per request ({len(reqs)}), got {len(emb)}")
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
    if not 0.0 <= slack <= 0.5:
        raise ValueError(f"slack must be in [0, 0.5], got {slack}")
    now = [0.0]
    pool = ConnectionPool(
        url, min_size=1, max_size=2, kwargs={"autocommit": True}, configure=configure_connection, open=True
    )
    cache = ApproximateCache(
        pool,
        LatentStore(f"memory://nirvana-trace-{uuid.uuid4().hex[:8]}"),
        _GivenEmbeddings(embed_space, int(emb.shape[1])),
        spec.k_policy(),
        eviction=spec.eviction_policy(),
        gate=NoveltyGate() if spec.gate else None,
        budget_bytes=budget_bytes,
        codec=spec.codec,
        exact_tier=spec.exact_tier,
        gate_enforce=False,
        clock=lambda: now[0],
    )
    low_water = int(budget_bytes * (1.0 - slack))
    tiers: Counter[str] = Counter()
    k_hist: Counter[str] = Counter()
    by_ch: dict[str, list[float]] = {}  # channel -> [requests, steps requested, steps skipped, hits]
    steps_req = steps_skip = 0
    gpu_req = gpu_skip = 0.0
    gate_decided = gate_novel = hits_lost = steps_lost = 0
    cur = peak = peak_pre = 0
    evictions = 0
    lookup_ms: list[float] = []
    record_ms: list[float] = []
    evict_s = refit_s = 0.0

    def build_row(done: int, stats: dict[str, Any], wall: float, cpu: float) -> dict[str, Any]:
        """The policy's row after the first ``done`` requests (the final row, or a prefix snapshot)."""
        n = max(done, 1)
        hits = tiers["exact"] + tiers["approximate"]
        row: dict[str, Any] = {
            "requests": done,
            "hit_rate": round(hits / n, 4),
            "exact_rate": round(tiers["exact"] / n, 4),
            "approximate_rate": round(tiers["approximate"] / n, 4),
            "steps_requested": steps_req,
            "steps_skipped": steps_skip,
            "steps_saved_fraction": round(steps_skip / max(steps_req, 1), 4),
            "gpu_seconds_requested": round(gpu_req, 1),
            "gpu_seconds_saved_fraction": round(gpu_skip / max(gpu_req, 1e-9), 4),
            "k_hist": dict(sorted(k_hist.items(), key=lambda kv: _k_order(kv[0]))),
            "bytes": int(stats["bytes"]),
            "state_bytes": int(stats["state_bytes"]),
            "image_bytes": int(stats["image_bytes"]),
            "peak_bytes": int(peak),
            "peak_bytes_before_eviction": int(peak_pre),
            "budget_bytes": int(budget_bytes) if spec.bounded else None,
            "prompts_stored": int(stats["prompts"]),
            "states_stored": int(stats["states"]),
            "evictions": evictions,
            "gate": None,
            "timing": {
                "wall_s": round(wall, 2),
                "ms_per_request": round(1000 * wall / n, 3),
                "client_cpu_ms_per_request": round(1000 * cpu / n, 3),
                "lookup_ms_p50": round(_pct(lookup_ms, 0.5), 3),
                "lookup_ms_p99": round(_pct(lookup_ms, 0.99), 3),
                "record_ms_p50": round(_pct(record_ms, 0.5), 3),
                "record_ms_p99": round(_pct(record_ms, 0.99), 3),
                "evict_s": round(evict_s, 2),
                "gate_refit_s": round(refit_s, 2),
            },
            "by_channel": {
                c: {
                    "requests": int(v[0]),
                    "hit_rate": round(v[3] / max(v[0], 1), 4),
                    "steps_saved_fraction": round(v[2] / max(v[1], 1), 4),
                }
                for c, v in sorted(by_ch.items())
            },
        }
        if spec.gate:
            row["gate"] = {
                "decisions": gate_decided,
                "novel": gate_novel,
                "lookups_avoided_fraction": round(gate_novel / n, 4),
                "hits_lost": hits_lost,
                "hits_lost_fraction_of_hits": round(hits_lost / max(tiers["approximate"], 1), 4),
                "steps_lost": steps_lost,
                "steps_saved_fraction_if_enforced": round((steps_skip - steps_lost) / max(steps_req, 1), 4),
            }
        return row

    t_start = time.perf_counter()
    cpu_start = time.process_time()
    try:
        for i, r in enumerate(reqs):
            now[0] = r.ts
            seed = r.seed if r.seed is not None else 2**62 + i  # a bot-drawn seed never repeats
            cr = CacheRequest(r.prompt, "", seed, r.steps, r.cfg, r.width, r.height, Namespace(r.model_key, r.channel),
                              embedding=emb[i])  # fmt: skip
            t0 = time.perf_counter()
            res = cache.lookup(cr)
            t1 = time.perf_counter()
            skipped = r.steps if res.tier == "exact" else (res.k if res.tier == "approximate" else 0)
            tiers[res.tier] += 1
            if outcomes is not None:
                outcomes.append((res.tier, res.k))
            if res.tier == "exact":
                k_hist["exact"] += 1
            elif res.tier == "approximate":
                k_hist[str(_k_ref(cache.policy, res.k, r.steps))] += 1
            steps_req += r.steps
            steps_skip += skipped
            cost = step_cost_s * r.pixel_ratio
            gpu_req += r.steps * cost
            gpu_skip += skipped * cost
            ch = by_ch.setdefault(r.channel, [0, 0, 0, 0])
            ch[0] += 1
            ch[1] += r.steps
            ch[2] += skipped
            ch[3] += res.tier != "miss"
            if res.gate_novel is not None:
                gate_decided += 1
                if res.gate_novel:
                    gate_novel += 1
                    if res.tier == "approximate":
                        hits_lost += 1
                        steps_lost += skipped
            bps = sizes.state_bytes(spec.codec, r)
            img = sizes.image_bytes(r) if spec.exact_tier else 0
            out = cache.record_virtual(
                f"r{i}", cr, res, bytes_per_state=bps, steps_k=None if spec.approximate else [], image_bytes=img
            )
            t2 = time.perf_counter()
            lookup_ms.append((t1 - t0) * 1000)
            record_ms.append((t2 - t1) * 1000)
            cur += int(out["states"]) * bps + (img if out["prompt_id"] is not None else 0)
            peak_pre = max(peak_pre, cur)
            if spec.bounded and cur > budget_bytes:
                t3 = time.perf_counter()
                ev = cache.index.evict_to_budget(cache.eviction, low_water, now[0])
                evict_s += time.perf_counter() - t3
                cur -= int(ev["bytes"])
                evictions += 1
            peak = max(peak, cur)
            if spec.gate and refit_every and (i + 1) % refit_every == 0:
                t3 = time.perf_counter()
                cache.refit_gate()
                refit_s += time.perf_counter() - t3
            if progress is not None and ((i + 1) % 1000 == 0 or i + 1 == len(reqs)):
                progress(i + 1, len(reqs))
            if on_snapshot is not None and snapshot_every and (i + 1) % snapshot_every == 0 and i + 1 < len(reqs):
                snap = build_row(i + 1, cache.stats(), time.perf_counter() - t_start, time.process_time() - cpu_start)
                on_snapshot(snap)
        wall = time.perf_counter() - t_start
        cpu = time.process_time() - cpu_start
        stats = cache.stats()
    finally:
        cache.close()
        pool.close()
    if stats["bytes"] != cur:
        log.warning("%s: tracked bytes %d != stored bytes %d", spec.name, cur, stats["bytes"])
    return build_row(len(reqs), stats, wall, cpu)


# ---------------------------------------------------------------------- the benchmark
DEFAULT_SWEEP_BUDGETS = (1000, 3000, 10000, 30000, 100000)


class _Server:
    """A PostgreSQL server for the run: ``database_url``'s, or an embedded one started in a temporary dir."""

    def __init__(self, database_url: str | None) -> None:
        self._embedded: Any = None
        self._tmp: str | None = None
        if database_url:
            self.url = database_url
        else:
            import tempfile

            from nirvana.services.postgres import EmbeddedPostgres

            self._tmp = tempfile.mkdtemp(prefix="nirvana-trace-pg-")
            self._embedded = EmbeddedPostgres(Path(self._tmp) / "data", fast=True, delete_on_stop=True)
            self.url = self._embedded.start()

    def fresh(self) -> str:
        """A new migrated database's URL (drop it with :meth:`drop`)."""
        import psycopg
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        from nirvana.cache.migrate import migrate

        name = f"nirvana_trace_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = make_conninfo("", **{**conninfo_to_dict(self.url), "dbname": name})
        migrate(url)
        return url

    def drop(self, url: str) -> None:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        name = conninfo_to_dict(url)["dbname"]
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        if self._embedded is not None:
            self._embedded.stop()
        if self._tmp is not None:
            import shutil

            shutil.rmtree(self._tmp, ignore_errors=True)


# Data shared with forked workers (set before the pool forks; read-only afterwards).
_SHARED: dict[str, Any] = {}


def _run_task(task: tuple[str, str, tuple[int, ...]]) -> list[tuple[str, str, int, dict[str, Any]]]:
    """Worker: (dataset, spec name, budgets) → a replay row per budget, each on a fresh database.

    Budgets run in ascending order; once a replay evicted nothing, every larger budget would replay the same way
    (the budget only matters through eviction; see :func:`replay_fingerprint` on determinism), so those rows are
    copies of it marked ``same_as_budget_bytes`` instead of being run again. Each row goes to the checkpoint as
    soon as it exists, so a task stopped part-way keeps the budgets it finished.
    """
    dataset, name, budgets = task
    d = _SHARED
    reqs, emb = d["data"][dataset]
    spec = d["specs"][name]
    server: _Server = d["server"]
    out: list[tuple[str, str, int, dict[str, Any]]] = []
    done: dict[str, Any] | None = None

    def finished(budget: int, row: dict[str, Any]) -> None:
        if d["checkpoint"] is not None:
            _append_checkpoint(d["checkpoint"], dataset, name, budget, d["fps"][(dataset, name)], row)
        out.append((dataset, name, budget, row))

    for budget in sorted(budgets):
        if done is not None:
            finished(budget, {**done, "same_as_budget_bytes": done["budget_bytes"]})
            continue
        label = f"{name}@{budget // max(d['sizes'].prompt_bytes_fp32_512(), 1)}p/{dataset}"

        def prog(i: int, n: int, label: str = label) -> None:
            if d["verbose"]:
                log.info("%s: %d/%d", label, i, n)

        def snap(row: dict[str, Any], budget: int = budget) -> None:
            _append_checkpoint(d["checkpoint"], dataset, name, budget, d["fps"][(dataset, name)], row, partial=True)

        url = server.fresh()
        try:
            row = replay(url, reqs, emb, spec, budget, d["sizes"], embed_space=d["space"],
                         step_cost_s=d["step_cost"], progress=prog, snapshot_every=d["snapshot_every"],
                         on_snapshot=snap if d["checkpoint"] is not None else None)  # fmt: skip
        finally:
            server.drop(url)
        if d["verbose"]:
            log.info("done %s: steps saved %.4f in %.0f s", label, row["steps_saved_fraction"], row["timing"]["wall_s"])
        finished(budget, row)
        if row["evictions"] == 0 or not spec.bounded:
            done = row
    return out


def run_trace_bench(
    files: Sequence[Path | str],
    *,
    limit: int | None = None,
    budget_prompts: int = 10000,
    policies: Sequence[str] | None = None,
    sweep_budgets: Sequence[int] = DEFAULT_SWEEP_BUDGETS,
    sweep_limit: int | None = None,
    sweep_policies: Sequence[str] | None = None,
    database_url: str | None = None,
    cache_dir: Path | str | None = None,
    embedder: Any = None,
    image_bytes_per_pixel: float = DEFAULT_IMAGE_BYTES_PER_PIXEL,
    step_cost_s: float | None = None,
    calibrated: Path | None = None,
    image_budget_fraction: float | None = DEFAULT_IMAGE_BUDGET_FRACTION,
    jobs: int = 1,
    verbose: bool = True,
    checkpoint: Path | None = None,
    resume: bool = False,
    snapshot_every: int = 20000,
) -> dict[str, Any]:
    """Replay the trace for every policy at ``budget_prompts`` and sweep the budgets; returns a JSON-able dict.

    ``limit`` caps requests per trace file for the headline run, ``sweep_limit`` (default: ``limit``) for the
    sweep; an empty ``sweep_budgets`` skips the sweep. ``jobs`` > 1 replays policies in parallel (forked
    processes, one database each, same server). ``checkpoint``, if given, gets one JSON line per finished replay,
    stamped with a fingerprint of everything the replay's result depends on (:func:`replay_fingerprint`);
    ``resume`` takes the rows of ``checkpoint`` whose fingerprint matches instead of replaying them again (a
    full-trace run takes hours: an interrupted one continues where it stopped). Replays also write a prefix row
    (``"partial": true``) every ``snapshot_every`` requests; those are never resumed from, only read.

    Raises:
        ValueError: bad sizes, budgets or policy names.
    """
    if budget_prompts < 1:
        raise ValueError(f"budget_prompts must be >= 1, got {budget_prompts}")
    if any(b < 1 for b in sweep_budgets):
        raise ValueError("sweep budgets must be >= 1 prompt")
    if image_bytes_per_pixel < 0:
        raise ValueError("image_bytes_per_pixel must be >= 0")
    if image_budget_fraction is not None and not 0.0 <= image_budget_fraction <= 1.0:
        raise ValueError(f"image_budget_fraction must be in [0, 1], got {image_budget_fraction}")
    if not 1 <= jobs <= 16:
        raise ValueError(f"jobs must be in 1..16, got {jobs}")
    if snapshot_every < 0:
        raise ValueError(f"snapshot_every must be >= 0, got {snapshot_every}")
    defaults = default_specs(calibrated, image_budget_fraction)
    all_specs = {s.name: s for s in [*defaults, *ablation_specs(image_budget_fraction)]}
    notes: list[str] = []
    wanted = list(policies) if policies else [s.name for s in defaults]
    if "ours_calibrated" in wanted and "ours_calibrated" not in all_specs:
        notes.append(f"ours_calibrated skipped: no calibrated table at {calibrated or calibrated_table_path()}")
        wanted.remove("ours_calibrated")
    elif not policies and "ours_calibrated" not in all_specs:
        notes.append(f"ours_calibrated skipped: no calibrated table at {calibrated or calibrated_table_path()}")
    unknown = [p for p in wanted if p not in all_specs]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {sorted(all_specs)}")
    sweep_wanted = [p for p in (sweep_policies or wanted) if p in all_specs]
    t_all = time.perf_counter()

    # Trace, clock, embeddings.
    reqs, chan_info = load_replay(files, limit)
    sweep_lim = sweep_limit if sweep_limit is not None else limit
    do_sweep = bool(sweep_budgets) and bool(sweep_wanted)
    sweep_reqs = reqs
    if do_sweep and sweep_lim != limit:
        sweep_reqs, _ = load_replay(files, sweep_lim)
    if not reqs:
        raise ValueError("the trace files hold no usable requests")
    if embedder is None:
        from nirvana.cache.embedder import MiniLMEmbedder

        embedder = MiniLMEmbedder(batch_size=128)
    texts = [r.prompt for r in reqs] + ([r.prompt for r in sweep_reqs] if sweep_reqs is not reqs else [])

    def eprog(i: int, n: int) -> None:
        if verbose:
            log.info("embedded %d/%d distinct prompts", i, n)

    emb_all, emb_info = embed_with_cache(texts, embedder, cache_dir, progress=eprog)
    emb = emb_all[: len(reqs)]
    sweep_emb = emb if sweep_reqs is reqs else emb_all[len(reqs) :]
    if emb_info["embed_ms_per_prompt"] is None or emb_info["distinct_embedded"] < 256:
        sample = list(dict.fromkeys(r.prompt for r in reqs))[:256]
        embedder.embed(sample[:8])  # load the model outside the timing
        t0, c0 = time.perf_counter(), time.process_time()
        embedder.embed(sample)
        emb_info["embed_ms_per_prompt_sample"] = round(1000 * (time.perf_counter() - t0) / max(len(sample), 1), 3)
        emb_info["embed_cpu_ms_per_prompt_sample"] = round(1000 * (time.process_time() - c0) / max(len(sample), 1), 3)
    embed_ms = emb_info.get("embed_ms_per_prompt_sample") or emb_info["embed_ms_per_prompt"]
    embed_cpu_ms = emb_info.get("embed_cpu_ms_per_prompt_sample") or emb_info["embed_cpu_ms_per_prompt"]

    # Size and cost models.
    codec_sizes = measure_state_bytes()
    sizes = SizeModel(
        {c: (FP32_BYTES_PER_LATENT_PIXEL if c == "fp32" else v["bytes_per_latent_pixel"]) for c, v in
         codec_sizes.items()},
        image_bytes_per_pixel,
    )  # fmt: skip
    measured_cost = step_cost_512(reqs)
    cost = step_cost_s if step_cost_s is not None else (measured_cost or 0.1)
    cost_source = "given" if step_cost_s is not None else ("trace gen_seconds" if measured_cost else "default 0.1 s")
    unit = sizes.prompt_bytes_fp32_512()
    budget = budget_prompts * unit

    need: dict[tuple[str, str], set[int]] = {("head", p): {budget} for p in wanted}
    sweep_ds = "head" if sweep_reqs is reqs else "sweep"
    if do_sweep:
        for p in sweep_wanted:
            bs = {b * unit for b in sweep_budgets} if all_specs[p].bounded else {budget}
            need.setdefault((sweep_ds, p), set()).update(bs)
    data = {"head": (reqs, emb), "sweep": (sweep_reqs, sweep_emb)}
    common = {"sizes": sizes.bytes_per_latent_pixel, "image_bytes_per_pixel": image_bytes_per_pixel,
              "step_cost_s": cost, "space": embedder.space}  # fmt: skip
    digests = {ds: requests_digest(data[ds][0]) for ds in {ds for ds, _ in need}}
    fps = {(ds, p): replay_fingerprint(digests[ds], all_specs[p], common) for (ds, p) in need}
    results: dict[tuple[str, str, int], dict[str, Any]] = {}
    if resume and checkpoint is not None:
        done = _load_checkpoint(checkpoint, fps)
        for (ds, p, b), row in done.items():
            if b in need[(ds, p)]:
                results[(ds, p, b)] = row
                need[(ds, p)].discard(b)
        if verbose:
            log.info("resumed %d replays from %s", len(results), checkpoint)
    todo = [(ds, p, tuple(sorted(bs))) for (ds, p), bs in need.items() if bs]
    # The headline first (what the JSON's "policies" need), then the sweep, longest tasks first.
    todo.sort(key=lambda t: (t[0] != "head", -len(reqs if t[0] == "head" else sweep_reqs) * len(t[2])))
    server = _Server(database_url)
    _SHARED.clear()
    _SHARED.update(
        data=data,
        specs=all_specs,
        server=server,
        sizes=sizes,
        space=embedder.space,
        step_cost=cost,
        verbose=verbose,
        checkpoint=checkpoint,
        fps=fps,
        snapshot_every=snapshot_every,
    )
    try:
        if jobs > 1 and len(todo) > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(min(jobs, len(todo))) as pool:
                for rows in pool.imap_unordered(_run_task, todo):
                    results.update({(ds, name, b): row for ds, name, b, row in rows})
        else:
            for t in todo:
                results.update({(ds, name, b): row for ds, name, b, row in _run_task(t)})
    finally:
        _SHARED.clear()
        server.close()

    pol = {name: results[("head", name, budget)] for name in wanted}
    for name, row in pol.items():
        row["note"] = all_specs[name].note
        row["codec"] = all_specs[name].codec
        row["table"] = Path(all_specs[name].table).name if all_specs[name].table != "paper" else "paper"
    router: dict[str, Any] = {"embed_ms_per_prompt": embed_ms, "embed_cpu_ms_per_prompt": embed_cpu_ms}
    src = pol.get("ours") or next(iter(pol.values()))
    cache_ms = src["timing"]["ms_per_request"]
    router["cache_ms_per_request"] = cache_ms
    router["cache_client_cpu_ms_per_request"] = src["timing"].get("client_cpu_ms_per_request")
    router["measured_on"] = "ours" if "ours" in pol else next(iter(pol))
    router_pps = 1000.0 / (cache_ms + (embed_ms or 0.0)) if cache_ms + (embed_ms or 0.0) > 0 else None
    sweep_rows = []
    for (d, name, b), row in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if not do_sweep or d != sweep_ds or name not in sweep_wanted:
            continue
        extra = {"same_as_budget_prompts": row["same_as_budget_bytes"] // unit} if "same_as_budget_bytes" in row else {}
        if not all_specs[name].bounded:
            sweep_rows.append({"policy": name, "budget_prompts": None, "budget_bytes": None, **_brief(row)})
        elif b in [x * unit for x in sweep_budgets]:
            sweep_rows.append({"policy": name, "budget_prompts": b // unit, "budget_bytes": b, **_brief(row), **extra})
    return {
        "bench": "trace",
        "requests": len(reqs),
        "requests_per_channel_limit": limit,
        "channels": chan_info,
        "replay_model": (
            "one cache (one database, one global byte budget) for all channels; tenant = channel (no cross-channel "
            "reuse); model_key = model/WxH/sampler; channel files keep their order and are merged by the "
            "interpolated clock; one trajectory per request (n_images ignored)"
        ),
        "budget_prompts": budget_prompts,
        "budget_bytes": budget,
        "prompt_unit_bytes": unit,
        "codec_bytes": codec_sizes,
        "image_bytes_per_pixel": image_bytes_per_pixel,
        "image_budget_fraction": image_budget_fraction,
        "image_bytes_512": sizes.image_bytes(TraceRequest(0, "", "", "x", 0, 7.0, 50, 512, 512, 1, "", None)),
        "step_cost_s_512": round(cost, 4),
        "step_cost_source": cost_source,
        "policies": pol,
        "router_prompts_per_s": round(router_pps, 1) if router_pps else None,
        "router": router,
        "embedding": emb_info,
        "sweep": {
            "requests": len(sweep_reqs) if do_sweep else 0,
            "requests_per_channel_limit": sweep_lim,
            "budgets_prompts": list(sweep_budgets) if do_sweep else [],
            "rows": sweep_rows,
        },
        "progress": _progress(checkpoint, fps, budget, pol),
        "notes": notes,
        "wall_s": round(time.perf_counter() - t_all, 1),
    }


def requests_digest(reqs: Sequence[TraceRequest]) -> str:
    """A hash of the requests in order, with their clock (computed once per dataset, not per policy)."""
    h = hashlib.blake2b(digest_size=16)
    for r in reqs:
        h.update(repr(r).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


# PolicySpec fields added after checkpoints were written, with the value that reproduces the behaviour before
# them: at that value a field is left out of the fingerprint, so the older checkpoints stay valid.
_FIELDS_ADDED_LATER: dict[str, Any] = {"half_life_s": None}


def replay_fingerprint(reqs_digest: str, spec: PolicySpec, common: dict[str, Any]) -> str:
    """A hash of everything one replay's row depends on except the budget: the requests (``reqs_digest``, from
    :func:`requests_digest`), the policy's settings (and its K table's content), the size and cost models and the
    embedding space.

    Two runs with equal fingerprints replay the same way at equal budgets, which is what makes a checkpointed row
    safe to reuse — up to one source of noise: pgvector draws each HNSW node's level at random (a per-backend
    generator no SQL can seed), so the graph, and rarely a nearest neighbour, differs between runs. Two replays of
    the trace's first 60,000 requests differed by ≤ 0.0001 in steps saved (e.g. 0.1861 vs 0.1862).
    """
    import json

    h = hashlib.blake2b(digest_size=16)
    settings = {k: v for k, v in asdict(spec).items() if k not in _FIELDS_ADDED_LATER or _FIELDS_ADDED_LATER[k] != v}
    h.update(json.dumps({"spec": settings, "requests": reqs_digest, **common}, sort_keys=True,
                        default=str).encode())  # fmt: skip
    if spec.table != "paper":
        h.update(Path(spec.table).read_bytes())
    return h.hexdigest()


def _checkpoint_records(path: Path, fps: dict[tuple[str, str], str]) -> list[dict[str, Any]]:
    """The records of a checkpoint file whose fingerprint matches this run's (others, and unreadable lines,
    skipped)."""
    import json

    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    with open(path) as fh:
        for line in fh:
            try:
                rec = json.loads(line)
                ours = fps.get((rec["dataset"], rec["policy"])) == rec.get("fingerprint")
                if ours and int(rec["budget_bytes"]) >= 0 and "requests" in rec["row"]:
                    out.append(rec)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by an interrupted write
    return out


def _load_checkpoint(path: Path, fps: dict[tuple[str, str], str]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Finished replays of a checkpoint file whose fingerprint matches this run's (prefix snapshots skipped)."""
    return {
        (rec["dataset"], rec["policy"], int(rec["budget_bytes"])): rec["row"]
        for rec in _checkpoint_records(path, fps)
        if not rec.get("partial")
    }


def _progress(
    path: Path | None, fps: dict[tuple[str, str], str], budget: int, final: dict[str, dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """Per headline policy, its steps saved and hit rate after each prefix snapshot and at the end: how the
    comparison develops along the trace (snapshots of an interrupted earlier run with the same fingerprint count;
    one point per prefix)."""
    pts: dict[str, dict[int, dict[str, Any]]] = {n: {} for n in final}
    recs = _checkpoint_records(path, fps) if path is not None else []
    for rec in recs:
        if rec["dataset"] == "head" and rec["policy"] in pts and int(rec["budget_bytes"]) == budget:
            pts[rec["policy"]][int(rec["row"]["requests"])] = rec["row"]
    for name, row in final.items():
        pts[name][int(row["requests"])] = row
    keys = ("requests", "hit_rate", "steps_saved_fraction")
    return {n: [{k: r[k] for k in keys} for _, r in sorted(p.items())] for n, p in pts.items()}


def _append_checkpoint(
    path: Path, ds: str, name: str, budget: int, fp: str, row: dict[str, Any], partial: bool = False
) -> None:
    """One JSON line, written with a single append (workers and the parent share the file)."""
    import json

    rec = {"dataset": ds, "policy": name, "budget_bytes": budget, "fingerprint": fp, "row": row}
    if partial:
        rec["partial"] = True
    with open(path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")


def _brief(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("requests", "hit_rate", "steps_saved_fraction", "gpu_seconds_saved_fraction", "bytes",
                                "prompts_stored")}  # fmt: skip


# ---------------------------------------------------------------------- report
def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def _line_plot(
    path: Path, draw: Callable[[Any], None], xlabel: str, ylabel: str, title: str, *, xlog: bool = False
) -> Path:
    """One figure of the report: ``draw(ax)`` adds the lines, the rest (labels, grid, legend, file) is shared."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw(ax)
    if xlog:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def trace_plot(res: dict[str, Any], path: Path) -> Path | None:
    """Steps saved vs budget (prompts), one line per policy; the unbounded ceiling as a horizontal line."""
    rows = res["sweep"]["rows"]
    if not rows:
        return None

    def draw(ax: Any) -> None:
        by: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if r["budget_prompts"] is None:
                ax.axhline(r["steps_saved_fraction"], ls="--", color="grey", label=f"{r['policy']} (ceiling)")
            else:
                by.setdefault(r["policy"], []).append((r["budget_prompts"], r["steps_saved_fraction"]))
        for name, pts in sorted(by.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)

    return _line_plot(path, draw, "budget (prompts' worth of five fp32 512² states)",
                      "steps saved (Σ skipped / Σ requested)",
                      f"dreambot trace replay, {res['sweep']['requests']:,} requests", xlog=True)  # fmt: skip


def progress_plot(res: dict[str, Any], path: Path) -> Path | None:
    """Steps saved after the first N requests vs N, one line per headline policy (None without snapshots)."""
    prog = {n: pts for n, pts in res.get("progress", {}).items() if len(pts) > 1}
    if not prog:
        return None

    def draw(ax: Any) -> None:
        for name, pts in sorted(prog.items(), key=lambda kv: -kv[1][-1]["steps_saved_fraction"]):
            ax.plot([p["requests"] for p in pts], [p["steps_saved_fraction"] for p in pts], marker="o", label=name)
        ax.set_ylim(bottom=0)  # ratios between policies read off the axis as drawn

    title = f"dreambot trace, budget {res['budget_prompts']:,} prompts: steps saved along the trace"
    return _line_plot(path, draw, "requests replayed (time-ordered trace)",
                      "steps saved so far (Σ skipped / Σ requested)", title)  # fmt: skip


def trace_markdown(res: dict[str, Any], plot: Path | None = None, progress: Path | None = None) -> str:
    """The markdown report of :func:`run_trace_bench`."""
    from nirvana.bench.report import md_table

    pol = res["policies"]
    lines = [
        f"# bench trace: {res['requests']:,} requests, budget {res['budget_prompts']:,} prompts "
        f"({_mib(res['budget_bytes'])} MiB)",
        "",
        f"Replay model: {res['replay_model']}.",
        f"Requests per channel limit: {res['requests_per_channel_limit'] or 'none (whole files)'}; "
        f"wall time {res['wall_s']} s.",
        f"Cost model: step cost {res['step_cost_s_512']} s at 512² ({res['step_cost_source']}), × pixels/512².",
        f"Sizes: fp32 state 64 KiB at 512²; fp16-zstd {res['codec_bytes']['fp16-zstd']['mean_bytes']:.0f} B "
        f"(ratio {res['codec_bytes']['fp16-zstd']['ratio_to_fp32']}, measured on SD-like latents); "
        f"PNG image {res['image_bytes_512']:,} B at 512² (assumed {res['image_bytes_per_pixel']} B/px).",
        "",
        "## Headline",
        "",
    ]
    rows = []
    for name, r in pol.items():
        rows.append([
            name, r["requests"], r["hit_rate"], r["exact_rate"], r["approximate_rate"], r["steps_saved_fraction"],
            r["gpu_seconds_saved_fraction"], _mib(r["bytes"]), _mib(r["peak_bytes"]), r["prompts_stored"],
            r["timing"]["ms_per_request"],
        ])  # fmt: skip
    lines.append(md_table(["policy", "requests", "hit rate", "exact", "approx", "steps saved", "GPU-s saved",
                           "MiB stored", "MiB peak", "prompts", "ms/req"], rows))  # fmt: skip
    lines += ["", "Policies:", ""]
    lines += [f"- `{n}`: {r.get('note', '')} (table: {r.get('table', 'paper')})" for n, r in pol.items()]
    ks = sorted({k for r in pol.values() for k in r["k_hist"]}, key=_k_order)
    lines += ["", "## Hits by K (the table's K at N = 50; share of each policy's hits)", ""]
    krows = []
    for n, r in pol.items():
        tot = max(sum(r["k_hist"].values()), 1)
        krows.append([n] + [round(r["k_hist"].get(k, 0) / tot, 3) for k in ks])
    lines.append(md_table(["policy"] + [f"K={k}" if k != "exact" else "exact" for k in ks], krows))
    gated = {n: r["gate"] for n, r in pol.items() if r.get("gate")}
    if gated:
        lines += ["", "## Novelty gate (shadow mode: the lookup still ran)", ""]
        lines.append(md_table(
            ["policy", "decisions", "novel (lookups avoided)", "share of requests", "hits lost", "share of approx hits",
             "steps saved if enforced"],
            [[n, g["decisions"], g["novel"], g["lookups_avoided_fraction"], g["hits_lost"],
              g["hits_lost_fraction_of_hits"], g["steps_saved_fraction_if_enforced"]] for n, g in gated.items()],
        ))  # fmt: skip
    r = res["router"]
    lines += [
        "",
        "## Router throughput",
        "",
        f"{res['router_prompts_per_s']} prompts/s = 1 / (embed {r['embed_ms_per_prompt']} ms/prompt (batched MiniLM) "
        f"+ cache path {r['cache_ms_per_request']} ms/request (lookup + record + amortised eviction and gate refits, "
        f"policy `{r['measured_on']}`)), one process, wall-clock on a shared 2-core machine (this run was niced "
        f"below other work, so these are pessimistic). CPU time: embedding {r.get('embed_cpu_ms_per_prompt')} ms per "
        f"prompt, cache client (Python) {r.get('cache_client_cpu_ms_per_request')} ms per request, PostgreSQL's "
        "share not included.",
    ]
    chans = sorted({c for r in pol.values() for c in r["by_channel"]})
    if chans:
        lines += ["", "## Steps saved by channel", ""]
        lines.append(md_table(["policy", *chans],
                              [[n] + [r["by_channel"].get(c, {}).get("steps_saved_fraction", "-") for c in chans]
                               for n, r in pol.items()]))  # fmt: skip
    prog = {n: pts for n, pts in res.get("progress", {}).items() if len(pts) > 1}
    if prog:
        ns = sorted({p["requests"] for pts in prog.values() for p in pts})
        lines += ["", "## Steps saved along the trace (after the first N requests; prefix snapshots)", ""]
        lines.append(md_table(["policy"] + [f"{n:,}" for n in ns],
                              [[name] + [{p["requests"]: p["steps_saved_fraction"] for p in pts}.get(n, "-")
                                         for n in ns] for name, pts in prog.items()]))  # fmt: skip
        if progress is not None:
            lines += ["", f"![steps saved along the trace]({Path(progress).name})"]
    sw = res["sweep"]
    if sw["rows"]:
        budgets = sw["budgets_prompts"]
        lines += [
            "",
            f"## Budget sweep ({sw['requests']:,} requests: "
            f"{sw['requests_per_channel_limit'] or 'all'} per channel; steps saved)",
            "",
        ]
        table: dict[str, dict[Any, float]] = {}
        for row in sw["rows"]:
            table.setdefault(row["policy"], {})[row["budget_prompts"]] = row["steps_saved_fraction"]
        heads = ["policy"] + [f"{b:,} prompts" for b in budgets] + ["unbounded"]
        lines.append(md_table(heads, [[n] + [v.get(b, "-") for b in budgets] + [v.get(None, "-")]
                                      for n, v in table.items()]))  # fmt: skip
        if plot is not None:
            lines += ["", f"![steps saved vs budget]({Path(plot).name})"]
    if res["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines)


def format_headline(res: dict[str, Any]) -> str:
    """A short console table of the headline run."""
    out = [f"{'policy':<16} {'hit':>6} {'exact':>6} {'steps saved':>11} {'MiB':>9} {'ms/req':>7}"]
    for n, r in res["policies"].items():
        out.append(f"{n:<16} {r['hit_rate']:>6.3f} {r['exact_rate']:>6.3f} {r['steps_saved_fraction']:>11.3f} "
                   f"{r['bytes'] / 2**20:>9.1f} {r['timing']['ms_per_request']:>7.2f}")  # fmt: skip
    out.append(f"router: {res['router_prompts_per_s']} prompts/s")
    return "\n".join(out)
