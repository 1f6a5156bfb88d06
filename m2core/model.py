"""The M2 model: a 4M-style encoder-decoder transformer over the modalities of the registry.

Reading order: the config and its presets, then the model, whose `forward` is a few
stages: embed the visible inputs -> encode -> add the input positions back to the context
-> decode one query per target slot -> per-modality heads -> loss. The batch format (fixed
`input_tokens` + `target_tokens` slots per sample, grouped by modality) is documented at
the top of `m2core/masking.py`, which produces it.

Embeddings. One table per modality, stored as slices of a single `nn.Embedding` (row
offset = the modality's first id), so embedding a batch of mixed modalities is one gather
and only the tokens that are used are embedded. Positions: fixed 2D sin-cos over the 16x16
grids, fixed 1D sin-cos for captions, and for skeletons learned embeddings of frame index
(0 = now, 1..6 = the future frames) + joint + component (x, y, visible). A learned
modality embedding is added to every token, input or query.

Decoder. A query is (mask token + modality + position) for an image / pose target; when
generation (MaskGIT) has already chosen a target token, or training revealed one (see
masking.py), the query carries that token's embedding instead of the mask token. Caption
queries are teacher-forced: token i-1 (bos at the span start) + position i, causal.
Self-attention is block-diagonal by modality (no attention across target modalities) and
causal inside the caption span: one `(B, 1, Nt, Nt)` bool mask per forward, built from
the slots' modality ids with a broadcast compare (~0.1 ms at B=16, Nt=128; bench_model.py
reports it), shared by all decoder layers. The encoder and the cross-attention use no mask
at all when every slot is filled, else a key-padding mask.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2core.blocks import DecoderBlock, EncoderBlock, sincos_1d, sincos_2d, swiglu_hidden
from m2core.modalities import (
    DEFAULT_CAPTION_LEN,
    DEFAULT_IMAGE_VOCAB,
    FUTURE_FRAMES,
    NUM_JOINTS,
    POSE_BINS,
    TOKENS_PER_POSE,
    Registry,
    build_registry,
)

log = logging.getLogger(__name__)

ACTION_LOSS_WEIGHT = 0.25  # of the auxiliary action head's CE, beside the modalities' mean CE
IGNORE = -100  # label of a slot without loss (padding, or a revealed MaskGIT token)
# The present modality whose token at the same position (pose: same joint and component)
# is the prior of a future modality's query (see M2Config.present_prior).
PRESENT_OF: dict[str, str] = {"coords_next": "coords", "tok_rgb_next": "tok_rgb"}
_COPY_WIDTH = 64.0  # bins (2 pixels of the 256 frame): width of the pose copy bonus
_MAX_OFFSET = 2048  # bins (a quarter of the frame): reach of the pose offset head
_SHIFT_UNIT = 64.0  # bins: the unit of the pose shift head's outputs (mean and scale)
_SHIFT_SCALE0 = 1024.0  # bins: the shift term's initial scale (nearly flat: -1 logit per 1024 bins)
_SHIFT_GAIN = 8.0  # the head's raw outputs are multiplied by this: an 8x learning rate for it

# Body sizes; everything else (vocabularies, budgets) is a separate field of M2Config.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"dim": 192, "enc_layers": 4, "dec_layers": 4, "heads": 6},  # CPU demo, ~4M body
    "small": {"dim": 512, "enc_layers": 8, "dec_layers": 8, "heads": 8},
    "base": {"dim": 768, "enc_layers": 12, "dec_layers": 12, "heads": 12},  # like 4M-B
    "large": {"dim": 1024, "enc_layers": 24, "dec_layers": 24, "heads": 16},  # like 4M-L
}


@dataclass(frozen=True)
class M2Config:
    """Everything needed to rebuild the model (stored as JSON in a checkpoint)."""

    preset: str = "tiny"
    dim: int = 192
    enc_layers: int = 4
    dec_layers: int = 4
    heads: int = 6
    mlp_ratio: float = 4.0  # SwiGLU width = 2/3 * mlp_ratio * dim (4M's choice)
    image_vocab: int = DEFAULT_IMAGE_VOCAB  # registry sizes: build_registry is rebuilt from them
    text_vocab: int = 50257 + 3
    caption_len: int = DEFAULT_CAPTION_LEN
    input_tokens: int = 128  # encoder slots per sample (masking budget)
    target_tokens: int = 128  # decoder slots per sample
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # Skeleton coordinates are ordinal: 8192 bins of one axis. Training with Gaussian soft
    # labels over neighbouring bins (sigma in bins; 0 = plain cross-entropy) and starting the
    # pose embeddings/heads from smooth features of the bin value lets a small model learn
    # "near the right place" instead of 8192 unrelated classes. Eval CE stays hard-label.
    pose_label_sigma: float = 0.0
    # The future starts from the present: a query of `coords_next` / `tok_rgb_next` also
    # carries the present token at its position (from `coords` / `tok_rgb`), and its logits
    # get a learned bonus on that token (pose: on nearby bins), so the model starts from
    # the zero-velocity forecast and learns the change. Needs `dec_prior` in the batch.
    present_prior: bool = True
    # A future joint coordinate also gets a Laplace term over its offset from the present
    # bin, -|offset - mu| / b, with mu and b regressed from its decoder state. Two numbers
    # per slot instead of thousands of offset logits: the model learns "this wrist moves 90
    # bins up" from far fewer samples, as a regression would, and the output is still a
    # distribution over bins (sampling and the median work as before). Starts at mu = 0.
    pose_shift: bool = False
    # A pose coordinate's embedding, and its logit row in a pose head, are learned linear
    # maps of fixed sin-cos features of the bin value, shared by all 8192 bins. With one
    # free row per bin (False) every bin learns alone: after training, neighbouring bins'
    # embeddings had drifted apart (cosine 0.99 at init, 0.66 after the demo run) and the
    # model read skeletons badly. A checkpoint with tables converts (`adapt_state_dict`).
    pose_basis: bool = False
    # Every input skeleton token also gets one vector computed from the whole input
    # skeleton, normalised to its own box (joints relative to their centre, divided by the
    # skeleton's extent): a small MLP over 13 joints x (x, y, flags). The action and phase
    # of a pose are a function of its shape, not of where the person stands; one token per
    # coordinate made the transformer work that out from absolute bins, and it named the
    # action from the true skeleton for only ~40% of frames (nearest neighbours on the
    # normalised skeleton: 98.6%). A second map of the MLP's hidden layer is added to every
    # caption query (`caption_bias`): with the vector on the skeleton tokens only, the
    # caption decoder had not learnt to read it after 400 steps. Both maps start at zero:
    # switching the option on changes nothing yet.
    pose_context: bool = False
    # An auxiliary head on the pose context's hidden layer classifies the clip's action
    # (`action` ids of the prepared data; Penn Action and m2 synth both label every clip):
    # the caption's few action words alone teach the context slowly (the caption decoder
    # must first learn to look for it). 0 = no head. Needs pose_context.
    action_classes: int = 0
    # With the frame alone (/predict), the skeleton the model reads first is rough (PCK@0.05
    # ~0.33) and the action head named the action from it for only ~15-19% of frames. With
    # this set (the image tokenizer's FSQ levels per code digit: 8 for the demo's 8x8x8x8
    # codes; 0 = off) a small conv net reads the frame's tokens as their FSQ code values
    # (the quantised latents, which vary smoothly with the picture) in an 8x8-token window
    # around the skeleton's centre, and maps them into the pose context's hidden space
    # (`ImageContext`); generation then gives the caption queries that vector when it made
    # the skeleton itself. In probes, a learned embedding per token id memorised each
    # clip's look (10-15% of validation frames' actions named, chance is 10%); code values
    # generalised (47-56%). Fitted after training (`m2 fit-image-context`,
    # training/image_context.py); the transformer does not train it. Needs action_classes.
    image_context_levels: int = 0
    # The forecast from the skeleton's shape. The action and phase of a pose fix most of its
    # next six frames (nearest neighbours on the normalised skeleton: ADE 33% below zero
    # velocity), but the transformer, trained on the CPU for an hour, moved only 4-8% of
    # that way. With this set (the hidden width; 0 = off) an MLP over the present
    # skeleton's features (`skeleton_features`, as the pose context) regresses each joint's
    # displacement at t+1..t+6 in units of the skeleton's extent, and a future coordinate's
    # copy terms (bump, offset logits, Laplace) are centred on the present bin moved by it:
    # the transformer's learnt corrections then apply around the shape's forecast instead
    # of around standing still. Making it only the Laplace term's mean moved the demo's
    # forecast from 5.8% to 11.7% below zero velocity on 256 validation frames (that term is
    # wide, b ~ 1,000 bins); moving the centre, to 25.7%. Fitted after training
    # (`m2 fit-motion`, training/motion.py); the transformer does not train it.
    motion_width: int = 0
    # The skeleton from the frame alone (/predict) is read one coordinate token at a time by
    # the transformer, which learnt per-id token embeddings: PCK@0.05 0.33 on held-out clips.
    # With this set (the image tokenizer's FSQ levels per digit, as image_context_levels; 0 =
    # off) a small conv net over the whole frame's FSQ code values gives each joint a heat
    # map over the 16x16 token grid plus a sub-token offset, and its expected position
    # replaces the x / y of every skeleton the model reads from a frame (the transformer still
    # gives the visibility flags). A probe of it named 61% of validation joints within
    # PCK@0.05. Fitted after training (`m2 fit-pose-reader`, training/pose_reader.py).
    pose_reader_levels: int = 0
    # The reader also gives each joint's visibility flag (a logit per joint under its heat
    # map) in place of the transformer's. The demo transformer marked 99% of the joints it
    # read from a frame visible, where 81% are; the motion head's features place the
    # skeleton by its visible joints, and from the reader's positions with the transformer's
    # flags its forecast was no closer than holding the read skeleton still.
    pose_reader_flags: bool = False
    # The next key frame. The transformer's frame six frames on was 0.1 points of token
    # accuracy below copying the present frame (13% of tokens change, nearly all on the
    # figure, and it almost never changed one, wrongly when it did). With this set (the
    # image tokenizer's FSQ levels per digit, as above; 0 = off) a small conv net over the
    # frame's FSQ code values and heat maps of the skeleton now and at t+6 (the forecast)
    # gives each token's next FSQ digits, and generation keeps the present token unless the
    # net's guess beats it by a margin chosen on validation frames (`NextFrameHead`). Fitted
    # after training (`m2 fit-next-frame`, training/next_frame.py).
    next_frame_levels: int = 0

    def __post_init__(self) -> None:
        for name in ("dim", "enc_layers", "dec_layers", "heads", "input_tokens", "target_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"M2Config.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"M2Config.dim={self.dim} must split into {self.heads} even heads")
        if self.dim % 4:
            raise ValueError(f"M2Config.dim={self.dim} must be divisible by 4 (2D positions)")
        if self.action_classes < 0 or (self.action_classes and not self.pose_context):
            raise ValueError(
                f"M2Config.action_classes={self.action_classes} needs pose_context=true and >= 0"
            )
        if self.image_context_levels and not self.action_classes:
            raise ValueError(
                f"M2Config.image_context_levels={self.image_context_levels} needs action_classes"
            )
        for name in ("image_context_levels", "pose_reader_levels", "next_frame_levels"):
            levels, vocab = getattr(self, name), self.image_vocab
            digits = round(math.log(vocab, levels)) if levels > 1 else 0
            if levels and (levels < 2 or levels**digits != vocab):
                raise ValueError(
                    f"M2Config.{name}={levels} must be the FSQ levels of the image vocabulary "
                    f"({vocab} = levels ** digits)"
                )
        if self.pose_reader_flags and not self.pose_reader_levels:
            raise ValueError("M2Config.pose_reader_flags needs pose_reader_levels")
        if self.motion_width < 0 or (self.motion_width and not self.present_prior):
            raise ValueError(
                f"M2Config.motion_width={self.motion_width} needs present_prior=true and >= 0"
            )
        self.registry()  # validates the vocabulary sizes

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> M2Config:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
        return cls.from_dict({"preset": name, **PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> M2Config:
        """Build from JSON/YAML data; an unknown key or a wrong type is a ValueError."""
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for key, value in data.items():
            if key not in types:
                raise ValueError(f"unknown model config key {key!r}; known: {sorted(types)}")
            want = {"int": int, "float": (int, float), "str": str, "bool": bool}[str(types[key])]
            if (isinstance(value, bool) and want is not bool) or not isinstance(value, want):
                raise ValueError(f"model config key {key!r}: expected {types[key]}, got {value!r}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def registry(self) -> Registry:
        return build_registry(self.image_vocab, self.text_vocab, self.caption_len)


@dataclass(frozen=True)
class FlopCount:
    """Training FLOPs (forward + backward = 3x forward) per encoder / decoder token."""

    encoder: float
    decoder: float
    input_tokens: int
    target_tokens: int

    @property
    def per_sample(self) -> float:
        return self.encoder * self.input_tokens + self.decoder * self.target_tokens

    @property
    def per_token(self) -> float:
        """Mean over the encoder + decoder tokens of one sample."""
        return self.per_sample / (self.input_tokens + self.target_tokens)


class M2Model(nn.Module):
    # Stored in fp32 even in a half-precision checkpoint: a pose basis converted from tables
    # (adapt_state_dict) is a least-squares fit whose large terms cancel, and fp16 rounding
    # of them moved pose logits by hundreds.
    FULL_PRECISION = ("pose_value.", "pose_head_basis.")
    # Learning-rate factors by parameter name prefix (training/train.py param_groups): the
    # pose context's zero-initialised output layer, so that the transformer starts reading
    # the (warm-started, training/pose_context.py) context within a few hundred steps.
    LR_SCALE: ClassVar[dict[str, float]] = {"pose_context.2.": 10.0, "caption_context.": 10.0}

    def __init__(self, config: M2Config):
        super().__init__()
        self.config = config
        reg = config.registry()
        self.names: tuple[str, ...] = tuple(reg)
        self.target_names: tuple[str, ...] = reg.targets
        self.kinds: dict[str, str] = {n: m.kind for n, m in reg.items()}
        D = config.dim
        mods = list(reg.values())

        # --- Embedding tables (one slice per modality) -------------------------------
        vocab = [m.vocab_size for m in mods]
        ntok = [m.num_tokens for m in mods]
        self.register_buffer("tok_offset", _offsets(vocab), persistent=False)
        self.register_buffer("pos_offset", _offsets(ntok), persistent=False)
        self.tok_emb = nn.Embedding(sum(vocab), D)
        self.mod_emb = nn.Embedding(len(mods), D)
        self.mask_token = nn.Parameter(torch.zeros(D))
        self.frame_emb = nn.Embedding(FUTURE_FRAMES + 1, D)
        self.joint_emb = nn.Embedding(NUM_JOINTS, D)
        self.comp_emb = nn.Embedding(3, D)
        fixed, pose_rows, frame = [], [], []
        start = 0
        for m in mods:
            if m.kind == "image":
                fixed.append(sincos_2d(*m.grid, D))
            elif m.kind == "text":
                fixed.append(sincos_1d(m.num_tokens, D))
            else:  # pose: learned frame x joint x component, added in pos_table()
                fixed.append(torch.zeros(m.num_tokens, D))
                pose_rows.append(torch.arange(start, start + m.num_tokens))
                first = 1 if m.frames > 1 else 0  # coords = frame 0, coords_next = 1..6
                frame.append(first + torch.arange(m.num_tokens) // TOKENS_PER_POSE)
            start += m.num_tokens
        p = torch.cat(pose_rows)
        local = torch.cat([torch.arange(len(r)) for r in pose_rows]) % TOKENS_PER_POSE
        self.register_buffer("pos_fixed", torch.cat(fixed), persistent=False)
        self.register_buffer("pose_rows", p, persistent=False)
        self.register_buffer("pose_frame", torch.cat(frame), persistent=False)
        self.register_buffer("pose_joint", local // 3, persistent=False)
        self.register_buffer("pose_comp", local % 3, persistent=False)
        # Per group id (modality index, or len(mods) for empty slots): causal or not.
        causal = torch.tensor([m.causal for m in mods] + [False])
        self.register_buffer("causal_group", causal, persistent=False)

        # --- Transformer ----------------------------------------------------------
        hidden = swiglu_hidden(D, config.mlp_ratio)
        eps = config.norm_eps
        self.encoder = nn.ModuleList(
            EncoderBlock(D, config.heads, hidden, eps) for _ in range(config.enc_layers)
        )
        self.enc_norm = nn.LayerNorm(D, eps=eps, bias=False)
        self.ctx_proj = nn.Linear(D, D, bias=False)
        self.decoder = nn.ModuleList(
            DecoderBlock(D, config.heads, hidden, eps) for _ in range(config.dec_layers)
        )
        self.dec_norm = nn.LayerNorm(D, eps=eps, bias=False)
        basis = config.pose_basis
        # with pose_basis, a pose head's own rows are the two visibility flags only
        self.heads = nn.ModuleDict({
            n: nn.Linear(D, reg[n].vocab_size - (POSE_BINS if basis and reg[n].kind == "pose" else 0), bias=False)
            for n in self.target_names
        })  # fmt: skip
        self.register_buffer(
            "mod_is_pose", torch.tensor([m.kind == "pose" for m in mods]), persistent=False
        )
        if basis:
            self.register_buffer("bin_feats", _bin_features(POSE_BINS, D), persistent=False)
        self.pose_value = nn.Linear(D, D, bias=False) if basis else None
        self.pose_head_basis = nn.ModuleDict(
            {n: nn.Linear(D, D, bias=False) for n in self.target_names if basis and reg[n].kind == "pose"}
        )  # fmt: skip
        # present -> future prior: source modality of each modality's prior (itself if none)
        src = [self.names.index(PRESENT_OF.get(n, n)) for n in self.names]
        self.register_buffer("prior_src", torch.tensor(src), persistent=False)
        self.copy_gain = nn.ParameterDict(
            {n: nn.Parameter(torch.tensor(3.0)) for n in PRESENT_OF if config.present_prior}
        )
        # Future pose coordinates also get logits over their *offset* from the present bin
        # (translation-invariant: "moves 40 bins left" is the same wherever the joint is).
        # Zero-initialised, so training starts from the copy forecast.
        self.offset_heads = nn.ModuleDict(
            {
                n: nn.Linear(D, 2 * _MAX_OFFSET + 1, bias=False)
                for n in PRESENT_OF
                if config.present_prior and reg[n].kind == "pose"
            }
        )
        offsets = torch.arange(-_MAX_OFFSET, _MAX_OFFSET + 1, dtype=torch.float32)
        self.register_buffer(
            "copy_bump", torch.exp(-0.5 * (offsets / _COPY_WIDTH) ** 2), persistent=False
        )
        self.shift_heads = nn.ModuleDict(
            {n: nn.Linear(D, 2) for n in self.offset_heads} if config.pose_shift else {}
        )
        self.pose_context = (
            nn.Sequential(nn.Linear(_CONTEXT_FEATURES, D), nn.GELU(), nn.Linear(D, D))
            if config.pose_context
            else None
        )
        self.action_head = nn.Linear(D, config.action_classes) if config.action_classes else None
        # ... and the same hidden layer, through its own zero-initialised map, is added to
        # every caption query: the caption decoder gets the skeleton's shape (and so its
        # action) in its residual stream instead of having to learn where to look for it
        self.caption_context = nn.Linear(D, D) if config.pose_context else None
        self.image_context = (
            ImageContext(config.image_context_levels, config.image_vocab, D)
            if config.image_context_levels
            else None
        )
        self.pose_reader = (
            PoseReader(config.pose_reader_levels, config.image_vocab, config.pose_reader_flags)
            if config.pose_reader_levels
            else None
        )
        self.next_frame = (
            NextFrameHead(config.next_frame_levels, config.image_vocab)
            if config.next_frame_levels
            else None
        )
        w = config.motion_width
        self.motion = (
            nn.Sequential(
                nn.Linear(_CONTEXT_FEATURES, w), nn.GELU(), nn.Linear(w, w), nn.GELU(),
                nn.Linear(w, w), nn.GELU(), nn.Linear(w, FUTURE_FRAMES * NUM_JOINTS * 2),
            )
            if w
            else None
        )  # fmt: skip
        self._init_weights()
        log.info("M2Model %s: %.2fM parameters", config.preset, self.num_params() / 1e6)

    def _init_weights(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                # GPT-2: shrink the projections that write into the residual stream.
                layers = (
                    self.config.enc_layers if name.startswith("encoder") else self.config.dec_layers
                )
                scale = (
                    (2 * layers) ** -0.5 if name.endswith(("proj.weight", "down.weight")) else 1.0
                )
                nn.init.normal_(p, std=std * scale)
        nn.init.normal_(self.mask_token, std=std)
        # Pose coordinate bins start from sin-cos features of their value, so neighbouring
        # bins begin (and, under soft labels, stay) similar in both embedding and head.
        if self.tok_emb.weight.is_meta:  # size-only models (param counts) have no data
            return
        for head in self.offset_heads.values():
            nn.init.zeros_(head.weight)
        if self.pose_context is not None:
            # the features are O(1): a unit-variance hidden layer (at the transformer's 0.02
            # the action head sat at chance for the first hundred steps), a zero output
            first, last = self.pose_context[0], self.pose_context[2]
            nn.init.normal_(first.weight, std=first.in_features**-0.5)
            for layer in (first, last):
                nn.init.zeros_(layer.bias)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(self.caption_context.weight)
            nn.init.zeros_(self.caption_context.bias)
        if self.image_context is not None:
            self.image_context.reset_parameters()
        if self.pose_reader is not None:
            self.pose_reader.reset_parameters()
        if self.next_frame is not None:
            self.next_frame.reset_parameters()
        if self.motion is not None:  # a small MLP fitted alone: PyTorch's default init
            for m in self.motion:
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
        for head in self.shift_heads.values():  # mu = 0, b = _SHIFT_SCALE0
            nn.init.zeros_(head.weight)
            head.bias.data.copy_(
                torch.tensor([0.0, math.log(_SHIFT_SCALE0 / _SHIFT_UNIT) / _SHIFT_GAIN])
            )
        smooth = _bin_features(POSE_BINS, self.config.dim) * std * 2**0.5
        reg = self.config.registry()
        offsets = self.tok_offset.tolist()
        with torch.no_grad():
            if self.pose_value is not None:  # same start as the tables: features x scale
                eye = torch.eye(self.config.dim) * std * 2**0.5
                self.pose_value.weight.copy_(eye)
                for head in self.pose_head_basis.values():
                    head.weight.copy_(eye)
            for i, name in enumerate(self.names):
                if reg[name].kind != "pose":
                    continue
                self.tok_emb.weight[offsets[i] : offsets[i] + POSE_BINS] = smooth
                if name in self.heads and name not in self.pose_head_basis:
                    self.heads[name].weight[:POSE_BINS] = smooth
            # the future image head starts as the present image's embedding table, so the
            # present token (added to the query) already points at itself
            if self.config.present_prior and "tok_rgb_next" in self.heads:
                i = self.names.index("tok_rgb")
                rows = self.tok_emb.weight[offsets[i] : offsets[i] + reg["tok_rgb"].vocab_size]
                self.heads["tok_rgb_next"].weight.copy_(rows)

    # --- Embedding ---------------------------------------------------------------
    def pos_table(self) -> Tensor:
        """All positions of all modalities, (sum of num_tokens, D)."""
        pose = self.frame_emb(self.pose_frame) + self.joint_emb(self.pose_joint)
        pose = pose + self.comp_emb(self.pose_comp)
        return self.pos_fixed.index_add(0, self.pose_rows, pose)

    def embed_positions(self, mod: Tensor, pos: Tensor, table: Tensor | None = None) -> Tensor:
        """Modality + position embedding of each slot, (B, N, D). Generation passes the
        `pos_table()` it computed once instead of rebuilding it at every step."""
        table = self.pos_table() if table is None else table
        return table[pos + self.pos_offset[mod]] + self.mod_emb(mod)

    def embed_tokens(self, ids: Tensor, mod: Tensor) -> Tensor:
        x = self.tok_emb(ids + self.tok_offset[mod])
        if self.pose_value is None:
            return x
        # only the pose coordinate slots (39 of a frame's ~330 inputs) go through the basis
        coord = self.mod_is_pose[mod] & (ids < POSE_BINS) & (ids >= 0)
        x[coord] = self.pose_value(self.bin_feats[ids[coord]]).to(x.dtype)
        return x

    def pose_logits(self, name: str, h: Tensor, is_flag: Tensor | None = None) -> Tensor:
        """(n, D) -> (n, POSE_BINS + 2) logits of a pose head (coordinate bins, then flags).
        With `is_flag` (n,) bool, each slot gets logits of its own kind only (a flag slot
        the two flags, a coordinate slot the bins) and -inf for the rest, which are not
        computed: generation needs no more, and the bins of flag slots are a third of the
        head's work."""
        head = self.heads[name]  # with pose_basis: the two flags' rows only
        if name not in self.pose_head_basis:
            out = head(h)
            if is_flag is None:
                return out
            flag_column = torch.arange(out.shape[1], device=h.device) >= POSE_BINS
            return out.masked_fill(is_flag[:, None] != flag_column, float("-inf"))
        basis = self.bin_feats.to(h.dtype).T
        if is_flag is None:
            return torch.cat([self.pose_head_basis[name](h) @ basis, head(h)], dim=-1)
        out = h.new_full((len(h), POSE_BINS + 2), float("-inf"))
        coord, flag = (~is_flag).nonzero().squeeze(1), is_flag.nonzero().squeeze(1)
        out[coord, :POSE_BINS] = self.pose_head_basis[name](h.index_select(0, coord)) @ basis
        out[flag, POSE_BINS:] = head(h.index_select(0, flag))
        return out

    def adapt_state_dict(self, stored: dict[str, Tensor]) -> dict[str, Tensor]:
        """Weights of a model without `pose_basis` -> this model's, when it has one: the
        basis weights are the least-squares fits of the stored per-bin rows onto the bin
        features (their smooth part), the heads keep their flag rows. Else unchanged."""
        if self.pose_value is None or "pose_value.weight" in stored:
            return stored
        out = dict(stored)
        feats = self.bin_feats.double()
        fit = lambda rows: torch.linalg.lstsq(feats, rows.double()).solution.T.float()  # noqa: E731
        i = self.names.index("coords")
        start = int(self.tok_offset[i])
        out["pose_value.weight"] = fit(stored["tok_emb.weight"][start : start + POSE_BINS])
        for name in self.pose_head_basis:
            rows = stored[f"heads.{name}.weight"]
            out[f"pose_head_basis.{name}.weight"] = fit(rows[:POSE_BINS]).T.contiguous()
            out[f"heads.{name}.weight"] = rows[POSE_BINS:].contiguous()
        return out

    # --- Stages --------------------------------------------------------------------
    def encode(
        self,
        ids: Tensor,
        mod: Tensor,
        pos: Tensor,
        valid: Tensor,
        table: Tensor | None = None,
        context_hidden: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Encode the visible inputs -> (context (B, N, D), key mask (B, 1, 1, N) or None).

        The context is the projected encoder output with the input positions and
        modalities added back (4M), ready for every decoder layer's cross-attention.
        `context_hidden` (B, D): the pose context's hidden layer to use instead of the one
        computed from the input skeleton (generation passes the image context's)."""
        key_mask = None
        if not bool(valid.all()):
            # a sample without any input would give NaN attention rows: let it see slot 0
            first = torch.zeros_like(valid)
            first[:, 0] = True
            key_mask = (valid | (first & ~valid.any(1, keepdim=True)))[:, None, None, :]
        pe = self.embed_positions(mod, pos, table)
        x = self.embed_tokens(ids, mod) + pe  # (B, N, D)
        if self.pose_context is not None:
            hidden, is_coords = self._context_hidden(ids, mod, pos, valid, context_hidden)
            summary = self.pose_context[2](hidden).to(x.dtype)
            x = x + summary[:, None] * is_coords[..., None]
        for block in self.encoder:
            x = block(x, key_mask)
        return self.ctx_proj(self.enc_norm(x)) + pe, key_mask

    def caption_bias(
        self,
        ids: Tensor,
        mod: Tensor,
        pos: Tensor,
        valid: Tensor,
        context_hidden: Tensor | None = None,
    ) -> Tensor | None:
        """(B, D) vector added to every caption query, from the input skeleton (the encoder
        slots as `encode` takes them) or from `context_hidden` as in `encode`; None without
        pose_context."""
        if self.caption_context is None:
            return None
        hidden, is_coords = self._context_hidden(ids, mod, pos, valid, context_hidden)
        return self.caption_context(hidden) * is_coords.any(1, keepdim=True)

    # test-time shifts of the image context's window, in tokens (its hidden is averaged)
    IMAGE_SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))

    def image_hidden(self, rgb: Tensor, coords: Tensor) -> Tensor:
        """(B, 256) frame tokens and (B, 39) pose ids of the person in it -> (B, D): the
        image context around the skeleton's centre, averaged over `IMAGE_SHIFTS`."""
        pos = torch.arange(coords.shape[1], device=coords.device).expand_as(coords)
        centre = skeleton_features(coords, pos, torch.ones_like(coords, dtype=torch.bool))
        centre = centre[:, -3:-1]
        return torch.stack([self.image_context(rgb, centre, s) for s in self.IMAGE_SHIFTS]).mean(0)

    def read_pose(self, rgb: Tensor, coords: Tensor) -> Tensor:
        """(B, 256) frame tokens, (B, 39) pose ids -> the same ids with every joint's x / y
        bins replaced by the pose reader's, and its flags too when it has a flag head
        (`pose_reader_flags`; otherwise the flags are kept)."""
        xy, visible = self.pose_reader.read(rgb)  # (B, 13, 2) in [0, 1]; (B, 13) logits
        bins = (xy * POSE_BINS).floor().long().clamp(0, POSE_BINS - 1)
        out = coords.view(-1, NUM_JOINTS, 3).clone()
        out[..., :2] = bins
        if visible is not None:
            out[..., 2] = torch.where(visible > 0, POSE_BINS + 1, POSE_BINS)
        return out.view_as(coords)

    def next_frame_tokens(
        self, rgb: Tensor, now: Tensor, later: Tensor, read: Tensor | None = None
    ) -> Tensor:
        """(B, 256) frame tokens, (B, 39) pose ids now and at t+6 -> (B, 256) the next key
        frame's tokens from the next-frame head (`NextFrameHead.predict`). `read` (B,): the
        samples whose skeleton was read from the frame (they get its `margin_read`)."""
        head = self.next_frame
        margin = head.margin.expand(len(rgb), 1)
        if read is not None:
            margin = torch.where(read[:, None], head.margin_read, margin)
        return head.predict(rgb, *pose_points(now), *pose_points(later), margin)

    def skeleton_hidden(
        self, ids: Tensor, mod: Tensor, pos: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Encoder slots -> (the pose context's hidden layer (B, D), which slots are skeleton
        tokens (B, N)). The context's output, the caption map and the action head read it."""
        is_coords = valid & (mod == self.names.index("coords"))
        return self.pose_context[:2](skeleton_features(ids, pos, is_coords)), is_coords

    def motion_bins(self, ids: Tensor, pos: Tensor, is_coords: Tensor) -> Tensor:
        """Input slots as `skeleton_features` takes them -> (B, 234) each future coordinate's
        displacement from the present in bins, from `self.motion`: 0 on the visibility
        flags, NaN for a sample without a skeleton token (its shift head is used)."""
        feats = skeleton_features(ids, pos, is_coords)
        extent = feats[:, -1].exp()[:, None, None, None]  # of the placed joints, frame units
        move = self.motion(feats).view(-1, FUTURE_FRAMES, NUM_JOINTS, 2) * extent * POSE_BINS
        move = F.pad(move, (0, 1)).flatten(1)  # (B, 6 * 13 * 3): x, y, flag
        return move.masked_fill(~is_coords.any(1, keepdim=True), float("nan"))

    def _context_hidden(
        self, ids: Tensor, mod: Tensor, pos: Tensor, valid: Tensor, given: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """`skeleton_hidden`, or `given` in place of the hidden layer when there is one."""
        if given is None:
            return self.skeleton_hidden(ids, mod, pos, valid)
        return given, valid & (mod == self.names.index("coords"))

    def context_kv(self, context: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Cross-attention keys/values of every decoder layer (computed once per context)."""
        return [block.context_kv(context) for block in self.decoder]

    def embed_queries(
        self,
        query: Tensor,
        mod: Tensor,
        pos: Tensor,
        table: Tensor | None = None,
        prior: Tensor | None = None,
        caption_bias: Tensor | None = None,
    ) -> Tensor:
        """Decoder queries: mask token where query == -1, else that token's embedding;
        plus, where prior >= 0, the embedding of the present token at that position; plus,
        on caption queries, `caption_bias` (B, D) when given."""
        tok = self.embed_tokens(query.clamp(min=0), mod)
        tok = torch.where((query >= 0)[..., None], tok, self.mask_token.to(tok.dtype))
        x = tok + self.embed_positions(mod, pos, table)
        if caption_bias is not None:
            is_caption = (mod == self.names.index("captions"))[..., None]
            x = x + caption_bias[:, None].to(x.dtype) * is_caption
        if prior is not None and self.config.present_prior:
            present = self.embed_tokens(prior.clamp(min=0), self.prior_src[mod])
            x = x + torch.where((prior >= 0)[..., None], present, 0.0)
        return x

    def head_logits(
        self,
        name: str,
        h: Tensor,
        prior: Tensor | None = None,
        is_flag: Tensor | None = None,
        motion: Tensor | None = None,
    ) -> Tensor:
        """(n, D) decoder states of one modality's slots -> (n, V) logits, with the learned
        bonus on the present token (pose coordinates: a bump over nearby bins). `is_flag`
        (pose only): which slots are visibility flags (`pose_logits`). `motion` (n,): each
        slot's displacement in bins from `motion_bins` (NaN: none); a future coordinate's
        bump, offset logits and Laplace term are then centred on the present bin moved by
        it instead of on the present bin."""
        pose = self.kinds[name] == "pose"
        out = self.pose_logits(name, h, is_flag) if pose else self.heads[name](h)
        if prior is None or name not in self.copy_gain:
            return out
        gain = self.copy_gain[name]
        has = prior >= 0
        if not pose:
            rows = has.nonzero().squeeze(1)
            return out.index_put((rows, prior[rows]), gain.to(out.dtype), accumulate=True)
        # Pose: a flag's present token gets the bonus as above. A coordinate's whole row of
        # bins gets terms in its offset from the present bin, computed on those rows only
        # (a third of a skeleton's slots are flags, and (rows, 8192) tensors dominate the
        # cost of generating a future skeleton).
        coord = has & (prior < POSE_BINS)
        rows, flags = coord.nonzero().squeeze(1), (has & ~coord).nonzero().squeeze(1)
        out = out.index_put((flags, prior[flags]), gain.to(out.dtype), accumulate=True)
        if rows.numel() == 0:
            return out
        ref = prior[rows]  # the bin every term below is centred on: the present, or moved
        if motion is not None:
            move = motion[rows]
            moved = (ref + move.nan_to_num(0.0).round().long()).clamp(0, POSE_BINS - 1)
            ref = torch.where(move.isnan(), ref, moved)
        # offset of every bin from that centre: exact integers (bins up to 8191 are not all
        # representable in bf16, so this is computed in int64 and converted where used)
        offset = torch.arange(POSE_BINS, device=h.device)[None] - ref[:, None]
        # The copy bump is a function of the offset alone, and 0 in float32 beyond the
        # offset head's reach (exp(-0.5 (2049/64)^2) underflows): it is added to that head's
        # logits, one row of 2K+1 offsets, instead of computed per bin.
        # A zero column at each end stands for every offset beyond the head's reach.
        hc = h.index_select(0, rows)
        rel = self.offset_heads[name](hc) + gain * self.copy_bump.to(out.dtype)
        rel = F.pad(rel, (1, 1))  # (rows, 2K+3): offsets -K-1..K+1
        term = rel.gather(1, (offset + _MAX_OFFSET + 1).clamp_(0, 2 * _MAX_OFFSET + 2))
        if name in self.shift_heads:
            raw = self.shift_heads[name](hc).float() * _SHIFT_GAIN  # (rows, 2): mu, log b
            mu = raw[:, 0] * _SHIFT_UNIT
            b = _SHIFT_UNIT * raw[:, 1].clamp(-5.0, 5.0).exp()
            term = term - ((offset - mu[:, None]).abs() / b[:, None]).to(term.dtype)
        pad = torch.zeros(len(rows), out.shape[1] - POSE_BINS, dtype=term.dtype, device=h.device)
        return out.index_add(0, rows, torch.cat([term, pad], 1).to(out.dtype))

    def target_mask(self, mod: Tensor, valid: Tensor) -> Tensor:
        """(B, 1, Nt, Nt) bool: same modality group, and causal inside a text group."""
        group = torch.where(valid, mod, len(self.names))  # empty slots: their own group
        same = group[:, :, None] == group[:, None, :]
        n = mod.shape[1]
        lower = torch.ones(n, n, dtype=torch.bool, device=mod.device).tril()
        return (same & (lower | ~self.causal_group[group][:, :, None]))[:, None]

    def decode(
        self,
        x: Tensor,
        kv: list[tuple[Tensor, Tensor]],
        cross_mask: Tensor | None,
        self_mask: Tensor | None = None,
        is_causal: bool = False,
        caches: list | None = None,
    ) -> Tensor:
        """Run the decoder on embedded queries x (B, Nt, D) -> normed hidden (B, Nt, D)."""
        for i, block in enumerate(self.decoder):
            cache = caches[i] if caches is not None else None
            x = block(x, kv[i], cross_mask, self_mask, is_causal, cache)
        return self.dec_norm(x)

    def forward(
        self, batch: dict[str, Tensor], return_logits: bool = True
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """-> (logits per target modality, loss or None when the batch has no labels).

        logits[name] is (n, vocab) over the filled target slots of that modality, in
        (sample, slot) order, i.e. `batch["dec_mod"] == index` and `batch["dec_valid"]`.
        The loss is the cross-entropy per modality, averaged over the modalities that
        have labelled targets in the batch."""
        table = self.pos_table()
        context, cross_mask = self.encode(
            batch["enc_ids"], batch["enc_mod"], batch["enc_pos"], batch["enc_valid"], table
        )
        mod, valid = batch["dec_mod"], batch["dec_valid"]
        prior = batch.get("dec_prior")
        bias = self.caption_bias(
            batch["enc_ids"], batch["enc_mod"], batch["enc_pos"], batch["enc_valid"]
        )
        x = self.embed_queries(batch["dec_query"], mod, batch["dec_pos"], table, prior, bias)
        h = self.decode(x, self.context_kv(context), cross_mask, self.target_mask(mod, valid))
        labels = batch.get("dec_labels")
        logits: dict[str, Tensor] = {}
        losses = []
        action_ce = self._action_loss(batch, logits) if labels is not None else None
        motion = None
        if self.motion is not None and "coords_next" in self.target_names:
            is_coords = batch["enc_valid"] & (batch["enc_mod"] == self.names.index("coords"))
            motion = self.motion_bins(batch["enc_ids"], batch["enc_pos"], is_coords)
        # One matmul per head: a python loop over <= 5 modalities, each a gather of its slots.
        for name in self.target_names:
            sel = (valid & (mod == self.names.index(name))).flatten().nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            p = prior.flatten().index_select(0, sel) if prior is not None else None
            m = None
            if motion is not None and name == "coords_next":
                m = motion[sel // mod.shape[1], batch["dec_pos"].flatten()[sel]]
            out = self.head_logits(name, h.flatten(0, 1).index_select(0, sel), p, None, m)  # (n, V)
            if return_logits:
                logits[name] = out
            if labels is not None:
                y = labels.flatten().index_select(0, sel)
                n = (y != IGNORE).sum()
                sigma = self.config.pose_label_sigma
                if self.training and sigma > 0 and self.kinds[name] == "pose":
                    ce = _soft_pose_ce(out.float(), y, sigma)
                else:
                    ce = F.cross_entropy(out.float(), y, ignore_index=IGNORE, reduction="sum")
                losses.append((ce / n.clamp(min=1), n > 0))
        loss = None
        if labels is not None and losses:
            total = sum(ce * has for ce, has in losses)
            loss = total / sum(has for _, has in losses).clamp(min=1)
        if action_ce is not None:
            loss = ACTION_LOSS_WEIGHT * action_ce + (0.0 if loss is None else loss)
        return logits, loss

    def _action_loss(self, batch: dict[str, Tensor], logits: dict[str, Tensor]) -> Tensor | None:
        """Cross-entropy of the action head over the samples with skeleton inputs and an
        action label (`batch["action"]`, -1 = none); its logits go to logits["action"]."""
        action = batch.get("action")
        if self.action_head is None or action is None:
            return None
        has = action_rows(batch, self.names).nonzero().squeeze(1)
        if has.numel() == 0:
            return None
        # ids >= action_classes are refused when a run starts (train.py), not here: that
        # check would cost a host sync every step
        slots = (batch[k][has] for k in ("enc_ids", "enc_mod", "enc_pos", "enc_valid"))
        out = self.action_head(self.skeleton_hidden(*slots)[0])
        logits["action"] = out
        return F.cross_entropy(out.float(), action[has])

    # --- Accounting ------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Parameters by part: encoder / decoder bodies, embeddings, heads, total."""
        count = {"encoder": 0, "decoder": 0, "embeddings": 0, "heads": 0}
        for name, p in self.named_parameters():
            if name.startswith(("encoder.", "enc_norm", "ctx_proj")):
                count["encoder"] += p.numel()
            elif name.startswith(("decoder.", "dec_norm")):
                count["decoder"] += p.numel()
            elif name.startswith(
                ("heads.", "offset_heads.", "shift_heads.", "pose_head_basis.", "action_head.")
            ):
                count["heads"] += p.numel()
            else:
                count["embeddings"] += p.numel()
        count["total"] = sum(count.values())
        return count

    def num_params(self, body_only: bool = False) -> int:
        """All parameters, or only the transformer body (no embedding tables, no heads)."""
        c = self.param_counts()
        return c["encoder"] + c["decoder"] if body_only else c["total"]

    def flops_per_token(
        self, input_tokens: int | None = None, target_tokens: int | None = None
    ) -> FlopCount:
        """Training FLOPs per encoder token and per decoder token (matmuls and attention;
        2 per multiply-add, backward = 2x forward). Heads are counted at the mean
        vocabulary of the target modalities."""
        c, D = self.config, self.config.dim
        n_in = input_tokens or c.input_tokens
        n_t = target_tokens or c.target_tokens
        H = swiglu_hidden(D, c.mlp_ratio)
        mlp, attn_proj = 3 * D * H, 4 * D * D
        # encoder: blocks + attention over n_in keys + ctx_proj + each decoder layer's K/V
        enc = c.enc_layers * (2 * (attn_proj + mlp) + 4 * n_in * D) + 2 * D * D
        enc += c.dec_layers * 2 * (2 * D * D)
        # decoder: self-attn (qkv, proj) + cross (q, proj) + mlp, attention over n_t + n_in
        dec = c.dec_layers * (2 * (attn_proj + 2 * D * D + mlp) + 4 * (n_t + n_in) * D)
        reg = c.registry()
        dec += 2 * D * sum(reg[n].vocab_size for n in self.target_names) / len(self.target_names)
        return FlopCount(3.0 * enc, 3.0 * dec, n_in, n_t)

    def estimate_mfu(self, tokens_per_s: float, peak_flops: float) -> float:
        """Model FLOPs utilisation: (encoder + decoder) tokens per second, in the config's
        input:target ratio, times FLOPs per token, over the caller's peak FLOP/s."""
        return tokens_per_s * self.flops_per_token().per_token / peak_flops

    def optimizer_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: decay matrices (linear weights, token tables); not norms, the mask
        token, nor the modality / skeleton position embeddings."""
        no_decay = ("mod_emb", "frame_emb", "joint_emb", "comp_emb")
        decay, rest = [], []
        for name, p in self.named_parameters():
            (rest if p.ndim < 2 or name.startswith(no_decay) else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ]


def action_rows(batch: dict[str, Tensor], names: tuple[str, ...]) -> Tensor:
    """(B,) bool: the samples the action head scores (a skeleton token among the inputs,
    and an action label)."""
    is_coords = batch["enc_valid"] & (batch["enc_mod"] == names.index("coords"))
    return is_coords.any(1) & (batch["action"] >= 0)


def skeleton_features(ids: Tensor, pos: Tensor, is_coords: Tensor) -> Tensor:
    """(B, N) input ids / positions, and which slots are `coords` tokens -> (B, 81) features
    of each sample's input skeleton: per joint x, y relative to the centre of the placed
    joints over their extent (0 where absent), has-x, has-y, visible, has-flag; then the
    centre (x, y) and log extent. Joints without a coordinate, or flagged not visible, do not
    place the centre. Masked-out slots count as absent, so a partial skeleton works too."""
    B = ids.shape[0]
    dense = torch.full((B, TOKENS_PER_POSE + 1), -1, dtype=ids.dtype, device=ids.device)
    dense.scatter_(1, torch.where(is_coords, pos, TOKENS_PER_POSE), torch.where(is_coords, ids, -1))
    dense = dense[:, :TOKENS_PER_POSE].view(B, NUM_JOINTS, 3)
    xy, flag = dense[..., :2], dense[..., 2]
    has_xy = (xy >= 0) & (xy < POSE_BINS)
    has_flag = flag >= POSE_BINS
    visible = flag == POSE_BINS + 1
    value = (xy.float() + 0.5) / POSE_BINS
    place = (has_xy.all(-1) & (visible | ~has_flag))[..., None]  # (B, 13, 1)
    n = place.sum(1).clamp(min=1)
    centre = (value * place).sum(1) / n  # (B, 2)
    hi = torch.where(place, value, -1.0).amax(1)
    lo = torch.where(place, value, 2.0).amin(1)
    extent = (hi - lo).amax(-1, keepdim=True).clamp(min=0.02)  # (B, 1); 0.02: 5 pixels
    rel = (value - centre[:, None]) / extent[:, None] * has_xy
    flags = torch.stack([visible, has_flag], -1).float()
    per_joint = torch.cat([rel, has_xy.float(), flags], -1).flatten(1)  # (B, 13 * 6)
    return torch.cat([per_joint, centre, extent.log()], 1)


_CONTEXT_FEATURES = NUM_JOINTS * 6 + 3


def fsq_codes(levels: int, vocab: int) -> Tensor:
    """(vocab, digits) the FSQ code values in [-1, 1] of every image token id (digit k of id
    i is (i // levels**k) % levels; the same as `FSQ.ids_to_codes`)."""
    digits = round(math.log(vocab, levels))
    half = levels // 2
    ids = torch.arange(vocab)[:, None]
    return (((ids // levels ** torch.arange(digits)) % levels - half) / half).float()


class PoseReader(nn.Module):
    """Frame tokens -> every joint's position (x, y in [0, 1] of the frame).

    Each token id becomes its FSQ code values; eight 3x3 convolutions over the token grid
    (plus two channels of grid position) give each joint a softmax heat map over the grid
    and an offset inside each cell (at most half a cell); the joint is the expected cell
    centre plus offset under its heat map (a soft-argmax, so positions finer than a token
    are learnt with a plain L1 loss)."""

    WIDTH = 64
    LAYERS = 8

    def __init__(self, levels: int, vocab: int, flags: bool = False, grid: int = 16):
        super().__init__()
        self.register_buffer("codes", fsq_codes(levels, vocab), persistent=False)
        centres = (torch.arange(grid) + 0.5) / grid
        where = torch.stack(torch.meshgrid(centres, centres, indexing="xy"))  # (2, G, G): x, y
        self.register_buffer("where", where, persistent=False)
        w, digits = self.WIDTH, self.codes.shape[1]
        layers: list[nn.Module] = [nn.Conv2d(digits + 2, w, 3, padding=1), nn.GELU()]
        for _ in range(self.LAYERS - 1):
            layers += [nn.Conv2d(w, w, 3, padding=1), nn.GELU()]
        self.trunk = nn.Sequential(*layers)
        self.heat = nn.Conv2d(w, NUM_JOINTS, 1)
        self.offset = nn.Conv2d(w, 2 * NUM_JOINTS, 1)
        # each joint's visibility logit: a map per joint, averaged under its heat map
        self.visible = nn.Conv2d(w, NUM_JOINTS, 1) if flags else None

    def reset_parameters(self) -> None:
        """PyTorch's default initialisation (the transformer's 0.02 normal stalls a conv net)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()

    def read(self, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, G*G) token ids -> (B, 13, 2) joint positions, and (B, 13) visibility logits
        (None without the flag head)."""
        B, g = len(ids), self.where.shape[-1]
        x = self.codes[ids].view(B, g, g, -1).permute(0, 3, 1, 2)
        h = self.trunk(torch.cat([x, self.where.expand(B, -1, -1, -1)], 1))
        heat = self.heat(h).flatten(2).softmax(-1)  # (B, 13, G*G)
        offset = self.offset(h).view(B, NUM_JOINTS, 2, -1).tanh() * (0.5 / g)
        xy = ((self.where.flatten(1) + offset) * heat[:, :, None]).sum(-1)
        if self.visible is None:
            return xy, None
        return xy, (self.visible(h).flatten(2) * heat).sum(-1)

    def forward(self, ids: Tensor) -> Tensor:
        """(B, G*G) token ids -> (B, 13, 2) joint positions."""
        return self.read(ids)[0]


def pose_points(ids: Tensor) -> tuple[Tensor, Tensor]:
    """(B, 39) pose ids -> each joint's (x, y) in [0, 1] (bin centres; (B, 13, 2)) and
    whether it is placed and visible (B, 13)."""
    joints = ids.view(-1, NUM_JOINTS, 3)
    placed = ((joints[..., :2] >= 0) & (joints[..., :2] < POSE_BINS)).all(-1)
    xy = (joints[..., :2].clamp(0, POSE_BINS - 1).float() + 0.5) / POSE_BINS
    return xy, placed & (joints[..., 2] == POSE_BINS + 1)


class NextFrameHead(nn.Module):
    """The next key frame's tokens from the present frame's and the motion.

    Each token id becomes its FSQ code values; with a Gaussian heat map per visible joint
    now, at t+6 and their difference (`SIGMA` of the frame wide), three 3x3 convolutions
    give logits over each code digit's levels at every grid cell, plus a learned bonus on
    the present token's digit. A token's log-probability is the sum of its digits'. The
    prediction is each digit's most likely level, kept only where its log-probability beats
    the present token's by more than a margin (buffers the fit sets from validation frames:
    `margin` for a skeleton that was given, `margin_read` for one read from the frame, which
    is rougher); elsewhere the present token. Copying is hard to beat: 87% of the demo's tokens
    are the same six frames on, and a changed token is rarely predicted exactly."""

    WIDTH = 128
    SIGMA = 0.04

    def __init__(self, levels: int, vocab: int, grid: int = 16):
        super().__init__()
        codes = fsq_codes(levels, vocab)
        self.register_buffer("codes", codes, persistent=False)
        digits = codes.shape[1]
        self.register_buffer("place", levels ** torch.arange(digits), persistent=False)
        self.levels, self.digits = levels, digits
        centres = (torch.arange(grid) + 0.5) / grid
        where = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), -1)  # (G, G, 2)
        self.register_buffer("where", where.flatten(0, 1), persistent=False)
        w = self.WIDTH
        self.net = nn.Sequential(
            nn.Conv2d(digits + 3 * NUM_JOINTS, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, digits * levels, 1),
        )  # fmt: skip
        self.copy_gain = nn.Parameter(torch.tensor(2.0))
        self.register_buffer("margin", torch.tensor(float("inf")))  # set by the fit
        self.register_buffer("margin_read", torch.tensor(float("inf")))

    def reset_parameters(self) -> None:
        """PyTorch's default initialisation (the transformer's 0.02 normal stalls a conv net)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
        with torch.no_grad():
            self.copy_gain.fill_(2.0)
            self.margin.fill_(float("inf"))
            self.margin_read.fill_(float("inf"))

    def digits_of(self, ids: Tensor) -> Tensor:
        """(B, N) token ids -> (B, digits, N) each code digit's level."""
        return (ids[:, None] // self.place[:, None]) % self.levels

    def heat(self, xy: Tensor, visible: Tensor) -> Tensor:
        """(B, 13, 2) joints, (B, 13) visible -> (B, 13, G*G) heat maps (0 where not visible)."""
        d2 = (self.where[None, None] - xy[:, :, None]).pow(2).sum(-1)
        return torch.exp(-d2 / (2 * self.SIGMA**2)) * visible[..., None]

    def log_probs(
        self, ids: Tensor, xy: Tensor, visible: Tensor, later: Tensor, later_visible: Tensor
    ) -> Tensor:
        """(B, G*G) frame tokens, joints now and at t+6 with their visibility -> (B, digits,
        levels, G*G) log-probabilities of each digit's level in the next key frame."""
        B, n = ids.shape
        g = math.isqrt(n)
        now, then = self.heat(xy, visible), self.heat(later, later_visible)
        x = torch.cat([self.codes[ids].transpose(1, 2), now, then, then - now], 1)
        out = self.net(x.view(B, -1, g, g)).view(B, self.digits, self.levels, n)
        bonus = F.one_hot(self.digits_of(ids), self.levels).transpose(2, 3)
        return (out + self.copy_gain * bonus).log_softmax(2)

    def predict(
        self,
        ids: Tensor,
        xy: Tensor,
        visible: Tensor,
        later: Tensor,
        later_visible: Tensor,
        margin: Tensor | float | None = None,
    ) -> Tensor:
        """-> (B, G*G) the next key frame's token ids (see the class; `margin`: a number or
        (B, 1) per sample, in place of the fitted `margin`)."""
        lp = self.log_probs(ids, xy, visible, later, later_visible)
        return self.decide(lp, ids, self.margin if margin is None else margin)

    def decide(self, lp: Tensor, ids: Tensor, margin: Tensor | float) -> Tensor:
        """`log_probs` -> token ids: the best digits where they beat the present token by
        more than `margin` nats (a number or (B, 1) per sample), else the present token."""
        best, digits = lp.max(2)  # (B, digits, N)
        present = lp.gather(2, self.digits_of(ids)[:, :, None]).squeeze(2)
        guess = (digits * self.place[:, None]).sum(1)
        return torch.where(best.sum(1) - present.sum(1) > margin, guess, ids)


class ImageContext(nn.Module):
    """Image tokens around the person -> a vector in the pose context's hidden space.

    Each token id of the window becomes its FSQ code values (`levels` per digit); four 3x3
    convolutions (plus two channels of window position) and an attention pool over the
    window give one vector, and an MLP maps it to `dim` (GELU last, as the pose context's
    hidden layer). The window is `CROP` x `CROP` tokens, centred on a given point of the
    frame and moved inside it."""

    CROP = 8
    WIDTH = 128

    def __init__(self, levels: int, vocab: int, dim: int):
        super().__init__()
        self.register_buffer("codes", fsq_codes(levels, vocab), persistent=False)
        digits = self.codes.shape[1]
        axis = torch.linspace(-1.0, 1.0, self.CROP)
        where = torch.stack(torch.meshgrid(axis, axis, indexing="xy"))  # (2, CROP, CROP): x, y
        self.register_buffer("where", where, persistent=False)
        w = self.WIDTH
        self.convs = nn.Sequential(
            nn.Conv2d(digits + 2, 96, 3, padding=1), nn.GELU(),
            nn.Conv2d(96, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
        )  # fmt: skip
        self.attend = nn.Conv2d(w, 1, 1)
        self.drop = nn.Dropout(0.2)
        self.mlp = nn.Sequential(nn.Linear(w, 2 * w), nn.GELU(), nn.Linear(2 * w, dim), nn.GELU())

    def reset_parameters(self) -> None:
        """PyTorch's default initialisation (the transformer's 0.02 normal stalls a conv net)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.reset_parameters()

    def window(
        self, ids: Tensor, centre: Tensor, shift: Tensor | tuple[int, int] = (0, 0)
    ) -> Tensor:
        """(B, G*G) token ids, (B, 2) centres (x, y in [0, 1] of the frame) -> (B, CROP, CROP)
        ids of the window around each centre, moved by `shift` tokens ((2,) or (B, 2): x, y)
        and kept inside the grid."""
        B, n = ids.shape
        g = math.isqrt(n)
        step = torch.arange(self.CROP, device=ids.device)
        start = (
            (centre * g).floor().long() - self.CROP // 2 + torch.as_tensor(shift, device=ids.device)
        )
        start = start.clamp(0, g - self.CROP)  # (B, 2): x0, y0
        rows = (start[:, 1:] + step)[:, :, None]  # (B, CROP, 1)
        cols = (start[:, :1] + step)[:, None, :]  # (B, 1, CROP)
        return ids.view(B, g, g)[torch.arange(B, device=ids.device)[:, None, None], rows, cols]

    def forward(
        self, ids: Tensor, centre: Tensor, shift: Tensor | tuple[int, int] = (0, 0)
    ) -> Tensor:
        """(B, G*G) token ids, (B, 2) centres -> (B, dim)."""
        x = self.codes[self.window(ids, centre, shift)].permute(0, 3, 1, 2)
        x = torch.cat([x, self.where.expand(len(x), -1, -1, -1)], 1)
        h = self.convs(x)
        weight = self.attend(h).flatten(1).softmax(-1)  # (B, CROP * CROP)
        return self.mlp(self.drop((h.flatten(2) * weight[:, None]).sum(-1)))


def _offsets(sizes: list[int]) -> Tensor:
    return torch.tensor([0, *sizes[:-1]]).cumsum(0)


def _bin_features(bins: int, dim: int) -> Tensor:
    """(bins, dim) sin-cos features of the bin value in [0, 1): periods from the whole axis
    down to a few bins, so nearby bins have nearby features."""
    v = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    half = dim // 2
    omega = torch.pi * (bins / 8) ** (torch.arange(half, dtype=torch.float64) / max(half - 1, 1))
    ang = v[:, None] * omega[None]
    return torch.cat([ang.sin(), ang.cos()], dim=1).float()


def _soft_pose_ce(logits: Tensor, y: Tensor, sigma: float) -> Tensor:
    """Summed cross-entropy of pose slots with Gaussian soft labels (std `sigma` bins) on
    coordinate targets; visibility targets and IGNORE slots as in plain cross-entropy."""
    logp = logits.log_softmax(-1)
    keep = y != IGNORE
    coord = keep & (y < POSE_BINS)
    flag = keep & ~coord
    loss = -logp[flag].gather(1, y[flag, None]).sum()
    if coord.any():
        yc = y[coord].to(logits.dtype)
        bins = torch.arange(POSE_BINS, device=logits.device, dtype=logits.dtype)
        w = torch.exp(-0.5 * ((bins[None] - yc[:, None]) / sigma) ** 2)
        w = w / w.sum(1, keepdim=True)
        loss = loss - (w * logp[coord, :POSE_BINS]).sum()
    return loss
