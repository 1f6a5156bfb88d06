"""In-domain statistics: the threshold is a held-out quantile, a shifted distribution is
flagged, the file round-trips and a damaged one is refused, the served ids are unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from m2core.in_domain import DomainCheck, encode_with_features, skeleton_features
from m2core.tokenizers.image import ImageTokenizer, ImageTokenizerConfig


def _gauss(n: int, f: int = 6, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    mix = np.random.default_rng(99).normal(size=(f, f)) * 0.3 + np.eye(f)  # correlated features
    return np.random.default_rng(seed).normal(size=(n, f)) @ mix + shift


def test_threshold_is_the_quantile_of_frames_the_bank_does_not_hold():
    check = DomainCheck.fit(_gauss(4000), "gauss", quantile=0.95)
    assert len(check.bank) == 2000 and check.frames == 4000
    fresh = check.distance(_gauss(4000, seed=1))
    assert 0.03 < np.mean(fresh > check.threshold) < 0.07
    shifted = check.distance(_gauss(500, shift=3.0, seed=2))
    assert np.mean(shifted > check.threshold) > 0.95


def test_too_few_frames_for_the_features_is_refused():
    with pytest.raises(ValueError, match="at least 48 calibration frames"):
        DomainCheck.fit(_gauss(40), "few")


def test_a_constant_feature_does_not_break_the_whitening():
    feats = _gauss(400)
    feats[:, 0] = 13.0  # every calibration frame shows all 13 joints
    check = DomainCheck.fit(feats, "constant")
    assert np.isfinite(check.threshold) and np.isfinite(check.distance(feats[:5])).all()
    moved = feats[:5].copy()
    moved[:, 0] = 0.0
    assert (check.distance(moved) > check.threshold).all()


def test_statistics_round_trip_through_the_file(tmp_path):
    check = DomainCheck.fit(_gauss(400, f=8), "synthetic test clips")
    path = check.save(tmp_path)
    assert path.name == "in_domain.safetensors"
    assert not list(tmp_path.glob(".in_domain*"))  # no temporary left
    back = DomainCheck.load(tmp_path)
    assert back.source == "synthetic test clips" and back.k == check.k
    img, skel = _gauss(5, f=3, seed=5), _gauss(5, f=5, seed=6)
    np.testing.assert_allclose(back.score(img, skel), check.score(img, skel), rtol=1e-4)


def test_absent_statistics_are_none_and_damaged_ones_name_the_file(tmp_path):
    assert DomainCheck.load(tmp_path) is None
    (tmp_path / "in_domain.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"in_domain\.safetensors: cannot read"):
        DomainCheck.load(tmp_path)
    save_file(
        {"mean": torch.zeros(2)}, str(tmp_path / "in_domain.safetensors"), metadata={"format": "x"}
    )
    with pytest.raises(ValueError, match="expected format"):
        DomainCheck.load(tmp_path)


def test_skeleton_features_count_visible_joints_and_do_not_depend_on_size():
    # a standing figure in Penn Action's order: head, shoulders, elbows, wrists, hips, knees, ankles
    x = [0.5, 0.45, 0.55, 0.42, 0.58, 0.40, 0.60, 0.46, 0.54, 0.46, 0.54, 0.46, 0.54]
    y = [0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5, 0.55, 0.55, 0.7, 0.7, 0.85, 0.85]
    one = np.stack([x, y, np.ones(13)], 1)
    j = np.stack([one, one + np.array([0.01, -0.02, 0])])
    j[1, :4, 2] = 0
    f = skeleton_features(j)
    assert f.shape == (2, 16) and list(f[:, 0]) == [13, 9]
    small = j.copy()
    small[..., :2] = 0.5 + (j[..., :2] - 0.5) * 0.5
    g = skeleton_features(small)
    np.testing.assert_allclose(g[:, 1], f[:, 1] + np.log(0.5), atol=0.01)  # the torso halves
    np.testing.assert_allclose(g[:, 2:], f[:, 2:], atol=0.05)  # the proportions stay


def test_features_come_with_the_same_ids_the_tokenizer_gives():
    torch.manual_seed(0)
    tok = ImageTokenizer(ImageTokenizerConfig(levels=(4, 4), channels=(8, 8, 8, 8), res_blocks=0))
    frames = torch.randint(0, 256, (3, 256, 256, 3), dtype=torch.uint8)
    ids, feats = encode_with_features(tok, frames)
    assert torch.equal(ids, tok.encode(frames))
    assert feats.shape == (3, 2 * 2 + 4) and np.isfinite(feats).all()
