"""Captions for key frames when a dataset has none: an action template, or a local BLIP.

`template` turns a clip's action label (and camera view, when known) into a sentence:
"a person doing jumping jacks, seen from the front". `blip:PATH` runs a BLIP captioning
checkpoint from a local directory through transformers' `BlipForConditionalGeneration`
(nothing is downloaded; the directory must hold the model and its processor).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def action_phrase(action: str) -> str:
    """'tennis_serve' -> 'tennis serve'."""
    return " ".join(action.replace("_", " ").replace("-", " ").split()).lower()


def template_caption(action: str, view: str | None = None) -> str:
    """The fallback caption for a frame of a clip labelled `action`."""
    text = f"a person doing {action_phrase(action) or 'something'}"
    view = (view or "").strip()
    if view and view.lower() not in ("unknown", "none", "nan"):
        text += f", seen from the {action_phrase(view)}"
    return text


def parse_captioner(spec: str) -> tuple[str, Path | None]:
    """'template' -> ('template', None); 'blip:PATH' -> ('blip', PATH) (checked to exist)."""
    if spec == "template":
        return "template", None
    kind, sep, path = spec.partition(":")
    if kind != "blip" or not sep or not path:
        raise ValueError(f"--captioner must be 'template' or 'blip:PATH', got {spec!r}")
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(
            f"--captioner blip:{path}: no such directory (a local BLIP checkpoint)"
        )
    return "blip", p


class BlipCaptioner:
    """Captions uint8 RGB frames with a local BLIP checkpoint (CPU or CUDA)."""

    def __init__(self, path: str | Path, device: str = "cpu", max_new_tokens: int = 30):
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        path = Path(path)
        try:
            self.processor = BlipProcessor.from_pretrained(path)
            self.model = BlipForConditionalGeneration.from_pretrained(path, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot load a BLIP captioning checkpoint ({e})") from None
        self.model.to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens
        self._torch = torch

    def __call__(self, frames: np.ndarray) -> list[str]:
        """frames uint8 (B, H, W, 3) -> one caption each."""
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        with self._torch.no_grad():
            out = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1
            )
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()) or "a person" for t in texts]
