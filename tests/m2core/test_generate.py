"""Chained generation: caption decoding vs teacher forcing, KV cache, MaskGIT, seeds."""

import dataclasses
import math

import pytest
import torch

from m2core.generate import GenerationConfig, _pack, decode_caption, generate
from m2core.masking import BOS_ID, EOS_ID
from m2core.modalities import POSE_BINS
from m2core.model import M2Config, M2Model

CFG = M2Config(
    dim=64, enc_layers=2, dec_layers=2, heads=4, image_vocab=64, text_vocab=300, caption_len=16
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return M2Model(CFG).eval()


def _inputs(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.randint(0, POSE_BINS, (B, 39), generator=g)
    coords[:, 2::3] = POSE_BINS + torch.randint(0, 2, (B, 13), generator=g)
    return torch.randint(0, 64, (B, 256), generator=g), coords


def _context(model, rgb, coords):
    ones = lambda x: torch.ones_like(x, dtype=torch.bool)  # noqa: E731
    slots = _pack(model, {"tok_rgb": (rgb, ones(rgb)), "coords": (coords, ones(coords))})
    return slots, model.encode(*slots)


def _context_model():
    """A pose_context model whose context maps are not zero (as after training)."""
    torch.manual_seed(0)
    m = M2Model(dataclasses.replace(CFG, pose_context=True)).eval()
    with torch.no_grad():
        for layer in (m.pose_context[2], m.caption_context):
            layer.weight.normal_(std=0.05)
    return m


@torch.no_grad()
@pytest.mark.parametrize("kind", ["plain", "pose_context"])
def test_causal_caption_decoding_matches_teacher_forced_logits(model, kind):
    """decode_caption's step logits are the teacher-forced forward's (with pose_context, the
    caption queries' skeleton vector included on both paths)."""
    model = model if kind == "plain" else _context_model()
    rgb, coords = _inputs()
    slots, (ctx, mask) = _context(model, rgb, coords)
    cfg = GenerationConfig(caption_min_tokens=10, caption_max_tokens=10)
    gens = [torch.Generator() for _ in range(2)]
    bias = model.caption_bias(*slots)
    assert (bias is None) == (kind == "plain")
    tokens, step_logits = decode_caption(model, ctx, mask, cfg, gens, True, None, bias)
    assert tokens.shape == (2, 10) and (tokens > EOS_ID).all()
    # teacher forcing: query i = token i-1 (bos first) at position i = 1..10
    n, cap = 10, model.names.index("captions")
    batch = dict(zip(("enc_ids", "enc_mod", "enc_pos", "enc_valid"), slots, strict=True))
    batch["dec_query"] = torch.cat([torch.full((2, 1), BOS_ID), tokens[:, :-1]], 1)
    batch["dec_mod"] = torch.full((2, n), cap)
    batch["dec_pos"] = torch.arange(1, n + 1).expand(2, n)
    batch["dec_valid"] = torch.ones(2, n, dtype=torch.bool)
    forced = model(batch)[0]["captions"].view(2, n, -1)
    finite = torch.isfinite(step_logits)
    assert finite.sum() > 0.9 * finite.numel()
    torch.testing.assert_close(step_logits[finite], forced[finite], rtol=1e-4, atol=1e-4)
    assert torch.equal(forced.argmax(-1)[:, :-1], tokens[:, :-1])


@torch.no_grad()
@pytest.mark.parametrize("greedy", [True, False])
def test_kv_cached_decoding_gives_the_same_tokens_as_uncached(model, greedy):
    rgb, coords = _inputs(B=3, seed=1)
    _, (ctx, mask) = _context(model, rgb, coords)
    out = {}
    for cache in (True, False):
        cfg = GenerationConfig(kv_cache=cache, caption_greedy=greedy, caption_temperature=1.5)
        gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
        out[cache] = decode_caption(model, ctx, mask, cfg, gens, return_logits=True)
    assert torch.equal(out[True][0], out[False][0])
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", [1, 3, 45])
def test_maskgit_leaves_no_masked_position_and_pose_is_well_formed(model, steps):
    rgb, _ = _inputs(B=2, seed=2)
    r = generate(model, {"tok_rgb": rgb}, GenerationConfig(maskgit_steps=steps, seed=3))
    assert r.coords.shape == (2, 39) and r.coords_next.shape == (2, 1, 234)
    assert r.tok_rgb_next.shape == (2, 1, 256)
    assert ((r.tok_rgb_next >= 0) & (r.tok_rgb_next < 64)).all()
    for pose in (r.coords, r.coords_next.flatten(1)):
        xy = pose.view(2, -1, 3)[..., :2]
        flag = pose.view(2, -1, 3)[..., 2]
        assert ((xy >= 0) & (xy < POSE_BINS)).all()
        assert ((flag == POSE_BINS) | (flag == POSE_BINS + 1)).all()
    assert all(len(c) <= 15 and all(t > EOS_ID for t in c) for c in r.captions)


def test_generation_is_seeded_and_deterministic(model):
    rgb, _ = _inputs(B=2, seed=4)
    cfg = GenerationConfig(temperature=1.0, caption_greedy=False, seed=11)
    a, b = generate(model, {"tok_rgb": rgb}, cfg), generate(model, {"tok_rgb": rgb}, cfg)
    c = generate(
        model, {"tok_rgb": rgb}, GenerationConfig(temperature=1.0, caption_greedy=False, seed=12)
    )
    for f in ("coords", "coords_next", "tok_rgb_next"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert a.captions == b.captions
    assert not torch.equal(a.tok_rgb_next, c.tok_rgb_next)
    # same request twice in one batch with one int seed: the same answer twice
    twin = generate(model, {"tok_rgb": rgb[:1].repeat(2, 1)}, cfg)
    assert torch.equal(twin.tok_rgb_next[0], twin.tok_rgb_next[1])
    per_sample = generate(model, {"tok_rgb": rgb[:1].repeat(2, 1)}, GenerationConfig(seed=[1, 2]))
    assert not torch.equal(per_sample.tok_rgb_next[0], per_sample.tok_rgb_next[1])


def test_mixed_batch_keeps_what_was_given_and_rolls_out(model):
    rgb, coords = _inputs(B=2, seed=5)
    coords[1] = -1  # sample 1 gives no skeleton
    caps = torch.zeros(2, 6, dtype=torch.long)
    caps[0] = torch.tensor([BOS_ID, 40, 41, 42, EOS_ID, 0])  # sample 0 gives a caption
    cfg = GenerationConfig(steps=2, temperature=0.0, seed=0)
    r = generate(model, {"tok_rgb": rgb, "coords": coords, "captions": caps}, cfg)
    assert torch.equal(r.coords[0], coords[0]) and (r.coords[1] >= 0).all()
    assert r.captions[0] == [40, 41, 42]
    assert r.coords_next.shape == (2, 2, 234) and r.tok_rgb_next.shape == (2, 2, 256)
    # step 2 is step 1 fed back: the same as a fresh call on step 1's outputs (argmax only)
    full_caps = torch.zeros(2, 16, dtype=torch.long)
    for i, c in enumerate(r.captions):  # a caption that hit the length limit has no eos
        row = torch.tensor([BOS_ID, *c, EOS_ID])[:16]
        full_caps[i, : len(row)] = row
    again = generate(
        model,
        {
            "tok_rgb": r.tok_rgb_next[:, 0],
            "coords": r.coords_next[:, 0, -39:],
            "captions": full_caps,
        },
        GenerationConfig(temperature=0.0),
    )
    assert torch.equal(again.coords_next[:, 0], r.coords_next[:, 1])
    assert torch.equal(again.tok_rgb_next[:, 0], r.tok_rgb_next[:, 1])


def test_bad_inputs_are_refused(model):
    rgb, coords = _inputs(B=2)
    with pytest.raises(ValueError, match="tok_rgb"):
        generate(model, {"tok_rgb": rgb[:, :100]})
    with pytest.raises(ValueError, match="tok_rgb"):
        generate(model, {"tok_rgb": rgb + 64})
    with pytest.raises(ValueError, match="inputs must hold"):
        generate(model, {"coords": coords})
    bad = coords.clone()
    bad[0, 2] = 5  # a coordinate bin where a visible flag belongs
    with pytest.raises(ValueError, match="visible flag"):
        generate(model, {"tok_rgb": rgb, "coords": bad})
    with pytest.raises(ValueError, match="bos"):
        generate(model, {"tok_rgb": rgb, "captions": torch.full((2, 4), 5)})
    with pytest.raises(ValueError, match="seeds"):
        generate(model, {"tok_rgb": rgb}, GenerationConfig(seed=[1, 2, 3]))
    with pytest.raises(ValueError, match="steps"):
        GenerationConfig(maskgit_steps=0)
    with pytest.raises(ValueError, match="steps"):
        GenerationConfig(steps=-1)


def test_zero_steps_give_the_present_alone_and_the_same_present(model):
    """steps=0 (m2 eval's frame-only pass): the skeleton and caption that a full chain
    gives, and no future."""
    rgb, _ = _inputs(B=2, seed=4)
    full = generate(model, {"tok_rgb": rgb}, GenerationConfig(seed=[3, 4]))
    now = generate(model, {"tok_rgb": rgb}, GenerationConfig(seed=[3, 4], steps=0))
    assert torch.equal(now.coords, full.coords) and now.captions == full.captions
    assert now.coords_next.shape == (2, 0, 234) and now.tok_rgb_next.shape == (2, 0, 256)
    assert "coords_next" not in now.timings


def test_present_prior_makes_an_untrained_model_start_from_zero_velocity():
    """The future's queries carry the present tokens and get a bonus on them: before any
    training the forecast is (within the copy bump) the present skeleton and frame, so
    learning starts from the zero-velocity baseline instead of noise. (The most likely bin:
    an untrained model's flat tail over 8,192 bins holds most of the mass, so the median
    estimate of a trained model's forecast is no guide here.)"""
    torch.manual_seed(1)
    fresh = M2Model(CFG).eval()
    rgb, coords = _inputs(B=2, seed=3)
    mode = GenerationConfig(temperature=0.0, future_pose_median=False)
    out = generate(fresh, {"tok_rgb": rgb, "coords": coords}, mode)
    now = coords.repeat(1, 6)
    xy = torch.ones(234, dtype=torch.bool)
    xy[2::3] = False
    assert (out.coords_next[:, 0][:, xy] - now[:, xy]).abs().max() <= 64  # copy bump width
    assert torch.equal(out.coords_next[:, 0][:, ~xy], now[:, ~xy])  # visibility copied
    assert (out.tok_rgb_next[:, 0] == rgb).float().mean() > 0.9
    off = M2Model(dataclasses.replace(CFG, present_prior=False)).eval()
    out_off = generate(off, {"tok_rgb": rgb, "coords": coords}, mode)
    assert (out_off.tok_rgb_next[:, 0] == rgb).float().mean() < 0.2


def test_median_bins_stay_between_two_modes_and_keep_flags():
    """The median is the bin where the cumulative mass crosses one half: between two
    point-like modes it is the one holding the middle of the mass, over a flat stretch its
    centre; a flag position keeps its id."""
    from m2core.generate import median_bins

    logits = torch.full((2, POSE_BINS + 2), float("-inf"))
    logits[0, :POSE_BINS] = -30.0
    logits[0, 1000], logits[0, 1200] = 0.0, math.log(1.5)
    logits[1, POSE_BINS + 1] = 0.0  # a visibility flag position
    ids = logits.argmax(-1)
    assert ids.tolist() == [1200, POSE_BINS + 1]
    out = median_bins(logits, ids)
    assert out[0] == 1200 and out[1] == POSE_BINS + 1
    logits[0, 1000] = math.log(1.5) + 0.01  # now the lower mode holds just over half
    assert median_bins(logits, logits.argmax(-1))[0] == 1000
    wide = torch.full((1, POSE_BINS + 2), float("-inf"))
    wide[0, 990:1011] = 0.0  # flat over 21 bins: the middle one
    assert median_bins(wide, wide.argmax(-1))[0] == 1000


def test_present_skeleton_median_is_a_switch_that_keeps_the_flags():
    """present_pose_median: at temperature 0 the skeleton read from the frame takes each
    coordinate's median bin (an untrained model's flat tails put it far from the most likely
    bin); the visibility flags are the same either way."""
    torch.manual_seed(2)
    fresh = M2Model(CFG).eval()
    rgb, _ = _inputs(B=2, seed=4)
    out = {
        med: generate(fresh, {"tok_rgb": rgb},
                      GenerationConfig(temperature=0.0, maskgit_steps=1, present_pose_median=med))
        for med in (False, True)
    }  # fmt: skip
    xy = torch.ones(39, dtype=torch.bool)
    xy[2::3] = False
    assert not torch.equal(out[True].coords[:, xy], out[False].coords[:, xy])
    assert torch.equal(out[True].coords[:, ~xy], out[False].coords[:, ~xy])
