"""Model families behind the engine core: SDXL (UNet with text_time), SD3 and Flux (flow-matching transformers).

Every model is a tiny random-weight pipeline built in code and saved with ``save_pretrained`` (offline, CPU).
For each family: resuming a captured state reproduces the full run, a batch of misses and hits at different K,
guidance and step counts equals each request rendered alone, states are stored unpacked (C, H, W), and a miss
renders the same image as the stock diffusers pipeline (the adapter feeds the network what diffusers feeds it).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from nirvana.engine.core import EngineCore, RenderRequest, RowResult
from nirvana.engine.denoisers import FluxDenoiser, pack_latents, unpack_latents
from nirvana.engine.latents import VaeSpace
from nirvana.engine.loader import ModelComponents, load_model
from nirvana.engine.state import CapturedState
from nirvana.engine.text import SD3PromptEncoder
from nirvana.engine.tiny import build_tiny_flux, build_tiny_sd, build_tiny_sd3, build_tiny_sdxl

RESUME_TOLERANCE = 1e-5  # DDIM/Euler/flow-matching Euler steps are stateless: resuming is exact up to rounding
BATCH_TOLERANCE = 1e-4  # batch-size-dependent GEMM rounding, fp32 on CPU (image values in [-1, 1])
STOCK_TOLERANCE = 1e-4  # engine vs the stock diffusers pipeline on the same seed

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "sdxl": build_tiny_sdxl,
    "sd3": build_tiny_sd3,
    "flux": build_tiny_flux,
}
ADAPTER = {"sdxl": "unet", "sd3": "sd3", "flux": "flux"}
PROMPT = "a red cat"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models: one thread is as fast, and immune to oversubscription when other processes share the CPUs.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request: pytest.FixtureRequest, root: Path) -> tuple[str, Path, ModelComponents]:
    name: str = request.param
    path = BUILDERS[name](root / name)
    return name, path, load_model(str(path), device="cpu")


def _run1(c: ModelComponents, req: RenderRequest) -> RowResult:
    (res,) = EngineCore(c, max_batch=1).run([req])
    assert res.error is None, res.error
    assert res.image is not None
    return res


# -- per family -------------------------------------------------------------------------------------------------
def test_loads_with_its_adapter(family: tuple[str, Path, ModelComponents]) -> None:
    name, _, c = family
    assert c.denoiser.family == ADAPTER[name]
    expected = "euler" if name == "sdxl" else "flowmatch-euler"
    assert c.scheduler_family == expected
    assert c.sample_size == (32, 32)
    assert c.size_multiple == 8  # VAE factor 4 × (UNet's one down-sampling | SD3 patch 2 | Flux 2×2 packing)
    with pytest.raises(ValueError, match="height"):
        EngineCore(c).validate(RenderRequest(PROMPT, height=36))


def test_resume_is_exact_and_states_are_unpacked(family: tuple[str, Path, ModelComponents]) -> None:
    name, _, c = family
    full = _run1(c, RenderRequest(PROMPT, seed=7, steps=12, guidance=4.0, capture=(3, 6, 9)))
    assert [s.step for s in full.states] == [3, 6, 9]
    for state in full.states:
        # Unpacked (C, H, W) with C = latent channels, whatever the network eats (Flux: packed 2×2 tokens).
        assert tuple(state.latent.shape) == (c.space.channels, 8, 8)
        assert state.latent.dtype == torch.float32
        resumed = _run1(c, RenderRequest(PROMPT, seed=7, steps=12, guidance=4.0, start=state))
        assert resumed.start_step == state.step
        assert resumed.steps_run == 12 - state.step
        assert full.image is not None and resumed.image is not None
        diff = (resumed.image - full.image).abs().max().item()
        assert diff <= RESUME_TOLERANCE, f"{name} K={state.step}: max diff {diff}"


def _mixed(c: ModelComponents) -> list[RenderRequest]:
    """Misses and hits at different K, guidance (CFG twins for some rows only) and step counts."""
    src = _run1(c, RenderRequest("a blue square", seed=3, steps=12, guidance=4.0, capture=(3, 6)))
    k3, k6 = src.states
    src8 = _run1(c, RenderRequest("a green field", seed=4, steps=8, capture=(4,))).states[0]
    return [
        RenderRequest("a small green circle", seed=1, steps=10, guidance=4.5, capture=(4,)),
        RenderRequest("a large yellow triangle", seed=2, steps=12, guidance=1.0),
        RenderRequest("a blue square on grass", steps=12, guidance=4.5, start=k3),
        RenderRequest("a red square", steps=12, guidance=0.0, start=k6),
        RenderRequest("a purple star", seed=5, steps=8, guidance=7.0, negative_prompt="blurry"),
        RenderRequest("a blue disc", steps=8, guidance=3.0, start=src8),
        RenderRequest("a red disc", steps=12, guidance=2.0, start=k6),
    ]


@pytest.mark.parametrize("max_batch", [8, 3])  # 3: rows wait and join a batch already in flight
def test_batched_equals_unbatched(family: tuple[str, Path, ModelComponents], max_batch: int) -> None:
    name, _, c = family
    reqs = _mixed(c)
    batched = EngineCore(c, max_batch=max_batch).run(reqs)
    assert max(r.batch_rows for r in batched) > 1  # really batched
    for req, got in zip(reqs, batched, strict=True):
        assert got.error is None, got.error
        solo = _run1(c, copy.copy(req))
        assert got.start_step == solo.start_step
        assert [s.step for s in got.states] == [s.step for s in solo.states]
        assert got.image is not None and solo.image is not None
        diff = (got.image - solo.image).abs().max().item()
        assert diff <= BATCH_TOLERANCE, f"{name} {req.prompt!r} (max_batch={max_batch}): max diff {diff}"


def _stock_image(
    name: str, path: Path, c: ModelComponents, steps: int, guidance: float, seed: int, **extra: object
) -> torch.Tensor:
    """The stock diffusers pipeline's image for PROMPT, mapped to the engine's [-1, 1]."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    kwargs: dict = {"negative_prompt": ""} if name == "sdxl" else {}  # SDXL zeroes a *missing* negative prompt
    if name in ("sd3", "flux"):
        kwargs["max_sequence_length"] = c.encoder.max_sequence_length  # type: ignore[attr-defined]
    out = pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=32,
        width=32,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pt",
        **kwargs,
        **extra,
    ).images[0]
    return out * 2 - 1


def test_miss_matches_stock_pipeline(family: tuple[str, Path, ModelComponents]) -> None:
    name, path, c = family
    steps, guidance, seed = 8, 4.0, 11
    got = _run1(c, RenderRequest(PROMPT, seed=seed, steps=steps, guidance=guidance))
    assert got.image is not None
    extra: dict[str, object] = {}
    if name == "flux":
        # FluxPipeline's schedule: sigmas linspace(1, 1/N, N), shifted by mu; the core asks the adapter for it.
        sched = EngineCore(c)._schedule(steps, 32, 32)
        stock = copy.deepcopy(c.scheduler)
        stock.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=c.denoiser.timestep_kwargs(32, 32)["mu"])
        assert torch.allclose(sched.sigmas, stock.sigmas)
    want = _stock_image(name, path, c, steps, guidance, seed, **extra)
    diff = (got.image - want).abs().max().item()
    assert diff <= STOCK_TOLERANCE, f"{name}: engine vs stock pipeline max diff {diff}"


# -- SD3 --------------------------------------------------------------------------------------------------------
def test_sd3_encoder_matches_stock_encode_prompt(root: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    for t5 in (True, False):
        path = build_tiny_sd3(root / f"sd3-encode-t5-{t5}", t5=t5)
        c = load_model(str(path), device="cpu")
        enc = c.encoder
        assert isinstance(enc, SD3PromptEncoder)
        assert (enc.t5_encoder is not None) == t5
        got = enc.encode([PROMPT, "a blue dog"])
        # Stock loading of a T5-less folder needs the absent parts named (the loader does that from the index).
        absent = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
        pipe = StableDiffusion3Pipeline.from_pretrained(str(path), **absent)
        with torch.no_grad():
            want, _, pooled, _ = pipe.encode_prompt(
                [PROMPT, "a blue dog"],
                None,
                None,
                do_classifier_free_guidance=False,
                max_sequence_length=enc.max_sequence_length,
            )
        assert got.hidden_states.shape == want.shape == (2, 16 + enc.max_sequence_length, 80)
        torch.testing.assert_close(got.hidden_states, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.added["pooled_projections"], pooled, rtol=0, atol=1e-6)
        if not t5:
            assert not got.hidden_states[:, 16:].any()  # T5 absent: zeros, as the stock pipeline feeds
        # The two CLIPs (32 + 32 wide) are zero-padded to T5's width.
        assert not got.hidden_states[:, :16, 64:].any()


# -- Flux -------------------------------------------------------------------------------------------------------
def test_pack_unpack_roundtrip() -> None:
    x = torch.randn(3, 16, 8, 6)
    tokens = pack_latents(x)
    assert tokens.shape == (3, 12, 64)
    assert torch.equal(unpack_latents(tokens, 8, 6), x)


@pytest.mark.parametrize(("size", "steps"), [(32, 8), (1024, 28), (512, 50)])
def test_flux_schedule_matches_stock(size: int, steps: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    # FLUX.1-dev's scheduler config; the denoiser only reads the config and the network's guidance flag.
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, max_shift=1.15)
    den = FluxDenoiser(type("T", (), {"config": type("C", (), {"guidance_embeds": True})()})(), 8, sched.config)
    ours = copy.deepcopy(sched)
    ours.set_timesteps(steps, **den.timestep_kwargs(size, size, steps))
    stock = copy.deepcopy(sched)
    seq = (size // 16) ** 2  # FluxPipeline: packed tokens = (H/8/2)·(W/8/2)
    mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
    retrieve_timesteps(stock, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert torch.equal(ours.timesteps, stock.timesteps)
    assert torch.equal(ours.sigmas, stock.sigmas)


@pytest.mark.parametrize("family", ["flux"], indirect=True)
def test_flux_has_no_cfg_twin_and_guidance_is_embedded(family: tuple[str, Path, ModelComponents]) -> None:
    _, _, c = family
    assert not c.denoiser.uses_cfg(7.0)
    seen: list[int] = []
    net = c.denoiser.transformer  # type: ignore[attr-defined]
    hook = net.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    try:
        a = _run1(c, RenderRequest(PROMPT, seed=1, steps=4, guidance=1.0))
        b = _run1(c, RenderRequest(PROMPT, seed=1, steps=4, guidance=6.0))
    finally:
        hook.remove()
    assert set(seen) == {1}  # one row per forward even at guidance 6: no unconditional twin
    assert a.image is not None and b.image is not None
    assert (a.image - b.image).abs().max() > 1e-4  # the guidance embedding is fed


def test_flux_without_guidance_embedding_ignores_guidance(root: Path) -> None:
    # FLUX.1-schnell-like: no guidance embedding, so the network gets guidance=None and the value cannot matter.
    c = load_model(str(build_tiny_flux(root / "flux-schnell", guidance_embeds=False)), device="cpu")
    assert c.denoiser.guidance_embeds is False  # type: ignore[attr-defined]
    a = _run1(c, RenderRequest(PROMPT, seed=1, steps=3, guidance=1.0))
    b = _run1(c, RenderRequest(PROMPT, seed=1, steps=3, guidance=6.0))
    assert a.image is not None and b.image is not None
    assert torch.equal(a.image, b.image)


# -- VAE upcast (SDXL) ------------------------------------------------------------------------------------------
def test_fp16_vae_with_force_upcast_decodes_in_fp32(root: Path) -> None:
    from diffusers import AutoencoderKL

    path = root / "sdxl" if (root / "sdxl").is_dir() else build_tiny_sdxl(root / "sdxl-vae")
    vae16 = AutoencoderKL.from_pretrained(str(path / "vae"), torch_dtype=torch.float16).eval()
    assert vae16.config.force_upcast
    vae32 = copy.deepcopy(vae16).float()  # the same (fp16-rounded) weights in float32
    latents = torch.randn(2, 4, 8, 8).half()
    space = VaeSpace(vae16)
    assert space.needs_upcast
    out = space.decode(latents)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 32)
    assert torch.isfinite(out).all()
    assert space.vae.dtype == torch.float32 and not space.needs_upcast  # upcast once, kept
    want = VaeSpace(vae32).decode(latents.float())
    assert torch.equal(out, want)  # the float32 decode of the same weights, not a half-precision one
    enc = space.encode(out)
    assert enc.dtype == torch.float32 and torch.isfinite(enc).all()
    vae16 = AutoencoderKL.from_pretrained(str(path / "vae"), torch_dtype=torch.float16)
    vae16.register_to_config(force_upcast=False)  # e.g. madebyollin/sdxl-vae-fp16-fix
    assert not VaeSpace(vae16).needs_upcast


# -- scheduler choice at load time ------------------------------------------------------------------------------
def test_pndm_default_is_swapped_to_ddim_with_a_log_line(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = build_tiny_sd(root / "tiny-sd-pndm", scheduler="pndm")
    with caplog.at_level(logging.WARNING, logger="nirvana.engine.loader"):
        c = load_model(str(path), device="cpu")
    assert c.scheduler_family == "ddim"
    assert type(c.scheduler).__name__ == "DDIMScheduler"
    lines = [r.getMessage() for r in caplog.records if "PNDMScheduler" in r.getMessage()]
    assert lines and "ddim" in lines[0]
    assert c.scheduler.config.steps_offset == 1  # built from the checkpoint's own config
    with pytest.raises(ValueError, match="NIRVANA_SCHEDULER"):
        load_model(str(path), device="cpu", scheduler="flowmatch-euler")


@pytest.mark.parametrize("family", ["sd3", "flux"], indirect=True)
def test_noise_scheduler_on_a_flow_model_is_refused(family: tuple[str, Path, ModelComponents]) -> None:
    _, path, _ = family
    with pytest.raises(ValueError, match="NIRVANA_SCHEDULER"):
        load_model(str(path), device="cpu", scheduler="ddim")
    assert load_model(str(path), device="cpu", scheduler="flowmatch-euler").scheduler_family == "flowmatch-euler"


def test_checkpoint_identity_covers_transformer_models(family: tuple[str, Path, ModelComponents]) -> None:
    _, path, c = family
    again = load_model(str(path), device="cpu")
    assert again.model_key() == c.model_key()  # stable across loads (hash of unet/ or transformer/)
    state = CapturedState(
        latent=torch.zeros(c.space.channels, 8, 8),
        step=1,
        num_steps=4,
        timestep=500.0,
        scheduler_family=c.scheduler_family,
        model_key=c.model_key(64, 64),
    )
    (res,) = EngineCore(c).run([RenderRequest(PROMPT, steps=4, start=state)])
    assert isinstance(res.error, ValueError) and "model_key" in str(res.error)
