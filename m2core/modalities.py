"""The modality registry: the one frozen table every other module of M2 reads.

A modality is a named stream of token ids. Its `kind` (image / pose / text) chooses the
tokenizer, the position embedding and the generation scheme in exactly one place each.
Vocabulary sizes that depend on a trained tokenizer (image codebook, compact caption
vocabulary) are arguments of `build_registry`, never constants typed twice: the
checkpoint's config.json stores them and the registry is rebuilt from it.

Token layouts (DESIGN section 2):

- `tok_rgb`, `tok_rgb_next`: a 16x16 grid of image-tokenizer ids, row-major.
- `coords`: 13 joints x (x, y, visible), joint-major. x and y are binned to
  `POSE_BINS` levels over [0, 1] of the 256x256 letterboxed frame; the visible flag is
  id `POSE_BINS` (not visible) or `POSE_BINS + 1` (visible), so one table of
  `POSE_VOCAB` ids serves every component.
- `coords_next`: the same for the six following frames, frame-major (6 x 39 = 234).
- `captions`: GPT-2 byte-level BPE ids (compact or full vocabulary), bos ... eos.
- `action`: one label token, the clip's action class (only with `action_classes` > 0).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

Kind = Literal["image", "pose", "text", "label"]

# --- Fixed facts of the data -------------------------------------------------------------

FRAME_SIZE = 256  # letterboxed frame side, pixels
IMAGE_GRID = 16  # token grid side (downsampling 16)
JOINT_NAMES: tuple[str, ...] = (
    "head",
    "l_shoulder",
    "r_shoulder",
    "l_elbow",
    "r_elbow",
    "l_wrist",
    "r_wrist",
    "l_hip",
    "r_hip",
    "l_knee",
    "r_knee",
    "l_ankle",
    "r_ankle",
)
NUM_JOINTS = len(JOINT_NAMES)  # 13, Penn Action order
# the joints by group: an average over all of them can hide missing arms
JOINT_GROUPS: dict[str, list[int]] = {"head": [0], "shoulders": [1, 2], "elbows": [3, 4],
                                      "wrists": [5, 6], "hips": [7, 8], "knees": [9, 10],
                                      "ankles": [11, 12]}  # fmt: skip
POSE_COMPONENTS: tuple[str, ...] = ("x", "y", "visible")
TOKENS_PER_POSE = NUM_JOINTS * len(POSE_COMPONENTS)  # 39
FUTURE_FRAMES = 6  # skeletons in coords_next (t+1 ... t+S with the default stride S=6)
POSE_BINS = 8192  # x, y quantisation levels
POSE_VOCAB = POSE_BINS + 2  # + "not visible", "visible"
# Bone list (pairs of joint indices) for drawing skeletons.
SKELETON_EDGES: tuple[tuple[int, int], ...] = (
    (0, 1), (0, 2), (1, 2), (1, 3), (3, 5), (2, 4), (4, 6),
    (1, 7), (2, 8), (7, 8), (7, 9), (9, 11), (8, 10), (10, 12),
)  # fmt: skip

DEFAULT_IMAGE_VOCAB = 4096  # FSQ levels (8, 8, 8, 8); the trained tokenizer's config wins
DEFAULT_CAPTION_LEN = 32  # max caption tokens including bos and eos

# Chain order of generation (DESIGN section 7).
GENERATION_ORDER: tuple[str, ...] = ("coords", "captions", "coords_next", "tok_rgb_next")


@dataclass(frozen=True)
class Modality:
    """One entry of the registry."""

    name: str
    kind: Kind
    num_tokens: int  # maximum number of tokens of one sample
    vocab_size: int
    can_input: bool
    can_target: bool
    frames: int = 1  # pose: skeletons in the block; image: 1; text: 1

    @property
    def grid(self) -> tuple[int, int] | None:
        """(rows, cols) of an image modality's token grid, else None."""
        return (IMAGE_GRID, IMAGE_GRID) if self.kind == "image" else None

    @property
    def causal(self) -> bool:
        """Whether the modality is learned and generated left to right."""
        return self.kind == "text"


class Registry(Mapping[str, Modality]):
    """An immutable, ordered name -> Modality mapping."""

    def __init__(self, modalities: tuple[Modality, ...]):
        names = [m.name for m in modalities]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate modality names in {names}")
        self._by_name = MappingProxyType({m.name: m for m in modalities})

    def __getitem__(self, name: str) -> Modality:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown modality {name!r}; known: {list(self._by_name)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def __repr__(self) -> str:
        return f"Registry({list(self._by_name)})"

    def index(self, name: str) -> int:
        """Position of a modality (used for the learned modality embedding)."""
        return list(self._by_name).index(name)

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(n for n, m in self._by_name.items() if m.can_input)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(n for n, m in self._by_name.items() if m.can_target)

    def to_dict(self) -> dict:
        """JSON-ready description (stored in config.json for humans; rebuilt from sizes)."""
        return {
            n: {
                "kind": m.kind,
                "num_tokens": m.num_tokens,
                "vocab_size": m.vocab_size,
                "can_input": m.can_input,
                "can_target": m.can_target,
                "frames": m.frames,
            }
            for n, m in self._by_name.items()
        }


def build_registry(
    image_vocab: int = DEFAULT_IMAGE_VOCAB,
    text_vocab: int = 50257 + 3,
    caption_len: int = DEFAULT_CAPTION_LEN,
    action_classes: int = 0,
) -> Registry:
    """The five modalities of DESIGN section 2 for the given tokenizer vocabularies.

    The future modalities are targets only: a sample never shows the model its answer.
    """
    if image_vocab < 2 or text_vocab < 259 or caption_len < 3:
        raise ValueError(
            f"implausible sizes: image_vocab={image_vocab}, text_vocab={text_vocab}, "
            f"caption_len={caption_len}"
        )
    grid_tokens = IMAGE_GRID * IMAGE_GRID
    label = (Modality("action", "label", 1, action_classes, True, True),) if action_classes else ()
    return Registry(
        (
            Modality("tok_rgb", "image", grid_tokens, image_vocab, True, True),
            Modality("coords", "pose", TOKENS_PER_POSE, POSE_VOCAB, True, True),
            Modality("captions", "text", caption_len, text_vocab, True, True),
            Modality("tok_rgb_next", "image", grid_tokens, image_vocab, False, True),
            Modality(
                "coords_next", "pose", FUTURE_FRAMES * TOKENS_PER_POSE, POSE_VOCAB,
                False, True, frames=FUTURE_FRAMES,
            ),
            *label,  # last, so the first five keep their indices
        )
    )  # fmt: skip


MODALITY_NAMES: tuple[str, ...] = tuple(build_registry())
