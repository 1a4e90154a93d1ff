"""``nirvana bench trace``: replay the real dreambot trace through the real cache path with a cost model.

Each request of the ordered trace goes through :class:`nirvana.cache.core.ApproximateCache` exactly as the router
runs it — exact tier, novelty gate (shadow mode), pgvector nearest on PostgreSQL, similarity → K table — and is
then recorded with :meth:`~nirvana.cache.core.ApproximateCache.record_virtual` (rows with byte sizes, no
tensors), with eviction on PostgreSQL whenever the stored bytes exceed the budget. Rendering is replaced by a
cost model: a request of N steps at W×H costs ``N × c₅₁₂ × W·H/512²`` GPU seconds, ``c₅₁₂`` measured from the
trace's own "Dreamt in Xs" times; a hit at K skips K steps, an exact hit all N.

Replay model (stated in every report):
    * One cache (one database, one global byte budget) for all channels; each channel is its own tenant, so
      entries are never shared across channels. ``model_key`` = ``sd-v1-beta/<W>x<H>/<sampler>``; states are
      only reused by requests with the same number of steps (``CacheIndex.usable_states``).
    * Channel files are each replayed in their order and merged by an interpolated wall clock (the trace's
      sparse unix-time anchors, ``krea_time_anchors.csv``); the cache clock is that time, so decayed counters
      age as they did in the beta.
    * One trajectory per request (its first image); ``n_images`` is ignored for caching and bytes.
    * Bytes per state: a 4×(H/8)×(W/8) latent, fp32 = 16 bytes per latent pixel (64 KiB at 512²); other codecs
      use the compressed size measured on SD-like mid-trajectory latents (:func:`measure_state_bytes`).
      The exact tier stores the final image as PNG, accounted at ``image_bytes_per_pixel`` (an assumption).

Embeddings are computed once per distinct prompt and kept on disk (:class:`EmbeddingCache`, content-addressed
by a hash of the text, under ``<data_dir>/bench/trace-emb``; never in git).

Modules, one concern each:
    * :mod:`~nirvana.bench.trace.load`: trace files → the ordered, timed request stream.
    * :mod:`~nirvana.bench.trace.embeddings`: prompt embeddings, once per distinct prompt, on disk.
    * :mod:`~nirvana.bench.trace.costs`: the size model (bytes per state and image) and the step cost.
    * :mod:`~nirvana.bench.trace.policies`: the compared cache configurations.
    * :mod:`~nirvana.bench.trace.replayer`: one replay through a fresh cache → one row.
    * :mod:`~nirvana.bench.trace.server`: the PostgreSQL server the replays' databases live on.
    * :mod:`~nirvana.bench.trace.checkpoints`: replay fingerprints and the checkpoint file (``--resume``).
    * :mod:`~nirvana.bench.trace.forked`: replays in forked worker processes (``--jobs``).
    * :mod:`~nirvana.bench.trace.runner`: the whole run (headline and sweep) → the result dict.
    * :mod:`~nirvana.bench.trace.report`: markdown, plots and the console headline of that dict.

This package re-exports their public names, so ``from nirvana.bench.trace import X`` keeps working.
"""

from nirvana.bench.trace.checkpoints import replay_fingerprint, requests_digest
from nirvana.bench.trace.costs import (
    DEFAULT_IMAGE_BYTES_PER_PIXEL,
    FP32_BYTES_PER_LATENT_PIXEL,
    STATES_PER_PROMPT,
    SizeModel,
    measure_state_bytes,
    sd_like_states,
    step_cost_512,
)
from nirvana.bench.trace.embeddings import EmbeddingCache, embed_with_cache
from nirvana.bench.trace.load import (
    DEFAULT_CFG,
    DEFAULT_N_IMAGES,
    DEFAULT_SAMPLER,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    MAX_PROMPT_CHARS,
    TRACE_COLUMNS,
    TraceRequest,
    assign_times,
    default_trace_files,
    load_anchors,
    load_replay,
    merge_by_time,
    parse_flags,
    parse_row,
    read_trace,
)
from nirvana.bench.trace.policies import PolicySpec, ablation_specs, calibrated_table_path, default_specs
from nirvana.bench.trace.replayer import replay
from nirvana.bench.trace.report import format_headline, progress_plot, trace_markdown, trace_plot
from nirvana.bench.trace.runner import DEFAULT_SWEEP_BUDGETS, run_trace_bench
from nirvana.bench.trace.server import PostgresServer

__all__ = [
    "DEFAULT_CFG",
    "DEFAULT_IMAGE_BYTES_PER_PIXEL",
    "DEFAULT_N_IMAGES",
    "DEFAULT_SAMPLER",
    "DEFAULT_SIZE",
    "DEFAULT_STEPS",
    "DEFAULT_SWEEP_BUDGETS",
    "FP32_BYTES_PER_LATENT_PIXEL",
    "MAX_PROMPT_CHARS",
    "STATES_PER_PROMPT",
    "TRACE_COLUMNS",
    "EmbeddingCache",
    "PolicySpec",
    "PostgresServer",
    "SizeModel",
    "TraceRequest",
    "ablation_specs",
    "assign_times",
    "calibrated_table_path",
    "default_specs",
    "default_trace_files",
    "embed_with_cache",
    "format_headline",
    "load_anchors",
    "load_replay",
    "measure_state_bytes",
    "merge_by_time",
    "parse_flags",
    "parse_row",
    "progress_plot",
    "read_trace",
    "replay",
    "replay_fingerprint",
    "requests_digest",
    "run_trace_bench",
    "sd_like_states",
    "step_cost_512",
    "trace_markdown",
    "trace_plot",
]
