"""Skeletons: in as smooth features of each coordinate plus the whole skeleton's shape, out
as positions and visibility flags read out directly.

- A coordinate token enters as a linear map of sin-cos features of its value (nearby bins
  look alike), a flag as one of two rows; every input token of a skeleton also gets a
  vector of the whole skeleton normalised to its own box (joints around their centre over
  their extent): action and phase are a function of shape, not of where the person stands.
- The skeleton now is read out where the frame is among the inputs: each x / y query
  attends over the image tokens of the context and takes the expected cell centre, plus a
  small regressed offset. Without a frame it is regressed from the query's state. With
  `read_ce` the attention, summed per cell column (x) or row (y), also trains by
  cross-entropy against the true value split between its two nearest cell centres: the
  expected centre's L1 gradient is weak while the attention is spread (integral
  regression's known slow start; a 1D heatmap target as SimCC's). With `read_heat` the
  attention's scores add a heat map per joint, a linear map of each image cell's input
  embedding (the image adapter's conv stem): it also trains alone on extra frames a step
  (`heat_loss`, training's `read_batch`), which cost the stem but not the trunk, so the
  frame's cells learn where the joints are from many more frames than the trunk sees.
- A future coordinate is the present one plus a displacement: with `motion_head`, a linear
  map of the forecast queries' shape features (a path of its own, docs/model.md run 15;
  with `motion_extent` in units of the skeleton's own extent, run 16; with `motion_action`
  also of the given action, run 18) plus the trunk's regressed correction.
- Every coordinate carries a Laplace scale b, read from the state by a head of its own
  and trained by the Laplace negative log-likelihood |y - mu| / b + log b (frame units)
  with the position held fixed; the position itself by its L1 error. So the model says
  how sure it is, and the scale's ~1/b gradient stays out of the trunk.
- Flags are one logit each (binary cross-entropy); a future flag starts from the present.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2core.adapters.base import Adapter, Inputs, Slots
from m2core.adapters.frame_readout import FrameReadout
from m2core.modalities import (
    FUTURE_FRAMES,
    IMAGE_GRID,
    NUM_JOINTS,
    POSE_BINS,
    TOKENS_PER_POSE,
    Modality,
)

FEATURES = 64  # sin-cos features of a coordinate value
SHAPE = NUM_JOINTS * 6 + 3  # skeleton_shape's width
MOVE_SCALE = 0.05  # a displacement output of 1 = 5% of the frame
B_MIN = 1e-3  # smallest Laplace scale, frame units (a quarter pixel)
L1_WEIGHT = 10.0  # of the position's L1 error (frame units) beside the scale's NLL
L2_WEIGHT = 100.0  # of a future position's squared error, with future_l2 (same gradient at 5%)
SHAPE_SIGMA = 1.0  # frequency scale of the shape's Fourier features (docs/model.md, run 14's probe)


def bin_value(ids: Tensor) -> Tensor:
    return (ids.float() + 0.5) / POSE_BINS


def value_bin(v: Tensor) -> Tensor:
    return (v * POSE_BINS - 0.5).round().long().clamp(0, POSE_BINS - 1)


def skeleton_shape(ids: Tensor, pos: Tensor, row: Tensor, batch: int) -> Tensor:
    """Slots of skeleton tokens -> (B, SHAPE): per joint x, y around the centre of the placed
    joints over their extent (0 where absent), has-x, has-y, visible, has-flag; then the
    centre and log extent. Joints without coordinates or flagged not visible do not place."""
    dense = torch.full((batch, TOKENS_PER_POSE), -1, dtype=torch.long, device=ids.device)
    dense[row, pos % TOKENS_PER_POSE] = ids
    dense = dense.view(batch, NUM_JOINTS, 3)
    xy, flag = dense[..., :2], dense[..., 2]
    has_xy = (xy >= 0) & (xy < POSE_BINS)
    has_flag = flag >= POSE_BINS
    visible = flag == POSE_BINS + 1
    value = bin_value(xy)
    place = (has_xy.all(-1) & (visible | ~has_flag))[..., None]
    centre = (value * place).sum(1) / place.sum(1).clamp(min=1)
    hi = torch.where(place, value, -1.0).amax(1)
    lo = torch.where(place, value, 2.0).amin(1)
    extent = (hi - lo).amax(-1, keepdim=True).clamp(min=0.02)
    rel = (value - centre[:, None]) / extent[:, None] * has_xy
    flags = torch.stack([visible, has_flag], -1).float()
    return torch.cat(
        [torch.cat([rel, has_xy.float(), flags], -1).flatten(1), centre, extent.log()], 1
    )


class ShapeFourier(nn.Module):
    """skeleton_shape (B, SHAPE) -> itself plus sin and cos of 2 pi P B, where P are the 26
    normalised joint positions (`cols`, by default where skeleton_shape puts them) and B a
    fixed Gaussian (26, n): action and motion are sharp functions of the shape, which an MLP
    learns from these with far fewer samples than from P alone (docs/model.md, run 14)."""

    def __init__(
        self, n: int, sigma: float = SHAPE_SIGMA, seed: int = 0, cols: Tensor | None = None
    ):
        super().__init__()
        # drawn from a fixed seed rather than stored: a half-precision checkpoint would round it
        gen = torch.Generator().manual_seed(seed)
        freqs = torch.randn(2 * NUM_JOINTS, n, generator=gen) * sigma
        self.register_buffer("freqs", freqs, persistent=False)
        if cols is None:
            cols = torch.arange(NUM_JOINTS * 6).view(NUM_JOINTS, 6)[:, :2].flatten()
        self.register_buffer("cols", cols, persistent=False)

    def forward(self, shape: Tensor) -> Tensor:
        z = 2 * math.pi * shape[:, self.cols].float() @ self.freqs.float()
        return torch.cat([shape, z.sin().to(shape.dtype), z.cos().to(shape.dtype)], 1)


def shape_mlp(dim: int, fourier: int) -> nn.Sequential:
    """The skeleton's shape vector -> (B, dim); `fourier` random features in front (0: none)."""
    front = [ShapeFourier(fourier)] if fourier else []
    return nn.Sequential(
        *front, nn.Linear(SHAPE + 2 * fourier, dim), nn.GELU(), nn.Linear(dim, dim)
    )


class PoseAdapter(FrameReadout, Adapter):
    def __init__(
        self,
        mod: Modality,
        dim: int,
        present: Modality | None = None,
        query_shape: bool = False,
        future_l2: bool = False,
        shape_fourier: int = 0,
        motion_head: bool = False,
        motion_dense: bool = False,
        motion_extent: bool = False,
        motion_action: bool = False,
        action_classes: int = 0,
        read_ce: float = 0.0,
        read_heat: bool = False,
        **_: object,
    ):
        super().__init__(mod, dim)
        self.future = present is not None
        self.l2 = self.future and future_l2
        omega = math.pi * (POSE_BINS / 8) ** (torch.arange(FEATURES // 2) / (FEATURES // 2 - 1))
        self.register_buffer("omega", omega, persistent=False)
        self.coord_in = nn.Linear(FEATURES, dim)
        self.flag_in = nn.Embedding(2, dim)
        self.frame_emb = nn.Embedding(FUTURE_FRAMES + 1, dim)
        self.joint_emb = nn.Embedding(NUM_JOINTS, dim)
        self.comp_emb = nn.Embedding(3, dim)
        self.shape = shape_mlp(dim, shape_fourier) if mod.can_input else None
        # future queries carry the present skeleton's shape: the motion is a function of it
        self.query_shape = shape_mlp(dim, shape_fourier) if self.future and query_shape else None
        # every future displacement straight from those features: the trunk alone learnt the
        # motion far slower than a small MLP on the same shape (docs/model.md, run 15)
        self.motion = None
        if self.query_shape is not None and motion_head:
            self.motion = nn.Linear(dim, FUTURE_FRAMES * TOKENS_PER_POSE)
            nn.init.zeros_(self.motion.weight)  # starts at standing still, as the trunk's
            nn.init.zeros_(self.motion.bias)
        self.dense = self.motion is not None and motion_dense
        # the given action beside the shape (row 0: none): in the frames before a switch only
        # the label says where the body goes, and the trunk's small correction ignored it
        self.motion_label = None
        if self.motion is not None and motion_action:
            self.motion_label = nn.Embedding(action_classes + 1, dim)
            nn.init.normal_(self.motion_label.weight, std=0.02)
        self.extent = motion_extent
        self.read_ce = 0.0 if self.future else read_ce
        self.coord_out = nn.Linear(dim, 3)  # value (future: displacement), log scale, cell offset
        self.flag_out = nn.Linear(dim, 1)
        for table in (self.flag_in, self.frame_emb, self.joint_emb, self.comp_emb):
            nn.init.normal_(table.weight, std=0.02)  # as every other table (default: std 1)
        if not self.future:  # the spatial read-out over the frame's tokens
            self.query_key = nn.Linear(dim, 64, bias=False)
            self.cell_key = nn.Linear(dim, 64, bias=False)
            self.heat = nn.Linear(dim, NUM_JOINTS) if read_heat else None
            if self.heat is not None:  # starts flat: the trunk's attention alone
                nn.init.zeros_(self.heat.weight)
                nn.init.zeros_(self.heat.bias)
        else:
            self.flag_gain = nn.Parameter(torch.tensor(3.0))

    # --- values ----------------------------------------------------------------------
    def value(self, ids: Tensor) -> Tensor:
        is_flag = ids >= POSE_BINS
        ang = bin_value(ids.clamp(max=POSE_BINS - 1))[:, None] * self.omega
        coord = self.coord_in(torch.cat([ang.sin(), ang.cos()], 1))
        flag = self.flag_in((ids - POSE_BINS).clamp(0, 1))
        return torch.where(is_flag[:, None], flag, coord)

    def positions(self, pos: Tensor) -> Tensor:
        local = pos % TOKENS_PER_POSE
        frame = pos // TOKENS_PER_POSE + (1 if self.future else 0)
        return self.frame_emb(frame) + self.joint_emb(local // 3) + self.comp_emb(local % 3)

    def embed_input(self, s: Slots, ctx: Inputs | None = None) -> Tensor:
        shape = self.shape(skeleton_shape(s.ids, s.pos, s.row, s.batch))
        return self.value(s.ids) + self.positions(s.pos) + shape[s.row]

    def embed_query(self, s: Slots) -> Tensor:
        x = super().embed_query(s)
        if self.future and s.present is not None:
            x = x + torch.where((s.present >= 0)[:, None], self.value(s.present.clamp(min=0)), 0.0)
        shape = self.present_shape(s, x.dtype)
        return x if shape is None else x + shape[s.row]

    def whole_loss(
        self, batch: dict[str, Tensor], action: Tensor | None = None
    ) -> tuple[Tensor, Tensor] | None:
        """With motion_dense: the motion path alone against every future coordinate of every
        sample with a present skeleton. It costs one small MLP a sample, so every sample of
        a batch trains it, not only the future slots a target budget drew (run 15), and so
        do the step's extra skeleton pairs (`motion_present` / `motion_future`, run 16)."""
        future = batch.get("future_pose") if self.dense else None
        if future is None or batch.get("present_pose") is None:
            return None
        pose = batch["present_pose"]
        if action is None:
            action = torch.full((len(pose),), -1, dtype=torch.long, device=pose.device)
        if batch.get("motion_present") is not None:
            pose = torch.cat([pose, batch["motion_present"]])
            future = torch.cat([future, batch["motion_future"]])
            pairs = batch.get("motion_action")  # the pairs' labels, where given
            if pairs is None:
                pairs = action.new_full((len(batch["motion_present"]),), -1)
            action = torch.cat([action, pairs])
        present = pose.repeat(1, FUTURE_FRAMES)  # the present token at each future position
        s = Slots.block(torch.full_like(future, -1), present, pose, action)
        present, labels = s.present, future.flatten()
        path = self.motion_path(s, self.motion.weight.dtype)
        mu = bin_value(present.clamp(0, POSE_BINS - 1)) + path.flatten()
        keep = (labels >= 0) & (labels < POSE_BINS) & (present >= 0) & (present < POSE_BINS)
        err = (bin_value(labels.clamp(0, POSE_BINS - 1)) - mu).abs()
        return (L1_WEIGHT * err * keep).sum(), keep.sum()

    def present_shape(self, s: Slots, dtype: torch.dtype) -> Tensor | None:
        """(B, dim) features of each sample's present skeleton for the future queries."""
        if self.query_shape is None or s.present_pose is None:
            return None
        return self.query_shape(self._shape(s).to(dtype))

    def motion_path(self, s: Slots, dtype: torch.dtype) -> Tensor | None:
        """(B, 234) the path's displacement of every future coordinate, frame units: a map of
        the shape features, in units of MOVE_SCALE or, with motion_extent, of the skeleton's
        own extent (a motion scales with the person's size, which the features carry only
        as a log; the probe's MLP predicts it in extents)."""
        if self.motion is None or s.present_pose is None:
            return None
        shape = self._shape(s)
        f = self.query_shape(shape.to(dtype))
        if self.motion_label is not None:
            known = s.action + 1 if s.action is not None else torch.zeros_like(f[:, 0]).long()
            f = f + self.motion_label(known.clamp(min=0)).to(f.dtype)
        out = self.motion(F.gelu(f)).float()
        return out * (shape[:, -1:].exp() if self.extent else MOVE_SCALE)

    @staticmethod
    def _shape(s: Slots) -> Tensor:
        g = Slots.block(s.present_pose)
        return skeleton_shape(g.ids, g.pos, g.row, g.batch)

    # --- outputs ---------------------------------------------------------------------
    def predict(
        self, h: Tensor, s: Slots, ctx: Inputs | None, att: tuple | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-> (mu (n,) frame units, Laplace scale b (n,), flag logit (n,)) of every slot;
        `att`, `attend`'s result when the caller has it."""
        raw = self.coord_out(h).float()
        # the scale reads the state without moving it: its NLL gradient (~1/b) would swamp the
        # trunk's other signals; the position's own L1 gradient is bounded (docs/model.md)
        w, bias = self.coord_out.weight[1], self.coord_out.bias[1]
        b = B_MIN + F.softplus((h.detach() @ w + bias).float() - 3.0)
        flag = self.flag_out(h).float().squeeze(1)
        if self.future:
            p = s.present if s.present is not None else torch.full_like(s.pos, -1)
            start = torch.where(p < POSE_BINS, bin_value(p.clamp(min=0)), 0.5)
            move = MOVE_SCALE * raw[:, 0]
            path = self.motion_path(s, h.dtype)
            if path is not None:
                move = move + torch.where(p >= 0, path[s.row, s.pos], 0.0)
            mu = torch.where(p >= 0, start, 0.5) + move
            vis = torch.where(p >= POSE_BINS, (p == POSE_BINS + 1).float() * 2 - 1, 0.0)
            return mu, b, flag + self.flag_gain * vis
        mu = torch.sigmoid(raw[:, 0])
        if ctx is not None:
            spatial, has = self.spatial(h, s, ctx, att)
            mu = torch.where(has, spatial + raw[:, 2] / IMAGE_GRID, mu)
        return mu, b, flag

    def heat_loss(self, embedded: Tensor, pose: Tensor) -> tuple[Tensor, Tensor]:
        """Whole frames' input embeddings (R, G*G, D) and their skeletons (R, 39) -> the heat
        map alone as a read-out: each joint at its expected cell centre, trained as the
        trunk's read-out is (L1 plus `read_ce` times the line cross-entropy) -> (summed
        loss, placed coordinates)."""
        R, G = len(pose), IMAGE_GRID
        read, lines = self.heat_read(embedded)
        xy = pose.view(R, NUM_JOINTS, 3)[..., :2]
        keep = (xy >= 0) & (xy < POSE_BINS)
        y = bin_value(xy.clamp(0, POSE_BINS - 1))
        err = L1_WEIGHT * (read - y).abs()
        if self.read_ce:
            ce = self.split_ce(lines.reshape(-1, G), y.flatten()).view_as(err)
            err = err + self.read_ce * ce
        return (err * keep).sum(), keep.sum()

    def loss(
        self, h: Tensor, s: Slots, labels: Tensor, ctx: Inputs | None = None
    ) -> tuple[Tensor, Tensor]:
        keep = labels >= 0
        att = self.attend(h, s, ctx) if self.read_ce and ctx is not None else None
        mu, b, flag = self.predict(h, s, ctx, att)
        is_flag = labels >= POSE_BINS
        y = bin_value(labels.clamp(0, POSE_BINS - 1))
        err = (y - mu).abs()
        # the squared error's optimum is the mean displacement: it moves off zero velocity as
        # soon as the direction is known a little; L1's median stays at zero until then
        fit = L2_WEIGHT * err.square() if self.l2 else L1_WEIGHT * err
        nll = fit + err.detach() / b + b.log()
        if att is not None:
            nll = nll + self.read_ce * self.line_ce(att, y)
        bce = F.binary_cross_entropy_with_logits(
            flag, (labels == POSE_BINS + 1).float(), reduction="none"
        )
        per = torch.where(is_flag, bce, nll)
        return (per * keep).sum(), keep.sum()

    def readout(
        self,
        h: Tensor,
        s: Slots,
        ctx: Inputs | None = None,
        temperature: float = 0.0,
        gens: list[torch.Generator] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """-> ids (coordinate bins, or the flag ids) and a confidence per slot: for a
        coordinate the probability, under its Laplace, of being within 2% of the frame
        (about PCK@0.05 for a person filling half of it); for a flag max(p, 1 - p)."""
        mu, b, flag = self.predict(h, s, ctx)
        is_flag = (s.pos % 3) == 2
        p = torch.sigmoid(flag)
        ids = torch.where(is_flag, POSE_BINS + (p > 0.5).long(), value_bin(mu.clamp(0, 1)))
        conf = torch.where(is_flag, torch.maximum(p, 1 - p), 1 - torch.exp(-0.02 / b))
        return ids, conf
