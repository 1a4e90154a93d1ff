"""``bench gpu``: the SD 1.5 configs build the real architecture, the command refuses without CUDA, and the tiny CPU
smoke mode runs the whole measurement path (its numbers are not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nirvana.bench.gpu import SD15_UNET, SD15_VAE, GpuUnavailable, main, run_gpu_bench
from nirvana.bench.gpu_report import gpu_markdown
from nirvana.embedded.postgres import EmbeddedPostgres

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def test_sd15_configs_are_sd15_sized() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):  # shapes only: no memory, no init cost
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6) == 860  # SD 1.5's UNet: 859.5M
    assert round(sum(p.numel() for p in vae.parameters()) / 1e6) == 84  # SD 1.5's VAE: 83.7M


@no_cuda
def test_refuses_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(GpuUnavailable, match="--allow-cpu --tiny"):
        run_gpu_bench()
    with pytest.raises(GpuUnavailable):
        run_gpu_bench(allow_cpu=True)  # full-size on CPU is refused too
    assert main(["--tiny"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_tiny_cpu_smoke(tmp_path: Path, pg_server: EmbeddedPostgres) -> None:
    res = run_gpu_bench(allow_cpu=True, tiny=True, steps=6, ks=(2, 4), batches=(1, 2), repeats=1,
                        cache_entries=20, cache_queries=4, database_url=pg_server.url(), embedder="none",
                        print_progress=False)  # fmt: skip
    assert res["mode"] == "tiny" and res["latent_shape"] == [4, 8, 8] and res["image_size"] == 16
    assert [r["k"] for r in res["resumed"]] == [2, 4] and [s["batch"] for s in res["batch_scaling"]] == [1, 2]
    assert res["step_ms"] > 0 and res["full_s"] > 0
    c = res["cache"]
    assert c is not None and c["hits"] == 4 and c["lookup_ms_p50"] > 0 and c["fetch_decode_ms_p50"] > 0
    assert "## Resumed runs" in gpu_markdown(res) and "Cache overhead" in gpu_markdown(res)
    eb = res["engine_batching"]  # the engine core over the same UNet, mixed misses and hits
    assert [r["max_batch"] for r in eb["rows"]] == [1, 2] and eb["requests"] == 4 and eb["equivalent"] is True
    assert "## Engine core" in gpu_markdown(res)
    json.dumps(res)
    with pytest.raises(ValueError, match="every K"):
        run_gpu_bench(allow_cpu=True, tiny=True, steps=6, ks=(6,))


def test_cli_refuses_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    from typer.testing import CliRunner

    from nirvana.cli import _mount_subcommands, app, bench_app

    if not any(c.name == "gpu" for c in bench_app.registered_commands):
        _mount_subcommands()
    r = CliRunner().invoke(app, ["bench", "gpu"])
    assert r.exit_code == 2 and "--allow-cpu --tiny" in r.output
