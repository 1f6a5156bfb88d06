"""The M2 model: learning, attention structure, padding, sizes and FLOP accounting."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from m2core.masking import IGNORE, AlphaSet, MaskingConfig, collate, mask_sample, random_sample
from m2core.model import PRESETS, M2Config, M2Model

SMALL = {
    "dim": 64,
    "enc_layers": 2,
    "dec_layers": 2,
    "heads": 4,
    "image_vocab": 64,
    "text_vocab": 300,
    "caption_len": 16,
}


def _batch(n=4, seed=0, cfg=None, **kw):
    rng = np.random.default_rng(seed)
    cfg = cfg or MaskingConfig(input_budget=32, target_budget=32)
    return collate([mask_sample(random_sample(rng, 64, 300, 16, **kw), cfg, rng) for _ in range(n)])


def _fit(model, batch, steps):
    """AdamW (lr 3e-3, no decay) on one batch for `steps` steps -> the last loss."""
    opt = torch.optim.AdamW(model.optimizer_groups(0.0), lr=3e-3)
    for _ in range(steps):
        _, loss = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return M2Model(M2Config(**{**SMALL, **kw}))


def test_overfits_one_small_batch():
    batch, model = _batch(), _model()
    _, first = model(batch)
    loss = _fit(model, batch, 100)
    assert first.item() > 4.0
    assert loss.item() < 0.05


def test_loss_is_the_mean_of_per_modality_cross_entropies():
    batch, model = _batch(seed=1), _model()
    logits, loss = model(batch)
    valid, mod, labels = batch["dec_valid"], batch["dec_mod"], batch["dec_labels"]
    per_mod = []
    for name, lg in logits.items():
        y = labels[valid & (mod == model.names.index(name))]
        if (y != IGNORE).any():
            per_mod.append(F.cross_entropy(lg, y, ignore_index=IGNORE))
    assert len(per_mod) >= 3
    torch.testing.assert_close(loss, torch.stack(per_mod).mean())
    assert model(batch, return_logits=False)[0] == {}
    no_labels = {k: v for k, v in batch.items() if k != "dec_labels"}
    assert model(no_labels)[1] is None


def test_decoder_attention_is_causal_in_captions_and_blocked_across_modalities():
    """Changing a caption query token changes the logits of that slot and later ones only;
    changing a revealed tok_rgb_next token never reaches another modality's logits."""
    sets = (AlphaSet({"tok_rgb": 1.0}, {"captions": 1.0, "tok_rgb_next": 1.0, "coords_next": 1.0}),)
    cfg = MaskingConfig(32, 64, sets, reveal_prob=1.0)
    batch, model = _batch(n=1, seed=2, cfg=cfg, caption_tokens=12), _model()
    model.eval()
    cap = batch["dec_mod"][0] == model.names.index("captions")
    assert cap.sum() >= 6
    logits, _ = model(batch)
    changed = {k: v.clone() for k, v in batch.items()}
    slot = int(cap.nonzero()[3])
    changed["dec_query"][0, slot] = 7 if batch["dec_query"][0, slot] != 7 else 8
    new, _ = model(changed)
    diff = (new["captions"] - logits["captions"]).abs().amax(-1)
    assert (diff[:3] == 0).all() and (diff[3:] > 1e-6).all()
    for name in ("tok_rgb_next", "coords_next"):
        assert torch.equal(new[name], logits[name])
    rgb_next = batch["dec_mod"][0] == model.names.index("tok_rgb_next")
    shown = rgb_next & (batch["dec_query"][0] >= 0)
    assert shown.any()
    changed = {k: v.clone() for k, v in batch.items()}
    changed["dec_query"][0, shown] = (changed["dec_query"][0, shown] + 1) % 64
    new, _ = model(changed)
    assert torch.equal(new["coords_next"], logits["coords_next"])
    assert torch.equal(new["captions"], logits["captions"])
    assert not torch.equal(new["tok_rgb_next"], logits["tok_rgb_next"])


def test_empty_slots_change_nothing():
    """A sample padded to larger budgets gives the same logits (key-padding masks)."""
    rng = np.random.default_rng(3)
    raw = random_sample(rng, 64, 300, 16)
    cfg = MaskingConfig(24, 24)
    tight = collate([mask_sample(raw, cfg, np.random.default_rng(5))])
    loose = {}
    for k, v in tight.items():  # same slots, plus 8 empty ones holding garbage ids
        pad = (
            torch.full((1, 8), 3, dtype=v.dtype)
            if v.dtype != torch.bool
            else torch.zeros(1, 8, dtype=torch.bool)
        )
        loose[k] = torch.cat([v, pad], 1)
    loose["dec_labels"][:, -8:] = IGNORE
    model = _model().eval()
    a, la = model(tight)
    b, lb = model(loose)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(la, lb)


def test_presets_sizes_and_config_round_trip():
    assert set(PRESETS) >= {"tiny", "small", "base", "large"}
    base = M2Config.from_preset("base", image_vocab=4096, text_vocab=1000)
    assert (base.dim, base.enc_layers, base.dec_layers, base.heads) == (768, 12, 12, 12)
    with torch.device("meta"):
        body = M2Model(base).num_params(body_only=True)
    assert 195e6 < body < 203e6  # 4M-B: ~199M in the body
    tiny = M2Model(M2Config.from_preset("tiny", image_vocab=64, text_vocab=300))
    assert 1e6 < tiny.num_params(body_only=True) < 8e6
    data = json.loads(json.dumps(base.to_dict()))
    assert M2Config.from_dict(data) == base
    with pytest.raises(ValueError, match="unknown model config key 'depth'"):
        M2Config.from_dict({**data, "depth": 3})
    with pytest.raises(ValueError, match="dim"):
        M2Config.from_dict({**data, "dim": "768"})
    with pytest.raises(ValueError, match="unknown model preset"):
        M2Config.from_preset("huge")
    with pytest.raises(ValueError, match="heads"):
        M2Config(dim=100, heads=3)


def test_flops_per_token_matches_a_flop_counter():
    cfg = M2Config(**{**SMALL, "dim": 128}, input_tokens=32, target_tokens=32)
    model = M2Model(cfg)
    batch = _batch(n=2, cfg=MaskingConfig(32, 32))
    counter = FlopCounterMode(display=False)
    with counter:
        model(batch)[1].backward()
    measured = counter.get_total_flops()
    flops = model.flops_per_token()
    assert flops.encoder > 0 and flops.decoder > flops.encoder
    # heads are counted at the mean vocabulary, the batch has its own mix: within 25%
    assert 0.75 < measured / (2 * flops.per_sample) < 1.25
    assert model.estimate_mfu(1000.0, 1e12) == pytest.approx(1000.0 * flops.per_token / 1e12)


def test_soft_pose_labels_train_towards_the_right_bins_and_eval_ce_stays_hard():
    """With pose_label_sigma the pose heads learn a bump around the true bin: the argmax
    lands within a few sigma of the label, while eval-mode loss is the plain cross-entropy."""
    batch, model = _batch(seed=2), _model(pose_label_sigma=4.0)
    # neighbouring coordinate bins start with near-identical embeddings and head rows
    w = model.heads["coords"].weight
    assert torch.cosine_similarity(w[1000], w[1001], dim=0) > 0.9
    _fit(model, batch, 100)
    model.eval()
    with torch.no_grad():
        logits, hard = model(batch)
    valid, mod, labels = batch["dec_valid"], batch["dec_mod"], batch["dec_labels"]
    errors = []
    for name in ("coords", "coords_next"):
        if name not in logits:
            continue
        y = labels[valid & (mod == model.names.index(name))]
        coord = (y != IGNORE) & (y < 8192)
        errors.append((logits[name][coord].argmax(-1) - y[coord]).abs().float())
    errors = torch.cat(errors)
    assert errors.numel() > 10 and errors.median() <= 8
    per_mod = [
        F.cross_entropy(lg, labels[valid & (mod == model.names.index(n))], ignore_index=IGNORE)
        for n, lg in logits.items()
    ]
    torch.testing.assert_close(hard, torch.stack(per_mod).mean())


def _moving_batch():
    """4 samples whose every joint moves +300 bins at each future frame."""
    rng = np.random.default_rng(7)
    samples = []
    for _ in range(4):
        s = random_sample(rng, 64, 300, 16)
        s["coords"][0::3] = rng.integers(1000, 7000, 13)
        s["coords"][1::3] = rng.integers(1000, 7000, 13)
        future = np.tile(s["coords"], 6)
        future[0::3] += 300
        future[1::3] += 300
        s["coords_next"] = future
        samples.append(s)
    cfg = MaskingConfig(input_budget=64, target_budget=64,
                        alpha_sets=(AlphaSet({"tok_rgb": 1.0, "coords": 1.0}, {"coords_next": 1.0}),))  # fmt: skip
    return collate([mask_sample(s, cfg, rng) for s in samples])


def test_offset_head_learns_a_shift_from_the_present_pose():
    """Every joint moves +300 bins: the copy prior starts at the present, the offset head
    learns the displacement (the same for every absolute position)."""
    batch = _moving_batch()
    model = _model(pose_label_sigma=8.0)
    assert model.offset_heads["coords_next"].weight.abs().sum() == 0  # starts from the copy
    _fit(model, batch, 60)
    model.eval()
    with torch.no_grad():
        logits, _ = model(batch)
    y = batch["dec_labels"][batch["dec_valid"]]
    prior = batch["dec_prior"][batch["dec_valid"]]
    coord = (y != IGNORE) & (y < 8192)
    shift = logits["coords_next"][coord].argmax(-1) - prior[coord]
    assert (shift - 300).abs().float().median() <= 16


def test_pose_basis_model_takes_over_a_table_model_and_keeps_bins_smooth():
    """adapt_state_dict turns a per-bin-table model into a pose_basis one: at init the
    tables lie in the basis, so both give the same logits; after training the basis model's
    neighbouring bins still embed alike (they share every parameter)."""
    batch = _batch(seed=3)
    table = _model(seed=1, pose_label_sigma=4.0)
    basis = _model(seed=2, pose_label_sigma=4.0, pose_basis=True)
    assert "pose_value.weight" in basis.state_dict()
    assert basis.heads["coords"].out_features == 2  # the flags; bins come from the basis
    basis.load_state_dict(basis.adapt_state_dict(table.state_dict()), strict=True)
    table.eval(), basis.eval()
    with torch.no_grad():
        a, b = table(batch)[0], basis(batch)[0]
    for name in a:
        assert a[name].shape == b[name].shape
        assert torch.allclose(a[name], b[name], atol=1e-3), name
    basis.train()
    _fit(basis, batch, 20)
    with torch.no_grad():
        ids = torch.tensor([[4000, 4001, 6000]])
        e = basis.embed_tokens(ids, torch.full_like(ids, basis.names.index("coords")))[0]
    assert torch.cosine_similarity(e[0], e[1], dim=0) > 0.99
    assert torch.cosine_similarity(e[0], e[2], dim=0) < 0.9


def test_shift_head_regresses_the_displacement():
    """pose_shift: every joint moves +300 bins; the shift head's mean (2 numbers per slot,
    not thousands of offset logits) learns it, and the median decode lands there."""
    from m2core.generate import median_bins
    from m2core.model import _SHIFT_GAIN, _SHIFT_UNIT

    batch = _moving_batch()
    model = _model(pose_label_sigma=8.0, pose_shift=True, pose_basis=True)
    head = model.shift_heads["coords_next"]
    assert head.weight.abs().sum() == 0 and head.bias[0] == 0  # starts from mu = 0: the copy
    _fit(model, batch, 60)
    model.eval()
    with torch.no_grad():
        logits, _ = model(batch)
        mod = batch["dec_mod"] == model.names.index("coords_next")
        valid = batch["dec_valid"] & mod
        x = model.embed_queries(batch["dec_query"], batch["dec_mod"], batch["dec_pos"], None,
                                batch["dec_prior"])  # fmt: skip
        context, mask = model.encode(
            batch["enc_ids"], batch["enc_mod"], batch["enc_pos"], batch["enc_valid"]
        )
        h = model.decode(
            x,
            model.context_kv(context),
            mask,
            model.target_mask(batch["dec_mod"], batch["dec_valid"]),
        )
        mu = head(h[valid])[:, 0] * _SHIFT_GAIN * _SHIFT_UNIT
    y = batch["dec_labels"][valid]
    prior = batch["dec_prior"][valid]
    coord = (y != IGNORE) & (y < 8192)
    assert mu[coord].median() > 150  # the regression itself moved most of the way
    shift = median_bins(logits["coords_next"], y.clamp(min=0))[coord] - prior[coord]
    assert (shift - 300).abs().float().median() <= 16


def test_skeleton_features_see_the_shape_not_the_place():
    """pose_context's input: the same skeleton moved and scaled has the same per-joint
    features (only centre and extent change); masked-out slots read as absent."""
    from m2core.model import skeleton_features

    rng = np.random.default_rng(5)
    xy = rng.uniform(0.3, 0.6, (13, 2))

    def ids_of(points, flags=8193):
        tok = np.zeros((13, 3), np.int64)
        tok[:, :2] = np.floor(points * 8192)
        tok[:, 2] = flags
        return torch.from_numpy(tok.reshape(1, 39))

    pos = torch.arange(39)[None]
    every = torch.ones(1, 39, dtype=torch.bool)
    a = skeleton_features(ids_of(xy), pos, every)
    b = skeleton_features(ids_of(0.1 + 0.5 * xy), pos, every)
    assert a.shape == (1, 13 * 6 + 3)
    torch.testing.assert_close(a[:, :78], b[:, :78], atol=2e-3, rtol=0)
    assert abs(float(b[0, -1] - a[0, -1]) - np.log(0.5)) < 1e-2  # log extent
    # shuffled slots with two of them masked out (a partial skeleton, as the masking gives)
    order = torch.from_numpy(rng.permutation(39))[None]
    keep = torch.ones(1, 39, dtype=torch.bool)
    gone = order[0, :2]
    keep[0, :2] = False
    c = skeleton_features(ids_of(xy)[:, order[0]], order, keep)
    joints = c[0, :78].view(13, 6)
    has_column = {0: 2, 1: 3, 2: 5}  # per joint: rel x, rel y, has x, has y, visible, has flag
    for slot in gone.tolist():
        assert joints[slot // 3, has_column[slot % 3]] == 0
    none = skeleton_features(ids_of(xy), pos, torch.zeros(1, 39, dtype=torch.bool))
    assert none[0, :78].abs().sum() == 0 and torch.isfinite(none).all()


def test_pose_context_starts_as_a_no_op_and_learns():
    """Switched on over a trained model (init_from), pose_context changes no logit (its
    output maps, to the skeleton tokens and to the caption queries, start at zero); three
    optimiser steps later it does, for samples with a skeleton among their inputs."""
    batch = _batch(seed=4)
    plain = _model(seed=1, pose_basis=True)
    ctx = _model(seed=2, pose_basis=True, pose_context=True)
    missing, unexpected = ctx.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(
        k.startswith(("pose_context.", "caption_context.")) for k in missing
    )
    plain.eval(), ctx.eval()
    with torch.no_grad():
        a, b = plain(batch)[0], ctx(batch)[0]
    for name in a:
        torch.testing.assert_close(a[name], b[name])
    ctx.train()
    _fit(ctx, batch, 3)
    assert (batch["enc_valid"] & (batch["enc_mod"] == ctx.names.index("coords"))).any()
    ctx.eval()
    with torch.no_grad():
        c = ctx(batch)[0]
        for layer in (ctx.pose_context[2], ctx.caption_context):
            layer.weight.zero_()
            layer.bias.zero_()
        d = ctx(batch)[0]
    assert any(not torch.allclose(c[n], d[n]) for n in c)  # the learned context is used


def test_action_head_learns_the_action_from_the_skeleton_shape():
    """action_classes: the auxiliary head on the pose context classifies the action from the
    input skeleton's shape wherever it stands; samples without a skeleton input or with an
    unknown action (-1) get no loss; a config without pose_context is refused."""
    from m2core.model import ACTION_LOSS_WEIGHT

    with pytest.raises(ValueError, match="needs pose_context"):
        M2Config(**SMALL, action_classes=3)
    rng = np.random.default_rng(11)
    shapes = rng.uniform(-0.1, 0.1, (3, 13, 2))  # one skeleton shape per action
    cfg = MaskingConfig(input_budget=48, target_budget=16,
                        alpha_sets=(AlphaSet({"coords": 1.0}, {"coords_next": 1.0}),))  # fmt: skip

    def batch(n, seed):
        g = np.random.default_rng(seed)
        samples = []
        for _ in range(n):
            s = random_sample(g, 64, 300, 16)
            a = int(g.integers(3))
            xy = 0.5 + g.uniform(-0.3, 0.3, 2) + shapes[a] * g.uniform(0.7, 1.5)
            s["coords"][0::3] = np.floor(xy[:, 0] * 8192)
            s["coords"][1::3] = np.floor(xy[:, 1] * 8192)
            s["coords"][2::3] = 8193
            s["action"] = np.int64(a)
            samples.append(mask_sample(s, cfg, g))
        return collate(samples)

    train, held_out = batch(48, 0), batch(32, 1)
    assert train["action"].shape == (48,)
    model = _model(pose_basis=True, pose_context=True, action_classes=3)
    model.train()
    opt = torch.optim.AdamW(model.optimizer_groups(0.0), lr=3e-3)
    for _ in range(60):
        _, loss = model(train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits, loss = model(held_out)
        assert (logits["action"].argmax(-1) == held_out["action"]).float().mean() >= 0.9
        unlabelled = {**held_out, "action": torch.full_like(held_out["action"], -1)}
        logits2, loss2 = model(unlabelled)
    assert "action" not in logits2
    ce = F.cross_entropy(logits["action"], held_out["action"])
    torch.testing.assert_close(loss - loss2, ACTION_LOSS_WEIGHT * ce)


def test_image_context_reads_fsq_codes_in_a_window_around_the_person():
    """Token ids become the image tokenizer's own FSQ code values; the window is the 8x8
    block around the centre, moved by the shift and kept inside the 16x16 grid; a vocabulary
    that is not levels ** digits is a config error."""
    from m2core.model import ImageContext
    from m2core.tokenizers.image import FSQ

    ctx = ImageContext(8, 4096, 32)
    ids = torch.arange(4096)
    assert torch.allclose(ctx.codes, FSQ((8, 8, 8, 8)).ids_to_codes(ids))
    grid = torch.arange(256).view(1, 256).repeat(3, 1)
    centre = torch.tensor([[0.5, 0.5], [0.0, 0.0], [0.99, 0.2]])
    win = ctx.window(grid, centre)
    assert torch.equal(win[0], torch.arange(256).view(16, 16)[4:12, 4:12])
    assert torch.equal(win[1], torch.arange(256).view(16, 16)[0:8, 0:8])  # kept inside
    assert torch.equal(win[2], torch.arange(256).view(16, 16)[0:8, 8:16])
    moved = ctx.window(grid, centre, torch.tensor([[1, -1], [0, 0], [0, 0]]))
    assert torch.equal(moved[0], torch.arange(256).view(16, 16)[3:11, 5:13])
    assert ctx(grid % 4096, centre).shape == (3, 32)
    with pytest.raises(ValueError, match="image_context_levels"):
        M2Config.from_preset("tiny", pose_context=True, action_classes=3, image_context_levels=7)
    with pytest.raises(ValueError, match="image_context_levels"):
        M2Config.from_preset("tiny", image_context_levels=8)  # needs the action head


def test_encode_and_caption_bias_take_another_context_hidden():
    """`context_hidden` replaces the pose context's hidden layer computed from the input
    skeleton (generation passes the image context's): its own hidden gives the same
    context and caption bias, another one changes both."""
    batch = _batch(seed=4)
    model = _model(seed=2, pose_basis=True, pose_context=True).eval()
    for layer in (model.pose_context[2], model.caption_context):
        torch.nn.init.normal_(layer.weight, std=0.2)
    slots = (batch["enc_ids"], batch["enc_mod"], batch["enc_pos"], batch["enc_valid"])
    with torch.no_grad():
        own, _ = model.skeleton_hidden(*slots)
        base, same = model.encode(*slots)[0], model.encode(*slots, None, own)[0]
        torch.testing.assert_close(base, same)
        torch.testing.assert_close(model.caption_bias(*slots), model.caption_bias(*slots, own))
        other = torch.randn_like(own)
        assert not torch.allclose(model.encode(*slots, None, other)[0], base)
        assert not torch.allclose(model.caption_bias(*slots, other), model.caption_bias(*slots))


@pytest.mark.parametrize("basis", [False, True])
def test_pose_head_logits_match_their_definition_and_is_flag_computes_one_kind(basis):
    """head_logits on a future skeleton, against the definition written out per bin: the
    head's logits; plus, on a coordinate slot, copy_gain * exp(-(offset / width)^2 / 2),
    the offset head's logit within its reach and -|offset - mu| / b; on a flag slot,
    copy_gain on the present flag. With is_flag, each slot's logits of its own kind are the
    same and the rest are -inf."""
    from m2core.model import _COPY_WIDTH, _MAX_OFFSET, _SHIFT_GAIN, _SHIFT_UNIT

    model = _model(pose_shift=True, pose_basis=basis).double()
    with torch.no_grad():
        for p in [*model.offset_heads.parameters(), *model.shift_heads.parameters()]:
            p.normal_(0.0, 0.1)
    name, n = "coords_next", 12
    torch.manual_seed(0)
    h = torch.randn(n, SMALL["dim"], dtype=torch.float64)
    is_flag = torch.arange(n) % 3 == 2
    prior = torch.where(is_flag, 8192 + torch.arange(n) % 2, torch.tensor([0, 40, 8191, 5000] * 3))
    prior[4] = -1  # a slot without a present token gets no bonus
    gain = model.copy_gain[name]
    with torch.no_grad():
        want = model.pose_logits(name, h).clone()
        rel = model.offset_heads[name](h)
        raw = model.shift_heads[name](h).float() * _SHIFT_GAIN  # the shift is float32
        for i in range(n):
            if prior[i] < 0:
                continue
            if is_flag[i]:
                want[i, prior[i]] += gain
                continue
            offset = torch.arange(8192, dtype=torch.float64) - prior[i]
            reach = offset.abs() <= _MAX_OFFSET
            want[i, :8192] += gain * torch.exp(-0.5 * (offset / _COPY_WIDTH) ** 2)
            want[i, :8192][reach] += rel[i, (offset[reach] + _MAX_OFFSET).long()]
            b = _SHIFT_UNIT * raw[i, 1].clamp(-5, 5).exp()
            want[i, :8192] -= (offset.float() - raw[i, 0] * _SHIFT_UNIT).abs() / b
        got = model.head_logits(name, h, prior)
        # float32 in the shift term: mu and b are computed in float32
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        one_kind = model.head_logits(name, h, prior, is_flag)
    own = is_flag[:, None] == (torch.arange(8194) >= 8192)[None]
    assert torch.isinf(one_kind[~own]).all() and (one_kind[~own] < 0).all()
    torch.testing.assert_close(one_kind[own], want[own], rtol=0, atol=1e-6)


def test_motion_head_moves_the_centre_of_the_future_prior():
    """motion_bins turns the head's displacements (in skeleton extents) into bins on every
    future x / y slot (0 on flags, NaN for a sample with no skeleton); head_logits with a
    motion is head_logits with each coordinate's present bin moved by it, and NaN changes
    nothing. A motion head needs the present prior."""
    with pytest.raises(ValueError, match="motion_width"):
        M2Config(**SMALL, motion_width=16, present_prior=False)
    model = _model(pose_shift=True, pose_basis=True, motion_width=16).eval()
    with torch.no_grad():
        for p in [*model.offset_heads.parameters(), *model.shift_heads.parameters()]:
            p.normal_(0.0, 0.1)
        last = model.motion[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.25, -0.5]).repeat(6 * 13))  # every joint: +x, -y
    xy = torch.tensor([[1000, 2000], [3000, 6000]]).repeat(7, 1)[:13]  # extent: 4000 bins
    coords = torch.cat([xy, torch.full((13, 1), 8193)], 1).flatten()[None]  # all visible
    coords = torch.cat([coords, torch.full_like(coords, -1)])  # the second: no skeleton
    pos = torch.arange(39).expand(2, 39)
    with torch.no_grad():
        move = model.motion_bins(coords, pos, coords >= 0)
    assert move.shape == (2, 234) and move[1].isnan().all()
    extent = 4000.0  # the larger side of the joints' box (y: 2000 .. 6000)
    torch.testing.assert_close(move[0, 0::3], torch.full((78,), 0.25 * extent), atol=0.5, rtol=0)
    torch.testing.assert_close(move[0, 1::3], torch.full((78,), -0.5 * extent), atol=0.5, rtol=0)
    assert (move[0, 2::3] == 0).all()

    name, n = "coords_next", 9
    torch.manual_seed(1)
    h = torch.randn(n, SMALL["dim"])
    prior = torch.tensor([4000, 100, 8193, 5000, 8000, 8192, 0, 2500, 8193])
    shift = torch.tensor([300.4, -500.0, 0.0, 7.0, 900.0, 0.0, -20.0, float("nan"), 0.0])
    moved = torch.where(
        prior < 8192, (prior + shift.nan_to_num(0).round().long()).clamp(0, 8191), prior
    )
    with torch.no_grad():
        got = model.head_logits(name, h, prior, None, shift)
        torch.testing.assert_close(got, model.head_logits(name, h, moved), rtol=0, atol=0)
        assert not torch.equal(got, model.head_logits(name, h, prior))
        nan = torch.full((n,), float("nan"))
        assert torch.equal(
            model.head_logits(name, h, prior, None, nan), model.head_logits(name, h, prior)
        )


def test_pose_reader_reads_positions_and_keeps_the_flags():
    """The pose reader maps FSQ code values of the whole token grid to 13 positions inside
    the frame (a soft-argmax over cell centres plus at most half a cell); read_pose puts
    their bins in place of a skeleton's x / y and keeps its flags. Its levels must be the
    image vocabulary's."""
    with pytest.raises(ValueError, match="pose_reader_levels"):
        M2Config(**SMALL, pose_reader_levels=3)  # 64 ids are not 3 ** digits
    model = _model(pose_reader_levels=8).eval()  # 64 ids = 8 ** 2
    torch.testing.assert_close(model.pose_reader.codes[:9, 0], torch.tensor([-1, -.75, -.5, -.25, 0, .25, .5, .75, -1]))  # fmt: skip
    rgb = torch.randint(0, 64, (3, 256))
    coords = torch.randint(0, 8192, (3, 13, 3))
    coords[..., 2] = torch.randint(8192, 8194, (3, 13))
    coords = coords.flatten(1)
    with torch.no_grad():
        xy = model.pose_reader(rgb)
        read = model.read_pose(rgb, coords).view(3, 13, 3)
    assert xy.shape == (3, 13, 2) and ((xy >= 0) & (xy <= 1)).all()
    assert torch.equal(read[..., 2], coords.view(3, 13, 3)[..., 2])
    assert torch.equal(read[..., :2], (xy * 8192).floor().long())


def test_pose_reader_flag_head_gives_the_flags():
    """With pose_reader_flags the reader also gives each joint a visibility logit (a map per
    joint averaged under its heat map), and read_pose takes its flags: visible where the
    logit is above 0. Its positions are those of the same reader without the flag head."""
    with pytest.raises(ValueError, match="pose_reader_flags needs pose_reader_levels"):
        M2Config(**SMALL, pose_reader_flags=True)
    torch.manual_seed(0)
    model = _model(pose_reader_levels=8, pose_reader_flags=True).eval()
    plain = _model(pose_reader_levels=8).eval()
    state = {
        k: v for k, v in model.state_dict().items() if not k.startswith("pose_reader.visible.")
    }
    plain.load_state_dict(state)
    rgb = torch.randint(0, 64, (3, 256))
    coords = torch.randint(0, 8192, (3, 13, 3))
    coords[..., 2] = 8193  # all visible
    coords = coords.flatten(1)
    with torch.no_grad():
        torch.nn.init.normal_(model.pose_reader.visible.weight, std=1.0)  # logits of both signs
        xy, logits = model.pose_reader.read(rgb)
        read = model.read_pose(rgb, coords).view(3, 13, 3)
        assert torch.equal(xy, plain.pose_reader(rgb))
    assert logits.shape == (3, 13) and (logits > 0).any() and (logits < 0).any()
    assert torch.equal(read[..., 2], torch.where(logits > 0, 8193, 8192))
    assert torch.equal(read[..., :2], (xy * 8192).floor().long())


def test_next_frame_head_keeps_the_present_token_unless_its_guess_wins_by_the_margin():
    """The next-frame head's digits are the FSQ digits of the ids; its heat maps are zero
    for joints not visible and peak at a joint's cell; a token changes to the most likely
    digits only where they beat the present token's by more than the margin (fitted: none
    until the fit, so it copies the frame), and samples whose skeleton was read from the
    frame get their own margin. Its levels must be the image vocabulary's."""
    from m2core.model import pose_points

    with pytest.raises(ValueError, match="next_frame_levels"):
        M2Config(**SMALL, next_frame_levels=3)  # 64 ids are not 3 ** digits
    model = _model(next_frame_levels=8).eval()  # 64 ids = 8 ** 2
    head = model.next_frame
    rgb = torch.randint(0, 64, (3, 256))
    digits = head.digits_of(rgb)
    assert digits.shape == (3, 2, 256) and torch.equal((digits * head.place[:, None]).sum(1), rgb)
    torch.testing.assert_close(head.codes[rgb], (digits.transpose(1, 2) - 4) / 4.0)
    coords = torch.randint(0, 8192, (3, 13, 3))
    coords[..., 2] = 8193
    coords[0, 5, 2] = 8192  # not visible
    coords[1, 2, :2] = torch.tensor([8192 * 3 // 16 + 1, 8192 * 10 // 16 + 1])  # cell (3, 10)
    xy, visible = pose_points(coords.flatten(1))
    assert not visible[0, 5] and visible.sum() == 3 * 13 - 1
    heat = head.heat(xy, visible)
    assert heat[0, 5].abs().max() == 0 and int(heat[1, 2].argmax()) == 10 * 16 + 3
    later = coords.clone()
    later[..., :2] = (later[..., :2] + 300).clamp(max=8191)
    with torch.no_grad():
        head.copy_gain.fill_(0.0)  # untrained guesses then differ from the present token
        lp = head.log_probs(rgb, xy, visible, *pose_points(later.flatten(1)))
        assert lp.shape == (3, 2, 8, 256)
        torch.testing.assert_close(lp.exp().sum(2), torch.ones(3, 2, 256))
        assert torch.equal(model.next_frame_tokens(rgb, coords.flatten(1), later.flatten(1)), rgb)
        best = (lp.argmax(2) * head.place[:, None]).sum(1)
        assert torch.equal(head.decide(lp, rgb, -float("inf")), best)
        gain = lp.max(2).values.sum(1) - lp.gather(2, digits[:, :, None]).squeeze(2).sum(1)
        m = float(gain[best != rgb].median())  # half the changed guesses win by more
        got = head.decide(lp, rgb, m)
        assert torch.equal(got, torch.where(gain > m, best, rgb))
        assert 0 < int((got != rgb).sum()) < int((best != rgb).sum())
        head.margin.fill_(-float("inf"))  # a given skeleton: always the best digits
        read = torch.tensor([True, False, True])  # a read skeleton: margin_read (unfitted: inf)
        both = model.next_frame_tokens(rgb, coords.flatten(1), later.flatten(1), read)
        assert torch.equal(both[read], rgb[read]) and torch.equal(both[~read], best[~read])
