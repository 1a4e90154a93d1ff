"""The service CLI: ``nirvana render`` (rerun skips finished prompts), ``nirvana demo --json`` against a running
service, and ``nirvana up`` + ``nirvana keys create`` with a clean Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from nirvana.embedded.postgres import free_port
from nirvana.service.client import Client
from nirvana.service.offline import MANIFEST, render_file

from .conftest import TEST_ENV

pytestmark = pytest.mark.timeout(900)
NIRVANA = [sys.executable, "-m", "nirvana.cli"]


def test_render_file_skips_finished(tmp_path: Path, client: Client) -> None:
    src = tmp_path / "prompts.txt"
    src.write_text("# comment\na small red square on a white background, center\n\n")
    with (tmp_path / "more.jsonl").open("w") as f:
        f.write(json.dumps({"prompt": "a big blue circle on a black background, top right", "steps": 8}) + "\n")
    out = tmp_path / "out"
    s1 = render_file(client, src, out, {"steps": 8}, poll_s=0.1)
    assert s1 == {"total": 1, "skipped": 0, "rendered": 1, "failed": 0}
    src.write_text(src.read_text() + "a small green square on a white background, center\n")
    s2 = render_file(client, src, out, {"steps": 8}, poll_s=0.1)
    assert s2 == {"total": 2, "skipped": 1, "rendered": 1, "failed": 0}
    s3 = render_file(client, tmp_path / "more.jsonl", out, poll_s=0.1)
    assert s3["rendered"] == 1
    assert len(list(out.glob("*.png"))) == 3
    assert len((out / MANIFEST).read_text().splitlines()) == 3


def test_demo_json_against_running_service(stack: Any, make_key: Callable[..., str], tmp_path: Path) -> None:
    env = {**os.environ, **TEST_ENV}
    args = ["demo", "--requests", "12", "--steps", "10", "--gallery", "2", "--json", "--url", stack.api_url]
    r = subprocess.run(
        [*NIRVANA, *args, "--api-key", make_key("demo-tenant"), "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        env=env,
        timeout=500,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("jobs", "completed", "failed", "hit_rate", "steps_saved_fraction", "p50_s", "p95_s"):
        assert key in summary, key
    assert summary["jobs"] == 12 and summary["completed"] == 12 and summary["failed"] == 0
    assert (tmp_path / "demo" / "index.html").exists() and (tmp_path / "demo" / "results.json").exists()


def test_bench_e2e_compares_service_and_direct_engine(stack: Any, make_key: Callable[..., str], tmp_path: Path) -> None:
    env = {**os.environ, **TEST_ENV}
    args = ["bench", "e2e", "--requests", "10", "--steps", "10", "--json", "--url", stack.api_url]
    r = subprocess.run(
        [*NIRVANA, *args, "--api-key", make_key("e2e-tenant"), "--model", str(stack.cfg.model)],
        capture_output=True,
        text=True,
        env=env,
        timeout=500,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["completed"] == 10 and s["p99_s"] >= s["p50_s"] > 0
    tiers = s["latency_by_tier"]
    assert set(tiers) == {"miss", "approximate", "exact"} and sum(t["jobs"] for t in tiers.values()) == 10
    d = s["direct"]
    # Every non-exact job was replayed; the service cannot be faster than the bare engine doing the same work.
    assert sum(v["jobs"] for v in d["direct_by_tier"].values()) == 10 - tiers["exact"]["jobs"]
    assert d["service_over_direct"] > 1.0
    assert "same jobs through the engine directly" in r.stderr + r.stdout


@pytest.mark.slow
def test_up_keys_and_clean_shutdown(new_database: Callable[..., str], tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "stack"
    port = free_port()
    env = {**os.environ, **TEST_ENV, "NIRVANA_DATABASE_URL": new_database(), "NIRVANA_MODEL": str(tiny_model_dir)}
    env.pop("NIRVANA_BROKER_URL", None)
    proc = subprocess.Popen(
        [*NIRVANA, "up", "--data-dir", str(data), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # `up` itself gives up after --ready-timeout (default 600 s)
            seen.append(line)
            if "nirvana is up" in line:
                break
        assert any("nirvana is up" in line for line in seen), "".join(seen[-40:])
        # Keep draining `up`'s output: a full pipe would block its logging, and so its shutdown.
        drain = threading.Thread(target=lambda: seen.extend(proc.stdout or []), daemon=True)
        drain.start()
        info = json.loads((data / "stack.json").read_text())
        key = subprocess.run(
            [*NIRVANA, "keys", "create", "--tenant", "cli-test", "--data-dir", str(data)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=True,
        ).stdout.strip()
        assert key.startswith("nv_")
        with Client(f"http://127.0.0.1:{port}", key) as c:
            assert c.generate(prompt="a tiny red circle", steps=5)["status"] == "done"
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(300)
        except subprocess.TimeoutExpired:
            raise AssertionError("`nirvana up` did not stop within 300 s of SIGINT:\n" + "".join(seen[-60:])) from None
        assert rc == 0, "".join(seen[-60:])
        for pid in info["children"].values():
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert not (data / "stack.json").exists()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
