"""The modality registry: the five modalities, their sizes, and that nobody can change it."""

import dataclasses
import json

import pytest

from m2core.modalities import (
    FUTURE_FRAMES,
    GENERATION_ORDER,
    JOINT_NAMES,
    MODALITY_NAMES,
    NUM_JOINTS,
    POSE_BINS,
    POSE_VOCAB,
    SKELETON_EDGES,
    TOKENS_PER_POSE,
    build_registry,
)
from m2core.tokenizers.pose import PoseTokenizer
from m2core.tokenizers.text import TextTokenizer

NAMES = ("tok_rgb", "coords", "captions", "tok_rgb_next", "coords_next")


def test_five_modalities_with_their_token_counts():
    reg = build_registry(image_vocab=4096, text_vocab=300, caption_len=32)
    assert tuple(reg) == NAMES == MODALITY_NAMES and len(reg) == 5
    counts = {n: reg[n].num_tokens for n in reg}
    assert counts == {
        "tok_rgb": 256,
        "coords": 39,
        "captions": 32,
        "tok_rgb_next": 256,
        "coords_next": 234,
    }
    assert {n: reg[n].kind for n in reg} == {
        "tok_rgb": "image", "coords": "pose", "captions": "text",
        "tok_rgb_next": "image", "coords_next": "pose",
    }  # fmt: skip
    assert reg["coords_next"].frames == FUTURE_FRAMES == 6 and reg["coords"].frames == 1
    assert reg["tok_rgb"].grid == (16, 16) and reg["coords"].grid is None
    assert reg["captions"].causal and not reg["tok_rgb"].causal
    assert [reg.index(n) for n in NAMES] == [0, 1, 2, 3, 4]


def test_future_modalities_are_never_inputs():
    reg = build_registry()
    assert reg.inputs == ("tok_rgb", "coords", "captions")
    assert reg.targets == NAMES
    for name in ("tok_rgb_next", "coords_next"):
        assert not reg[name].can_input and reg[name].can_target
    assert set(GENERATION_ORDER) <= set(reg.targets)
    assert not set(GENERATION_ORDER) & {"tok_rgb"}  # the frame is always given


@pytest.mark.parametrize(
    "image_vocab,text_vocab,caption_len", [(4096, 50260, 32), (64, 259, 3), (1000, 777, 48)]
)
def test_vocab_sizes_follow_the_arguments(image_vocab, text_vocab, caption_len):
    reg = build_registry(image_vocab, text_vocab, caption_len)
    assert reg["tok_rgb"].vocab_size == reg["tok_rgb_next"].vocab_size == image_vocab
    assert reg["captions"].vocab_size == text_vocab and reg["captions"].num_tokens == caption_len
    assert reg["coords"].vocab_size == reg["coords_next"].vocab_size == POSE_VOCAB == POSE_BINS + 2
    # the JSON description carries the same numbers and survives a round trip
    d = json.loads(json.dumps(reg.to_dict()))
    assert d["captions"]["vocab_size"] == text_vocab and d["tok_rgb_next"]["can_input"] is False


def test_registry_sizes_agree_with_the_real_tokenizers():
    text = TextTokenizer.build(["a person waves"], max_len=20)
    reg = build_registry(text_vocab=text.vocab_size, caption_len=text.max_len)
    assert reg["captions"].vocab_size == text.vocab_size and reg["captions"].num_tokens == 20
    assert TextTokenizer("full").vocab_size == build_registry()["captions"].vocab_size == 50260
    assert PoseTokenizer().vocab_size == reg["coords"].vocab_size
    assert TOKENS_PER_POSE == NUM_JOINTS * 3 == len(JOINT_NAMES) * 3 == 39


def test_registry_and_modalities_are_immutable():
    reg = build_registry()
    with pytest.raises(dataclasses.FrozenInstanceError):
        reg["coords"].num_tokens = 40
    with pytest.raises(TypeError):
        reg["coords"] = reg["captions"]
    with pytest.raises(TypeError):
        del reg["coords"]
    with pytest.raises(TypeError):
        reg._by_name["new"] = reg["coords"]
    assert build_registry()["coords"].num_tokens == 39  # a fresh registry is unchanged too


def test_bad_sizes_and_names_are_clear_errors():
    with pytest.raises(ValueError, match="implausible"):
        build_registry(image_vocab=1)
    with pytest.raises(ValueError, match="implausible"):
        build_registry(text_vocab=100)  # fewer than specials + 256 byte tokens
    with pytest.raises(ValueError, match="implausible"):
        build_registry(caption_len=2)
    with pytest.raises(KeyError, match="unknown modality 'depth'"):
        build_registry()["depth"]


def test_skeleton_edges_join_real_joints():
    assert len(JOINT_NAMES) == NUM_JOINTS == 13 and JOINT_NAMES[0] == "head"
    assert all(0 <= a < NUM_JOINTS and 0 <= b < NUM_JOINTS and a != b for a, b in SKELETON_EDGES)
    assert {j for e in SKELETON_EDGES for j in e} == set(range(NUM_JOINTS))  # all connected
