"""The report of ``nirvana bench gpu``: markdown of the result dict, and the files written for it.

Owns :func:`gpu_markdown` (step and decode times, resumed vs full runs, batch scaling, the cache's overhead per
request, the engine core's step-level batching) and :func:`write_outputs` (``gpu.json`` and ``gpu.md``). Reads only
the dict :func:`nirvana.bench.gpu.run_gpu_bench` returns (or its JSON).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _engine_batching_md(res: dict[str, Any]) -> list[str]:
    eb = res.get("engine_batching")
    if not eb:
        return []
    from nirvana.bench.batching import format_table

    return ["", "## Engine core: step-level batching (mixed misses and hits)", "", format_table(eb)]


def gpu_markdown(res: dict[str, Any]) -> str:
    """The markdown report of :func:`nirvana.bench.gpu.run_gpu_bench`."""
    from nirvana.bench.report import md_table

    lines = [
        f"# bench gpu ({res['mode']}, {res['device']}, {res['dtype']})",
        "",
        f"Random-weight UNet {res['unet_params_m']}M + VAE {res['vae_params_m']}M params, {res['image_size']}² "
        f"images (latents {res['latent_shape']}), {res['steps']} DDIM steps, {res['guidance']}. "
        f"Wall time {res['wall_s']} s.",
        "",
        f"Step {res['step_ms']} ms (batch 1), VAE decode {res['decode_ms']} ms, full run {res['full_s']} s.",
        "",
        "## Resumed runs (batch 1)",
        "",
        md_table(["K", "seconds", "ratio to full", "ideal (N-K)/N", "saved"],
                 [[r["k"], r["seconds"], r["ratio_to_full"], r["ideal_ratio"], r["saved_fraction"]]
                  for r in res["resumed"]]),
        "",
        "## Batch scaling",
        "",
        md_table(["batch", "step ms", "step ms / image", "decode ms", "images/s"],
                 [[s["batch"], s["step_ms"], s["step_ms_per_image"], s["decode_ms"], s["images_per_s"]]
                  for s in res["batch_scaling"]]),
    ]  # fmt: skip
    c = res.get("cache")
    if c:
        lines += [
            "",
            f"## Cache overhead per request ({c['entries']:,} entries, {c['queries']} near-duplicate queries, "
            f"{c['codec']})",
            "",
            md_table(
                ["part", "p50 ms", "p99 ms"],
                [
                    ["embed (MiniLM, CPU, 1 prompt)", c["embed_ms_p50"] or "-", c["embed_ms_p99"] or "-"],
                    ["lookup (exact tier + pgvector + K)", c["lookup_ms_p50"], c["lookup_ms_p99"]],
                    ["fetch + decode latent", c["fetch_decode_ms_p50"], c["fetch_decode_ms_p99"]],
                    ["copy to device", c["h2d_ms_p50"] or "-", "-"],
                    ["total", c["total_ms_p50"], "-"],
                ],
            ),
            "",
            f"Overhead = {c['overhead_in_steps']} denoising steps = {c['overhead_fraction_of_full_run']:.2%} of a "
            f"full run ({c['hits']}/{c['queries']} lookups hit).",
        ]
    lines += _engine_batching_md(res)
    if res["skipped"]:
        lines += ["", "Skipped: " + "; ".join(res["skipped"])]
    return "\n".join(lines)


def write_outputs(res: dict[str, Any], out: Path) -> dict[str, Path]:
    """``gpu.json`` and ``gpu.md`` in ``out``; prints the markdown."""
    from nirvana.bench.report import write_report

    md = gpu_markdown(res)
    print(md)
    return write_report(out, "gpu", res, md)
