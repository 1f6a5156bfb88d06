"""The format-2 model (m2core/model_v2.py): each adapter learns, every parameter trains,
chained generation, checkpoints, the pose read-out and the config's refusals."""

import math

import numpy as np
import pytest
import torch

from m2core.adapters import Slots, build_adapter
from m2core.adapters.pose import MOVE_SCALE, bin_value
from m2core.chain import Chain, generate
from m2core.checkpoint import load_checkpoint, save_checkpoint
from m2core.generate import GenerationConfig
from m2core.masking import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    AlphaSet,
    MaskingConfig,
    collate,
    mask_sample,
    random_sample,
)
from m2core.modalities import FUTURE_FRAMES, POSE_BINS
from m2core.model_v2 import M2ConfigV2, M2ModelV2

IMAGE_VOCAB, TEXT_VOCAB, CAPTION_LEN, ACTIONS = 64, 300, 12, 5
TINY = {
    "dim": 32,
    "enc_layers": 1,
    "dec_layers": 1,
    "heads": 2,
    "image_levels": (4, 4, 4),
    "text_vocab": TEXT_VOCAB,
    "caption_len": CAPTION_LEN,
    "action_classes": ACTIONS,
    "input_tokens": 64,
    "target_tokens": 64,
}


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return M2ModelV2(M2ConfigV2(**{**TINY, **kw}))


def _raw(rng, action):
    """A random sample with an action, whose future skeletons are the present one moved by
    up to ~4% of the frame (what the future pose adapter is built to learn)."""
    s = random_sample(rng, IMAGE_VOCAB, TEXT_VOCAB, CAPTION_LEN, caption_tokens=CAPTION_LEN - 2)
    s["action"] = np.int64(action)
    nxt = np.tile(s["coords"], 6)
    xy = np.arange(len(nxt)) % 3 != 2
    nxt[xy] = np.clip(nxt[xy] + rng.integers(-300, 300, xy.sum()), 0, POSE_BINS - 1)
    s["coords_next"] = nxt
    return s


def _batch(*sets, n=4, seed=0, reveal=0.0):
    """n samples; sample i is masked with alpha set i % len(sets)."""
    rng = np.random.default_rng(seed)
    cfgs = [MaskingConfig(64, 64, (a,), reveal_prob=reveal) for a in sets]
    return collate(
        [mask_sample(_raw(rng, i % ACTIONS), cfgs[i % len(cfgs)], rng) for i in range(n)]
    )


def _hidden(model, batch):
    """The forward pass up to the decoder output: -> (context, h (B * T, D))."""
    ctx, cross = model.encode(
        batch["enc_ids"], batch["enc_mod"], batch["enc_pos"], batch["enc_valid"]
    )
    q, mod, pos, valid = batch["dec_query"], batch["dec_mod"], batch["dec_pos"], batch["dec_valid"]
    x = model.embed(q, mod, pos, valid, query=True, prior=batch["dec_prior"])
    return ctx, model.decode(
        x, model.context_kv(ctx), cross, model.target_mask(mod, valid)
    ).flatten(0, 1)


@torch.no_grad()
def _readout(model, batch, name):
    """-> (read-out ids, labels, Slots) of one target modality's slots."""
    ctx, h = _hidden(model, batch)
    q, mod, pos, valid = batch["dec_query"], batch["dec_mod"], batch["dec_pos"], batch["dec_valid"]
    sel, s = model.slots(name, q, mod, pos, valid, batch["dec_prior"])
    ids, conf = model.adapters[name].readout(h[sel], s, ctx)
    assert ((conf >= 0) & (conf <= 1)).all()
    return ids, batch["dec_labels"].flatten()[sel], s


def _mean_losses(model, batch):
    with torch.no_grad():
        parts, _ = model(batch)
    return {k: (total / n).item() for k, (total, n) in parts.items()}


def _fit(model, batch, steps, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        _, loss = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()


# --- 1. each adapter kind overfits one batch ----------------------------------------------


@pytest.mark.parametrize(
    "inputs, target, stem",
    [
        ({"tok_rgb": 1.0}, "tok_rgb_next", 2),
        ({"tok_rgb": 1.0}, "tok_rgb_next", 5),  # a deep stem (residual units) trains too
        ({"coords": 1.0, "captions": 1.0}, "tok_rgb", 2),
    ],
)
def test_image_adapter_overfits_a_batch(inputs, target, stem):
    batch, model = _batch(AlphaSet(inputs, {target: 1.0})), _model(stem_layers=stem)
    before = _mean_losses(model, batch)
    assert set(before) == {target}
    _fit(model, batch, 100)
    after = _mean_losses(model, batch)
    assert after[target] < 0.3 * before[target], (before, after)
    ids, labels, _ = _readout(model, batch, target)
    assert len(ids) == 4 * 64
    assert (ids == labels).float().mean() > 0.6


def test_pose_adapter_overfits_a_batch():
    batch, model = (
        _batch(AlphaSet({"tok_rgb": 1.0}, {"coords": 1.0, "coords_next": 1.0}), n=2),
        _model(),
    )
    before = _mean_losses(model, batch)
    assert set(before) == {"coords", "coords_next"}
    _fit(model, batch, 200)
    after = _mean_losses(model, batch)
    for name in ("coords", "coords_next"):  # Laplace NLL (and flag BCE), nats per slot
        assert after[name] < before[name] - 1.5, (name, before, after)
        ids, labels, s = _readout(model, batch, name)
        xy = s.pos % 3 != 2
        err = (bin_value(ids[xy]) - bin_value(labels[xy])).abs()  # frame units
        assert err.median() < 0.01, (name, err.median())
        assert (err < 0.02).float().mean() > 0.75, (name, (err < 0.02).float().mean())
        assert (ids[~xy] == labels[~xy]).float().mean() > 0.7, name  # visibility flags


def test_read_ce_trains_the_attention_onto_the_true_cell_line():
    """With read_ce the frame read-out's attention, summed per column / row, is pulled onto
    the true value's two nearest cell lines; spread evenly it scores log(16) or more."""
    batch, model = _batch(AlphaSet({"tok_rgb": 1.0}, {"coords": 1.0}), n=2), _model(read_ce=1.0)
    pose = model.adapters["coords"]

    def line_ce():
        with torch.no_grad():
            ctx, h = _hidden(model, batch)
            q, mod, pos, valid = (
                batch[k] for k in ("dec_query", "dec_mod", "dec_pos", "dec_valid")
            )
            sel, s = model.slots("coords", q, mod, pos, valid)
            labels = batch["dec_labels"].flatten()[sel]
            xy = (labels >= 0) & (labels < POSE_BINS)
            return pose.line_ce(pose.attend(h[sel], s, ctx), bin_value(labels))[xy].mean().item()

    torch.nn.init.zeros_(pose.query_key.weight)  # every cell alike
    assert line_ce() >= math.log(16) - 1e-4  # log(16) when the visible cells fill each line alike
    _fit(model, batch, 150)
    assert line_ce() < 1.0
    ids, labels, s = _readout(model, batch, "coords")
    xy = s.pos % 3 != 2
    assert (bin_value(ids[xy]) - bin_value(labels[xy])).abs().median() < 0.01


def test_read_heat_learns_the_joints_from_frames_alone_and_steers_the_read_out():
    """With read_heat a step's extra frames (training's read_batch) train a heat map per
    joint over the frame's input embedding, with no trunk pass; the trunk's read-out adds it
    to its attention, so even with that attention flat it reads the joints where they are."""
    raw = _raw(np.random.default_rng(0), 0)
    cfg = MaskingConfig(256, 64, (AlphaSet({"tok_rgb": 1.0}, {"coords": 1.0}),))
    batch = collate([mask_sample(raw, cfg, np.random.default_rng(1))])  # the whole frame in
    frames = {"read_rgb": torch.tensor(raw["tok_rgb"])[None],
              "read_pose": torch.tensor(raw["coords"])[None]}  # fmt: skip
    model = _model(read_ce=1.0, read_heat=True)
    parts, _ = model({**batch, **frames})
    assert set(parts) == {"coords", "coords_heat"} and int(parts["coords_heat"][1]) == 26
    assert "coords_heat" not in model(batch)[0]  # no extra frames, no term
    pose = model.adapters["coords"]

    def read_error():
        ids, labels, s = _readout(model, batch, "coords")
        xy = s.pos % 3 != 2
        return (bin_value(ids[xy]) - bin_value(labels[xy])).abs().median().item()

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(300):  # the heat map's own term only
        total, n = pose.heat_loss(model.frame_embedding(frames["read_rgb"]), frames["read_pose"])
        opt.zero_grad()
        (total / n).backward()
        opt.step()
    torch.nn.init.zeros_(pose.query_key.weight)  # the trunk's own attention: flat
    torch.nn.init.zeros_(pose.coord_out.weight)  # and no regressed offset
    assert read_error() < 0.03  # under half a 1/16 cell
    torch.nn.init.zeros_(pose.heat.weight)
    torch.nn.init.zeros_(pose.heat.bias)
    assert read_error() > 0.1  # flat: every joint at the frame's centre


def test_text_adapter_overfits_a_batch():
    batch, model = _batch(AlphaSet({"tok_rgb": 1.0}, {"captions": 1.0})), _model()
    before = _mean_losses(model, batch)
    assert set(before) == {"captions"}
    _fit(model, batch, 80)
    after = _mean_losses(model, batch)
    assert after["captions"] < 0.2 * before["captions"], (before, after)
    ids, labels, _ = _readout(model, batch, "captions")
    assert len(ids) == 4 * (CAPTION_LEN - 1)  # every token after bos, eos included
    assert (ids == labels).float().mean() > 0.9


def test_a_caption_follows_the_action_its_queries_carry_only_with_caption_action():
    """Captions whose one word is the clip's action, from a frame of noise with no action
    among the encoder inputs: only queries that carry the action can learn the word, and
    generate then captions each given action with its own word."""
    rng = np.random.default_rng(0)
    raws = []
    for i in range(2 * ACTIONS):
        s = _raw(rng, i % ACTIONS)
        s["captions"] = np.full(CAPTION_LEN, PAD_ID, np.int64)
        s["captions"][:3] = BOS_ID, 10 + i % ACTIONS, EOS_ID
        raws.append(s)
    cfg = MaskingConfig(64, 64, (AlphaSet({"tok_rgb": 1.0}, {"captions": 1.0}),))
    batch = collate([mask_sample(r, cfg, rng) for r in raws])
    rgb = torch.tensor(np.stack([r["tok_rgb"] for r in raws[:ACTIONS]]))
    for caption_action in (False, True):
        model = _model(caption_action=caption_action)
        _fit(model, batch, 60)
        model.eval()
        named = 0
        for shift in range(ACTIONS):  # each frame under every action
            action = (torch.arange(ACTIONS) + shift) % ACTIONS
            r = generate(model, {"tok_rgb": rgb, "action": action}, GenerationConfig(steps=0))
            named += sum(c[:1] == [10 + int(a)] for c, a in zip(r.captions, action, strict=True))
        share = named / ACTIONS**2
        assert share == 1.0 if caption_action else share <= 0.4, (caption_action, share)


def test_label_adapter_overfits_a_batch():
    batch, model = _batch(AlphaSet({"tok_rgb": 1.0}, {"action": 1.0}), n=5), _model()
    before = _mean_losses(model, batch)
    assert set(before) == {"action"}
    _fit(model, batch, 60)
    after = _mean_losses(model, batch)
    assert after["action"] < 0.2 * before["action"], (before, after)
    ids, labels, _ = _readout(model, batch, "action")
    assert labels.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(ids, labels)


# --- 2. every parameter trains --------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {
            "query_shape": True,
            "future_l2": True,
            "stem_layers": 4,
            "caption_action": True,
            "shape_fourier": 16,
            "motion_head": True,
            "motion_dense": True,
            "read_ce": 0.5,
            "read_heat": True,
        },
    ],
)
def test_every_parameter_receives_a_gradient(options):
    """Three samples that together put every modality in as an input and out as a target
    (each set's modalities fit the budgets whole, so the split is not left to chance)."""
    sets = (
        AlphaSet(
            {"coords": 1.0, "captions": 1.0, "action": 1.0},
            {"tok_rgb_next": 1.0, "coords_next": 1.0},
        ),
        AlphaSet({"tok_rgb": 1.0}, {"coords": 1.0, "captions": 1.0, "action": 1.0}),
        AlphaSet({"captions": 1.0}, {"tok_rgb": 1.0}),
    )
    batch, model = _batch(*sets, n=3, reveal=1.0), _model(**options)
    inputs = set(batch["enc_mod"][batch["enc_valid"]].tolist())
    targets = set(batch["dec_mod"][batch["dec_valid"] & (batch["dec_labels"] >= 0)].tolist())
    reg = model.config.registry()
    assert inputs == {model.names.index(n) for n in reg.inputs}
    assert targets == set(range(len(model.names)))
    _, loss = model(batch)
    loss.backward()
    dead = [
        n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)
    ]
    assert not dead, f"parameters without a gradient: {dead}"


# --- 3. chained generation ------------------------------------------------------------------


def _gen_inputs(B=3):
    rng = np.random.default_rng(7)
    raws = [random_sample(rng, IMAGE_VOCAB, TEXT_VOCAB, CAPTION_LEN) for _ in range(B)]
    rgb = torch.tensor(np.stack([r["tok_rgb"] for r in raws]))
    coords = torch.tensor(np.stack([r["coords"] for r in raws]))
    return rgb, coords


def test_chain_generate_shapes_given_inputs_and_seeds():
    model = _model().eval()
    rgb, coords = _gen_inputs()
    coords[1] = -1  # sample 1: no skeleton given
    action = torch.tensor([2, -1, 4])
    cfg = GenerationConfig(steps=2, maskgit_steps=3, temperature=1.0)
    r = generate(model, {"tok_rgb": rgb, "coords": coords, "action": action}, cfg)
    assert r.coords.shape == (3, 39)
    assert r.coords_next.shape == (3, 2, 234)
    assert r.tok_rgb_next.shape == (3, 2, 256)
    assert r.action.shape == (3,)
    conf = r.confidence["coords"]
    assert conf.shape == (3, 39) and ((conf >= 0) & (conf <= 1)).all()
    assert r.confidence["coords_next"].shape == (3, 2, 234)
    assert len(r.captions) == 3
    # given modalities are kept; generated ones are well-formed
    assert torch.equal(r.coords[[0, 2]], coords[[0, 2]])
    assert (conf[[0, 2]] == 1).all()
    assert r.action[0] == 2 and r.action[2] == 4 and 0 <= r.action[1] < ACTIONS
    for pose in (r.coords[1], r.coords_next.reshape(-1)):
        pose = pose.view(-1, 3)
        assert ((pose[:, :2] >= 0) & (pose[:, :2] < POSE_BINS)).all()
        assert ((pose[:, 2] == POSE_BINS) | (pose[:, 2] == POSE_BINS + 1)).all()
    assert ((r.tok_rgb_next >= 0) & (r.tok_rgb_next < IMAGE_VOCAB)).all()
    # same seed, same result
    again = generate(model, {"tok_rgb": rgb, "coords": coords, "action": action}, cfg)
    for key in ("coords", "coords_next", "tok_rgb_next", "action"):
        assert torch.equal(getattr(r, key), getattr(again, key)), key
    assert r.captions == again.captions


@torch.no_grad()
def test_chain_embeds_an_unchanged_input_once_and_encodes_as_the_model():
    model = _model(stem_layers=3).eval()
    rgb, coords = _gen_inputs()
    chain = Chain(model, GenerationConfig(), [torch.Generator() for _ in range(3)])
    chain.known["tok_rgb"] = (rgb, torch.ones_like(rgb, dtype=torch.bool))
    embedded = []
    real = model.embed
    model.embed = lambda *a, **k: embedded.append(model.names[int(a[1][0, 0])]) or real(*a, **k)
    chain.encode()
    chain.known["coords"] = (coords, torch.ones_like(coords, dtype=torch.bool))
    ctx, _ = chain.encode()
    assert embedded == ["tok_rgb", "coords"]  # the frame once, though encoded twice
    mod = torch.cat([torch.full_like(rgb, model.names.index("tok_rgb")),
                     torch.full_like(coords, model.names.index("coords"))], 1)  # fmt: skip
    pos = torch.cat([torch.arange(256).expand(3, -1), torch.arange(39).expand(3, -1)], 1)
    whole, _ = model.encode(torch.cat([rgb, coords], 1), mod, pos, torch.ones_like(mod).bool())
    assert torch.allclose(ctx.context, whole.context, atol=1e-6)


def test_chain_generate_without_future_and_bad_action():
    model = _model().eval()
    rgb, _ = _gen_inputs(2)
    r = generate(model, {"tok_rgb": rgb}, GenerationConfig(steps=0))
    assert r.coords.shape == (2, 39) and r.action.shape == (2,)
    assert r.coords_next.shape == (2, 0, 234) and r.tok_rgb_next.shape == (2, 0, 256)
    assert r.confidence["coords_next"].shape == (2, 0, 234)
    for bad in ([ACTIONS, 0], [0, -2], [0]):
        with pytest.raises(ValueError, match="action"):
            generate(
                model, {"tok_rgb": rgb, "action": torch.tensor(bad)}, GenerationConfig(steps=0)
            )


@pytest.mark.parametrize("caption_action", [False, True])
def test_chain_caption_with_kv_cache_matches_the_teacher_forced_decoder(caption_action):
    """The greedy caption of generate (token by token, keys/values cached) is the argmax
    of the training-time decoder (all queries at once, causal mask) at every position."""
    model = _model(seed=1, caption_action=caption_action).eval()
    rgb, coords = _gen_inputs(2)
    action = torch.tensor([1, 3])
    r = generate(
        model, {"tok_rgb": rgb, "coords": coords, "action": action}, GenerationConfig(steps=0)
    )
    names = model.names
    enc = [(rgb, "tok_rgb"), (coords, "coords"), (action[:, None], "action")]
    ids = torch.cat([x for x, _ in enc], 1)
    mod = torch.cat([torch.full_like(x, names.index(n)) for x, n in enc], 1)
    pos = torch.cat([torch.arange(x.shape[1]).expand_as(x) for x, _ in enc], 1)
    ctx, cross = model.encode(ids, mod, pos, torch.ones_like(ids, dtype=torch.bool))
    for row, caption in enumerate(r.captions):
        target = caption + ([EOS_ID] if len(caption) < CAPTION_LEN - 1 else [])
        query = torch.tensor([[BOS_ID, *target[:-1]]])
        qmod = torch.full_like(query, names.index("captions"))
        qpos = torch.arange(1, query.shape[1] + 1)[None]
        valid = torch.ones_like(query, dtype=torch.bool)
        one = type(ctx)(
            ctx.context[row : row + 1], mod[:1], pos[:1], valid.new_ones(1, ids.shape[1])
        )
        with torch.no_grad():
            x = model.embed(query, qmod, qpos, valid, query=True, action=action[row : row + 1])
            h = model.decode(x, model.context_kv(one), cross, model.target_mask(qmod, valid))
            logits = model.adapters["captions"].logits(h[0])
        logits[:, [PAD_ID, BOS_ID]] = float("-inf")
        assert logits.argmax(-1).tolist() == target


# --- 4. checkpoints -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options", [{}, {"query_shape": True, "shape_fourier": 16, "motion_head": True}]
)
def test_checkpoint_round_trip(tmp_path, options):
    model = _model(seed=3, **options).eval()
    sets = (AlphaSet({"tok_rgb": 1.0, "coords": 1.0, "action": 1.0},
                     {"captions": 1.0, "coords_next": 1.0, "tok_rgb_next": 1.0}),)  # fmt: skip
    batch = _batch(*sets, n=2, reveal=0.5)
    model.set_copy_margin(1.5)  # calibrated at export, it travels in config.json
    assert not [k for k in model.state_dict() if "freqs" in k]  # redrawn, never rounded
    save_checkpoint(tmp_path / "ckpt", model)
    loaded = load_checkpoint(tmp_path / "ckpt").model
    assert type(loaded) is M2ModelV2 and loaded.config == model.config
    assert loaded.adapters["tok_rgb_next"].copy_margin == 1.5
    with torch.no_grad():
        (a, la), (b, lb) = model(batch), loaded(batch)
    assert a.keys() == b.keys() and len(a) == 3
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    torch.testing.assert_close(la, lb, rtol=0, atol=0)


def test_copy_margin_replaces_a_present_token_only_when_beaten_by_it():
    model = _model(seed=4).eval()
    a = model.adapters["tok_rgb_next"]
    torch.manual_seed(0)
    n = 200
    present = torch.randint(0, IMAGE_VOCAB, (n,))
    present[:10] = -1  # no present token: the model's own
    s = Slots(torch.full((n,), -1), torch.arange(n) % 256, torch.zeros(n, dtype=torch.long), 1,
              present)  # fmt: skip
    h = 10 * torch.randn(n, model.config.dim)  # logits that can outweigh the copy bonus
    best, gap = a.copy_gap(h, s)
    plain, _ = a.readout(h, s)
    assert torch.equal(plain, best) and (gap >= 0).all() and torch.isinf(gap[:10]).all()
    changes = gap[10:][gap[10:] > 0]  # the copy bonus makes most of them 0 (no change)
    assert len(changes) > 20
    margin = float(changes.detach().median())
    model.set_copy_margin(margin)
    assert model.config.copy_margin == margin and a.copy_margin == margin
    ids, conf = a.readout(h, s)
    beaten = gap >= margin
    assert 0 < int(beaten.sum()) < n
    assert torch.equal(ids[beaten], best[beaten]) and torch.equal(ids[~beaten], present[~beaten])
    digits = a.digits(present.clamp(min=0))
    logits = a.digit_logits(h, s.present)
    keep_p = torch.stack(
        [o.softmax(-1).gather(1, digits[:, i, None]).squeeze(1) for i, o in enumerate(logits)]
    ).prod(0)  # the present token's probability
    torch.testing.assert_close(conf[~beaten], keep_p[~beaten])
    with pytest.raises(ValueError, match="copy_margin"):
        M2ConfigV2(**{**TINY, "copy_margin": -1.0})


def test_a_model_that_always_copies_skips_the_next_frame_passes_and_changes_nothing(
    monkeypatch,
):
    """At the COPY margin the next key frame is the present one with no decoder pass; a
    margin past every gap (100 nats) runs the passes and must give the same result."""
    from m2core.adapters.image import COPY

    model = _model(seed=5).eval()
    rgb, coords = _gen_inputs()
    coords[1] = -1
    cfg = GenerationConfig(steps=2, maskgit_steps=3, temperature=1.0, seed=[1, 2, 3])
    calls = []
    decode = model.decode
    monkeypatch.setattr(model, "decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    runs = {}
    for margin in (100.0, COPY):
        model.set_copy_margin(margin)
        calls.clear()
        runs[margin] = (generate(model, {"tok_rgb": rgb, "coords": coords}, cfg), len(calls))
    (full, n_full), (copied, n_copied) = runs[100.0], runs[COPY]
    assert n_full - n_copied == cfg.steps * cfg.maskgit_steps
    assert torch.equal(copied.tok_rgb_next[:, 0], rgb)  # the frame, kept through the roll-out
    assert torch.equal(copied.tok_rgb_next[:, 1], rgb)
    for key in ("coords", "coords_next", "tok_rgb_next", "action"):
        assert torch.equal(getattr(full, key), getattr(copied, key)), key
    assert full.captions == copied.captions
    torch.testing.assert_close(full.confidence["coords_next"], copied.confidence["coords_next"])


def test_pick_margin_is_never_below_copying_and_prefers_changing_less():
    from training.calibrate import COPY, pick_margin

    rng = np.random.default_rng(0)
    gaps = rng.exponential(2.0, 5000)
    copy_ok = rng.random(5000) < 0.85
    best_ok = np.where(gaps > 3.0, rng.random(5000) < 0.9, rng.random(5000) < 0.4)
    found = pick_margin(gaps, best_ok, copy_ok)
    assert found["accuracy"] >= found["copying"]
    assert found["accuracy"] == pytest.approx(max(found["by_margin"].values()), abs=1e-5)
    assert 2.0 <= found["copy_margin"] <= 4.0  # where the model's changes start to pay
    # a model that is never right when it changes a token: copy
    assert pick_margin(gaps, np.zeros(5000, bool), copy_ok)["copy_margin"] == COPY
    # a gain within noise is not kept: 100 tokens changed, 52 right where copying was wrong
    # and 48 the other way round (net 4, noise 2 x sqrt(100) = 20): copy
    n = 100_000
    gaps, copy_ok, best_ok = np.zeros(n), np.ones(n, bool), np.ones(n, bool)
    gaps[:100] = 5.0
    copy_ok[:52], best_ok[52:100] = False, False
    assert np.where(gaps >= 5.0, best_ok, copy_ok).mean() > copy_ok.mean()
    assert pick_margin(gaps, best_ok, copy_ok)["copy_margin"] == COPY


# --- 5. pose read-out ---------------------------------------------------------------------


def test_pose_readout_ids_are_valid_bins_and_flags():
    batch, model = (
        _batch(AlphaSet({"tok_rgb": 1.0}, {"coords": 1.0, "coords_next": 1.0}), n=2),
        _model(),
    )
    for scale in (1.0, 100.0):  # also with outputs far outside the frame
        with torch.no_grad():
            for name in ("coords", "coords_next"):
                out = model.adapters[name].coord_out
                out.weight.mul_(scale)
                out.bias.copy_(torch.linspace(-scale, scale, 3))
        for name in ("coords", "coords_next"):
            ids, _, s = _readout(model, batch, name)
            assert len(ids) > 0
            flag = s.pos % 3 == 2
            assert flag.any() and (~flag).any()
            assert ((ids[~flag] >= 0) & (ids[~flag] < POSE_BINS)).all(), (name, scale)
            assert ((ids[flag] == POSE_BINS) | (ids[flag] == POSE_BINS + 1)).all(), (name, scale)


def test_future_pose_with_no_displacement_is_the_present():
    batch, model = _batch(AlphaSet({"tok_rgb": 1.0}, {"coords_next": 1.0}), n=2), _model()
    future = model.adapters["coords_next"]
    with torch.no_grad():
        for p in (*future.coord_out.parameters(), *future.flag_out.parameters()):
            p.zero_()
    ids, _, s = _readout(model, batch, "coords_next")
    assert len(ids) == 2 * 64 and (s.present >= 0).all()
    flag = s.pos % 3 == 2
    assert ((ids[~flag] - s.present[~flag]).abs() <= 1).all()
    assert torch.equal(ids[flag], s.present[flag])  # a future flag starts from the present one


@pytest.mark.parametrize("name", ["coords", "action", "tok_rgb_next", "coords_next"])
def test_generation_query_path_embeds_as_the_batch_path(name):
    """`Slots.block` + `embed_queries` (generation's hot loop) give what `embed` gives for a
    full block of one modality, with some tokens revealed, a present token and skeleton."""
    model, reg = _model(query_shape=True), M2ConfigV2(**TINY).registry()
    B, n, g = 2, reg[name].num_tokens, torch.Generator().manual_seed(0)
    ids = torch.randint(0, reg[name].vocab_size, (B, n), generator=g)
    ids[:, ::2] = -1  # masked
    prior = torch.randint(0, reg[name].vocab_size, (B, n), generator=g)
    pose = torch.randint(0, POSE_BINS, (B, 39), generator=g)
    mod = torch.full((B, n), model.names.index(name))
    pos, valid = torch.arange(n).expand(B, n), torch.ones(B, n, dtype=torch.bool)
    with torch.no_grad():
        slow = model.embed(ids, mod, pos, valid, query=True, prior=prior, present_pose=pose)
        fast = model.embed_queries(name, Slots.block(ids, prior, pose))
    assert torch.equal(slow, fast)


def test_future_queries_carry_the_whole_present_skeleton_only_with_query_shape():
    """With query_shape, a future slot's query changes when another joint of the present
    skeleton moves (the shape); without it, only its own joint's present value enters."""
    rng = np.random.default_rng(3)
    pose = torch.from_numpy(random_sample(rng, IMAGE_VOCAB, TEXT_VOCAB, CAPTION_LEN)["coords"])
    moved = pose.clone()
    moved[0] = (moved[0] + 2000) % POSE_BINS  # the head's x
    pos = torch.tensor([36, 37])  # the right ankle's x and y in the first future frame
    for query_shape, changes in ((False, False), (True, True)):
        future = _model(query_shape=query_shape).adapters["coords_next"]

        def q(p, future=future):
            s = Slots(
                torch.full((2,), -1), pos, torch.zeros(2, dtype=torch.long), 1, p[pos], p[None]
            )
            return future.embed_query(s)

        with torch.no_grad():
            assert (not torch.allclose(q(pose), q(moved))) == changes


def test_future_l2_trains_the_mean_displacement_and_l1_the_median():
    """One future coordinate that moves +0.04 in 3 samples of 5 and -0.04 in 2: L1 settles
    on the median (+0.04), the squared error on the mean (+0.008)."""
    from m2core.adapters.pose import MOVE_SCALE

    torch.manual_seed(0)
    got = {}
    for l2 in (False, True):
        future = _model(future_l2=l2).adapters["coords_next"]
        h = torch.zeros(5, 32)
        present = torch.full((5,), POSE_BINS // 2)
        s = Slots(
            torch.full((5,), -1), torch.zeros(5, dtype=torch.long), torch.arange(5), 5, present
        )
        move = round(0.04 * POSE_BINS)
        labels = present + torch.tensor([move, move, move, -move, -move])
        opt = torch.optim.Adam(future.coord_out.parameters(), lr=0.02)
        for _ in range(400):
            total, n = future.loss(h, s, labels)
            opt.zero_grad()
            (total / n).backward()
            opt.step()
        got[l2] = float(MOVE_SCALE * future.coord_out.bias[0].detach())
    assert abs(got[False] - 0.04) < 0.006, got
    assert abs(got[True] - 0.008) < 0.004, got


def test_motion_head_forecasts_from_the_present_shape_without_the_trunk():
    """Two samples whose skeletons move opposite ways, the trunk's state held at zero: with
    motion_head the adapter alone learns each one's motion from its present skeleton;
    without it both get one displacement (the trunk would have to tell them apart)."""
    rng = np.random.default_rng(5)
    pose = torch.stack([
        torch.from_numpy(random_sample(rng, IMAGE_VOCAB, TEXT_VOCAB, CAPTION_LEN)["coords"])
        for _ in range(2)
    ])  # fmt: skip
    pose[:, 2::3] = POSE_BINS + 1  # every joint visible, so every joint places the shape
    pos = torch.tensor([p for p in range(FUTURE_FRAMES * 39) if p % 3 != 2]).repeat(2)
    row = torch.arange(2).repeat_interleave(len(pos) // 2)
    present = pose[row, pos % 39]
    step = round(0.03 * POSE_BINS)
    labels = (present + torch.where(row == 0, step, -step)).clamp(0, POSE_BINS - 1)
    s = Slots(torch.full_like(pos, -1), pos, row, 2, present, pose)
    err = {}
    for motion_head in (False, True):
        torch.manual_seed(0)
        future = _model(query_shape=True, shape_fourier=16, motion_head=motion_head)
        future = future.adapters["coords_next"]
        h = torch.zeros(len(pos), 32)
        opt = torch.optim.Adam(future.parameters(), lr=3e-3)
        for _ in range(300):
            total, n = future.loss(h, s, labels)
            opt.zero_grad()
            (total / n).backward()
            opt.step()
        with torch.no_grad():
            mu = future.predict(h, s, None)[0]
        err[motion_head] = float((mu - bin_value(labels)).abs().mean())
    assert err[True] < 0.005 < 0.02 < err[False], err  # frame units; a 0.03 move each way


def test_motion_dense_trains_the_motion_path_on_every_future_coordinate():
    """With motion_dense the loss has one more term: the motion path alone against every
    future x and y of every sample, whatever slots the target budget drew; it is the
    path's L1 error, so a path that predicts each sample's motion scores zero."""
    sets = (AlphaSet({"tok_rgb": 1.0}, {"coords": 1.0}),)  # no coords_next target at all
    batch = _batch(*sets, n=3)
    assert batch["future_pose"].shape == (3, FUTURE_FRAMES * 39)
    parts, _ = _model(query_shape=True, motion_head=True)(batch)
    assert set(parts) == {"coords"}
    model = _model(query_shape=True, motion_head=True, motion_dense=True)
    parts, loss = model(batch)
    assert set(parts) == {"coords", "coords_next_whole"}
    total, n = parts["coords_next_whole"]
    assert int(n) == 3 * FUTURE_FRAMES * 26  # every joint of _raw's skeletons has x and y
    present = batch["present_pose"].repeat(1, FUTURE_FRAMES).float()
    future = batch["future_pose"].float()
    xy = torch.arange(FUTURE_FRAMES * 39) % 3 != 2
    standing = 10.0 * ((future - present)[:, xy].abs() / POSE_BINS).sum()
    torch.testing.assert_close(total, standing)  # the path starts at standing still
    loss.backward()
    assert model.adapters["coords_next"].motion.weight.grad.abs().sum() > 0
    # a step's extra skeleton pairs (training's motion_batch) join the same term
    extra = _batch(*sets, n=2)
    pairs = {"motion_present": extra["present_pose"], "motion_future": extra["future_pose"]}
    total2, n2 = model({**batch, **pairs})[0]["coords_next_whole"]
    assert int(n2) == 5 * FUTURE_FRAMES * 26
    more = extra["future_pose"].float() - extra["present_pose"].repeat(1, FUTURE_FRAMES).float()
    torch.testing.assert_close(total2, standing + 10.0 * (more[:, xy].abs() / POSE_BINS).sum())


def test_motion_extent_puts_the_path_in_units_of_the_skeletons_own_size():
    """With motion_extent a path output of 1 moves a joint by the present skeleton's extent
    (the larger side of its visible joints' box), without it by MOVE_SCALE of the frame."""
    batch = _batch(AlphaSet({"tok_rgb": 1.0}, {"coords": 1.0}), n=3)
    pose = batch["present_pose"]
    s = Slots.block(torch.full_like(batch["future_pose"], -1), None, pose)
    j = pose.view(3, 13, 3)
    seen = (j[..., 2] == POSE_BINS + 1)[..., None]
    xy = bin_value(j[..., :2])
    box = torch.where(seen, xy, -1.0).amax(1) - torch.where(seen, xy, 2.0).amin(1)
    extent = box.amax(-1).clamp(min=0.02)
    for on, unit in ((True, extent[:, None]), (False, torch.full((3, 1), MOVE_SCALE))):
        a = _model(query_shape=True, motion_head=True, motion_extent=on).adapters["coords_next"]
        torch.nn.init.constant_(a.motion.bias, 0.1)
        torch.testing.assert_close(a.motion_path(s, torch.float32), 0.1 * unit.expand(-1, 234))


def _fit_path(a, pairs: dict, action: torch.Tensor, steps: int) -> float:
    """Train the adapter's motion path alone on the pairs -> its last mean L1 error (frame
    units)."""
    opt = torch.optim.Adam(a.parameters(), lr=3e-3)
    for _ in range(steps):
        total, n = a.whole_loss(pairs, action)
        opt.zero_grad()
        (total / n).backward()
        opt.step()
    return float(total.detach() / n) / 10.0  # L1_WEIGHT


def test_motion_action_learns_two_futures_of_one_skeleton_from_the_given_action():
    """One present skeleton, two futures told apart only by the action: with motion_action
    the motion path fits both; without it, it can only fit their mean. The action counts
    only where it is an encoder input (given), and a missing one reads as row 0."""
    batch = _batch(AlphaSet({"tok_rgb": 1.0, "coords": 1.0}, {"coords_next": 1.0}), n=2)
    pose = batch["present_pose"][:1].expand(2, -1)
    future = pose.repeat(1, FUTURE_FRAMES).clone()
    xy = torch.arange(FUTURE_FRAMES * 39) % 3 != 2
    future[0, xy] = (future[0, xy] + 400).clamp(max=POSE_BINS - 1)  # one action moves right
    future[1, xy] = (future[1, xy] - 400).clamp(min=0)  # the other left
    pairs = {"present_pose": pose, "future_pose": future}
    action = torch.tensor([1, 2])
    errors = {}
    for on in (True, False):
        a = _model(query_shape=True, motion_head=True, motion_dense=True, motion_action=on)
        errors[on] = _fit_path(a.adapters["coords_next"], pairs, action, 150)
    assert errors[True] < 0.2 * errors[False], errors
    assert errors[False] > 0.5 * 400 / POSE_BINS  # half the gap: the mean of the two
    # unknown (-1) and given actions give different paths; -1 is the same as no action at all
    s = Slots.block(torch.full_like(future, -1), None, pose, torch.tensor([1, -1]))
    model = _model(query_shape=True, motion_head=True, motion_action=True)
    a_on = model.adapters["coords_next"]
    torch.nn.init.normal_(a_on.motion.weight, std=0.1)
    got = a_on.motion_path(s, torch.float32)
    assert not torch.allclose(got[0], got[1])
    none = a_on.motion_path(Slots.block(torch.full_like(future, -1), None, pose), torch.float32)
    torch.testing.assert_close(none[1], got[1])
    # the model passes an action to the path only where the encoder has it as an input
    assert model.given_action(batch).tolist() == [-1, -1]  # inputs: the frame and the skeleton
    steer = _batch(AlphaSet({"action": 1.0}, {"coords_next": 1.0}), n=2)
    assert model.given_action(steer).tolist() == steer["action"].tolist() == [0, 1]


# --- 6. config ------------------------------------------------------------------------------


def test_config_rejects_bad_values():
    M2ConfigV2(**TINY)  # the baseline is fine
    with pytest.raises(ValueError, match="shape_fourier"):
        M2ConfigV2(**TINY, shape_fourier=-1)
    with pytest.raises(ValueError, match="query_shape"):
        M2ConfigV2(**TINY, motion_head=True)
    with pytest.raises(ValueError, match="motion_head"):
        M2ConfigV2(**TINY, query_shape=True, motion_dense=True)
    with pytest.raises(ValueError, match="motion_head"):
        M2ConfigV2(**TINY, query_shape=True, motion_extent=True)
    with pytest.raises(ValueError, match="motion_head"):
        M2ConfigV2(**TINY, query_shape=True, motion_action=True)
    with pytest.raises(ValueError, match="format"):
        M2ConfigV2(**TINY, format=1)
    with pytest.raises(ValueError, match="format"):
        M2ConfigV2.from_dict({**TINY, "format": 1})
    for levels in ((), (0, 8), (1, 64), (-4, -4)):  # an FSQ digit needs >= 2 levels
        with pytest.raises(ValueError, match="image"):
            M2ConfigV2(**{**TINY, "image_levels": levels})
    # an image adapter whose levels' product disagrees with its modality's vocabulary
    reg = M2ConfigV2(**TINY).registry()
    with pytest.raises(ValueError, match="do not multiply"):
        build_adapter(reg["tok_rgb"], 32, image_levels=(4, 4))
    with pytest.raises(ValueError, match="unknown model config keys"):
        M2ConfigV2.from_dict({**TINY, "image_vocab": 64})
    with pytest.raises(ValueError, match="heads"):
        M2ConfigV2(**{**TINY, "heads": 3})
    with pytest.raises(ValueError, match="stem_layers"):
        M2ConfigV2(**{**TINY, "stem_layers": 1})
    for bad in (0, -1):
        with pytest.raises(ValueError, match="action_classes"):
            M2ConfigV2(**{**TINY, "action_classes": bad})
    cfg = M2ConfigV2(**TINY)
    assert M2ConfigV2.from_dict(cfg.to_dict()) == cfg
