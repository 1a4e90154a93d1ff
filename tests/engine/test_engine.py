"""Engine tests on a tiny random-weight SD pipeline built in the test (offline, CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from nirvana.engine.core import StateRejected
from nirvana.engine.engine import (
    DiffusionEngine,
    GenerationCancelled,
    default_capture_steps,
    resume_index,
)
from nirvana.engine.loader import load_model
from nirvana.engine.state import CapturedState
from nirvana.engine.tiny import build_tiny_sd

PROMPT = "a red cat"
DPM_TOLERANCE = 0.05  # max abs image diff after resuming DPM-Solver++ (history restarts); see docs/ENGINE.md


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def engines(tiny_dir: Path) -> dict[str, DiffusionEngine]:
    return {
        s: DiffusionEngine(load_model(str(tiny_dir), device="cpu", scheduler=s))
        for s in ("ddim", "euler", "dpmsolver++")
    }


def test_default_capture_steps_scale_with_n() -> None:
    assert default_capture_steps(50) == [5, 10, 15, 20, 25]
    assert default_capture_steps(100) == [10, 20, 30, 40, 50]
    assert default_capture_steps(20) == [2, 4, 6, 8, 10]
    assert all(0 < k < 3 for k in default_capture_steps(3))


@pytest.mark.parametrize("family", ["ddim", "euler"])
def test_resume_from_own_state_is_exact(engines: dict[str, DiffusionEngine], family: str) -> None:
    eng = engines[family]
    full = eng.generate([PROMPT], seeds=[7], steps=50, guidance=7.5)
    assert [s.step for s in full.states[0]] == [5, 10, 15, 20, 25]
    for state in full.states[0]:
        assert state.scheduler_family == family
        assert state.model_key == full.model_key
        resumed = eng.generate([PROMPT], seeds=[7], steps=50, guidance=7.5, start=state)
        assert resumed.start_step == state.step
        assert resumed.steps_run == 50 - state.step
        diff = (resumed.images - full.images).abs().max().item()
        assert diff <= 1e-5, f"{family} K={state.step}: max diff {diff}"
        # Only the steps the resumed run executed are captured anew.
        assert all(s.step > state.step for s in resumed.states[0])


def test_dpmsolver_resume_within_tolerance(engines: dict[str, DiffusionEngine]) -> None:
    eng = engines["dpmsolver++"]
    full = eng.generate([PROMPT], seeds=[7], steps=50, guidance=7.5)
    diffs = []
    for state in full.states[0]:
        resumed = eng.generate([PROMPT], seeds=[7], steps=50, guidance=7.5, start=state)
        diffs.append((resumed.images - full.images).abs().max().item())
    assert max(diffs) <= DPM_TOLERANCE, diffs
    assert max(diffs) > 0  # history really restarts: if this were 0 the test would prove nothing


def test_euler_resume_does_not_rescale_by_init_noise_sigma(engines: dict[str, DiffusionEngine]) -> None:
    eng = engines["euler"]
    assert eng.c.scheduler.init_noise_sigma > 1.5  # otherwise the test below cannot tell
    full = eng.generate([PROMPT], seeds=[3], steps=20, guidance=5.0, capture=[10])
    state = full.states[0][0]
    wrong = CapturedState(
        latent=state.latent * eng.c.scheduler.init_noise_sigma,
        step=state.step,
        num_steps=state.num_steps,
        timestep=state.timestep,
        scheduler_family=state.scheduler_family,
        model_key=state.model_key,
    )
    good = eng.generate([PROMPT], seeds=[3], steps=20, guidance=5.0, start=state)
    bad = eng.generate([PROMPT], seeds=[3], steps=20, guidance=5.0, start=wrong)
    assert (good.images - full.images).abs().max() <= 1e-5
    assert (bad.images - full.images).abs().max() > 1e-2


def test_other_prompt_resume_is_deterministic_and_differs(engines: dict[str, DiffusionEngine]) -> None:
    eng = engines["ddim"]
    src = eng.generate([PROMPT], seeds=[11], steps=30, guidance=7.5)
    state = src.states[0][1]  # K=6
    a = eng.generate(["a blue dog on grass"], seeds=[11], steps=30, guidance=7.5, start=state)
    b = eng.generate(["a blue dog on grass"], seeds=[99], steps=30, guidance=7.5, start=state)
    assert torch.equal(a.images, b.images)  # the state is the noise: seed does not matter after resume
    c = eng.generate(["a blue dog on grass"], seeds=[11], steps=30, guidance=7.5, start=state)
    assert torch.equal(a.images, c.images)
    assert (a.images - src.images).abs().max() > 1e-3


def test_batch_matches_single_runs_per_seed(engines: dict[str, DiffusionEngine]) -> None:
    eng = engines["ddim"]
    batch = eng.generate([PROMPT, "a green tree"], seeds=[1, 2], steps=10, guidance=4.0)
    one = eng.generate(["a green tree"], seeds=[2], steps=10, guidance=4.0)
    assert (batch.images[1] - one.images[0]).abs().max() <= 1e-4
    assert len(batch.states) == 2


def test_state_resumes_only_its_own_step_count(engines: dict[str, DiffusionEngine]) -> None:
    eng = engines["ddim"]
    src = eng.generate([PROMPT], seeds=[5], steps=50, guidance=7.5, capture=[10])
    state = src.states[0][0]
    sched = eng.c.scheduler
    sched.set_timesteps(50)
    assert resume_index(state, [float(t) for t in sched.timesteps], 50) == 10
    out = eng.generate(["a red dog"], seeds=[5], steps=50, guidance=7.5, start=state)
    assert (out.start_step, out.steps_run) == (10, 40)
    for steps in (25, 100):
        sched.set_timesteps(steps)
        with pytest.raises(StateRejected, match=r"^start: .*50-step schedule.*steps=" + str(steps)):
            resume_index(state, [float(t) for t in sched.timesteps], steps)
        with pytest.raises(ValueError, match="its own step count"):
            eng.generate(["a red dog"], seeds=[5], steps=steps, guidance=7.5, start=state)


def test_cancel_between_steps(engines: dict[str, DiffusionEngine]) -> None:
    eng = engines["ddim"]
    seen: list[int] = []

    def cb(i: int, n: int) -> None:
        seen.append(i)
        if i == 3:
            raise GenerationCancelled()

    with pytest.raises(GenerationCancelled):
        eng.generate([PROMPT], seeds=[1], steps=10, callback=cb)
    assert seen == [1, 2, 3]


def test_model_key_namespaces(engines: dict[str, DiffusionEngine], tiny_dir: Path) -> None:
    keys = {f: e.model_key() for f, e in engines.items()}
    assert len(set(keys.values())) == 3
    assert engines["ddim"].model_key(32, 32) != engines["ddim"].model_key(64, 64)
    again = DiffusionEngine(load_model(str(tiny_dir), device="cpu", scheduler="ddim"))
    assert again.model_key() == keys["ddim"]  # stable across loads


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompts": [""]}, "prompt"),
        ({"prompts": ["   "]}, "prompt"),
        ({"steps": 0}, "steps"),
        ({"steps": 1001}, "steps"),
        # SD's DDIM config (steps_offset=1, leading) has no t=1000 in its noise table: a clear error, not IndexError.
        ({"steps": 1000}, r"^steps: 1000 is more than .* at most 999"),
        ({"guidance": math.nan}, "guidance"),
        ({"guidance": -1.0}, "guidance"),
        ({"height": 33}, "height"),
        ({"width": 12}, "width"),
        ({"width": 8192}, "width"),
        ({"seeds": [1, 2]}, "seeds"),
        ({"capture": [50]}, "capture"),
    ],
)
def test_bad_input_names_field(engines: dict[str, DiffusionEngine], kwargs: dict, field: str) -> None:
    args: dict = {"prompts": [PROMPT], "seeds": [1], "steps": 50, "guidance": 7.5}
    args.update(kwargs)
    prompts = args.pop("prompts")
    with pytest.raises(ValueError, match=field):
        engines["ddim"].generate(prompts, **args)


def test_bad_states_rejected(engines: dict[str, DiffusionEngine]) -> None:
    ddim, euler = engines["ddim"], engines["euler"]
    src = euler.generate([PROMPT], seeds=[1], steps=10, capture=[5])
    with pytest.raises(ValueError, match="model_key"):
        ddim.generate([PROMPT], seeds=[1], steps=10, start=src.states[0][0])
    good = ddim.generate([PROMPT], seeds=[1], steps=10, capture=[5]).states[0][0]
    wrong_shape = CapturedState(
        latent=torch.zeros(4, 4, 4),
        step=5,
        num_steps=10,
        timestep=good.timestep,
        scheduler_family="ddim",
        model_key=good.model_key,
    )
    with pytest.raises(ValueError, match="shape"):
        ddim.generate([PROMPT], seeds=[1], steps=10, start=wrong_shape)
    with pytest.raises(ValueError, match="step"):
        CapturedState(latent=good.latent, step=10, num_steps=10, timestep=1.0, scheduler_family="ddim", model_key="x")
    with pytest.raises(ValueError, match=r"^start: "):
        # A state captured halfway through 10 steps does not resume a 1-step schedule.
        ddim.generate([PROMPT], seeds=[1], steps=1, start=good)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_index"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(ValueError, match="neither"):
        load_model("./does-not-exist", device="cpu")
    with pytest.raises(ValueError, match="scheduler"):
        from nirvana.engine.loader import make_scheduler

        make_scheduler({}, "heun")
