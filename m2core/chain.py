"""Chained generation for the format-2 model: a schedule of (modality, scheme) steps run
by one loop (DESIGN sections 7 and 14).

Each finished "now" modality becomes an encoder input of the next step. The schemes:
- `readout`: every position of the modality queried at once, one decoder pass, each
  adapter's read-out (a skeleton's positions and flags; an action class);
- `autoregressive`: the caption, token by token with the decoder's keys/values cached;
- `maskgit`: an image grid in `maskgit_steps` passes, the chosen tokens riding in their
  queries, the most confident kept on a cosine schedule (1 step = one readout); a grid
  whose adapter always copies (the export's copy margin) is the present grid, no pass.
Roll-out steps feed `tok_rgb_next` and the last future skeleton back as the next step's
frame and skeleton. Seeds are per sample, so a request's result does not depend on its
batch mates. Given modalities (a coords row, a caption, an action >= 0) are kept.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import Tensor

from m2core.adapters import Inputs, Slots
from m2core.blocks import KVCache
from m2core.generate import (
    GenerationConfig,
    GenerationResult,
    _prepare_inputs,
    _strip,
    _uniform,
    sample_logits,
)
from m2core.masking import BOS_ID, EOS_ID, PAD_ID, cosine_schedule
from m2core.modalities import FUTURE_FRAMES, TOKENS_PER_POSE
from m2core.model_v2 import PRESENT_OF, M2ModelV2

PRESENT = (("coords", "readout"), ("action", "readout"), ("captions", "autoregressive"))
FUTURE = (("coords_next", "readout"), ("tok_rgb_next", "maskgit"))


class Chain:
    """One generation call's state: the known modalities and the per-sample generators."""

    def __init__(
        self, model: M2ModelV2, cfg: GenerationConfig, gens: list[torch.Generator],
        given_action: Tensor | None = None,
    ):  # fmt: skip
        self.model, self.cfg, self.gens = model, cfg, gens
        # (B,) the caller's action for the motion path, -1 = none; a read one never steers it
        self.given_action = given_action
        self.registry = model.config.registry()  # built once, read at every step
        self.known: dict[str, tuple[Tensor, Tensor]] = {}  # name -> (ids (B, n), valid (B, n))
        self.times: dict[str, float] = defaultdict(float)
        self.confidence: dict[str, Tensor] = {}
        # name -> (the known entry it was made from, its input embedding): each block is
        # embedded on its own, so an unchanged one (the frame, until a roll-out) is embedded once
        self.embedded: dict[str, tuple[tuple[Tensor, Tensor], Tensor]] = {}

    def encode(self) -> tuple[Inputs, Tensor | None]:
        t0 = time.perf_counter()
        names = self.model.names
        ids, mod, pos, valid, emb = [], [], [], [], []
        for name, entry in self.known.items():
            if not self.registry[name].can_input or name in PRESENT_OF:
                continue
            x, ok = entry
            B, n = x.shape
            block = (
                x.clamp(min=0),
                torch.full_like(x, names.index(name)),
                torch.arange(n, device=x.device).expand(B, n),
                ok,
            )
            for out, t in zip((ids, mod, pos, valid), block, strict=True):
                out.append(t)
            if name not in self.embedded or self.embedded[name][0] is not entry:
                self.embedded[name] = (entry, self.model.embed(*block, query=False))
            emb.append(self.embedded[name][1])
        out = self.model.encode(*(torch.cat(t, 1) for t in (ids, mod, pos, valid, emb)))
        self.times["encode"] += time.perf_counter() - t0
        return out

    def queries(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        """(the present token at each position, the present skeleton per sample)."""
        n = self.registry[name].num_tokens
        prior = None
        if name in PRESENT_OF:  # the present at the same position (every future frame)
            now = self.known[PRESENT_OF[name]][0]
            prior = now.repeat(1, n // now.shape[1])
        pose = self.known["coords"][0] if "coords" in self.known else None
        return prior, pose

    def run(
        self, name: str, scheme: str, ctx: Inputs, cross_mask: Tensor | None, kv: list | None = None
    ) -> Tensor:
        """One step; `kv`, the context's keys/values, when steps share one encoding."""
        t0 = time.perf_counter()
        kv = kv if kv is not None else self.model.context_kv(ctx)
        if scheme == "autoregressive":
            out = self.caption(ctx, kv, cross_mask)
        else:
            steps = self.cfg.maskgit_steps if scheme == "maskgit" else 1
            out = self.maskgit(name, ctx, kv, cross_mask, steps)
        self.times[name] += time.perf_counter() - t0
        return out

    def maskgit(
        self, name: str, ctx: Inputs, kv: list, cross_mask: Tensor | None, steps: int
    ) -> Tensor:
        model, B = self.model, ctx.mod.shape[0]
        prior, pose = self.queries(name)
        if prior is not None and getattr(model.adapters[name], "copies", False):
            # the export chose copying: every pass would keep the present token, so skip them
            self.confidence[name] = torch.ones(prior.shape, device=prior.device)
            return prior.clone()
        n = self.registry[name].num_tokens
        ids = torch.full((B, n), -1, dtype=torch.long, device=ctx.mod.device)
        conf_all = torch.zeros(B, n, device=ids.device)
        for t in range(1, steps + 1):
            s = Slots.block(ids, prior, pose, self.given_action)
            h = model.decode(model.embed_queries(name, s), kv, cross_mask).flatten(0, 1)
            temp = self.cfg.temperature if steps > 1 else 0.0
            got, conf = model.adapters[name].readout(h, s, ctx, temp, self.gens)
            got, conf = got.view(B, n), conf.view(B, n)
            masked = ids < 0
            n_next = (
                0
                if t == steps
                else max(
                    0, min(int(masked[0].sum()) - 1, math.floor(n * cosine_schedule(t / steps)))
                )
            )
            score = torch.where(masked, conf.clamp(min=1e-30).log(), float("-inf"))
            keep = score.topk(int(masked[0].sum()) - n_next, dim=1).indices
            ids = ids.scatter(1, keep, got.gather(1, keep))
            conf_all = conf_all.scatter(1, keep, conf.gather(1, keep))
        self.confidence[name] = conf_all
        return ids

    def caption(self, ctx: Inputs, kv: list, cross_mask: Tensor | None) -> Tensor:
        """-> (B, caption_len) bos, tokens, eos, pad."""
        model, cfg = self.model, self.cfg
        text = model.adapters["captions"]
        L = model.config.caption_len
        B, device = ctx.mod.shape[0], ctx.mod.device
        max_new = min(cfg.caption_max_tokens or L - 1, L - 1)
        caches = [KVCache(max_new) for _ in model.decoder]
        out = torch.full((B, L), PAD_ID, dtype=torch.long, device=device)
        out[:, 0] = BOS_ID
        done = torch.zeros(B, dtype=torch.bool, device=device)
        rows = torch.arange(B, device=device)
        action = self.known["action"][0][:, 0] if "action" in self.known else None
        for t in range(max_new):
            s = Slots(out[:, t], torch.full((B,), t + 1, device=device), rows, B, action=action)
            x = model.embed_queries("captions", s)
            logits = text.logits(model.decode(x, kv, cross_mask, caches=caches)[:, -1])
            logits[:, [PAD_ID, BOS_ID]] = float("-inf")
            if t < cfg.caption_min_tokens:
                logits[:, EOS_ID] = float("-inf")
            if cfg.caption_greedy:
                tok = logits.argmax(-1)
            else:
                u = _uniform(self.gens, (), device)
                tok = sample_logits(logits, cfg.caption_temperature, cfg.top_k, cfg.top_p, u)[0]
            out[:, t + 1] = torch.where(done, PAD_ID, tok)
            done |= tok == EOS_ID
            if bool(done.all()):
                break
        return out


@torch.no_grad()
def generate(
    model: M2ModelV2, inputs: Mapping[str, Tensor], cfg: GenerationConfig | None = None
) -> GenerationResult:
    """inputs: "tok_rgb" (B, 256); optional "coords" (B, 39) (row of -1 = not given),
    "captions" (B, L) bos first (row of pad = not given), "action" (B,) (-1 = not given)."""
    cfg = cfg or GenerationConfig()
    device = next(model.parameters()).device
    action = inputs.get("action")
    rgb, coords, has_coords, caps, has_caps = _prepare_inputs(
        model, {k: v for k, v in inputs.items() if k != "action"}, device
    )
    B = rgb.shape[0]
    action = (
        torch.full((B,), -1, device=device)
        if action is None
        else torch.as_tensor(action, device=device).long().view(-1)
    )
    classes = model.config.action_classes
    if action.shape != (B,) or bool((action >= classes).any()) or bool((action < -1).any()):
        raise ValueError(
            f"input action: expected (B,) ids in [0, {classes}) or -1, got {action.tolist()}"
        )
    seeds = [cfg.seed] * B if isinstance(cfg.seed, int) else list(cfg.seed)
    if len(seeds) != B:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {B}")
    chain = Chain(model, cfg, [torch.Generator().manual_seed(int(s)) for s in seeds], action)
    ones = lambda x: torch.ones_like(x, dtype=torch.bool)  # noqa: E731
    L = caps.shape[1]
    cap_valid = lambda c, has: (c > PAD_ID) & has[:, None] & (torch.arange(L, device=device) > 0)  # noqa: E731
    given = {
        "coords": (coords, has_coords),
        "captions": (caps, has_caps),
        "action": (action[:, None], action >= 0),
    }
    chain.known["tok_rgb"] = (rgb, ones(rgb))
    for name, ok in given.items():  # what the caller gave is an input from the start
        if bool(ok[1].any()):
            x = ok[0]
            valid = cap_valid(x, ok[1]) if name == "captions" else ok[1][:, None].expand_as(x)
            chain.known[name] = (x, valid)
    for name, scheme in PRESENT:
        x, has = given[name]
        if bool(has.all()):
            continue
        got = chain.run(name, scheme, *chain.encode())
        x = torch.where(has[:, None], x, got)
        chain.known[name] = (x, cap_valid(x, ones(has)) if name == "captions" else ones(x))
    first = chain.known["coords"][0]
    conf_now = chain.confidence.get("coords", torch.ones_like(first, dtype=torch.float))
    conf_now = torch.where(has_coords[:, None], 1.0, conf_now)
    out: dict[str, list[Tensor]] = {"coords_next": [], "tok_rgb_next": [], "conf": []}
    for _ in range(cfg.steps):
        ctx, cross_mask = chain.encode()
        kv = model.context_kv(ctx)
        for name, scheme in FUTURE:
            out[name].append(chain.run(name, scheme, ctx, cross_mask, kv))
        out["conf"].append(chain.confidence["coords_next"])
        later = out["coords_next"][-1][:, (FUTURE_FRAMES - 1) * TOKENS_PER_POSE :]
        chain.known["tok_rgb"] = (out["tok_rgb_next"][-1], ones(rgb))
        chain.known["coords"] = (later, ones(later))
    caps_final = chain.known["captions"][0]
    empty = lambda n: rgb.new_empty((B, 0, n))  # noqa: E731
    result = GenerationResult(
        coords=first,
        captions=[_strip(row) for row in caps_final.tolist()],
        coords_next=torch.stack(out["coords_next"], 1)
        if out["coords_next"]
        else empty(FUTURE_FRAMES * TOKENS_PER_POSE),
        tok_rgb_next=torch.stack(out["tok_rgb_next"], 1)
        if out["tok_rgb_next"]
        else empty(rgb.shape[1]),
        timings=dict(chain.times),
        action=chain.known["action"][0][:, 0],
        confidence={
            "coords": conf_now,
            "coords_next": torch.stack(out["conf"], 1)
            if out["conf"]
            else rgb.new_empty((B, 0, FUTURE_FRAMES * TOKENS_PER_POSE)).float(),
        },
    )
    return result
