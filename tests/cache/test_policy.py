"""Similarity → K tables: the paper's thresholds, boundaries, scaling to other N, validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from nirvana.cache.policy import KPolicy, Rule, policies_dir


@pytest.fixture(scope="module")
def paper() -> KPolicy:
    return KPolicy.paper()


@pytest.mark.parametrize(
    ("s", "k"),
    [
        (1.0, 25),
        (0.96, 25),
        (0.95, 20),  # strictly greater than the threshold
        (0.9500001, 25),
        (0.93, 20),
        (0.90, 15),
        (0.88, 15),
        (0.85, 10),
        (0.80, 10),
        (0.75, 5),
        (0.70, 5),
        (0.65, 0),
        (0.3, 0),
        (-1.0, 0),
        (1.00005, 25),  # float rounding above 1 is tolerated
    ],
)
def test_paper_table(paper: KPolicy, s: float, k: int) -> None:
    assert paper.k_for(s) == k
    assert paper.k_for(s, 50) == k


def test_scaling_to_other_step_counts(paper: KPolicy) -> None:
    assert paper.k_for(0.99, 100) == 50
    assert paper.k_for(0.99, 25) == 12  # floor(25 * 25 / 50)
    assert paper.k_for(0.70, 20) == 2
    assert paper.k_for(0.70, 9) == 0  # floor(5 * 9 / 50) = 0 → a miss
    assert paper.k_for(0.99, 2) == 1  # capped at N - 1, and >= 1
    assert paper.k_for(0.99, 1) == 0
    assert paper.cached_steps() == [5, 10, 15, 20, 25]
    assert paper.cached_steps(20) == [2, 4, 6, 8, 10]
    assert paper.cached_steps(4) == [1, 2]


@pytest.mark.parametrize("bad", [math.nan, 1.5, -1.01])
def test_bad_similarity(paper: KPolicy, bad: float) -> None:
    with pytest.raises(ValueError, match="similarity"):
        paper.k_for(bad)


def test_bad_steps(paper: KPolicy) -> None:
    with pytest.raises(ValueError, match="num_steps"):
        paper.k_for(0.9, 0)


@pytest.mark.parametrize(
    ("rules", "match"),
    [
        ((), "at least one"),
        ((Rule(0.9, 10), Rule(0.95, 5)), "decreasing"),
        ((Rule(0.9, 10), Rule(0.8, 10)), "decreasing"),
        ((Rule(1.0, 10),), "min_similarity"),
        ((Rule(0.9, 50),), "rules.k"),
        ((Rule(0.9, 0),), "rules.k"),
    ],
)
def test_table_validation(rules: tuple[Rule, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        KPolicy(rules, 50)


def test_table_is_data(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "calibrated.json"
    path.write_text(json.dumps({"name": "cal", "reference_steps": 20, "rules": [{"min_similarity": 0.8, "k": 6}]}))
    p = KPolicy.load(path)
    assert (p.name, p.reference_steps, p.k_for(0.81), p.k_for(0.8), p.k_for(0.81, 40)) == ("cal", 20, 6, 0, 12)
    assert KPolicy.from_dict(p.to_dict()) == p
    assert KPolicy.load(None) == KPolicy.paper()
    with pytest.raises(ValueError, match="rules"):
        KPolicy.from_dict({"reference_steps": 50})


def test_load_refuses_a_table_of_another_model(tmp_path: Path) -> None:
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"rules": [{"min_similarity": 0.5, "k": 10}], "model_key": "m-32x32-ddim-aaaa"}))
    assert KPolicy.load(table, model_key="m-32x32-ddim-aaaa").model_key == "m-32x32-ddim-aaaa"
    assert KPolicy.load(table).rules[0].k == 10  # no served model to check against (tools, benchmarks)
    with pytest.raises(ValueError, match=r"NIRVANA_CACHE_POLICY_TABLE.*m-32x32-ddim-aaaa.*m-32x32-euler-bbbb"):
        KPolicy.load(table, model_key="m-32x32-euler-bbbb")
    assert KPolicy.load(None, model_key="anything").name == "paper"  # the paper's table fits every model


def test_packaged_calibrated_table_matches_the_bundled_model() -> None:
    from nirvana.engine.loader import load_model

    key = load_model("bundled", device="cpu").model_key()
    assert KPolicy.load(policies_dir() / "calibrated-scenes-32.json", model_key=key).model_key == key
