"""Checkpoints of ``bench trace``: what makes a finished replay safe to reuse, and the file that keeps them.

Owns the fingerprint of a replay's inputs (:func:`requests_digest`, :func:`replay_fingerprint`) and the checkpoint
file (JSON lines, one per finished replay or prefix snapshot): appending a row, loading the finished rows whose
fingerprint matches for ``--resume``, and the per-prefix points of the progress report (:func:`progress_points`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from types import MappingProxyType
from typing import Any

from nirvana.bench.trace.load import TraceRequest
from nirvana.bench.trace.policies import PolicySpec


def requests_digest(reqs: Sequence[TraceRequest]) -> str:
    """A hash of the requests in order, with their clock (computed once per dataset, not per policy)."""
    h = hashlib.blake2b(digest_size=16)
    for r in reqs:
        h.update(repr(r).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


# PolicySpec fields added after checkpoints were written, with the value that reproduces the behaviour before
# them: at that value a field is left out of the fingerprint, so the older checkpoints stay valid.
_FIELDS_ADDED_LATER: Mapping[str, Any] = MappingProxyType({"half_life_s": None})


def replay_fingerprint(reqs_digest: str, spec: PolicySpec, common: dict[str, Any]) -> str:
    """A hash of everything one replay's row depends on except the budget: the requests (``reqs_digest``, from
    :func:`requests_digest`), the policy's settings (and its K table's content), the size and cost models and the
    embedding space.

    Two runs with equal fingerprints replay the same way at equal budgets, which is what makes a checkpointed row
    safe to reuse — up to one source of noise: pgvector draws each HNSW node's level at random (a per-backend
    generator no SQL can seed), so the graph, and rarely a nearest neighbour, differs between runs. Two replays of
    the trace's first 60,000 requests differed by ≤ 0.0001 in steps saved (e.g. 0.1861 vs 0.1862).
    """
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


def load_checkpoint(path: Path, fps: dict[tuple[str, str], str]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Finished replays of a checkpoint file whose fingerprint matches this run's (prefix snapshots skipped)."""
    return {
        (rec["dataset"], rec["policy"], int(rec["budget_bytes"])): rec["row"]
        for rec in _checkpoint_records(path, fps)
        if not rec.get("partial")
    }


def progress_points(
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


def append_checkpoint(
    path: Path, ds: str, name: str, budget: int, fp: str, row: dict[str, Any], partial: bool = False
) -> None:
    """One JSON line, written with a single append (workers and the parent share the file)."""
    rec = {"dataset": ds, "policy": name, "budget_bytes": budget, "fingerprint": fp, "row": row}
    if partial:
        rec["partial"] = True
    with open(path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
