"""Chained generation (DESIGN section 7): tok_rgb [+ coords, captions] -> coords ->
captions -> coords_next -> tok_rgb_next, then optional roll-out steps.

Each finished "now" modality becomes an encoder input of the next stage. The future
modalities are never encoder inputs (the model is not trained with them as inputs): both
are predicted from the same context (tok_rgb, coords, captions), which is encoded once for
the two. A roll-out step feeds `tok_rgb_next` and the last skeleton of `coords_next` back
as the next step's `tok_rgb` and `coords`; the caption is kept.

- Captions: autoregressive, teacher-forcing layout of training (query i = token i-1 +
  position i, bos first), greedy or temperature / top-k / top-p, stopping per sample at
  eos. With `kv_cache=True` the decoder's self-attention keys/values are cached and the
  cross-attention keys/values of the context are computed once; `kv_cache=False` re-runs
  the whole decoder (cross K/V included) over the prefix at every token.
- Image / pose targets: MaskGIT with decoder-side conditioning (masking.py): all
  positions are queried, the chosen tokens ride in their queries, each step keeps the
  most confident samples so that the masked fraction follows `cosine_schedule`. Pose
  x / y positions may only take coordinate bins and the visible positions only the two
  flag ids, so a decoded skeleton is always well formed.
- With a next-frame head (M2Config.next_frame_levels), `tok_rgb_next` is instead that
  head's guess from the frame and the skeleton now and at t+6 (just generated): the
  present token unless a changed one is likely enough, by a margin of its own where the
  skeleton was read from the frame. It is deterministic (the temperature does not apply).
- Seeds are per sample (`seed` an int for all or one per sample), drawn from
  `torch.Generator`s on CPU, so a request's result does not depend on its batch mates'
  randomness; on CPU the same inputs + seed give the same outputs bit for bit.

Batches may mix requests: a `coords` row of -1 or a `captions` row of pad ids means
"not given" for that sample.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from m2core.blocks import KVCache
from m2core.masking import BOS_ID, EOS_ID, PAD_ID, cosine_schedule
from m2core.modalities import FUTURE_FRAMES, POSE_BINS, TOKENS_PER_POSE
from m2core.model import M2Model


@dataclass(frozen=True)
class GenerationConfig:
    steps: int = 1  # roll-out steps; 0 = the present only (skeleton and caption)
    maskgit_steps: int = 8  # per image / pose modality
    temperature: float = 1.0  # MaskGIT sampling; 0 = argmax
    top_k: int = 0  # 0 = off (MaskGIT and sampled captions)
    top_p: float = 1.0  # 1 = off
    choice_temperature: float = 0.0  # annealed Gumbel noise on MaskGIT confidences
    caption_greedy: bool = True
    caption_temperature: float = 1.0  # when not greedy
    caption_min_tokens: int = 0  # eos is banned before this many tokens
    caption_max_tokens: int | None = None  # default: caption_len - 1
    kv_cache: bool = True
    seed: int | Sequence[int] = 0
    # At temperature 0, a future joint coordinate is the median bin of its distribution
    # (where the model is torn between "up" and "down" it stays between them, which costs
    # less distance than betting on one) instead of the most likely bin; flags stay argmax.
    future_pose_median: bool = True
    # The same for the skeleton read from the frame: on 256 validation frames of the demo
    # model, PCK@0.05 0.339 against 0.320 for the most likely bin (PCK@0.2 0.835 vs 0.815).
    present_pose_median: bool = True
    # Where the model read the skeleton from the frame itself, the caption queries get the
    # image context's vector (M2Config.image_context_levels) in place of that skeleton's.
    caption_from_image: bool = True

    def __post_init__(self) -> None:
        if self.steps < 0 or self.maskgit_steps < 1:
            raise ValueError(
                f"need steps >= 0 and maskgit_steps >= 1, got {self.steps}, {self.maskgit_steps}"
            )
        if self.temperature < 0 or self.caption_temperature < 0 or self.choice_temperature < 0:
            raise ValueError("temperatures must be >= 0")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got {self.top_k}, {self.top_p}")


@dataclass
class GenerationResult:
    coords: Tensor  # (B, 39) pose ids of the skeleton now (given or generated)
    captions: list[list[int]]  # caption ids without bos / eos / pad (given or generated)
    coords_next: Tensor  # (B, steps, 234) pose ids of the six future skeletons per step
    tok_rgb_next: Tensor  # (B, steps, 256) image ids of the next key frame per step
    timings: dict[str, float]  # seconds per stage: encode, coords, captions, ...
    action: Tensor | None = None  # (B,) action ids (format-2 models)
    confidence: dict[str, Tensor] | None = None  # per pose slot in [0, 1] (format-2 models)


def _uniform(gens: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """One uniform tensor per sample from its own generator -> (B, *shape)."""
    return torch.stack([torch.rand(shape, generator=g) for g in gens]).to(device)


def sample_logits(
    logits: Tensor, temperature: float, top_k: int, top_p: float, u: Tensor
) -> tuple[Tensor, Tensor]:
    """(..., V) logits + (...) uniforms -> (ids, probability of each id). Inverse-CDF
    sampling (one uniform per token); temperature 0 = argmax."""
    if temperature == 0:
        prob, ids = logits.softmax(-1).max(-1)
        return ids, prob
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    cdf = probs.cumsum(-1)
    ids = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1), right=True)
    ids = ids.clamp(max=probs.shape[-1] - 1)
    return ids.squeeze(-1), probs.gather(-1, ids).squeeze(-1) / cdf[..., -1]


def median_bins(logits: Tensor, ids: Tensor) -> Tensor:
    """Pose ids with each coordinate (an id < POSE_BINS) replaced by the median bin of its
    distribution under `logits` (..., V); flag ids are kept."""
    cdf = logits[..., :POSE_BINS].float().softmax(-1).nan_to_num(0.0).cumsum(-1)
    median = torch.searchsorted(cdf, 0.5 * cdf[..., -1:]).squeeze(-1).clamp(max=POSE_BINS - 1)
    return torch.where(ids < POSE_BINS, median, ids)


def _pack(model: M2Model, known: Mapping[str, tuple[Tensor, Tensor]]) -> tuple[Tensor, ...]:
    """{name: (ids (B, n), valid (B, n))} -> encoder slots (ids, mod, pos, valid)."""
    ids, mod, pos, valid = [], [], [], []
    for name, (x, ok) in known.items():
        B, n = x.shape
        ids.append(x.clamp(min=0))
        mod.append(torch.full_like(x, model.names.index(name)))
        pos.append(torch.arange(n, device=x.device).expand(B, n))
        valid.append(ok)
    return tuple(torch.cat(t, dim=1) for t in (ids, mod, pos, valid))


def maskgit(
    model: M2Model,
    name: str,
    kv: list[tuple[Tensor, Tensor]],
    cross_mask: Tensor | None,
    cfg: GenerationConfig,
    gens: list[torch.Generator],
    pos_table: Tensor | None = None,
    prior: Tensor | None = None,
    motion: Tensor | None = None,
) -> Tensor:
    """Generate all tokens of one image / pose modality -> (B, n) ids, none left masked.
    `prior` (B, n): the present token at each position of a future modality (model.py);
    `motion` (B, n): each future coordinate's displacement in bins (`M2Model.motion_bins`)."""
    reg = model.config.registry()
    table = model.pos_table() if pos_table is None else pos_table
    B, n, device = kv[0][0].shape[0], reg[name].num_tokens, kv[0][0].device
    ids = torch.full((B, n), -1, dtype=torch.long, device=device)
    mod = torch.full_like(ids, model.names.index(name))
    pos = torch.arange(n, device=device).expand(B, n)
    # a pose modality's every third slot is a visibility flag, the rest coordinate bins
    is_flag = pos % 3 == 2 if reg[name].kind == "pose" else None
    n_masked, T = n, cfg.maskgit_steps
    for t in range(1, T + 1):
        x = model.embed_queries(ids, mod, pos, table, prior)
        h = model.decode(x, kv, cross_mask)  # (B, n, D)
        # Only the still-masked positions need logits: every sample has n_masked of them.
        order = (ids >= 0).to(torch.int8).argsort(dim=1, stable=True)[:, :n_masked]
        hm = h.gather(1, order[..., None].expand(-1, -1, h.shape[-1])).flatten(0, 1)
        pm = prior.gather(1, order).flatten() if prior is not None else None
        flag = is_flag.gather(1, order).flatten() if is_flag is not None else None
        mm = motion.gather(1, order).flatten() if motion is not None else None
        logits = model.head_logits(name, hm, pm, flag, mm)
        logits = logits.view(B, n_masked, logits.shape[-1]).float()
        u = _uniform(gens, (n_masked,), device)
        sampled, prob = sample_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p, u)
        median = cfg.future_pose_median if name == "coords_next" else cfg.present_pose_median
        if cfg.temperature == 0 and median and name in ("coords", "coords_next"):
            sampled = median_bins(logits, sampled)
        n_next = 0 if t == T else min(n_masked - 1, math.floor(n * cosine_schedule(t / T)))
        n_next = max(n_next, 0)
        conf = prob.clamp(min=1e-30).log()
        if cfg.choice_temperature > 0:
            g = -torch.log(-torch.log(_uniform(gens, (n_masked,), device).clamp(1e-20, 1 - 1e-7)))
            conf = conf + cfg.choice_temperature * (1 - t / T) * g
        keep = conf.topk(n_masked - n_next, dim=1).indices  # most confident among the masked
        ids = ids.scatter(1, order.gather(1, keep), sampled.gather(1, keep))
        n_masked = n_next
    return ids


@torch.no_grad()
def decode_caption(
    model: M2Model,
    context: Tensor,
    cross_mask: Tensor | None,
    cfg: GenerationConfig,
    gens: list[torch.Generator],
    return_logits: bool = False,
    pos_table: Tensor | None = None,
    caption_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Autoregressive caption from an encoded context -> (ids (B, L) bos/pad-free layout:
    position 1.. of the caption, pad after eos; logits (B, L, V) per step or None).
    `caption_bias`: `model.caption_bias` of the same encoder inputs (pose_context models)."""
    reg = model.config.registry()
    table = model.pos_table() if pos_table is None else pos_table
    B, device = context.shape[0], context.device
    max_new = cfg.caption_max_tokens or reg["captions"].num_tokens - 1
    max_new = min(max_new, reg["captions"].num_tokens - 1)
    cap = model.names.index("captions")
    kv = model.context_kv(context) if cfg.kv_cache else None
    caches = [KVCache(max_new) for _ in model.decoder] if cfg.kv_cache else None
    out = torch.full((B, max_new), PAD_ID, dtype=torch.long, device=device)
    queries = torch.full((B, max_new), BOS_ID, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_logits = []
    for t in range(max_new):
        if cfg.kv_cache:  # one new query; self-attention reads the cache
            q, p = queries[:, t : t + 1], torch.full((B, 1), t + 1, device=device)
            x = model.embed_queries(q, torch.full_like(q, cap), p, table, None, caption_bias)
            h = model.decode(x, kv, cross_mask, caches=caches)[:, -1]
        else:  # the whole prefix again, cross-attention keys/values included
            q, p = queries[:, : t + 1], torch.arange(1, t + 2, device=device).expand(B, t + 1)
            x = model.embed_queries(q, torch.full_like(q, cap), p, table, None, caption_bias)
            h = model.decode(x, model.context_kv(context), cross_mask, is_causal=True)[:, -1]
        logits = model.heads["captions"](h).float()  # (B, V)
        logits[:, [PAD_ID, BOS_ID]] = float("-inf")
        if t < cfg.caption_min_tokens:
            logits[:, EOS_ID] = float("-inf")
        if return_logits:
            step_logits.append(logits)
        if cfg.caption_greedy:
            tok = logits.argmax(-1)
        else:
            u = _uniform(gens, (), device)
            tok = sample_logits(logits, cfg.caption_temperature, cfg.top_k, cfg.top_p, u)[0]
        tok = torch.where(done, PAD_ID, tok)
        out[:, t] = tok
        done |= tok == EOS_ID
        if t + 1 < max_new:
            queries[:, t + 1] = tok
        if bool(done.all()):
            break
    return out, torch.stack(step_logits, 1) if return_logits else None


def _check_ids(x: Tensor, name: str, width: int | None, vocab: int, absent: Tensor) -> None:
    if x.ndim != 2 or (width is not None and x.shape[1] != width):
        raise ValueError(f"input {name}: expected shape (B, {width or 'L'}), got {tuple(x.shape)}")
    given = x[~absent]
    if given.numel() and (given.min() < 0 or given.max() >= vocab):
        raise ValueError(f"input {name}: ids must be in [0, {vocab})")


def _prepare_inputs(
    model: M2Model, inputs: Mapping[str, Tensor], device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Check the caller's tensors -> (tok_rgb, coords, has_coords, captions padded to
    caption_len, has_captions); a row of -1 (coords) or of pad (captions) = not given."""
    reg = model.config.registry()
    unknown = set(inputs) - {"tok_rgb", "coords", "captions"}
    if unknown or "tok_rgb" not in inputs:
        raise ValueError(f"inputs must hold tok_rgb [+ coords, captions], got {sorted(inputs)}")
    rgb = torch.as_tensor(inputs["tok_rgb"], device=device).long()
    B = rgb.shape[0] if rgb.ndim == 2 else 0
    if B == 0:
        raise ValueError(f"input tok_rgb: expected shape (B >= 1, 256), got {tuple(rgb.shape)}")
    _check_ids(
        rgb,
        "tok_rgb",
        256,
        reg["tok_rgb"].vocab_size,
        torch.zeros(B, dtype=torch.bool, device=device),
    )
    coords = inputs.get("coords", torch.full((B, TOKENS_PER_POSE), -1))
    coords = torch.as_tensor(coords, device=device).long()
    if coords.ndim != 2:
        raise ValueError(f"input coords: expected shape (B, 39), got {tuple(coords.shape)}")
    has_coords = ~(coords == -1).all(1)
    _check_ids(coords, "coords", TOKENS_PER_POSE, reg["coords"].vocab_size, ~has_coords)
    given = coords[has_coords].view(-1, TOKENS_PER_POSE // 3, 3)
    if (given[..., :2] >= POSE_BINS).any() or (given[..., 2] < POSE_BINS).any():
        raise ValueError(
            "input coords: x / y must be bins < 8192 and every third id a visible flag"
        )
    L = reg["captions"].num_tokens
    caps = torch.as_tensor(inputs.get("captions", torch.zeros(B, L)), device=device).long()
    if caps.ndim != 2 or caps.shape[1] > L:
        raise ValueError(f"input captions: expected shape (B, <= {L}), got {tuple(caps.shape)}")
    caps = torch.nn.functional.pad(caps, (0, L - caps.shape[1]), value=PAD_ID)
    has_caps = (caps != PAD_ID).any(1)
    _check_ids(caps, "captions", L, reg["captions"].vocab_size, ~has_caps)
    if (caps[has_caps, 0] != BOS_ID).any():
        raise ValueError(f"input captions: a given caption must start with bos={BOS_ID}")
    if coords.shape[0] != B or caps.shape[0] != B:
        raise ValueError("inputs tok_rgb, coords and captions must have the same batch size")
    return rgb, coords, has_coords, caps, has_caps


@torch.no_grad()
def generate(
    model: M2Model, inputs: Mapping[str, Tensor], cfg: GenerationConfig | None = None
) -> GenerationResult:
    """Chained generation for a batch. inputs: "tok_rgb" (B, 256) ids; optional "coords"
    (B, 39) pose ids (row of -1 = not given) and "captions" (B, L) ids, bos first (row of
    pad = not given)."""
    cfg = cfg or GenerationConfig()
    device = next(model.parameters()).device
    rgb, coords, has_coords, caps, has_caps = _prepare_inputs(model, inputs, device)
    B, L = rgb.shape[0], caps.shape[1]
    seeds = [cfg.seed] * B if isinstance(cfg.seed, int) else list(cfg.seed)
    if len(seeds) != B:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {B}")
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    times: dict[str, float] = defaultdict(float)
    table = model.pos_table()  # positions are fixed during generation: build them once

    def timed(stage: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        if device.type == "cuda":  # stage times should mean something on a GPU too
            torch.cuda.synchronize(device)
        times[stage] += time.perf_counter() - t0
        return out

    def context(known: dict[str, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor | None]:
        return timed("encode", lambda: model.encode(*_pack(model, known)))

    rgb_in = (rgb, torch.ones_like(rgb, dtype=torch.bool))
    cap_valid = lambda: (caps > PAD_ID) & has_caps[:, None] & (torch.arange(L, device=device) > 0)  # noqa: E731
    if not bool(has_coords.all()):  # coords <- tok_rgb (+ captions)
        ctx, mask = context({"tok_rgb": rgb_in, "captions": (caps, cap_valid())})
        gen = timed(
            "coords", maskgit, model, "coords", model.context_kv(ctx), mask, cfg, gens, table
        )
        if model.pose_reader is not None:  # the reader's positions (and flags, with its head)
            gen = timed("coords", model.read_pose, rgb, gen)
        coords = torch.where(has_coords[:, None], coords, gen)
    if not bool(has_caps.all()):  # captions <- tok_rgb, coords
        slots = _pack(model, {"tok_rgb": rgb_in, "coords": (coords, torch.ones_like(coords, dtype=torch.bool))})  # fmt: skip
        hidden = None
        if (
            cfg.caption_from_image
            and model.image_context is not None
            and not bool(has_coords.all())
        ):
            # the skeleton just guessed says little about the action: read it from the frame
            seen, _ = model.skeleton_hidden(*slots)
            hidden = torch.where(has_coords[:, None], seen, model.image_hidden(rgb, coords))
        ctx, mask = timed("encode", model.encode, *slots, None, hidden)
        bias = model.caption_bias(*slots, hidden)
        gen, _ = timed("captions", decode_caption, model, ctx, mask, cfg, gens, False, table, bias)
        gen = torch.cat([torch.full((B, 1), BOS_ID, device=device), gen], 1)
        gen = torch.nn.functional.pad(gen, (0, L - gen.shape[1]), value=PAD_ID)
        caps = torch.where(has_caps[:, None], caps, gen)
        has_caps = torch.ones_like(has_caps)
    first_coords, out_next, out_rgb = coords, [], []
    for _ in range(cfg.steps):  # the future <- tok_rgb, coords, captions; then roll out
        ctx, mask = context({
            "tok_rgb": rgb_in, "coords": (coords, torch.ones_like(coords, dtype=torch.bool)),
            "captions": (caps, cap_valid()),
        })  # fmt: skip
        kv = model.context_kv(ctx)
        now_pose = coords.repeat(1, FUTURE_FRAMES)  # the present, as every future frame's prior
        motion = None
        if model.motion is not None:
            pos = torch.arange(coords.shape[1], device=device).expand_as(coords)
            motion = model.motion_bins(coords, pos, torch.ones_like(coords, dtype=torch.bool))
        out_next.append(
            timed("coords_next", maskgit, model, "coords_next", kv, mask, cfg, gens, table,
                  now_pose, motion)
        )  # fmt: skip
        later = out_next[-1][:, (FUTURE_FRAMES - 1) * TOKENS_PER_POSE :]  # the skeleton at t+6
        if model.next_frame is not None:  # from the frame, the skeleton now and at t+6
            out_rgb.append(
                timed("tok_rgb_next", model.next_frame_tokens, rgb_in[0], coords, later, ~has_coords)
            )  # fmt: skip
        else:
            out_rgb.append(
                timed("tok_rgb_next", maskgit, model, "tok_rgb_next", kv, mask, cfg, gens, table,
                      rgb_in[0])
            )  # fmt: skip
        rgb_in, coords = (out_rgb[-1], rgb_in[1]), later
    return GenerationResult(
        coords=first_coords,
        captions=[_strip(row) for row in caps.tolist()],
        coords_next=torch.stack(out_next, 1)
        if out_next
        else rgb.new_empty((B, 0, FUTURE_FRAMES * TOKENS_PER_POSE)),
        tok_rgb_next=torch.stack(out_rgb, 1) if out_rgb else rgb.new_empty((B, 0, rgb.shape[1])),
        timings=dict(times),
    )


def _strip(row: list[int]) -> list[int]:
    """Caption ids without bos, and nothing from eos on."""
    out = []
    for i in row[1:]:
        if i in (EOS_ID, PAD_ID):
            break
        out.append(i)
    return out
