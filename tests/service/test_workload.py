"""The demo workload is calibrated to the real trace's reuse statistics (no data from the trace is used)."""

from __future__ import annotations

from nirvana.scene.world import parse_prompt
from nirvana.service.workload import generate, reuse_stats


def test_reuse_statistics_match_the_trace() -> None:
    for seed in (0, 1):
        reqs = generate(1500, seed)
        s = reuse_stats([(r.prompt, r.seed) for r in reqs])
        # sd-discord-dreambot, per channel: 36-44% near-duplicates (token Jaccard >= 0.8, exact included),
        # 11-17% exact repeats, 13-27% of exact repeats with the same seed.
        assert 0.36 <= s["near_duplicate"] <= 0.44, s
        assert 0.11 <= s["exact_repeat"] <= 0.17, s
        assert 0.13 <= s["exact_same_seed"] <= 0.27, s


def test_prompts_stay_in_the_model_world_and_users_are_sequential() -> None:
    reqs = generate(300, 3)
    assert [r.index for r in reqs] == list(range(300))
    assert all(parse_prompt(r.prompt) is not None for r in reqs)
    assert len({r.user for r in reqs}) > 10 and len({r.tenant for r in reqs}) == 2
    assert generate(50, 7) == generate(50, 7)  # deterministic


def test_reuse_stats_basics() -> None:
    s = reuse_stats([("a b c d e", 1), ("a b c d e", 1), ("a b c d e f", 2), ("x y", 3)])
    assert s["exact_repeat"] == 0.25 and s["near_duplicate"] == 0.5 and s["exact_same_seed"] == 1.0
