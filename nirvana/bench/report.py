"""Writing benchmark outputs: ``<name>.json``, ``<name>.md`` and PNG plots in one directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(out_dir: Path, name: str, data: dict[str, Any], markdown: str) -> dict[str, Path]:
    """Write ``data`` as JSON and ``markdown`` as a report; returns the paths. Creates ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath = out_dir / f"{name}.json"
    mpath = out_dir / f"{name}.md"
    jpath.write_text(json.dumps(data, indent=2, default=str) + "\n")
    mpath.write_text(markdown.rstrip() + "\n")
    return {"json": jpath, "markdown": mpath}


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; floats get 3 decimals."""

    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def plot_path(out_dir: Path, name: str) -> Path:
    """Path of a plot; matplotlib uses the non-interactive Agg backend (no display here)."""
    import matplotlib

    matplotlib.use("Agg")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return Path(out_dir) / f"{name}.png"
