"""The engine core: batched rows equal the same requests rendered alone, hits join at their own K, rows leave
independently; the engine loop serves requests from other threads. Bundled model and tiny random-weight SD."""

from __future__ import annotations

import threading

import pytest
import torch

from nirvana.engine.core import EngineCore, GenerationCancelled, RenderRequest, RowResult
from nirvana.engine.loader import ModelComponents, load_model
from nirvana.engine.loop import EngineLoop
from nirvana.engine.tiny import build_tiny_sd

BATCH_TOLERANCE = 1e-4  # max abs image diff, fp32 on CPU (values in [-1, 1])
# The bundled model denoises in pixel space: a batch-size-dependent GEMM/conv rounding of ~3e-6 in one forward
# (measured, batch 8 vs 1) reaches the image through DDIM's 1/sqrt(alpha_bar) at high noise (measured 2.5e-4).
# 1e-3 is still 1/8 of one 8-bit level: the PNGs are the same.
PIXEL_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> ModelComponents:
    return load_model(str(build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")), device="cpu")


@pytest.fixture(scope="module")
def bundled() -> ModelComponents:
    return load_model("bundled", device="cpu")


def _sources(c: ModelComponents, steps: list[int]) -> dict[tuple[int, int], object]:
    """States of one source prompt for each step count, keyed (steps, k)."""
    out = {}
    for n in steps:
        ks = tuple(sorted({max(1, n // 5), max(2, n // 2)}))
        (res,) = EngineCore(c, max_batch=1).run(
            [RenderRequest("a blue square on a red background", 3, steps=n, capture=ks)]
        )
        for s in res.states:
            out[(n, s.step)] = s
    return out


def _mixed_requests(c: ModelComponents, guidance_hi: float) -> list[RenderRequest]:
    """Misses and hits at different K, guidance (with and without CFG) and step counts."""
    src = _sources(c, [12, 20])
    hits = sorted(src)
    return [
        RenderRequest("a small green circle", seed=1, steps=20, guidance=guidance_hi, capture=(4, 10)),
        RenderRequest("a large yellow triangle", seed=2, steps=12, guidance=1.0),
        RenderRequest("a blue square", seed=3, steps=hits[0][0], guidance=guidance_hi, start=src[hits[0]]),  # type: ignore[arg-type]
        RenderRequest("a red square", seed=4, steps=hits[-1][0], guidance=1.0, start=src[hits[-1]]),  # type: ignore[arg-type]
        RenderRequest("a purple star", seed=5, steps=20, guidance=guidance_hi, negative_prompt="blurry"),
        RenderRequest("a blue disc", seed=6, steps=hits[1][0], guidance=guidance_hi, start=src[hits[1]]),  # type: ignore[arg-type]
    ]


def _assert_batched_equals_solo(
    c: ModelComponents, reqs: list[RenderRequest], max_batch: int, tol: float = BATCH_TOLERANCE
) -> list[RowResult]:
    batched = EngineCore(c, max_batch=max_batch).run(reqs)
    assert max(r.batch_rows for r in batched) > 1  # they really shared forwards
    for req, b in zip(reqs, batched, strict=True):
        (solo,) = EngineCore(c, max_batch=1).run([req])
        assert b.error is None and solo.error is None
        assert b.image is not None and solo.image is not None
        diff = (b.image - solo.image).abs().max().item()
        assert diff <= tol, f"{req.prompt!r} (start {b.start_step}): max diff {diff}"
        assert b.start_step == solo.start_step and b.steps_run == solo.steps_run
        assert [s.step for s in b.states] == [s.step for s in solo.states]
        for x, y in zip(b.states, solo.states, strict=True):
            assert (x.latent - y.latent).abs().max().item() <= tol
    return batched


def test_batched_equals_solo_tiny_sd(tiny_sd: ModelComponents) -> None:
    reqs = _mixed_requests(tiny_sd, guidance_hi=7.5)
    out = _assert_batched_equals_solo(tiny_sd, reqs, max_batch=8)
    assert [r.start_step > 0 for r in out] == [False, False, True, True, False, True]
    assert out[0].steps_run == 20 and [s.step for s in out[0].states] == [4, 10]


def test_batched_equals_solo_bundled(bundled: ModelComponents) -> None:
    _assert_batched_equals_solo(bundled, _mixed_requests(bundled, guidance_hi=1.25), 8, PIXEL_TOLERANCE)


def test_rows_beyond_max_batch_wait_and_join_later(tiny_sd: ModelComponents) -> None:
    """With room for 2 rows, 6 requests still all finish, each equal to its solo render."""
    reqs = _mixed_requests(tiny_sd, guidance_hi=3.0)
    core = EngineCore(tiny_sd, max_batch=2)
    for r in reqs:
        core.submit(r)
    peak = 0
    done: list[RowResult] = []
    while core.has_work:
        done += core.step()
        peak = max(peak, len(core.active))
    assert peak <= 2 and len(done) == len(reqs)
    by_req = {id(r.request): r for r in done}
    for req in reqs:
        (solo,) = EngineCore(tiny_sd, max_batch=1).run([req])
        img = by_req[id(req)].image
        assert img is not None and solo.image is not None
        assert (img - solo.image).abs().max().item() <= BATCH_TOLERANCE


def test_a_solo_request_runs_alone(tiny_sd: ModelComponents) -> None:
    """A ``solo`` request (the service's rerun after a worker death) joins only an empty batch and nothing joins
    while it runs; the requests behind it wait, and every image still equals its own render."""
    from dataclasses import replace

    reqs = _mixed_requests(tiny_sd, guidance_hi=3.0)[:4]
    reqs[1] = replace(reqs[1], solo=True)
    core = EngineCore(tiny_sd, max_batch=8)
    for r in reqs:
        core.submit(r)
    batches: list[list[int]] = []  # which requests were active together, per iteration
    done: list[RowResult] = []
    while core.has_work:
        done += core.step()
        batches.append(sorted(reqs.index(r.req) for r in core.active))
    admitted = [set(b) for b in batches if b]
    assert {1} in admitted  # the solo row ran on its own ...
    assert all(b == {1} or 1 not in b for b in admitted)  # ... and never with another row
    order = [reqs.index(r.request) for r in done]
    assert order.index(0) < order.index(1) < order.index(2)  # first come, first served around it
    by_req = {id(r.request): r for r in done}
    for req in reqs:
        (alone,) = EngineCore(tiny_sd, max_batch=1).run([req])
        img = by_req[id(req)].image
        assert img is not None and alone.image is not None
        assert (img - alone.image).abs().max().item() <= BATCH_TOLERANCE


def test_cancelling_one_row_leaves_the_others(tiny_sd: ModelComponents) -> None:
    def cancel_at_3(i: int, n: int) -> None:
        if i == 3:
            raise GenerationCancelled()

    reqs = [
        RenderRequest("a red cat", seed=1, steps=10, callback=cancel_at_3),
        RenderRequest("a green tree", seed=2, steps=10),
    ]
    out = EngineCore(tiny_sd, max_batch=4).run(reqs)
    assert isinstance(out[0].error, GenerationCancelled) and out[0].image is None
    (solo,) = EngineCore(tiny_sd, max_batch=1).run([reqs[1]])
    assert out[1].error is None and out[1].image is not None and solo.image is not None
    assert (out[1].image - solo.image).abs().max().item() <= BATCH_TOLERANCE


def test_bad_state_fails_only_its_row(tiny_sd: ModelComponents) -> None:
    (src,) = EngineCore(tiny_sd).run([RenderRequest("a red cat", 1, steps=10, capture=(5,))])
    state = src.states[0]
    wrong = type(state)(torch.full_like(state.latent, float("nan")), 5, 10, state.timestep, "ddim", state.model_key)
    out = EngineCore(tiny_sd, max_batch=4).run(
        [RenderRequest("a red cat", 1, steps=10, start=wrong), RenderRequest("a green tree", 2, steps=10)]
    )
    assert isinstance(out[0].error, ValueError) and "NaN" in str(out[0].error)
    assert out[1].error is None and out[1].image is not None


def test_engine_loop_batches_requests_from_threads(tiny_sd: ModelComponents) -> None:
    """Requests submitted from several threads share forwards and each equals its solo render."""
    reqs = _mixed_requests(tiny_sd, guidance_hi=5.0)
    results: dict[int, RowResult] = {}
    with EngineLoop(EngineCore(tiny_sd, max_batch=8), max_wait_ms=50) as loop:

        def go(i: int) -> None:
            results[i] = loop.run(reqs[i])

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        with pytest.raises(ValueError, match="steps"):
            loop.submit(RenderRequest("x", steps=0))
    assert len(results) == len(reqs)
    assert max(r.batch_rows for r in results.values()) > 1
    for i, req in enumerate(reqs):
        (solo,) = EngineCore(tiny_sd, max_batch=1).run([req])
        img = results[i].image
        assert img is not None and solo.image is not None
        assert (img - solo.image).abs().max().item() <= BATCH_TOLERANCE


def test_loop_length_follows_the_schedule(tiny_sd: ModelComponents) -> None:
    """The loop runs every timestep the scheduler has (len(timesteps)), and progress reports that count."""
    seen: list[tuple[int, int]] = []
    (out,) = EngineCore(tiny_sd).run(
        [RenderRequest("a red cat", 1, steps=7, callback=lambda i, n: seen.append((i, n)))]
    )
    assert out.steps_run == 7 and seen[-1] == (7, 7) and len(seen) == 7


def test_bad_max_batch() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        EngineCore(None, max_batch=0)  # type: ignore[arg-type]
