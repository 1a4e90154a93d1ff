"""The cache configurations ``bench trace`` compares.

Owns :class:`PolicySpec` (one configuration: eviction policy, codec, tiers, gate, budget, K table, ``ours``'s
knobs), the default set replayed by every run (:func:`default_specs`) and the ablations replayed only when named
(:func:`ablation_specs`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nirvana.cache.eviction import DEFAULT_HALF_LIFE_S, DEFAULT_IMAGE_BUDGET_FRACTION, DEFAULT_MIN_STATES_PER_PROMPT


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
