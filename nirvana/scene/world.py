"""A synthetic scene world: attributes → 32×32 images and natural-language prompts.

The bundled model is trained on this world and the quality probe scores generated images against it, so
"does the image follow the prompt" becomes an exact, offline question.

Invariants:
    * Every scene has exactly one object; its colour never equals the background colour.
    * Rendering is a pure function of (scene, jitter seed): same inputs, same pixels.
    * Every prompt written for a scene names all five attributes (possibly by a synonym), so adherence is
      well defined for every prompt.
    * The held-out split is a fixed, seed-independent set of attribute combinations never used in training.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "blue": (40, 70, 230),
}
SIZES: dict[str, float] = {"small": 4.5, "medium": 7.0, "large": 10.0}  # half-extent in pixels
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}
ATTRIBUTES: tuple[str, ...] = ("shape", "color", "background", "size", "position")
VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "background": tuple(BACKGROUNDS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
}

_SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {
        "circle": ("circle", "disc", "round dot", "ball"),
        "square": ("square", "box", "block", "square tile"),
        "triangle": ("triangle", "pyramid shape", "triangular sign", "wedge"),
        "diamond": ("diamond", "rhombus", "lozenge", "diamond shape"),
    },
    "size": {
        "small": ("small", "tiny", "little", "miniature"),
        "medium": ("medium", "medium-sized", "mid-sized", "average-sized"),
        "large": ("large", "big", "huge", "giant"),
    },
    "position": {
        "center": ("in the center", "in the middle", "centered", "at the centre"),
        "top left": ("top left", "in the upper left corner", "at the top-left", "upper left"),
        "top right": ("top right", "in the upper right corner", "at the top-right", "upper right"),
        "bottom left": ("bottom left", "in the lower left corner", "at the bottom-left", "lower left"),
        "bottom right": ("bottom right", "in the lower right corner", "at the bottom-right", "lower right"),
    },
    "background": {
        "white": ("white", "plain white", "snow white"),
        "black": ("black", "pitch black", "dark black"),
        "gray": ("gray", "grey", "slate gray"),
        "blue": ("blue", "deep blue", "royal blue"),
    },
}

_TEMPLATES: tuple[str, ...] = (
    "a {size} {color} {shape} on a {background} background, {position}",
    "{size} {color} {shape} on {background}, {position}",
    "{position}: a {size} {color} {shape} against a {background} backdrop",
    "a {color} {shape}, {size}, {position}, {background} background",
    "an image of a {size} {color} {shape} {position} on a {background} background",
    "{background} background with a {size} {color} {shape} {position}",
)


@dataclass(frozen=True, order=True)
class Scene:
    """One object on a plain background; every field is one of ``VALUES[field]``."""

    shape: str
    color: str
    background: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for name in ATTRIBUTES:
            value = getattr(self, name)
            if value not in VALUES[name]:
                raise ValueError(f"{name}={value!r} is not one of {VALUES[name]}")
        if self.color == self.background:
            raise ValueError(f"color and background must differ (both {self.color!r})")

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    def label(self) -> tuple[int, ...]:
        """Class indices per attribute, in ``ATTRIBUTES`` order."""
        return tuple(VALUES[name].index(getattr(self, name)) for name in ATTRIBUTES)

    def key(self) -> str:
        return "|".join(getattr(self, name) for name in ATTRIBUTES)


def all_scenes() -> list[Scene]:
    """Every valid combination, in a fixed order."""
    out = []
    for combo in itertools.product(*(VALUES[a] for a in ATTRIBUTES)):
        fields = dict(zip(ATTRIBUTES, combo, strict=True))
        if fields["color"] != fields["background"]:
            out.append(Scene(**fields))
    return out


def is_held_out(scene: Scene) -> bool:
    """About 10% of combinations, chosen by a hash so the split never depends on a seed or a library version."""
    digest = hashlib.sha256(scene.key().encode()).digest()
    return digest[0] < 26  # 26/256 ≈ 10%


def split_scenes() -> tuple[list[Scene], list[Scene]]:
    """(train, held_out) partition of ``all_scenes()``; every attribute value occurs in both."""
    scenes = all_scenes()
    return [s for s in scenes if not is_held_out(s)], [s for s in scenes if is_held_out(s)]


def write_prompt(scene: Scene, rng: random.Random | None = None, template: int | None = None) -> str:
    """A natural prompt naming every attribute; ``rng`` picks the paraphrase, ``template`` pins the template."""
    rng = rng or random.Random(0)
    idx = rng.randrange(len(_TEMPLATES)) if template is None else template
    words: dict[str, str] = {}
    for name in ATTRIBUTES:
        value = getattr(scene, name)
        synonyms = _SYNONYMS.get(name, {}).get(value, (value,))
        words[name] = rng.choice(synonyms)
    text = _TEMPLATES[idx % len(_TEMPLATES)].format(**words)
    return text[0].upper() + text[1:] if rng.random() < 0.3 else text


def canonical_prompt(scene: Scene) -> str:
    """The plain first-template prompt with the first synonym of each attribute."""
    words = {name: _SYNONYMS.get(name, {}).get(getattr(scene, name), (getattr(scene, name),))[0] for name in ATTRIBUTES}
    return _TEMPLATES[0].format(**words)


def render(scene: Scene, seed: int = 0, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``scene`` with a small seeded jitter of position (±1.5 px), extent (±8%) and colour (±12/255)."""
    rng = random.Random(seed)
    scale = size / IMAGE_SIZE
    ss = 4  # supersample for anti-aliased edges
    canvas = size * ss
    jitter = lambda c: tuple(int(np.clip(v + rng.randint(-12, 12), 0, 255)) for v in c)  # noqa: E731
    img = Image.new("RGB", (canvas, canvas), jitter(BACKGROUNDS[scene.background]))
    draw = ImageDraw.Draw(img)
    fx, fy = POSITIONS[scene.position]
    cx = (fx * size + rng.uniform(-1.5, 1.5) * scale) * ss
    cy = (fy * size + rng.uniform(-1.5, 1.5) * scale) * ss
    r = SIZES[scene.size] * scale * rng.uniform(0.92, 1.08) * ss
    fill = jitter(COLORS[scene.color])
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        h = r * 0.88
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif scene.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def to_array(images: list[Image.Image]) -> np.ndarray:
    """(B, 3, H, W) float32 in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return (arr.transpose(0, 3, 1, 2) / 127.5 - 1.0).astype(np.float32)


def parse_prompt(text: str) -> Scene | None:
    """Recover the scene a prompt of this world describes, or ``None`` if it names no complete scene.

    The background is matched first (it is always followed by "background"/"backdrop" or preceded by "on"),
    and its words are masked so a blue background is not read as a blue object.
    """
    low = " " + text.lower().replace("-", " ") + " "
    found: dict[str, str] = {}
    for name in ("background", *[a for a in ATTRIBUTES if a != "background"]):
        best: tuple[int, int, str] | None = None  # (length, start, value)
        for value in VALUES[name]:
            for syn in _SYNONYMS.get(name, {}).get(value, (value,)):
                syn_l = syn.replace("-", " ")
                if name == "background":
                    pats = [f"{syn_l} background", f"{syn_l} backdrop", f" on {syn_l},", f" on {syn_l} "]
                else:
                    pats = [f" {syn_l}"]
                for pat in pats:
                    pos = low.find(pat)
                    if pos >= 0 and (best is None or len(pat) > best[0]):
                        best = (len(pat), pos, value)
        if best is None:
            return None
        length, pos, value = best
        found[name] = value
        if name == "background":
            low = low[:pos] + " " * length + low[pos + length :]
    try:
        return Scene(**found)
    except ValueError:
        return None
