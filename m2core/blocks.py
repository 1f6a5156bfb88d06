"""Transformer building blocks of the M2 model (see model.py for how they are put together).

Pre-norm blocks without biases, fused QKV, SwiGLU MLP, every attention through
`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on
GPU, the fused CPU kernel here). Masks are passed in the cheapest form that says what is
needed: `None`, `is_causal=True`, a key-padding mask `(B, 1, 1, N)` or, only for the
decoder's block-diagonal self-attention, a `(B, 1, Nt, Nt)` boolean mask built once per
forward. `KVCache` lets the caption decoder run one token at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_1d(n: int, dim: int) -> Tensor:
    """Fixed 1D sin-cos positions, (n, dim) (the Transformer's table)."""
    if dim % 2:
        raise ValueError(f"sin-cos positions need an even dim, got {dim}")
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(n, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table.float()


def sincos_2d(rows: int, cols: int, dim: int) -> Tensor:
    """Fixed 2D sin-cos positions of a row-major grid, (rows * cols, dim): half the
    channels encode the row, half the column (as in MAE / 4M)."""
    if dim % 4:
        raise ValueError(f"2D sin-cos positions need dim divisible by 4, got {dim}")
    r = sincos_1d(rows, dim // 2)[:, None, :].expand(rows, cols, dim // 2)
    c = sincos_1d(cols, dim // 2)[None, :, :].expand(rows, cols, dim // 2)
    return torch.cat([r, c], dim=-1).reshape(rows * cols, dim)


class KVCache:
    """Keys/values of one self-attention layer, filled left to right; allocated at the
    first append, in that step's dtype and device (so it follows autocast)."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        B, H, n, hd = k.shape
        if self.k is None:
            self.k = k.new_empty(B, H, self.max_len, hd)
            self.v = v.new_empty(B, H, self.max_len, hd)
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} + {n} > {self.max_len}")
        self.k[:, :, self.length : self.length + n] = k
        self.v[:, :, self.length : self.length + n] = v
        self.length += n
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # fused Q, K, V
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | None = None,
    ) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:  # queries are the newest positions; they see all cached keys
            if is_causal and N > 1:
                raise ValueError("a KV cache takes one query at a time in causal decoding")
            k, v = cache.append(k, v)
            is_causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the (normed) context, each (B, H, M, hd): computed once per
        forward, or once per generation call."""
        B, M, D = context.shape
        k, v = self.kv(context).view(B, M, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        B, N, D = x.shape
        q = self.q(x).view(B, N, self.heads, D // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """SwiGLU width: 2/3 of the plain MLP's (same parameters), rounded up to 64."""
    return int(math.ceil(2 * mlp_ratio * dim / 3 / 64) * 64)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)  # fused gate + up projection
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps, bias=False)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps, bias=False)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Self-attention among targets -> cross-attention to the context -> MLP (4M's order,
    with separate norms for the query and the context)."""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps, bias=False)
        self.attn = SelfAttention(dim, heads)
        self.norm_q = nn.LayerNorm(dim, eps=eps, bias=False)
        self.norm_ctx = nn.LayerNorm(dim, eps=eps, bias=False)
        self.cross = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps, bias=False)
        self.mlp = SwiGLU(dim, hidden)

    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        return self.cross.context_kv(self.norm_ctx(context))

    def forward(
        self,
        x: Tensor,
        kv: tuple[Tensor, Tensor],
        cross_mask: Tensor | None,
        self_mask: Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | None = None,
    ) -> Tensor:
        x = x + self.attn(self.norm1(x), self_mask, is_causal, cache)
        x = x + self.cross(self.norm_q(x), kv, cross_mask)
        return x + self.mlp(self.norm2(x))
