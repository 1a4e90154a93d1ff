"""``nirvana bench engine``: wall time of resumed runs as ratios of a full run, measured in one process."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from nirvana.engine.engine import DiffusionEngine
from nirvana.engine.loader import load_model


def bench_engine(
    model: str = "tiny", steps: int = 50, ks: tuple[int, ...] = (10, 25), repeats: int = 5
) -> dict[str, Any]:
    """Median wall time of a full N-step run and of runs resumed at each K (same prompt, warm process).

    ``model="tiny"`` builds the random-weight tiny SD pipeline in a temporary directory.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if model == "tiny":
            from nirvana.engine.tiny import build_tiny_sd

            ref = str(build_tiny_sd(Path(tmp) / "tiny-sd"))
        else:
            ref = model
        engine = DiffusionEngine(load_model(ref, device="auto"))
        prompt = "a large red circle on a white background, in the center"
        src = engine.generate([prompt], seeds=[0], steps=steps, capture=list(ks))
        states = {s.step: s for s in src.states[0]}

        def timed(**kw: Any) -> float:
            t0 = time.perf_counter()
            engine.generate([prompt], seeds=[0], steps=steps, capture=[], **kw)
            return time.perf_counter() - t0

        full = statistics.median(timed() for _ in range(repeats))
        res: dict[str, Any] = {"model": model, "model_key": engine.model_key(), "steps": steps, "full_s": full}
        for k in ks:
            t = statistics.median(timed(start=states[k]) for _ in range(repeats))
            res[f"k{k}_s"] = t
            res[f"k{k}_ratio"] = t / full
            res[f"k{k}_ideal_ratio"] = (steps - k) / steps
        return res
