"""``nirvana bench quality``: what approximate caching costs in image quality, against what a user could pick instead.

On the bundled model and probe, for (cached prompt, new prompt) pairs drawn like a user refining prompts
(``nirvana.scene.evaluate.make_pairs``), every row is measured on the same pairs and seeds in one run:

* ``full``           — full generation of the new prompt (the reference; 0 steps saved);
* ``paper``          — resume from the cached prompt's state at the paper's K (largest stored k ≤ K);
* ``calibrated``     — the same with the calibrated table for this model;
* ``fewer_steps``    — no cache, N − K steps from scratch (matched compute to ``paper``);
* ``fewer_steps_calibrated`` — the same, matched to ``calibrated``'s K (is the borrowed state worth more than
  simply running fewer steps?);
* ``retrieval_only`` — return the cached prompt's final image whenever ``paper`` would hit (PINECONE/GPTCache);
* ``codec:<name>``   — ``paper`` with each stored-latent codec's decoded state.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nirvana.cache.policy import KPolicy
from nirvana.cache.store import decode_latent, encode_latent
from nirvana.engine.engine import DiffusionEngine
from nirvana.engine.state import CapturedState
from nirvana.scene.evaluate import TABLE_K, cosine_similarities, generate_batched, make_pairs
from nirvana.scene.metrics import ProbeMetrics
from nirvana.scene.world import Scene, render, to_array

CODECS: tuple[str, ...] = ("fp32", "fp16", "fp16-zstd", "int8-zstd")


def _largest_stored(k: int, stored: list[int]) -> int:
    return max([s for s in stored if s <= k], default=0)


def _through_codec(state: CapturedState, codec: str) -> tuple[CapturedState, int]:
    blob = encode_latent(state.latent.numpy(), codec)
    arr, _ = decode_latent(blob)
    s = CapturedState(
        latent=torch.from_numpy(np.array(arr, dtype=np.float32)),
        step=state.step,
        num_steps=state.num_steps,
        timestep=state.timestep,
        scheduler_family=state.scheduler_family,
        model_key=state.model_key,
        sigma=state.sigma,
    )
    return s, len(blob)


class QualityBench:
    """Holds the shared generations (sources, full targets) so every row is measured on the same pairs."""

    def __init__(
        self,
        engine: DiffusionEngine,
        metrics: ProbeMetrics,
        n_pairs: int,
        steps: int = 50,
        seed: int = 200,
        batch: int = 64,
    ) -> None:
        self.engine, self.metrics, self.steps, self.batch = engine, metrics, steps, batch
        self.pairs = make_pairs(n_pairs, seed=seed)
        sims = cosine_similarities([p.source for p in self.pairs], [p.target for p in self.pairs])
        for p, s in zip(self.pairs, sims, strict=True):
            p.similarity = float(s)
        self.seeds = [p.seed for p in self.pairs]
        self.targets = [p.target for p in self.pairs]
        self.scenes: list[Scene | None] = [p.target_scene for p in self.pairs]
        self.stored = [round(k * steps / 50) for k in TABLE_K]
        self.src_images, src_states = generate_batched(
            engine,
            [p.source for p in self.pairs],
            self.seeds,
            steps,
            capture=self.stored,
            batch=batch,
            desc="sources",
        )
        self.src_states = [{s.step: s for s in st} for st in src_states]
        self.full, _ = generate_batched(engine, self.targets, self.seeds, steps, batch=batch, desc="full")
        self.refs = torch.from_numpy(to_array([render(p.target_scene, seed=31 + i) for i, p in enumerate(self.pairs)]))

    def score(self, images: torch.Tensor, saved_steps: list[int]) -> dict[str, Any]:
        adh = self.metrics.adherence(images, self.scenes)
        return {
            "adherence": adh["adherence"],
            "probe_fid": self.metrics.fid(images, self.refs),
            "steps_saved_fraction": float(sum(saved_steps)) / (self.steps * len(self.pairs)),
            "hit_rate": float(np.mean([s > 0 for s in saved_steps])),
            "per_attribute": adh["per_attribute"],
        }

    def ks_for(self, policy: KPolicy) -> list[int]:
        return [_largest_stored(policy.k_for(p.similarity, self.steps), self.stored) for p in self.pairs]

    def resumed(self, ks: list[int], codec: str | None = None) -> tuple[torch.Tensor, int]:
        """Targets resumed at per-pair K (K=0 → the full image); returns images and total encoded bytes."""
        images = self.full.clone()
        groups: dict[int, list[int]] = defaultdict(list)
        for i, k in enumerate(ks):
            if k > 0:
                groups[k].append(i)
        total_bytes = 0
        for k, idx in sorted(groups.items()):
            starts = []
            for i in idx:
                st = self.src_states[i][k]
                if codec is not None:
                    st, nbytes = _through_codec(st, codec)
                    total_bytes += nbytes
                starts.append(st)
            imgs, _ = generate_batched(
                self.engine,
                [self.targets[i] for i in idx],
                [self.seeds[i] for i in idx],
                self.steps,
                start=starts,
                batch=self.batch,
            )
            images[idx] = imgs
        return images, total_bytes

    def fewer_steps(self, ks: list[int]) -> torch.Tensor:
        images = self.full.clone()
        groups: dict[int, list[int]] = defaultdict(list)
        for i, k in enumerate(ks):
            if k > 0:
                groups[self.steps - k].append(i)
        for n_steps, idx in sorted(groups.items()):
            imgs, _ = generate_batched(
                self.engine,
                [self.targets[i] for i in idx],
                [self.seeds[i] for i in idx],
                n_steps,
                batch=self.batch,
            )
            images[idx] = imgs
        return images

    def retrieval_only(self, ks: list[int]) -> torch.Tensor:
        images = self.full.clone()
        hit = [i for i, k in enumerate(ks) if k > 0]
        images[hit] = self.src_images[hit]
        return images


def run_quality(
    engine: DiffusionEngine,
    metrics: ProbeMetrics,
    calibrated: KPolicy | None,
    n_pairs: int = 300,
    steps: int = 50,
    codecs: tuple[str, ...] = CODECS,
) -> dict[str, Any]:
    """All rows of the quality benchmark on one set of pairs (see module docstring)."""
    t0 = time.perf_counter()
    qb = QualityBench(engine, metrics, n_pairs, steps)
    paper = KPolicy.paper()
    ks_paper = qb.ks_for(paper)
    res: dict[str, Any] = {"pairs": n_pairs, "steps": steps, "model_key": engine.model_key()}
    res["full"] = qb.score(qb.full, [0] * n_pairs)
    paper_imgs, _ = qb.resumed(ks_paper)
    res["paper"] = qb.score(paper_imgs, ks_paper)
    if calibrated is not None:
        ks_cal = qb.ks_for(calibrated)
        cal_imgs, _ = qb.resumed(ks_cal)
        res["calibrated"] = {**qb.score(cal_imgs, ks_cal), "table": calibrated.to_dict()}
    res["fewer_steps"] = qb.score(qb.fewer_steps(ks_paper), ks_paper)
    if calibrated is not None:
        res["fewer_steps_calibrated"] = qb.score(qb.fewer_steps(ks_cal), ks_cal)
    res["retrieval_only"] = qb.score(qb.retrieval_only(ks_paper), [steps if k > 0 else 0 for k in ks_paper])
    n_hits = max(1, sum(k > 0 for k in ks_paper))
    res["codecs"] = {}
    for codec in codecs:
        imgs, nbytes = qb.resumed(ks_paper, codec=codec)
        res["codecs"][codec] = {**qb.score(imgs, ks_paper), "bytes_per_state": nbytes / n_hits}
    res["seconds"] = time.perf_counter() - t0
    return res


ROWS = ("full", "paper", "calibrated", "fewer_steps", "fewer_steps_calibrated", "retrieval_only")


def quality_markdown(res: dict[str, Any], plot: Path | None) -> str:
    from nirvana.bench.report import md_table

    rows = []
    for name in ROWS:
        if name in res:
            r = res[name]
            rows.append([name, r["adherence"], r["probe_fid"], r["steps_saved_fraction"], r["hit_rate"]])
    for codec, r in res.get("codecs", {}).items():
        rows.append(
            [
                f"paper + {codec} ({r['bytes_per_state']:.0f} B/state)",
                r["adherence"],
                r["probe_fid"],
                r["steps_saved_fraction"],
                r["hit_rate"],
            ]
        )
    md = [
        f"# bench quality ({res['pairs']} pairs, N={res['steps']}, model {res['model_key']})",
        "",
        md_table(["row", "adherence", "probe_fid", "steps_saved_fraction", "hit_rate"], rows),
    ]
    if plot is not None:
        md += ["", f"![quality vs compute]({plot.name})"]
    return "\n".join(md)


def quality_plot(res: dict[str, Any], path: Path) -> None:
    """Adherence and probe-FID against steps saved, one labelled point per row (rows that coincide, such as
    ``paper`` and ``fewer_steps`` at the same compute, stay visible through distinct markers and labels)."""
    import matplotlib.pyplot as plt

    markers = dict(zip(ROWS, ("o", "s", "D", "^", "v", "X"), strict=True))
    dy = dict(zip(ROWS, (8, -14, 8, 8, -14, 8), strict=True))  # label above/below: paper sits on fewer_steps
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in (
        (axes[0], "adherence", "adherence (all attributes right) ↑"),
        (axes[1], "probe_fid", "probe-FID to rendered scenes ↓"),
    ):
        for name in (n for n in ROWS if n in res):
            r = res[name]
            x, y = r["steps_saved_fraction"], r[metric]
            ax.scatter(x, y, s=70, marker=markers[name], label=name, alpha=0.8)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, dy[name]), fontsize=7)
        ax.set_xlabel("steps saved (fraction of requested steps)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Quality vs compute saved ({res['pairs']} pairs, N = {res['steps']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
