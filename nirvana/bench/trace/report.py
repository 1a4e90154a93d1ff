"""The report of ``bench trace``: markdown, plots and the console headline, all from the run's result dict.

Owns :func:`trace_markdown` (headline, hits by K, gate, router throughput, channels, progress along the trace,
budget sweep), the two figures (:func:`trace_plot`, steps saved vs budget; :func:`progress_plot`, steps saved along
the trace) and :func:`format_headline`. Reads only the dict :func:`~nirvana.bench.trace.runner.run_trace_bench`
returns (or its JSON).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from nirvana.bench.trace.replayer import k_order


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def _line_plot(
    path: Path, draw: Callable[[Any], None], xlabel: str, ylabel: str, title: str, *, xlog: bool = False
) -> Path:
    """One figure of the report: ``draw(ax)`` adds the lines, the rest (labels, grid, legend, file) is shared."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw(ax)
    if xlog:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def trace_plot(res: dict[str, Any], path: Path) -> Path | None:
    """Steps saved vs budget (prompts), one line per policy; the unbounded ceiling as a horizontal line."""
    rows = res["sweep"]["rows"]
    if not rows:
        return None

    def draw(ax: Any) -> None:
        by: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if r["budget_prompts"] is None:
                ax.axhline(r["steps_saved_fraction"], ls="--", color="grey", label=f"{r['policy']} (ceiling)")
            else:
                by.setdefault(r["policy"], []).append((r["budget_prompts"], r["steps_saved_fraction"]))
        for name, pts in sorted(by.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)

    return _line_plot(path, draw, "budget (prompts' worth of five fp32 512² states)",
                      "steps saved (Σ skipped / Σ requested)",
                      f"dreambot trace replay, {res['sweep']['requests']:,} requests", xlog=True)  # fmt: skip


def progress_plot(res: dict[str, Any], path: Path) -> Path | None:
    """Steps saved after the first N requests vs N, one line per headline policy (None without snapshots)."""
    prog = {n: pts for n, pts in res.get("progress", {}).items() if len(pts) > 1}
    if not prog:
        return None

    def draw(ax: Any) -> None:
        for name, pts in sorted(prog.items(), key=lambda kv: -kv[1][-1]["steps_saved_fraction"]):
            ax.plot([p["requests"] for p in pts], [p["steps_saved_fraction"] for p in pts], marker="o", label=name)
        ax.set_ylim(bottom=0)  # ratios between policies read off the axis as drawn

    title = f"dreambot trace, budget {res['budget_prompts']:,} prompts: steps saved along the trace"
    return _line_plot(path, draw, "requests replayed (time-ordered trace)",
                      "steps saved so far (Σ skipped / Σ requested)", title)  # fmt: skip


def trace_markdown(res: dict[str, Any], plot: Path | None = None, progress: Path | None = None) -> str:
    """The markdown report of :func:`run_trace_bench`."""
    from nirvana.bench.report import md_table

    pol = res["policies"]
    lines = [
        f"# bench trace: {res['requests']:,} requests, budget {res['budget_prompts']:,} prompts "
        f"({_mib(res['budget_bytes'])} MiB)",
        "",
        f"Replay model: {res['replay_model']}.",
        f"Requests per channel limit: {res['requests_per_channel_limit'] or 'none (whole files)'}; "
        f"wall time {res['wall_s']} s.",
        f"Cost model: step cost {res['step_cost_s_512']} s at 512² ({res['step_cost_source']}), × pixels/512².",
        f"Sizes: fp32 state 64 KiB at 512²; fp16-zstd {res['codec_bytes']['fp16-zstd']['mean_bytes']:.0f} B "
        f"(ratio {res['codec_bytes']['fp16-zstd']['ratio_to_fp32']}, measured on SD-like latents); "
        f"PNG image {res['image_bytes_512']:,} B at 512² (assumed {res['image_bytes_per_pixel']} B/px).",
        "",
        "## Headline",
        "",
    ]
    rows = []
    for name, r in pol.items():
        rows.append([
            name, r["requests"], r["hit_rate"], r["exact_rate"], r["approximate_rate"], r["steps_saved_fraction"],
            r["gpu_seconds_saved_fraction"], _mib(r["bytes"]), _mib(r["peak_bytes"]), r["prompts_stored"],
            r["timing"]["ms_per_request"],
        ])  # fmt: skip
    lines.append(md_table(["policy", "requests", "hit rate", "exact", "approx", "steps saved", "GPU-s saved",
                           "MiB stored", "MiB peak", "prompts", "ms/req"], rows))  # fmt: skip
    lines += ["", "Policies:", ""]
    lines += [f"- `{n}`: {r.get('note', '')} (table: {r.get('table', 'paper')})" for n, r in pol.items()]
    ks = sorted({k for r in pol.values() for k in r["k_hist"]}, key=k_order)
    lines += ["", "## Hits by K (the table's K at N = 50; share of each policy's hits)", ""]
    krows = []
    for n, r in pol.items():
        tot = max(sum(r["k_hist"].values()), 1)
        krows.append([n] + [round(r["k_hist"].get(k, 0) / tot, 3) for k in ks])
    lines.append(md_table(["policy"] + [f"K={k}" if k != "exact" else "exact" for k in ks], krows))
    gated = {n: r["gate"] for n, r in pol.items() if r.get("gate")}
    if gated:
        lines += ["", "## Novelty gate (shadow mode: the lookup still ran)", ""]
        lines.append(md_table(
            ["policy", "decisions", "novel (lookups avoided)", "share of requests", "hits lost", "share of approx hits",
             "steps saved if enforced"],
            [[n, g["decisions"], g["novel"], g["lookups_avoided_fraction"], g["hits_lost"],
              g["hits_lost_fraction_of_hits"], g["steps_saved_fraction_if_enforced"]] for n, g in gated.items()],
        ))  # fmt: skip
    r = res["router"]
    lines += [
        "",
        "## Router throughput",
        "",
        f"{res['router_prompts_per_s']} prompts/s = 1 / (embed {r['embed_ms_per_prompt']} ms/prompt (batched MiniLM) "
        f"+ cache path {r['cache_ms_per_request']} ms/request (lookup + record + amortised eviction and gate refits, "
        f"policy `{r['measured_on']}`)), one process, wall-clock on a shared 2-core machine (this run was niced "
        f"below other work, so these are pessimistic). CPU time: embedding {r.get('embed_cpu_ms_per_prompt')} ms per "
        f"prompt, cache client (Python) {r.get('cache_client_cpu_ms_per_request')} ms per request, PostgreSQL's "
        "share not included.",
    ]
    chans = sorted({c for r in pol.values() for c in r["by_channel"]})
    if chans:
        lines += ["", "## Steps saved by channel", ""]
        lines.append(md_table(["policy", *chans],
                              [[n] + [r["by_channel"].get(c, {}).get("steps_saved_fraction", "-") for c in chans]
                               for n, r in pol.items()]))  # fmt: skip
    prog = {n: pts for n, pts in res.get("progress", {}).items() if len(pts) > 1}
    if prog:
        ns = sorted({p["requests"] for pts in prog.values() for p in pts})
        lines += ["", "## Steps saved along the trace (after the first N requests; prefix snapshots)", ""]
        lines.append(md_table(["policy"] + [f"{n:,}" for n in ns],
                              [[name] + [{p["requests"]: p["steps_saved_fraction"] for p in pts}.get(n, "-")
                                         for n in ns] for name, pts in prog.items()]))  # fmt: skip
        if progress is not None:
            lines += ["", f"![steps saved along the trace]({Path(progress).name})"]
    sw = res["sweep"]
    if sw["rows"]:
        budgets = sw["budgets_prompts"]
        lines += [
            "",
            f"## Budget sweep ({sw['requests']:,} requests: "
            f"{sw['requests_per_channel_limit'] or 'all'} per channel; steps saved)",
            "",
        ]
        table: dict[str, dict[Any, float]] = {}
        for row in sw["rows"]:
            table.setdefault(row["policy"], {})[row["budget_prompts"]] = row["steps_saved_fraction"]
        heads = ["policy"] + [f"{b:,} prompts" for b in budgets] + ["unbounded"]
        lines.append(md_table(heads, [[n] + [v.get(b, "-") for b in budgets] + [v.get(None, "-")]
                                      for n, v in table.items()]))  # fmt: skip
        if plot is not None:
            lines += ["", f"![steps saved vs budget]({Path(plot).name})"]
    if res["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines)


def format_headline(res: dict[str, Any]) -> str:
    """A short console table of the headline run."""
    out = [f"{'policy':<16} {'hit':>6} {'exact':>6} {'steps saved':>11} {'MiB':>9} {'ms/req':>7}"]
    for n, r in res["policies"].items():
        out.append(f"{n:<16} {r['hit_rate']:>6.3f} {r['exact_rate']:>6.3f} {r['steps_saved_fraction']:>11.3f} "
                   f"{r['bytes'] / 2**20:>9.1f} {r['timing']['ms_per_request']:>7.2f}")  # fmt: skip
    out.append(f"router: {res['router_prompts_per_s']} prompts/s")
    return "\n".join(out)
