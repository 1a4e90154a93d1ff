"""Image-quality metrics behind one small interface.

``ProbeMetrics`` (adherence, per-attribute accuracy, probe-FID) runs offline on the bundled scene world.
``ClipScoreMetric`` is the same interface for real models, where CLIP weights exist locally.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from scipy import linalg

from nirvana.scene.probe import AttributeProbe, load_probe
from nirvana.scene.world import ATTRIBUTES, Scene, parse_prompt, to_array


class ImageMetric(Protocol):
    """Scores generated images against their prompts; higher-is-better keys unless the name says distance."""

    name: str

    def score(self, images: list[Image.Image], prompts: list[str]) -> dict[str, float]: ...


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` (n, d) and ``b`` (m, d)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (n, d) with equal d, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("features: need at least 2 samples per set")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


class ProbeMetrics:
    """Adherence and probe-FID with the attribute probe.

    adherence = fraction of images whose five predicted attributes all equal the prompt's; prompts that do not
    describe a scene of the world count as failures (never silently skipped).
    """

    name = "probe"

    def __init__(self, probe: AttributeProbe | Path) -> None:
        self.probe = probe if isinstance(probe, AttributeProbe) else load_probe(probe)

    def predict(self, images: list[Image.Image] | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(to_array(images))
        return self.probe.predict(x)

    def adherence(self, images: list[Image.Image] | torch.Tensor, scenes: list[Scene | None]) -> dict[str, Any]:
        labels, _ = self.predict(images)
        ok_all = []
        per_attr: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
        for pred, scene in zip(labels, scenes, strict=True):
            if scene is None:
                ok_all.append(False)
                continue
            truth = scene.label()
            hits = [int(p) == int(t) for p, t in zip(pred, truth, strict=True)]
            ok_all.append(all(hits))
            for a, h in zip(ATTRIBUTES, hits, strict=True):
                per_attr[a].append(h)
        return {
            "adherence": float(np.mean(ok_all)) if ok_all else 0.0,
            "per_attribute": {a: float(np.mean(v)) if v else 0.0 for a, v in per_attr.items()},
            "ok": ok_all,
        }

    def fid(self, generated: list[Image.Image] | torch.Tensor, reference: list[Image.Image] | torch.Tensor) -> float:
        _, fa = self.predict(generated)
        _, fb = self.predict(reference)
        return frechet_distance(fa.astype(np.float64), fb.astype(np.float64))

    def score(self, images: list[Image.Image], prompts: list[str]) -> dict[str, float]:
        res = self.adherence(images, [parse_prompt(p) for p in prompts])
        return {"adherence": res["adherence"], **{f"acc_{a}": v for a, v in res["per_attribute"].items()}}


class ClipScoreMetric:
    """CLIPScore = 100 × max(cos(image, text), 0) with a locally stored CLIP model (no download here).

    Args:
        model_dir: a directory holding a transformers ``CLIPModel`` and its processor.
    """

    name = "clipscore"

    def __init__(self, model_dir: str | Path, device: str = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        path = Path(model_dir)
        if not path.is_dir():
            raise ValueError(f"model_dir: CLIP weights directory {path} does not exist")
        self.model = CLIPModel.from_pretrained(str(path)).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(str(path))
        self.device = device

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> dict[str, float]:
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        img = torch.nn.functional.normalize(self.model.get_image_features(pixel_values=inputs["pixel_values"]), dim=-1)
        txt = torch.nn.functional.normalize(
            self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]),
            dim=-1,
        )
        cos = (img * txt).sum(-1).clamp(min=0)
        return {"clipscore": float(100 * cos.mean())}
