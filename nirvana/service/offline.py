"""Offline batch rendering through the service (``nirvana render FILE --out DIR``).

Input: text lines (one prompt each) or JSONL (``JobRequest`` objects). Each entry gets a stable id (a digest of
its request); its PNG is ``DIR/<line>-<id>.png`` and ``DIR/manifest.jsonl`` records finished entries, so a rerun
skips them. Entries without a seed get one derived from the id: a rerun renders the same image.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nirvana.service.client import Client

MANIFEST = "manifest.jsonl"


def read_entries(path: Path) -> list[dict[str, Any]]:
    """Requests from a text or JSONL file (blank lines and ``#`` comments skipped in text files)."""
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        s = line.strip()
        if not s or (s.startswith("#") and not s.startswith("{")):
            continue
        if s.startswith("{"):
            try:
                body = json.loads(s)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i + 1}: not JSON: {e.msg}") from e
            if not isinstance(body, dict) or "prompt" not in body:
                raise ValueError(f"{path}:{i + 1}: a JSON line needs a 'prompt'")
        else:
            body = {"prompt": s}
        out.append({"line": i + 1, "body": body})
    return out


def entry_id(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def load_manifest(out: Path) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    path = out / MANIFEST
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line after a crash
            if (out / rec["file"]).exists():
                done[rec["id"]] = rec
    return done


def render_file(
    client: Client,
    src: Path,
    out: Path,
    defaults: dict[str, Any] | None = None,
    chunk: int = 500,
    progress: Callable[[int, int], None] | None = None,
    poll_s: float = 0.5,
) -> dict[str, Any]:
    """Render every entry of ``src`` not yet in ``out``'s manifest, in batches of ``chunk``.

    Returns counts: total, skipped (already done), rendered, failed.
    """
    out.mkdir(parents=True, exist_ok=True)
    entries = read_entries(src)
    done = load_manifest(out)
    todo = []
    for e in entries:
        body = {**(defaults or {}), **e["body"]}
        eid = entry_id(body)
        if "seed" not in body:
            body["seed"] = int(eid[:8], 16) % 2**31
        e.update(id=eid, body=body, file=f"{e['line']:05d}-{eid}.png")
        if eid not in done:
            todo.append(e)
    stats = {"total": len(entries), "skipped": len(entries) - len(todo), "rendered": 0, "failed": 0}
    finished = stats["skipped"]
    if progress:
        progress(finished, len(entries))
    with (out / MANIFEST).open("a") as manifest:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            batch = client.submit_batch([e["body"] for e in part])
            saved: set[int] = set()
            while True:
                b = client.batch(batch["id"])
                for j in b["jobs"]:
                    idx = j["index"]
                    if idx in saved or j["status"] not in ("done", "failed", "cancelled"):
                        continue
                    saved.add(idx)
                    e = part[idx]
                    if j["status"] == "done":
                        (out / e["file"]).write_bytes(client.image(j["id"]))
                        rec = {"id": e["id"], "file": e["file"], "job": j["id"], "tier": j["tier"], **e["body"]}
                        manifest.write(json.dumps(rec) + "\n")
                        manifest.flush()
                        stats["rendered"] += 1
                    else:
                        stats["failed"] += 1
                    finished += 1
                    if progress:
                        progress(finished, len(entries))
                if b["done"] and len(saved) == len(part):
                    break
                time.sleep(poll_s)
    return stats
