"""``bench trace``: parsing, clock and merge, replays with known hits through the real cache on PostgreSQL, byte
budgets, and a CLI smoke run (numbers are not asserted beyond what the synthetic traces determine)."""

from __future__ import annotations

import csv
import gzip
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nirvana.bench.trace import (
    DEFAULT_SAMPLER,
    EmbeddingCache,
    PolicySpec,
    SizeModel,
    TraceRequest,
    assign_times,
    default_specs,
    embed_with_cache,
    load_anchors,
    load_replay,
    measure_state_bytes,
    merge_by_time,
    parse_flags,
    parse_row,
    read_trace,
    replay,
    replay_fingerprint,
    step_cost_512,
)
from nirvana.bench.trace.embeddings import _key
from nirvana.bench.trace.replayer import _k_ref
from nirvana.embedded.postgres import EmbeddedPostgres

COLUMNS = ["seq", "channel", "user_hash", "prompt", "seed", "cfg", "steps", "width", "height", "n_images", "sampler",
           "gen_seconds", "raw_flags"]  # fmt: skip
SIZES = SizeModel({"fp32": 16.0, "fp16-zstd": 7.0, "fp16": 8.0, "int8-zstd": 4.0}, image_bytes_per_pixel=1.5)


def _row(seq: int, prompt: str, **kw: Any) -> dict[str, str]:
    r = dict.fromkeys(COLUMNS, "")
    r.update(seq=str(seq), channel=kw.pop("channel", "c1"), prompt=prompt, seed=str(kw.pop("seed", 1000 + seq)))
    r.update({k: str(v) for k, v in kw.items()})
    return r


def _write_trace(path: Path, rows: list[dict[str, str]]) -> Path:
    with gzip.open(path, "wt", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


def _req(
    i: int, prompt: str, seed: int = 1, steps: int = 50, channel: str = "c1", ts: float | None = None
) -> TraceRequest:
    t = float(i * 10) if ts is None else ts
    return TraceRequest(i, channel, "", prompt, seed, 7.0, steps, 512, 512, 1, DEFAULT_SAMPLER, None, ts=t)


@pytest.fixture()
def db(new_database: Any) -> str:
    return str(new_database())


def _specs() -> dict[str, PolicySpec]:
    return {s.name: s for s in default_specs(Path("/nonexistent/calibrated.json"))}


# ---------------------------------------------------------------------- parsing
def test_parse_flags() -> None:
    assert parse_flags("-n 9 -i -S 123 -s150 -C 7.5 -A k_euler") == {
        "n": "9", "i": True, "S": "123", "s": "150", "C": "7.5", "A": "k_euler",
    }  # fmt: skip
    assert parse_flags("-g") == {"g": True} and parse_flags("") == {}
    assert parse_flags("-C -5 junk -t") == {"C": "-5", "t": True}


def test_parse_row_fills_bot_defaults_and_rejects_unusable_rows() -> None:
    req, why = parse_row(_row(7, "  a cat  ", seed="", raw_flags="-i -g"))
    assert why == "" and req is not None
    assert (req.prompt, req.seed, req.cfg, req.steps, req.width, req.height, req.n_images, req.sampler) == (
        "a cat", None, 7.0, 50, 512, 512, 1, DEFAULT_SAMPLER,
    )  # fmt: skip
    assert req.flags == {"i": True, "g": True} and req.model_key == "sd-v1-beta/512x512/default"
    req, _ = parse_row(_row(1, "x" * 1500, cfg="12.0", steps="150", width="768", height="640", n_images="9",
                            sampler="k_euler", gen_seconds="4.5"))  # fmt: skip
    assert req is not None and len(req.prompt) == 1000
    assert (req.cfg, req.steps, req.width, req.height, req.n_images, req.sampler, req.gen_seconds) == (
        12.0, 150, 768, 640, 9, "k_euler", 4.5,
    )  # fmt: skip
    assert req.latent_pixels == 96 * 80 and math.isclose(req.pixel_ratio, 768 * 640 / 512**2)
    assert parse_row(_row(2, "p", steps="0")) == (None, "steps_out_of_range")
    assert parse_row(_row(3, "   ")) == (None, "empty_prompt")
    assert parse_row(_row(4, "p", cfg="1000")) == (None, "cfg_out_of_range")
    assert parse_row({**_row(5, "p"), "seq": "x"}) == (None, "unparsable")


def test_read_trace_times_and_merge(tmp_path: Path) -> None:
    a = _write_trace(tmp_path / "a.trace.csv.gz", [_row(i, f"a{i}", channel="ca") for i in range(10)]
                     + [_row(10, "", channel="ca")])  # fmt: skip
    b = _write_trace(tmp_path / "b.trace.csv.gz", [_row(i, f"b{i}", channel="cb") for i in range(6)])
    reqs, skipped = read_trace(a)
    assert len(reqs) == 10 and skipped == {"empty_prompt": 1}
    assert len(read_trace(a, limit=3)[0]) == 3
    anchors = tmp_path / "krea_time_anchors.csv"
    anchors.write_text("channel,seq,unix_ts,seed,prompt_in_trace\nca,0,1000,1,x\nca,9,1090,1,y\ncb,0,1000,1,x\n"
                       "cb,2,1004,1,w\ncb,5,1010,1,z\ncb,1,1200,1,backwards\n")  # fmt: skip
    got = load_anchors(anchors)
    assert got["ca"] == [(0, 1000.0), (9, 1090.0)]
    assert got["cb"] == [(0, 1000.0), (2, 1004.0), (5, 1010.0)]  # (1, 1200) would make time run backwards
    timed = assign_times(reqs, got["ca"])
    assert [r.ts for r in timed] == [1000.0 + 10 * i for i in range(10)]
    merged, info = load_replay([a, b], limit=None, anchors_path=anchors)
    assert info["ca"]["requests"] == 10 and info["cb"]["requests"] == 6 and info["ca"]["skipped"] == {"empty_prompt": 1}
    assert [r.prompt for r in merged if r.channel == "ca"] == [f"a{i}" for i in range(10)]
    assert [r.prompt for r in merged if r.channel == "cb"] == [f"b{i}" for i in range(6)]
    ts = [r.ts for r in merged]
    assert ts == sorted(ts) and merged[-1].prompt == "a9"
    assert merge_by_time([[_req(0, "x", ts=5.0)], [_req(0, "y", ts=5.0)]])[0].prompt == "x"  # ties: file order


def test_embedding_cache_embeds_each_distinct_prompt_once(tmp_path: Path) -> None:
    class Counting:
        space, dim, calls = "count", 4, 0

        def embed(self, texts: list[str]) -> np.ndarray:
            Counting.calls += len(texts)
            return np.array([[len(t), 1, 0, 0] for t in texts], dtype=np.float32)

    x, info = embed_with_cache(["a", "bb", "a"], Counting(), tmp_path, chunk=1)
    assert Counting.calls == 2 and info["distinct_embedded"] == 2 and x.shape == (3, 4) and (x[0] == x[2]).all()
    x2, info2 = embed_with_cache(["bb", "ccc"], Counting(), tmp_path)
    assert Counting.calls == 3 and info2["distinct_embedded"] == 1 and x2[0, 0] == 2
    assert len(EmbeddingCache(tmp_path, "count", 4)) == 3
    # a hash ending in NUL bytes survives the round trip through numpy's "S16" arrays
    nul = next(t for t in (f"t{i}" for i in range(100000)) if _key(t).endswith(b"\0"))
    embed_with_cache([nul], Counting(), tmp_path)
    assert EmbeddingCache(tmp_path, "count", 4).get([nul])[0, 0] == len(nul)


def test_size_and_cost_models() -> None:
    m = measure_state_bytes(("fp32", "fp16-zstd"))
    assert abs(m["fp32"]["mean_bytes"] - 65536) < 300  # 64 KiB + a small header
    assert 0.3 < m["fp16-zstd"]["ratio_to_fp32"] < 0.5  # noise-dominated states compress only a little below fp16
    req = _req(0, "p")
    assert SIZES.state_bytes("fp32", req) == 65536 and SIZES.prompt_bytes_fp32_512() == 5 * 65536
    assert SIZES.image_bytes(req) == round(1.5 * 512 * 512)
    reqs = [TraceRequest(i, "c", "", "p", 1, 7.0, 50, 512, 512, 1, DEFAULT_SAMPLER, 5.0 + i) for i in range(3)]
    assert step_cost_512(reqs) == pytest.approx(6.0 / 50)
    assert step_cost_512([_req(0, "p")]) is None
    from nirvana.cache.policy import KPolicy

    assert [_k_ref(KPolicy.paper(), k, 35) for k in (3, 7, 10, 14, 17)] == [5, 10, 15, 20, 25]  # floor(K·35/50)


# ---------------------------------------------------------------------- replays with known outcomes
def _known_trace() -> tuple[list[TraceRequest], np.ndarray]:
    """A, exact repeat of A, B (cos 0.92 to A), C (cos 0.97 to B, 0.80 to A), then a novel D."""
    e = np.eye(384, dtype=np.float32)
    a = e[0]
    b = 0.92 * e[0] + math.sqrt(1 - 0.92**2) * e[1]
    bb = (0.97 - 0.92 * 0.80) / math.sqrt(1 - 0.92**2)
    c = 0.80 * e[0] + bb * e[1] + math.sqrt(1 - 0.80**2 - bb**2) * e[2]
    d = e[3]
    reqs = [_req(0, "A", seed=1), _req(1, "A", seed=1), _req(2, "B", seed=2), _req(3, "C", seed=3),
            _req(4, "D", seed=4)]  # fmt: skip
    return reqs, np.stack([a, a, b, c, d]).astype(np.float32)


def test_known_hits_ours_paper_lru(db: str, new_database: Any) -> None:
    reqs, emb = _known_trace()
    specs = _specs()
    got: dict[str, list[tuple[str, int]]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name in ("ours", "paper", "lru", "exact"):
        got[name] = []
        rows[name] = replay(str(new_database()), reqs, emb, specs[name], 10**9, SIZES, outcomes=got[name])
    # ours: the exact repeat hits the exact tier; B resumes A at 20; C resumes B (recorded after its hit) at 25.
    assert got["ours"] == [("miss", 0), ("exact", 0), ("approximate", 20), ("approximate", 25), ("miss", 0)]
    # paper: entries only after a miss, so B was never stored and C can only use A (cos 0.80 → K = 10).
    assert got["paper"] == [("miss", 0), ("approximate", 25), ("approximate", 20), ("approximate", 10), ("miss", 0)]
    # lru records every generation (no exact tier): the repeat is an approximate hit at 25, C resumes B.
    assert got["lru"] == [("miss", 0), ("approximate", 25), ("approximate", 20), ("approximate", 25), ("miss", 0)]
    assert got["exact"] == [("miss", 0), ("exact", 0), ("miss", 0), ("miss", 0), ("miss", 0)]
    assert rows["paper"]["prompts_stored"] == 2  # A and D (the misses)
    assert rows["ours"]["prompts_stored"] == 4  # A, B, C, D: the exact hit adds nothing
    assert rows["lru"]["prompts_stored"] == 5
    # steps: 5 × 50 requested; ours skips 50 + 20 + 25, paper 25 + 20 + 10.
    assert rows["ours"]["steps_saved_fraction"] == pytest.approx(95 / 250)
    assert rows["paper"]["steps_saved_fraction"] == pytest.approx(55 / 250)
    assert rows["ours"]["k_hist"] == {"20": 1, "25": 1, "exact": 1}
    assert rows["ours"]["hit_rate"] == pytest.approx(0.6) and rows["ours"]["exact_rate"] == pytest.approx(0.2)
    # bytes: ours stores fp16-zstd states (7 B/latent px) + PNG images; B and C borrow what they resumed from.
    own_states = 5 + 1 + 0 + 5  # A: 5, B: k=25 (5..20 borrowed), C: none above 25, D: 5
    assert rows["ours"]["state_bytes"] == own_states * 7 * 4096
    assert rows["ours"]["image_bytes"] == 4 * round(1.5 * 512 * 512)
    assert rows["paper"]["bytes"] == 10 * 65536 and rows["exact"]["state_bytes"] == 0
    assert rows["ours"]["gate"]["decisions"] == 0  # fewer than 50 prompts: no gate model yet


def test_steps_scale_and_namespaces(new_database: Any) -> None:
    e = np.eye(384, dtype=np.float32)
    reqs = [_req(0, "A", steps=100), _req(1, "A2", steps=100, seed=5), _req(2, "A3", steps=50, seed=6),
            _req(3, "A4", steps=100, seed=7, channel="other")]  # fmt: skip
    emb = np.stack([e[0]] * 4)
    out: list[tuple[str, int]] = []
    row = replay(str(new_database()), reqs, emb, _specs()["paper"], 10**9, SIZES, outcomes=out)
    # same N → K scaled to 50 of 100; another N or another channel (tenant) never reuses the state.
    assert out == [("miss", 0), ("approximate", 50), ("miss", 0), ("miss", 0)]
    assert row["k_hist"] == {"25": 1} and row["by_channel"]["other"]["hit_rate"] == 0.0


def test_byte_budgets_are_respected(new_database: Any) -> None:
    rng = np.random.default_rng(0)
    n = 80
    emb = rng.normal(size=(n, 384)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    # every 4th request refines the previous one (cos ≈ 0.9) so there are hits to protect
    for i in range(3, n, 4):
        v = 0.9 * emb[i - 1] + math.sqrt(1 - 0.81) * emb[i]
        emb[i] = v / np.linalg.norm(v)
    reqs = [_req(i, f"p{i}", seed=i) for i in range(n)]
    budget = 8 * SIZES.prompt_bytes_fp32_512()  # 8 prompts' fp32 states (≈ 2.6 MB)
    specs = _specs()
    for name in ("paper", "ours", "lru", "exact"):
        row = replay(str(new_database()), reqs, emb, specs[name], budget, SIZES)
        assert row["peak_bytes"] <= budget, name
        assert row["bytes"] <= budget, name
        assert row["peak_bytes_before_eviction"] > budget and row["evictions"] > 0, name
        assert row["budget_bytes"] == budget
    unb = replay(str(new_database()), reqs, emb, specs["unbounded"], budget, SIZES)
    assert unb["budget_bytes"] is None and unb["evictions"] == 0 and unb["bytes"] > budget
    with pytest.raises(ValueError, match="one row per request"):
        replay("postgresql://unused", reqs, emb[:3], specs["paper"], budget, SIZES)


# ---------------------------------------------------------------------- CLI smoke
def _smoke_trace(tmp_path: Path) -> Path:
    """The real channel W1-dream-4 if the shared data is here, else a synthetic trace with refinements."""
    from nirvana.bench.trace import default_trace_files

    try:
        real = [f for f in default_trace_files() if f.name.startswith("W1-dream-4.")]
    except FileNotFoundError:
        real = []
    if real:
        return real[0]
    base = ["a castle on a hill", "portrait of a cat wearing a hat", "cyberpunk city at night", "a bowl of fruit"]
    rows = []
    for i in range(300):
        p = base[i % 4] + (", highly detailed" if i % 3 else "") + (f", variant {i % 7}" if i % 5 == 0 else "")
        rows.append(_row(i, p, channel="synthetic", seed=i % 11, gen_seconds="5.0"))
    return _write_trace(tmp_path / "synthetic.trace.csv.gz", rows)


def test_cli_smoke(tmp_path: Path, pg_server: EmbeddedPostgres) -> None:
    from typer.testing import CliRunner

    from nirvana.cli import _mount_subcommands, app

    _mount_subcommands()
    out = tmp_path / "out"
    trace = _smoke_trace(tmp_path)
    args = ["bench", "trace", "--trace", str(trace), "--limit", "300", "--policies", "paper,ours",
            "--budget-prompts", "100", "--sweep-budgets", "30", "--sweep-limit", "100", "--json",
            "--out", str(out), "--cache-dir", str(tmp_path / "emb"), "--database-url", pg_server.url()]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["requests"] == 300 and set(res["policies"]) == {"paper", "ours"}
    for p in res["policies"].values():
        assert 0 <= p["hit_rate"] <= 1 and 0 <= p["steps_saved_fraction"] < 1 and p["bytes"] <= res["budget_bytes"]
    assert res["router_prompts_per_s"] > 0
    assert {(s["policy"], s["budget_prompts"]) for s in res["sweep"]["rows"]} == {("paper", 30), ("ours", 30)}
    assert all(s["requests"] == 100 for s in res["sweep"]["rows"])
    assert (out / "trace.json").exists() and (out / "trace.png").exists()
    md = (out / "trace.md").read_text()
    assert "## Headline" in md and "## Budget sweep" in md and "![steps saved vs budget](trace.png)" in md
    bad = CliRunner().invoke(app, ["bench", "trace", "--trace", str(tmp_path / "missing.csv.gz")])
    assert bad.exit_code != 0


class _HashEmbedder:
    """Deterministic unit vectors from a hash of the text: enough to drive replays without MiniLM."""

    space = "test-hash"
    dim = 384

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.stack([np.random.default_rng(int.from_bytes(_key(t)[:8], "little")).normal(size=self.dim)
                        for t in texts]) if texts else np.zeros((0, self.dim))  # fmt: skip
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32) if texts else out


def test_a_spec_field_added_later_keeps_older_fingerprints() -> None:
    """Checkpoints written before ``half_life_s`` existed stay valid where it changes nothing, and only there.

    The expected values were computed by the code of a76bb29 (before the field) on the same inputs."""
    specs = {sp.name: sp for sp in default_specs(Path("/nonexistent.json"))}
    before = {"paper": "ad26b31bb65af45955794b70298f5897", "lru": "bd0eff812008036165ab19f5eea032bc",
              "unbounded": "1412d7a6f9aadd291beff45fdbf4698c", "ours": "326aeaa9e67c5a1b817dcad636618e43"}  # fmt: skip
    now = {name: replay_fingerprint("d", specs[name], {"step_cost_s": 0.1}) for name in before}
    assert {n: now[n] == before[n] for n in before} == {"paper": True, "lru": True, "unbounded": True, "ours": False}
    assert specs["lru"].half_life_s is None and specs["ours"].half_life_s == 3600.0


def test_resume_reuses_only_replays_with_a_matching_fingerprint(
    tmp_path: Path, pg_server: EmbeddedPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nirvana.bench.trace as trace_mod
    import nirvana.bench.trace.runner as runner_mod  # where run_trace_bench looks replay up

    base = ["a castle", "a castle", "a red fox", "a castle", "a red fox in snow"]
    trace = _write_trace(tmp_path / "t.trace.csv.gz", [_row(i, base[i % 5], seed=i % 3) for i in range(40)])
    ckpt = tmp_path / "ck.jsonl"
    kw: dict[str, Any] = dict(budget_prompts=5, policies=["paper", "lru"], sweep_budgets=(), verbose=False,
                              database_url=pg_server.url(), cache_dir=tmp_path / "emb", embedder=_HashEmbedder(),
                              checkpoint=ckpt, snapshot_every=20)  # fmt: skip
    calls: list[str] = []
    real_replay = trace_mod.replay

    def counting(*a: Any, **k: Any) -> dict[str, Any]:
        calls.append(a[3].name)
        return real_replay(*a, **k)

    monkeypatch.setattr(runner_mod, "replay", counting)
    first = trace_mod.run_trace_bench([trace], **kw)
    lines = [json.loads(x) for x in ckpt.read_text().splitlines()]
    assert sorted(calls) == ["lru", "paper"] and len(lines) == 4
    # Each replay also left its row after the first 20 requests: the same row a 20-request replay gives.
    snaps = {x["policy"]: x["row"] for x in lines if x.get("partial")}
    prefix = trace_mod.run_trace_bench([trace], **{**kw, "limit": 20, "checkpoint": None})
    for name in ("paper", "lru"):
        assert snaps[name]["requests"] == 20
        for key in ("hit_rate", "steps_skipped", "bytes", "prompts_stored", "k_hist"):
            assert snaps[name][key] == prefix["policies"][name][key], (name, key)
        # The report's progress: the snapshot, then the final row.
        assert first["progress"][name] == [
            {k: r[k] for k in ("requests", "hit_rate", "steps_saved_fraction")}
            for r in (snaps[name], first["policies"][name])
        ]
    assert prefix["progress"] == {n: [{k: prefix["policies"][n][k] for k in ("requests", "hit_rate",
                                  "steps_saved_fraction")}] for n in ("paper", "lru")}  # fmt: skip
    md = trace_mod.trace_markdown(first, None, trace_mod.progress_plot(first, tmp_path / "progress.png"))
    assert "## Steps saved along the trace" in md and "![steps saved along the trace](progress.png)" in md
    assert (tmp_path / "progress.png").stat().st_size > 0
    assert trace_mod.progress_plot(prefix, tmp_path / "none.png") is None  # one point per policy: no plot
    with open(ckpt, "a") as fh:
        fh.write('{"dataset": "head", "policy": "paper", "budg')  # a line cut short by an interrupted write

    calls.clear()
    again = trace_mod.run_trace_bench([trace], resume=True, **kw)
    assert calls == []  # both rows came from the checkpoint
    for name in ("paper", "lru"):
        assert again["policies"][name] == first["policies"][name]
    # Prefix snapshots are never resumed from: with only those left, both policies replay again.
    ckpt.write_text("".join(json.dumps(x) + "\n" for x in lines if x.get("partial")))
    calls.clear()
    trace_mod.run_trace_bench([trace], resume=True, **kw)
    assert sorted(calls) == ["lru", "paper"]

    # A different size model changes the fingerprint: nothing is reused, both are replayed.
    calls.clear()
    trace_mod.run_trace_bench([trace], resume=True, **{**kw, "image_bytes_per_pixel": 3.0})
    assert sorted(calls) == ["lru", "paper"]
    # Without resume the checkpoint's rows are never read.
    calls.clear()
    trace_mod.run_trace_bench([trace], **kw)
    assert sorted(calls) == ["lru", "paper"]


def test_a_task_stopped_part_way_keeps_the_budgets_it_finished(
    tmp_path: Path, pg_server: EmbeddedPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One task replays a policy's budgets in turn; each finished budget is checkpointed at once, so a run killed
    during the next one resumes with only what is left."""
    import nirvana.bench.trace as trace_mod
    import nirvana.bench.trace.runner as runner_mod  # where run_trace_bench looks replay up

    base = ["a castle", "a red fox", "a castle at night", "a blue boat", "a red fox in snow"]
    trace = _write_trace(tmp_path / "t.trace.csv.gz", [_row(i, base[i % 5], seed=i) for i in range(30)])
    ckpt = tmp_path / "ck.jsonl"
    kw: dict[str, Any] = dict(budget_prompts=1, policies=["lru"], sweep_budgets=(1, 2), verbose=False,
                              database_url=pg_server.url(), cache_dir=tmp_path / "emb", embedder=_HashEmbedder(),
                              checkpoint=ckpt, snapshot_every=0)  # fmt: skip
    real_replay = trace_mod.replay
    calls: list[int] = []

    def stopped_at_the_second(*a: Any, **k: Any) -> dict[str, Any]:
        calls.append(a[4])
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is stopped during the second budget
        return real_replay(*a, **k)

    monkeypatch.setattr(runner_mod, "replay", stopped_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        trace_mod.run_trace_bench([trace], **kw)
    small, large = calls
    assert small < large
    lines = [json.loads(x) for x in ckpt.read_text().splitlines()]
    assert [(x["policy"], x["budget_bytes"], x.get("partial")) for x in lines] == [("lru", small, None)]
    assert lines[0]["row"]["evictions"] > 0  # so the larger budget is a replay of its own, not a copy

    calls.clear()
    monkeypatch.setattr(runner_mod, "replay", lambda *a, **k: calls.append(a[4]) or real_replay(*a, **k))
    res = trace_mod.run_trace_bench([trace], resume=True, **kw)
    assert calls == [large]
    row = res["policies"]["lru"]
    assert {k: v for k, v in row.items() if k not in ("note", "codec", "table")} == lines[0]["row"]
