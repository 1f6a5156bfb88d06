"""Tokenizers of M2; all share encode(x) -> ids, decode(ids) -> x, save/load."""
