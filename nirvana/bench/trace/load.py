"""Trace files → the ordered request stream that ``bench trace`` replays.

Owns the trace's request type (:class:`TraceRequest`, with the dreambot's defaults filled in), parsing of a CSV
row and of the bot's raw flags, reading a (gzip) channel file, the interpolated clock (the trace's sparse unix-time
anchors, ``krea_time_anchors.csv``) and the merge of the channels into one stream by that clock.
"""

from __future__ import annotations

import bisect
import csv
import gzip
import heapq
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nirvana.generation import MAX_GUIDANCE, MAX_SEED, MAX_SIDE, MAX_STEPS

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
    # The service's limits (nirvana.generation); sides under 8 px are trace junk the service would accept.
    if not 1 <= steps <= MAX_STEPS:
        return None, "steps_out_of_range"
    if not (8 <= width <= MAX_SIDE and 8 <= height <= MAX_SIDE):
        return None, "size_out_of_range"
    if not (math.isfinite(cfg) and 0 <= cfg <= MAX_GUIDANCE):
        return None, "cfg_out_of_range"
    if seed is not None and not 0 <= seed <= MAX_SEED:
        seed = seed % (MAX_SEED + 1)
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
