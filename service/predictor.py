"""The M2 predictor behind the service, in LitServe's shape.

- `setup(device)`: load the checkpoint once (safetensors/JSON only, via m2core.checkpoint).
- `decode_request(raw) -> Item`: check and decode one upload (format, size and type
  before decoding, in service/uploads.py; pixels, EXIF orientation, coords, caption,
  bounds) into model-ready arrays. Every refusal is a `ServiceError` with its own status.
- `predict(items) -> outputs`: one batched model call: image tokenizer over all frames,
  `generate` per group of requests that share a generation setting, one image-decoder
  call over all predicted key frames. Returns exactly one output per item.
- `encode_response(item, output)`: ids -> pixel coordinates, caption text, PNGs.

The batching loop (service/batching.py) calls `predict`; user code never sees a queue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from m2core.chain import generate as chain_generate
from m2core.checkpoint import load_checkpoint
from m2core.generate import GenerationConfig, generate
from m2core.geometry import (
    ImageError,
    ImageTooLarge,
    Letterbox,
    letterbox,
    load_image,
)
from m2core.in_domain import DomainCheck, encode_with_features, skeleton_features
from m2core.modalities import IMAGE_GRID, JOINT_NAMES, NUM_JOINTS, TOKENS_PER_POSE
from service.errors import ServiceError
from service.render import content_crop, encode_png, make_background
from service.schemas import LOW_CONFIDENCE, MAX_SEED, parse_coords
from service.settings import Settings
from service.store import Prediction
from service.uploads import check_upload

log = logging.getLogger(__name__)

DEFAULT_SEED = 0  # a request without a seed is still reproducible


@dataclass
class RawRequest:
    """One /predict request as received (nothing checked yet)."""

    frame: bytes
    content_type: str | None = None
    coords: str | None = None
    caption: str | None = None
    steps: int = 1
    temperature: float | None = None
    seed: int | None = None
    action: str | None = None


@dataclass
class Item:
    """A checked, decoded request: what the model and the response need."""

    frame: np.ndarray  # (256, 256, 3) uint8, letterboxed
    box: Letterbox
    coords_ids: np.ndarray | None  # (39,) given skeleton
    caption_ids: np.ndarray | None  # (L,) given caption, padded
    caption: str | None
    steps: int
    temperature: float
    seed: int
    background_jpeg: bytes
    thumb_scale: float
    warnings: list[dict[str, str]] = field(default_factory=list)  # {"code", "message"}
    action: int = -1  # given action id, -1 = not given

    def group_key(self) -> tuple:
        """Requests with equal keys run in one `generate` call (seeds are per sample, and
        a batch may mix given and missing skeletons / captions)."""
        return (self.steps, self.temperature)


@dataclass
class Output:
    coords: np.ndarray  # (39,) ids
    caption_ids: list[int]
    coords_next: np.ndarray  # (steps, 234) ids
    tok_rgb_next: np.ndarray  # (steps, 256) ids
    next_frames: np.ndarray  # (steps, 256, 256, 3) uint8
    action: int | None = None  # format-2 models: the action id
    confidence: tuple[np.ndarray, np.ndarray] | None = None  # (13,), (steps, 6, 13) per joint
    image_features: np.ndarray | None = None  # the frame's in-domain features


class M2Predictor:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.bundle = None
        self.device = "cpu"
        self.defaults = GenerationConfig(temperature=settings.default_temperature)
        self.domain: DomainCheck | None = None

    # --- setup -----------------------------------------------------------------------------
    def setup(self, device: str) -> None:
        """Load the checkpoint onto `device`. Raises CheckpointError / FileNotFoundError."""
        path = Path(self.settings.checkpoint)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {path}")
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        self.bundle = load_checkpoint(path, device=device)
        if self.bundle.image_tokenizer is None:
            raise FileNotFoundError(f"{path}: the checkpoint has no image_tokenizer/")
        self.bundle.model.eval()
        self.domain = DomainCheck.load(path)  # ValueError for a damaged file
        if self.domain is None:
            log.warning("%s has no in_domain.safetensors: no out_of_domain warnings "
                        "(m2 calibrate-domain adds it)", path)  # fmt: skip
        self.device = device
        log.info("loaded %s (version %s) on %s", path, self.bundle.version, device)

    @property
    def version(self) -> str:
        return self.bundle.version if self.bundle else "none"

    @property
    def dtype(self) -> str:
        if self.bundle is None:
            return "none"
        return str(next(self.bundle.model.parameters()).dtype).removeprefix("torch.")

    # --- decode_request --------------------------------------------------------------------
    def decode_request(self, raw: RawRequest) -> Item:
        s = self.settings
        steps, temperature, seed = self._check_numbers(raw)
        _, n_frames = check_upload(raw.frame, raw.content_type, s)
        try:
            img = load_image(raw.frame, max_pixels=s.max_pixels)
        except ImageTooLarge as e:
            raise ServiceError(413, "image_too_large", str(e), "frame") from None
        except ImageError as e:
            raise ServiceError(422, "corrupt_image", str(e), "frame") from None
        warnings = []
        if n_frames > 1:
            warnings.append(
                {
                    "code": "animated_image",
                    "message": f"animated image with {n_frames} frames: the first frame was used",
                }
            )
        frame, box = letterbox(img)
        background, thumb_scale = make_background(img, s.gif_max_side)
        del img  # the full-size picture is not kept
        coords_ids = self._coords(raw.coords, box)
        caption, caption_ids = self._caption(raw.caption)
        return Item(frame, box, coords_ids, caption_ids, caption, steps, temperature, seed,
                    background, thumb_scale, warnings, self._action_id(raw.action))  # fmt: skip

    def _action_id(self, name: str | None) -> int:
        if name is None or not name.strip():
            return -1
        known = self._action_names()
        if not hasattr(self.bundle.model, "adapters") or not known:
            raise ServiceError(
                422, "invalid_field", "this checkpoint has no action modality", "action"
            )
        if name.strip() not in known:
            raise ServiceError(
                422,
                "invalid_field",
                f"unknown action {name.strip()!r}; known: {', '.join(known)}",
                "action",
            )
        return known.index(name.strip())

    def _action_names(self) -> list[str]:
        return list(
            ((self.bundle.config.get("extra") or {}).get("data") or {}).get("actions") or []
        )

    def _check_numbers(self, raw: RawRequest) -> tuple[int, float, int]:
        s = self.settings
        if not 1 <= raw.steps <= s.max_steps:
            raise ServiceError(
                422,
                "invalid_field",
                f"steps must be in [1, {s.max_steps}], got {raw.steps}",
                "steps",
            )
        t = self.defaults.temperature if raw.temperature is None else float(raw.temperature)
        if not 0.0 <= t <= s.max_temperature:
            raise ServiceError(
                422,
                "invalid_field",
                f"temperature must be in [0, {s.max_temperature}], got {t}",
                "temperature",
            )
        seed = DEFAULT_SEED if raw.seed is None else raw.seed
        if not 0 <= seed <= MAX_SEED:
            raise ServiceError(
                422, "invalid_field", f"seed must be in [0, 2**63), got {seed}", "seed"
            )
        return raw.steps, t, seed

    def _coords(self, text: str | None, box: Letterbox) -> np.ndarray | None:
        if text is None or not text.strip():
            return None
        try:
            joints = np.asarray(parse_coords(text), dtype=np.float64)  # (13, 3) upload pixels
        except ValueError as e:
            raise ServiceError(422, "invalid_coords", f"coords: {e}", "coords") from None
        frame_units = joints.copy()
        frame_units[:, :2] = box.to_frame(joints[:, :2])
        return self.bundle.pose_tokenizer.encode(frame_units)

    def _caption(self, text: str | None) -> tuple[str | None, np.ndarray | None]:
        if text is not None and len(text) > self.settings.max_caption_chars:  # as sent: maxLength
            raise ServiceError(
                422,
                "invalid_field",
                f"caption is longer than {self.settings.max_caption_chars} characters",
                "caption",
            )
        if text is None or not text.strip():
            return None, None
        text = text.strip()
        if self.bundle.text_tokenizer is None:
            raise ServiceError(
                422, "invalid_field", "this checkpoint has no text tokenizer", "caption"
            )
        return text, self.bundle.text_tokenizer.encode_batch([text])[0]

    # --- predict ---------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, items: list[Item]) -> list[Output]:
        """One model call for the batch; outputs in the order of `items`."""
        b = self.bundle
        frames = torch.from_numpy(np.stack([it.frame for it in items]))
        if self.domain is not None:
            tok_rgb, features = encode_with_features(b.image_tokenizer, frames)
        else:
            tok_rgb, features = b.image_tokenizer.encode(frames), None
        tok_rgb = tok_rgb.reshape(len(items), -1)  # (B, 256)
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.group_key(), []).append(i)
        results: list[tuple | None] = [None] * len(items)
        for idx in groups.values():
            group = [items[i] for i in idx]
            inputs = {"tok_rgb": tok_rgb[idx]}
            if any(it.coords_ids is not None for it in group):  # a row of -1 = not given
                inputs["coords"] = self._rows([it.coords_ids for it in group], TOKENS_PER_POSE, -1)
            if any(it.caption_ids is not None for it in group):  # a row of pad = not given
                width = max(len(it.caption_ids) for it in group if it.caption_ids is not None)
                inputs["captions"] = self._rows([it.caption_ids for it in group], width, 0)
            if any(it.action >= 0 for it in group):  # -1 = not given
                inputs["action"] = torch.tensor([it.action for it in group], device=self.device)
            cfg = GenerationConfig(
                steps=group[0].steps, temperature=group[0].temperature,
                seed=[it.seed for it in group],
            )  # fmt: skip
            res = (chain_generate if hasattr(b.model, "adapters") else generate)(
                b.model, inputs, cfg
            )
            for row, i in enumerate(idx):
                extra = (None, None)
                if (
                    res.confidence is not None
                ):  # a joint is as sure as its less sure coordinate pair
                    now = res.confidence["coords"][row].view(NUM_JOINTS, 3)
                    nxt = res.confidence["coords_next"][row].view(-1, 6, NUM_JOINTS, 3)
                    extra = (int(res.action[row]), ((now[..., 0] * now[..., 1]).cpu().numpy(),
                                                    (nxt[..., 0] * nxt[..., 1]).cpu().numpy()))  # fmt: skip
                results[i] = (
                    res.coords[row].cpu().numpy(), list(res.captions[row]),
                    res.coords_next[row].cpu().numpy(), res.tok_rgb_next[row].cpu().numpy(), extra,
                )  # fmt: skip
        # Decode every predicted key frame of the batch in one call.
        grids = np.concatenate([r[3] for r in results]).reshape(-1, IMAGE_GRID, IMAGE_GRID)
        pictures = b.image_tokenizer.decode(torch.from_numpy(grids)).cpu().numpy()
        outputs, at = [], 0
        for k, (it, (coords, caption, coords_next, tok_next, extra)) in enumerate(
            zip(items, results, strict=True)
        ):
            outputs.append(
                Output(
                    coords,
                    caption,
                    coords_next,
                    tok_next,
                    pictures[at : at + it.steps],
                    *extra,
                    None if features is None else features[k],
                )
            )
            at += it.steps
        return outputs

    def _rows(self, rows: list[np.ndarray | None], width: int, fill: int) -> torch.Tensor:
        out = np.full((len(rows), width), fill, dtype=np.int64)
        for r, row in enumerate(rows):
            if row is not None:
                out[r, : len(row)] = row
        return torch.from_numpy(out).to(self.device)

    # --- encode_response -------------------------------------------------------------------
    def encode_response(self, item: Item, out: Output) -> tuple[dict, Prediction]:
        """(response fields, what the store keeps for the GIF/PNG routes)."""
        pose = self.bundle.pose_tokenizer
        now = self._to_pixels(pose.decode(out.coords, strict=False), item.box)  # (13, 3)
        future = pose.decode_future(out.coords_next, strict=False)  # (steps, 6, 13, 3)
        future = self._to_pixels(future, item.box)
        warnings = list(item.warnings)
        domain_score = self._domain_score(out, pose.decode(out.coords, strict=False))
        if domain_score is not None and domain_score > 1.0:
            warnings.append(
                {
                    "code": "out_of_domain",
                    "message": f"this frame is unlike the frames the model was trained on "
                    f"(domain score {domain_score:.2f}, above 1 is out of domain): the skeleton, "
                    "caption and forecast are likely wrong",
                }
            )
        # A skeleton the model read with no joint visible: a caption of the empty frame would
        # be made up, so there is none, and the answer says why.
        nobody = item.coords_ids is None and not (now[:, 2] > 0.5).any()
        if item.caption is not None:
            caption = item.caption
        elif nobody:
            caption = None
        elif self.bundle.text_tokenizer is not None:
            caption = self.bundle.text_tokenizer.decode(out.caption_ids)
        else:
            caption = ""
        if nobody:
            warnings.append(
                {
                    "code": "no_person",
                    "message": "no person found: every joint is marked not visible, no caption "
                    "is given and the forecast means nothing",
                }
            )
        confidence = None  # (13,), (steps, 6, 13); a given skeleton is sure (1.0)
        if out.confidence is not None:
            sure_now = np.ones(NUM_JOINTS) if item.coords_ids is not None else out.confidence[0]
            confidence = (np.asarray(sure_now, dtype=np.float32), out.confidence[1])
            unsure = (confidence[0] < LOW_CONFIDENCE) & (now[:, 2] > 0.5)
            if item.coords_ids is None and not nobody and unsure.any():
                names = ", ".join(JOINT_NAMES[j] for j in np.flatnonzero(unsure))
                warnings.append(
                    {
                        "code": "low_confidence_joints",
                        "message": f"{unsure.sum()} of {int((now[:, 2] > 0.5).sum())} visible "
                        f"joints read from the frame have confidence below {LOW_CONFIDENCE}: "
                        f"{names} (drawn hollow in the GIF)",
                    }
                )
        pngs = [encode_png(content_crop(f, item.box)) for f in out.next_frames]
        fields = {
            "caption": caption,
            "caption_given": item.caption is not None,
            "coords": _joints(now),
            "coords_given": item.coords_ids is not None,
            "coords_next": [[_joints(j) for j in step] for step in future],
            "tok_rgb_next": out.tok_rgb_next.reshape(-1, IMAGE_GRID, IMAGE_GRID).tolist(),
            "width": item.box.src_w,
            "height": item.box.src_h,
            "steps": item.steps,
            "temperature": item.temperature,
            "seed": item.seed,
            "warnings": warnings,
            "domain_score": None if domain_score is None else round(float(domain_score), 3),
            "action": self._action_name(out.action),
            "confidence": None
            if confidence is None
            else {
                "coords": _rounded(confidence[0]),
                "coords_next": [[_rounded(j) for j in step] for step in confidence[1]],
            },
        }
        pred = Prediction(
            item.background_jpeg, item.thumb_scale, now, future, pngs, self.version, confidence
        )
        return fields, pred

    def _domain_score(self, out: Output, skeleton: np.ndarray) -> float | None:
        if self.domain is None or out.image_features is None:
            return None
        return float(
            self.domain.score(out.image_features[None], skeleton_features(skeleton[None]))[0]
        )

    def _action_name(self, action: int | None) -> str | None:
        names = self._action_names()
        if action is None or not 0 <= action < len(names):
            return None
        return str(names[action])

    @staticmethod
    def _to_pixels(coords: np.ndarray, box: Letterbox) -> np.ndarray:
        out = np.asarray(coords, dtype=np.float64).copy()
        out[..., :2] = box.to_image(out[..., :2])
        return out


def _rounded(x: np.ndarray) -> list[float]:
    return [round(float(v), 3) for v in np.asarray(x).reshape(-1)]


def _joints(joints: np.ndarray) -> list[tuple[float, float, int]]:
    assert joints.shape == (NUM_JOINTS, 3)
    return [(round(float(x), 2), round(float(y), 2), int(v > 0.5)) for x, y, v in joints]
