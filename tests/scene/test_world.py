"""Renderer, prompt writer and the held-out split of the scene world."""

from __future__ import annotations

import random

import numpy as np
import pytest

from nirvana.scene.world import (
    ATTRIBUTES,
    IMAGE_SIZE,
    VALUES,
    Scene,
    all_scenes,
    canonical_prompt,
    parse_prompt,
    render,
    split_scenes,
    to_array,
    write_prompt,
)


def test_scene_validation_names_field() -> None:
    with pytest.raises(ValueError, match="shape"):
        Scene("hexagon", "red", "white", "small", "center")
    with pytest.raises(ValueError, match="color and background"):
        Scene("circle", "blue", "blue", "small", "center")


def test_split_is_fixed_and_covers_every_value() -> None:
    train, held = split_scenes()
    assert len(train) + len(held) == len(all_scenes())
    assert not set(train) & set(held)
    assert 0.05 < len(held) / len(all_scenes()) < 0.15
    assert split_scenes() == (train, held)
    for a in ATTRIBUTES:
        assert {getattr(s, a) for s in held} == set(VALUES[a]), a


def test_render_is_deterministic_and_draws_the_scene() -> None:
    s = Scene("square", "red", "white", "large", "top left")
    a, b = render(s, seed=3), render(s, seed=3)
    assert a.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    arr = np.asarray(a).astype(int)
    # Top-left quadrant is mostly red, bottom-right mostly white background.
    tl, br = arr[4:12, 4:12], arr[24:30, 24:30]
    assert tl[..., 0].mean() > 150 and tl[..., 1].mean() < 100
    assert br.mean() > 200
    assert not np.array_equal(np.asarray(render(s, seed=4)), arr)  # jitter differs per seed


def test_render_sizes_and_positions_differ() -> None:
    def mass(s: Scene) -> tuple[float, float, float]:
        x = to_array([render(s, seed=0)])[0]
        fg = np.abs(x - x[:, :1, :1]).sum(0) > 0.5
        ys, xs = np.nonzero(fg)
        return fg.sum(), ys.mean(), xs.mean()

    small = mass(Scene("circle", "green", "black", "small", "center"))
    large = mass(Scene("circle", "green", "black", "large", "center"))
    assert large[0] > 3 * small[0]
    br = mass(Scene("circle", "green", "black", "small", "bottom right"))
    assert br[1] > small[1] + 5 and br[2] > small[2] + 5


def test_prompts_name_every_attribute_and_parse_back() -> None:
    rng = random.Random(0)
    for s in all_scenes()[::7]:
        for t in range(6):
            p = write_prompt(s, rng, template=t)
            assert parse_prompt(p) == s, p
    assert parse_prompt(canonical_prompt(all_scenes()[0])) == all_scenes()[0]
    assert parse_prompt("a photo of a cat") is None


def test_paraphrases_vary() -> None:
    s = Scene("triangle", "orange", "gray", "medium", "bottom left")
    rng = random.Random(1)
    assert len({write_prompt(s, rng) for _ in range(30)}) > 10
