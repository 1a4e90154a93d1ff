"""Calibration fitting, the K × similarity table, ``calibrate --table`` and ``bench quality`` at tiny sizes.

Numbers are not asserted beyond structure and invariants: the measured values live in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from nirvana.bench.calibrate import fit_policy, wilson_lower
from nirvana.bench.quality import ROWS, run_quality
from nirvana.cache.policy import KPolicy
from nirvana.cli import app
from nirvana.engine.engine import DiffusionEngine
from nirvana.engine.loader import load_model
from nirvana.scene.evaluate import SIM_BUCKETS, bucket_label, k_similarity_table, make_pairs


def _table(adherence: list[list[float]], n: int = 50) -> dict[str, Any]:
    nb = len(SIM_BUCKETS) - 1
    assert len(adherence) == nb
    return {
        "buckets": [bucket_label(SIM_BUCKETS[i], SIM_BUCKETS[i + 1]) for i in range(nb)],
        "bucket_edges": list(SIM_BUCKETS),
        "k": [0, 5, 10, 15, 20, 25],
        "num_steps": 50,
        "adherence": adherence,
        "counts": [[n] * 6 for _ in range(nb)],
        "pairs": n * nb,
    }


def test_wilson_lower_bound() -> None:
    assert wilson_lower(0, 0) == 0.0
    assert 0 < wilson_lower(45, 50) < 0.9  # below the point estimate
    assert wilson_lower(450, 500) > wilson_lower(45, 50)  # more evidence, tighter bound
    assert wilson_lower(0, 50) == 0.0


def test_fit_policy_is_monotone_merged_and_conservative() -> None:
    full = 0.9
    # Buckets low → high similarity; quality of resuming falls with K and rises with similarity.
    rows = [
        [full, 0.1, 0.0, 0.0, 0.0, 0.0],  # < 0.6
        [full, 0.4, 0.2, 0.1, 0.0, 0.0],
        [full, 0.9, 0.6, 0.3, 0.1, 0.0],
        [full, 0.9, 0.9, 0.7, 0.3, 0.1],
        [full, 0.9, 0.9, 0.9, 0.8, 0.5],
        [full, 0.9, 0.9, 0.9, 0.9, 0.9],  # a noisy high bucket: everything passes
        [full, 0.9, 0.9, 0.9, 0.9, 0.2],  # > 0.95: capped K=20, and it caps the bucket below
    ]
    policy, decisions = fit_policy(_table(rows, n=400), target=0.95)
    ks = [d["k"] for d in decisions]
    assert ks == sorted(ks), ks  # non-increasing as similarity falls
    assert ks[0] == 0 and ks[-1] == 20 and ks[-2] == 20  # the cap from above
    sims = [r["min_similarity"] for r in policy["rules"]]
    assert sims == sorted(sims, reverse=True)
    assert len({r["k"] for r in policy["rules"]}) == len(policy["rules"])  # equal neighbours merged
    KPolicy.from_dict(policy)  # loadable by the cache
    with pytest.raises(ValueError, match="no similarity bucket"):
        fit_policy(_table(rows, n=5), target=0.95, min_count=10)  # too few pairs anywhere
    with pytest.raises(ValueError, match="target"):
        fit_policy(_table(rows), target=1.5)


def test_fit_policy_inherits_from_below_where_evidence_is_thin() -> None:
    # The bundled model's shape of table: well-populated low buckets support K=20, the top buckets have few
    # pairs, one mid bucket is noisy. Before session 5 the thin top buckets capped everything at K=0.
    rows = [[0.8, 0.8, 0.8, 0.8, 0.82, 0.7] for _ in range(len(SIM_BUCKETS) - 1)]
    rows[4] = [0.75, 0.75, 0.75, 0.67, 0.67, 0.67]  # noisy, but not shown to fail
    table = _table(rows, n=200)
    table["counts"][4] = [12] * 6
    table["counts"][5] = [6] * 6
    table["counts"][6] = [1] * 6
    policy, decisions = fit_policy(table, target=0.97)
    assert [d["k"] for d in decisions] == [20] * 7
    assert policy["rules"] == [{"min_similarity": 0.0, "k": 20}]
    # A bucket whose own pairs show failure (upper bound below target) caps itself and those below.
    table["adherence"][3] = [0.8, 0.8, 0.8, 0.3, 0.3, 0.3]
    _, decisions = fit_policy(table, target=0.97)
    assert [d["k"] for d in decisions] == [10, 10, 10, 10, 20, 20, 20]


@pytest.fixture(scope="module")
def bundled() -> Any:
    from nirvana.config import bundled_probe_dir
    from nirvana.scene.metrics import ProbeMetrics

    return DiffusionEngine(load_model("bundled", device="cpu")), ProbeMetrics(bundled_probe_dir())


def test_k_similarity_table_counts(bundled: Any) -> None:
    engine, metrics = bundled
    table = k_similarity_table(engine, metrics, make_pairs(6, seed=3), steps=10, batch=8)
    assert table["k"] == [0, 1, 2, 3, 4, 5]  # TABLE_K scaled to N=10
    assert sum(row[0] for row in table["counts"]) == 6
    for row_a, row_n in zip(table["adherence"], table["counts"], strict=True):
        assert len(set(row_n)) == 1  # every pair measured at every K
        assert all((a is None) == (n == 0) and (a is None or 0 <= a <= 1) for a, n in zip(row_a, row_n, strict=True))


def test_calibrate_from_a_saved_table(bundled: Any, tmp_path: Path) -> None:
    from nirvana.cli import _mount_subcommands

    _mount_subcommands()
    engine, _ = bundled
    full = 0.9
    rows = [[full] + [full if k <= 10 else 0.0 for k in (5, 10, 15, 20, 25)] for _ in range(len(SIM_BUCKETS) - 1)]
    saved = tmp_path / "eval.json"
    saved.write_text(json.dumps({"model_key": engine.model_key(), "table": _table(rows, n=400)}))
    out = tmp_path / "policy.json"
    args = ["calibrate", "--table", str(saved), "--out", str(out), "--report", str(tmp_path / "r"), "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    policy = KPolicy.from_file(out)
    assert policy.k_for(0.99, 50) == 10 and json.loads(out.read_text())["model_key"] == engine.model_key()
    assert (tmp_path / "r" / "calibrate.md").exists()

    saved.write_text(json.dumps({"model_key": "other-model", "table": _table(rows)}))
    bad = CliRunner().invoke(app, args)
    assert bad.exit_code != 0 and "measured on 'other-model'" in bad.output
    saved.write_text("{}")
    assert "has no 'table'" in CliRunner().invoke(app, args).output


def test_quality_rows_on_the_same_pairs(bundled: Any) -> None:
    engine, metrics = bundled
    cal = KPolicy.from_dict({"name": "t", "reference_steps": 50, "rules": [{"min_similarity": 0.0, "k": 25}]})
    res = run_quality(engine, metrics, cal, n_pairs=4, steps=10, codecs=("fp16",))
    for row in ROWS:
        assert {"adherence", "probe_fid", "steps_saved_fraction"} <= set(res[row]), row
    assert res["full"]["steps_saved_fraction"] == 0
    assert res["calibrated"]["steps_saved_fraction"] == pytest.approx(0.5)  # every pair resumed at K=5 of 10
    assert res["fewer_steps"]["steps_saved_fraction"] == res["paper"]["steps_saved_fraction"]  # matched compute
    assert res["fewer_steps_calibrated"]["steps_saved_fraction"] == res["calibrated"]["steps_saved_fraction"]
    assert 0 < res["codecs"]["fp16"]["bytes_per_state"] < 4 * 12 * 16 * 16
