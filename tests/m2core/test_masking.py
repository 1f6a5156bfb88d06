"""Masking: the Dirichlet curriculum's invariants over many random draws."""

import numpy as np
import pytest
import torch

from m2core.masking import (
    BOS_ID,
    IGNORE,
    AlphaSet,
    MaskCollator,
    MaskingConfig,
    collate,
    cosine_schedule,
    mask_sample,
    random_sample,
)
from m2core.modalities import NUM_JOINTS, POSE_BINS, TOKENS_PER_POSE, build_registry

REG = build_registry(64, 300, 32)
NAMES = list(REG)
FUTURE = {NAMES.index("tok_rgb_next"), NAMES.index("coords_next")}


def _draws(n, cfg, seed=0, drop_prob=0.0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        raw = random_sample(rng, 64, 300, 32, caption_tokens=int(rng.integers(0, 31)))
        raw = {k: v for k, v in raw.items() if k == "tok_rgb" or rng.random() >= drop_prob}
        yield raw, mask_sample(raw, cfg, rng)


def _slots(m, side):
    v = m[f"{side}_valid"]
    return list(zip(m[f"{side}_mod"][v].tolist(), m[f"{side}_pos"][v].tolist(), strict=True))


def test_budgets_disjointness_and_contents_over_many_draws():
    cfg = MaskingConfig(input_budget=128, target_budget=128)
    for raw, m in _draws(400, cfg, drop_prob=0.2):
        enc, dec = _slots(m, "enc"), _slots(m, "dec")
        assert len(enc) <= 128 and len(dec) <= 128
        assert len(set(enc)) == len(enc) and len(set(dec)) == len(dec)
        assert not set(enc) & set(dec), "a token is both input and target"
        assert not {mod for mod, _ in enc} & FUTURE, "a future modality became an input"
        # valid slots come first, grouped by modality in registry order
        assert m["enc_valid"].tolist() == sorted(m["enc_valid"].tolist(), reverse=True)
        assert list(m["dec_mod"][m["dec_valid"]]) == sorted(m["dec_mod"][m["dec_valid"]])
        for (mod, pos), tok in zip(enc, m["enc_ids"][m["enc_valid"]], strict=True):
            ids = raw[NAMES[mod]]
            assert ids[pos] == tok
            if NAMES[mod] == "captions":
                assert pos > 0 and ids[pos] != 0, "bos or padding used as a caption input"
        labels, query = m["dec_labels"][m["dec_valid"]], m["dec_query"][m["dec_valid"]]
        for (mod, pos), y, q in zip(dec, labels, query, strict=True):
            ids = raw[NAMES[mod]]
            if NAMES[mod] == "captions":
                assert pos > 0 and ids[pos] != 0 and y == ids[pos]
            else:  # a normal target (mask-token query) or a revealed one (no loss)
                assert (q == -1 and y == ids[pos]) or (q == ids[pos] and y == IGNORE)
        assert (m["dec_labels"][~m["dec_valid"]] == IGNORE).all()


def test_slots_are_filled_whenever_tokens_exist():
    """Leftover budget is redistributed: fill = min(budget, tokens the alphas allow)."""
    cfg = MaskingConfig(
        input_budget=128,
        target_budget=128,
        alpha_sets=(AlphaSet({"coords": 1.0, "captions": 0.1}, {"captions": 3.0, "coords": 0.1}),),
    )
    fills = []
    for raw, m in _draws(300, cfg, seed=1):
        n_cap = int((raw["captions"][1:] != 0).sum())
        avail = 39 + n_cap  # only coords and captions are allowed; far below 128
        n_in, n_t = int(m["enc_valid"].sum()), int(m["dec_valid"].sum())
        assert n_in == avail, "input slots left empty although tokens remained"
        assert n_t == 0  # every allowed token was taken as an input
        fills.append(n_in)
    # and with the default alphas on full samples, every slot is used
    for _, m in _draws(300, MaskingConfig(), seed=2):
        assert m["enc_valid"].all() and m["dec_valid"].all()


def test_target_slots_filled_after_inputs():
    cfg = MaskingConfig(
        input_budget=16,
        target_budget=128,
        alpha_sets=(AlphaSet({"coords": 1.0}, {"coords": 5.0, "captions": 0.01}),),
    )
    for raw, m in _draws(200, cfg, seed=3):
        n_cap = int((raw["captions"][1:] != 0).sum())
        assert m["enc_valid"].sum() == 16
        assert m["dec_valid"].sum() == min(128, 39 - 16 + n_cap)


def test_alphas_bias_the_shares():
    def mean_counts(inputs, targets):
        cfg = MaskingConfig(32, 64, (AlphaSet(inputs, targets),), reveal_prob=0.0)
        counts = np.zeros((2, len(NAMES)))
        for _, m in _draws(300, cfg, seed=4):
            counts[0] += np.bincount(m["enc_mod"][m["enc_valid"]], minlength=len(NAMES))
            counts[1] += np.bincount(m["dec_mod"][m["dec_valid"]], minlength=len(NAMES))
        return counts / 300

    rgb, xy, rgb_n, xy_n = (
        NAMES.index(n) for n in ("tok_rgb", "coords", "tok_rgb_next", "coords_next")
    )
    a = mean_counts({"tok_rgb": 5.0, "coords": 0.2}, {"tok_rgb_next": 5.0, "coords_next": 0.2})
    b = mean_counts({"tok_rgb": 0.2, "coords": 5.0}, {"tok_rgb_next": 0.2, "coords_next": 5.0})
    assert a[0, rgb] > 25 > b[0, rgb] and b[0, xy] > 20 > a[0, xy]
    assert a[1, rgb_n] > 50 > b[1, rgb_n] and b[1, xy_n] > 50 > a[1, xy_n]


def test_caption_target_is_a_causal_span_with_a_start_marker():
    cfg = MaskingConfig(8, 32, (AlphaSet({"tok_rgb": 1.0, "captions": 1.0}, {"captions": 1.0}),))
    cap = NAMES.index("captions")
    seen = 0
    for raw, m in _draws(200, cfg, seed=5):
        sel = m["dec_valid"] & (m["dec_mod"] == cap)
        if not sel.any():
            continue
        seen += 1
        pos, q, y = m["dec_pos"][sel], m["dec_query"][sel], m["dec_labels"][sel]
        assert (np.diff(pos) == 1).all(), "caption targets are not contiguous"
        assert q[0] == BOS_ID and (q[1:] == y[:-1]).all(), "not teacher-forced"
        assert (y == raw["captions"][pos]).all()
    assert seen > 150


def test_reveal_follows_the_cosine_schedule():
    cfg = MaskingConfig(
        16, 128, (AlphaSet({"tok_rgb": 1.0}, {"tok_rgb_next": 1.0}),), reveal_prob=1.0
    )
    shown = []
    for _, m in _draws(300, cfg, seed=6):
        v = m["dec_valid"]
        assert (m["dec_labels"][v] != IGNORE).sum() >= 1  # at least one token to learn
        shown.append((m["dec_query"][v] >= 0).mean())
    # E[1 - cos(pi u / 2)] = 1 - 2 / pi for u ~ U(0, 1)
    assert abs(np.mean(shown) - (1 - 2 / np.pi)) < 0.05
    assert cosine_schedule(0.0) == 1.0 and abs(cosine_schedule(1.0)) < 1e-12


def test_same_generator_state_gives_the_same_masks():
    raw = random_sample(np.random.default_rng(0), 64, 300, 32)
    a = mask_sample(raw, MaskingConfig(), np.random.default_rng(7))
    b = mask_sample(raw, MaskingConfig(), np.random.default_rng(7))
    c = mask_sample(raw, MaskingConfig(), np.random.default_rng(8))
    assert all((a[k] == b[k]).all() for k in a)
    assert any((a[k] != c[k]).any() for k in a)


def test_bad_samples_and_configs_are_refused():
    rng = np.random.default_rng(0)
    raw = random_sample(rng, 64, 300, 32)
    with pytest.raises(ValueError, match="unknown modality"):
        mask_sample({**raw, "depth": raw["tok_rgb"]}, MaskingConfig(), rng)
    with pytest.raises(ValueError, match="tok_rgb"):
        mask_sample({**raw, "tok_rgb": raw["tok_rgb"][:100]}, MaskingConfig(), rng)
    with pytest.raises(ValueError, match="bos"):
        mask_sample({**raw, "captions": raw["captions"][1:]}, MaskingConfig(), rng)
    with pytest.raises(ValueError, match="cannot be an input"):
        AlphaSet({"coords_next": 1.0}, {"coords": 1.0})
    with pytest.raises(ValueError, match="unknown masking config key"):
        MaskingConfig.from_dict({"input_budget": 8, "budget": 3})
    cfg = MaskingConfig.from_dict(MaskingConfig().to_dict())
    assert cfg == MaskingConfig()


def test_collator_in_a_dataloader():
    rng = np.random.default_rng(0)
    data = [random_sample(rng, 64, 300, 32) for _ in range(6)]
    loader = torch.utils.data.DataLoader(
        data, batch_size=3, collate_fn=MaskCollator(MaskingConfig(), seed=1)
    )
    batches = list(loader)
    assert len(batches) == 2
    b = batches[0]
    assert b["enc_ids"].shape == (3, 128) and b["dec_labels"].dtype == torch.int64
    assert b["enc_valid"].dtype == torch.bool
    assert collate([mask_sample(d, MaskingConfig(), rng) for d in data])["dec_query"].shape == (
        6,
        128,
    )


def test_future_targets_carry_the_present_token_at_their_position():
    rng = np.random.default_rng(5)
    for _ in range(50):
        sample = random_sample(rng, 64, 300, 16)
        out = mask_sample(sample, MaskingConfig(), rng)
        names = list(build_registry(64, 300, 16))
        for slot in np.flatnonzero(out["dec_valid"]):
            name, pos = names[out["dec_mod"][slot]], out["dec_pos"][slot]
            if name == "coords_next":
                assert out["dec_prior"][slot] == sample["coords"][pos % 39]
            elif name == "tok_rgb_next":
                assert out["dec_prior"][slot] == sample["tok_rgb"][pos]
            else:
                assert out["dec_prior"][slot] == -1
        assert (out["dec_prior"][~out["dec_valid"]] == -1).all()


def test_an_action_label_passes_through_to_the_batch():
    """`action` is a label, not a modality: one int64 per sample, untouched by masking."""
    rng = np.random.default_rng(0)
    cfg = MaskingConfig(input_budget=32, target_budget=32)
    samples = [{**random_sample(rng, 64, 300, 32), "action": np.int64(a)} for a in (4, -1)]
    batch = collate([mask_sample(s, cfg, rng) for s in samples])
    assert batch["action"].tolist() == [4, -1] and batch["action"].dtype == torch.int64
    assert "action" not in collate([mask_sample(random_sample(rng, 64, 300, 32), cfg, rng)])


def test_read_noise_moves_the_present_skeleton_everywhere_it_enters_but_no_target():
    """Step 6: the noised present skeleton is what the inputs, `present_pose` and the future
    priors carry, as the chain's forecast starts from the skeleton it read; flags, targets
    and `future_pose` stay true; a sample that has the skeleton as a target is left alone."""
    sigma = (0.05,) * NUM_JOINTS
    forecast = AlphaSet({"tok_rgb": 1.0, "coords": 1.0}, {"coords_next": 1.0})
    reading = AlphaSet({"tok_rgb": 1.0}, {"coords": 1.0})
    noisy_cfg = MaskingConfig(64, 128, (forecast,), 0.0, sigma, 1.0)
    coords, nxt = NAMES.index("coords"), NAMES.index("coords_next")
    rng = np.random.default_rng(0)
    moved, shown = [], 0
    for _ in range(60):
        raw = random_sample(rng, 64, 300, 32)
        m = mask_sample(raw, noisy_cfg, rng)
        noisy = m["present_pose"]
        assert (noisy[2::3] == raw["coords"][2::3]).all()  # flags are not moved
        moved.append((noisy - raw["coords"]).reshape(NUM_JOINTS, 3)[:, :2] / POSE_BINS)
        enc = m["enc_valid"] & (m["enc_mod"] == coords)
        assert (m["enc_ids"][enc] == noisy[m["enc_pos"][enc]]).all()
        shown += int(enc.sum())
        dec = m["dec_valid"] & (m["dec_mod"] == nxt)
        assert (m["dec_prior"][dec] == noisy[m["dec_pos"][dec] % TOKENS_PER_POSE]).all()
        assert (m["dec_labels"][dec] == raw["coords_next"][m["dec_pos"][dec]]).all()
        assert (m["future_pose"] == raw["coords_next"]).all()
        read = mask_sample(raw, MaskingConfig(64, 128, (reading,), 0.0, sigma, 1.0), rng)
        assert (read["present_pose"] == raw["coords"]).all()
    assert shown > 200  # skeleton inputs were checked
    d = np.concatenate(moved)
    assert (np.abs(d) > 0).mean() > 0.9  # nearly every coordinate moved
    # the per-sample scale has mean square 1: the rms is sigma, less a little clipped at edges
    assert 0.035 < float(np.sqrt((d**2).mean())) <= 0.055
    # off (prob 0) draws nothing extra: the same masks as a config without it
    raw = random_sample(rng, 64, 300, 32)
    a = mask_sample(raw, MaskingConfig(read_noise=sigma), np.random.default_rng(3))
    b = mask_sample(raw, MaskingConfig(), np.random.default_rng(3))
    assert all((a[k] == b[k]).all() for k in a)
    with pytest.raises(ValueError, match="13 values"):
        MaskingConfig(read_noise=(0.05,) * 7)
    with pytest.raises(ValueError, match="needs read_noise"):
        MaskingConfig(read_noise_prob=0.5)
    assert MaskingConfig.from_dict(noisy_cfg.to_dict()) == noisy_cfg
