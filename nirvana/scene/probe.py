"""Attribute probe: a small CNN that reads shape, colour, background, size and position off a 32×32 image.

It gives two offline quality metrics for the bundled model (see ``nirvana.scene.metrics``): adherence (all of a
prompt's attributes visible) and probe-FID (Fréchet distance between probe features of generated images and of
renders). Trained on renders with noise/blur augmentation so it also reads slightly imperfect generations.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from nirvana.scene.world import ATTRIBUTES, VALUES, Scene, all_scenes, render, to_array

log = logging.getLogger(__name__)

FEATURE_DIM = 128


class AttributeProbe(nn.Module):
    """Conv net with one linear head per attribute; ``features`` (B, 128) feed probe-FID."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
            )

        # Position and size need spatial layout, so the trunk keeps a 4×4 map before flattening.
        self.trunk = nn.Sequential(
            block(3, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2), block(64, 96), nn.MaxPool2d(2)
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(96 * 4 * 4, FEATURE_DIM), nn.SiLU())
        self.heads = nn.ModuleDict({a: nn.Linear(FEATURE_DIM, len(VALUES[a])) for a in ATTRIBUTES})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, 32, 32) → (B, FEATURE_DIM)."""
        return self.fc(self.trunk(images))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {a: head(f) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """(labels (B, 5) int in ATTRIBUTES order, features (B, 128))."""
        self.eval()
        labels, feats = [], []
        for i in range(0, len(images), batch):
            x = images[i : i + batch].float()
            f = self.features(x)
            labels.append(torch.stack([self.heads[a](f).argmax(-1) for a in ATTRIBUTES], dim=1))
            feats.append(f)
        return torch.cat(labels).numpy(), torch.cat(feats).numpy()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise and occasional blur: generated images are a little noisy and soft."""
    noise = torch.randn(x.shape, generator=gen) * torch.rand(len(x), 1, 1, 1, generator=gen) * 0.12
    x = x + noise
    blur = torch.rand(len(x), generator=gen) < 0.3
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k2 = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k2, groups=3)
    return x.clamp(-1, 1)


def render_set(scenes: list[Scene], per_scene: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    imgs: list[Any] = []
    labels: list[tuple[int, ...]] = []
    for s in scenes:
        imgs.extend(render(s, seed=rng.randrange(2**31)) for _ in range(per_scene))
        labels.extend([s.label()] * per_scene)
    return torch.from_numpy(to_array(imgs)), torch.tensor(labels)


def train_probe(out_dir: Path, steps: int = 800, batch_size: int = 128, seed: int = 0) -> dict[str, Any]:
    """Train on renders of *all* scenes (the probe is a measuring device, not the model under test)."""
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scenes = all_scenes()
    x, y = render_set(scenes, 8, seed)
    xv, yv = render_set(scenes, 2, seed + 1)
    probe = AttributeProbe()
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="probe", unit="step")
    for step in bar:
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        logits = probe(_augment(x[idx].clone(), gen))
        loss = sum(F.cross_entropy(logits[a], y[idx, i]) for i, a in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    pred, _ = probe.predict(xv)
    acc_all = float((pred == yv.numpy()).all(axis=1).mean())
    per_attr = {a: float((pred[:, i] == yv.numpy()[:, i]).mean()) for i, a in enumerate(ATTRIBUTES)}
    save_file(probe.state_dict(), str(out_dir / "probe.safetensors"))
    summary = {
        "steps": steps,
        "seed": seed,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "val_accuracy": acc_all,
        "val_per_attribute": per_attr,
    }
    (out_dir / "probe.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("probe: %s", summary)
    return summary


def load_probe(path: Path) -> AttributeProbe:
    """Load probe weights from a directory holding ``probe.safetensors``."""
    probe = AttributeProbe()
    probe.load_state_dict(load_file(str(Path(path) / "probe.safetensors")))
    return probe.eval()
