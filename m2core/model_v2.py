"""M2, format 2: per-modality adapters around a 4M-style encoder-decoder trunk.

Reading order: the config, then the model. `forward` embeds each modality's input slots
through its adapter -> encodes -> adds the input positions back to the context -> embeds
each target slot's query through its adapter -> decodes (self-attention within a
modality, causal inside the caption) -> each adapter scores its own slots. The batch
format is `m2core/masking.py`'s; the adapters are in `m2core/adapters/` (DESIGN section 14).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from m2core.adapters import Inputs, Slots, build_adapter
from m2core.blocks import DecoderBlock, EncoderBlock, swiglu_hidden
from m2core.modalities import DEFAULT_CAPTION_LEN, Registry, build_registry

FORMAT = 2
PRESENT_OF = {"coords_next": "coords", "tok_rgb_next": "tok_rgb"}  # a future's starting point
# the config fields the adapters read (each kind takes the ones it knows)
ADAPTER_OPTIONS = ("image_levels", "query_shape", "future_l2", "stem_layers", "caption_action",
                   "action_classes", "shape_fourier", "motion_head", "motion_dense",
                   "motion_extent", "motion_action", "read_ce", "read_heat")  # fmt: skip
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"dim": 192, "enc_layers": 4, "dec_layers": 4, "heads": 6},  # the CPU demo
    "small": {"dim": 512, "enc_layers": 8, "dec_layers": 8, "heads": 8},
    "base": {"dim": 768, "enc_layers": 12, "dec_layers": 12, "heads": 12},  # like 4M-B
    "large": {"dim": 1024, "enc_layers": 24, "dec_layers": 24, "heads": 16},  # like 4M-L
}


@dataclass(frozen=True)
class M2ConfigV2:
    """Everything needed to rebuild the model (config.json of a checkpoint)."""

    format: int = FORMAT
    preset: str = "tiny"
    dim: int = 192
    enc_layers: int = 4
    dec_layers: int = 4
    heads: int = 6
    mlp_ratio: float = 4.0  # SwiGLU width = 2/3 * mlp_ratio * dim
    image_levels: tuple[int, ...] = (8, 8, 8, 8)  # the image tokenizer's FSQ levels
    text_vocab: int = 50257 + 3
    caption_len: int = DEFAULT_CAPTION_LEN
    action_classes: int = 10  # m2 synth: 10, Penn Action: 15
    input_tokens: int = 128  # encoder slots per training sample
    target_tokens: int = 128  # decoder slots per training sample
    norm_eps: float = 1e-6
    query_shape: bool = False  # future skeleton queries carry the present skeleton's shape
    future_l2: bool = False  # future positions train by squared error (their mean), not L1
    stem_layers: int = 2  # 3x3 conv layers over the image token grid before the trunk
    caption_action: bool = False  # caption queries carry the sample's action (given or read)
    shape_fourier: int = 0  # random Fourier features of the skeleton's shape (0: positions only)
    motion_head: bool = False  # future displacements also straight from the query's shape features
    motion_dense: bool = False  # that path also trains on every sample's whole future
    motion_extent: bool = False  # that path's output is in units of the skeleton's own extent
    motion_action: bool = False  # that path also reads the action, where one is given as an input
    read_ce: float = 0.0  # weight of the frame read-out's cross-entropy over cell columns / rows
    read_heat: bool = False  # that read-out's attention adds a heat map of the frame's embedding
    copy_margin: float = 0.0  # nats a next-frame token must beat the present by (set at export)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_levels", tuple(int(v) for v in self.image_levels))
        if self.format != FORMAT:
            raise ValueError(f"model format {self.format}: this code reads format {FORMAT}")
        if not self.image_levels or min(self.image_levels) < 2:
            raise ValueError(f"model.image_levels={self.image_levels}: each FSQ level must be >= 2")
        for name in (
            "dim",
            "enc_layers",
            "dec_layers",
            "heads",
            "action_classes",
            "input_tokens",
            "target_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not self.copy_margin >= 0:
            raise ValueError(f"model.copy_margin must be >= 0 nats, got {self.copy_margin}")
        if not self.read_ce >= 0:
            raise ValueError(f"model.read_ce must be >= 0, got {self.read_ce}")
        if self.shape_fourier < 0:
            raise ValueError(f"model.shape_fourier must be >= 0, got {self.shape_fourier}")
        if self.motion_head and not self.query_shape:
            raise ValueError("model.motion_head reads the forecast queries' shape: set query_shape")
        if (self.motion_dense or self.motion_extent or self.motion_action) and not self.motion_head:
            raise ValueError(
                "model.motion_dense / motion_extent / motion_action need the motion path: set motion_head"
            )
        if self.stem_layers < 2:
            raise ValueError(f"model.stem_layers must be >= 2, got {self.stem_layers}")
        if self.dim % self.heads or (self.dim // self.heads) % 2 or self.dim % 4:
            raise ValueError(
                f"model.dim={self.dim} must split into {self.heads} even heads and by 4"
            )
        self.registry()

    @property
    def image_vocab(self) -> int:
        return int(torch.tensor(self.image_levels).prod())

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> M2ConfigV2:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
        return cls.from_dict({"preset": name, **PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> M2ConfigV2:
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(data) - known)
        if bad:
            raise ValueError(f"unknown model config keys {bad}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_levels"] = list(self.image_levels)
        return d

    def registry(self) -> Registry:
        return build_registry(
            self.image_vocab, self.text_vocab, self.caption_len, self.action_classes
        )


class M2ModelV2(nn.Module):
    def __init__(self, config: M2ConfigV2):
        super().__init__()
        self.config = config
        reg = config.registry()
        self.names: tuple[str, ...] = tuple(reg)
        self.target_names: tuple[str, ...] = reg.targets
        D = config.dim
        options = {k: getattr(config, k) for k in ADAPTER_OPTIONS}
        self.adapters = nn.ModuleDict(
            {
                n: build_adapter(m, D, reg[PRESENT_OF[n]] if n in PRESENT_OF else None, **options)
                for n, m in reg.items()
            }
        )
        for a in self.adapters.values():
            a.image_index = self.names.index("tok_rgb")
        self.mod_emb = nn.Embedding(len(reg), D)
        nn.init.normal_(self.mod_emb.weight, std=0.02)
        hidden, eps = swiglu_hidden(D, config.mlp_ratio), config.norm_eps
        self.encoder = nn.ModuleList(
            EncoderBlock(D, config.heads, hidden, eps) for _ in range(config.enc_layers)
        )
        self.enc_norm = nn.LayerNorm(D, eps=eps, bias=False)
        self.ctx_proj = nn.Linear(D, D, bias=False)
        self.decoder = nn.ModuleList(
            DecoderBlock(D, config.heads, hidden, eps) for _ in range(config.dec_layers)
        )
        self.dec_norm = nn.LayerNorm(D, eps=eps, bias=False)
        self.register_buffer(
            "causal", torch.tensor([m.causal for m in reg.values()] + [False]), persistent=False
        )
        self._init_trunk()
        self.set_copy_margin(config.copy_margin)

    def set_copy_margin(self, margin: float) -> None:
        """The next key frame's calibrated copy margin (config.json and its adapter)."""
        self.config = dataclasses.replace(self.config, copy_margin=float(margin))
        self.adapters["tok_rgb_next"].copy_margin = float(margin)

    def _init_trunk(self) -> None:
        for part in (self.encoder, self.decoder):
            for name, p in part.named_parameters():
                if p.ndim >= 2:  # GPT-2: shrink the projections that write into the residual
                    scale = (
                        (2 * len(part)) ** -0.5
                        if name.endswith(("proj.weight", "down.weight"))
                        else 1.0
                    )
                    nn.init.normal_(p, std=0.02 * scale)

    def slots(
        self,
        name: str,
        ids: Tensor,
        mod: Tensor,
        pos: Tensor,
        valid: Tensor,
        prior: Tensor | None = None,
        present_pose: Tensor | None = None,
        action: Tensor | None = None,
    ) -> tuple[Tensor, Slots]:
        """The flat indices of one modality's filled slots in (B, N) tensors, and their view."""
        sel = (valid & (mod == self.names.index(name))).flatten().nonzero().squeeze(1)
        n = mod.shape[1]
        present = prior.flatten()[sel] if prior is not None else None
        return sel, Slots(ids.flatten()[sel], pos.flatten()[sel], sel // n, mod.shape[0], present,
                          present_pose, action)  # fmt: skip

    def embed(
        self,
        ids: Tensor,
        mod: Tensor,
        pos: Tensor,
        valid: Tensor,
        query: bool,
        prior: Tensor | None = None,
        present_pose: Tensor | None = None,
        action: Tensor | None = None,
    ) -> Tensor:
        """(B, N) slots -> (B, N, D): each modality's slots through its adapter."""
        B, N = mod.shape
        x = torch.zeros(B * N, self.config.dim, device=mod.device, dtype=self.mod_emb.weight.dtype)
        for name in self.names:
            sel, s = self.slots(name, ids, mod, pos, valid, prior, present_pose, action)
            if len(sel):
                a = self.adapters[name]
                x[sel] = (a.embed_query(s) if query else a.embed_input(s)).to(x.dtype)
        return x.view(B, N, -1) + self.mod_emb(mod)

    def embed_queries(self, name: str, s: Slots) -> Tensor:
        """One modality's query slots (from `Slots.block`) -> (B, n, D), as `embed` gives them."""
        x = self.adapters[name].embed_query(s).to(self.mod_emb.weight.dtype)
        return x.view(s.batch, -1, self.config.dim) + self.mod_emb.weight[self.names.index(name)]

    def encode(
        self, ids: Tensor, mod: Tensor, pos: Tensor, valid: Tensor, x: Tensor | None = None
    ) -> tuple[Inputs, Tensor | None]:
        """Visible inputs -> (the context every decoder layer attends to, key mask or None);
        `x`, their embedding when the caller has it (generation reuses an unchanged frame's)."""
        x = self.embed(ids, mod, pos, valid, query=False) if x is None else x
        embedded = x
        mask = None if bool(valid.all()) else valid[:, None, None, :]
        for block in self.encoder:
            x = block(x, mask)
        # 4M: the input positions and modalities are added back to the projected output
        context = self.ctx_proj(self.enc_norm(x)) + self._positions(mod, pos, valid)
        return Inputs(context, mod, pos, valid, embedded), mask

    def _positions(self, mod: Tensor, pos: Tensor, valid: Tensor) -> Tensor:
        B, N = mod.shape
        x = torch.zeros(B * N, self.config.dim, device=mod.device, dtype=self.mod_emb.weight.dtype)
        for name in self.names:
            sel = (valid & (mod == self.names.index(name))).flatten().nonzero().squeeze(1)
            if len(sel):
                x[sel] = self.adapters[name].positions(pos.flatten()[sel]).to(x.dtype)
        return x.view(B, N, -1) + self.mod_emb(mod)

    def target_mask(self, mod: Tensor, valid: Tensor) -> Tensor:
        """(B, 1, Nt, Nt) bool: same modality, and causal inside a caption."""
        group = torch.where(valid, mod, len(self.names))
        same = group[:, :, None] == group[:, None, :]
        n = mod.shape[1]
        lower = torch.ones(n, n, dtype=torch.bool, device=mod.device).tril()
        return (same & (lower | ~self.causal[group][:, :, None]))[:, None]

    def context_kv(self, ctx: Inputs) -> list[tuple[Tensor, Tensor]]:
        return [block.context_kv(ctx.context) for block in self.decoder]

    def decode(
        self,
        x: Tensor,
        kv: list,
        cross_mask: Tensor | None,
        self_mask: Tensor | None = None,
        caches: list | None = None,
    ) -> Tensor:
        for i, block in enumerate(self.decoder):
            x = block(x, kv[i], cross_mask, self_mask, False, None if caches is None else caches[i])
        return self.dec_norm(x)

    def hidden(self, batch: dict[str, Tensor]) -> tuple[Tensor, Inputs]:
        """Batch -> (decoder states of every target slot (B * T, D), the encoder context)."""
        ctx, cross_mask = self.encode(
            batch["enc_ids"], batch["enc_mod"], batch["enc_pos"], batch["enc_valid"]
        )
        q, mod, pos, valid = (
            batch["dec_query"],
            batch["dec_mod"],
            batch["dec_pos"],
            batch["dec_valid"],
        )
        x = self.embed(q, mod, pos, valid, query=True, prior=batch.get("dec_prior"),
                       present_pose=batch.get("present_pose"), action=batch.get("action"))  # fmt: skip
        h = self.decode(x, self.context_kv(ctx), cross_mask, self.target_mask(mod, valid))
        return h.flatten(0, 1), ctx

    def target_slots(self, batch: dict[str, Tensor], name: str) -> tuple[Tensor, Slots]:
        return self.slots(name, batch["dec_query"], batch["dec_mod"], batch["dec_pos"], batch["dec_valid"],
                          batch.get("dec_prior"), batch.get("present_pose"), self.given_action(batch))  # fmt: skip

    def given_action(self, batch: dict[str, Tensor]) -> Tensor | None:
        """(B,) each sample's action where it is an encoder input, else -1: the motion path
        reads an action only where the trunk is given one."""
        if batch.get("action") is None or "action" not in self.names:
            return None
        given = ((batch["enc_mod"] == self.names.index("action")) & batch["enc_valid"]).any(1)
        return torch.where(given, batch["action"].view(-1), -1)

    def forward(
        self, batch: dict[str, Tensor]
    ) -> tuple[dict[str, tuple[Tensor, Tensor]], Tensor | None]:
        """-> ({modality: (summed loss, labelled slots)} detached, mean of the modalities'
        mean losses, or None without labels)."""
        h, ctx = self.hidden(batch)
        labels = batch.get("dec_labels")
        if labels is None:
            return {}, None
        parts, means = {}, []
        for name in self.target_names:
            sel, s = self.target_slots(batch, name)
            if len(sel) == 0:
                continue
            total, n = self.adapters[name].loss(h[sel], s, labels.flatten()[sel], ctx)
            parts[name] = (total.detach(), n.detach())
            means.append((total / n.clamp(min=1), n > 0))
        given = self.given_action(batch)
        for name, a in self.adapters.items():
            whole = a.whole_loss(batch, given)
            if whole is not None:
                total, n = whole
                parts[f"{name}_whole"] = (total.detach(), n.detach())
                means.append((total / n.clamp(min=1), n > 0))
        if batch.get("read_rgb") is not None:  # frames for the heat map alone (read_heat)
            total, n = self.adapters["coords"].heat_loss(
                self.frame_embedding(batch["read_rgb"]), batch["read_pose"]
            )
            parts["coords_heat"] = (total.detach(), n.detach())
            means.append((total / n.clamp(min=1), n > 0))
        loss = (
            sum(m * has for m, has in means) / sum(has for _, has in means).clamp(min=1)
            if means
            else None
        )
        return parts, loss

    def frame_embedding(self, rgb: Tensor) -> Tensor:
        """(B, 256) whole frames -> (B, 256, D), as the encoder's input embeds them."""
        B, n = rgb.shape
        mod = torch.full_like(rgb, self.names.index("tok_rgb"))
        pos = torch.arange(n, device=rgb.device).expand(B, n)
        return self.embed(rgb, mod, pos, torch.ones_like(rgb, dtype=torch.bool), query=False)

    # --- accounting --------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        count = {"encoder": 0, "decoder": 0, "adapters": 0}
        for name, p in self.named_parameters():
            key = (
                "encoder"
                if name.startswith(("encoder.", "enc_norm", "ctx_proj"))
                else ("decoder" if name.startswith(("decoder.", "dec_norm")) else "adapters")
            )
            count[key] += p.numel()
        count["total"] = sum(count.values())
        return count

    def num_params(self, body_only: bool = False) -> int:
        c = self.param_counts()
        return c["encoder"] + c["decoder"] if body_only else c["total"]
