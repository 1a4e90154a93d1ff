"""A realistic request stream in the bundled model's prompt world (the scene world of ``nirvana.scene.world``).

Users work in sessions: they start from a scene, then iteratively edit it (change one attribute, add or drop a
style modifier, rephrase), re-run the same prompt with a new seed, sometimes re-run it unchanged, and now and
then start over or pick a popular prompt that others used. Activity per user is heavy-tailed (Zipf).

Calibration target — the real Stable Diffusion Discord trace (``sd-discord-dreambot``, measured per channel in
trace order): 36–44% of requests have an earlier near-duplicate (token Jaccard ≥ 0.8, exact repeats included),
11–17% repeat an earlier prompt exactly, 13–27% of exact repeats reuse the seed too, ~98% of reuse is within the
same user, and the median gap to the source is a handful of requests. ``reuse_stats`` measures a stream the same
way; the defaults land in range (``tests/service/test_workload.py``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from nirvana.scene.evaluate import edit_scene
from nirvana.scene.world import _SYNONYMS as SYNONYMS  # the world's vocabulary (read-only)
from nirvana.scene.world import _TEMPLATES as TEMPLATES
from nirvana.scene.world import ATTRIBUTES, Scene, all_scenes

MODIFIERS: tuple[str, ...] = (
    "simple",
    "flat colors",
    "minimalist",
    "clean",
    "plain",
    "sharp",
    "centered composition",
    "high contrast",
)


@dataclass
class Request:
    """One request of the stream: who sends it and the job body."""

    index: int
    user: str
    tenant: str
    prompt: str
    seed: int
    action: str
    steps: int | None = None

    def body(self) -> dict[str, Any]:
        b: dict[str, Any] = {"prompt": self.prompt, "seed": self.seed}
        if self.steps is not None:
            b["steps"] = self.steps
        return b


@dataclass
class _Draft:
    """A prompt under edit: the scene plus the wording choices that stay fixed across edits."""

    scene: Scene
    template: int
    words: dict[str, int]
    modifiers: list[str] = field(default_factory=list)
    capital: bool = False

    def text(self) -> str:
        vals = {}
        for a in ATTRIBUTES:
            v = getattr(self.scene, a)
            syn = SYNONYMS.get(a, {}).get(v, (v,))
            vals[a] = syn[self.words.get(a, 0) % len(syn)]
        t = TEMPLATES[self.template].format(**vals)
        if self.modifiers:
            t = t + ", " + ", ".join(self.modifiers)
        return t[0].upper() + t[1:] if self.capital else t

    def copy(self) -> _Draft:
        return _Draft(self.scene, self.template, dict(self.words), list(self.modifiers), self.capital)


@dataclass(frozen=True)
class WorkloadConfig:
    """Probabilities of each user action (per request of an ongoing session) and population shape."""

    requests_per_user: float = 6.0
    zipf_s: float = 1.1
    tenants: tuple[str, ...] = ("studio-a", "studio-b")
    p_new_topic: float = 0.36
    p_popular: float = 0.08
    popular_pool: int = 12
    p_reseed: float = 0.08
    p_rerun: float = 0.04
    p_edit: float = 0.28
    p_modifier: float = 0.20
    p_rephrase: float = 0.12
    p_back: float = 0.03
    steps: int | None = None


def _new_draft(rng: random.Random, scenes: list[Scene]) -> _Draft:
    return _Draft(
        scene=rng.choice(scenes),
        template=rng.randrange(len(TEMPLATES)),
        words={a: rng.randrange(4) for a in ATTRIBUTES},
        capital=rng.random() < 0.2,
    )


def generate(n: int, seed: int = 0, cfg: WorkloadConfig | None = None) -> list[Request]:
    """``n`` requests in arrival order (sessions of several users interleaved)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    cfg = cfg or WorkloadConfig()
    rng = random.Random(seed)
    scenes = all_scenes()
    n_users = max(1, round(n / cfg.requests_per_user))
    users = [f"user-{i:04d}" for i in range(n_users)]
    weights = [1.0 / (i + 1) ** cfg.zipf_s for i in range(n_users)]
    tenant_of = {u: cfg.tenants[i % len(cfg.tenants)] for i, u in enumerate(users)}
    popular = [_new_draft(rng, scenes) for _ in range(cfg.popular_pool)]
    drafts: dict[str, _Draft] = {}
    history: dict[str, list[tuple[str, int]]] = {}
    out: list[Request] = []
    for i in range(n):
        u = rng.choices(users, weights)[0]
        d = drafts.get(u)
        seed_i = rng.randrange(2**31)
        r = rng.random()
        if d is None or r < cfg.p_new_topic:
            if rng.random() < cfg.p_popular:
                d, action = popular[min(int(rng.expovariate(0.35)), len(popular) - 1)].copy(), "popular"
            else:
                d, action = _new_draft(rng, scenes), "new"
        else:
            acts = ["reseed", "rerun", "edit", "modifier", "rephrase", "back"]
            probs = [cfg.p_reseed, cfg.p_rerun, cfg.p_edit, cfg.p_modifier, cfg.p_rephrase, cfg.p_back]
            action = rng.choices(acts, probs)[0]
            d = d.copy()
            if action == "rerun":
                seed_i = history[u][-1][1]
            elif action == "edit":
                d.scene = edit_scene(d.scene, 1, rng)
            elif action == "modifier":
                if d.modifiers and rng.random() < 0.35:
                    d.modifiers.pop(rng.randrange(len(d.modifiers)))
                else:
                    d.modifiers.append(rng.choice([m for m in MODIFIERS if m not in d.modifiers]))
            elif action == "rephrase":
                d.template = rng.randrange(len(TEMPLATES))
                d.words = {a: rng.randrange(4) for a in ATTRIBUTES}
            elif action == "back" and len(history[u]) >= 2:
                prev_prompt, _ = history[u][-2]
                out.append(Request(i, u, tenant_of[u], prev_prompt, seed_i, "back", cfg.steps))
                history[u].append((prev_prompt, seed_i))
                continue
        drafts[u] = d
        text = d.text()
        history.setdefault(u, []).append((text, seed_i))
        out.append(Request(i, u, tenant_of[u], text, seed_i, action, cfg.steps))
    return out


def _tokens(s: str) -> frozenset[str]:
    return frozenset(re.findall(r"\w+", s.lower()))


def reuse_stats(prompts: Iterable[tuple[str, int]] | Iterable[str], jaccard: float = 0.8) -> dict[str, float]:
    """The trace's reuse statistics of a stream (in order): fraction with an earlier near-duplicate (token
    Jaccard ≥ ``jaccard``, exact repeats included), fraction of exact prompt repeats, and the fraction of
    exact repeats that also repeat the seed. Accepts prompts or (prompt, seed) pairs."""
    items = [(p, None) if isinstance(p, str) else (p[0], p[1]) for p in prompts]
    seen: set[str] = set()
    seen_pairs: set[tuple[str, Any]] = set()
    toks: list[frozenset[str]] = []
    exact = near = same_seed = 0
    for p, s in items:
        t = _tokens(p)
        if p in seen:
            exact += 1
            same_seed += (p, s) in seen_pairs
        elif any(t and h and len(t & h) / len(t | h) >= jaccard for h in reversed(toks)):
            near += 1
        seen.add(p)
        seen_pairs.add((p, s))
        toks.append(t)
    n = max(len(items), 1)
    return {
        "requests": float(len(items)),
        "near_duplicate": (near + exact) / n,
        "exact_repeat": exact / n,
        "exact_same_seed": same_seed / max(exact, 1),
    }
