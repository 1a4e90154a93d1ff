"""Smoke tests of ``bench index`` and ``bench codecs`` plumbing at tiny sizes (numbers are not asserted beyond
sanity)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from nirvana.bench.codecs import run_codecs_bench, to_json
from nirvana.bench.index import load_prompts, main_json, perturb, run_index_bench


class CharNgramEmbedder:
    """A cheap real embedder (hashed character 3-grams) so the smoke test does not spend minutes in MiniLM."""

    space = "char3-hash"
    dim = 384

    def embed(self, texts: list[str]) -> np.ndarray:
        from sklearn.feature_extraction.text import HashingVectorizer

        x = HashingVectorizer(analyzer="char_wb", ngram_range=(3, 3), n_features=self.dim, alternate_sign=False)
        m = x.transform(texts).toarray().astype(np.float32)
        return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def test_prompts_and_perturbations() -> None:
    prompts = load_prompts(limit=200)
    assert len(prompts) == 200 and len(set(prompts)) == 200
    rng = random.Random(0)
    assert all(perturb(p, rng) != p for p in prompts[:50])


def test_index_bench_small(pg_server, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    res = run_index_bench(
        300, ef_values=(10, 40), queries=20, database_url=pg_server.url(), embedder=CharNgramEmbedder(), ns_queries=10
    )
    out = capsys.readouterr().out
    assert "recall@1" in out and "ef_search" in out
    assert len(res["results"]) == 4 and {r["filter"] for r in res["results"]} == {False, True}
    assert all(0 <= r["recall_at_1"] <= 1 and r["p99_ms"] >= r["p50_ms"] > 0 for r in res["results"])
    assert json.loads(main_json(res))["n"] == 300
    # Per namespace, both search paths; the exact one is brute force within the namespace.
    assert {r["namespace"] for r in res["namespaces"]} <= {"t0", "t1", "t2", "t3", "t4"} and res["namespaces"]
    for r in res["namespaces"]:
        assert r["cache_path"] == ("exact" if r["rows"] <= res["exact_scan_max_rows"] else "hnsw")
        assert r["exact"]["recall_at_1"] >= 0.9 and r["exact"]["empty"] == 0
        assert 0 <= r["filtered"]["recall_at_1"] <= 1 and r["filtered"]["p99_ms"] >= r["filtered"]["p50_ms"] > 0
        assert r["filtered_plan"] in ("hnsw", "btree") and 0 <= r["hnsw"]["recall_at_1"] <= 1
    with pytest.raises(ValueError, match="n must be"):
        run_index_bench(10)


def test_index_bench_small_namespace_row(pg_server, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """The 1 % row: ``queries`` near-duplicates of the 1 % namespace's prompts, through the cache's path."""
    res = run_index_bench(
        3000, ef_values=(40,), queries=20, database_url=pg_server.url(), embedder=CharNgramEmbedder(), ns_queries=5
    )
    sn = res["small_namespace"]
    assert sn["namespace"] == "t4" and sn["share"] == 0.01 and sn["queries"] == 20 and 10 <= sn["rows"] <= 60
    assert sn["cache_path"] == "exact" and sn["exact"]["recall_at_1"] >= 0.95
    assert "1 % namespace" in capsys.readouterr().out


def test_codecs_bench_skips_without_bundled_model_and_runs_on_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    from nirvana.config import bundled_model_dir

    if not (bundled_model_dir() / "model_index.json").exists():
        res = run_codecs_bench("bundled")
        assert res["skipped"] and "model_index.json" in res["reason"]
        assert "skipped" in capsys.readouterr().out
    res = run_codecs_bench("tiny", n_prompts=1, steps=4, ks=(2,))
    rows = {r["codec"]: r for r in res["rows"]}
    assert set(rows) == {"fp32", "fp16", "fp16-zstd", "int8-zstd"}
    assert (
        rows["fp32"]["image_max_abs_diff_px"] == 0.0
        and rows["fp16"]["bytes_per_state"] < rows["fp32"]["bytes_per_state"]
    )
    assert json.loads(to_json(res))["rows"][0]["image_psnr_db"] is None  # inf → null in JSON


def test_embeddings_resume_from_saved_chunks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from nirvana.bench.index import _embed_cached

    calls: list[int] = []

    class Counting(CharNgramEmbedder):
        def embed(self, texts: list[str]) -> np.ndarray:
            calls.append(len(texts))
            return super().embed(texts)

    texts = [f"prompt number {i}" for i in range(10)]
    full = _embed_cached(texts, tmp_path, Counting(), chunk=4)
    assert calls == [4, 4, 2] and full.shape == (10, 384)
    (next(p for p in tmp_path.glob("emb-*.npy"))).unlink()  # as if interrupted before the final save
    (sorted((tmp_path / "chunks").glob("*.npy"))[0]).unlink()  # and one chunk never finished
    calls.clear()
    again = _embed_cached(texts, tmp_path, Counting(), chunk=4)
    assert len(calls) == 1 and calls[0] in (2, 4)  # only the missing chunk is embedded
    np.testing.assert_allclose(again, full)
    calls.clear()
    _embed_cached(texts, tmp_path, Counting(), chunk=4)
    assert calls == []  # whole result cached
