"""``nirvana bench gpu`` (also ``python -m nirvana.bench.gpu``): what the cache saves and costs on a GPU.

A random-weight UNet and VAE of Stable Diffusion 1.5's architecture (configs written out below; no download), in
fp16 on CUDA at 512² (latents 4×64×64), with classifier-free guidance (the UNet sees 2·B samples per step) and a
DDIM scheduler with SD's schedule. It measures, in one process:

* the denoising step time (UNet forward + scheduler step) and the VAE decode time;
* a full 50-step run versus runs resumed at K = 5, 10, 15, 20, 25 (steps K..N + decode), as times and ratios;
* batch-size scaling 1…8 (step time, decode, images/s);
* the cache's overhead per request beside it: MiniLM embedding of one prompt (CPU, as the router runs it), a
  lookup on an embedded PostgreSQL holding a few thousand entries, and fetching and decoding a compressed
  (fp16-zstd) 4×64×64 latent, copied to the GPU.

Random weights give the real architecture's cost (FLOPs and memory traffic do not depend on the values); images are
meaningless. The text encoder is left out (random 77×768 conditioning): CLIP-L's cost is a few ms per request.

Without CUDA it refuses, unless ``--allow-cpu --tiny``: a tiny config of the same structure that CI runs in
seconds (its numbers only prove the code runs). Sized to finish in well under 8 minutes on an H100/H200; a
``max_seconds`` guard skips what is left (and says so) if a slower device runs out of time.

This module owns the models and the measurements; the report (markdown, ``gpu.json`` and ``gpu.md``) is
:mod:`nirvana.bench.gpu_report`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nirvana.bench.gpu_report import write_outputs

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
SD15_TEXT = {"tokens": 77, "dim": 768}
TINY_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (32, 32),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 16,
}
TINY_TEXT = {"tokens": 8, "dim": 32}
KS = (5, 10, 15, 20, 25)


class GpuUnavailable(RuntimeError):
    """No CUDA device, and the CPU smoke mode was not asked for."""


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


class _RandomText:
    """Prompt → (tokens, dim) random states seeded by the prompt's hash: SD-shaped conditioning without CLIP
    weights (deterministic, so a request's conditioning is the same in every batch)."""

    def __init__(self, tokens: int, dim: int, device: Any) -> None:
        self.tokens, self.dim, self.device = tokens, dim, device

    def encode(self, prompts: list[str]) -> Any:
        import hashlib

        import torch

        from nirvana.engine.text import Conditioning

        rows = []
        for p in prompts:
            seed = int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little")
            rows.append(torch.randn(self.tokens, self.dim, generator=torch.Generator().manual_seed(seed)))
        return Conditioning(torch.stack(rows))


class _Bench:
    """Models, conditioning and timed loops on one device.

    Invariants: ``latent_hw`` = image side / 8 (the VAE downsamples 8× for SD, 2× for the tiny VAE's 2 blocks);
    every timed region ends with a device synchronisation.
    """

    def __init__(self, tiny: bool, device: str, dtype_name: str, seed: int = 0) -> None:
        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        self.torch = torch
        self.device = torch.device(device)
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
        torch.manual_seed(seed)
        unet_cfg, vae_cfg, text = (TINY_UNET, TINY_VAE, TINY_TEXT) if tiny else (SD15_UNET, SD15_VAE, SD15_TEXT)
        t0 = time.perf_counter()
        with torch.device(self.device):  # initialise the random weights on the device (fast on a GPU)
            self.unet = UNet2DConditionModel(**unet_cfg).to(self.dtype).eval()
            self.vae = AutoencoderKL(**vae_cfg).to(self.dtype).eval()
        self.build_s = time.perf_counter() - t0
        self.unet_params = sum(p.numel() for p in self.unet.parameters())
        self.vae_params = sum(p.numel() for p in self.vae.parameters())
        self.scheduler = DDIMScheduler(**SD15_SCHEDULER)
        self.latent_hw = int(unet_cfg["sample_size"])
        self.image_hw = self.latent_hw * 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        self.text_tokens, self.text_dim = int(text["tokens"]), int(text["dim"])
        self.guidance = 7.5

    def components(self) -> Any:
        """The same UNet, VAE and schedule as ``ModelComponents`` for the engine core (text: ``_RandomText``)."""
        import copy

        from nirvana.engine.denoisers import UNetDenoiser
        from nirvana.engine.latents import VaeSpace
        from nirvana.engine.loader import ModelComponents

        space = VaeSpace(self.vae)
        return ModelComponents(
            ref="random-sd15",
            checkpoint_id="random-sd15@bench",
            denoiser=UNetDenoiser(self.unet, space.factor),
            scheduler=copy.deepcopy(self.scheduler),
            encoder=_RandomText(self.text_tokens, self.text_dim, self.device),
            space=space,
            sample_size=(self.image_hw, self.image_hw),
            default_guidance=self.guidance,
            device=self.device,
            dtype=self.dtype,
        )

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def cond(self, batch: int) -> Any:
        """Random (uncond ‖ cond) text states, (2·batch, tokens, dim)."""
        g = self.torch.Generator(device="cpu").manual_seed(batch)
        x = self.torch.randn(2 * batch, self.text_tokens, self.text_dim, generator=g)
        return x.to(self.device, self.dtype)

    def noise(self, batch: int) -> Any:
        g = self.torch.Generator(device="cpu").manual_seed(1000 + batch)
        x = self.torch.randn(batch, 4, self.latent_hw, self.latent_hw, generator=g)
        return x.to(self.device, self.dtype)

    def step(self, latents: Any, t: Any, cond: Any) -> Any:
        """One guided denoising step (UNet on 2·B samples, guidance, DDIM update)."""
        x = self.torch.cat([latents, latents])
        eps = self.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]
        u, c = eps.chunk(2)
        eps = u + self.guidance * (c - u)
        return self.scheduler.step(eps, t, latents, return_dict=False)[0]

    def decode(self, latents: Any) -> Any:
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]

    def run(self, batch: int, steps: int, start: int = 0, latents: Any = None, decode: bool = True) -> Any:
        """Steps ``start..steps`` from ``latents`` (noise when None) on a fresh schedule, then decode."""
        with self.torch.inference_mode():
            self.scheduler.set_timesteps(steps, device=self.device)
            x = self.noise(batch) if latents is None else latents
            cond = self.cond(batch)
            for t in self.scheduler.timesteps[start:]:
                x = self.step(x, t, cond)
            return self.decode(x) if decode else x

    def timed(self, fn: Callable[[], Any], repeats: int) -> list[float]:
        out = []
        for _ in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            out.append(time.perf_counter() - t0)
        return out


def _cache_overhead(
    bench: _Bench,
    entries: int,
    queries: int,
    database_url: str | None,
    embedder_name: str,
    real_states: int = 64,
) -> dict[str, Any]:
    """Embed + lookup + fetch/decode of a compressed latent, on a fresh database with ``entries`` prompts."""
    import numpy as np
    import torch

    from nirvana.cache.core import ApproximateCache, CacheRequest, Namespace
    from nirvana.cache.embedder import MiniLMEmbedder
    from nirvana.cache.policy import KPolicy
    from nirvana.cache.store import LatentStore
    from nirvana.engine.state import CapturedState

    out: dict[str, Any] = {"entries": entries, "queries": queries, "codec": "fp16-zstd"}
    if embedder_name == "minilm":
        emb = MiniLMEmbedder(batch_size=64)
        prompt = "a portrait of a cyberpunk samurai, highly detailed, digital art, trending on artstation"
        emb.embed([prompt])  # load + warm up
        t = []
        for i in range(20):
            t0 = time.perf_counter()
            emb.embed([f"{prompt} {i}"])
            t.append((time.perf_counter() - t0) * 1000)
        out["embed_ms_p50"], out["embed_ms_p99"] = round(_median(t), 3), round(_pct(t, 0.99), 3)
        out["embed_device"] = "cpu"
    else:
        out["embed_ms_p50"] = out["embed_ms_p99"] = None
        out["embed_device"] = None
    rng = np.random.default_rng(0)
    base = rng.normal(size=(entries, 384)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    from nirvana.bench.trace.server import PostgresServer

    server = PostgresServer(database_url)
    tmp = tempfile.mkdtemp(prefix="nirvana-gpu-bench-")
    url = server.fresh()
    ns = Namespace("sd15-random-512", "bench")
    hw = bench.latent_hw
    try:
        cache = ApproximateCache(url, LatentStore(tmp), MiniLMEmbedder(), KPolicy.paper(), eviction="ours",
                                 gate=None, budget_bytes=2**40, codec="fp16-zstd", pool_size=2)  # fmt: skip
        t0 = time.perf_counter()
        n_real = min(real_states, entries)
        for i in range(entries):
            req = CacheRequest(f"p{i}", "", i, 50, 7.5, 512, 512, ns, embedding=base[i])
            if i < n_real:
                g = torch.Generator().manual_seed(i)
                sts = [CapturedState(torch.randn(4, hw, hw, generator=g), k, 50, float(981 - 20 * k), "ddim",
                                     ns.model_key) for k in KS]  # fmt: skip
                cache.record(f"j{i}", req, sts, None, None)
            else:
                cache.record_virtual(f"j{i}", req, None, bytes_per_state=30000)
        out["fill_s"] = round(time.perf_counter() - t0, 2)
        lookups, loads, h2d = [], [], []
        hits = 0
        for q in range(queries):
            src = base[q % n_real]
            noise = rng.normal(size=384).astype(np.float32)
            noise -= noise.dot(src) * src
            noise /= np.linalg.norm(noise)
            v = (0.97 * src + math.sqrt(1 - 0.97**2) * noise).astype(np.float32)  # cosine 0.97 → K = 25
            req = CacheRequest(f"q{q}", "", 10**6 + q, 50, 7.5, 512, 512, ns, embedding=v)
            t0 = time.perf_counter()
            res = cache.lookup(req)
            t1 = time.perf_counter()
            st = cache.load_state(res)
            t2 = time.perf_counter()
            if st is not None:
                hits += 1
                x = st.latent.to(bench.device, bench.dtype, non_blocking=False)
                bench.sync()
                h2d.append((time.perf_counter() - t2) * 1000)
                del x
            lookups.append((t1 - t0) * 1000)
            loads.append((t2 - t1) * 1000)
        cache.close()
    finally:
        server.drop(url)
        server.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    out.update(
        hits=hits,
        lookup_ms_p50=round(_median(lookups), 3),
        lookup_ms_p99=round(_pct(lookups, 0.99), 3),
        fetch_decode_ms_p50=round(_median(loads), 3),
        fetch_decode_ms_p99=round(_pct(loads, 0.99), 3),
        h2d_ms_p50=round(_median(h2d), 3) if h2d else None,
    )
    total = (out["embed_ms_p50"] or 0.0) + out["lookup_ms_p50"] + out["fetch_decode_ms_p50"] + (out["h2d_ms_p50"] or 0)
    out["total_ms_p50"] = round(total, 3)
    return out


def run_gpu_bench(
    *,
    allow_cpu: bool = False,
    tiny: bool = False,
    steps: int = 50,
    ks: tuple[int, ...] = KS,
    batches: tuple[int, ...] = (1, 2, 4, 8),
    repeats: int = 3,
    dtype: str = "fp16",
    cache_entries: int = 3000,
    cache_queries: int = 200,
    database_url: str | None = None,
    embedder: str = "minilm",
    max_seconds: float = 420.0,
    print_progress: bool = True,
) -> dict[str, Any]:
    """Run every measurement; returns a JSON-able dict.

    Raises:
        GpuUnavailable: no CUDA device and not (``allow_cpu`` and ``tiny``).
        ValueError: bad arguments (K outside 1..steps-1, empty batches, repeats < 1, unknown dtype/embedder).
    """
    import torch

    if steps < 2 or any(not 0 < k < steps for k in ks):
        raise ValueError(f"need steps >= 2 and every K in 1..{steps - 1}, got steps={steps}, ks={ks}")
    if not batches or any(b < 1 for b in batches) or repeats < 1:
        raise ValueError("batches must be >= 1 and repeats >= 1")
    if dtype not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"dtype must be fp16, bf16 or fp32, got {dtype!r}")
    if embedder not in ("minilm", "none"):
        raise ValueError(f"embedder must be 'minilm' or 'none', got {embedder!r}")
    cuda = torch.cuda.is_available()
    if not cuda and not (allow_cpu and tiny):
        raise GpuUnavailable(
            "no CUDA device: `nirvana bench gpu` measures SD 1.5-sized models on a GPU and would take hours on a "
            "CPU. Run it on a machine with a GPU, or use `--allow-cpu --tiny` for a seconds-long smoke run of the "
            "code path (its numbers mean nothing)."
        )
    device = "cuda" if cuda else "cpu"
    if device == "cpu":
        dtype = "fp32"  # fp16 convolutions are slow or unsupported on CPU; the smoke run only proves the path
        torch.set_num_threads(1)  # tiny tensors: more threads only add synchronisation (badly so on a busy host)
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()  # ".to(dtype)" warns about keep-in-fp32 modules that SD 1.5 does not have
    t_start = time.perf_counter()
    skipped: list[str] = []

    def left() -> float:
        return max_seconds - (time.perf_counter() - t_start)

    def say(msg: str) -> None:
        if print_progress:
            print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    b = _Bench(tiny, device, dtype)
    res: dict[str, Any] = {
        "bench": "gpu",
        "mode": "tiny" if tiny else "sd15",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "dtype": dtype,
        "torch": torch.__version__,
        "image_size": b.image_hw,
        "latent_shape": [4, b.latent_hw, b.latent_hw],
        "unet_params_m": round(b.unet_params / 1e6, 1),
        "vae_params_m": round(b.vae_params / 1e6, 1),
        "build_s": round(b.build_s, 2),
        "steps": steps,
        "guidance": "classifier-free (UNet batch = 2 x images)",
        "scheduler": "DDIM (SD 1.5 schedule)",
    }
    say(f"built UNet {res['unet_params_m']}M + VAE {res['vae_params_m']}M params on {res['device']} ({dtype})")
    # Warm-up: kernels, cudnn autotuning, allocator.
    for bs in sorted(set(batches) | {1}):
        b.run(bs, steps, start=steps - 2)
    say("warm")

    # Step time and decode at batch 1.
    with torch.inference_mode():
        b.scheduler.set_timesteps(steps, device=b.device)
        x, cond, t = b.noise(1), b.cond(1), b.scheduler.timesteps[0]
        step_t = b.timed(lambda: b.step(x, t, cond), max(10, repeats * 5))
        dec_t = b.timed(lambda: b.decode(x), max(3, repeats))
    res["step_ms"] = round(1000 * _median(step_t), 3)
    res["decode_ms"] = round(1000 * _median(dec_t), 3)
    say(f"step {res['step_ms']} ms, decode {res['decode_ms']} ms")

    # Full vs resumed runs (batch 1).
    full = b.timed(lambda: b.run(1, steps), repeats)
    res["full_s"] = round(_median(full), 4)
    resumed = []
    for k in ks:
        if left() < 30:
            skipped.append(f"resume K={k}: time guard")
            continue
        src = b.noise(1)  # a mid-trajectory latent's values do not change the cost
        ts = b.timed(functools.partial(b.run, 1, steps, start=k, latents=src), repeats)
        r = _median(ts)
        resumed.append({"k": k, "seconds": round(r, 4), "ratio_to_full": round(r / res["full_s"], 4),
                        "ideal_ratio": round((steps - k) / steps, 4),
                        "saved_fraction": round(1 - r / res["full_s"], 4)})  # fmt: skip
    res["resumed"] = resumed
    say("resumed: " + ", ".join(f"K={r['k']} {r['ratio_to_full']:.3f}" for r in resumed))

    # Batch scaling.
    scaling = []
    for bs in batches:
        if left() < 30:
            skipped.append(f"batch {bs}: time guard")
            continue
        with torch.inference_mode():
            b.scheduler.set_timesteps(steps, device=b.device)
            xb, cb, tb = b.noise(bs), b.cond(bs), b.scheduler.timesteps[0]
            st = _median(b.timed(functools.partial(b.step, xb, tb, cb), max(5, repeats * 3)))
            dt = _median(b.timed(functools.partial(b.decode, xb), repeats))
        run_s = steps * st + dt
        scaling.append({"batch": bs, "step_ms": round(1000 * st, 3), "decode_ms": round(1000 * dt, 3),
                        "run_s_est": round(run_s, 4), "images_per_s": round(bs / run_s, 3),
                        "step_ms_per_image": round(1000 * st / bs, 3)})  # fmt: skip
    res["batch_scaling"] = scaling
    say("batch: " + ", ".join(f"{s['batch']}: {s['images_per_s']} img/s" for s in scaling))

    # The engine core over the same UNet: a mixed workload (misses, hits at the trace's K mix) per max batch.
    if left() < 90:
        skipped.append("engine batching: time guard")
        res["engine_batching"] = None
    else:
        from nirvana.bench.batching import PIXEL_TOLERANCE, batch_sweep, workload

        comps = b.components()
        n = 4 if tiny else max(16, 2 * max(batches))
        # fp16/bf16 round per forward far more than fp32: one 8-bit level is the bar there.
        tol = PIXEL_TOLERANCE if dtype == "fp32" else 2 / 255
        res["engine_batching"] = batch_sweep(comps, workload(comps, n, steps), batches, tol, say)
        eb = res["engine_batching"]
        say(f"engine core: best max batch {eb['best_max_batch']} ({eb['best_ratio_vs_batch1']}x), "
            f"equivalent {eb['equivalent']}")  # fmt: skip
    if cuda:
        res["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    # Cache overhead beside it.
    if left() < 60:
        skipped.append("cache overhead: time guard")
        res["cache"] = None
    else:
        try:
            res["cache"] = _cache_overhead(b, cache_entries, cache_queries, database_url, embedder)
            c = res["cache"]
            c["overhead_in_steps"] = round(c["total_ms_p50"] / res["step_ms"], 3)
            c["overhead_fraction_of_full_run"] = round(c["total_ms_p50"] / 1000 / res["full_s"], 5)
            say(f"cache overhead {c['total_ms_p50']} ms/request = {c['overhead_in_steps']} steps")
        except (RuntimeError, ImportError, OSError) as e:
            skipped.append(f"cache overhead: {type(e).__name__}: {e}")
            res["cache"] = None
    res["skipped"] = skipped
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    return res


def main(argv: list[str] | None = None) -> int:
    """``python -m nirvana.bench.gpu [--allow-cpu --tiny] [--json] [--out DIR]``."""
    ap = argparse.ArgumentParser(prog="python -m nirvana.bench.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--allow-cpu", action="store_true", help="allow a CPU run (only with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny config of the same structure (smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    ap.add_argument("--cache-entries", type=int, default=3000)
    ap.add_argument("--cache-queries", type=int, default=200)
    ap.add_argument("--embedder", default="minilm", choices=("minilm", "none"))
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--max-seconds", type=float, default=420.0)
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    a = ap.parse_args(argv)
    try:
        res = run_gpu_bench(
            allow_cpu=a.allow_cpu,
            tiny=a.tiny,
            repeats=a.repeats,
            batches=tuple(int(v) for v in a.batches.split(",") if v.strip()),
            dtype=a.dtype,
            cache_entries=a.cache_entries,
            cache_queries=a.cache_queries,
            database_url=a.database_url,
            embedder=a.embedder,
            max_seconds=a.max_seconds,
        )
    except GpuUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_outputs(res, a.out)
    if a.json:
        print(json.dumps(res, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
