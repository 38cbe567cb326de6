"""Rotary position embeddings: the 2-D RoPE of MoonViT (spec §6.4) and the 1-D RoPE of the LM (spec §8.3).

Both rotate *interleaved* pairs: pair j is the complex number (x[2j], x[2j+1]) and turns by angle[j].
"""
from __future__ import annotations

import numpy as np

from .ops import apply_rope  # noqa: F401  (the rotation itself is a shared primitive, defined in ops)


def vision_rope_freqs(head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """f_i = theta^(-4i/head_dim) for i = 0 .. head_dim/4 - 1   # [head_dim//4] (spec §6.4)."""
    if head_dim % 4:
        raise ValueError(f"vision head_dim {head_dim} must be a multiple of 4 for 2-D RoPE")
    i = np.arange(0, head_dim, 4, dtype=np.float32)  # 0, 4, 8, ... exactly as 4i
    return (1.0 / (np.float32(theta) ** (i / np.float32(head_dim)))).astype(np.float32)


def vision_rope_angles(gh: int, gw: int, head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """Angle of every complex pair for an image of gh x gw patches   # [gh*gw, head_dim//2].

    Pair 2i turns by col*f_i and pair 2i+1 by row*f_i: x (column) first, then y (row), interleaved at pair
    granularity. The HF docstring says the opposite; the code (and every port) does this (spec §6.4).
    Positions restart at (0, 0) for every image.
    """
    f = vision_rope_freqs(head_dim, theta)                      # [D/4]
    t = np.arange(gh * gw)
    row = (t // gw).astype(np.float32)[:, None]                 # [L, 1]
    col = (t % gw).astype(np.float32)[:, None]                  # [L, 1]
    ang = np.empty((gh * gw, head_dim // 2), dtype=np.float32)  # [L, D/2]
    ang[:, 0::2] = col * f                                      # pairs 2i   <- column (x)
    ang[:, 1::2] = row * f                                      # pairs 2i+1 <- row (y)
    return ang


def lm_inv_freq(dim: int, theta: float) -> np.ndarray:
    """inv_freq_i = theta^(-2i/dim), i = 0 .. dim/2-1, in fp32 from the config   # [dim//2] (spec §8.3).

    The checkpoint also stores ``rotary_emb.inv_freq`` per layer, rounded to bf16; it is never used.
    """
    i = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32)
    return (1.0 / (np.float32(theta) ** (i / np.float32(dim)))).astype(np.float32)


def lm_rope_angles(positions, inv_freq: np.ndarray) -> np.ndarray:
    """angle[s, i] = pos_s * inv_freq_i in fp32   # [S, dim//2]."""
    pos = np.asarray(positions, dtype=np.float32).reshape(-1, 1)
    return pos * inv_freq[None, :].astype(np.float32)
