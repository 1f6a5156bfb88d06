"""Skeletons to pose tokens and back: precision, clamping, layout, errors."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from m2core.modalities import FUTURE_FRAMES, NUM_JOINTS, POSE_BINS, POSE_VOCAB, TOKENS_PER_POSE
from m2core.tokenizers.pose import NOT_VISIBLE_ID, VISIBLE_ID, PoseTokenizer

TOK = PoseTokenizer()
HALF_BIN = 0.5 / POSE_BINS


def _skeletons(
    rng: np.random.Generator, *lead: int, lo: float = 0.0, hi: float = 1.0
) -> np.ndarray:
    c = rng.uniform(lo, hi, size=(*lead, NUM_JOINTS, 3))
    c[..., 2] = rng.integers(0, 2, size=(*lead, NUM_JOINTS))
    return c


unit = st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(
    xy=arrays(np.float64, (NUM_JOINTS, 2), elements=unit),
    vis=arrays(np.int8, (NUM_JOINTS,), elements=st.integers(0, 1)),
)
def test_round_trip_within_half_a_bin(xy, vis):
    coords = np.concatenate([xy, vis[:, None]], axis=1)
    ids = TOK.encode(coords)
    assert ids.shape == (TOKENS_PER_POSE,) and ids.dtype == np.int64
    assert ((ids >= 0) & (ids < POSE_VOCAB)).all()
    back = TOK.decode(ids)
    assert back.shape == (NUM_JOINTS, 3) and back.dtype == np.float32
    assert np.abs(back[:, :2] - xy).max() <= HALF_BIN + 1e-7
    np.testing.assert_array_equal(back[:, 2], vis)
    np.testing.assert_array_equal(TOK.encode(back), ids)  # bin centres are fixed points


def test_layout_is_joint_major_x_y_visible():
    c = np.zeros((NUM_JOINTS, 3))
    c[4] = [0.25, 0.75, 1]
    ids = TOK.encode(c)
    assert ids[3 * 4 : 3 * 4 + 3].tolist() == [POSE_BINS // 4, 3 * POSE_BINS // 4, VISIBLE_ID]
    assert ids[0:3].tolist() == [0, 0, NOT_VISIBLE_ID]
    assert (VISIBLE_ID, NOT_VISIBLE_ID) == (POSE_BINS + 1, POSE_BINS)
    assert TOK.vocab_size == POSE_VOCAB and TOK.bin_width == pytest.approx(1 / POSE_BINS)


def test_edges_and_out_of_frame_values_clamp():
    c = np.zeros((NUM_JOINTS, 3))
    c[:, 0] = [0.0, 1.0, -0.3, 1.7, -1e9, 1e9, 0.5, 0.9999999, 1e-12, 0.5, 0.5, 0.5, 0.5]
    c[:, 1] = 0.5
    ids = TOK.encode(c)
    x = TOK.decode(ids)[:, 0]
    lo, hi = HALF_BIN, 1 - HALF_BIN
    np.testing.assert_allclose(x[:6], [lo, hi, lo, hi, lo, hi], rtol=0, atol=1e-7)
    assert ids[0] == 0 and ids[3] == POSE_BINS - 1  # 1.0 is in the last bin
    assert abs(x[7] - 0.9999999) <= HALF_BIN


def test_invisible_joints_keep_their_coordinates():
    c = np.zeros((NUM_JOINTS, 3))
    c[:, 0], c[:, 1], c[:, 2] = 0.3, 0.6, 0
    back = TOK.decode(TOK.encode(c))
    assert (back[:, 2] == 0).all()
    np.testing.assert_allclose(back[:, :2], c[:, :2], atol=HALF_BIN)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused(bad):
    c = np.zeros((2, NUM_JOINTS, 3))
    c[1, 5, 0] = bad
    with pytest.raises(ValueError, match="NaN/inf"):
        TOK.encode(c)


@pytest.mark.parametrize("shape", [(NUM_JOINTS, 2), (12, 3), (39,), (3, 13), (), (2, 14, 3)])
def test_wrong_shapes_name_the_expected_shape(shape):
    with pytest.raises(ValueError, match=r"\(\.\.\., 13, 3\)"):
        TOK.encode(np.zeros(shape))


def test_visible_must_be_0_or_1_and_coords_numbers():
    c = np.zeros((NUM_JOINTS, 3))
    c[0, 2] = 0.7
    with pytest.raises(ValueError, match="0 or 1"):
        TOK.encode(c)
    with pytest.raises(ValueError, match="numbers"):
        TOK.encode([["a"] * 3] * NUM_JOINTS)


def test_batches_of_any_leading_shape_match_one_by_one():
    rng = np.random.default_rng(0)
    c = _skeletons(rng, 2, 5, lo=-0.2, hi=1.2)
    ids = TOK.encode(c)
    assert ids.shape == (2, 5, TOKENS_PER_POSE)
    for i in range(2):
        for j in range(5):
            np.testing.assert_array_equal(ids[i, j], TOK.encode(c[i, j]))
    assert TOK.decode(ids).shape == (2, 5, NUM_JOINTS, 3)
    assert TOK.encode(np.zeros((0, NUM_JOINTS, 3))).shape == (0, TOKENS_PER_POSE)
    # torch tensors (CPU) work as inputs too
    np.testing.assert_array_equal(TOK.encode(torch.from_numpy(c)), ids)
    np.testing.assert_array_equal(TOK.decode(torch.from_numpy(ids)), TOK.decode(ids))


def test_future_block_is_six_skeletons_frame_major():
    rng = np.random.default_rng(1)
    fut = _skeletons(rng, 4, FUTURE_FRAMES)
    ids = TOK.encode_future(fut)
    assert ids.shape == (4, FUTURE_FRAMES * TOKENS_PER_POSE) == (4, 234)
    for k in range(FUTURE_FRAMES):
        np.testing.assert_array_equal(ids[:, 39 * k : 39 * (k + 1)], TOK.encode(fut[:, k]))
    back = TOK.decode_future(ids)
    assert back.shape == (4, FUTURE_FRAMES, NUM_JOINTS, 3)
    assert np.abs(back[..., :2] - fut[..., :2]).max() <= HALF_BIN + 1e-7
    np.testing.assert_array_equal(back[..., 2], fut[..., 2])
    with pytest.raises(ValueError, match=r"\(\.\.\., 6, 13, 3\)"):
        TOK.encode_future(fut[:, :5])
    with pytest.raises(ValueError, match=r"\(\.\.\., 234\)"):
        TOK.decode_future(ids[:, :233])


def test_decode_refuses_ids_in_the_wrong_slot_unless_lenient():
    ids = TOK.encode(np.zeros((NUM_JOINTS, 3)))
    bad = ids.copy()
    bad[0] = VISIBLE_ID  # a flag where x belongs
    bad[2] = 17  # a coordinate where the flag belongs
    with pytest.raises(ValueError, match="invalid pose ids"):
        TOK.decode(bad)
    lenient = TOK.decode(bad, strict=False)
    assert lenient[0, 0] == pytest.approx(1 - HALF_BIN) and lenient[0, 2] == 0
    with pytest.raises(ValueError, match=r"\(\.\.\., 39\)"):
        TOK.decode(ids[:38])
    with pytest.raises(ValueError, match="integers"):
        TOK.decode(ids + 0.5)
    np.testing.assert_array_equal(TOK.decode(ids.astype(np.float32)), TOK.decode(ids))


def test_other_bin_counts():
    tok = PoseTokenizer(bins=16)
    c = _skeletons(np.random.default_rng(2), 3)
    back = tok.decode(tok.encode(c))
    assert np.abs(back[..., :2] - c[..., :2]).max() <= 0.5 / 16 + 1e-7
    assert tok.vocab_size == 18 and tok.encode(c)[..., 2].max() <= 17
    with pytest.raises(ValueError, match="bins"):
        PoseTokenizer(bins=1)
